//! KafkaTopic against the real Kafka broker and the real API server, the operator running
//! with the chart's ClusterRole: create with configs, raise partitions, refuse lowering,
//! alter a managed config while an unmanaged one is left alone, delete under
//! `deletionPolicy: Delete`, adopt and keep under Retain, and two namespaces claiming one
//! topic name (the newer reports Conflict; the topic follows only the owner).

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Cluster, Operator, config, connection_yaml, eventually, ready};
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use weir_crds::KafkaTopic;
use weir_testkit::{TestKafka, unique_name};

/// The broker's view of a topic: partitions and its configs; `None` when it does not exist.
async fn broker_topic(
    kafka: &TestKafka,
    name: &str,
) -> anyhow::Result<Option<(usize, HashMap<String, String>)>> {
    let admin: AdminClient<DefaultClientContext> = kafka.admin()?;
    let metadata = admin
        .inner()
        .fetch_metadata(Some(name), Duration::from_secs(5))?;
    let Some(topic) = metadata.topics().first() else {
        return Ok(None);
    };
    if topic.error().is_some() || topic.partitions().is_empty() {
        return Ok(None);
    }
    let partitions = topic.partitions().len();
    let configs = admin
        .describe_configs([&ResourceSpecifier::Topic(name)], &AdminOptions::new())
        .await?;
    let mut out = HashMap::new();
    for resource in configs.into_iter().flatten() {
        for entry in resource.entries {
            if let Some(value) = entry.value {
                out.insert(entry.name, value);
            }
        }
    }
    Ok(Some((partitions, out)))
}

fn topic_yaml(name: &str, topic: &str, partitions: i32, retention_ms: i64, policy: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {{name: {name}}}\nspec:\n  topicName: {topic}\n  partitions: {partitions}\n  deletionPolicy: {policy}\n  config:\n    retention.ms: {retention_ms}\n"
    )
}

async fn ready_of(
    api: &Api<KafkaTopic>,
    name: &str,
) -> anyhow::Result<Option<(String, String, String)>> {
    let status = serde_json::to_value(&api.get(name).await?.status)?;
    Ok(ready(Some(&status)))
}

