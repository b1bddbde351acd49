//! The autoscaler with real workers: the operator (in this process, with the chart's
//! ClusterRole) reconciles an EventPipeline against the real API server and scales its
//! worker Deployment against the real broker's lag; a stand-in for the kubelet and the
//! Deployment controller (`common::kubelet`: there is no kubelet here, so no pod ever
//! starts) keeps as many local `weir-worker` processes running as the Deployment's
//! `spec.replicas` says, each started exactly as the pod template says (args, env from the
//! Secret, the ConfigMap's file where the volume mounts it), SIGTERMs them when the count
//! goes down, and writes the Deployment's status from their readiness probes.
//!
//! A backlog produced while one worker runs raises the count (up to maxReplicas, below
//! the partition count), the workers drain it into PostgreSQL (every event lands, once),
//! and after the cooldown the count comes back down to minReplicas, by at most half at a
//! time; the sequence of counts the operator wrote rises, then falls, once.
//!
//! On a topic written in transactions (one aborted), a `minReplicas: 0` pipeline starts
//! its workers for the backlog and goes back to none once they consumed it, though every
//! partition keeps offsets past the last commit (the markers): lag is what a
//! read_committed consumer still receives.

use crate::common;
use crate::kubelet::{Kubelet, worker_binary};

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use common::{Cluster, Operator, config, connection_yaml, eventually, eventually_within};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use rdkafka::producer::{
    BaseRecord, FutureProducer, FutureRecord, Producer as _, ThreadedProducer,
};
use weir_crds::EventPipeline;
use weir_testkit::{TestDatabase, TestKafka, unique_name};

const PARTITIONS: i32 = 4;
const MAX_REPLICAS: i32 = 3;
const COOLDOWN: Duration = Duration::from_secs(8);
const EVENTS: i64 = 60_000;

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    ids: std::ops::Range<i64>,
) -> anyhow::Result<()> {
    let sends: Vec<_> = ids
        .map(|id| {
            let producer = producer.clone();
            let topic = topic.to_owned();
            async move {
                let key = id.to_string();
                let value = format!("{{\"id\": {id}, \"n\": {}}}", id * 2);
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("{e}"))
            }
        })
        .collect();
    for result in futures::future::join_all(sends).await {
        result?;
    }
    Ok(())
}

/// What both tests run: a namespace with a PostgreSQL `events (id, n)` table behind a
/// Secret, the KafkaConnection, the operator (lag read every second) and the test kubelet.
struct Scaled {
    db: TestDatabase,
    operator: Operator,
    kubelet: Kubelet,
    pipelines: Api<EventPipeline>,
}

