//! The operator's Prometheus metrics and its /metrics, /healthz and /readyz server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::error::Category;

/// Reconcile durations are bucketed at these bounds (seconds).
const BUCKETS: [f64; 9] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

#[derive(Debug, Default)]
struct PerKind {
    reconciles: u64,
    /// Failed reconciles per error category.
    errors: BTreeMap<Category, u64>,
    /// Cumulative bucket counts, then the sum of seconds.
    buckets: [u64; BUCKETS.len()],
    seconds: f64,
}

/// A pipeline's figures, as its status has them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineFigures {
    pub lag: i64,
    pub lag_seconds: Option<f64>,
    pub arrival_rate: f64,
    pub consumption_rate: f64,
    pub desired_replicas: i32,
    pub replicas: i32,
    pub ready_replicas: i32,
}

/// Counters of the controllers.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Per pipeline (namespace, name): the autoscaler's figures.
    pipelines: Mutex<BTreeMap<(String, String), PipelineFigures>>,
    kinds: Mutex<BTreeMap<&'static str, PerKind>>,
    /// Reconciles started and not finished: the work queue's depth as far as it runs.
    in_flight: AtomicI64,
    /// Write requests (applies, patches, creates, deletes, events) made to the API server.
    writes: AtomicU64,
    leader: AtomicBool,
    ready: AtomicBool,
}

