//! `spec.replay` through the real API server and the real broker: a group that consumed
//! its topic to the end gets a replay to Earliest; its committed offsets go back to the
//! start, the token and time are recorded and the workers come back; the same token
//! applied again does nothing (offsets committed afterwards stay). No pods run here, so
//! the group has no members once the Deployment is at zero.

use crate::common;

use std::time::Duration;

use common::{Cluster, Operator, config, connection_yaml, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use weir_crds::EventPipeline;
use weir_testkit::{TestKafka, unique_name};

fn pipeline_yaml(topic: &str, group: &str, token: &str) -> String {
    format!(
        r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: todo-projection}}
spec:
  source: {{topics: [{topic}], consumerGroup: {group}}}
  sinks:
    - postgres:
        urlFrom: {{env: DATABASE_URL}}
        table: todos
        columns: [{{name: id, type: bigint}}]
  replay: {{token: {token}, to: Earliest}}
"#
    )
}

/// Commits the end of every partition for `group`, as a consumer that read everything.
fn commit_to_end(kafka: &TestKafka, topic: &str, group: &str, ends: &[i64]) -> anyhow::Result<()> {
    let consumer = kafka.consumer(group)?;
    let mut list = TopicPartitionList::new();
    for (p, end) in ends.iter().enumerate() {
        list.add_partition_offset(topic, p as i32, Offset::Offset(*end))?;
    }
    consumer.commit(&list, CommitMode::Sync)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_resets_the_group_once_per_token() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let topic = kafka.create_topic("todo-events", 2, &[]).await?;
    let producer = kafka.producer()?;
    for i in 0..40 {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(i % 2)
                    .key("u")
                    .payload("{}"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
    }
    let group = unique_name("projection");
    commit_to_end(&kafka, &topic, &group, &[20, 20])?;
    let ns = cluster.namespace("replay").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-replay"),
    );
    cluster
        .apply_yaml(&ns, &pipeline_yaml(&topic, &group, "rebuild-1"))
        .await?;
    let pipelines: Api<EventPipeline> = Api::namespaced(cluster.admin.clone(), &ns);
    let replayed = eventually("the replay recorded", || async {
        Ok(pipelines
            .get("todo-projection")
            .await?
            .status
            .and_then(|s| s.last_replay)
            .filter(|r| r.token == "rebuild-1"))
    })
    .await?;
    assert_eq!(replayed.error, None, "{replayed:?}");
    let committed = kafka.committed_offsets(&group, &topic)?;
    assert_eq!(
        (committed.get(&0), committed.get(&1)),
        (Some(&0), Some(&0)),
        "{committed:?}"
    );
    assert!(
        !replayed.truncated,
        "truncateSinks was not asked: {replayed:?}"
    );
    // The workers come back, with the token to carry out in the sinks (no truncation).
    let deployments: Api<Deployment> = Api::namespaced(cluster.admin.clone(), &ns);
    let deployment = eventually("the workers back", || async {
        Ok(deployments
            .get("todo-projection-worker")
            .await?
            .spec
            .filter(|s| s.replicas.is_some_and(|r| r >= 1)))
    })
    .await?;
    let env: Vec<(String, Option<String>)> = deployment
        .template
        .spec
        .iter()
        .flat_map(|p| &p.containers)
        .flat_map(|c| c.env.iter().flatten())
        .map(|v| (v.name.clone(), v.value.clone()))
        .collect();
    for (name, value) in [
        ("WEIR_REPLAY_TOKEN", "rebuild-1"),
        ("WEIR_REPLAY_TRUNCATE", "false"),
    ] {
        assert!(
            env.contains(&(name.to_owned(), Some(value.to_owned()))),
            "{name}={value} not in {env:?}"
        );
    }

    // The group reads to the end again; the same YAML applied again does nothing.
    commit_to_end(&kafka, &topic, &group, &[20, 20])?;
    cluster
        .apply_yaml(&ns, &pipeline_yaml(&topic, &group, "rebuild-1"))
        .await?;
    let reconciles = operator
        .metrics
        .reconciles(weir_operator::controllers::pipeline::KIND);
    eventually("three more pipeline reconciles", || async {
        Ok((operator
            .metrics
            .reconciles(weir_operator::controllers::pipeline::KIND)
            >= reconciles + 3)
            .then_some(()))
    })
    .await?;
    let committed = kafka.committed_offsets(&group, &topic)?;
    assert_eq!(
        (committed.get(&0), committed.get(&1)),
        (Some(&20), Some(&20)),
        "the same token replayed again: {committed:?}"
    );
    operator.stop().await
}