impl Scaled {
    /// Starts everything for the EventPipeline `events` reading `topic` as `group`, upserting
    /// `{id, n}` into the table, with `batch` and `scaling` as its spec's (YAML flow mappings).
    async fn start(
        cluster: &Cluster,
        ns: &str,
        kafka: &TestKafka,
        (topic, group): (&str, &str),
        (batch, scaling): (&str, &str),
    ) -> anyhow::Result<Self> {
        let db = TestDatabase::create().await?;
        sqlx::query("CREATE TABLE events (id bigint PRIMARY KEY, n bigint NOT NULL)")
            .execute(&db.pool)
            .await?;
        let secrets: Api<Secret> = Api::namespaced(cluster.admin.clone(), ns);
        let mut secret = Secret::default();
        secret.metadata.name = Some("events-db".into());
        secret.string_data = Some(BTreeMap::from([("url".to_owned(), db.url.clone())]));
        secrets.create(&PostParams::default(), &secret).await?;
        cluster.apply_yaml(ns, &connection_yaml(kafka)).await?;
        cluster
            .apply_yaml(
                ns,
                &format!(
                    r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: events}}
spec:
  source: {{topics: [{topic}], consumerGroup: {group}}}
  sinks:
    - postgres:
        urlFrom: {{secretKeyRef: {{name: events-db, key: url}}}}
        table: events
        mode: Upsert
        keyColumns: [id]
        columns: [{{name: id, type: bigint}}, {{name: n, type: bigint}}]
  batch: {batch}
  scaling: {scaling}
  worker: {{terminationGracePeriodSeconds: 20}}
"#
                ),
            )
            .await?;
        let mut settings = config(&unique_name("lease"), &format!("op-{ns}"));
        settings.lag_interval = Duration::from_secs(1);
        let operator = Operator::start(cluster.operator_client()?, settings);
        let kubelet = Kubelet::start(cluster.admin.clone(), ns, "events-worker", worker_binary()?)?;
        let pipelines = Api::namespaced(cluster.admin.clone(), ns);
        Ok(Self {
            db,
            operator,
            kubelet,
            pipelines,
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_processes_follow_the_replicas_the_autoscaler_writes_and_drain_the_backlog()
-> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("scaled").await?;
    let topic = kafka.create_topic("scaled", PARTITIONS, &[]).await?;
    let scaling = format!(
        "{{minReplicas: 1, maxReplicas: {MAX_REPLICAS}, targetLagPerReplica: 2000, targetCatchUpTime: 5s, cooldown: {}s}}",
        COOLDOWN.as_secs()
    );
    let Scaled {
        db,
        operator,
        kubelet,
        pipelines,
    } = Scaled::start(
        &cluster,
        &ns,
        &kafka,
        (&topic, &unique_name("scaled-group")),
        ("{maxRecords: 20, maxWait: 20ms}", &scaling),
    )
    .await?;

    // One worker, ready, and the operator sees it so.
    eventually("one ready worker, in the pipeline's status", || async {
        let status = pipelines.get("events").await?.status.unwrap_or_default();
        Ok((kubelet.observed().ready == 1 && status.ready_replicas == Some(1)).then_some(()))
    })
    .await
    .with_context(|| kubelet.logs())?;

    // The backlog, while that worker runs.
    let producer = kafka.producer()?;
    let started = std::time::Instant::now();
    produce(&producer, &topic, 0..EVENTS).await?;
    let produced = started.elapsed();
    eventually("more workers for the backlog", || async {
        Ok(kubelet
            .observed()
            .replicas
            .iter()
            .any(|(_, r)| *r > 1)
            .then_some(()))
    })
    .await
    .with_context(|| format!("{:?}\n{}", kubelet.observed(), kubelet.logs()))?;

    // Drained: every event in the table, no lag left.
    eventually_within(
        Duration::from_secs(120),
        "every event in the table and no lag",
        || async {
            let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
                .fetch_one(&db.pool)
                .await?;
            let status = pipelines.get("events").await?.status.unwrap_or_default();
            let lag = status.lag.map(|l| l.total);
            Ok((rows == EVENTS && lag == Some(0)).then_some(()))
        },
    )
    .await
    .with_context(|| format!("{:?}\n{}", kubelet.observed(), kubelet.logs()))?;
    let drained = started.elapsed();
    let (wrong,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE n <> id * 2")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(wrong, 0);

    // Back to minReplicas after the cooldown, by halves.
    eventually_within(
        COOLDOWN * 4 + Duration::from_secs(30),
        "back to one worker",
        || async {
            let observed = kubelet.observed();
            Ok((observed.replicas.last().map(|(_, r)| *r) == Some(1)
                && observed.replicas.len() > 1
                && observed.running == 1
                && observed.terminating == 0)
                .then_some(()))
        },
    )
    .await
    .with_context(|| format!("{:?}\n{}", kubelet.observed(), kubelet.logs()))?;

    let observed = kubelet.observed();
    let counts: Vec<i32> = observed.replicas.iter().map(|(_, r)| *r).collect();
    let ceiling = MAX_REPLICAS.min(PARTITIONS);
    assert!(
        counts.iter().all(|r| (1..=ceiling).contains(r)),
        "{counts:?}"
    );
    assert_eq!(counts.first(), Some(&1), "{counts:?}");
    // The processes the count asked for all ran and answered their readiness probe.
    let peak = counts.iter().copied().max().unwrap_or(0);
    assert_eq!(observed.peak_ready, usize::try_from(peak)?, "{observed:?}");
    // Up, then down, once: no flapping.
    let top = counts
        .iter()
        .enumerate()
        .max_by_key(|(i, r)| (**r, std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
        .unwrap_or(0);
    assert!(counts[..=top].windows(2).all(|w| w[0] < w[1]), "{counts:?}");
    assert!(counts[top..].windows(2).all(|w| w[0] > w[1]), "{counts:?}");
    for pair in observed.replicas.windows(2) {
        let ((t0, a), (t1, b)) = (pair[0], pair[1]);
        if b > a {
            // At most double (or 4 more) per decision.
            assert!(b <= (a * 2).max(a + 4), "{counts:?}");
        } else {
            // Down by at most half, after a cooldown of lower demand since the change before.
            assert!(b >= a / 2, "{counts:?}");
            assert!(
                t1 - t0 >= COOLDOWN - Duration::from_secs(1),
                "{a} → {b} only {:?} after the change before: {:?}",
                t1 - t0,
                observed.replicas
            );
        }
    }
    // Every worker asked to stop handed its partitions over and exited 0; none crashed.
    assert!(
        observed.crashes.is_empty(),
        "{:?}\n{}",
        observed.crashes,
        kubelet.logs()
    );
    assert!(!observed.stopped.is_empty(), "{observed:?}");
    for (pod, exit) in &observed.stopped {
        assert!(
            exit.is_some_and(|e| e.success()),
            "{pod} exited {exit:?} after SIGTERM\n{}",
            kubelet.logs()
        );
    }
    let status = pipelines.get("events").await?.status.unwrap_or_default();
    assert_eq!(status.lag.as_ref().map(|l| l.total), Some(0));
    assert!(
        status
            .last_scale_reason
            .as_deref()
            .is_some_and(|r| r.contains("→ 1")),
        "{status:?}"
    );
    // Measured, not asserted (speed belongs in benchmarks): from the first event sent to
    // the raised count read back from the API server.
    let raised = observed
        .replicas
        .iter()
        .find(|(_, r)| *r > 1)
        .map(|(t, _)| (kubelet.since + *t).saturating_duration_since(started));
    eprintln!(
        "{EVENTS} events produced in {produced:?}, the count raised {raised:?} and all in the table {drained:?} after the first was sent; replica counts written: {:?}",
        observed.replicas
    );
    let stopped = kubelet.stop().await;
    assert!(
        stopped
            .stopped
            .iter()
            .all(|(_, e)| e.is_some_and(|e| e.success())),
        "{stopped:?}"
    );
    operator.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumed_transactional_topic_scales_the_workers_to_zero() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("to-zero").await?;
    let topic = kafka.create_topic("to-zero", PARTITIONS, &[]).await?;
    let group = unique_name("to-zero-group");

    // 10 transactions of 400 records; the last is aborted, so each partition ends with its
    // records and an abort marker, none of which a read_committed consumer receives.
    let (transactions, per_transaction, aborted) = (10_i64, 400_i64, 9_i64);
    let producer_config = kafka.config();
    let producer_topic = topic.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let timeout = Duration::from_secs(30);
        let producer: ThreadedProducer<_> = producer_config
            .clone()
            .set("transactional.id", unique_name("to-zero-producer"))
            .create()?;
        producer.init_transactions(timeout)?;
        for t in 0..transactions {
            producer.begin_transaction()?;
            for i in 0..per_transaction {
                let id = t * per_transaction + i;
                let (key, value) = (
                    id.to_string(),
                    format!("{{\"id\": {id}, \"n\": {}}}", id * 2),
                );
                producer
                    .send(BaseRecord::to(&producer_topic).key(&key).payload(&value))
                    .map_err(|(e, _)| e)?;
            }
            producer.flush(timeout)?;
            if t == aborted {
                producer.abort_transaction(timeout)?;
            } else {
                producer.commit_transaction(timeout)?;
            }
        }
        Ok(())
    })
    .await??;
    let committed = (transactions - 1) * per_transaction;

    let cooldown = Duration::from_secs(5);
    let scaling = format!(
        "{{minReplicas: 0, maxReplicas: 2, targetLagPerReplica: 1000, cooldown: {}s}}",
        cooldown.as_secs()
    );
    let Scaled {
        db,
        operator,
        kubelet,
        pipelines,
    } = Scaled::start(
        &cluster,
        &ns,
        &kafka,
        (&topic, &group),
        ("{maxRecords: 100, maxWait: 20ms}", &scaling),
    )
    .await?;

    eventually_within(
        Duration::from_secs(90),
        "every committed event in the table",
        || async {
            let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
                .fetch_one(&db.pool)
                .await?;
            Ok((rows == committed).then_some(()))
        },
    )
    .await
    .with_context(|| format!("{:?}\n{}", kubelet.observed(), kubelet.logs()))?;
    let (from_the_aborted,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE id >= $1 AND id < $2")
            .bind(aborted * per_transaction)
            .bind((aborted + 1) * per_transaction)
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(
        from_the_aborted, 0,
        "records of the aborted transaction were written"
    );

    // No workers once the lag is gone, two cooldowns later (2 → 1 → 0).
    let to_zero = eventually_within(
        cooldown * 4 + Duration::from_secs(30),
        "no workers",
        || async {
            let observed = kubelet.observed();
            Ok((observed.replicas.last().map(|(_, r)| *r) == Some(0)
                && observed.running == 0
                && observed.terminating == 0)
                .then_some(()))
        },
    )
    .await;
    let status = pipelines.get("events").await?.status.unwrap_or_default();
    to_zero.with_context(|| format!("{status:?}\n{:?}\n{}", kubelet.observed(), kubelet.logs()))?;
    assert_eq!(status.lag.as_ref().map(|l| l.total), Some(0), "{status:?}");
    assert_eq!(status.desired_replicas, Some(0), "{status:?}");
    // The offsets still differ: the aborted records and the marker on every partition.
    let admin = weir_operator::kafka::Admin::new(&kafka.config(), Duration::from_secs(10))?;
    let high = admin.high_watermarks(std::slice::from_ref(&topic)).await?;
    let offsets = admin
        .committed_offsets(&group, std::slice::from_ref(&topic))
        .await?;
    let behind: i64 = high
        .iter()
        .map(|(p, h)| h - offsets.get(p).copied().unwrap_or(0))
        .sum();
    assert!(
        behind > per_transaction + i64::from(PARTITIONS),
        "offsets {offsets:?}, high watermarks {high:?}"
    );

    let observed = kubelet.stop().await;
    let counts: Vec<i32> = observed.replicas.iter().map(|(_, r)| *r).collect();
    assert_eq!(counts.iter().max(), Some(&2), "{counts:?}");
    assert!(counts.ends_with(&[2, 1, 0]), "{counts:?}");
    assert!(observed.crashes.is_empty(), "{:?}", observed.crashes);
    assert!(
        observed
            .stopped
            .iter()
            .all(|(_, e)| e.is_some_and(|e| e.success())),
        "{observed:?}"
    );
    eprintln!(
        "replica counts: {:?}, offsets past the last commit: {behind}",
        observed.replicas
    );
    operator.stop().await
}
