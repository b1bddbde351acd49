//! What the benchmarks share: reading a worker process's figures and waiting for it.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use weir_testkit::TestKafka;

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
