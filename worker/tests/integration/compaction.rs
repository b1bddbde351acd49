//! `batch.compaction: LastWriteWins` through the real worker, the real broker and real
//! PostgreSQL: the same stream (each key updated ten times, spread over the stream, some
//! versions filtered out, one unparsable record) is upserted into two tables, one without
//! and one with compaction; the tables are identical, the compacted run wrote fewer
//! events (`weir_records_compacted_total`), and the bad record is dead-lettered in both.

use crate::common;

use common::{DEADLINE, Worker, pipeline, produce, wait_committed_async, wait_until};
use serde_json::{Value, json};
use weir_testkit::{TestDatabase, TestKafka};

const KEYS: i64 = 200;
const VERSIONS: i64 = 10;

fn upsert(name: &str, topic: &str, table: &str, compaction: &str, dlq: &str) -> Value {
    let mut spec = pipeline(
        name,
        json!({
            "source": {"topics": [topic]},
            // The last version of every fifth key is dropped: a filtered last version
            // must not make compaction lose the version before it.
            "filter": "!(event.id % 5 == 0 && event.version == 10)",
            "sinks": [{"postgres": {
                "urlFrom": {"env": "DB"}, "table": table, "mode": "Upsert", "keyColumns": ["id"],
                "columns": [{"name": "id", "type": "bigint"}, {"name": "version", "type": "bigint"}]
            }}],
            "batch": {"maxRecords": 5000, "maxWait": "200ms", "compaction": compaction},
            "deadLetter": {"topic": dlq},
        }),
    );
    if name.ends_with("exactly-once") {
        spec["spec"]["delivery"] = json!("ExactlyOnce");
    }
    spec
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compacted_run_leaves_the_table_an_uncompacted_run_leaves() -> anyhow::Result<()> {
    let kafka = tokio::task::spawn_blocking(TestKafka::shared).await??;
    let topic = kafka.create_topic("compaction", 3, &[]).await?;
    let dlq = kafka.create_topic("compaction-dlq", 1, &[]).await?;
    let db = TestDatabase::create().await?;
    for table in ["plain", "compacted", "compacted_eo"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, version bigint NOT NULL)"
        )))
        .execute(&db.pool)
        .await?;
    }
    let mut records = Vec::new();
    for version in 1..=VERSIONS {
        for id in 0..KEYS {
            records.push((
                id.to_string(),
                serde_json::to_vec(&json!({"id": id, "version": version}))?,
            ));
        }
        if version == 5 {
            records.push(("bad".to_owned(), b"{not json".to_vec()));
        }
    }
    produce(&kafka, &topic, &records).await?;
    let total = records.len() as i64;

    let dir = tempfile::tempdir()?;
    let mut runs = Vec::new();
    for (name, table, compaction) in [
        ("plain", "plain", "None"),
        ("compacted", "compacted", "LastWriteWins"),
        // A window in one transaction with its offsets.
        ("compacted-exactly-once", "compacted_eo", "LastWriteWins"),
    ] {
        let worker = Worker::start(
            dir.path(),
            &kafka,
            &upsert(name, &topic, table, compaction, &dlq),
            &[("DB", &db.url)],
        )?;
        wait_committed_async(&kafka, &format!("test.{name}"), &topic, total).await?;
        runs.push((name, worker));
    }
    let rows = |table: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(format!(
                "SELECT id, version FROM {table} ORDER BY id"
            )))
            .fetch_all(&pool)
            .await
        }
    };
    let plain = rows("plain").await?;
    assert_eq!(plain.len() as i64, KEYS);
    assert!(
        plain
            .iter()
            .all(|(id, v)| *v == if id % 5 == 0 { VERSIONS - 1 } else { VERSIONS }),
        "every key at its last written version"
    );
    assert_eq!(rows("compacted").await?, plain, "the tables differ");
    assert_eq!(
        rows("compacted_eo").await?,
        plain,
        "the exactly-once table differs"
    );

    let count =
        |worker: &Worker, metric: &str| wait_until(metric, DEADLINE, || Ok(worker.metric(metric)));
    let (_, plain_worker) = &runs[0];
    let (_, compacted_worker) = &runs[1];
    assert_eq!(plain_worker.metric("weir_records_compacted_total"), Some(0));
    let compacted = count(compacted_worker, "weir_records_compacted_total")?;
    assert!(compacted > 0, "nothing was compacted");
    let written_plain = count(plain_worker, "weir_records_written_total")?;
    let written_compacted = count(compacted_worker, "weir_records_written_total")?;
    assert_eq!(written_compacted + compacted, written_plain);
    assert_eq!(count(plain_worker, "weir_records_dead_lettered_total")?, 1);
    assert_eq!(
        count(compacted_worker, "weir_records_dead_lettered_total")?,
        1
    );
    let (_, exactly_once) = &runs[2];
    assert!(count(exactly_once, "weir_records_compacted_total")? > 0);
    assert_eq!(count(exactly_once, "weir_records_dead_lettered_total")?, 1);
    Ok(())
}
