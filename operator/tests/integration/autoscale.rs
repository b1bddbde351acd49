//! The autoscaler through the real API server and the real broker: a backlog on a
//! pipeline's topic raises the worker Deployment's replicas at the first readings and the
//! status reports the lag, the reason and the Drain column's figure's inputs; `kubectl
//! scale eventpipeline` (the scale subresource) pins the count and the autoscaler then only
//! reports. No pods run here (no kubelet): the drain rate stays unmeasured, so the count
//! comes from the lag-per-replica rule, one replica per partition at most.

use crate::common;

use std::time::Duration;

use common::{Cluster, Operator, config, connection_yaml, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use rdkafka::producer::FutureRecord;
use weir_crds::EventPipeline;
use weir_testkit::{TestKafka, unique_name};

#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_raises_the_replicas_and_kubectl_scale_pins_them() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let topic = kafka.create_topic("scaled", 4, &[]).await?;
    let producer = kafka.producer()?;
    for i in 0..2000 {
        producer
            .send(
                FutureRecord::to(&topic).key(&format!("k{i}")).payload("{}"),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
    }
    let ns = cluster.namespace("autoscale").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let mut settings = config(&unique_name("lease"), "op-scale");
    settings.lag_interval = Duration::from_secs(1);
    let operator = Operator::start(cluster.operator_client()?, settings);
    cluster
        .apply_yaml(
            &ns,
            &format!(
                r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: orders}}
spec:
  source: {{topics: [{topic}], consumerGroup: {group}}}
  sinks:
    - postgres:
        urlFrom: {{env: DATABASE_URL}}
        table: orders
        columns: [{{name: id, type: bigint}}]
  scaling: {{minReplicas: 1, maxReplicas: 8, targetLagPerReplica: 100}}
"#,
                group = unique_name("scaled-group")
            ),
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(cluster.admin.clone(), &ns);
    let pipelines: Api<EventPipeline> = Api::namespaced(cluster.admin.clone(), &ns);
    let replicas = || async {
        anyhow::Ok(
            deployments
                .get_opt("orders-worker")
                .await?
                .and_then(|d| d.spec)
                .and_then(|s| s.replicas),
        )
    };
    // 2000 records on 4 partitions at 100 per replica: one replica per partition, 4. The
    // operator scales the Deployment before it writes the status of the same reconcile, so
    // the status is waited for too: a Deployment at 4 read back with the status still of
    // the reconcile before (or of none) is that order, not a wrong figure.
    let status = eventually("4 replicas from the backlog, in the status too", || async {
        if replicas().await? != Some(4) {
            return Ok(None);
        }
        let status = pipelines.get("orders").await?.status.unwrap_or_default();
        Ok((status.desired_replicas == Some(4) && status.replicas == Some(4)).then_some(status))
    })
    .await?;
    assert_eq!(status.lag.as_ref().map(|l| l.total), Some(2000));
    // The Deployment is created without replicas (the API server's default is 1), so the
    // first reading activates it: "0 → 4". When that reading could not be taken (a broker
    // slow to answer under load: LagUnknown keeps the default 1), the next one scales
    // "1 → 4" by the lag per replica. Either way one decision reaches 4.
    assert!(
        status
            .last_scale_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("0 → 4") || r.starts_with("1 → 4")),
        "{status:?}"
    );
    let scaling = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Scaling")
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no Scaling condition: {status:?}"))?;
    // The count of the first reading is the activation's; a lag reading that came since
    // (every second here) derives the same 4 from the lag per replica.
    assert!(
        matches!(scaling.reason.as_str(), "Activated" | "LagPerReplica"),
        "{scaling:?}"
    );

    // kubectl scale eventpipeline orders --replicas 2: the count is pinned.
    pipelines
        .patch_scale(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})),
        )
        .await?;
    eventually("2 replicas, pinned", || async {
        Ok(replicas().await?.filter(|r| *r == 2))
    })
    .await?;
    let pinned = eventually("Scaling=False Pinned", || async {
        let status = pipelines.get("orders").await?.status.unwrap_or_default();
        Ok(status
            .conditions
            .iter()
            .find(|c| c.type_ == "Scaling" && c.reason == "Pinned")
            .cloned()
            .map(|c| (c, status.desired_replicas)))
    })
    .await?;
    assert!(
        pinned.0.message.contains("spec.replicas pins 2"),
        "{:?}",
        pinned.0
    );
    assert!(pinned.1.is_some());
    // Several readings later it is still pinned.
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
    assert_eq!(replicas().await?, Some(2));
    operator.stop().await
}
