//! What the benchmarks share: reading a worker process's figures and waiting for it.
// Each bench includes this module and uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use weir_testkit::{TestKafka, free_port, unique_name};

/// The event stream: pass v over all keys (in a shuffled order), ten passes.
pub fn event(key: usize, version: usize) -> Vec<u8> {
    format!(
        "{{\"id\":{key},\"version\":{version},\"name\":\"customer-{key:08}\",\"email\":\"customer{key}@example.com\",\"amount\":{}.{:02},\"status\":\"active\",\"updatedAt\":\"2026-11-23T10:{:02}:{:02}Z\",\"note\":\"xxxxxxxxxxxxxxxxxxxx\"}}",
        key % 1000,
        version * 7 % 100,
        version % 60,
        key % 60
    )
    .into_bytes()
}

pub fn order(keys: usize, seed: u64) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut keys: Vec<usize> = (0..keys).collect();
    rng.shuffle(&mut keys);
    keys
}

pub async fn produce_all(
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

/// The stream produce_all sends, in its order, decoded: what a ceiling writes from memory.
pub fn stream_values(events: usize, keys: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let passes = events.div_ceil(keys);
    let mut rows = Vec::with_capacity(events);
    'outer: for version in 0..passes {
        for key in order(keys, version as u64) {
            if rows.len() == events {
                break 'outer;
            }
            rows.push(serde_json::from_slice(&event(key, version))?);
        }
    }
    Ok(rows)
}

/// Commits an offset for a throwaway group, so the broker has created its consumer-offsets
/// topic (its first group's coordinator lookup does, in seconds on a fresh broker) before
/// a timed worker joins a group. Tried until it succeeds, for at most a minute.
pub async fn warm_group_coordinator(kafka: &TestKafka, topic: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka
        .config()
        .set("group.id", unique_name("bench-warm-up"))
        .create()?;
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(topic, 0, Offset::Offset(0))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match consumer.commit(&offsets, CommitMode::Sync) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            // Retried while the coordinator is not yet available.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A process's peak resident memory (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Waits until `group` has committed `events` offsets on `topic`, failing when the worker
/// exits first (with its log) or after `limit`.
pub async fn wait_committed(
    kafka: &TestKafka,
    group: &str,
    topic: &str,
    events: usize,
    worker: &mut Child,
    log: &Path,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let committed: i64 = kafka
            .committed_offsets(group, topic)
            .map(|m| m.values().sum())
            .unwrap_or(0);
        if committed >= events as i64 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "worker did not finish: {committed} of {events}"
        );
        anyhow::ensure!(
            worker.try_wait()?.is_none(),
            "worker exited: {}",
            std::fs::read_to_string(log)?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one run of the worker binary over a backlog measured.
#[derive(Debug)]
pub struct WorkerRun {
    /// Events per second between the first and the last written batch.
    pub steady: f64,
    /// Events per second from the worker's start (process start and group join included).
    pub rate: f64,
    pub seconds: f64,
    /// Seconds from the worker's start to its first written batch (start-up, group join,
    /// first fetch).
    pub first_batch: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub batches: usize,
    pub peak_rss_mib: f64,
    /// CPU seconds the worker used, start to finish.
    pub cpu_seconds: f64,
}

/// Runs the real `weir-worker` on `pipeline` (one EventPipeline reading `topic`, whose
/// consumer group is `group`: `<namespace>.<name>`) with `env` set, until the group has
/// committed `events` offsets; then stops it and reads its figures from /proc and its
/// debug log.
pub async fn run_worker(
    kafka: &TestKafka,
    topic: &str,
    group: &str,
    pipeline: &str,
    env: &[(&str, &str)],
    events: usize,
) -> anyhow::Result<WorkerRun> {
    let bin = Path::new(env!("CARGO_BIN_EXE_weir-worker"));
    run_worker_bin(bin, kafka, topic, group, pipeline, env, events).await
}

/// [`run_worker`] with another build of the worker binary (an older commit's).
pub async fn run_worker_bin(
    bin: &Path,
    kafka: &TestKafka,
    topic: &str,
    group: &str,
    pipeline: &str,
    env: &[(&str, &str)],
    events: usize,
) -> anyhow::Result<WorkerRun> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, pipeline)?;
    let log_path = dir.path().join("worker.log");
    let log = std::fs::File::create(&log_path)?;
    let port = free_port("worker")?;
    let started = Instant::now();
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let mut child = Command::new(bin)
        .args(["run", "-f"])
        .arg(&file)
        .args(["--bootstrap-servers", kafka.bootstrap()])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(["--log-format", "text"])
        .env("RUST_LOG", "warn,weir_worker::engine=debug")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    wait_committed(
        kafka,
        group,
        topic,
        events,
        &mut child,
        &log_path,
        Duration::from_secs(1800),
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
        first_batch: stamps.first().map_or(f64::NAN, |first| first - started_at),
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        batches: latencies.len(),
        peak_rss_mib: peak,
        cpu_seconds: cpu,
    })
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

/// The `weir-worker` binary of an older commit, to measure against in the same run: the
/// path in `WEIR_BENCH_BASELINE_BIN` if set, else a release build of `commit` made once in
/// `<temp dir>/weir-bench-baseline/<full hash>/` (a detached git worktree of this
/// repository and its own target directory; later runs reuse it). Err says why there is
/// none (no git, no cargo, a failed build: its log).
pub fn baseline_worker(commit: &str) -> Result<PathBuf, String> {
    if let Ok(bin) = std::env::var("WEIR_BENCH_BASELINE_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "WEIR_BENCH_BASELINE_BIN={} is not a file",
                bin.display()
            ))
        };
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let hash = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["rev-parse", "--verify", &format!("{commit}^{{commit}}")])
        .output()
        .map_err(|e| format!("git is not available: {e}"))?;
    if !hash.status.success() {
        return Err(format!(
            "commit {commit} is not in this repository: {}",
            String::from_utf8_lossy(&hash.stderr).trim()
        ));
    }
    let hash = String::from_utf8_lossy(&hash.stdout).trim().to_owned();
    let dir = std::env::temp_dir().join("weir-bench-baseline").join(&hash);
    let bin = dir.join("target/release/weir-worker");
    if bin.is_file() {
        return Ok(bin);
    }
    let src = dir.join("src");
    if !src.join("Cargo.toml").is_file() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let added = Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(["worktree", "add", "--detach"])
            .arg(&src)
            .arg(&hash)
            .output()
            .map_err(|e| format!("git worktree: {e}"))?;
        if !added.status.success() {
            return Err(format!(
                "git worktree add {}: {}",
                src.display(),
                String::from_utf8_lossy(&added.stderr).trim()
            ));
        }
    }
    let log_path = dir.join("build.log");
    eprintln!(
        "building the baseline worker at {commit} once (release; log in {})",
        log_path.display()
    );
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let built = Command::new(cargo)
        .current_dir(&src)
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "weir-worker",
            "--bin",
            "weir-worker",
        ])
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .stdout(log)
        .stderr(err)
        .status()
        .map_err(|e| format!("cargo is not available: {e}"))?;
    if !built.success() || !bin.is_file() {
        return Err(format!("the build failed; see {}", log_path.display()));
    }
    Ok(bin)
}
