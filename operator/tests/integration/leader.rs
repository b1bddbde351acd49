//! Two operator replicas against the real API server: only the holder of the Lease acts
//! (the other makes no write at all), and when the leader stops, the other takes over.

use crate::common;

use common::{Cluster, Operator, config, connection_yaml, eventually, ready};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use weir_crds::KafkaTopic;
use weir_testkit::{TestKafka, unique_name};

fn topic_yaml(name: &str, topic: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {{name: {name}}}\nspec:\n  topicName: {topic}\n"
    )
}

async fn holder(leases: &Api<Lease>, name: &str) -> anyhow::Result<Option<String>> {
    Ok(leases
        .get_opt(name)
        .await?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_lease_holder_writes_and_the_other_takes_over() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("leader").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let lease = unique_name("lease");
    let leases: Api<Lease> = Api::namespaced(cluster.admin.clone(), "default");

    let first = Operator::start(cluster.operator_client()?, config(&lease, "replica-a"));
    eventually("replica-a to hold the Lease", || async {
        Ok(holder(&leases, &lease).await?.filter(|h| h == "replica-a"))
    })
    .await?;
    let second = Operator::start(cluster.operator_client()?, config(&lease, "replica-b"));

    let topics: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &ns);
    cluster
        .apply_yaml(&ns, &topic_yaml("one", &unique_name("one")))
        .await?;
    eventually("the first topic to be Ready", || async {
        let status = serde_json::to_value(&topics.get("one").await?.status)?;
        Ok(ready(Some(&status)).filter(|r| r.0 == "True"))
    })
    .await?;
    // The follower has been running all along: it has reconciled and written nothing.
    assert!(first.metrics.writes() > 0);
    assert_eq!(
        second.metrics.writes(),
        0,
        "the follower wrote to the API server"
    );
    assert_eq!(
        second
            .metrics
            .reconciles(weir_operator::controllers::topic::KIND),
        0
    );
    assert_eq!(holder(&leases, &lease).await?.as_deref(), Some("replica-a"));

    // The leader stops (releasing the Lease); the follower leads and reconciles.
    first.stop().await?;
    eventually("replica-b to hold the Lease", || async {
        Ok(holder(&leases, &lease).await?.filter(|h| h == "replica-b"))
    })
    .await?;
    cluster
        .apply_yaml(&ns, &topic_yaml("two", &unique_name("two")))
        .await?;
    eventually("the second topic to be Ready", || async {
        let status = serde_json::to_value(&topics.get("two").await?.status)?;
        Ok(ready(Some(&status)).filter(|r| r.0 == "True"))
    })
    .await?;
    assert!(second.metrics.writes() > 0);
    let lease_object = leases.get(&lease).await?;
    let transitions = lease_object.spec.and_then(|s| s.lease_transitions);
    assert_eq!(transitions, Some(1));
    second.stop().await
}
