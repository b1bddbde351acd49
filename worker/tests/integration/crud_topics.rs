//! Job 2 of the product, CRUD events to a database in bulk, from the shipped example
//! (examples/crud-to-database.yaml): ten events per user over the create, update and
//! delete topics, produced in an order that interleaves the topics for every user and
//! shuffles the versions, written by the real worker binary in the example's batches of
//! 2000: 30,000 events to PostgreSQL, 10,000 to MongoDB (FerretDB is the server tested).
//! With the stale-write guard,
//! the table and the collection equal the state computed from the events (each user at
//! its newest version, a deleted user as a tombstone).

use crate::common;

use std::collections::BTreeMap;

use anyhow::Context;
use common::{DEADLINE, produce, start_documents, wait_committed_async, wait_until};
use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use weir_testkit::{FerretDbServer, TestDatabase, TestKafka};

const VERSIONS: i64 = 10;

/// email, name, version, deleted
type User = (Option<String>, Option<String>, i64, bool);
type State = BTreeMap<i64, User>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    MongoDb,
    Postgres,
}

/// The user's state after version `v`: (email, name, deleted).
fn state(user: i64, version: i64) -> (Option<String>, Option<String>, bool) {
    if version == VERSIONS && user % 3 == 0 {
        (None, None, true)
    } else {
        (
            Some(format!("user{user}@example.com")),
            Some(format!("User {user} v{version}")),
            false,
        )
    }
}

