//! Bulk-import benchmarks (print their figures and the baselines measured in the same run;
//! not tests). Run: `cargo bench -p weir-worker --bench bulk_import`.
//!
//! 1. bcrypt at cost 10: the real `weir-worker` binary hashing every record of a topic on
//!    the cores it may use (Kafka → transform → SQLite), against raw bcrypt of the same
//!    passwords on the same number of threads, straight from memory.
//! 2. The Redis sink: the worker SETting every record of a topic (the event as JSON)
//!    against pipelined SETs of the same keys and values from memory over one connection,
//!    in pipelines of the worker's batch size.
//! 3. The shipped bulk-import pipeline with `sha256` in place of bcrypt: CSV rows loaded by
//!    `weir-worker produce --csv`, then upserted into PostgreSQL and cached in Redis;
//!    events/s and the worker's peak RSS.
//!
//! Sizes: WEIR_BENCH_BCRYPT (20,000), WEIR_BENCH_REDIS (500,000), WEIR_BENCH_CSV
//! (1,000,000); a size of 0 skips that part.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use weir_testkit::{KafkaServer, PostgresServer, RedisServer, TestKafka, free_port};

mod support;
use support::{env_usize, peak_rss_mib};

async fn produce(
    kafka: &TestKafka,
    topic: &str,
    records: &[(String, String)],
) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka
        .config()
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut pending = futures::stream::FuturesUnordered::new();
    for (key, value) in records {
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(key).payload(value))
                .map_err(|(e, _)| e)?,
        );
        if pending.len() >= 50_000 {
            while pending.len() > 10_000 {
                if let Some(d) = pending.next().await {
                    d?.map_err(|(e, _)| e)?;
                }
            }
        }
    }
    while let Some(d) = pending.next().await {
        d?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// A worker process on `pipeline`, and how long it took to commit `events` records.
struct Run {
    /// From process start to every record committed.
    seconds: f64,
    /// From the first record written to the last (start-up and group join left out), by
    /// the worker's own counter polled every 10 ms.
    steady_seconds: f64,
    peak_rss_mib: f64,
}

/// The worker's `weir_records_written_total`, when its metrics server answers.
fn written(port: u16) -> Option<u64> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with("weir_records_written_total{"))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

async fn run_worker(
    dir: &Path,
    kafka: &TestKafka,
    pipeline: &Value,
    topic: &str,
    events: usize,
    env: &[(&str, &str)],
    args: &[&str],
) -> anyhow::Result<Run> {
    // The default consumer group, `<namespace>.<name>`.
    let group = format!(
        "{}.{}",
        pipeline["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default(),
        pipeline["metadata"]["name"].as_str().unwrap_or_default()
    );
    let file = dir.join(format!("{group}.yaml"));
    std::fs::write(&file, serde_yaml_ng::to_string(pipeline)?)?;
    let log_path = dir.join(format!("{group}.log"));
    let port = free_port("worker")?;
    let started = Instant::now();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_weir-worker"))
        .args(["run", "-f"])
        .arg(&file)
        .args(["--bootstrap-servers", kafka.bootstrap()])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--log-format", "text"])
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    // First write, then last write, by the worker's counter.
    let mut first = None;
    let last = loop {
        let now = Instant::now();
        match written(port) {
            Some(n) if n >= events as u64 => break now,
            Some(n) if n > 0 && first.is_none() => first = Some(now),
            _ => {}
        }
        anyhow::ensure!(
            child.try_wait()?.is_none(),
            "worker exited: {}",
            std::fs::read_to_string(&log_path)?
        );
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(3600),
            "the worker did not write {events} records"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let steady_seconds = first.map_or(f64::NAN, |f| (last - f).as_secs_f64());
    support::wait_committed(
        kafka,
        &group,
        topic,
        events,
        &mut child,
        &log_path,
        Duration::from_secs(3600),
    )
    .await?;
    let seconds = (last - started).as_secs_f64();
    let peak = peak_rss_mib(child.id()).unwrap_or(f64::NAN);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait()?;
    Ok(Run {
        seconds,
        steady_seconds,
        peak_rss_mib: peak,
    })
}

fn pipeline(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "EventPipeline",
        "metadata": {"name": name, "namespace": "bench"}, "spec": spec
    })
}

