//! The SQLite sink's modes on a real SQLite file: Upsert keeps the last value per key and
//! refuses only the events that do not fit, Delete removes by key, Insert refuses a
//! duplicate key alone, and idempotency skips keys already applied.

use serde_json::{Value, json};
use sqlx::sqlite::SqlitePool;
use weir_crds::EventPipelineSpec;
use weir_worker::record::Record;
use weir_worker::sink::{Sink, WriteInput};

type BoxedSink = Box<dyn Sink>;

fn spec(dir: &std::path::Path, sink: Value, extra: Value) -> anyhow::Result<EventPipelineSpec> {
    let mut sink = sink;
    sink["url"] = json!(format!("sqlite://{}", dir.join("sink.db").display()));
    let mut doc = json!({"source": {"topics": ["t"]}, "sinks": [{"sqlite": sink}]});
    if let (Some(doc), Some(extra)) = (doc.as_object_mut(), extra.as_object()) {
        doc.extend(extra.clone());
    }
    let spec: EventPipelineSpec = serde_json::from_value(doc)?;
    spec.validate().map_err(|p| anyhow::anyhow!("{p}"))?;
    Ok(spec)
}

fn build(spec: &EventPipelineSpec) -> anyhow::Result<BoxedSink> {
    let mut sinks = weir_worker::sink::build(spec, "test-group").map_err(anyhow::Error::msg)?;
    Ok(sinks.remove(0).sink)
}

/// Writes `events` as one batch; returns the positions refused.
async fn write(sink: &mut BoxedSink, events: &[Value]) -> anyhow::Result<Vec<usize>> {
    Ok(write_counting(sink, events).await?.0)
}

/// Writes `events` as one batch; returns the positions refused and how many were skipped.
async fn write_counting(
    sink: &mut BoxedSink,
    events: &[Value],
) -> anyhow::Result<(Vec<usize>, usize)> {
    let records: Vec<Record> = (0..events.len())
        .map(|i| Record {
            topic: "t".into(),
            partition: 0,
            offset: i as i64,
            key: None,
            payload: None,
            timestamp: None,
            headers: vec![],
        })
        .collect();
    let input: Vec<WriteInput<'_>> = events
        .iter()
        .enumerate()
        .map(|(index, event)| WriteInput {
            index,
            record: &records[index],
            event,
        })
        .collect();
    let written = sink.write(&input).await.map_err(anyhow::Error::msg)?;
    Ok((
        written.rejected.into_iter().map(|r| r.index).collect(),
        written.skipped,
    ))
}

async fn rows(dir: &std::path::Path) -> anyhow::Result<Vec<(i64, Option<String>, Option<i64>)>> {
    let pool = SqlitePool::connect(&format!("sqlite://{}", dir.join("sink.db").display())).await?;
    let rows = sqlx::query_as("SELECT id, name, active FROM users ORDER BY id")
        .fetch_all(&pool)
        .await?;
    pool.close().await;
    Ok(rows)
}

async fn create_table(dir: &std::path::Path) -> anyhow::Result<()> {
    let pool = SqlitePool::connect(&format!(
        "sqlite://{}?mode=rwc",
        dir.join("sink.db").display()
    ))
    .await?;
    sqlx::query("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, active INTEGER)")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

const COLUMNS: &str = r#"[{"name": "id", "type": "bigint"}, {"name": "name", "type": "text"}, {"name": "active", "type": "boolean"}]"#;

#[tokio::test]
async fn upsert_keeps_the_last_value_per_key_and_refuses_only_bad_events() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    create_table(dir.path()).await?;
    let columns: Value = serde_json::from_str(COLUMNS)?;
    let spec = spec(
        dir.path(),
        json!({"table": "users", "mode": "Upsert", "keyColumns": ["id"], "columns": columns}),
        json!({}),
    )?;
    let mut sink = build(&spec)?;
    sink.prepare().await.map_err(anyhow::Error::msg)?;
    let refused = write(
        &mut sink,
        &[
            json!({"id": 1, "name": "ann", "active": true}),
            json!({"id": 2, "name": "bo", "active": false}),
            json!({"id": 1, "name": "ann-2", "active": "yes please"}),
            json!({"id": 3, "name": null}),
            json!({"id": 2, "name": "bo-2", "active": true}),
            json!({"id": "four", "name": "x"}),
        ],
    )
    .await?;
    // 2: not a boolean; 3: NOT NULL name; 5: not an integer key.
    assert_eq!(refused, vec![2, 3, 5]);
    assert_eq!(
        rows(dir.path()).await?,
        vec![
            (1, Some("ann".into()), Some(1)),
            (2, Some("bo-2".into()), Some(1))
        ]
    );

    let delete = spec_with_mode(dir.path(), "Delete")?;
    let mut delete = build(&delete)?;
    assert_eq!(
        write(&mut delete, &[json!({"id": 1})]).await?,
        Vec::<usize>::new()
    );
    assert_eq!(
        rows(dir.path()).await?,
        vec![(2, Some("bo-2".into()), Some(1))]
    );

    let insert = spec_with_mode(dir.path(), "Insert")?;
    let mut insert = build(&insert)?;
    let refused = write(
        &mut insert,
        &[
            json!({"id": 2, "name": "dup"}),
            json!({"id": 9, "name": "new"}),
        ],
    )
    .await?;
    assert_eq!(refused, vec![0], "the duplicate key alone is refused");
    assert_eq!(
        rows(dir.path()).await?,
        vec![
            (2, Some("bo-2".into()), Some(1)),
            (9, Some("new".into()), None)
        ]
    );
    Ok(())
}

fn spec_with_mode(dir: &std::path::Path, mode: &str) -> anyhow::Result<EventPipelineSpec> {
    let columns: Value = serde_json::from_str(COLUMNS)?;
    let columns = if mode == "Delete" {
        json!([columns[0]])
    } else {
        columns
    };
    spec(
        dir,
        json!({"table": "users", "mode": mode, "keyColumns": ["id"], "columns": columns}),
        json!({}),
    )
}

#[tokio::test]
async fn idempotency_skips_keys_applied_before_even_across_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    create_table(dir.path()).await?;
    let columns: Value = serde_json::from_str(COLUMNS)?;
    let spec = spec(
        dir.path(),
        json!({"table": "users", "mode": "Upsert", "keyColumns": ["id"], "columns": columns}),
        json!({"idempotency": {"key": "event.eventId", "window": "1h"}}),
    )?;
    let batch = [
        json!({"eventId": "a", "id": 1, "name": "first"}),
        json!({"eventId": "b", "id": 1, "name": "second"}),
        json!({"eventId": "a", "id": 1, "name": "replayed a"}),
    ];
    let mut sink = build(&spec)?;
    sink.prepare().await.map_err(anyhow::Error::msg)?;
    assert_eq!(write_counting(&mut sink, &batch).await?, (vec![], 1));
    assert_eq!(
        rows(dir.path()).await?,
        vec![(1, Some("second".into()), None)]
    );
    sink.close().await;

    // A new sink on the same file (a restarted worker) skips all three.
    let mut again = build(&spec)?;
    again.prepare().await.map_err(anyhow::Error::msg)?;
    assert_eq!(
        write_counting(
            &mut again,
            &[
                json!({"eventId": "a", "id": 1, "name": "late a"}),
                batch[1].clone()
            ]
        )
        .await?,
        (vec![], 2)
    );
    assert_eq!(
        rows(dir.path()).await?,
        vec![(1, Some("second".into()), None)]
    );
    Ok(())
}
