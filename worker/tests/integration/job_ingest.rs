//! Job 4 of the product, job ingest, from the shipped example (examples/job-ingest.yaml),
//! written by the real worker binary into PostgreSQL and into MySQL (MariaDB): requests are
//! validated (the filter drops those without the required fields or with a priority out of
//! range), a request sent twice is stored once (idempotency keys in the rows'
//! transaction), and malformed JSON goes to the dead-letter topic with the reason in its
//! headers. The metrics count what was received, filtered, written and dead-lettered.

use crate::common;

use anyhow::Context as _;
use common::{DEADLINE, produce, read_topic, start_documents, wait_committed_async, wait_until};
use serde_json::{Value, json};
use weir_testkit::{TestDatabase, TestKafka, TestMySqlDatabase};

const JOBS: usize = 300;
const DUPLICATES: usize = 60;
const INVALID: usize = 25;
const MALFORMED: usize = 5;

#[derive(Clone, Copy, Debug)]
enum Target {
    Postgres,
    MySql,
}

#[tokio::test(flavor = "multi_thread")]
async fn job_requests_land_in_postgres_once_each() -> anyhow::Result<()> {
    ingest(Target::Postgres).await
}

#[tokio::test(flavor = "multi_thread")]
async fn job_requests_land_in_mysql_once_each() -> anyhow::Result<()> {
    ingest(Target::MySql).await
}

fn job(i: usize) -> Value {
    json!({
        "idempotencyKey": format!("job-{i:05}"),
        "kind": if i.is_multiple_of(2) { "email" } else { "report" },
        "priority": i % 10,
        "scheduledAt": format!("2026-12-01T10:{:02}:{:02}Z", i / 60 % 60, i % 60),
        "payload": {"n": i},
    })
}

async fn ingest(target: Target) -> anyhow::Result<()> {
    let kafka = tokio::task::spawn_blocking(TestKafka::shared).await??;
    let topic = kafka.create_topic("jobs-ingest", 4, &[]).await?;
    let dlq = kafka.create_topic("jobs-ingest-dlq", 1, &[]).await?;

    // The example as shipped, pointed at this test's topics.
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/job-ingest.yaml"
    ))?
    .replace("jobs-ingest-dlq", &dlq)
    .replace("[jobs-ingest]", &format!("[{topic}]"));
    let documents: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(<Value as serde::Deserialize>::deserialize)
        .collect::<Result<_, _>>()?;
    let name = match target {
        Target::Postgres => "jobs-ingest",
        Target::MySql => "jobs-ingest-mysql",
    };
    let doc = documents
        .iter()
        .find(|d| d["kind"] == "EventPipeline" && d["metadata"]["name"] == name)
        .cloned()
        .context("pipeline in the example")?;
    let group = doc["spec"]["source"]["consumerGroup"]
        .as_str()
        .context("the example names its group")?
        .to_owned();

    // Its table, in a database of this test's own.
    let (url, _pg, _my) = match target {
        Target::Postgres => {
            let db = TestDatabase::create().await?;
            sqlx::query(
                "CREATE TABLE jobs (idempotency_key text, kind text, priority integer, scheduled_at timestamptz, payload jsonb)",
            )
            .execute(&db.pool)
            .await?;
            (db.url.clone(), Some(db), None)
        }
        Target::MySql => {
            let db = TestMySqlDatabase::create().await?;
            sqlx::query(
                "CREATE TABLE jobs (idempotency_key VARCHAR(255), kind TEXT, priority INT, scheduled_at DATETIME(6), payload JSON)",
            )
            .execute(&db.pool)
            .await?;
            (db.url.clone(), None, Some(db))
        }
    };

    // Every job once, a second copy of some, requests the filter refuses, and malformed
    // JSON, interleaved.
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..JOBS {
        records.push((format!("job-{i:05}"), serde_json::to_vec(&job(i))?));
        if i % (JOBS / DUPLICATES) == 0 {
            records.push((format!("job-{i:05}"), serde_json::to_vec(&job(i))?));
        }
        if i % (JOBS / INVALID) == 0 {
            let mut invalid = job(JOBS + i);
            invalid["priority"] = json!(12);
            records.push((format!("bad-{i}"), serde_json::to_vec(&invalid)?));
        }
        if i % (JOBS / MALFORMED) == 0 {
            records.push((format!("broken-{i}"), b"{\"idempotencyKey\": ".to_vec()));
        }
    }
    fastrand::Rng::with_seed(4).shuffle(&mut records);
    produce(&kafka, &topic, &records).await?;

    let dir = tempfile::tempdir()?;
    let worker = start_documents(
        dir.path(),
        &kafka,
        &[&doc],
        &[("JOBS_DATABASE_URL", url.as_str())],
        &["--namespace", "test"],
    )?;
    wait_committed_async(&kafka, &group, &topic, records.len() as i64)
        .await
        .with_context(|| worker.log_text())?;

    let (count, distinct): (i64, i64) = match (&_pg, &_my) {
        (Some(db), _) => {
            sqlx::query_as("SELECT count(*), count(DISTINCT idempotency_key) FROM jobs")
                .fetch_one(&db.pool)
                .await?
        }
        (_, Some(db)) => {
            sqlx::query_as("SELECT count(*), count(DISTINCT idempotency_key) FROM jobs")
                .fetch_one(&db.pool)
                .await?
        }
        _ => unreachable!("one database per target"),
    };
    assert_eq!((count, distinct), (JOBS as i64, JOBS as i64), "{target:?}");

    let k = kafka.clone();
    let dead = tokio::task::spawn_blocking(move || read_topic(&k, &dlq, MALFORMED)).await??;
    assert_eq!(dead.len(), MALFORMED);
    for (payload, headers) in &dead {
        assert_eq!(headers.get("weir.source.topic"), Some(&topic));
        assert!(
            headers
                .get("weir.error.message")
                .is_some_and(|m| !m.is_empty()),
            "{headers:?}"
        );
        assert!(
            payload
                .as_deref()
                .is_some_and(|p| p.starts_with(b"{\"idempotencyKey\"")),
            "the dead letter keeps the record as it was"
        );
    }

    let metric = |name: &str| wait_until(name, DEADLINE, || Ok(worker.metric(name)));
    assert_eq!(metric("weir_records_consumed_total")?, records.len() as u64);
    assert_eq!(metric("weir_records_filtered_total")?, INVALID as u64);
    assert_eq!(
        metric("weir_records_dead_lettered_total")?,
        MALFORMED as u64
    );
    assert_eq!(metric("weir_records_skipped_total")?, DUPLICATES as u64);
    // Acknowledged by the sink: the stored jobs and the copies it recognised.
    assert_eq!(
        metric("weir_records_written_total")?,
        (JOBS + DUPLICATES) as u64
    );
    Ok(())
}