async fn bcrypt_part(
    out: &mut impl std::io::Write,
    kafka: &TestKafka,
    dir: &Path,
    n: usize,
) -> anyhow::Result<()> {
    let threads = weir_worker::shards::default_threads();
    writeln!(
        out,
        "1. bcrypt cost 10, {n} records, {threads} threads (the cores this process may use)"
    )?;
    let passwords: Vec<String> = (0..n).map(|i| format!("password-{i:08}")).collect();
    // Raw: the same hashes on the same number of threads, from memory.
    let started = Instant::now();
    std::thread::scope(|scope| {
        for chunk in passwords.chunks(n.div_ceil(threads).max(1)) {
            scope.spawn(move || {
                for password in chunk {
                    let _ = bcrypt::hash(password, 10);
                }
            });
        }
    });
    let raw = n as f64 / started.elapsed().as_secs_f64();
    writeln!(out, "   raw bcrypt:   {raw:>9.1} hashes/s")?;

    let topic = kafka.create_topic("bench-bcrypt", 6, &[]).await?;
    let records: Vec<(String, String)> = passwords
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                format!("user{i}"),
                json!({"email": format!("user{i}@example.com"), "password": p}).to_string(),
            )
        })
        .collect();
    produce(kafka, &topic, &records).await?;
    let db = dir.join("bcrypt.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", db.display())).await?;
    sqlx::query("CREATE TABLE users (email TEXT PRIMARY KEY, password_hash TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    let spec = pipeline(
        "bcrypt",
        json!({
            "source": {"topics": [topic]},
            "transform": {"set": {"passwordHash": "bcrypt(event.password, 10)"}, "remove": ["password"]},
            "sinks": [{"sqlite": {"url": format!("sqlite://{}", db.display()), "table": "users", "mode": "Upsert",
                "keyColumns": ["email"],
                "columns": [{"name": "email", "type": "text"}, {"name": "password_hash", "from": "event.passwordHash", "type": "text"}]}}],
            "batch": {"maxRecords": 1000, "maxWait": "200ms"}
        }),
    );
    let run = run_worker(dir, kafka, &spec, &topic, n, &[], &[]).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await?;
    // From process start: the first write waits for a whole batch to be hashed, so the
    // first-to-last-write span would leave that batch's hashing out.
    let worker = n as f64 / run.seconds;
    writeln!(
        out,
        "   weir-worker:  {worker:>9.1} records/s  from process start ({:.1} s, start-up and group join included), Kafka → bcrypt → SQLite; {rows} rows",
        run.seconds
    )?;
    writeln!(
        out,
        "   weir / raw = {:.0} %  (target >= 90 %)",
        100.0 * worker / raw
    )?;
    anyhow::ensure!(rows == n as i64, "{rows} of {n} rows written");
    if threads > 1 {
        // The same work on one transform thread: what the other cores add.
        let one = n.div_ceil(threads);
        let topic = kafka.create_topic("bench-bcrypt-one", 6, &[]).await?;
        produce(kafka, &topic, &records[..one]).await?;
        sqlx::query("DELETE FROM users").execute(&pool).await?;
        let mut spec = spec;
        spec["spec"]["source"]["topics"] = json!([topic]);
        spec["metadata"]["name"] = json!("bcrypt-one");
        let run = run_worker(
            dir,
            kafka,
            &spec,
            &topic,
            one,
            &[],
            &["--transform-threads", "1"],
        )
        .await?;
        let single = one as f64 / run.seconds;
        writeln!(
            out,
            "   weir-worker --transform-threads 1: {single:>9.1} records/s ({one} records): {threads} threads give {:.2}x",
            worker / single
        )?;
    }
    Ok(())
}

