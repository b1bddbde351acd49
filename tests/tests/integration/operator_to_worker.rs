//! The strongest end-to-end test this machine allows, in two halves joined by the rendered
//! Deployment (there is no kubelet, so no pod ever starts):
//!
//! 1. the operator, running with the chart's ClusterRole against the real API server,
//!    reconciles a KafkaConnection and an EventPipeline and writes the worker Deployment,
//!    its ConfigMap and the dead-letter KafkaTopic (created on the real broker);
//! 2. the test reads that Deployment back and starts its container as a local process —
//!    the same args, the same environment (Secret references resolved from the API server,
//!    the pod name for the fieldRef), the ConfigMap's file where the volume would mount it —
//!    against the real Kafka broker and the real PostgreSQL.
//!
//! Events then land in the table, a poison event lands on the dead-letter topic, and
//! SIGTERM stops the worker cleanly: what the operator renders is what the worker runs.
//! Once over the broker's PLAINTEXT listener, once over its SASL_SSL one (SCRAM-SHA-512,
//! the CA and the password from Secrets), where the password must appear in no log.

use crate::common;
use crate::kubelet::worker_binary;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use common::{Cluster, Operator, config, connection_yaml, eventually, ready};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use rdkafka::producer::{FutureProducer, FutureRecord};
use weir_crds::KafkaTopic;
use weir_testkit::{TestDatabase, TestKafka, free_port, unique_name};

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rendered_deployment_runs_the_pipeline() -> anyhow::Result<()> {
    rendered_deployment_runs(false).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rendered_deployment_runs_the_pipeline_over_sasl_ssl_with_secrets() -> anyhow::Result<()>
{
    rendered_deployment_runs(true).await
}

async fn rendered_deployment_runs(sasl_ssl: bool) -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, total numeric NOT NULL)")
        .execute(&db.pool)
        .await?;
    let ns = cluster.namespace("e2e").await?;
    let source = kafka.create_topic("orders", 3, &[]).await?;
    let dead_letter = unique_name("orders-dlq");

    let secrets: Api<Secret> = Api::namespaced(cluster.admin.clone(), &ns);
    let mut secret = Secret::default();
    secret.metadata.name = Some("orders-db".into());
    secret.string_data = Some(BTreeMap::from([("url".to_owned(), db.url.clone())]));
    secrets.create(&PostParams::default(), &secret).await?;
    let password = if sasl_ssl {
        let security = kafka.security()?.clone();
        let mut secret = Secret::default();
        secret.metadata.name = Some("kafka-credentials".into());
        secret.string_data = Some(BTreeMap::from([
            ("password".to_owned(), security.scram_password.clone()),
            ("ca.crt".to_owned(), security.ca_pem.clone()),
        ]));
        secrets.create(&PostParams::default(), &secret).await?;
        cluster
            .apply_yaml(
                &ns,
                &format!(
                    "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {{name: default}}\nspec:\n  bootstrapServers: [\"{}\"]\n  tls:\n    caCert: {{name: kafka-credentials, key: ca.crt}}\n  sasl:\n    mechanism: SCRAM-SHA-512\n    username: {}\n    passwordSecretRef: {{name: kafka-credentials, key: password}}\n",
                    security.sasl_ssl, security.scram_user
                ),
            )
            .await?;
        Some(security.scram_password)
    } else {
        cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
        None
    };
    cluster
        .apply_yaml(
            &ns,
            &format!(
                r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: orders}}
spec:
  source: {{topics: [{source}]}}
  sinks:
    - postgres:
        urlFrom: {{secretKeyRef: {{name: orders-db, key: url}}}}
        table: orders
        mode: Upsert
        keyColumns: [id]
        columns: [{{name: id, type: bigint}}, {{name: total, type: numeric}}]
  batch: {{maxRecords: 50, maxWait: 50ms}}
  deadLetter: {{topic: {dead_letter}}}
  worker: {{terminationGracePeriodSeconds: 20}}
