//! Throughput benchmark (prints its figures; not a test). Run: `cargo bench -p weir-worker`.
//!
//! 1,000,000 JSON events of about 200 bytes over 100,000 keys (each key updated ten times,
//! spread over the stream) are produced to a real Kafka broker, then the real `weir-worker`
//! binary upserts them into PostgreSQL. In the same run, two references:
//! (a) the per-record consumer hand-written consumers use (one INSERT … ON CONFLICT per
//!     event in autocommit, offset committed per event) on a 20,000-event sample;
//! (b) PostgreSQL's own ceiling: the same rows upserted with one multi-row statement per
//!     1000 rows straight from memory through the same driver, no Kafka.
//! (c) the worker as it was before the throughput work of issue 13 (commit
//!     [`BASELINE_COMMIT`], built once: see `support::baseline_worker`), on the same data.
//! Then the same backlog with `batch.compaction: LastWriteWins` over 1 s windows.
//! Override sizes with WEIR_BENCH_EVENTS, WEIR_BENCH_KEYS, WEIR_BENCH_SAMPLE,
//! WEIR_BENCH_WINDOW_RECORDS and WEIR_BENCH_WINDOW_BYTES; WEIR_BENCH_BASELINE_BIN names a
//! prebuilt baseline worker, WEIR_BENCH_BASELINE=0 skips it.

/// The last commit before the throughput work of issue 13.
const BASELINE_COMMIT: &str = "a7d324426fd7619c0e67fe0f7209546c06dd9de1";

use std::io::Write as _;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use sqlx::PgPool;
use weir_testkit::{KafkaServer, PostgresServer, TestKafka, unique_name};

mod support;
use support::{WorkerRun, env_usize, produce_all};

use std::path::Path;

async fn create_table(pool: &PgPool, table: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id bigint PRIMARY KEY, version integer NOT NULL, name text, email text, amount numeric, status text, updated_at timestamptz)"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// The worker as pipeline `name` upserting `topic` into `table`, with `batch` as its
/// `spec.batch` (YAML flow mapping).
async fn run_worker(
    kafka: &TestKafka,
    topic: &str,
    db_url: &str,
    events: usize,
    run: (&str, &str, &str),
) -> anyhow::Result<WorkerRun> {
    let bin = Path::new(env!("CARGO_BIN_EXE_weir-worker"));
    run_worker_bin(bin, kafka, topic, db_url, events, run).await
}

