//! Replay across the operator and the worker, in two halves joined by the rendered
//! Deployment (no kubelet here, so no pod starts: the test starts the pod template's
//! container as a local process, with its args, its environment resolved from the API
//! server's Secrets and the ConfigMap's file where the volume would mount it).
//!
//! The todo projection exactly as shipped (exactly-once, idempotency keys, Rules) is built
//! from the sample events; `spec.replay` to Earliest with `truncateSinks` is applied; the
//! operator resets the group and renders the token into the pod template; the worker
//! started from it empties the table, forgets the offsets kept with the rows and the
//! applied keys, and projects every event again: the table is identical to the first
//! build (a row written by hand in between is gone). The same token applied again does
//! nothing: the group is not reset, and a worker started with it truncates nothing.

use crate::common;
use crate::kubelet::{container_environment, worker_binary};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use common::{Cluster, Operator, config, connection_yaml, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use weir_crds::EventPipeline;
use weir_testkit::{TestDatabase, TestKafka, free_port, unique_name};

/// A worker process started from the rendered pod template; killed when dropped.
struct Pod {
    child: Child,
    log: PathBuf,
}

impl Pod {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as the kubelet sends it; the worker drains and exits 0.
    async fn stop(mut self) -> anyhow::Result<String> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill failed");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let exited = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the worker did not exit within 30 s\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        anyhow::ensure!(
            exited.success(),
            "worker exit {exited:?}\n{}",
            self.log_text()
        );
        Ok(self.log_text())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rendered environment, resolved as the kubelet resolves it.
async fn environment(
    deployment: &Deployment,
    client: &kube::Client,
) -> anyhow::Result<BTreeMap<String, String>> {
    let container = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .context("no container")?;
    let namespace = deployment
        .metadata
        .namespace
        .as_deref()
        .context("no namespace")?;
    let pod = format!("todo-projection-worker-{}", unique_name("pod"));
    Ok(container_environment(client, namespace, container, &pod)
        .await?
        .into_iter()
        .collect())
}

/// Starts the Deployment's container as a local process with `file` (the ConfigMap's
/// pipeline.yaml) where the volume would mount it.
async fn start_pod(
    deployment: &Deployment,
    file: &str,
    client: &kube::Client,
    dir: &Path,
) -> anyhow::Result<Pod> {
    let container = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .context("no container")?
        .clone();
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "pipeline")
        .context("no pipeline volume mount")?
        .mount_path
        .clone();
    let local_mount = dir.join(unique_name("etc-weir"));
    std::fs::create_dir_all(&local_mount)?;
    std::fs::write(local_mount.join("pipeline.yaml"), file)?;
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|a| a.replace(&mount, &local_mount.display().to_string()))
        .collect();
    let mut env = environment(deployment, client).await?;
    // Pods have their own network namespace; local processes share one.
    env.insert(
        "WEIR_METRICS_ADDR".into(),
        format!("127.0.0.1:{}", free_port("worker metrics")?),
    );
    let log = dir.join(format!("{}.log", unique_name("worker")));
    let child = Command::new(worker_binary()?)
        .args(&args)
        .env_clear()
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    Ok(Pod { child, log })
}

/// The todo-projection EventPipeline exactly as shipped in examples/, on `topic` with
/// `replay` (when given).
fn todo_projection(
    topic: &str,
    dead_letter: &str,
    replay: Option<Value>,
) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/todo-projection.yaml"
    ))?;
    let mut doc = serde_yaml_ng::Deserializer::from_str(&text)
        .map(<Value as serde::Deserialize>::deserialize)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|d| d["metadata"]["name"] == "todo-projection")
        .context("todo-projection missing from the example")?;
    doc["spec"]["source"]["topics"] = json!([topic]);
    doc["spec"]["deadLetter"]["topic"] = json!(dead_letter);
    doc["spec"]["batch"] = json!({"maxRecords": 5, "maxWait": "50ms"});
    if let Some(replay) = replay {
        doc["spec"]["replay"] = replay;
    }
    Ok(serde_yaml_ng::to_string(&doc)?)
}

/// A projected row: every column as text.
type TodoRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

/// The projected table, row by row, as text.
async fn table(db: &TestDatabase) -> anyhow::Result<Vec<Vec<Option<String>>>> {
    let rows: Vec<TodoRow> = sqlx::query_as(
        "SELECT todo_id::text, user_id, title, priority::text, assignee, completed_at::text,
                created_at::text, version::text FROM todos ORDER BY todo_id",
    )
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(a, b, c, d, e, f, g, h)| vec![Some(a), Some(b), Some(c), d, e, f, g, Some(h)])
        .collect())
}

