//! The stale-write guard (`guard: {column: version}`) on the PostgreSQL and SQLite sinks
//! (MySQL's is in mysql_sink.rs): after the whole stream, replaying its first half leaves
//! every row at its newest version and counts the held-back writes as skipped; within one
//! batch, an older version after a newer one of the same key changes nothing.

use serde_json::{Value, json};
use weir_crds::EventPipelineSpec;
use weir_testkit::TestDatabase;
use weir_worker::record::Record;
use weir_worker::sink::{Sink, WriteInput};

type BoxedSink = Box<dyn Sink>;

async fn build(kind: &str, url: &str) -> anyhow::Result<BoxedSink> {
    let spec: EventPipelineSpec = serde_json::from_value(json!({
        "source": {"topics": ["t"]},
        "sinks": [{kind: {"url": url, "table": "users", "mode": "Rules", "keyColumns": ["id"],
            "guard": {"column": "version"}, "rules": [
            {"when": "event.op == 'upsert'", "action": "Upsert", "columns": [
                {"name": "id", "type": "bigint"}, {"name": "name", "type": "text"},
                {"name": "version", "type": "bigint"}]},
            {"when": "event.op == 'update'", "action": "Update", "columns": [
                {"name": "id", "type": "bigint"}, {"name": "name", "type": "text"},
                {"name": "version", "type": "bigint"}]}
        ]}}]
    }))?;
    spec.validate().map_err(|p| anyhow::anyhow!("{p}"))?;
    let sink = weir_worker::sink::build(&spec, "test-group")
        .map_err(anyhow::Error::msg)?
        .remove(0)
        .sink;
    sink.prepare().await.map_err(anyhow::Error::msg)?;
    Ok(sink)
}

/// Writes `events` as one batch; returns the positions refused and how many were skipped.
async fn write(sink: &BoxedSink, events: &[Value]) -> anyhow::Result<(Vec<usize>, usize)> {
    let record = Record {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: None,
        payload: None,
        timestamp: None,
        headers: vec![],
    };
    let input: Vec<WriteInput<'_>> = events
        .iter()
        .enumerate()
        .map(|(index, event)| WriteInput {
            index,
            record: &record,
            event,
        })
        .collect();
    let written = sink.write(&input).await.map_err(anyhow::Error::msg)?;
    Ok((
        written.rejected.into_iter().map(|r| r.index).collect(),
        written.skipped,
    ))
}

/// Ten keys, versions 1..=6 each; odd versions are upserts, even ones updates.
fn stream() -> Vec<Value> {
    (1..=6)
        .flat_map(|version| {
            (0..10).map(move |id| {
                let op = if version % 2 == 1 { "upsert" } else { "update" };
                json!({"op": op, "id": id, "name": format!("{id}@v{version}"), "version": version})
            })
        })
        .collect()
}

/// Runs the scenario; `rows` reads (id, name, version) ordered by id.
async fn replay_changes_nothing<F, Fut>(sink: BoxedSink, rows: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<(i64, String, i64)>>>,
{
    let stream = stream();
    assert_eq!(write(&sink, &stream).await?, (vec![], 0));
    let newest: Vec<(i64, String, i64)> = (0..10).map(|id| (id, format!("{id}@v6"), 6)).collect();
    assert_eq!(rows().await?, newest);
    // The first half again, one batch per version: every write is held back and counted.
    let mut skipped = 0;
    for batch in stream[..30].chunks(10) {
        let (refused, s) = write(&sink, batch).await?;
        assert_eq!(refused, Vec::<usize>::new());
        skipped += s;
    }
    assert_eq!(skipped, 30, "every held-back write is counted as skipped");
    assert_eq!(rows().await?, newest);
    // Out of order within a batch, and an event without a version (refused).
    let (refused, skipped) = write(
        &sink,
        &[
            json!({"op": "upsert", "id": 20, "name": "v9", "version": 9}),
            json!({"op": "upsert", "id": 20, "name": "v8", "version": 8}),
            json!({"op": "update", "id": 0, "name": "0@v7", "version": 7}),
            json!({"op": "upsert", "id": 1, "name": "no version"}),
        ],
    )
    .await?;
    assert_eq!((refused, skipped), (vec![3], 1));
    let stored = rows().await?;
    assert_eq!(stored[0], (0, "0@v7".into(), 7));
    assert_eq!(stored[1], (1, "1@v6".into(), 6));
    assert_eq!(stored.last(), Some(&(20, "v9".into(), 9)));
    sink.close().await;
    Ok(())
}

#[tokio::test]
async fn postgres_guard_keeps_rows_at_their_newest_version_under_replay() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, version bigint)")
        .execute(&db.pool)
        .await?;
    let sink = build("postgres", &db.url).await?;
    replay_changes_nothing(sink, || async {
        Ok(
            sqlx::query_as("SELECT id, name, version FROM users ORDER BY id")
                .fetch_all(&db.pool)
                .await?,
        )
    })
    .await
}

#[tokio::test]
async fn sqlite_guard_keeps_rows_at_their_newest_version_under_replay() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("sink.db").display());
    let pool = sqlx::sqlite::SqlitePool::connect(&format!("{url}?mode=rwc")).await?;
    sqlx::query("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, version INTEGER)")
        .execute(&pool)
        .await?;
    let sink = build("sqlite", &url).await?;
    replay_changes_nothing(sink, || async {
        Ok(
            sqlx::query_as("SELECT id, name, version FROM users ORDER BY id")
                .fetch_all(&pool)
                .await?,
        )
    })
    .await
}
