//! EventPipeline against the real API server, the operator running with the chart's
//! ClusterRole: the worker's Deployment, ConfigMap, Service, ServiceAccount and
//! PodDisruptionBudget appear with owner references; further reconciles write nothing (the
//! resourceVersions stay); a spec change rolls the Deployment; the dead-letter KafkaTopic
//! goes when `deadLetter` leaves the spec; a spec the API server
//! accepts but the worker would refuse (a CEL expression that does not compile) is reported
//! as `Ready=False, reason=InvalidSpec` with its field path. No pods run here (no kubelet):
//! the Deployment is checked as the API server stores it.

use crate::common;

use std::collections::BTreeMap;

use common::{Cluster, Operator, config, connection_yaml, eventually, ready};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::{Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use weir_crds::{EventPipeline, KafkaTopic};
use weir_operator::render::CONFIG_HASH_ANNOTATION;
use weir_testkit::{TestKafka, unique_name};

fn pipeline_yaml(max_records: u32, filter: &str) -> String {
    format!(
        r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: orders}}
spec:
  source: {{topics: [orders]}}
  filter: '{filter}'
  sinks:
    - postgres:
        urlFrom: {{secretKeyRef: {{name: orders-db, key: url}}}}
        table: orders
        mode: Upsert
        keyColumns: [id]
        columns: [{{name: id, type: bigint}}]
  batch: {{maxRecords: {max_records}}}
  deadLetter: {{topic: orders-dlq}}
  scaling: {{minReplicas: 2}}
"#
    )
}

