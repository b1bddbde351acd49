//! KafkaTopic drift and identity, against the real broker and the real API server: a
//! managed config changed with Kafka's own `kafka-configs` tool is reported (`Drifted`:
//! the Ready condition's reason and a Warning Event naming the key) and put back, while an
//! unmanaged config changed in the same command survives (configs are altered
//! incrementally); a config dropped from the spec goes back to the broker's default; and
//! `status.topicId` is the id Kafka's own `kafka-topics --describe` prints.

use crate::common;

use std::collections::HashMap;

use common::{Cluster, Operator, config, connection_yaml, eventually, ready};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use weir_crds::KafkaTopic;
use weir_testkit::{TestKafka, unique_name};

/// The configs set on the topic itself (not broker defaults), as Kafka reports them.
async fn topic_configs(kafka: &TestKafka, topic: &str) -> anyhow::Result<HashMap<String, String>> {
    let admin: AdminClient<DefaultClientContext> = kafka.admin()?;
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await?;
    let mut out = HashMap::new();
    for resource in described.into_iter().flatten() {
        for entry in resource.entries {
            if entry.source == rdkafka::admin::ConfigSource::DynamicTopic
                && let Some(value) = entry.value
            {
                out.insert(entry.name, value);
            }
        }
    }
    Ok(out)
}

fn topic_yaml(topic: &str, configs: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {{name: events}}\nspec:\n  topicName: {topic}\n  partitions: 1\n  config:\n"
    );
    for (key, value) in configs {
        yaml.push_str(&format!("    {key}: \"{value}\"\n"));
    }
    yaml
}

#[tokio::test(flavor = "multi_thread")]
async fn drift_is_reported_then_put_back_and_the_topic_id_is_kafkas() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("drift").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-drift"),
    );
    let api: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &ns);
    let topic = unique_name("drift");
    cluster
        .apply_yaml(
            &ns,
            &topic_yaml(
                &topic,
                &[("retention.ms", "3600000"), ("cleanup.policy", "compact")],
            ),
        )
        .await?;
    let status = eventually("the topic to be Ready with its id", || async {
        let stored = api.get("events").await?;
        let status = stored.status.clone().unwrap_or_default();
        let value = serde_json::to_value(&stored.status)?;
        Ok(
            (ready(Some(&value)).is_some_and(|r| r.0 == "True") && status.topic_id.is_some())
                .then_some(status),
        )
    })
    .await?;

    // The id Kafka's own tool prints.
    let topic_for_tool = topic.clone();
    let kafka_for_tool = kafka.clone();
    let described = tokio::task::spawn_blocking(move || {
        kafka_for_tool.kafka_tool(
            "org.apache.kafka.tools.TopicCommand",
            &["--describe", "--topic", &topic_for_tool],
        )
    })
    .await??;
    let id = described
        .split_whitespace()
        .skip_while(|w| *w != "TopicId:")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no TopicId in: {described}"))?;
    assert_eq!(status.topic_id.as_deref(), Some(id));

    // Someone changes the managed retention.ms and an unmanaged segment.ms in one command.
    let topic_for_tool = topic.clone();
    let kafka_for_tool = kafka.clone();
    tokio::task::spawn_blocking(move || {
        kafka_for_tool.kafka_tool(
            "kafka.admin.ConfigCommand",
            &[
                "--alter",
                "--entity-type",
                "topics",
                "--entity-name",
                &topic_for_tool,
                "--add-config",
                "retention.ms=1000,segment.ms=7200000",
            ],
        )
    })
    .await??;
    let (_, reason, message) = eventually("the drift to be reported", || async {
        let value = serde_json::to_value(&api.get("events").await?.status)?;
        Ok(ready(Some(&value)).filter(|r| r.1 == "Drifted"))
    })
    .await?;
    assert_eq!(reason, "Drifted");
    assert!(message.contains("retention.ms"), "{message}");
    let events: Api<Event> = Api::namespaced(cluster.admin.clone(), &ns);
    let event = eventually("the Drifted Event", || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Drifted")))
    })
    .await?;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.message.unwrap_or_default();
    assert!(
        note.contains("retention.ms (found 1000, spec 3600000)"),
        "{note}"
    );
    let configs = eventually("retention.ms to be put back", || async {
        let configs = topic_configs(&kafka, &topic).await?;
        Ok((configs.get("retention.ms").map(String::as_str) == Some("3600000")).then_some(configs))
    })
    .await?;
    assert_eq!(
        configs.get("segment.ms").map(String::as_str),
        Some("7200000"),
        "the unmanaged config changed at the same moment was lost"
    );

    // A config dropped from the spec goes back to the broker's default; the others stay.
    cluster
        .apply_yaml(&ns, &topic_yaml(&topic, &[("retention.ms", "3600000")]))
        .await?;
    let configs = eventually("cleanup.policy back to the default", || async {
        let configs = topic_configs(&kafka, &topic).await?;
        Ok((!configs.contains_key("cleanup.policy")).then_some(configs))
    })
    .await?;
    assert_eq!(
        configs.get("retention.ms").map(String::as_str),
        Some("3600000")
    );
    assert_eq!(
        configs.get("segment.ms").map(String::as_str),
        Some("7200000")
    );
    let (_, reason, _) = eventually("Applied after the spec change", || async {
        let value = serde_json::to_value(&api.get("events").await?.status)?;
        Ok(ready(Some(&value)).filter(|r| r.1 == "Applied"))
    })
    .await?;
    assert_eq!(reason, "Applied");

    operator.stop().await
}