/// Every user's events: v1 a create, v2..v10 updates, and v10 a delete for every third
/// user; as (topic index 0/1/2, key, value).
fn events(users: i64) -> Vec<(usize, String, Value)> {
    let mut out = Vec::new();
    for user in 0..users {
        for version in 1..=VERSIONS {
            let (email, name, deleted) = state(user, version);
            let topic = match (version, deleted) {
                (1, _) => 0,
                (_, false) => 1,
                (_, true) => 2,
            };
            let value = if deleted {
                json!({"id": user, "version": version})
            } else {
                json!({"id": user, "version": version, "email": email, "name": name})
            };
            out.push((topic, user.to_string(), value));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn crud_topics_land_in_postgres_at_each_users_newest_version() -> anyhow::Result<()> {
    crud(Target::Postgres, 3_000, None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn crud_topics_land_in_mongodb_at_each_users_newest_version() -> anyhow::Result<()> {
    // 10,000 events: FerretDB, the server tested, applies about 400 guarded upserts a
    // second here (a MongoDB server is not in the reachable registries).
    crud(Target::MongoDb, 1_000, None).await
}

/// `max_records`: a batch size other than the example's 2000.
async fn crud(target: Target, users: i64, max_records: Option<u32>) -> anyhow::Result<()> {
    let kafka = tokio::task::spawn_blocking(TestKafka::shared).await??;
    let mut topics = Vec::new();
    for prefix in ["user-create", "user-update", "user-delete", "users-dlq"] {
        topics.push(kafka.create_topic(prefix, 3, &[]).await?);
    }
    let (mongo_url, mongo_db) = FerretDbServer::test_database().await?;
    let pg = TestDatabase::create().await?;
    sqlx::query("CREATE SCHEMA accounts")
        .execute(&pg.pool)
        .await?;
    sqlx::query(
        "CREATE TABLE accounts.users (id bigint PRIMARY KEY, email text, name text, version bigint, deleted boolean)",
    )
    .execute(&pg.pool)
    .await?;

    // The example as shipped, pointed at this test's topics and MongoDB database.
    let mut text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/crud-to-database.yaml"
    ))?;
    let names = [
        "user-create-queue",
        "user-update-queue",
        "user-delete-queue",
        "users-dlq",
    ];
    for (name, topic) in names.iter().zip(&topics) {
        text = text.replace(name, topic);
    }
    text = text.replace("database: accounts", &format!("database: {mongo_db}"));
    let documents: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(<Value as serde::Deserialize>::deserialize)
        .collect::<Result<_, _>>()?;
    let name = match target {
        Target::MongoDb => "users-to-mongodb",
        Target::Postgres => "users-to-postgres",
    };
    let mut doc = documents
        .iter()
        .find(|d| d["kind"] == "EventPipeline" && d["metadata"]["name"] == name)
        .cloned()
        .context("pipeline in the example")?;
    assert_eq!(
        doc["spec"]["batch"],
        json!({"maxRecords": 2000, "maxWait": "30s"})
    );

    if let Some(max) = max_records {
        doc["spec"]["batch"]["maxRecords"] = json!(max);
    }
    let batch = f64::from(max_records.unwrap_or(2000));

    // Shuffled: each topic holds a user's versions out of order, and the topics
    // interleave, so creates, updates and deletes of one user arrive in any order.
    let mut events = events(users);
    fastrand::Rng::with_seed(2).shuffle(&mut events);
    let mut per_topic = Vec::new();
    for (i, topic) in topics.iter().take(3).enumerate() {
        let records: Vec<(String, Vec<u8>)> = events
            .iter()
            .filter(|(t, _, _)| *t == i)
            .map(|(_, key, value)| Ok((key.clone(), serde_json::to_vec(value)?)))
            .collect::<anyhow::Result<_>>()?;
        produce(&kafka, topic, &records).await?;
        per_topic.push(records.len() as i64);
    }

    let dir = tempfile::tempdir()?;
    let env = [
        ("WEIR_SECRET_USERS_MONGODB_URL", mongo_url.as_str()),
        ("WEIR_SECRET_USERS_POSTGRES_URL", pg.url.as_str()),
    ];
    let mut worker = start_documents(dir.path(), &kafka, &[&doc], &env, &["--namespace", "test"])?;
    for (topic, total) in topics.iter().zip(&per_topic) {
        wait_committed_async(&kafka, &format!("test.{name}"), topic, *total)
            .await
            .with_context(|| worker.log_text())?;
    }

    // The state the events compute: each user at version 10.
    let expected: State = (0..users)
        .map(|user| {
            let (email, name, deleted) = state(user, VERSIONS);
            (user, (email, name, VERSIONS, deleted))
        })
        .collect();
    let stored = match target {
        Target::MongoDb => mongodb_state(&mongo_url, &mongo_db).await?,
        Target::Postgres => postgres_state(&pg.pool).await?,
    };
    assert_eq!(stored.len(), expected.len());
    assert!(
        stored == expected,
        "{name}: the stored state differs from the events'"
    );

    let labels = format!("pipeline=\"{name}\"");
    let sample = |metric: &str, labels: &str| {
        wait_until(&format!("{metric} of {name}"), DEADLINE, || {
            Ok(worker.sample(metric, labels))
        })
    };
    // Every batch was full: the records were waiting when the worker started.
    let batches = sample("weir_batch_records_count", &labels)?;
    let records = sample("weir_batch_records_sum", &labels)?;
    let below = if batch >= 2000.0 { "1000" } else { "50" };
    let small = sample(
        "weir_batch_records_bucket",
        &format!("{labels},le=\"{below}\""),
    )?;
    let total = (users * VERSIONS) as f64;
    assert_eq!(records, total, "{name}");
    assert_eq!(
        (batches, small),
        (total / batch, 0.0),
        "{name}: batches of {batch}"
    );
    // Stale versions were held back by the guard, and counted.
    let skipped = worker.metric("weir_records_skipped_total").unwrap_or(0);
    assert!(skipped > 0, "{name}: no write held back");
    worker.stop()?;
    Ok(())
}

async fn mongodb_state(url: &str, database: &str) -> anyhow::Result<State> {
    let client = mongodb::Client::with_uri_str(url).await?;
    let stored: Vec<Document> = client
        .database(database)
        .collection::<Document>("users")
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    stored
        .iter()
        .map(|d| {
            let int = |f: &str| d.get_i64(f).or_else(|_| d.get_i32(f).map(i64::from));
            Ok((
                int("_id")?,
                (
                    d.get_str("email").ok().map(str::to_owned),
                    d.get_str("name").ok().map(str::to_owned),
                    int("version")?,
                    d.get_bool("deleted")?,
                ),
            ))
        })
        .collect()
}

async fn postgres_state(pool: &sqlx::PgPool) -> anyhow::Result<State> {
    type Row = (i64, Option<String>, Option<String>, i64, bool);
    let rows: Vec<Row> =
        sqlx::query_as("SELECT id, email, name, version, deleted FROM accounts.users")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, email, name, version, deleted)| (id, (email, name, version, deleted)))
        .collect())
}
