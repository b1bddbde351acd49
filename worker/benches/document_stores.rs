//! MySQL and MongoDB sink benchmark (prints its figures; not a test). Run:
//! `cargo bench -p weir-worker --bench document_stores`.
//!
//! The throughput benchmark's stream (JSON events of about 200 bytes, each key updated
//! several times, spread over the stream) is produced to a real Kafka broker, then the real
//! `weir-worker` binary upserts it into
//! - MySQL (MariaDB from Debian's packages), against the ceiling of the same rows upserted
//!   with one multi-row `INSERT … ON DUPLICATE KEY UPDATE` per 1000 rows straight from
//!   memory through the same driver (sqlx), no Kafka;
//! - MongoDB (FerretDB 1.24 on PostgreSQL: MongoDB's own server is in no reachable
//!   registry), against the same documents upserted from memory with the official driver
//!   as ordered bulk writes of 1000 (`update` commands of 1000 upsert statements, what a
//!   driver's bulk write sends to servers before 8.0, which lack `bulkWrite`).
//!
//! Each ceiling is measured right before and right after its worker run, and the worker is
//! compared with their mean. Sizes: WEIR_BENCH_MYSQL_EVENTS / _KEYS (default 200,000 over
//! 20,000), WEIR_BENCH_MONGODB_EVENTS / _KEYS (default 20,000 over 4,000).

use std::io::Write as _;
use std::time::Instant;

use mongodb::bson::{Bson, Document, doc};
use serde_json::Value;
use weir_testkit::{FerretDbServer, KafkaServer, TestKafka, TestMySqlDatabase};

mod support;
use support::{env_usize, produce_all, stream_values};

const MYSQL_COLUMNS: &str = "id, version, name, email, amount, status";

async fn mysql_table(pool: &sqlx::MySqlPool, table: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, version INT NOT NULL, name TEXT, email TEXT, amount DECIMAL(12,2), status TEXT)"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// The same rows, 1000 per multi-row upsert, from memory; rows per second.
async fn mysql_ceiling(pool: &sqlx::MySqlPool, rows: &[Value]) -> anyhow::Result<f64> {
    sqlx::query("TRUNCATE ceiling").execute(pool).await?;
    let started = Instant::now();
    for chunk in rows.chunks(1000) {
        let mut sql = format!("INSERT INTO ceiling ({MYSQL_COLUMNS}) VALUES ");
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 {
                "(?, ?, ?, ?, ?, ?)"
            } else {
                ", (?, ?, ?, ?, ?, ?)"
            });
        }
        sql.push_str(
            " ON DUPLICATE KEY UPDATE version = VALUES(version), name = VALUES(name), email = VALUES(email), amount = VALUES(amount), status = VALUES(status)",
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for value in chunk {
            query = query
                .bind(value["id"].as_i64())
                .bind(value["version"].as_i64())
                .bind(value["name"].as_str().map(str::to_owned))
                .bind(value["email"].as_str().map(str::to_owned))
                .bind(value["amount"].to_string())
                .bind(value["status"].as_str().map(str::to_owned));
        }
        query.execute(pool).await?;
    }
    Ok(rows.len() as f64 / started.elapsed().as_secs_f64())
}

fn document(value: &Value) -> Document {
    doc! {
        "_id": value["id"].as_i64(),
        "version": value["version"].as_i64(),
        "name": value["name"].as_str(),
        "email": value["email"].as_str(),
        "amount": value["amount"].as_f64(),
        "status": value["status"].as_str(),
    }
}

