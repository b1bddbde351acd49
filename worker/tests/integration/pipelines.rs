//! The engine end to end: the real `weir-worker` binary as a process, the harness's real
//! Kafka broker and PostgreSQL.

use crate::common;

use std::collections::{BTreeMap, HashSet};

use anyhow::Context;
use common::{
    DEADLINE, Worker, committed_total, kafka, pipeline, produce, read_topic, wait_committed,
    wait_until,
};
use serde_json::{Value, json};
use weir_testkit::TestDatabase;

/// The todo-projection pipeline exactly as shipped in examples/, pointed at test names.
fn todo_pipeline(topic: &str, dead_letter: &str) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/todo-projection.yaml"
    ))?;
    let mut doc = serde_yaml_ng::Deserializer::from_str(&text)
        .map(<Value as serde::Deserialize>::deserialize)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|d| d["metadata"]["name"] == "todo-projection")
        .context("todo-projection missing from the example")?;
    doc["spec"]["source"]["topics"] = json!([topic]);
    doc["spec"]["sinks"][0]["postgres"]["urlFrom"] = json!({"env": "TODO_DB_URL"});
    doc["spec"]["deadLetter"]["topic"] = json!(dead_letter);
    doc["spec"]["batch"] = json!({"maxRecords": 200, "maxWait": "50ms"});
    doc["metadata"]["namespace"] = json!("test");
    Ok(doc)
}

/// Keyed records to produce.
type Records = Vec<(String, Vec<u8>)>;
/// One todo's id, user and events in order.
type TodoStream = (String, String, Vec<Value>);
/// A projected row as selected.
type TodoRow = (
    String,
    String,
    String,
    Option<i32>,
    Option<String>,
    bool,
    i64,
);

#[derive(Clone, Debug, Default, PartialEq)]
struct Todo {
    user: String,
    title: String,
    priority: i64,
    assignee: Option<String>,
    completed: bool,
    version: i64,
}

/// Todo events for `todos` todos of `users` users, interleaved at random but in order per
/// todo, with some events sent twice; and the state they project to.
fn todo_events(todos: usize, users: usize, seed: u64) -> (Records, BTreeMap<String, Todo>) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut streams: Vec<TodoStream> = Vec::new();
    for t in 0..todos {
        let id = uuid::Uuid::from_u128(seed as u128 * 1_000_000 + t as u128).to_string();
        let user = format!("user-{}", t % users);
        let envelope = |version: i64, kind: &str, payload: Value| {
            json!({
                "eventId": uuid::Uuid::new_v4().to_string(),
                "type": kind,
                "timestamp": format!("2026-11-23T10:{:02}:{:02}Z", version / 60 % 60, version % 60),
                "version": version,
                "correlationId": "test",
                "payload": payload,
            })
        };
        let mut events = vec![envelope(
            1,
            "TodoCreated",
            json!({"todoId": id, "userId": user, "title": format!("todo {t}"), "priority": 3}),
        )];
        let extra = rng.usize(0..6);
        for v in 0..extra {
            let version = v as i64 + 2;
            events.push(match rng.usize(0..4) {
                0 => envelope(
                    version,
                    "TodoUpdated",
                    json!({"todoId": id, "title": format!("todo {t} v{version}")}),
                ),
                1 => envelope(version, "TodoCompleted", json!({"todoId": id})),
                2 => envelope(
                    version,
                    "TodoAssigned",
                    json!({"todoId": id, "assignee": format!("person-{}", rng.usize(0..5))}),
                ),
                _ => envelope(
                    version,
                    "TodoPrioritized",
                    json!({"todoId": id, "priority": rng.i64(1..6)}),
                ),
            });
        }
        if rng.usize(0..5) == 0 {
            events.push(envelope(
                extra as i64 + 2,
                "TodoDeleted",
                json!({"todoId": id}),
            ));
        }
        streams.push((id, user, events));
    }
    // Expected state: each todo's events applied in order.
    let mut state: BTreeMap<String, Todo> = BTreeMap::new();
    for (id, user, events) in &streams {
        for e in events {
            let p = &e["payload"];
            let version = e["version"].as_i64().unwrap_or_default();
            match e["type"].as_str().unwrap_or_default() {
                "TodoCreated" => {
                    state.insert(
                        id.clone(),
                        Todo {
                            user: user.clone(),
                            title: p["title"].as_str().unwrap_or_default().into(),
                            priority: p["priority"].as_i64().unwrap_or_default(),
                            version,
                            ..Todo::default()
                        },
                    );
                }
                "TodoDeleted" => {
                    state.remove(id);
                }
                kind => {
                    if let Some(todo) = state.get_mut(id) {
                        todo.version = version;
                        match kind {
                            "TodoUpdated" => {
                                todo.title = p["title"].as_str().unwrap_or_default().into()
                            }
                            "TodoCompleted" => todo.completed = true,
                            "TodoAssigned" => {
                                todo.assignee = p["assignee"].as_str().map(str::to_owned)
                            }
                            _ => todo.priority = p["priority"].as_i64().unwrap_or_default(),
                        }
                    }
                }
            }
        }
    }
    // Interleave the todos' streams at random, keeping each stream's order; resend some
    // events (same eventId) right away, as a retrying producer would.
    let mut cursors: Vec<(usize, &TodoStream)> = streams.iter().map(|s| (0, s)).collect();
    let mut records = Vec::new();
    while !cursors.is_empty() {
        let pick = rng.usize(0..cursors.len());
        let (cursor, (_, user, events)) = &mut cursors[pick];
        let bytes = serde_json::to_vec(&events[*cursor]).unwrap_or_default();
        records.push((user.clone(), bytes.clone()));
        if rng.usize(0..10) == 0 {
            records.push((user.clone(), bytes));
        }
        *cursor += 1;
        if *cursor == events.len() {
            cursors.swap_remove(pick);
        }
    }
    (records, state)
}

