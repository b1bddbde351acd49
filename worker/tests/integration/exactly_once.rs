//! Exactly-once into PostgreSQL: the consumed offsets are written in the same transaction as
//! the rows, compare-and-set under a fencing generation raised on every assignment. The
//! real binary, the real broker and a real PostgreSQL server; faults by SIGKILL and SIGSTOP.

use crate::common;

use std::time::Duration;

use anyhow::Context;
use common::{
    DEADLINE, committed_total, events, kafka, pipeline, produce, read_topic, start_with_args,
    wait_until, wake_zombie,
};
use serde_json::{Value, json};
use weir_testkit::{TestDatabase, TestMySqlDatabase};

/// Inserts every event with its source position; no idempotency key. `extra` is merged
/// into the spec.
fn insert_pipeline(name: &str, topic: &str, extra: Value) -> Value {
    let mut spec = json!({
        "source": {"topics": [topic]},
        "transform": {"set": {"srcPartition": "partition", "srcOffset": "offset"}},
        "sinks": [{"postgres": {"urlFrom": {"env": "DB"}, "table": "events", "columns": [
            {"name": "id", "type": "bigint"},
            {"name": "src_partition", "from": "event.srcPartition", "type": "integer"},
            {"name": "src_offset", "from": "event.srcOffset", "type": "bigint"},
        ]}}],
        "delivery": "ExactlyOnce",
        "batch": {"maxRecords": 200, "maxWait": "20ms"},
        "retry": {"initialBackoff": "100ms", "maxBackoff": "1s"},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    pipeline(name, spec)
}

async fn rows(db: &sqlx::PgPool) -> anyhow::Result<i64> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(db)
        .await?;
    Ok(n)
}

/// Waits until the table holds `total` rows.
async fn wait_rows(db: &sqlx::PgPool, total: i64, log: impl Fn() -> String) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    loop {
        let n = rows(db).await?;
        if n >= total {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "{n} of {total} rows within {DEADLINE:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_exactly_once_sigkill_at_20_random_moments_applies_every_event_once()
-> anyhow::Result<()> {
    const TOTAL: i64 = 50_000;
    let kafka = kafka().await?;
    let topic = kafka.create_topic("eo-kill", 4, &[]).await?;
    let db = TestDatabase::create().await?;
    // Insert-only, no idempotency key: a second copy of any event violates the unique
    // constraint on its source position, which (without a dead-letter topic) stops the
    // worker and fails the test.
    sqlx::query(
        "CREATE TABLE events (id bigint NOT NULL, src_partition integer NOT NULL, src_offset bigint NOT NULL,
         UNIQUE (src_partition, src_offset))",
    )
    .execute(&db.pool)
    .await?;
    let doc = insert_pipeline("eo-kill", &topic, json!({}));
    let dir = tempfile::tempdir()?;

    // Events keep flowing while the worker is killed.
    let producer = {
        let (kafka, topic) = (kafka.clone(), topic.clone());
        tokio::spawn(async move {
            for chunk in 0..50 {
                produce(&kafka, &topic, &events(chunk * 1000..(chunk + 1) * 1000)).await?;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            anyhow::Ok(())
        })
    };
    let start = || {
        start_with_args(
            dir.path(),
            &kafka,
            &doc,
            &[("DB", &db.url)],
            &["--instance-id", "worker-0"],
        )
    };
    let mut rng = fastrand::Rng::with_seed(11);
    let mut last = 0;
    for kill in 0..20 {
        let mut worker = start()?;
        // Progress first (rows committed since the last kill), then a random moment:
        // mid-transaction, between the database commit and the group's, or idle.
        let progressed = {
            let start = std::time::Instant::now();
            loop {
                let n = rows(&db.pool).await?;
                if n > last || n >= TOTAL {
                    break n;
                }
                anyhow::ensure!(
                    start.elapsed() < DEADLINE,
                    "kill {kill}: no progress past {last} rows\n{}",
                    worker.log_text()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        last = progressed;
        tokio::time::sleep(Duration::from_millis(rng.u64(0..150))).await;
        worker.signal("KILL")?;
        worker.wait(DEADLINE)?;
    }
    producer.await??;

    let mut worker = start()?;
    wait_rows(&db.pool, TOTAL, || worker.log_text()).await?;
    assert_eq!(rows(&db.pool).await?, TOTAL, "every event exactly once");
    let (offsets,): (i64,) = sqlx::query_as(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM weir_offsets WHERE consumer_group = 'test.eo-kill'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        offsets, TOTAL,
        "the offsets kept with the rows are the topic's end"
    );
    // The group's own offsets follow, so lag stays visible to Kafka's tools.
    let (k, t) = (kafka.clone(), topic.clone());
    tokio::task::spawn_blocking(move || {
        wait_until(
            "the group's committed offsets reach the end",
            DEADLINE,
            || Ok((committed_total(&k, "test.eo-kill", &t).unwrap_or(0) >= TOTAL).then_some(())),
        )
    })
    .await??;
    assert!(worker.is_running(), "{}", worker.log_text());
    worker.stop()?;
    Ok(())
}

/// A worker restarted where its predecessor stopped: the first record it receives triggers
/// the claim and the seek to the offset stored with the data, which rewinds the fetch past
/// that record; in batches of one record, the copy read again is a batch of its own.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_exactly_once_restart_writes_the_record_that_triggered_the_claim_once()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("eo-restart", 1, &[]).await?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE events (id bigint, src_partition integer, src_offset bigint)")
        .execute(&db.pool)
        .await?;
    let doc = insert_pipeline(
        "eo-restart",
        &topic,
        json!({"batch": {"maxRecords": 1, "maxWait": "20ms"}}),
    );
    let dir = tempfile::tempdir()?;
    for (run, range) in [(0, 0..20), (1, 20..40)] {
        produce(&kafka, &topic, &events(range.clone())).await?;
        let mut worker = start_with_args(dir.path(), &kafka, &doc, &[("DB", &db.url)], &[])?;
        let (k, t) = (kafka.clone(), topic.clone());
        tokio::task::spawn_blocking(move || {
            wait_until("the group's offsets to follow the data", DEADLINE, || {
                Ok(
                    (committed_total(&k, "test.eo-restart", &t).unwrap_or(0) >= range.end)
                        .then_some(()),
                )
            })
        })
        .await?
        .with_context(|| format!("run {run}: {}", worker.log_text()))?;
        worker.stop()?;
    }
    let (total, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT (src_partition, src_offset)) FROM events")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!((total, distinct), (40, 40), "every record written once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_exactly_once_zombie_that_lost_its_partitions_commits_nothing()
-> anyhow::Result<()> {
    const TOTAL: i64 = 500;
    let kafka = kafka().await?;
    let topic = kafka.create_topic("eo-zombie", 2, &[]).await?;
    let db = TestDatabase::create().await?;
    // No constraint: a zombie's commit would show as extra rows.
    sqlx::query("CREATE TABLE events (id bigint, src_partition integer, src_offset bigint)")
        .execute(&db.pool)
        .await?;
    // A long linger keeps the records in the zombie's batch, read but not written, while
    // it is stopped.
    let doc = insert_pipeline(
        "eo-zombie",
        &topic,
        json!({"batch": {"maxRecords": 100000, "maxWait": "6s"}}),
    );
    let dir = tempfile::tempdir()?;
    let mut zombie = start_with_args(
        dir.path(),
        &kafka,
        &doc,
        &[("DB", &db.url)],
        &["--instance-id", "zombie"],
    )?;
    let zombie_ref = &zombie;
    produce(&kafka, &topic, &events(0..TOTAL)).await?;
    wait_until("the first worker reads every event", DEADLINE, || {
        Ok((zombie_ref
            .metric("weir_records_consumed_total")
            .unwrap_or(0)
            >= TOTAL as u64)
            .then_some(()))
    })
    .with_context(|| zombie.log_text())?;
    zombie.signal("STOP")?;

    // The group drops the stopped member after its session timeout; the second worker
    // claims every partition (raising their generations) and writes the events.
    let mut second = start_with_args(
        dir.path(),
        &kafka,
        &doc,
        &[("DB", &db.url)],
        &["--instance-id", "second"],
    )?;
    wait_rows(&db.pool, TOTAL, || second.log_text()).await?;
    let (k, t) = (kafka.clone(), topic.clone());
    tokio::task::spawn_blocking(move || {
        wait_until(
            "the second worker's offsets reach the group",
            DEADLINE,
            || Ok((committed_total(&k, "test.eo-zombie", &t).unwrap_or(0) >= TOTAL).then_some(())),
        )
    })
    .await??;

    // The zombie wakes with its batch due: its compare-and-set finds the new generation
    // and it commits nothing, or it learns first that it lost its partitions.
    wake_zombie(&mut zombie)?;
    assert_eq!(rows(&db.pool).await?, TOTAL, "the zombie wrote nothing");
    assert!(second.is_running(), "{}", second.log_text());
    second.stop()?;
    assert_eq!(rows(&db.pool).await?, TOTAL);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_exactly_once_dead_letters_a_refused_record_inside_the_transaction()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("eo-poison", 1, &[]).await?;
    let dead_letter = kafka.create_topic("eo-poison-dlq", 1, &[]).await?;
    let db = TestDatabase::create().await?;
    sqlx::query(
        "CREATE TABLE events (id bigint CHECK (id >= 0), src_partition integer, src_offset bigint)",
    )
    .execute(&db.pool)
    .await?;
    let doc = insert_pipeline(
        "eo-poison",
        &topic,
        json!({"deadLetter": {"topic": dead_letter}, "batch": {"maxRecords": 1000, "maxWait": "500ms"}}),
    );
    let dir = tempfile::tempdir()?;
    let mut worker = start_with_args(dir.path(), &kafka, &doc, &[("DB", &db.url)], &[])?;
    // One batch: the check constraint refuses event 57 alone (savepoints isolate it inside
    // the one transaction); the other 99 land with the offset past all 100.
    let mut batch = events(0..100);
    batch[57].1 = b"{\"id\": -57}".to_vec();
    produce(&kafka, &topic, &batch).await?;
    wait_rows(&db.pool, 99, || worker.log_text()).await?;
    let dead = tokio::task::spawn_blocking({
        let (kafka, dead_letter) = (kafka.clone(), dead_letter.clone());
        move || read_topic(&kafka, &dead_letter, 1)
    })
    .await??;
    assert_eq!(
        dead[0].1.get("weir.source.offset").map(String::as_str),
        Some("57")
    );
    let (next,): (Option<i64>,) = sqlx::query_as(
        "SELECT next_offset FROM weir_offsets WHERE consumer_group = 'test.eo-poison'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(next, Some(100));
    assert_eq!(rows(&db.pool).await?, 99);
    worker.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_exactly_once_sigkill_at_10_random_moments_applies_every_event_once()
-> anyhow::Result<()> {
    const TOTAL: i64 = 20_000;
    let kafka = kafka().await?;
    let topic = kafka.create_topic("eo-my-kill", 4, &[]).await?;
    let db = TestMySqlDatabase::create().await?;
    // Insert-only, no idempotency key, a unique constraint on the source position: a
    // second copy stops the worker (no dead-letter topic) and fails the test.
    sqlx::query(
        "CREATE TABLE events (id BIGINT NOT NULL, src_partition INT NOT NULL, src_offset BIGINT NOT NULL,
         UNIQUE (src_partition, src_offset))",
    )
    .execute(&db.pool)
    .await?;
    let mut doc = insert_pipeline("eo-my-kill", &topic, json!({}));
    let postgres = doc["spec"]["sinks"][0]["postgres"].take();
    doc["spec"]["sinks"][0] = json!({"mysql": postgres});
    let dir = tempfile::tempdir()?;
    let producer = {
        let (kafka, topic) = (kafka.clone(), topic.clone());
        tokio::spawn(async move {
            for chunk in 0..20 {
                produce(&kafka, &topic, &events(chunk * 1000..(chunk + 1) * 1000)).await?;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            anyhow::Ok(())
        })
    };
    let start = || {
        start_with_args(
            dir.path(),
            &kafka,
            &doc,
            &[("DB", &db.url)],
            &["--instance-id", "worker-0"],
        )
    };
    let rows = |pool: sqlx::MySqlPool| async move {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM events")
            .fetch_one(&pool)
            .await?;
        anyhow::Ok(n)
    };
    let mut rng = fastrand::Rng::with_seed(14);
    let mut last = 0;
    for kill in 0..10 {
        let mut worker = start()?;
        let started = std::time::Instant::now();
        loop {
            let n = rows(db.pool.clone()).await?;
            if n > last || n >= TOTAL {
                last = n;
                break;
            }
            anyhow::ensure!(
                started.elapsed() < DEADLINE,
                "kill {kill}: no progress past {last} rows\n{}",
                worker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..150))).await;
        worker.signal("KILL")?;
        worker.wait(DEADLINE)?;
    }
    producer.await??;
    let mut worker = start()?;
    let started = std::time::Instant::now();
    while rows(db.pool.clone()).await? < TOTAL {
        anyhow::ensure!(
            started.elapsed() < DEADLINE,
            "rows did not reach {TOTAL}\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        rows(db.pool.clone()).await?,
        TOTAL,
        "every event exactly once"
    );
    let (offsets,): (i64,) = sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(next_offset), 0) AS SIGNED) FROM weir_offsets WHERE consumer_group = 'test.eo-my-kill'",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(
        offsets, TOTAL,
        "the offsets kept with the rows are the topic's end"
    );
    assert!(worker.is_running(), "{}", worker.log_text());
    worker.stop()?;
    Ok(())
}