/// [`run_worker`] with another build of the worker.
async fn run_worker_bin(
    bin: &Path,
    kafka: &TestKafka,
    topic: &str,
    db_url: &str,
    events: usize,
    (name, table, batch): (&str, &str, &str),
) -> anyhow::Result<WorkerRun> {
    let pipeline = format!(
        "apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: {name}, namespace: bench}}
spec:
  source: {{topics: [{topic}]}}
  batch: {batch}
  sinks:
    - postgres:
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
          - {{name: updated_at, from: event.updatedAt, type: timestamptz}}
"
    );
    let group = format!("bench.{name}");
    support::run_worker_bin(
        bin,
        kafka,
        topic,
        &group,
        &pipeline,
        &[("BENCH_DB_URL", db_url)],
        events,
    )
    .await
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
    let rows = support::stream_values(events, keys)?;
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
        for table in ["items", "compacted", "before", "baseline", "ceiling"] {
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
        let run = run_worker(&kafka, &topic, &db.url, events, ("bench", "items", "{}")).await?;
        // (c) The worker before this work, right after, on the same backlog.
        let before = match std::env::var("WEIR_BENCH_BASELINE").as_deref() {
            Ok("0") => Err("WEIR_BENCH_BASELINE=0".to_owned()),
            _ => tokio::task::spawn_blocking(|| support::baseline_worker(BASELINE_COMMIT)).await?,
        };
        let before = match before {
            Ok(bin) => Some(run_worker_bin(&bin, &kafka, &topic, &db.url, events, ("before", "before", "{}")).await?),
            Err(reason) => {
                writeln!(out, "  (c) the worker at {}: skipped ({reason})", &BASELINE_COMMIT[..7])?;
                None
            }
        };
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
        if let Some(before) = &before {
            writeln!(out, "  (c) the worker at {}: {:>9.0} events/s  steady state ({:.0} from process start); p50 {:.1} ms per batch; peak RSS {:.1} MiB; CPU {:.1} s ({:.1} µs per event)", &BASELINE_COMMIT[..7], before.steady, before.rate, before.p50_ms, before.peak_rss_mib, before.cpu_seconds, 1e6 * before.cpu_seconds / events as f64)?;
        }

        let baseline = per_record_baseline(&kafka, &topic, &db.pool, sample.min(events)).await?;
        writeln!(out, "  (a) per-record:       {baseline:>9.0} events/s  (INSERT … ON CONFLICT + offset commit per event, {sample} events)")?;
        let ceiling = (ceiling_before + ceiling_after) / 2.0;
        writeln!(out, "  (b) postgres ceiling: {ceiling:>9.0} rows/s    (1000-row multi-row upsert from memory, same driver; {ceiling_before:.0} before the worker, {ceiling_after:.0} after)")?;
        writeln!(out, "  weir / ceiling = {:.0} %   (steady state; target >= 80 %)", 100.0 * run.steady / ceiling)?;
        writeln!(out, "  weir / per-record = {:.0}x  (steady state; target >= 50x)", run.steady / baseline)?;
        if let Some(before) = &before {
            writeln!(out, "  weir / (c) before = {:.2}x  (steady state; {:.2}x from process start; target >= 1.1x)", run.steady / before.steady, run.rate / before.rate)?;
        }
        writeln!(out, "  peak RSS {:.1} MiB  (target < 64 MiB)", run.peak_rss_mib)?;

        // The same backlog again with batch.compaction: LastWriteWins over 1 s windows.
        let window = env_usize("WEIR_BENCH_WINDOW_RECORDS", 100_000);
        let window_bytes = env_usize("WEIR_BENCH_WINDOW_BYTES", 16 << 20);
        let compacted = run_worker(
            &kafka,
            &topic,
            &db.url,
            events,
            ("compacted", "compacted", &format!("{{maxRecords: {window}, maxBytes: {window_bytes}, maxWait: 1s, compaction: LastWriteWins}}")),
        )
        .await?;
        let (differing,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM items a FULL JOIN compacted b USING (id)
             WHERE (a.version, a.name, a.email, a.amount, a.status, a.updated_at)
                   IS DISTINCT FROM (b.version, b.name, b.email, b.amount, b.status, b.updated_at)",
        )
        .fetch_one(&db.pool)
        .await?;
        writeln!(out, "  compaction LastWriteWins, 1 s windows keeping up to {window} records / {:.0} MiB:", window_bytes as f64 / (1 << 20) as f64)?;
        writeln!(out, "                        {:>9.0} events consumed/s steady state ({:.0} from process start); {} batches, p50 {:.0} ms; peak RSS {:.1} MiB; CPU {:.1} s ({:.1} µs per event)", compacted.steady, compacted.rate, compacted.batches, compacted.p50_ms, compacted.peak_rss_mib, compacted.cpu_seconds, 1e6 * compacted.cpu_seconds / events as f64)?;
        writeln!(out, "  compacted / ceiling = {:.2}x  (steady state; {:.2}x from process start; target >= 1.0x); peak RSS {:.1} MiB (target < 64 MiB); table {}", compacted.steady / ceiling, compacted.rate / ceiling, compacted.peak_rss_mib, if differing == 0 { "identical to the uncompacted run's".to_owned() } else { format!("DIFFERS in {differing} rows") })?;
        for table in ["items", "compacted", "before"] {
            let (inserted, updated): (i64, i64) = sqlx::query_as("SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables WHERE relname = $1")
                .bind(table)
                .fetch_one(&db.pool)
                .await?;
            writeln!(out, "  pg_stat_user_tables {table}: {inserted} rows inserted, {updated} updated")?;
        }
        anyhow::ensure!(correct, "the table does not hold every key's latest version");
        anyhow::ensure!(differing == 0, "the compacted table differs from the uncompacted one");
        anyhow::Ok(())
    })
}
