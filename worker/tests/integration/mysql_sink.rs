//! The MySQL sink's modes against a real MariaDB server (the harness's shared one, a fresh
//! database per test): Insert, Upsert, Delete and Rules each land a batch and refuse only
//! the records the server refuses; idempotency keys are kept in the same transaction;
//! statements larger than `max_allowed_packet` are split; the stale-write guard keeps
//! every row at its newest version.

use serde_json::{Value, json};
use weir_crds::EventPipelineSpec;
use weir_testkit::TestMySqlDatabase;
use weir_worker::record::Record;
use weir_worker::sink::{Sink, WriteInput};

type BoxedSink = Box<dyn Sink>;

fn spec(db: &TestMySqlDatabase, sink: Value, extra: Value) -> anyhow::Result<EventPipelineSpec> {
    let mut sink = sink;
    sink["url"] = json!(db.url);
    let mut doc = json!({"source": {"topics": ["t"]}, "sinks": [{"mysql": sink}]});
    if let (Some(doc), Some(extra)) = (doc.as_object_mut(), extra.as_object()) {
        doc.extend(extra.clone());
    }
    let spec: EventPipelineSpec = serde_json::from_value(doc)?;
    spec.validate().map_err(|p| anyhow::anyhow!("{p}"))?;
    Ok(spec)
}

async fn build(spec: &EventPipelineSpec) -> anyhow::Result<BoxedSink> {
    let mut sinks = weir_worker::sink::build(spec, "test-group").map_err(anyhow::Error::msg)?;
    let sink = sinks.remove(0).sink;
    sink.prepare().await.map_err(anyhow::Error::msg)?;
    Ok(sink)
}

/// Writes `events` as one batch; returns the positions refused and how many were skipped.
async fn write(sink: &BoxedSink, events: &[Value]) -> anyhow::Result<(Vec<usize>, usize)> {
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

type UserRow = (i64, String, Option<bool>, Option<i64>);

async fn rows(db: &TestMySqlDatabase) -> anyhow::Result<Vec<UserRow>> {
    Ok(
        sqlx::query_as("SELECT id, name, active, version FROM users ORDER BY id")
            .fetch_all(&db.pool)
            .await?,
    )
}

async fn users_table() -> anyhow::Result<TestMySqlDatabase> {
    let db = TestMySqlDatabase::create().await?;
    sqlx::query(
        "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(64) NOT NULL, active BOOLEAN,
         version BIGINT, seen_at DATETIME(6), profile JSON)",
    )
    .execute(&db.pool)
    .await?;
    Ok(db)
}

fn columns() -> Value {
    json!([
        {"name": "id", "type": "bigint"},
        {"name": "name", "type": "text"},
        {"name": "active", "type": "boolean"},
        {"name": "version", "type": "bigint"}
    ])
}

fn row(id: i64, name: &str, active: Option<bool>, version: Option<i64>) -> UserRow {
    (id, name.to_owned(), active, version)
}

#[tokio::test]
async fn upsert_keeps_the_last_value_per_key_and_refuses_only_bad_records() -> anyhow::Result<()> {
    let db = users_table().await?;
    let spec = spec(
        &db,
        json!({"table": "users", "mode": "Upsert", "keyColumns": ["id"], "columns": columns()}),
        json!({}),
    )?;
    let sink = build(&spec).await?;
    let (refused, skipped) = write(
        &sink,
        &[
            json!({"id": 1, "name": "ann", "active": true}),
            json!({"id": 2, "name": "bo", "active": false}),
            json!({"id": 1, "name": "ann-2", "active": "yes please"}),
            json!({"id": 3, "name": null}),
            json!({"id": 4, "name": "a name far longer than the sixty-four characters the column holds, refused"}),
            json!({"id": 2, "name": "bo-2", "active": true}),
            json!({"id": "five", "name": "x"}),
        ],
    )
    .await?;
    // 2: not a boolean; 3: NOT NULL name; 4: too long for its column; 6: not an integer.
    assert_eq!(refused, vec![2, 3, 4, 6]);
    assert_eq!(skipped, 0);
    assert_eq!(
        rows(&db).await?,
        vec![
            row(1, "ann", Some(true), None),
            row(2, "bo-2", Some(true), None)
        ]
    );
    // A second batch updates in place.
    assert_eq!(
        write(&sink, &[json!({"id": 1, "name": "ann-3", "active": false})]).await?,
        (vec![], 0)
    );
    assert_eq!(rows(&db).await?[0], row(1, "ann-3", Some(false), None));
    sink.close().await;
    Ok(())
}

