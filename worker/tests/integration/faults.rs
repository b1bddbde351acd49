//! Faults a worker must survive without losing or doubling anything: a database outage,
//! SIGKILL at random moments, workers joining and leaving (cooperative rebalance). The
//! real binary, the real broker and real PostgreSQL and MariaDB servers.

use crate::common;

use std::time::Duration;

use anyhow::Context;
use common::{
    DEADLINE, committed_total, events, kafka, pipeline, produce, start_documents, start_with_args,
    wait_committed_async, wait_until,
};
use serde_json::{Value, json};
use weir_testkit::{PostgresServer, TestDatabase, TestKafka, TestMySqlDatabase};

/// Inserts into a table whose primary key refuses a second copy of any event; without a
/// dead-letter topic a refused record stops the worker, so a doubled event fails the test.
fn insert_pipeline(name: &str, topic: &str, extra: Value) -> Value {
    let mut spec = json!({
        "source": {"topics": [topic]},
        "sinks": [{"postgres": {"urlFrom": {"env": "DB"}, "table": "events", "columns": [{"name": "id", "type": "bigint"}]}}],
        "batch": {"maxRecords": 200, "maxWait": "20ms"},
        "retry": {"initialBackoff": "100ms", "maxBackoff": "1s"},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    pipeline(name, spec)
}

/// The shared broker, a new topic and a new database with an `events` table.
async fn setup(prefix: &str, partitions: i32) -> anyhow::Result<(TestKafka, String, TestDatabase)> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic(prefix, partitions, &[]).await?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE events (id bigint PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    Ok((kafka, topic, db))
}

/// Produces `chunks` thousand events in the background, pausing `gap` between chunks so
/// they arrive while the test acts on the workers.
fn trickle(
    kafka: &TestKafka,
    topic: &str,
    chunks: i64,
    gap: Duration,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::spawn(async move {
        for chunk in 0..chunks {
            produce(&kafka, &topic, &events(chunk * 1000..(chunk + 1) * 1000)).await?;
            tokio::time::sleep(gap).await;
        }
        anyhow::Ok(())
    })
}

async fn count(db: &sqlx::PgPool) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(db)
        .await?;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_outage_mid_stream_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("outage", 2, &[]).await?;
    let mut server = tokio::task::spawn_blocking(PostgresServer::start).await??;
    let db = server.create_database().await?;
    sqlx::query("CREATE TABLE events (id bigint PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    let dir = tempfile::tempdir()?;
    // The group gives up on a member that stops polling for max.poll.interval.ms: a short
    // one here, so the outage below outlasts it.
    let connection = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "KafkaConnection",
        "metadata": {"name": "default"},
        "spec": {"bootstrapServers": [kafka.bootstrap()], "properties": {"max.poll.interval.ms": "10000"}},
    });
    let mut worker = start_documents(
        dir.path(),
        &kafka,
        &[&insert_pipeline("outage", &topic, json!({})), &connection],
        &[("DB", &db.url)],
        &[],
    )?;

    produce(&kafka, &topic, &events(0..1000)).await?;
    wait_committed_async(&kafka, "test.outage", &topic, 1000)
        .await
        .with_context(|| worker.log_text())?;

    db.pool.close().await;
    server.stop();
    produce(&kafka, &topic, &events(1000..2000)).await?;
    // The outage lasts until the worker has noticed it, reported not-ready and retried.
    wait_until("the worker reports not ready and retries", DEADLINE, || {
        Ok(
            (worker.readyz() == Some(503) && worker.metric("weir_retries_total").unwrap_or(0) >= 3)
                .then_some(()),
        )
    })
    .with_context(|| worker.log_text())?;
    assert!(
        worker.is_running(),
        "an unreachable database must not crash the worker"
    );
    assert_eq!(
        committed_total(&kafka, "test.outage", &topic)?,
        1000,
        "nothing committed while the database is down"
    );
    // Keep the database down past max.poll.interval.ms (the fault's length, not a wait for
    // anything): the worker pauses its partitions and keeps polling, so the group does not
    // take it for dead. (Without the pause this test does not finish: the member is
    // dropped from the group and the records after the outage are not committed in time.)
    tokio::time::sleep(Duration::from_secs(13)).await;
    let log = worker.log_text();
    assert!(log.contains("partitions paused"), "{log}");
    assert!(!log.contains("revoked"), "{log}");

    let mut server =
        tokio::task::spawn_blocking(move || server.start_again().map(|()| server)).await??;
    produce(&kafka, &topic, &events(2000..3000)).await?;
    wait_committed_async(&kafka, "test.outage", &topic, 3000).await?;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    assert_eq!(count(&pool).await?, 3000);
    assert_eq!(worker.readyz(), Some(200));
    assert!(worker.is_running(), "{}", worker.log_text());
    worker.stop()?;
    pool.close().await;
    server.stop();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() -> anyhow::Result<()> {
    const TOTAL: i64 = 50_000;
    let (kafka, topic, db) = setup("kill", 4).await?;
    // Records applied but not yet committed when the worker dies are read again; the
    // idempotency keys, written in the same transaction as the rows, skip them.
    let doc = insert_pipeline(
        "kill",
        &topic,
        json!({"idempotency": {"key": "event.id", "window": "1h"}}),
    );
    let dir = tempfile::tempdir()?;

    // Events keep flowing while the worker is killed.
    let producer = trickle(&kafka, &topic, 50, Duration::from_millis(60));

    // The same identity each time, as a restarted pod has (static membership).
    let start = || {
        start_with_args(
            dir.path(),
            &kafka,
            &doc,
            &[("DB", &db.url)],
            &["--instance-id", "worker-0"],
        )
    };
    let mut rng = fastrand::Rng::with_seed(20);
    let mut last = 0;
    for kill in 0..20 {
        let mut worker = start()?;
        // Progress first, then a random moment: mid-batch, mid-commit, or idle.
        let (k, t) = (kafka.clone(), topic.clone());
        let progressed = tokio::task::spawn_blocking(move || {
            wait_until("progress since the last kill", DEADLINE, || {
                let committed = committed_total(&k, "test.kill", &t).unwrap_or(last);
                Ok((committed > last || committed >= TOTAL).then_some(committed))
            })
        })
        .await?
        .with_context(|| format!("kill {kill}: {}", worker.log_text()))?;
        last = progressed;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..150))).await;
        worker.signal("KILL")?;
        worker.wait(DEADLINE)?;
    }
    producer.await??;

    let mut worker = start()?;
    wait_committed_async(&kafka, "test.kill", &topic, TOTAL)
        .await
        .with_context(|| worker.log_text())?;
    assert_eq!(count(&db.pool).await?, TOTAL, "every event exactly once");
    let end: i64 = kafka.committed_offsets("test.kill", &topic)?.values().sum();
    assert_eq!(
        end, TOTAL,
        "the group's committed offsets equal the topic's end"
    );
    worker.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_sink_survives_sigkill_at_random_moments_without_loss_or_doubles()
