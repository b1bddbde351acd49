//! Throughput benchmark (prints its figures; not a test). Run: `cargo bench -p weir-worker`.
//!
//! 1,000,000 JSON events of about 200 bytes over 100,000 keys (each key updated ten times,
//! spread over the stream) are produced to a real Kafka broker, then the real `weir-worker`
//! binary upserts them into PostgreSQL. In the same run, two references:
//! (a) the per-record consumer hand-written consumers use (one INSERT … ON CONFLICT per
//!     event in autocommit, offset committed per event) on a 20,000-event sample;
//! (b) PostgreSQL's own ceiling: the same rows upserted with one multi-row statement per
//!     1000 rows straight from memory through the same driver, no Kafka.
//! Override sizes with WEIR_BENCH_EVENTS, WEIR_BENCH_KEYS, WEIR_BENCH_SAMPLE.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use weir_testkit::{KafkaServer, PostgresServer, TestKafka, free_port, unique_name};

mod support;
use support::{env_usize, peak_rss_mib};

/// The event stream: pass v over all keys (in a shuffled order), ten passes.
fn event(key: usize, version: usize) -> Vec<u8> {
    format!(
        "{{\"id\":{key},\"version\":{version},\"name\":\"customer-{key:08}\",\"email\":\"customer{key}@example.com\",\"amount\":{}.{:02},\"status\":\"active\",\"updatedAt\":\"2026-11-23T10:{:02}:{:02}Z\",\"note\":\"xxxxxxxxxxxxxxxxxxxx\"}}",
        key % 1000,
        version * 7 % 100,
        version % 60,
        key % 60
    )
    .into_bytes()
}

fn order(keys: usize, seed: u64) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut keys: Vec<usize> = (0..keys).collect();
    rng.shuffle(&mut keys);
    keys
}

async fn produce_all(
    kafka: &TestKafka,
    topic: &str,
    events: usize,
    keys: usize,
) -> anyhow::Result<Duration> {
    let producer: FutureProducer = kafka
        .config()
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let started = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    let passes = events.div_ceil(keys);
    let mut sent = 0;
    'outer: for version in 0..passes {
        for key in order(keys, version as u64) {
            if sent == events {
                break 'outer;
            }
            let k = key.to_string();
            let v = event(key, version);
            let delivery = producer
                .send_result(FutureRecord::to(topic).key(&k).payload(&v))
                .map_err(|(e, _)| e)?;
            pending.push(delivery);
            sent += 1;
            if pending.len() >= 50_000 {
                while pending.len() > 10_000 {
                    if let Some(d) = pending.next().await {
                        d?.map_err(|(e, _)| e)?;
                    }
                }
            }
        }
    }
    while let Some(d) = pending.next().await {
        d?.map_err(|(e, _)| e)?;
    }
    Ok(started.elapsed())
}

async fn create_table(pool: &PgPool, table: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, version integer NOT NULL, name text, email text, amount numeric, status text, updated_at timestamptz)"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Clock ticks: 100 per second on Linux.
    Some((utime + stime) / 100.0)
}

struct WorkerRun {
    /// Events per second between the first and the last written batch.
    steady: f64,
    /// Events per second from the worker's start (process start and group join included).
    rate: f64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    batches: usize,
    peak_rss_mib: f64,
    /// CPU seconds the worker used, start to finish.
    cpu_seconds: f64,
}

async fn run_worker(
    kafka: &TestKafka,
    topic: &str,
    db_url: &str,
    events: usize,
) -> anyhow::Result<WorkerRun> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: bench, namespace: bench}}
spec:
  source: {{topics: [{topic}]}}
  sinks:
    - postgres:
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
          - {{name: updated_at, from: event.updatedAt, type: timestamptz}}