#[tokio::test]
async fn insert_refuses_a_duplicate_key_alone_and_delete_removes_by_key() -> anyhow::Result<()> {
    let db = users_table().await?;
    let insert = spec(
        &db,
        json!({"table": "users", "mode": "Insert", "columns": columns()}),
        json!({}),
    )?;
    let insert = build(&insert).await?;
    let batch: Vec<Value> = (1..=10)
        .map(|id| json!({"id": if id == 7 { 3 } else { id }, "name": format!("u{id}")}))
        .collect();
    assert_eq!(write(&insert, &batch).await?, (vec![6], 0));
    assert_eq!(rows(&db).await?.len(), 9);

    let delete = spec(
        &db,
        json!({"table": "users", "mode": "Delete", "keyColumns": ["id"], "columns": [{"name": "id", "type": "bigint"}]}),
        json!({}),
    )?;
    let delete = build(&delete).await?;
    assert_eq!(
        write(
            &delete,
            &[json!({"id": 1}), json!({"id": 2}), json!({"id": 99})]
        )
        .await?,
        (vec![], 0)
    );
    let ids: Vec<i64> = rows(&db).await?.into_iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![3, 4, 5, 6, 8, 9, 10]);
    Ok(())
}

#[tokio::test]
async fn rules_project_creates_updates_and_deletes_in_order() -> anyhow::Result<()> {
    let db = users_table().await?;
    let spec = spec(
        &db,
        json!({"table": "users", "mode": "Rules", "keyColumns": ["id"], "rules": [
            {"when": "event.type == 'Created'", "action": "Upsert", "columns": [
                {"name": "id", "type": "bigint"}, {"name": "name", "type": "text"},
                {"name": "seen_at", "from": "event.at", "type": "timestamptz"},
                {"name": "profile", "type": "jsonb"}]},
            {"when": "event.type == 'Renamed'", "action": "Update", "columns": [
                {"name": "id", "type": "bigint"}, {"name": "name", "type": "text"}]},
            {"when": "event.type == 'Deleted'", "action": "Delete", "columns": [
                {"name": "id", "type": "bigint"}]}
        ]}),
        json!({}),
    )?;
    let sink = build(&spec).await?;
    let (refused, skipped) = write(
        &sink,
        &[
            json!({"type": "Created", "id": 1, "name": "a", "at": "2026-12-01T09:00:00+01:00", "profile": {"tags": ["x"]}}),
            json!({"type": "Renamed", "id": 1, "name": "a2"}),
            json!({"type": "Created", "id": 2, "name": "b", "at": "2026-12-01T08:00:00Z"}),
            json!({"type": "Deleted", "id": 2}),
            json!({"type": "Created", "id": 2, "name": "b-again", "at": "not a time"}),
            json!({"type": "Ignored", "id": 3}),
            json!({"type": "Renamed", "id": 4, "name": "no such row"}),
            json!({"type": "Created", "id": 5, "name": "e"}),
        ],
    )
    .await?;
    assert_eq!(refused, vec![4], "the malformed timestamp alone is refused");
    assert_eq!(skipped, 1, "no rule matches the Ignored event");
    let projected: Vec<(i64, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT id, name, DATE_FORMAT(seen_at, '%Y-%m-%d %H:%i:%s'), JSON_EXTRACT(profile, '$.tags[0]') FROM users ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        projected,
        vec![
            (
                1,
                "a2".into(),
                Some("2026-12-01 08:00:00".into()),
                Some("\"x\"".into())
            ),
            (5, "e".into(), None, None)
        ]
    );
    Ok(())
}

#[tokio::test]
async fn idempotency_skips_keys_applied_before_even_across_restarts() -> anyhow::Result<()> {
    let db = users_table().await?;
    let spec = spec(
        &db,
        json!({"table": "users", "mode": "Upsert", "keyColumns": ["id"], "columns": columns()}),
        json!({"idempotency": {"key": "event.eventId", "window": "1h"}}),
    )?;
    let batch = [
        json!({"eventId": "a", "id": 1, "name": "first"}),
        json!({"eventId": "b", "id": 1, "name": "second"}),
        json!({"eventId": "a", "id": 1, "name": "replayed a"}),
    ];
    let sink = build(&spec).await?;
    assert_eq!(write(&sink, &batch).await?, (vec![], 1));
    assert_eq!(rows(&db).await?, vec![row(1, "second", None, None)]);
    sink.close().await;

    // A new sink on the same database (a restarted worker) skips both keys.
    let again = build(&spec).await?;
    assert_eq!(
        write(
            &again,
            &[
                json!({"eventId": "a", "id": 1, "name": "late a"}),
                batch[1].clone()
            ]
        )
        .await?,
        (vec![], 2)
    );
    assert_eq!(rows(&db).await?, vec![row(1, "second", None, None)]);
    let keys: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM weir_idempotency WHERE scope = 'test-group'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(keys, 2);
    Ok(())
}

