//! Broker faults a real broker cannot be made to produce on demand, injected with
//! librdkafka's mock cluster (a mock, used only for these faults): a broker down for 10 s,
//! request errors on the produce to the dead-letter topic, added latency. The worker is the
//! real binary and the database is the harness's real PostgreSQL.

use crate::common;

use std::time::Duration;

use anyhow::Context;
use common::{DEADLINE, Worker, pipeline, wait_until};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;
use weir_testkit::{TestDatabase, TestKafka};

async fn produce(
    bootstrap: &str,
    topic: &str,
    ids: std::ops::Range<i64>,
    poison_every: i64,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "60000")
        .create()?;
    let mut pending = Vec::new();
    for id in ids {
        let value = if poison_every > 0 && id % poison_every == 0 {
            b"not json".to_vec()
        } else {
            format!("{{\"id\": {id}}}").into_bytes()
        };
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(&id.to_string()).payload(&value))
                .map_err(|(e, _)| e)?,
        );
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_down_produce_errors_and_latency_lose_nothing_and_stall_nothing()
-> anyhow::Result<()> {
    let cluster = weir_testkit::kafka::mock_cluster(3)?;
    let bootstrap = cluster.bootstrap_servers();
    cluster.create_topic("events", 6, 1)?;
    cluster.create_topic("events-dlq", 1, 1)?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE events (id bigint PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    let doc = pipeline(
        "mocked",
        json!({
            "source": {"topics": ["events"]},
            "sinks": [{"postgres": {"urlFrom": {"env": "DB"}, "table": "events", "mode": "Upsert",
                "keyColumns": ["id"], "columns": [{"name": "id", "type": "bigint"}]}}],
            "batch": {"maxRecords": 100, "maxWait": "20ms"},
            "deadLetter": {"topic": "events-dlq"},
        }),
    );
    let dir = tempfile::tempdir()?;
    let kafka = TestKafka::at(&bootstrap);

    // Phase 1: the next produce requests to the cluster fail with a retriable error; the
    // worker starts after the events are in, so those requests are its dead-letter sends
    // for the poison records. Every request also takes 200 ms longer.
    produce(&bootstrap, "events", 0..1000, 100).await?;
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 5],
    );
    for broker in 1..=3 {
        cluster.broker_round_trip_time(broker, Duration::from_millis(200))?;
    }
    let mut worker = Worker::start(dir.path(), &kafka, &doc, &[("DB", &db.url)])?;
    let db_pool = db.pool.clone();
    wait_until_rows(&db_pool, 990)
        .await
        .with_context(|| worker.log_text())?;
    for broker in 1..=3 {
        cluster.broker_round_trip_time(broker, Duration::ZERO)?;
    }

    // Phase 2: a broker is down for 10 s (the fault's length, not a wait for anything)
    // while events keep coming; then it is back.
    cluster.broker_down(2)?;
    let more = tokio::spawn({
        let bootstrap = bootstrap.clone();
        async move { produce(&bootstrap, "events", 1000..2000, 0).await }
    });
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.broker_up(2)?;
    more.await??;

    // Phase 3: every broker down: the worker reports not ready, then recovers.
    for broker in 1..=3 {
        cluster.broker_down(broker)?;
    }
    wait_until("not ready while no broker answers", DEADLINE, || {
        Ok((worker.readyz() == Some(503)).then_some(()))
    })
    .with_context(|| worker.log_text())?;
    for broker in 1..=3 {
        cluster.broker_up(broker)?;
    }
    produce(&bootstrap, "events", 2000..2010, 0).await?;

    // No stall after recovery: everything lands and the group commits the end.
    wait_until_rows(&db_pool, 2000)
        .await
        .with_context(|| worker.log_text())?;
    common::wait_committed_async(&kafka, "test.mocked", "events", 2010)
        .await
        .with_context(|| worker.log_text())?;
    assert_eq!(
        worker.metric("weir_records_dead_lettered_total"),
        Some(10),
        "{}",
        worker.log_text()
    );
    assert!(worker.is_running());
    assert_eq!(worker.readyz(), Some(200), "ready again after recovery");
    worker.stop()?;
    drop(cluster);
    Ok(())
}

async fn wait_until_rows(pool: &sqlx::PgPool, rows: i64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
            .fetch_one(pool)
            .await?;
        if n >= rows {
            anyhow::ensure!(n == rows, "{n} rows, expected {rows}");
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{n} of {rows} rows within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
