//! A replay carried out in the sinks (`--replay-token`, which the operator sets once it has
//! reset the group for `spec.replay`): the first worker to start with a token records it in
//! the sink's database in the same transaction as it forgets the pipeline's idempotency
//! keys and kept offsets and (with `--replay-truncate`) empties the table; a later start or
//! a second worker starting at the same moment does nothing. The real binary, the real
//! broker, a real PostgreSQL and a real MariaDB; the group is reset as the operator does it,
//! by committing offsets while it has no members.

use crate::common;

use std::path::Path;

use anyhow::Context as _;
use common::{
    DEADLINE, Worker, kafka, pipeline, produce, start_with_args, wait_committed, wait_until,
};
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use weir_testkit::{TestDatabase, TestKafka, TestMySqlDatabase, unique_name};

/// A database of either kind, asked the same questions.
enum Database {
    Postgres(TestDatabase),
    MariaDb(TestMySqlDatabase),
    /// A file in the test's directory, and its URL.
    Sqlite(sqlx::SqlitePool, String),
}

impl Database {
    async fn postgres() -> anyhow::Result<Database> {
        Ok(Database::Postgres(TestDatabase::create().await?))
    }

    async fn mariadb() -> anyhow::Result<Database> {
        Ok(Database::MariaDb(TestMySqlDatabase::create().await?))
    }

    async fn sqlite(dir: &Path) -> anyhow::Result<Database> {
        let url = format!("sqlite://{}", dir.join("sink.db").display());
        let pool = sqlx::SqlitePool::connect(&format!("{url}?mode=rwc")).await?;
        Ok(Database::Sqlite(pool, url))
    }

    fn kind(&self) -> &'static str {
        match self {
            Database::Postgres(_) => "postgres",
            Database::MariaDb(_) => "mysql",
            Database::Sqlite(..) => "sqlite",
        }
    }

    fn url(&self) -> &str {
        match self {
            Database::Postgres(db) => &db.url,
            Database::MariaDb(db) => &db.url,
            Database::Sqlite(_, url) => url,
        }
    }

    async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Database::Postgres(db) => {
                sqlx::query(sql).execute(&db.pool).await?;
            }
            Database::MariaDb(db) => {
                sqlx::query(sql).execute(&db.pool).await?;
            }
            Database::Sqlite(pool, _) => {
                sqlx::query(sql).execute(pool).await?;
            }
        }
        Ok(())
    }

    async fn count(&self, sql: &str) -> anyhow::Result<i64> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        Ok(match self {
            Database::Postgres(db) => {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&db.pool)
                    .await?
            }
            Database::MariaDb(db) => {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(&db.pool)
                    .await?
            }
            Database::Sqlite(pool, _) => sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await?,
        })
    }

    /// Waits until `sql` counts `n`.
    async fn wait_count(&self, sql: &str, n: i64, log: impl Fn() -> String) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            let got = self.count(sql).await?;
            if got == n {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < DEADLINE,
                "{sql}: {got}, not {n}, within {DEADLINE:?}\n{}",
                log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Moves `group`'s committed offsets on every partition of `topic` to 0, as the operator's
/// replay to Earliest does once the group has no members.
fn reset_to_earliest(
    kafka: &TestKafka,
    group: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let consumer = kafka.consumer(group)?;
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, Offset::Offset(0))?;
    }
    consumer.commit(&list, CommitMode::Sync)?;
    Ok(())
}

/// Todo events `{"id": n, "title": …}`, keyed `n % 13`.
fn todos(n: i64) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|id| {
            (
                (id % 13).to_string(),
                format!("{{\"id\": {id}, \"title\": \"todo {id}\"}}").into_bytes(),
            )
        })
        .collect()
}

/// An upsert of each event by id, with idempotency keys (so a replay that did not forget
/// them would skip every replayed event as applied).
fn upsert_pipeline(db: &Database, name: &str, topic: &str, group: &str) -> Value {
    pipeline(
        name,
        json!({
            "source": {"topics": [topic], "consumerGroup": group},
            "sinks": [{db.kind(): {"urlFrom": {"env": "DB"}, "table": "todos", "mode": "Upsert",
                "keyColumns": ["id"],
                "columns": [{"name": "id", "type": "bigint"}, {"name": "title", "type": "text"}]}}],
            "idempotency": {"key": "event.id", "window": "1h"},
            "batch": {"maxRecords": 50, "maxWait": "20ms"},
            "retry": {"initialBackoff": "100ms", "maxBackoff": "1s"},
        }),
    )
}

fn start(
    dir: &Path,
    kafka: &TestKafka,
    db: &Database,
    pipeline: &Value,
    replay: &[&str],
) -> anyhow::Result<Worker> {
    start_with_args(dir, kafka, pipeline, &[("DB", db.url())], replay)
}