async fn version_of<K>(api: &Api<K>, name: &str) -> anyhow::Result<Option<String>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?.and_then(|o| o.resource_version()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_gets_its_objects_then_steady_state_writes_nothing_and_a_change_rolls()
-> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("pipelines").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-a"),
    );
    cluster
        .apply_yaml(&ns, &pipeline_yaml(500, "event.total > 0"))
        .await?;

    let client = cluster.admin.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let topics: Api<KafkaTopic> = Api::namespaced(client.clone(), &ns);
    let pipelines: Api<EventPipeline> = Api::namespaced(client.clone(), &ns);

    let deployment = eventually("the worker Deployment", || async {
        Ok(deployments.get_opt("orders-worker").await?)
    })
    .await?;
    let pipeline = pipelines.get("orders").await?;
    let uid = pipeline.uid().unwrap_or_default();
    let owned_by_pipeline =
        |owners: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>| {
            owners
                .iter()
                .any(|o| o.kind == "EventPipeline" && o.uid == uid && o.controller == Some(true))
        };
    assert!(owned_by_pipeline(deployment.owner_references().to_vec()));
    let config_map = config_maps.get("orders-pipeline").await?;
    assert!(owned_by_pipeline(config_map.owner_references().to_vec()));
    let file = config_map
        .data
        .unwrap_or_default()
        .remove("pipeline.yaml")
        .unwrap_or_default();
    assert!(
        file.contains("kind: EventPipeline") && file.contains("kind: KafkaConnection"),
        "{file}"
    );
    assert!(owned_by_pipeline(
        services
            .get("orders-worker-metrics")
            .await?
            .owner_references()
            .to_vec()
    ));
    assert!(owned_by_pipeline(
        accounts
            .get("orders-worker")
            .await?
            .owner_references()
            .to_vec()
    ));
    assert!(owned_by_pipeline(
        budgets
            .get("orders-worker")
            .await?
            .owner_references()
            .to_vec()
    ));
    let dead_letter = topics.get("orders-dead-letter").await?;
    assert!(owned_by_pipeline(dead_letter.owner_references().to_vec()));
    assert_eq!(dead_letter.spec.topic_name.as_deref(), Some("orders-dlq"));
    // Replicas come from scaling.minReplicas, through the scale subresource.
    let replicas = eventually("replicas set to minReplicas", || async {
        Ok(deployments
            .get("orders-worker")
            .await?
            .spec
            .and_then(|s| s.replicas)
            .filter(|r| *r == 2))
    })
    .await?;
    assert_eq!(replicas, 2);
    // No kubelet here: no worker is ever ready, and the status says so.
    let (status, reason, message) = eventually("the pipeline's Ready condition", || async {
        let status = serde_json::to_value(&pipelines.get("orders").await?.status)?;
        Ok(ready(Some(&status)))
    })
    .await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "WorkersNotReady"),
        "{message}"
    );

    // Steady state: several reconciles later, no object has changed.
    let versions = || async {
        anyhow::Ok(BTreeMap::from([
            (
                "deployment",
                version_of(&deployments, "orders-worker").await?,
            ),
            (
                "configmap",
                version_of(&config_maps, "orders-pipeline").await?,
            ),
            (
                "service",
                version_of(&services, "orders-worker-metrics").await?,
            ),
            (
                "serviceaccount",
                version_of(&accounts, "orders-worker").await?,
            ),
            ("pdb", version_of(&budgets, "orders-worker").await?),
            ("pipeline", version_of(&pipelines, "orders").await?),
        ]))
    };
    let before = versions().await?;
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
    let after = versions().await?;
    assert_eq!(
        before, after,
        "a reconcile with nothing to do wrote to the API server"
    );

    // A spec change rolls the Deployment: a new config hash in the pod template.
    let hash = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
    };
    let old = hash(&deployments.get("orders-worker").await?);
    cluster
        .apply_yaml(&ns, &pipeline_yaml(2000, "event.total > 0"))
        .await?;
    let new = eventually("a new config hash", || async {
        Ok(hash(&deployments.get("orders-worker").await?).filter(|h| Some(h) != old.as_ref()))
    })
    .await?;
    assert_ne!(Some(new), old);
    let file = config_maps
        .get("orders-pipeline")
        .await?
        .data
        .unwrap_or_default()
        .remove("pipeline.yaml")
        .unwrap_or_default();
    assert!(file.contains("maxRecords: 2000"), "{file}");

    // The dead-letter topic leaves the spec: its KafkaTopic, labelled as the pipeline's,
    // is deleted (the Kafka topic stays: Retain).
    assert_eq!(
        dead_letter
            .labels()
            .get("weir.dev/pipeline")
            .map(String::as_str),
        Some("orders")
    );
    cluster
        .apply_yaml(
            &ns,
            &pipeline_yaml(2000, "event.total > 0")
                .replace("  deadLetter: {topic: orders-dlq}\n", ""),
        )
        .await?;
    eventually("the dead-letter KafkaTopic deleted", || async {
        Ok(topics
            .get_opt("orders-dead-letter")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;

    // A filter that does not compile: the API server cannot know, the operator reports it.
    cluster
        .apply_yaml(&ns, &pipeline_yaml(2000, "event.total >"))
        .await?;
    let (_, reason, message) = eventually("InvalidSpec", || async {
        let status = serde_json::to_value(&pipelines.get("orders").await?.status)?;
        Ok(ready(Some(&status)).filter(|r| r.1 == "InvalidSpec"))
    })
    .await?;
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("spec.filter"), "{message}");
    operator.stop().await
}

/// "Accepted means runs": a pipeline on a TLS connection gets its Deployment, with the
/// connection's Secret key handed to the worker; the connection becoming plaintext is
/// noticed by the operator by itself (the variable goes); and a pipeline asking for a mode
/// not built yet is refused (`InvalidSpec` naming the field).
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_the_worker_cannot_run_gets_a_reason_and_no_deployment() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("refused").await?;
    cluster
        .apply_yaml(
            &ns,
            &format!(
                "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {{name: default}}\nspec:\n  bootstrapServers: [\"{}\"]\n  tls:\n    caCert: {{name: kafka-ca, key: ca.crt}}\n",
                kafka.bootstrap()
            ),
        )
        .await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-refused"),
    );
    cluster
        .apply_yaml(&ns, &pipeline_yaml(500, "event.total > 0"))
        .await?;
    let client = cluster.admin.clone();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let pipelines: Api<EventPipeline> = Api::namespaced(client.clone(), &ns);
    let reason_of = |wanted: &'static str| {
        let pipelines = pipelines.clone();
        move || {
            let pipelines = pipelines.clone();
            async move {
                let status = serde_json::to_value(&pipelines.get("orders").await?.status)?;
                Ok(ready(Some(&status)).filter(|r| r.1 == wanted))
            }
        }
    };
    let ca_variable = |deployment: &Deployment| {
        deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .map(|p| {
                p.containers
                    .iter()
                    .flat_map(|c| c.env.iter().flatten())
                    .any(|e| {
                        e.name == "WEIR_SECRET_KAFKA_CA_CA_CRT"
                            && e.value_from
                                .as_ref()
                                .and_then(|v| v.secret_key_ref.as_ref())
                                .is_some_and(|r| r.name == "kafka-ca" && r.key == "ca.crt")
                    })
            })
            .unwrap_or(false)
    };
    eventually(
        "the worker Deployment with the CA from its Secret",
        || async {
            Ok(deployments
                .get_opt("orders-worker")
                .await?
                .filter(|d| ca_variable(d)))
        },
    )
    .await?;

    // The connection becomes plaintext: the pipeline is reconsidered without a change of
    // its own.
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    eventually("the worker Deployment without the CA", || async {
        Ok(deployments
            .get_opt("orders-worker")
            .await?
            .filter(|d| !ca_variable(d)))
    })
    .await?;

    // What the worker cannot do is refused by validate(), with its path: a kafka sink
    // cannot be truncated.
    cluster
        .apply_yaml(
            &ns,
            &pipeline_yaml(500, "event.total > 0").replace(
                "  batch: {maxRecords: 500}\n",
                "    - kafka: {topic: orders-copy}\n  batch: {maxRecords: 500}\n  replay: {token: t1, to: Earliest, truncateSinks: true}\n",
            ),
        )
        .await?;
    let (_, _, message) = eventually("InvalidSpec", reason_of("InvalidSpec")).await?;
    assert!(
        message.contains("spec.replay.truncateSinks")
            && message.contains("the kafka sink spec.sinks[1] cannot be truncated"),
        "{message}"
    );
    operator.stop().await
}