-> anyhow::Result<()> {
    const TOTAL: i64 = 30_000;
    let kafka = kafka().await?;
    let topic = kafka.create_topic("mysql-kill", 4, &[]).await?;
    let db = TestMySqlDatabase::create().await?;
    sqlx::query("CREATE TABLE events (id BIGINT PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    // A second copy of an event violates the primary key and, without a dead-letter topic,
    // stops the worker; the idempotency keys skip what was applied but not committed.
    let doc = pipeline(
        "mysql-kill",
        json!({
            "source": {"topics": [&topic]},
            "sinks": [{"mysql": {"urlFrom": {"env": "DB"}, "table": "events", "columns": [{"name": "id", "type": "bigint"}]}}],
            "batch": {"maxRecords": 200, "maxWait": "20ms"},
            "retry": {"initialBackoff": "100ms", "maxBackoff": "1s"},
            "idempotency": {"key": "event.id", "window": "1h"},
        }),
    );
    let dir = tempfile::tempdir()?;
    let producer = trickle(&kafka, &topic, 30, Duration::from_millis(60));
    let start = || {
        start_with_args(
            dir.path(),
            &kafka,
            &doc,
            &[("DB", &db.url)],
            &["--instance-id", "worker-0"],
        )
    };
    let mut rng = fastrand::Rng::with_seed(14);
    let mut last = 0;
    for kill in 0..10 {
        let mut worker = start()?;
        let (k, t) = (kafka.clone(), topic.clone());
        let progressed = tokio::task::spawn_blocking(move || {
            wait_until("progress since the last kill", DEADLINE, || {
                let committed = committed_total(&k, "test.mysql-kill", &t).unwrap_or(last);
                Ok((committed > last || committed >= TOTAL).then_some(committed))
            })
        })
        .await?
        .with_context(|| format!("kill {kill}: {}", worker.log_text()))?;
        last = progressed;
        // The fault's moment, at random: mid-batch, mid-commit, or idle.
        tokio::time::sleep(Duration::from_millis(rng.u64(0..150))).await;
        worker.signal("KILL")?;
        worker.wait(DEADLINE)?;
    }
    producer.await??;

    let mut worker = start()?;
    wait_committed_async(&kafka, "test.mysql-kill", &topic, TOTAL)
        .await
        .with_context(|| worker.log_text())?;
    let (rows,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, TOTAL, "every event exactly once");
    assert!(worker.is_running(), "{}", worker.log_text());
    worker.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_joining_and_leaving_mid_stream_lose_and_double_nothing() -> anyhow::Result<()> {
    const TOTAL: i64 = 20_000;
    let (kafka, topic, db) = setup("rebalance", 4).await?;
    let doc = insert_pipeline("rebalance", &topic, json!({}));
    let dir = tempfile::tempdir()?;

    let producer = trickle(&kafka, &topic, 20, Duration::from_millis(100));

    let mut first = start_with_args(
        dir.path(),
        &kafka,
        &doc,
        &[("DB", &db.url)],
        &["--instance-id", "a"],
    )?;
    wait_committed_async(&kafka, "test.rebalance", &topic, 3000).await?;

    let mut second = start_with_args(
        dir.path(),
        &kafka,
        &doc,
        &[("DB", &db.url)],
        &["--instance-id", "b"],
    )?;
    let second_ref = &second;
    wait_until(
        "the second worker takes partitions and consumes",
        DEADLINE,
        || {
            Ok((second_ref
                .metric("weir_records_consumed_total")
                .unwrap_or(0)
                > 0)
            .then_some(()))
        },
    )
    .with_context(|| second.log_text())?;

    first.stop()?;
    producer.await??;
    wait_committed_async(&kafka, "test.rebalance", &topic, TOTAL)
        .await
        .with_context(|| second.log_text())?;
    assert_eq!(count(&db.pool).await?, TOTAL);
    assert!(
        second.is_running(),
        "a doubled event would have stopped the worker:\n{}",
        second.log_text()
    );
    Ok(())
}