/// The lines of the log that say what the replay did.
fn replay_lines(log: &str) -> (usize, usize) {
    (
        log.matches("replay carried out").count(),
        log.matches("replay already carried out").count(),
    )
}

async fn truncates_once_per_token(db: Database, dir: tempfile::TempDir) -> anyhow::Result<()> {
    const N: i64 = 120;
    let kafka = kafka().await?;
    let topic = kafka.create_topic("todo-events", 3, &[]).await?;
    let group = unique_name("projection");
    db.execute("CREATE TABLE todos (id bigint PRIMARY KEY, title text NOT NULL)")
        .await?;
    let spec = upsert_pipeline(&db, "todo-projection", &topic, &group);
    produce(&kafka, &topic, &todos(N)).await?;

    // Built once.
    let mut worker = start(dir.path(), &kafka, &db, &spec, &[])?;
    wait_committed(&kafka, &group, &topic, N, Some(&worker))?;
    worker.stop()?;
    let built = db.count("SELECT count(*) FROM todos").await?;
    assert_eq!(built, N);

    // A row no event writes: gone only if the table is truncated.
    let marker = "SELECT count(*) FROM todos WHERE id = -1";
    db.execute("INSERT INTO todos VALUES (-1, 'written by hand')")
        .await?;
    reset_to_earliest(&kafka, &group, &topic, 3)?;
    let mut worker = start(
        dir.path(),
        &kafka,
        &db,
        &spec,
        &["--replay-token", "rebuild-1", "--replay-truncate"],
    )?;
    wait_committed(&kafka, &group, &topic, N, Some(&worker))?;
    db.wait_count("SELECT count(*) FROM todos", N, || worker.log_text())
        .await?;
    assert_eq!(db.count(marker).await?, 0, "{}", worker.log_text());
    assert_eq!(
        worker.metric("weir_replays_applied_total"),
        Some(1),
        "{}",
        worker.log_text()
    );
    worker.stop()?;
    assert_eq!(replay_lines(&worker.log_text()), (1, 0));

    // The same token again (a restarted pod): nothing is truncated, the keys recorded by
    // the replay skip every event read again.
    db.execute("INSERT INTO todos VALUES (-1, 'written by hand')")
        .await?;
    reset_to_earliest(&kafka, &group, &topic, 3)?;
    let mut worker = start(
        dir.path(),
        &kafka,
        &db,
        &spec,
        &["--replay-token", "rebuild-1", "--replay-truncate"],
    )?;
    wait_committed(&kafka, &group, &topic, N, Some(&worker))?;
    assert_eq!(db.count(marker).await?, 1, "{}", worker.log_text());
    assert_eq!(worker.metric("weir_replays_applied_total"), Some(0));
    worker.stop()?;
    assert_eq!(replay_lines(&worker.log_text()), (0, 1));

    if matches!(db, Database::Sqlite(..)) {
        // One writer only (maxReplicas: 1): no second worker.
        return Ok(());
    }
    // Two workers starting at once with a new token: one truncates, the other waits for
    // its transaction and skips.
    reset_to_earliest(&kafka, &group, &topic, 3)?;
    let args = ["--replay-token", "rebuild-2", "--replay-truncate"];
    let mut first = start(dir.path(), &kafka, &db, &spec, &args)?;
    let mut second = start(dir.path(), &kafka, &db, &spec, &args)?;
    wait_until("both workers past the replay", DEADLINE, || {
        let (a, b) = (
            replay_lines(&first.log_text()),
            replay_lines(&second.log_text()),
        );
        Ok((a.0 + a.1 == 1 && b.0 + b.1 == 1).then_some(()))
    })
    .with_context(|| format!("{}\n---\n{}", first.log_text(), second.log_text()))?;
    wait_committed(&kafka, &group, &topic, N, Some(&first))?;
    db.wait_count("SELECT count(*) FROM todos", N, || first.log_text())
        .await?;
    first.stop()?;
    second.stop()?;
    let (a, b) = (
        replay_lines(&first.log_text()),
        replay_lines(&second.log_text()),
    );
    assert_eq!(
        (a.0 + b.0, a.1 + b.1),
        (1, 1),
        "one carried it out, one skipped"
    );
    assert_eq!(db.count(marker).await?, 0);
    assert_eq!(db.count("SELECT count(*) FROM weir_replays").await?, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_replay_token_truncates_once_however_many_workers_start_with_it()
-> anyhow::Result<()> {
    truncates_once_per_token(Database::postgres().await?, tempfile::tempdir()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_a_replay_token_truncates_once_however_many_workers_start_with_it()
-> anyhow::Result<()> {
    truncates_once_per_token(Database::mariadb().await?, tempfile::tempdir()?).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_a_replay_token_truncates_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    truncates_once_per_token(Database::sqlite(dir.path()).await?, dir).await
}

/// Exactly-once keeps the offsets with the rows and resumes from them, not from the group:
/// the replay forgets them, so every event is written again from the reset position.
async fn exactly_once_replay_rewrites_every_event(
    db: Database,
    truncate: bool,
) -> anyhow::Result<()> {
    const N: i64 = 300;
    let kafka = kafka().await?;
    let dir = tempfile::tempdir()?;
    let topic = kafka.create_topic("events", 3, &[]).await?;
    let group = unique_name("eo");
    db.execute("CREATE TABLE events (id bigint NOT NULL, src_partition integer NOT NULL, src_offset bigint NOT NULL)")
        .await?;
    let spec = pipeline(
        "events",
        json!({
            "source": {"topics": [topic], "consumerGroup": group},
            "transform": {"set": {"srcPartition": "partition", "srcOffset": "offset"}},
            "sinks": [{db.kind(): {"urlFrom": {"env": "DB"}, "table": "events", "columns": [
                {"name": "id", "type": "bigint"},
                {"name": "src_partition", "from": "event.srcPartition", "type": "integer"},
                {"name": "src_offset", "from": "event.srcOffset", "type": "bigint"},
            ]}}],
            "delivery": "ExactlyOnce",
            "batch": {"maxRecords": 40, "maxWait": "20ms"},
            "retry": {"initialBackoff": "100ms", "maxBackoff": "1s"},
        }),
    );
    produce(&kafka, &topic, &todos(N)).await?;
    let mut worker = start(dir.path(), &kafka, &db, &spec, &[])?;
    db.wait_count("SELECT count(*) FROM events", N, || worker.log_text())
        .await?;
    wait_committed(&kafka, &group, &topic, N, Some(&worker))?;
    worker.stop()?;

    reset_to_earliest(&kafka, &group, &topic, 3)?;
    let mut args = vec!["--replay-token", "again"];
    if truncate {
        args.push("--replay-truncate");
    }
    let mut worker = start(dir.path(), &kafka, &db, &spec, &args)?;
    let expected = if truncate { N } else { 2 * N };
    wait_committed(&kafka, &group, &topic, N, Some(&worker))?;
    db.wait_count("SELECT count(*) FROM events", expected, || {
        worker.log_text()
    })
    .await?;
    worker.stop()?;
    // Each source position written once per pass: once with truncation, twice without.
    let per_pass = if truncate { 1 } else { 2 };
    let positions = db
        .count(&format!(
            "SELECT count(*) FROM (SELECT src_partition, src_offset FROM events GROUP BY src_partition, src_offset HAVING count(*) = {per_pass}) AS p"
        ))
        .await?;
    assert_eq!(positions, N, "{}", worker.log_text());
    let log = worker.log_text();
    assert_eq!(replay_lines(&log), (1, 0), "{log}");
    assert!(
        log.contains("no offset stored with the data yet: resuming from the group's"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_exactly_once_replayed_to_earliest_writes_every_event_again() -> anyhow::Result<()>
{
    exactly_once_replay_rewrites_every_event(Database::postgres().await?, false).await
}

#[tokio::test(flavor = "multi_thread")]
async fn mariadb_exactly_once_replayed_to_earliest_with_truncate_writes_every_event_once()
-> anyhow::Result<()> {
    exactly_once_replay_rewrites_every_event(Database::mariadb().await?, true).await
}

/// `--replay-truncate` with a sink that cannot be emptied is refused before anything runs
/// (exit code 2, naming the sink), as `validate()` refuses `spec.replay.truncateSinks`.
#[tokio::test(flavor = "multi_thread")]
async fn truncating_an_http_sink_on_replay_is_refused_at_start() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let dir = tempfile::tempdir()?;
    let spec = pipeline(
        "notify",
        json!({
            "source": {"topics": ["todo-events"]},
            "sinks": [{"http": {"url": "http://127.0.0.1:9/"}}],
        }),
    );
    let mut worker = start_with_args(
        dir.path(),
        &kafka,
        &spec,
        &[],
        &["--replay-token", "t1", "--replay-truncate"],
    )?;
    let status = worker.wait(DEADLINE)?;
    let log = worker.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("the http sink spec.sinks[0] cannot be truncated"),
        "{log}"
    );
    // Without truncation the same replay starts (an http sink keeps nothing to forget).
    let mut worker = start_with_args(dir.path(), &kafka, &spec, &[], &["--replay-token", "t1"])?;
    wait_until("the worker consuming", DEADLINE, || {
        Ok(worker.log_text().contains("consuming").then_some(()))
    })
    .with_context(|| worker.log_text())?;
    assert!(worker.is_running(), "{}", worker.log_text());
    Ok(())
}