/// The sum of the group's committed offsets on `topic` reaches `total`.
async fn committed(kafka: &TestKafka, group: &str, topic: &str, total: i64) -> anyhow::Result<()> {
    eventually(&format!("{total} committed on {topic}"), || async {
        Ok(kafka
            .committed_offsets(group, topic)
            .ok()
            .filter(|c| c.values().sum::<i64>() >= total))
    })
    .await
    .map(drop)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_todo_projection_replayed_to_earliest_with_truncate_is_rebuilt_identical_once_per_token()
-> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let db = TestDatabase::create().await?;
    sqlx::query(
        "CREATE TABLE todos (
            todo_id uuid PRIMARY KEY, user_id text NOT NULL, title text NOT NULL,
            priority integer, assignee text, completed_at timestamptz,
            created_at timestamptz, version bigint NOT NULL)",
    )
    .execute(&db.pool)
    .await?;
    let ns = cluster.namespace("replay-e2e").await?;
    let topic = kafka.create_topic("todo-events", 3, &[]).await?;
    let dead_letter = unique_name("todo-events-dlq");
    let group = format!("{ns}.todo-projection");

    let secrets: Api<Secret> = Api::namespaced(cluster.admin.clone(), &ns);
    let mut secret = Secret::default();
    secret.metadata.name = Some("todo-db".into());
    secret.string_data = Some(BTreeMap::from([("url".to_owned(), db.url.clone())]));
    secrets.create(&PostParams::default(), &secret).await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    cluster
        .apply_yaml(&ns, &todo_projection(&topic, &dead_letter, None)?)
        .await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-replay-e2e"),
    );

    // The sample events, keyed by user id as the example's producer keys them.
    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/data/todo-events.jsonl"
    ))?;
    let producer: FutureProducer = kafka.producer()?;
    let mut total = 0i64;
    for line in sample.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line)?;
        let key = event["payload"]["userId"]
            .as_str()
            .unwrap_or("none")
            .to_owned();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(line),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        total += 1;
    }

    let deployments: Api<Deployment> = Api::namespaced(cluster.admin.clone(), &ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.admin.clone(), &ns);
    let pipelines: Api<EventPipeline> = Api::namespaced(cluster.admin.clone(), &ns);
    let file = || async {
        config_maps
            .get("todo-projection-pipeline")
            .await?
            .data
            .unwrap_or_default()
            .remove("pipeline.yaml")
            .context("the ConfigMap has no pipeline.yaml")
    };
    let dir = tempfile::tempdir()?;

    // Built once.
    let deployment = eventually("the worker Deployment", || async {
        Ok(deployments.get_opt("todo-projection-worker").await?)
    })
    .await?;
    let pod = start_pod(&deployment, &file().await?, &cluster.admin, dir.path()).await?;
    committed(&kafka, &group, &topic, total)
        .await
        .with_context(|| pod.log_text())?;
    pod.stop().await?;
    let built = table(&db).await?;
    assert!(built.len() >= 3, "{built:?}");
    let marker = "SELECT count(*) FROM todos WHERE user_id = 'by-hand'";
    let hand = "INSERT INTO todos (todo_id, user_id, title, version) VALUES (gen_random_uuid(), 'by-hand', 'not from an event', 1)";
    sqlx::query(hand).execute(&db.pool).await?;

    // The replay: the operator resets the group (no worker runs, so it has no members) and
    // renders the token into the pod template.
    let replay = json!({"token": "rebuild-1", "to": "Earliest", "truncateSinks": true});
    cluster
        .apply_yaml(
            &ns,
            &todo_projection(&topic, &dead_letter, Some(replay.clone()))?,
        )
        .await?;
    let done = eventually("the replay recorded", || async {
        Ok(pipelines
            .get("todo-projection")
            .await?
            .status
            .and_then(|s| s.last_replay)
            .filter(|r| r.token == "rebuild-1"))
    })
    .await?;
    assert_eq!(done.error, None, "{done:?}");
    assert!(done.truncated, "{done:?}");
    let committed_now = kafka.committed_offsets(&group, &topic)?;
    assert!(committed_now.values().all(|o| *o == 0), "{committed_now:?}");
    let deployment = eventually("the pod template with the replay token", || async {
        let Some(d) = deployments.get_opt("todo-projection-worker").await? else {
            return Ok(None);
        };
        let env = environment(&d, &cluster.admin).await?;
        Ok(
            (env.get("WEIR_REPLAY_TOKEN").map(String::as_str) == Some("rebuild-1")
                && env.get("WEIR_REPLAY_TRUNCATE").map(String::as_str) == Some("true"))
            .then_some(d),
        )
    })
    .await?;
    let pod = start_pod(&deployment, &file().await?, &cluster.admin, dir.path()).await?;
    committed(&kafka, &group, &topic, total)
        .await
        .with_context(|| pod.log_text())?;
    let log = pod.stop().await?;
    assert!(log.contains("replay carried out"), "{log}");
    let rebuilt = table(&db).await?;
    assert_eq!(rebuilt, built, "the rebuilt projection differs");

    // The same token again (re-applied from Git, a restarted pod): nothing happens.
    sqlx::query(hand).execute(&db.pool).await?;
    cluster
        .apply_yaml(&ns, &todo_projection(&topic, &dead_letter, Some(replay))?)
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
    let offsets = kafka.committed_offsets(&group, &topic)?;
    assert_eq!(
        offsets.values().sum::<i64>(),
        total,
        "the group was reset again: {offsets:?}"
    );
    let deployment = deployments.get("todo-projection-worker").await?;
    let pod = start_pod(&deployment, &file().await?, &cluster.admin, dir.path()).await?;
    eventually("the worker past the replay", || async {
        Ok(pod
            .log_text()
            .contains("replay already carried out")
            .then_some(()))
    })
    .await
    .with_context(|| pod.log_text())?;
    pod.stop().await?;
    let (n,): (i64,) = sqlx::query_as(marker).fetch_one(&db.pool).await?;
    assert_eq!(n, 1, "the same token truncated the table again");
    operator.stop().await
}