/// The same documents as ordered `update` commands of 1000 upserts, from memory;
/// documents per second.
async fn mongodb_ceiling(database: &mongodb::Database, rows: &[Value]) -> anyhow::Result<f64> {
    database.collection::<Document>("ceiling").drop().await?;
    let documents: Vec<Document> = rows.iter().map(document).collect();
    let started = Instant::now();
    for chunk in documents.chunks(1000) {
        let updates: Vec<Bson> = chunk
            .iter()
            .map(|d| {
                let mut set = d.clone();
                let id = set.remove("_id").unwrap_or(Bson::Null);
                Bson::Document(
                    doc! {"q": {"_id": id}, "u": {"$set": set}, "upsert": true, "multi": true},
                )
            })
            .collect();
        let reply = database
            .run_command(doc! {"update": "ceiling", "updates": updates, "ordered": true})
            .await?;
        anyhow::ensure!(
            reply.get_array("writeErrors").is_err(),
            "ceiling refused: {reply}"
        );
    }
    Ok(rows.len() as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let mysql_events = env_usize("WEIR_BENCH_MYSQL_EVENTS", 200_000);
    let mysql_keys = env_usize("WEIR_BENCH_MYSQL_KEYS", 20_000);
    let mongo_events = env_usize("WEIR_BENCH_MONGODB_EVENTS", 20_000);
    let mongo_keys = env_usize("WEIR_BENCH_MONGODB_KEYS", 4_000);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let _broker = if std::env::var(weir_testkit::env::KAFKA_BOOTSTRAP).is_err() {
            let server = tokio::task::spawn_blocking(KafkaServer::start).await??;
            let bootstrap = server.bootstrap().to_owned();
            Some((server, bootstrap))
        } else {
            None
        };
        let kafka = match &_broker {
            Some((_, bootstrap)) => TestKafka::at(bootstrap),
            None => tokio::task::spawn_blocking(TestKafka::shared).await??,
        };
        let mut out = std::io::stdout().lock();

        // MySQL
        let db = TestMySqlDatabase::create().await?;
        for table in ["items", "ceiling"] {
            mysql_table(&db.pool, table).await?;
        }
        let topic = kafka.create_topic("bench-mysql", 6, &[]).await?;
        writeln!(out, "MySQL sink (MariaDB): {mysql_events} events (~200 B JSON), {mysql_keys} keys, upsert")?;
        produce_all(&kafka, &topic, mysql_events, mysql_keys).await?;
        // So the first worker's start does not include the broker creating its offsets topic.
        support::warm_group_coordinator(&kafka, &topic).await?;
        let rows = stream_values(mysql_events, mysql_keys)?;
        let before = mysql_ceiling(&db.pool, &rows).await?;
        let pipeline = format!(
            "apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: bench, namespace: bench}}
spec:
  source: {{topics: [{topic}]}}
  sinks:
    - mysql:
        urlFrom: {{env: BENCH_DB_URL}}
        table: items
        mode: Upsert
        keyColumns: [id]
        columns:
          - {{name: id, type: bigint}}
          - {{name: version, type: integer}}
          - {{name: name, type: text}}
          - {{name: email, type: text}}
          - {{name: amount, type: numeric}}
          - {{name: status, type: text}}
"
        );
        let run = support::run_worker(&kafka, &topic, "bench.bench", &pipeline, &[("BENCH_DB_URL", &db.url)], mysql_events).await?;
        let after = mysql_ceiling(&db.pool, &rows).await?;
        let last = (mysql_events.div_ceil(mysql_keys) - 1) as i64;
        let (count, latest): (i64, i64) = sqlx::query_as("SELECT COUNT(*), CAST(COALESCE(SUM(version = ?), 0) AS SIGNED) FROM items")
            .bind(last)
            .fetch_one(&db.pool)
            .await?;
        let mysql_ok = count == mysql_keys.min(mysql_events) as i64 && latest == count;
        let ceiling = (before + after) / 2.0;
        writeln!(out, "  weir-worker:     {:>8.0} events/s steady state ({:.0} from process start, {:.1} s); {} batches, p50 {:.1} ms, p99 {:.1} ms; peak RSS {:.1} MiB; CPU {:.1} s", run.steady, run.rate, run.seconds, run.batches, run.p50_ms, run.p99_ms, run.peak_rss_mib, run.cpu_seconds)?;
        writeln!(out, "  mysql ceiling:   {ceiling:>8.0} rows/s   (1000-row INSERT … ON DUPLICATE KEY UPDATE from memory, same driver; {before:.0} before, {after:.0} after)")?;
        writeln!(out, "  weir / ceiling = {:.0} %  (target >= 80 %)", 100.0 * run.steady / ceiling)?;
        writeln!(out, "  check: {count} rows, {latest} at their key's latest version -> {}", if mysql_ok { "OK" } else { "WRONG" })?;

        // MongoDB
        let (url, name) = FerretDbServer::test_database().await?;
        let client = mongodb::Client::with_uri_str(&url).await?;
        let database = client.database(&name);
        let topic = kafka.create_topic("bench-mongodb", 6, &[]).await?;
        writeln!(out, "MongoDB sink (FerretDB 1.24 on PostgreSQL): {mongo_events} events, {mongo_keys} keys, upsert ($set by _id)")?;
        produce_all(&kafka, &topic, mongo_events, mongo_keys).await?;
        let rows = stream_values(mongo_events, mongo_keys)?;
        let before = mongodb_ceiling(&database, &rows).await?;
        let pipeline = format!(
            "apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: bench, namespace: bench}}
spec:
  source: {{topics: [{topic}]}}
  sinks:
    - mongodb:
        urlFrom: {{env: BENCH_MONGODB_URL}}
        database: {name}
        collection: items
        mode: Upsert
        upsert: Set
        document:
          _id: event.id
          version: event.version
          name: event.name
          email: event.email
          amount: event.amount
          status: event.status
"
        );
        let run = support::run_worker(&kafka, &topic, "bench.bench", &pipeline, &[("BENCH_MONGODB_URL", &url)], mongo_events).await?;
        let after = mongodb_ceiling(&database, &rows).await?;
        let items = database.collection::<Document>("items");
        let count = items.count_documents(doc! {}).await?;
        let last = (mongo_events.div_ceil(mongo_keys) - 1) as i64;
        let latest = items.count_documents(doc! {"version": last}).await?;
        let mongo_ok = count == mongo_keys.min(mongo_events) as u64 && latest == count;
        let ceiling = (before + after) / 2.0;
        writeln!(out, "  weir-worker:     {:>8.0} events/s steady state ({:.0} from process start, {:.1} s); {} batches, p50 {:.1} ms, p99 {:.1} ms; peak RSS {:.1} MiB; CPU {:.1} s", run.steady, run.rate, run.seconds, run.batches, run.p50_ms, run.p99_ms, run.peak_rss_mib, run.cpu_seconds)?;
        writeln!(out, "  bulk-write ceiling: {ceiling:>5.0} docs/s   (ordered update commands of 1000 upserts from memory, same driver; {before:.0} before, {after:.0} after)")?;
        writeln!(out, "  weir / ceiling = {:.0} %  (target >= 80 %)", 100.0 * run.steady / ceiling)?;
        writeln!(out, "  check: {count} documents, {latest} at their key's latest version -> {}", if mongo_ok { "OK" } else { "WRONG" })?;
        anyhow::ensure!(mysql_ok, "the MySQL table does not hold every key's latest version");
        anyhow::ensure!(mongo_ok, "the collection does not hold every key's latest version");
        anyhow::Ok(())
    })
}
