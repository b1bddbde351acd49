//! Exactly-once benchmark (prints its figures; not a test). Run:
//! `cargo bench -p weir-worker --bench exactly_once`.
//!
//! One stream of JSON events (~200 B, over 50,000 keys) is produced once to a real Kafka
//! broker; the real `weir-worker` binary then reads all of it several times, each run in its
//! own consumer group, in the same run and on the same data:
//! - PostgreSQL: exactly-once upsert (offsets in the same transaction as the rows) against
//!   the at-least-once upsert path (the group's commit), measured before and after it;
//! - Kafka→Kafka: exactly-once (a transaction per batch with the consumed offsets) against
//!   at-least-once produce of the same stream, measured before and after it.
//!
//! Figures are steady-state events/s, from the first written batch to the last (the
//! worker's log timestamps), so process start and group join do not count. Override the
//! size with WEIR_BENCH_EVENTS.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use weir_testkit::{KafkaServer, PostgresServer, TestKafka, free_port};

mod support;
use support::env_usize;

const KEYS: usize = 50_000;

fn event(key: usize, version: usize) -> Vec<u8> {
    format!(
        "{{\"id\":{key},\"version\":{version},\"name\":\"customer-{key:08}\",\"email\":\"customer{key}@example.com\",\"amount\":{}.{:02},\"status\":\"active\",\"note\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}}",
        key % 1000,
        version * 7 % 100,
    )
    .into_bytes()
}

async fn produce_all(kafka: &TestKafka, topic: &str, events: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka
        .config()
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut pending = Vec::with_capacity(events);
    for i in 0..events {
        let (key, version) = (i % KEYS, i / KEYS);
        let k = key.to_string();
        let v = event(key, version);
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(&k).payload(&v))
                .map_err(|(e, _)| e)?,
        );
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// A sink and its delivery, as pipeline YAML.
fn postgres_sink(table: &str) -> String {
    format!(
        "    - postgres:
        urlFrom: {{env: BENCH_DB_URL}}
        table: {table}
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
    )
}

fn kafka_sink(topic: &str) -> String {
    format!("    - kafka: {{topic: {topic}}}\n")
}

/// One run: its pipeline's name (and group), sink, delivery and batch size.
struct Run<'a> {
    name: &'a str,
    sink: &'a str,
    delivery: &'a str,
    max_records: usize,
}

/// Runs the worker over the whole topic in a new group; steady-state events/s.
async fn run_worker(
    kafka: &TestKafka,
    topic: &str,
    db_url: &str,
    run: Run<'_>,
    events: usize,
) -> anyhow::Result<f64> {
    let Run {
        name,
        sink,
        delivery,
        max_records,
    } = run;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: {name}, namespace: bench}}
spec:
  source: {{topics: [{topic}]}}
  delivery: {delivery}
  batch: {{maxRecords: {max_records}}}
  sinks:
{sink}"
        ),
    )?;
    let log_path = dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path)?;
    let port = free_port("worker")?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir-worker"))
        .args(["run", "-f"])
        .arg(&file)
        .args(["--bootstrap-servers", kafka.bootstrap()])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--log-format", "text"])
        .env("RUST_LOG", "warn,weir_worker::engine=debug")
        .env("BENCH_DB_URL", db_url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    support::wait_committed(
        kafka,
        &format!("bench.{name}"),
        topic,
        events,
        &mut child,
        &log_path,
        Duration::from_secs(600),
    )
    .await?;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait()?;
    let text = std::fs::read_to_string(&log_path)?;
    let stamps: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("batch written"))
        .filter_map(|l| {
            let t = l.split_whitespace().next()?;
            humantime::parse_rfc3339(t)
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs_f64())
        })
        .collect();
    match (stamps.first(), stamps.last()) {
        (Some(a), Some(b)) if b > a => Ok(events as f64 / (b - a)),
        _ => anyhow::bail!(
            "no batch timings in the worker log:\n{}",
            text.lines().take(20).collect::<Vec<_>>().join("\n")
        ),
    }
}