/// A kafka sink producing to another cluster: the pipeline waits (`ConnectionNotFound`
/// naming the sink's connection) until that KafkaConnection exists, which alone brings the
/// Deployment, with the connection in the worker's file and its CA's Secret key in the
/// worker's environment.
#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_sinks_own_connection_is_waited_for_then_handed_to_the_worker() -> anyhow::Result<()>
{
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("sink-connection").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-sink-connection"),
    );
    cluster
        .apply_yaml(
            &ns,
            "apiVersion: weir.dev/v1alpha1\nkind: EventPipeline\nmetadata: {name: copy}\nspec:\n  source: {topics: [orders]}\n  sinks:\n    - kafka: {topic: orders-copy, connectionRef: {name: analytics}}\n",
        )
        .await?;
    let client = cluster.admin.clone();
    let pipelines: Api<EventPipeline> = Api::namespaced(client.clone(), &ns);
    let (_, _, message) = eventually("ConnectionNotFound", || async {
        let status = serde_json::to_value(&pipelines.get("copy").await?.status)?;
        Ok(ready(Some(&status)).filter(|r| r.1 == "ConnectionNotFound"))
    })
    .await?;
    assert!(message.contains("analytics"), "{message}");

    cluster
        .apply_yaml(
            &ns,
            &format!(
                "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {{name: analytics}}\nspec:\n  bootstrapServers: [\"{}\"]\n  tls:\n    caCert: {{name: analytics-ca, key: ca.crt}}\n",
                kafka.bootstrap()
            ),
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    eventually("the Deployment with the sink connection's CA", || async {
        Ok(deployments.get_opt("copy-worker").await?.filter(|d| {
            d.spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .is_some_and(|p| {
                    p.containers
                        .iter()
                        .flat_map(|c| c.env.iter().flatten())
                        .any(|e| e.name == "WEIR_SECRET_ANALYTICS_CA_CA_CRT")
                })
        }))
    })
    .await?;
    let maps: Api<ConfigMap> = Api::namespaced(client, &ns);
    let file = maps
        .get("copy-pipeline")
        .await?
        .data
        .and_then(|d| d.into_values().next())
        .unwrap_or_default();
    assert!(
        file.contains("name: analytics") && file.contains("name: default"),
        "{file}"
    );
    operator.stop().await
}