"
        ),
    )?;
    let log_path = dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path)?;
    let port = free_port("worker")?;
    let started = Instant::now();
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
        "bench.bench",
        topic,
        events,
        &mut child,
        &log_path,
        Duration::from_secs(600),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = peak_rss_mib(child.id()).unwrap_or(f64::NAN);
    let cpu = cpu_seconds(child.id()).unwrap_or(f64::NAN);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait()?;
    let text = std::fs::read_to_string(&log_path)?;
    // Steady state: from the first written batch to the last, by the log's timestamps.
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
    let steady = match (stamps.first(), stamps.last()) {
        (Some(a), Some(b)) if b > a => events as f64 / (b - a),
        _ => f64::NAN,
    };
    let mut latencies: Vec<f64> = text
        .lines()
        .filter(|l| l.contains("batch written"))
        .filter_map(|l| {
            l.split("millis=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    if latencies.is_empty() {
        eprintln!(
            "no batch timings in the worker log; it begins:\n{}",
            text.lines().take(10).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(WorkerRun {
        steady,
        rate: events as f64 / seconds,
        seconds,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        batches: latencies.len(),
        peak_rss_mib: peak,
        cpu_seconds: cpu,
    })
}

/// (a) One INSERT … ON CONFLICT per event in autocommit, offset committed per event.
async fn per_record_baseline(
    kafka: &TestKafka,
    topic: &str,
    pool: &PgPool,
    sample: usize,
) -> anyhow::Result<f64> {
    let consumer: StreamConsumer = kafka.consumer(&unique_name("baseline"))?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut stream = consumer.stream();
    for _ in 0..sample {
        let message = stream.next().await.context("stream ended")??;
        let value: serde_json::Value =
            serde_json::from_slice(message.payload().unwrap_or_default())?;
        sqlx::query(
            "INSERT INTO baseline (id, version, name, email, amount, status, updated_at)
             VALUES ($1, $2, $3, $4, $5::numeric, $6, $7::timestamptz)
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, name = EXCLUDED.name, email = EXCLUDED.email,
               amount = EXCLUDED.amount, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at",
        )
        .bind(value["id"].as_i64())
        .bind(value["version"].as_i64().map(|v| v as i32))
        .bind(value["name"].as_str())
        .bind(value["email"].as_str())
        .bind(value["amount"].to_string())
        .bind(value["status"].as_str())
        .bind(value["updatedAt"].as_str())
        .execute(pool)
        .await?;
        consumer.commit_message(&message, CommitMode::Sync)?;
    }
    let rate = sample as f64 / started.elapsed().as_secs_f64();
    drop(stream);
    consumer.unsubscribe();
    Ok(rate)
}

/// (b) The same rows, 1000 per multi-row upsert statement, from memory, no Kafka.
async fn postgres_ceiling(pool: &PgPool, events: usize, keys: usize) -> anyhow::Result<f64> {
    let passes = events.div_ceil(keys);
    let mut rows = Vec::with_capacity(events);
    'outer: for version in 0..passes {
        for key in order(keys, version as u64) {
            if rows.len() == events {
                break 'outer;
            }
            rows.push(serde_json::from_slice::<serde_json::Value>(&event(
                key, version,
            ))?);
        }
    }
    let started = Instant::now();
    for chunk in rows.chunks(1000) {
        let mut sql = String::from(
            "INSERT INTO ceiling (id, version, name, email, amount, status, updated_at) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * 7;
            if i > 0 {
                sql.push(',');
            }
            let _ = write!(
                sql,
                "(${}, ${}, ${}, ${}, ${}::numeric, ${}, ${}::timestamptz)",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7
            );
        }
        sql.push_str(
            " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, name = EXCLUDED.name, email = EXCLUDED.email,
               amount = EXCLUDED.amount, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at",
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for value in chunk {
            query = query
                .bind(value["id"].as_i64())
                .bind(value["version"].as_i64().map(|v| v as i32))
                .bind(value["name"].as_str().map(str::to_owned))
                .bind(value["email"].as_str().map(str::to_owned))
                .bind(value["amount"].to_string())
                .bind(value["status"].as_str().map(str::to_owned))
                .bind(value["updatedAt"].as_str().map(str::to_owned));
        }
        query.execute(pool).await?;
    }
    Ok(rows.len() as f64 / started.elapsed().as_secs_f64())
}

use std::fmt::Write as _;

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; there is nothing to filter.
    let events = env_usize("WEIR_BENCH_EVENTS", 1_000_000);
    let keys = env_usize("WEIR_BENCH_KEYS", 100_000);
    let sample = env_usize("WEIR_BENCH_SAMPLE", 20_000);
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
        for table in ["items", "baseline", "ceiling"] {
            create_table(&db.pool, table).await?;
        }
        let topic = kafka.create_topic("bench", 6, &[]).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "weir-worker throughput: {events} events (~200 B JSON), {keys} keys, upsert into PostgreSQL")?;
        let produced = produce_all(&kafka, &topic, events, keys).await?;
        writeln!(out, "  produced in {:.1} s", produced.as_secs_f64())?;

        // The machine's speed drifts over minutes: the ceiling is measured right before and
        // right after the worker, and the worker is compared with their mean.
        let ceiling_before = postgres_ceiling(&db.pool, events, keys).await?;
        sqlx::query("TRUNCATE ceiling").execute(&db.pool).await?;
        let run = run_worker(&kafka, &topic, &db.url, events).await?;
        let ceiling_after = postgres_ceiling(&db.pool, events, keys).await?;
        let (rows, latest): (i64, i64) = sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE version = $1) FROM items")
            .bind((events.div_ceil(keys) - 1) as i32)
            .fetch_one(&db.pool)
            .await?;
        let correct = rows == keys.min(events) as i64 && latest == rows;
        writeln!(out, "  weir-worker:          {:>9.0} events/s  steady state (first to last batch)", run.steady)?;
        writeln!(out, "                        {:>9.0} events/s  from process start ({:.1} s incl. start-up and group join)", run.rate, run.seconds)?;
        writeln!(out, "                        {} batches, p50 {:.1} ms, p99 {:.1} ms per batch, peak RSS {:.1} MiB", run.batches, run.p50_ms, run.p99_ms, run.peak_rss_mib)?;
        writeln!(out, "                        worker CPU {:.1} s = {:.0} % of one core over {:.1} s ({:.1} µs per event)", run.cpu_seconds, 100.0 * run.cpu_seconds / run.seconds, run.seconds, 1e6 * run.cpu_seconds / events as f64)?;
        writeln!(out, "  check: {rows} rows, {latest} at their key's latest version -> {}", if correct { "OK" } else { "WRONG" })?;

        let baseline = per_record_baseline(&kafka, &topic, &db.pool, sample.min(events)).await?;
        writeln!(out, "  (a) per-record:       {baseline:>9.0} events/s  (INSERT … ON CONFLICT + offset commit per event, {sample} events)")?;
        let ceiling = (ceiling_before + ceiling_after) / 2.0;
        writeln!(out, "  (b) postgres ceiling: {ceiling:>9.0} rows/s    (1000-row multi-row upsert from memory, same driver; {ceiling_before:.0} before the worker, {ceiling_after:.0} after)")?;
        writeln!(out, "  weir / ceiling = {:.0} %   (steady state; target >= 80 %)", 100.0 * run.steady / ceiling)?;
        writeln!(out, "  weir / per-record = {:.0}x  (steady state; target >= 50x)", run.steady / baseline)?;
        writeln!(out, "  peak RSS {:.1} MiB  (target < 64 MiB)", run.peak_rss_mib)?;
        anyhow::ensure!(correct, "the table does not hold every key's latest version");
        anyhow::Ok(())
    })
}
