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
//! (d) then measures three statement shapes for the same upserts from memory.
//! Override sizes with WEIR_BENCH_EVENTS, WEIR_BENCH_KEYS, WEIR_BENCH_SAMPLE,
//! WEIR_BENCH_WINDOW_RECORDS, WEIR_BENCH_WINDOW_BYTES and WEIR_BENCH_SHAPE_ROWS, the
//! uncompacted runs' `spec.batch` with WEIR_BENCH_BATCH; WEIR_BENCH_BASELINE_BIN names a
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

/// Flushes PostgreSQL's dirty pages now rather than during the next run.
async fn checkpoint(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

/// (b) The same rows, 1000 per multi-row upsert statement, from memory, no Kafka: the
/// `Values` shape of (d).
async fn postgres_ceiling(pool: &PgPool, events: usize, keys: usize) -> anyhow::Result<f64> {
    let rows = support::stream_values(events, keys)?;
    statement_shape(pool, "ceiling", &rows, 1000, Shape::Values).await
}

use std::fmt::Write as _;

/// The statement shapes a 5-column upsert batch can take, measured from memory (no Kafka)
/// in (d): the multi-row VALUES of the ceiling, the UNNEST the worker sends (integers as
/// binary arrays, the rest as text arrays cast by PostgreSQL), and text COPY into a
/// temporary table followed by one INSERT … SELECT … ON CONFLICT, in one transaction.
#[derive(Clone, Copy, Debug)]
enum Shape {
    Values,
    Unnest,
    Copy,
}

const UPSERT_SET: &str = "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, name = EXCLUDED.name, email = EXCLUDED.email,
    amount = EXCLUDED.amount, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at";

/// Rows per second upserting `rows` into `table` in batches of `batch` as `shape`.
async fn statement_shape(
    pool: &PgPool,
    table: &str,
    rows: &[serde_json::Value],
    batch: usize,
    shape: Shape,
) -> anyhow::Result<f64> {
    let mut conn = pool.acquire().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TEMP TABLE IF NOT EXISTS staged (LIKE {table}) ON COMMIT DELETE ROWS"
    )))
    .execute(&mut *conn)
    .await?;
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().map(str::to_owned);
    let started = Instant::now();
    for chunk in rows.chunks(batch) {
        match shape {
            Shape::Values => {
                let mut sql = format!(
                    "INSERT INTO {table} (id, version, name, email, amount, status, updated_at) VALUES "
                );
                for i in 0..chunk.len() {
                    let b = i * 7;
                    let _ = write!(
                        sql,
                        "{}(${}, ${}, ${}, ${}, ${}::numeric, ${}, ${}::timestamptz)",
                        if i > 0 { "," } else { "" },
                        b + 1,
                        b + 2,
                        b + 3,
                        b + 4,
                        b + 5,
                        b + 6,
                        b + 7
                    );
                }
                let _ = write!(sql, " {UPSERT_SET}");
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for v in chunk {
                    query = query
                        .bind(v["id"].as_i64())
                        .bind(v["version"].as_i64().map(|n| n as i32))
                        .bind(text(v, "name"))
                        .bind(text(v, "email"))
                        .bind(v["amount"].to_string())
                        .bind(text(v, "status"))
                        .bind(text(v, "updatedAt"));
                }
                query.execute(&mut *conn).await?;
            }
            Shape::Unnest => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {table} AS t (id, version, name, email, amount, status, updated_at)
                     SELECT u.c0, u.c1, u.c2::text, u.c3::text, u.c4::numeric, u.c5::text, u.c6::timestamptz
                     FROM UNNEST($1::bigint[], $2::integer[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
                       AS u(c0, c1, c2, c3, c4, c5, c6) {UPSERT_SET}"
                )))
                .bind(chunk.iter().map(|v| v["id"].as_i64()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|v| v["version"].as_i64().map(|n| n as i32)).collect::<Vec<_>>())
                .bind(chunk.iter().map(|v| text(v, "name")).collect::<Vec<_>>())
                .bind(chunk.iter().map(|v| text(v, "email")).collect::<Vec<_>>())
                .bind(chunk.iter().map(|v| Some(v["amount"].to_string())).collect::<Vec<_>>())
                .bind(chunk.iter().map(|v| text(v, "status")).collect::<Vec<_>>())
                .bind(chunk.iter().map(|v| text(v, "updatedAt")).collect::<Vec<_>>())
                .execute(&mut *conn)
                .await?;
            }
            Shape::Copy => {
                // The bench's values hold no tab, newline or backslash: COPY's text format
                // takes them as they are.
                let mut data = String::with_capacity(chunk.len() * 128);
                for v in chunk {
                    let _ = writeln!(
                        data,
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        v["id"],
                        v["version"],
                        v["name"].as_str().unwrap_or("\\N"),
                        v["email"].as_str().unwrap_or("\\N"),
                        v["amount"],
                        v["status"].as_str().unwrap_or("\\N"),
                        v["updatedAt"].as_str().unwrap_or("\\N")
                    );
                }
                sqlx::query("BEGIN").execute(&mut *conn).await?;
                let mut copy = conn.copy_in_raw("COPY staged (id, version, name, email, amount, status, updated_at) FROM STDIN").await?;
                copy.send(data.as_bytes()).await?;
                copy.finish().await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {table} AS t SELECT * FROM staged {UPSERT_SET}"
                )))
                .execute(&mut *conn)
                .await?;
                sqlx::query("COMMIT").execute(&mut *conn).await?;
            }
        }
    }
    Ok(rows.len() as f64 / started.elapsed().as_secs_f64())
}

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
        for table in ["items", "compacted", "before", "baseline", "ceiling", "shapes"] {
            create_table(&db.pool, table).await?;
        }
        let topic = kafka.create_topic("bench", 6, &[]).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "weir-worker throughput: {events} events (~200 B JSON), {keys} keys, upsert into PostgreSQL")?;
        let produced = produce_all(&kafka, &topic, events, keys).await?;
        writeln!(out, "  produced in {:.1} s", produced.as_secs_f64())?;

        // So no timed run (the per-record one included) pays for the broker creating its
        // offsets topic, which the first consumer group does.
        support::warm_group_coordinator(&kafka, &topic).await?;
        let baseline = per_record_baseline(&kafka, &topic, &db.pool, sample.min(events)).await?;
        // The machine's speed drifts over minutes: the ceiling is measured right before and
        // right after the worker, and the worker is compared with their mean.
        let ceiling_before = postgres_ceiling(&db.pool, events, keys).await?;
        sqlx::query("TRUNCATE ceiling").execute(&db.pool).await?;
        // Each worker starts from a checkpointed database, so none pays for the WAL of
        // the run before it.
        checkpoint(&db.pool).await?;
        // WEIR_BENCH_BATCH: the uncompacted runs' spec.batch (a YAML flow mapping).
        let batch = std::env::var("WEIR_BENCH_BATCH").unwrap_or_else(|_| "{}".to_owned());
        let run = run_worker(&kafka, &topic, &db.url, events, ("bench", "items", &batch)).await?;
        // (c) The worker before this work, right after, on the same backlog.
        let before = match std::env::var("WEIR_BENCH_BASELINE").as_deref() {
            Ok("0") => Err("WEIR_BENCH_BASELINE=0".to_owned()),
            _ => tokio::task::spawn_blocking(|| support::baseline_worker(BASELINE_COMMIT)).await?,
        };
        let before = match before {
            Ok(bin) => Some({
                checkpoint(&db.pool).await?;
                run_worker_bin(&bin, &kafka, &topic, &db.url, events, ("before", "before", &batch)).await?
            }),
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
        writeln!(out, "                        {:>9.0} events/s  from process start ({:.1} s, the first batch written after {:.1} s)", run.rate, run.seconds, run.first_batch)?;
        writeln!(out, "                        {} batches, p50 {:.1} ms, p99 {:.1} ms per batch, peak RSS {:.1} MiB", run.batches, run.p50_ms, run.p99_ms, run.peak_rss_mib)?;
        writeln!(out, "                        worker CPU {:.1} s = {:.0} % of one core over {:.1} s ({:.1} µs per event)", run.cpu_seconds, 100.0 * run.cpu_seconds / run.seconds, run.seconds, 1e6 * run.cpu_seconds / events as f64)?;
        writeln!(out, "  check: {rows} rows, {latest} at their key's latest version -> {}", if correct { "OK" } else { "WRONG" })?;
        if let Some(before) = &before {
            writeln!(out, "  (c) the worker at {}: {:>9.0} events/s  steady state ({:.0} from process start, first batch after {:.1} s); p50 {:.1} ms per batch; peak RSS {:.1} MiB; CPU {:.1} s ({:.1} µs per event)", &BASELINE_COMMIT[..7], before.steady, before.rate, before.first_batch, before.p50_ms, before.peak_rss_mib, before.cpu_seconds, 1e6 * before.cpu_seconds / events as f64)?;
        }

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
        checkpoint(&db.pool).await?;
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
        // (d) Statement shapes, from memory, on the first WEIR_BENCH_SHAPE_ROWS rows.
        let shape_rows = support::stream_values(env_usize("WEIR_BENCH_SHAPE_ROWS", 300_000).min(events), keys)?;
        writeln!(out, "  (d) statement shapes, {} rows from memory, upserted on one connection (rows/s):", shape_rows.len())?;
        for batch in [1000, 5000] {
            let mut line = format!("        batches of {batch:>4}:");
            for shape in [Shape::Values, Shape::Unnest, Shape::Copy] {
                sqlx::query("TRUNCATE shapes").execute(&db.pool).await?;
                checkpoint(&db.pool).await?;
                let rate = statement_shape(&db.pool, "shapes", &shape_rows, batch, shape).await?;
                let _ = write!(line, "  {shape:?} {rate:>7.0}");
            }
            writeln!(out, "{line}")?;
        }
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