#[tokio::test]
async fn a_batch_larger_than_max_allowed_packet_lands_in_several_statements() -> anyhow::Result<()>
{
    let db = TestMySqlDatabase::create().await?;
    sqlx::query("CREATE TABLE docs (id BIGINT PRIMARY KEY, body MEDIUMTEXT NOT NULL)")
        .execute(&db.pool)
        .await?;
    let max: u64 = sqlx::query_scalar("SELECT @@max_allowed_packet")
        .fetch_one(&db.pool)
        .await?;
    // 2000 rows of 20 KiB: more than twice the server's packet limit.
    let body = "x".repeat(20 * 1024);
    let events: Vec<Value> = (0..2000)
        .map(|id| json!({"id": id, "body": body}))
        .collect();
    assert!(
        2000 * body.len() as u64 > 2 * max,
        "the batch outgrows one packet"
    );
    let spec = spec(
        &db,
        json!({"table": "docs", "mode": "Upsert", "keyColumns": ["id"], "columns": [
            {"name": "id", "type": "bigint"}, {"name": "body", "type": "text"}]}),
        json!({}),
    )?;
    let sink = build(&spec).await?;
    assert_eq!(write(&sink, &events).await?, (vec![], 0));
    let (count, bytes): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), CAST(SUM(LENGTH(body)) AS SIGNED) FROM docs")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(count, 2000);
    assert_eq!(bytes as usize, 2000 * body.len());
    Ok(())
}

#[tokio::test]
async fn the_guard_keeps_every_row_at_its_newest_version_when_the_stream_is_replayed()
-> anyhow::Result<()> {
    let db = users_table().await?;
    let spec = spec(
        &db,
        json!({"table": "users", "mode": "Rules", "keyColumns": ["id"], "guard": {"column": "version"}, "rules": [
            {"when": "event.op == 'upsert'", "action": "Upsert", "columns": [
                {"name": "id", "type": "bigint"}, {"name": "name", "type": "text"},
                {"name": "version", "type": "bigint"}]},
            {"when": "event.op == 'update'", "action": "Update", "columns": [
                {"name": "id", "type": "bigint"}, {"name": "name", "type": "text"},
                {"name": "version", "type": "bigint"}]}
        ]}),
        json!({}),
    )?;
    let sink = build(&spec).await?;
    // Ten rows, versions 1..=6 each, the odd versions upserts and the even ones updates.
    let stream: Vec<Value> = (1..=6)
        .flat_map(|version| {
            (0..10).map(move |id| {
                let op = if version % 2 == 1 { "upsert" } else { "update" };
                json!({"op": op, "id": id, "name": format!("{id}@v{version}"), "version": version})
            })
        })
        .collect();
    assert_eq!(write(&sink, &stream).await?, (vec![], 0));
    let newest: Vec<UserRow> = (0..10)
        .map(|id| row(id, &format!("{id}@v6"), None, Some(6)))
        .collect();
    assert_eq!(rows(&db).await?, newest);
    // Replaying the first half: every write is older than the stored version. A key's
    // three events fold into one row write, which the guard holds back: one skip per row.
    let (refused, skipped) = write(&sink, &stream[..30]).await?;
    assert_eq!(refused, Vec::<usize>::new());
    assert_eq!(
        skipped, 10,
        "every held-back row write is counted as skipped"
    );
    assert_eq!(rows(&db).await?, newest);
    // Out of order within one batch: the newest version wins.
    let (_, skipped) = write(
        &sink,
        &[
            json!({"op": "upsert", "id": 20, "name": "v9", "version": 9}),
            json!({"op": "upsert", "id": 20, "name": "v8", "version": 8}),
            json!({"op": "upsert", "id": 0, "name": "0@v7", "version": 7}),
            json!({"op": "upsert", "id": 1, "name": "no version"}),
        ],
    )
    .await?;
    assert_eq!(skipped, 1);
    let stored = rows(&db).await?;
    assert_eq!(stored[0], row(0, "0@v7", None, Some(7)));
    assert_eq!(
        stored[1],
        row(1, "1@v6", None, Some(6)),
        "no version: refused"
    );
    assert_eq!(stored.last(), Some(&row(20, "v9", None, Some(9))));
    Ok(())
}
