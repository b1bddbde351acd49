//! Counters in Prometheus text format, and the /metrics /healthz /readyz server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Bucket bounds (seconds) of the batch latency histogram.
const LATENCY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Bucket bounds (records) of the batch size histogram.
const SIZE_BUCKETS: [f64; 8] = [1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 20000.0];

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if value <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

/// One sink's counters, labelled with its name from the spec (a bounded set).
#[derive(Debug, Default)]
pub struct SinkCounters {
    /// Records the sink applied.
    pub written: AtomicU64,
    /// Records it acknowledged without writing (no rule matched, already applied).
    pub skipped: AtomicU64,
    /// Records it refused (dead-lettered with `weir.sink` naming it).
    pub rejected: AtomicU64,
    /// Writes of it that were retried.
    pub retries: AtomicU64,
}

/// The worker's counters. Labels are bounded: the pipeline name, and the sink name on the
/// per-sink counters.
#[derive(Debug)]
pub struct Metrics {
    pipeline: String,
    pub consumed: AtomicU64,
    pub written: AtomicU64,
    pub filtered: AtomicU64,
    /// Superseded by a later event of their key in the batch (`batch.compaction`).
    pub compacted: AtomicU64,
    pub skipped: AtomicU64,
    pub failed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retries: AtomicU64,
    pub commits: AtomicU64,
    /// Replays this worker carried out in a sink (`--replay-token`; once per token and sink).
    pub replays: AtomicU64,
    batch_size: Histogram,
    batch_latency: Histogram,
    ready: AtomicBool,
    /// Per (topic, partition): records behind the partition's end, as the consumer sees it.
    lag: Mutex<BTreeMap<(String, i32), i64>>,
    sinks: Mutex<BTreeMap<String, Arc<SinkCounters>>>,
    /// What cannot be reached right now (a sink's name, the dead-letter topic): not ready
    /// while any is.
    unreachable: Mutex<std::collections::BTreeSet<String>>,
}

impl Metrics {
    pub fn new(pipeline: &str) -> Arc<Self> {
        Arc::new(Self {
            pipeline: pipeline.to_owned(),
            consumed: AtomicU64::new(0),
            written: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            compacted: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            batch_size: Histogram::new(&SIZE_BUCKETS),
            batch_latency: Histogram::new(&LATENCY_BUCKETS),
            ready: AtomicBool::new(false),
            lag: Mutex::new(BTreeMap::new()),
            sinks: Mutex::new(BTreeMap::new()),
            unreachable: Mutex::new(std::collections::BTreeSet::new()),
        })
    }