impl Metrics {
    /// A reconcile of `kind` starts.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A reconcile of `kind` ended after `seconds`, failed with an error of `failed`'s
    /// category or not.
    pub fn finished(&self, kind: &'static str, seconds: f64, failed: Option<Category>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut kinds) = self.kinds.lock() {
            let entry = kinds.entry(kind).or_default();
            entry.reconciles += 1;
            if let Some(category) = failed {
                *entry.errors.entry(category).or_default() += 1;
            }
            entry.seconds += seconds;
            for (bound, count) in BUCKETS.iter().zip(entry.buckets.iter_mut()) {
                if seconds <= *bound {
                    *count += 1;
                }
            }
        }
    }

    /// The latest figures of the pipeline `namespace/name`.
    pub fn pipeline(&self, namespace: &str, name: &str, figures: PipelineFigures) {
        if let Ok(mut pipelines) = self.pipelines.lock() {
            pipelines.insert((namespace.to_owned(), name.to_owned()), figures);
        }
    }

    /// The pipeline `namespace/name` is gone (or not run): its figures go.
    pub fn forget_pipeline(&self, namespace: &str, name: &str) {
        if let Ok(mut pipelines) = self.pipelines.lock() {
            pipelines.remove(&(namespace.to_owned(), name.to_owned()));
        }
    }

    /// One write request to the API server.
    pub fn write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn reconciles(&self, kind: &str) -> u64 {
        self.kinds
            .lock()
            .ok()
            .and_then(|k| k.get(kind).map(|p| p.reconciles))
            .unwrap_or(0)
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let kinds = self.kinds.lock().map(|k| {
            k.iter()
                .map(|(kind, p)| (*kind, p.reconciles, p.errors.clone(), p.buckets, p.seconds))
                .collect::<Vec<_>>()
        });
        let kinds = kinds.unwrap_or_default();
        out.push_str("# HELP weir_operator_reconciles_total Reconciles run, per kind.\n# TYPE weir_operator_reconciles_total counter\n");
        for (kind, reconciles, ..) in &kinds {
            let _ = writeln!(
                out,
                "weir_operator_reconciles_total{{kind=\"{kind}\"}} {reconciles}"
            );
        }
        out.push_str("# HELP weir_operator_reconcile_errors_total Reconciles that failed, per kind and error category.\n# TYPE weir_operator_reconcile_errors_total counter\n");
        for (kind, _, errors, ..) in &kinds {
            for (category, count) in errors {
                let _ = writeln!(
                    out,
                    "weir_operator_reconcile_errors_total{{kind=\"{kind}\",category=\"{category}\"}} {count}"
                );
            }
        }
        out.push_str("# HELP weir_operator_reconcile_duration_seconds Time per reconcile, per kind.\n# TYPE weir_operator_reconcile_duration_seconds histogram\n");
        for (kind, reconciles, _, buckets, seconds) in &kinds {
            for (bound, count) in BUCKETS.iter().zip(buckets) {
                let _ = writeln!(
                    out,
                    "weir_operator_reconcile_duration_seconds_bucket{{kind=\"{kind}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "weir_operator_reconcile_duration_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {reconciles}\nweir_operator_reconcile_duration_seconds_sum{{kind=\"{kind}\"}} {seconds}\nweir_operator_reconcile_duration_seconds_count{{kind=\"{kind}\"}} {reconciles}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP weir_operator_reconciles_in_flight Reconciles running now.\n# TYPE weir_operator_reconciles_in_flight gauge\nweir_operator_reconciles_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP weir_operator_api_writes_total Write requests made to the Kubernetes API.\n# TYPE weir_operator_api_writes_total counter\nweir_operator_api_writes_total {}",
            self.writes()
        );
        let _ = writeln!(
            out,
            "# HELP weir_operator_leader Whether this replica holds the leader Lease.\n# TYPE weir_operator_leader gauge\nweir_operator_leader {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
        let pipelines = self.pipelines.lock().map(|p| p.clone()).unwrap_or_default();
        type Figure = fn(&PipelineFigures) -> Option<f64>;
        let gauges: [(&str, &str, Figure); 7] = [
            (
                "lag",
                "Records produced but not yet committed by the pipeline's consumer group.",
                |f| Some(f.lag as f64),
            ),
            (
                "lag_seconds",
                "Seconds to drain the lag at the consumption rate.",
                |f| f.lag_seconds,
            ),
            (
                "arrival_rate",
                "Records produced to the pipeline's topics per second.",
                |f| Some(f.arrival_rate),
            ),
            (
                "consumption_rate",
                "Records the pipeline committed per second.",
                |f| Some(f.consumption_rate),
            ),
            (
                "desired_replicas",
                "Workers the autoscaler would run.",
                |f| Some(f64::from(f.desired_replicas)),
            ),
            ("replicas", "Workers the Deployment is asked to run.", |f| {
                Some(f64::from(f.replicas))
            }),
            ("ready_replicas", "Workers ready.", |f| {
                Some(f64::from(f.ready_replicas))
            }),
        ];
        for (name, help, figure) in gauges {
            let _ = writeln!(
                out,
                "# HELP weir_operator_pipeline_{name} {help}\n# TYPE weir_operator_pipeline_{name} gauge"
            );
            for ((namespace, pipeline), figures) in &pipelines {
                if let Some(value) = figure(figures) {
                    let _ = writeln!(
                        out,
                        "weir_operator_pipeline_{name}{{namespace=\"{namespace}\",pipeline=\"{pipeline}\"}} {value}"
                    );
                }
            }
        }
        out
    }
}

/// Serves GET /metrics, /healthz and /readyz until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: std::sync::Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut chunk = [0u8; 512];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 4096 {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head);
            let (status, body) = match head.split_whitespace().nth(1).unwrap_or("/") {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if metrics.is_ready() => ("200 OK", "ready\n".to_owned()),
                "/readyz" => ("503 Service Unavailable", "not ready\n".to_owned()),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_kind_counters_and_histograms() {
        let m = Metrics::default();
        m.started();
        m.finished("KafkaTopic", 0.02, None);
        m.started();
        m.finished("KafkaTopic", 2.0, Some(Category::KafkaUnreachable));
        m.write();
        let text = m.render();
        for line in [
            "weir_operator_reconciles_total{kind=\"KafkaTopic\"} 2",
            "weir_operator_reconcile_errors_total{kind=\"KafkaTopic\",category=\"KafkaUnreachable\"} 1",
            "weir_operator_reconcile_duration_seconds_bucket{kind=\"KafkaTopic\",le=\"0.025\"} 1",
            "weir_operator_reconcile_duration_seconds_bucket{kind=\"KafkaTopic\",le=\"5\"} 2",
            "weir_operator_reconciles_in_flight 0",
            "weir_operator_api_writes_total 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(m.reconciles("KafkaTopic"), 2);
        m.pipeline(
            "shop",
            "orders",
            PipelineFigures {
                lag: 1200,
                lag_seconds: Some(4.0),
                consumption_rate: 300.0,
                desired_replicas: 3,
                ..PipelineFigures::default()
            },
        );
        let text = m.render();
        for line in [
            "weir_operator_pipeline_lag{namespace=\"shop\",pipeline=\"orders\"} 1200",
            "weir_operator_pipeline_lag_seconds{namespace=\"shop\",pipeline=\"orders\"} 4",
            "weir_operator_pipeline_desired_replicas{namespace=\"shop\",pipeline=\"orders\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