async fn redis_part(
    out: &mut impl std::io::Write,
    kafka: &TestKafka,
    dir: &Path,
    n: usize,
) -> anyhow::Result<()> {
    const BATCH: usize = 5000;
    writeln!(
        out,
        "2. Redis sink: {n} SETs of ~120 B JSON, batches of {BATCH}"
    )?;
    let redis = RedisServer::start()?;
    let values: Vec<(String, String)> = (0..n)
        .map(|i| (format!("user{i}"), json!({"id": i, "email": format!("user{i}@example.com"), "name": format!("User {i:08}"), "status": "active"}).to_string()))
        .collect();
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let started = Instant::now();
    for chunk in values.chunks(BATCH) {
        let mut pipe = redis::pipe();
        for (key, value) in chunk {
            pipe.cmd("SET")
                .arg(format!("raw:{key}"))
                .arg(value)
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
    }
    let raw = n as f64 / started.elapsed().as_secs_f64();
    writeln!(out, "   pipelined SETs from memory: {raw:>9.0} SETs/s")?;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;

    let topic = kafka.create_topic("bench-redis", 6, &[]).await?;
    produce(kafka, &topic, &values).await?;
    let spec = pipeline(
        "redis",
        json!({
            "source": {"topics": [topic]},
            "sinks": [{"redis": {"urlFrom": {"env": "BENCH_REDIS"}, "command": "Set", "key": "'user:' + key"}}],
            "batch": {"maxRecords": BATCH, "maxWait": "100ms"}
        }),
    );
    let url = redis.url();
    let run = run_worker(dir, kafka, &spec, &topic, n, &[("BENCH_REDIS", &url)], &[]).await?;
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
    let worker = n as f64 / run.steady_seconds;
    writeln!(
        out,
        "   weir-worker:                {worker:>9.0} records/s  first to last write; {:.0} records/s from process start ({:.1} s); {keys} keys; peak RSS {:.1} MiB",
        n as f64 / run.seconds,
        run.seconds,
        run.peak_rss_mib
    )?;
    writeln!(
        out,
        "   weir / pipelined = {:.0} %  (target >= 70 %)",
        100.0 * worker / raw
    )?;
    anyhow::ensure!(keys == n as i64, "{keys} of {n} keys written");
    Ok(())
}

async fn csv_part(
    out: &mut impl std::io::Write,
    kafka: &TestKafka,
    dir: &Path,
    n: usize,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "3. the bulk-import example with sha256: {n} CSV rows → PostgreSQL and Redis"
    )?;
    let csv = dir.join("users.csv");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&csv)?);
        writeln!(file, "email,name,password,createdAt")?;
        for i in 0..n {
            writeln!(
                file,
                "User{i}@Example.com,User {i:08},password-{i:08},2026-11-{:02}T10:00:00Z",
                1 + i % 28
            )?;
        }
    }
    let topic = kafka.create_topic("bench-csv", 12, &[]).await?;
    let dead_letter = kafka.create_topic("bench-csv-dlq", 1, &[]).await?;
    let started = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_weir-worker"))
        .args(["produce", "--topic", &topic, "--key", "email", "--csv"])
        .arg(&csv)
        .args(["--bootstrap-servers", kafka.bootstrap()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "produce failed");
    writeln!(
        out,
        "   weir-worker produce --csv: {:>9.0} rows/s",
        n as f64 / started.elapsed().as_secs_f64()
    )?;

    let pg = tokio::task::spawn_blocking(PostgresServer::start).await??;
    let db = pg.create_database().await?;
    sqlx::query("CREATE TABLE users (email text PRIMARY KEY, name text NOT NULL, password_hash text NOT NULL, created_at timestamptz)")
        .execute(&db.pool)
        .await?;
    let redis = RedisServer::start()?;
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/bulk-user-import.yaml"
    ))?;
    let mut spec = serde_yaml_ng::Deserializer::from_str(&text)
        .map(<Value as serde::Deserialize>::deserialize)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|d| d["kind"] == "EventPipeline")
        .context("no pipeline in the example")?;
    spec["spec"]["source"]["topics"] = json!([topic]);
    spec["spec"]["deadLetter"]["topic"] = json!(dead_letter);
    spec["spec"]["transform"]["set"]["passwordHash"] = json!("sha256(event.password)");
    spec["metadata"]["namespace"] = json!("bench");
    let url = redis.url();
    let run = run_worker(
        dir,
        kafka,
        &spec,
        &topic,
        n,
        &[
            ("WEIR_SECRET_USERS_DB_URL", &db.url),
            ("WEIR_SECRET_USERS_CACHE_URL", &url),
        ],
        &[],
    )
    .await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db.pool)
        .await?;
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
    writeln!(
        out,
        "   weir-worker: {:>9.0} events/s first to last write, {:.0} events/s from process start ({:.1} s); peak RSS {:.1} MiB (target < 64 MiB); {rows} rows, {keys} keys",
        n as f64 / run.steady_seconds,
        n as f64 / run.seconds,
        run.seconds,
        run.peak_rss_mib
    )?;
    anyhow::ensure!(
        rows == n as i64 && keys == n as i64,
        "{rows} rows and {keys} keys of {n}"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let bcrypt_records = env_usize("WEIR_BENCH_BCRYPT", 20_000);
    let redis_records = env_usize("WEIR_BENCH_REDIS", 500_000);
    let csv_rows = env_usize("WEIR_BENCH_CSV", 1_000_000);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let broker = if std::env::var(weir_testkit::env::KAFKA_BOOTSTRAP).is_err() {
            Some(tokio::task::spawn_blocking(KafkaServer::start).await??)
        } else {
            None
        };
        let kafka = match &broker {
            Some(server) => TestKafka::at(server.bootstrap()),
            None => tokio::task::spawn_blocking(TestKafka::shared).await??,
        };
        let dir = tempfile::tempdir()?;
        let mut out = std::io::stdout().lock();
        if bcrypt_records > 0 {
            bcrypt_part(&mut out, &kafka, dir.path(), bcrypt_records).await?;
        }
        if redis_records > 0 {
            redis_part(&mut out, &kafka, dir.path(), redis_records).await?;
        }
        if csv_rows > 0 {
            csv_part(&mut out, &kafka, dir.path(), csv_rows).await?;
        }
        anyhow::Ok(())
    })
}