"#
            ),
        )
        .await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-e2e"),
    );

    // Half 1: what the operator wrote.
    let deployments: Api<Deployment> = Api::namespaced(cluster.admin.clone(), &ns);
    let deployment = eventually("the worker Deployment", || async {
        Ok(deployments.get_opt("orders-worker").await?)
    })
    .await?;
    let topics: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &ns);
    eventually("the dead-letter topic to be Ready", || async {
        let Some(topic) = topics.get_opt("orders-dead-letter").await? else {
            return Ok(None);
        };
        let status = serde_json::to_value(&topic.status)?;
        Ok(ready(Some(&status)).filter(|r| r.0 == "True"))
    })
    .await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.admin.clone(), &ns);
    let file = config_maps
        .get("orders-pipeline")
        .await?
        .data
        .unwrap_or_default()
        .remove("pipeline.yaml")
        .context("the ConfigMap has no pipeline.yaml")?;

    // Half 2: the pod, as a process.
    let pod = deployment
        .spec
        .and_then(|s| s.template.spec)
        .context("no pod template")?;
    let container = pod.containers.first().context("no container")?.clone();
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "pipeline")
        .context("no pipeline volume mount")?
        .mount_path
        .clone();
    let dir = tempfile::tempdir()?;
    let local_mount = dir.path().join("etc-weir");
    std::fs::create_dir_all(&local_mount)?;
    std::fs::write(local_mount.join("pipeline.yaml"), file)?;
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.replace(&mount, &local_mount.display().to_string()))
        .collect();
    let metrics_port = free_port("worker metrics")?;
    let mut env = BTreeMap::new();
    for var in container.env.clone().unwrap_or_default() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => match (&from.secret_key_ref, &from.field_ref) {
                (Some(key), _) => {
                    let secret = secrets.get(&key.name).await?;
                    let bytes = secret
                        .data
                        .unwrap_or_default()
                        .remove(&key.key)
                        .context("no such key")?;
                    String::from_utf8(bytes.0)?
                }
                (None, Some(field)) if field.field_path == "metadata.name" => {
                    "orders-worker-7d9f-abcde".to_owned()
                }
                _ => anyhow::bail!("unsupported env source for {}", var.name),
            },
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    // Pods have their own network namespace; local processes share one.
    env.insert(
        "WEIR_METRICS_ADDR".into(),
        format!("127.0.0.1:{metrics_port}"),
    );
    let log = dir.path().join("worker.log");
    let mut worker = Process(
        Command::new(worker_binary()?)
            .args(&args)
            .env_clear()
            .envs(&env)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );

    let producer: FutureProducer = kafka.producer()?;
    for id in 0..100i64 {
        let value = if id == 42 {
            "{\"id\": 42, \"total\": \"lots\"}".to_owned()
        } else {
            format!("{{\"id\": {id}, \"total\": {}.5}}", id * 2)
        };
        producer
            .send(
                FutureRecord::to(&source)
                    .key(&id.to_string())
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("99 rows in the table", || async {
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM orders")
            .fetch_one(&db.pool)
            .await?;
        Ok((rows == 99).then_some(()))
    })
    .await
    .with_context(log_text)?;
    let (total,): (String,) = sqlx::query_as("SELECT total::text FROM orders WHERE id = 7")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(total, "14.5");
    let reader: rdkafka::consumer::BaseConsumer = kafka
        .config()
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut partition = rdkafka::TopicPartitionList::new();
    partition.add_partition_offset(&dead_letter, 0, rdkafka::Offset::Beginning)?;
    rdkafka::consumer::Consumer::assign(&reader, &partition)?;
    let dead = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no record on the dead-letter topic within 60 s"
            );
            if let Some(message) = reader.poll(Duration::from_millis(500)) {
                let message = message?;
                return Ok(rdkafka::Message::payload(&message)
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_default());
            }
        }
    })
    .await?
    .with_context(log_text)?;
    assert!(dead.contains("\"lots\""), "{dead}");

    // SIGTERM, as the kubelet sends it: the worker drains and exits 0.
    let status = Command::new("kill")
        .args(["-TERM", &worker.0.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill failed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = worker.0.try_wait()? {
            break status;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the worker did not exit within 30 s\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exited.success(), "worker exit {exited:?}\n{}", log_text());
    if let Some(password) = password {
        let log = log_text();
        assert!(log.contains("consuming"), "{log}");
        assert!(
            !log.contains(&password),
            "the password is in the worker's log"
        );
    }
    operator.stop().await
}