async fn create_todos_table(db: &TestDatabase) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE todos (
            todo_id uuid PRIMARY KEY, user_id text NOT NULL, title text NOT NULL,
            priority integer, assignee text, completed_at timestamptz,
            created_at timestamptz, version bigint NOT NULL)",
    )
    .execute(&db.pool)
    .await?;
    Ok(())
}

async fn projected(db: &TestDatabase) -> anyhow::Result<BTreeMap<String, Todo>> {
    let rows: Vec<TodoRow> = sqlx::query_as(
        "SELECT todo_id::text, user_id, title, priority, assignee, completed_at IS NOT NULL, version FROM todos",
    )
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, user, title, priority, assignee, completed, version)| {
                (
                    id,
                    Todo {
                        user,
                        title,
                        priority: priority.map(i64::from).unwrap_or_default(),
                        assignee,
                        completed,
                        version,
                    },
                )
            },
        )
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn todo_projection_equals_the_state_computed_from_the_events() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("todo-events", 3, &[]).await?;
    let dead_letter = kafka.create_topic("todo-dlq", 1, &[]).await?;
    let db = TestDatabase::create().await?;
    create_todos_table(&db).await?;
    let (records, expected) = todo_events(300, 25, 7);
    produce(&kafka, &topic, &records).await?;

    let dir = tempfile::tempdir()?;
    let doc = todo_pipeline(&topic, &dead_letter)?;
    let worker = Worker::start(dir.path(), &kafka, &doc, &[("TODO_DB_URL", &db.url)])?;
    let total = records.len() as i64;
    let k = kafka.clone();
    tokio::task::spawn_blocking(move || {
        wait_committed(&k, "test.todo-projection", &topic, total, Some(&worker)).map(|()| worker)
    })
    .await??;

    let actual = projected(&db).await?;
    assert_eq!(actual.len(), expected.len(), "row count");
    for (id, todo) in &expected {
        assert_eq!(actual.get(id), Some(todo), "todo {id}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_records_go_to_the_dead_letter_topic_and_the_rest_of_the_batch_lands()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("orders", 1, &[]).await?;
    let dead_letter = kafka.create_topic("orders-dlq", 1, &[]).await?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric NOT NULL, note text CHECK (note <> 'forbidden'))")
        .execute(&db.pool)
        .await?;
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for id in 1..=10 {
        let value = match id {
            4 => b"{not json".to_vec(),
            6 => serde_json::to_vec(&json!({"id": id, "amount": "lots"}))?,
            8 => serde_json::to_vec(&json!({"id": id, "amount": 8, "note": "forbidden"}))?,
            9 => serde_json::to_vec(&json!({"amount": 9}))?,
            _ => serde_json::to_vec(&json!({"id": id, "amount": id * 10, "note": "fine"}))?,
        };
        records.push((id.to_string(), value));
    }
    produce(&kafka, &topic, &records).await?;
    let doc = pipeline(
        "orders",
        json!({
            "source": {"topics": [topic]},
            "sinks": [{"postgres": {
                "urlFrom": {"env": "ORDERS_DB_URL"}, "table": "orders", "mode": "Upsert",
                "keyColumns": ["id"],
                "columns": [{"name": "id", "type": "bigint"}, {"name": "amount", "type": "numeric"}, {"name": "note", "type": "text"}]
            }}],
            "batch": {"maxRecords": 1000, "maxWait": "500ms"},
            "deadLetter": {"topic": dead_letter},
        }),
    );
    let dir = tempfile::tempdir()?;
    let worker = Worker::start(dir.path(), &kafka, &doc, &[("ORDERS_DB_URL", &db.url)])?;
    let (k, t) = (kafka.clone(), topic.clone());
    let worker = tokio::task::spawn_blocking(move || {
        wait_committed(&k, "test.orders", &t, 10, Some(&worker)).map(|()| worker)
    })
    .await??;

    let ids: Vec<(i64,)> = sqlx::query_as("SELECT id FROM orders ORDER BY id")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(
        ids.into_iter().map(|(i,)| i).collect::<Vec<_>>(),
        vec![1, 2, 3, 5, 7, 10]
    );

    let k = kafka.clone();
    let dead = tokio::task::spawn_blocking(move || read_topic(&k, &dead_letter, 4)).await??;
    let mut by_offset = BTreeMap::new();
    for (payload, headers) in dead {
        assert_eq!(headers.get("weir.source.topic"), Some(&topic));
        assert_eq!(
            headers.get("weir.source.partition").map(String::as_str),
            Some("0")
        );
        assert_eq!(
            headers.get("weir.error.class").map(String::as_str),
            Some("permanent")
        );
        assert_eq!(headers.get("weir.attempts").map(String::as_str), Some("1"));
        assert!(
            headers
                .get("weir.first.failure")
                .is_some_and(|t| t.starts_with("20")),
            "{headers:?}"
        );
        let offset: i64 = headers
            .get("weir.source.offset")
            .context("no offset header")?
            .parse()?;
        by_offset.insert(
            offset,
            (
                payload,
                headers
                    .get("weir.error.message")
                    .cloned()
                    .unwrap_or_default(),
            ),
        );
    }
    assert_eq!(
        by_offset.keys().copied().collect::<Vec<_>>(),
        vec![3, 5, 7, 8]
    );
    assert_eq!(
        by_offset[&3].0.as_deref(),
        Some(&b"{not json"[..]),
        "the original value is kept"
    );
    assert!(
        by_offset[&3].1.contains("not valid JSON"),
        "{}",
        by_offset[&3].1
    );
    assert!(by_offset[&5].1.contains("numeric"), "{}", by_offset[&5].1);
    assert!(
        by_offset[&7].1.contains("check constraint"),
        "{}",
        by_offset[&7].1
    );
    assert!(
        by_offset[&8].1.contains("key column \"id\""),
        "{}",
        by_offset[&8].1
    );
    assert_eq!(
        worker.metric("weir_records_dead_lettered_total"),
        Some(4),
        "{}",
        worker.log_text()
    );
    assert_eq!(worker.metric("weir_records_written_total"), Some(6));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_batch_writes_it_commits_and_exits_zero() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("term", 2, &[]).await?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE events (id bigint PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    let records: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (i.to_string(), format!("{{\"id\": {i}}}").into_bytes()))
        .collect();
    produce(&kafka, &topic, &records).await?;
    let doc = pipeline(
        "term",
        json!({
            "source": {"topics": [topic]},
            "sinks": [{"postgres": {"urlFrom": {"env": "DB"}, "table": "events", "columns": [{"name": "id", "type": "bigint"}]}}],
            // The batch stays open far longer than the test: it is in flight when SIGTERM comes.
            "batch": {"maxRecords": 100000, "maxWait": "10m"},
        }),
    );
    let dir = tempfile::tempdir()?;
    let mut worker = Worker::start(dir.path(), &kafka, &doc, &[("DB", &db.url)])?;
    let worker_ref = &worker;
    wait_until("20 records consumed", DEADLINE, || {
        Ok((worker_ref.metric("weir_records_consumed_total") == Some(20)).then_some(()))
    })
    .with_context(|| worker.log_text())?;
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 0, "the batch must still be in flight");

    worker.signal("TERM")?;
    let status = worker.wait(DEADLINE)?;
    assert_eq!(status.code(), Some(0), "{}", worker.log_text());
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(rows, 20);
    assert_eq!(committed_total(&kafka, "test.term", &topic)?, 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn permanent_failure_without_dead_letter_stops_the_pipeline_uncommitted() -> anyhow::Result<()>
{
    let kafka = kafka().await?;
    let topic = kafka.create_topic("nodlq", 1, &[]).await?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE events (id bigint PRIMARY KEY)")
        .execute(&db.pool)
        .await?;
    produce(
        &kafka,
        &topic,
        &[
            ("k".into(), b"{\"id\": 1}".to_vec()),
            ("k".into(), b"garbage".to_vec()),
        ],
    )
    .await?;
    let doc = pipeline(
        "nodlq",
        json!({
            "source": {"topics": [topic]},
            "sinks": [{"postgres": {"urlFrom": {"env": "DB"}, "table": "events", "columns": [{"name": "id", "type": "bigint"}]}}],
            "batch": {"maxWait": "50ms"},
        }),
    );
    let dir = tempfile::tempdir()?;
    let mut worker = Worker::start(dir.path(), &kafka, &doc, &[("DB", &db.url)])?;
    let status = worker.wait(DEADLINE)?;
    assert_eq!(status.code(), Some(1));
    let log = worker.log_text();
    assert!(log.contains("spec.deadLetter is not set"), "{log}");
    assert_eq!(
        committed_total(&kafka, "test.nodlq", &topic)?,
        0,
        "nothing may be committed past the poison record"
    );
    Ok(())
}

#[test]
fn duplicate_events_in_the_sample_are_really_duplicates() {
    // Guards the projection test: it must contain resent events for idempotency to matter.
    let (records, _) = todo_events(300, 25, 7);
    let distinct: HashSet<&Vec<u8>> = records.iter().map(|(_, v)| v).collect();
    assert!(
        records.len() > distinct.len() + 20,
        "{} records, {} distinct",
        records.len(),
        distinct.len()
    );
}