async fn create_table(pool: &PgPool, table: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, version integer NOT NULL, name text, email text, amount numeric, status text)"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let events = env_usize("WEIR_BENCH_EVENTS", 300_000);
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
        let pg = tokio::task::spawn_blocking(PostgresServer::start).await??;
        let db = pg.create_database().await?;
        for table in ["alo_before", "eo", "alo_after"] {
            create_table(&db.pool, table).await?;
        }
        let topic = kafka.create_topic("eo-bench", 6, &[]).await?;
        let mut outputs = Vec::new();
        for name in ["k-alo-before", "k-eo", "k-alo-after", "k-alo-5000", "k-eo-5000"] {
            outputs.push(kafka.create_topic(name, 6, &[]).await?);
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "weir-worker exactly-once: {events} events (~200 B JSON), {KEYS} keys, 6 partitions")?;
        let started = Instant::now();
        produce_all(&kafka, &topic, events).await?;
        writeln!(out, "  produced in {:.1} s", started.elapsed().as_secs_f64())?;

        let run = |name: &'static str, sink: String, delivery: &'static str, max_records: usize| {
            let (kafka, topic, url) = (kafka.clone(), topic.clone(), db.url.clone());
            async move {
                let run = Run { name, sink: &sink, delivery, max_records };
                run_worker(&kafka, &topic, &url, run, events).await
            }
        };
        let alo_before = run("pg-alo-before", postgres_sink("alo_before"), "AtLeastOnce", 1000).await?;
        let eo = run("pg-eo", postgres_sink("eo"), "ExactlyOnce", 1000).await?;
        let alo_after = run("pg-alo-after", postgres_sink("alo_after"), "AtLeastOnce", 1000).await?;
        let alo = (alo_before + alo_after) / 2.0;
        let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM eo").fetch_one(&db.pool).await?;
        writeln!(out, "  PostgreSQL upsert, at-least-once: {alo:>9.0} events/s  ({alo_before:.0} before, {alo_after:.0} after)")?;
        writeln!(out, "  PostgreSQL upsert, exactly-once:  {eo:>9.0} events/s  ({rows} rows)")?;
        writeln!(out, "  exactly-once / at-least-once = {:.0} %   (target >= 90 %)", 100.0 * eo / alo)?;

        let k_before = run("k-alo-before", kafka_sink(&outputs[0]), "AtLeastOnce", 1000).await?;
        let k_eo = run("k-eo", kafka_sink(&outputs[1]), "ExactlyOnce", 1000).await?;
        let k_after = run("k-alo-after", kafka_sink(&outputs[2]), "AtLeastOnce", 1000).await?;
        let k_alo = (k_before + k_after) / 2.0;
        writeln!(out, "  Kafka→Kafka, at-least-once:       {k_alo:>9.0} events/s  ({k_before:.0} before, {k_after:.0} after; batches of 1000)")?;
        writeln!(out, "  Kafka→Kafka, exactly-once:        {k_eo:>9.0} events/s  (one transaction per batch of 1000)")?;
        writeln!(out, "  exactly-once / at-least-once = {:.0} %", 100.0 * k_eo / k_alo)?;
        // A transaction costs a few round trips whatever its size: larger batches spread it.
        let k_alo_big = run("k-alo-5000", kafka_sink(&outputs[3]), "AtLeastOnce", 5000).await?;
        let k_eo_big = run("k-eo-5000", kafka_sink(&outputs[4]), "ExactlyOnce", 5000).await?;
        writeln!(out, "  batches of 5000: at-least-once {k_alo_big:.0}, exactly-once {k_eo_big:.0} events/s = {:.0} %", 100.0 * k_eo_big / k_alo_big)?;
        anyhow::ensure!(rows == KEYS.min(events) as i64, "the exactly-once table holds {rows} rows");
        anyhow::Ok(())
    })
}
