//! A 30 s broker outage costs a bounded number of log lines: the worker says once that it
//! cannot reach Kafka, then at most every 30 s with a count, and once that it is back.
//! The outage is librdkafka's mock cluster with its only broker down (a mock, used for the
//! fault alone: the harness's real broker cannot be stopped and started again with its
//! data); the worker is the real binary and the database is the harness's PostgreSQL.

use crate::common;

use std::time::Duration;

use common::{DEADLINE, Worker, pipeline, wait_until};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use weir_testkit::{TestDatabase, TestKafka};

async fn produce(bootstrap: &str, ids: std::ops::Range<i64>) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "60000")
        .create()?;
    for id in ids {
        producer
            .send(
                FutureRecord::to("events")
                    .key(&id.to_string())
                    .payload(&format!("{{\"id\": {id}}}")),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

async fn rows(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?)
}

/// Waits until the table holds `count` rows.
async fn wait_rows(pool: &sqlx::PgPool, count: i64, worker: &Worker) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    while rows(pool).await? < count {
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "{count} rows not written; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_30_s_broker_outage_is_a_few_log_lines_and_one_when_it_is_back() -> anyhow::Result<()> {
    let cluster = weir_testkit::kafka::mock_cluster(1)?;
    let bootstrap = cluster.bootstrap_servers();
    cluster.create_topic("events", 1, 1)?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE events (id bigint PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    let doc = pipeline(
        "outage",
        json!({
            "source": {"topics": ["events"]},
            "sinks": [{"postgres": {"urlFrom": {"env": "DB"}, "table": "events", "mode": "Upsert",
                "keyColumns": ["id"], "columns": [{"name": "id", "type": "bigint"}]}}],
            "batch": {"maxRecords": 100, "maxWait": "20ms"},
        }),
    );
    let dir = tempfile::tempdir()?;
    produce(&bootstrap, 0..10).await?;
    let worker = Worker::start(
        dir.path(),
        &TestKafka::at(&bootstrap),
        &doc,
        &[("DB", &db.url)],
    )?;
    wait_rows(&db.pool, 10, &worker).await?;
    let before = worker.log_text().lines().count();

    cluster.broker_down(1)?;
    // The outage itself: 30 s of a broker that refuses connections.
    tokio::time::sleep(Duration::from_secs(30)).await;
    cluster.broker_up(1)?;
    produce(&bootstrap, 10..20).await?;
    wait_rows(&db.pool, 20, &worker).await?;
    let worker = tokio::task::spawn_blocking(move || {
        wait_until("the line saying Kafka is back", DEADLINE, || {
            Ok(worker
                .log_text()
                .contains("connected to Kafka again")
                .then_some(()))
        })
        .map(|()| worker)
    })
    .await??;

    let log = worker.log_text();
    let during: Vec<&str> = log.lines().skip(before).collect();
    let warnings: Vec<&&str> = during
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    // The first failure, its cause changing once (refused, then all brokers down is only
    // counted), the repeat at 30 s: a handful, where librdkafka reports dozens a second.
    assert!(
        (1..=6).contains(&warnings.len()),
        "{} warnings during the outage:\n{}",
        warnings.len(),
        during.join("\n")
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("cannot work with Kafka") && l.contains("Unreachable")),
        "{}",
        during.join("\n")
    );
    let back: Vec<&&str> = during
        .iter()
        .filter(|l| l.contains("connected to Kafka again"))
        .collect();
    assert_eq!(back.len(), 1, "{}", during.join("\n"));
    eprintln!(
        "{} log lines during a 30 s outage, {} of them warnings",
        during.len(),
        warnings.len()
    );
    Ok(())
}