#[tokio::test(flavor = "multi_thread")]
async fn create_raise_refuse_lowering_alter_managed_config_and_delete() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("topics").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-a"),
    );
    let api: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &ns);
    let topic = unique_name("orders");

    cluster
        .apply_yaml(&ns, &topic_yaml("orders", &topic, 2, 3_600_000, "Delete"))
        .await?;
    eventually("the topic to be Ready", || async {
        Ok(ready_of(&api, "orders").await?.filter(|r| r.0 == "True"))
    })
    .await?;
    let (partitions, configs) = broker_topic(&kafka, &topic)
        .await?
        .ok_or_else(|| anyhow::anyhow!("topic missing"))?;
    assert_eq!(partitions, 2);
    assert_eq!(
        configs.get("retention.ms").map(String::as_str),
        Some("3600000")
    );
    let stored = api.get("orders").await?;
    assert!(
        stored
            .finalizers()
            .contains(&weir_operator::controllers::topic::FINALIZER.to_owned())
    );
    let status = stored.status.clone().unwrap_or_default();
    assert_eq!(status.partitions, Some(2));
    assert_eq!(status.adopted, Some(false));
    assert_eq!(
        status.config.get("retention.ms").map(String::as_str),
        Some("3600000")
    );

    // Someone sets a config this resource does not manage, directly on the broker.
    let admin: AdminClient<DefaultClientContext> = kafka.admin()?;
    let alter = AlterConfig::new(ResourceSpecifier::Topic(&topic))
        .set("retention.ms", "3600000")
        .set("segment.ms", "7200000");
    for result in admin.alter_configs([&alter], &AdminOptions::new()).await? {
        result.map_err(|(_, code)| anyhow::anyhow!("{code}"))?;
    }

    // Raise partitions and change the managed config: the unmanaged one stays.
    cluster
        .apply_yaml(&ns, &topic_yaml("orders", &topic, 4, 7_200_000, "Delete"))
        .await?;
    eventually(
        "4 partitions and the new retention on the broker",
        || async {
            Ok(broker_topic(&kafka, &topic).await?.filter(|(p, c)| {
                *p == 4 && c.get("retention.ms").map(String::as_str) == Some("7200000")
            }))
        },
    )
    .await?;
    let (_, configs) = broker_topic(&kafka, &topic).await?.unwrap_or_default();
    assert_eq!(
        configs.get("segment.ms").map(String::as_str),
        Some("7200000"),
        "the unmanaged config was reset"
    );

    // Lowering is refused with a condition and never attempted.
    cluster
        .apply_yaml(&ns, &topic_yaml("orders", &topic, 3, 7_200_000, "Delete"))
        .await?;
    let (_, reason, message) = eventually("the decrease to be refused", || async {
        Ok(ready_of(&api, "orders")
            .await?
            .filter(|r| r.1 == "PartitionDecreaseRefused"))
    })
    .await?;
    assert_eq!(reason, "PartitionDecreaseRefused");
    assert!(message.contains("has 4"), "{message}");
    assert_eq!(broker_topic(&kafka, &topic).await?.map(|t| t.0), Some(4));

    // deletionPolicy: Delete removes the topic, then the finalizer.
    api.delete("orders", &DeleteParams::default()).await?;
    eventually("the KafkaTopic to be gone", || async {
        Ok(api.get_opt("orders").await?.is_none().then_some(()))
    })
    .await?;
    assert_eq!(
        broker_topic(&kafka, &topic).await?.map(|t| t.0),
        None,
        "the Kafka topic was not deleted"
    );
    operator.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_topic_is_adopted_and_retained_on_delete() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("adopt").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let topic = unique_name("legacy");
    let admin: AdminClient<DefaultClientContext> = kafka.admin()?;
    for result in admin
        .create_topics(
            [&NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        result.map_err(|(_, code)| anyhow::anyhow!("{code}"))?;
    }
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-a"),
    );
    let api: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &ns);
    cluster
        .apply_yaml(&ns, &topic_yaml("legacy", &topic, 3, 86_400_000, "Retain"))
        .await?;
    eventually("the topic to be Ready", || async {
        Ok(ready_of(&api, "legacy").await?.filter(|r| r.0 == "True"))
    })
    .await?;
    let stored = api.get("legacy").await?;
    assert_eq!(stored.status.as_ref().and_then(|s| s.adopted), Some(true));
    assert!(
        stored.finalizers().is_empty(),
        "Retain must not add a finalizer: {:?}",
        stored.finalizers()
    );

    api.delete("legacy", &DeleteParams::default()).await?;
    eventually("the KafkaTopic to be gone", || async {
        Ok(api.get_opt("legacy").await?.is_none().then_some(()))
    })
    .await?;
    let (partitions, configs) = broker_topic(&kafka, &topic)
        .await?
        .ok_or_else(|| anyhow::anyhow!("Retain deleted the topic"))?;
    assert_eq!(partitions, 3);
    assert_eq!(
        configs.get("retention.ms").map(String::as_str),
        Some("86400000")
    );
    operator.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_newer_of_two_claims_on_one_topic_name_reports_conflict() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let first = cluster.namespace("team-a").await?;
    let second = cluster.namespace("team-b").await?;
    for ns in [&first, &second] {
        cluster.apply_yaml(ns, &connection_yaml(&kafka)).await?;
    }
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-a"),
    );
    let topic = unique_name("shared");
    let owner: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &first);
    let other: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &second);
    cluster
        .apply_yaml(
            &first,
            &topic_yaml("events", &topic, 1, 3_600_000, "Retain"),
        )
        .await?;
    eventually("the first claim to be Ready", || async {
        Ok(ready_of(&owner, "events").await?.filter(|r| r.0 == "True"))
    })
    .await?;
    cluster
        .apply_yaml(&second, &topic_yaml("events", &topic, 6, 60_000, "Delete"))
        .await?;
    let (status, _, message) = eventually("the second claim to report Conflict", || async {
        Ok(ready_of(&other, "events")
            .await?
            .filter(|r| r.1 == "Conflict"))
    })
    .await?;
    assert_eq!(status, "False");
    assert!(
        message.contains(&format!("KafkaTopic {first}/events")),
        "{message}"
    );
    // Let the operator reconcile both a few more times: the topic follows the owner only.
    let reconciles = operator
        .metrics
        .reconciles(weir_operator::controllers::topic::KIND);
    eventually("more reconciles", || async {
        Ok((operator
            .metrics
            .reconciles(weir_operator::controllers::topic::KIND)
            >= reconciles + 4)
            .then_some(()))
    })
    .await?;
    let (partitions, configs) = broker_topic(&kafka, &topic).await?.unwrap_or_default();
    assert_eq!(partitions, 1);
    assert_eq!(
        configs.get("retention.ms").map(String::as_str),
        Some("3600000")
    );
    // Deleting the loser (deletionPolicy: Delete) must not delete the owner's topic.
    other.delete("events", &DeleteParams::default()).await?;
    eventually("the second claim to be gone", || async {
        Ok(other.get_opt("events").await?.is_none().then_some(()))
    })
    .await?;
    assert!(
        broker_topic(&kafka, &topic).await?.is_some(),
        "the owner's topic was deleted"
    );
    operator.stop().await
}

/// A new user applies a topic asking for 3 replicas to a one-broker cluster: the status
/// and a Warning Event say so in the spec's terms (not librdkafka's
/// "InvalidReplicationFactor"), and no topic is made.
#[tokio::test(flavor = "multi_thread")]
async fn a_replication_factor_above_the_broker_count_is_refused_in_the_users_terms()
-> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("replicas").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-rf"),
    );
    let connections: Api<weir_crds::KafkaConnection> = Api::namespaced(cluster.admin.clone(), &ns);
    eventually("the connection to count its brokers", || async {
        Ok(connections
            .get("default")
            .await?
            .status
            .and_then(|s| s.brokers))
    })
    .await?;
    let topic = unique_name("events");
    cluster
        .apply_yaml(
            &ns,
            &format!(
                "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {{name: events}}\nspec:\n  topicName: {topic}\n  partitions: 3\n  replicationFactor: 3\n"
            ),
        )
        .await?;
    let api: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &ns);
    let (status, reason, message) = eventually("Ready=False", || async {
        Ok(ready_of(&api, "events").await?.filter(|r| r.0 == "False"))
    })
    .await?;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(
        message.starts_with("spec.replicationFactor 3 exceeds the cluster's 1 broker(s)"),
        "{message}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.admin.clone(), &ns);
    let warning = eventually("a Warning Event", || async {
        Ok(events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .find(|e| e.type_.as_deref() == Some("Warning")))
    })
    .await?;
    assert_eq!(warning.reason.as_deref(), Some("InvalidSpec"));
    assert!(
        warning
            .note
            .unwrap_or_default()
            .contains("exceeds the cluster's 1 broker(s)")
    );
    assert!(broker_topic(&kafka, &topic).await?.is_none());
    operator.stop().await
}