    /// The counters of the sink named `name`, registered on first use.
    pub fn sink(&self, name: &str) -> Arc<SinkCounters> {
        match self.sinks.lock() {
            Ok(mut sinks) => sinks.entry(name.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Counts a retry of `what`: a sink's name (counted for that sink too) or other work.
    pub fn retried(&self, what: &str) {
        Self::add(&self.retries, 1);
        let sink = self.sinks.lock().ok().and_then(|s| s.get(what).cloned());
        if let Some(sink) = sink {
            Self::add(&sink.retries, 1);
        }
    }

    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn observe_batch(&self, records: usize, seconds: f64) {
        self.batch_size.observe(records as f64);
        self.batch_latency.observe(seconds);
    }

    /// Replaces the lag of the assigned partitions.
    pub fn set_lag(&self, lag: BTreeMap<(String, i32), i64>) {
        if let Ok(mut current) = self.lag.lock() {
            *current = lag;
        }
    }

    /// Total lag of the assigned partitions.
    pub fn total_lag(&self) -> i64 {
        self.lag.lock().map(|l| l.values().sum()).unwrap_or(0)
    }

    /// Ready means the sinks and the broker answered on the last try.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Notes whether `what` (a sink, the dead-letter topic) can be reached.
    pub fn set_reachable(&self, what: &str, reachable: bool) {
        if let Ok(mut unreachable) = self.unreachable.lock() {
            if reachable {
                unreachable.remove(what);
            } else {
                unreachable.insert(what.to_owned());
            }
        }
    }

    /// Ready: the broker and every sink answered on their last try.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && self
                .unreachable
                .lock()
                .map(|u| u.is_empty())
                .unwrap_or(false)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let labels = format!("pipeline=\"{}\"", self.pipeline.replace('"', ""));
        let mut out = String::new();
        for (name, help, counter) in [
            (
                "weir_records_consumed_total",
                "Records read from Kafka.",
                &self.consumed,
            ),
            (
                "weir_records_written_total",
                "Records acknowledged by every sink.",
                &self.written,
            ),
            (
                "weir_records_filtered_total",
                "Records dropped by the filter.",
                &self.filtered,
            ),
            (
                "weir_records_compacted_total",
                "Records not written because a later record of their key in the batch superseded them (batch.compaction: LastWriteWins).",
                &self.compacted,
            ),
            (
                "weir_records_skipped_total",
                "Records skipped as duplicates or matched by no rule.",
                &self.skipped,
            ),
            (
                "weir_records_failed_total",
                "Records that failed permanently.",
                &self.failed,
            ),
            (
                "weir_records_dead_lettered_total",
                "Records sent to the dead-letter topic.",
                &self.dead_lettered,
            ),
            ("weir_retries_total", "Retried writes.", &self.retries),
            (
                "weir_offsets_stored_total",
                "Batches whose offsets were stored for commit.",
                &self.commits,
            ),
            (
                "weir_replays_applied_total",
                "Replays this worker carried out in a sink (kept offsets and keys forgotten, tables truncated when asked); a replay another worker carried out first is not counted.",
                &self.replays,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{labels}}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let sinks: Vec<(String, Arc<SinkCounters>)> = self
            .sinks
            .lock()
            .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (name, help, counter) in [
            (
                "weir_sink_records_written_total",
                "Records a sink applied.",
                (|c: &SinkCounters| &c.written) as fn(&SinkCounters) -> &AtomicU64,
            ),
            (
                "weir_sink_records_skipped_total",
                "Records a sink acknowledged without writing: duplicates, or matched by no rule.",
                |c| &c.skipped,
            ),
            (
                "weir_sink_records_rejected_total",
                "Records a sink refused; each went to the dead-letter topic naming the sink.",
                |c| &c.rejected,
            ),
            (
                "weir_sink_retries_total",
                "Retried writes of a sink.",
                |c| &c.retries,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (sink, counters) in &sinks {
                let _ = writeln!(
                    out,
                    "{name}{{{labels},sink=\"{}\"}} {}",
                    sink.replace('"', ""),
                    counter(counters).load(Ordering::Relaxed)
                );
            }
        }
        self.batch_size.render(
            &mut out,
            "weir_batch_records",
            "Records per written batch.",
            &labels,
        );
        self.batch_latency.render(
            &mut out,
            "weir_batch_duration_seconds",
            "Time to write and commit one batch.",
            &labels,
        );
        let _ = writeln!(
            out,
            "# HELP weir_consumer_lag Records behind the end of each assigned partition, as the consumer sees it.\n# TYPE weir_consumer_lag gauge"
        );
        if let Ok(lag) = self.lag.lock() {
            for ((topic, partition), value) in lag.iter() {
                let _ = writeln!(
                    out,
                    "weir_consumer_lag{{{labels},topic=\"{}\",partition=\"{partition}\"}} {value}",
                    topic.replace('"', "")
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP weir_ready Whether the worker can reach its sinks.\n# TYPE weir_ready gauge\nweir_ready{{{labels}}} {}",
            u8::from(self.is_ready())
        );
        out
    }
}

/// Serves GET /metrics, /healthz and /readyz until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Read until the end of the request head (or 4 KiB): a request may arrive in
            // several segments.
            let mut buffer = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while !buffer.windows(4).any(|w| w == b"\r\n\r\n") && buffer.len() < 4096 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            let request = String::from_utf8_lossy(&buffer);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if metrics.is_ready() => ("200 OK", "ready\n".to_owned()),
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_owned()),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new("orders");
        Metrics::add(&m.consumed, 3);
        m.observe_batch(3, 0.02);
        let text = m.render();
        assert!(
            text.contains("weir_records_consumed_total{pipeline=\"orders\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("weir_batch_records_bucket{pipeline=\"orders\",le=\"10\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("weir_batch_duration_seconds_count{pipeline=\"orders\"} 1"),
            "{text}"
        );
        assert!(text.contains("weir_ready{pipeline=\"orders\"} 0"), "{text}");
        m.set_lag(BTreeMap::from([(("t".to_owned(), 2), 40)]));
        assert!(
            m.render()
                .contains("weir_consumer_lag{pipeline=\"orders\",topic=\"t\",partition=\"2\"} 40"),
            "{}",
            m.render()
        );
        assert_eq!(m.total_lag(), 40);
    }

    #[test]
    fn sink_counters_carry_the_sink_label() {
        let m = Metrics::new("users");
        let cache = m.sink("users-cache");
        Metrics::add(&cache.written, 7);
        m.retried("users-cache");
        m.retried("the dead-letter topic");
        let text = m.render();
        for line in [
            "weir_sink_records_written_total{pipeline=\"users\",sink=\"users-cache\"} 7",
            "weir_sink_retries_total{pipeline=\"users\",sink=\"users-cache\"} 1",
            "weir_retries_total{pipeline=\"users\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
