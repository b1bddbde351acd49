//! The operator's configuration, from flags and environment (see `weir-operator run --help`).

use std::net::SocketAddr;
use std::time::Duration;

/// What the operator watches and how it renders workers.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespaces to watch; empty for all.
    pub namespaces: Vec<String>,
    /// The KafkaConnection used by resources without a connectionRef.
    pub default_connection: String,
    /// The worker image for pipelines that do not name one.
    pub worker_image: String,
    /// Address of /metrics, /healthz and /readyz.
    pub metrics_addr: SocketAddr,
    /// This replica's identity in the leader Lease (the pod name).
    pub identity: String,
    /// Namespace and name of the leader Lease.
    pub lease_namespace: String,
    pub lease_name: String,
    /// How long a leader's Lease lasts without renewal.
    pub lease_duration: Duration,
    /// Longest wait for one Kafka admin request before the reconcile gives up and requeues.
    pub kafka_timeout: Duration,
    /// How often a Ready resource is checked again for drift.
    pub resync: Duration,
    /// How often a pipeline's consumer-group lag is read (and the autoscaler decides).
    pub lag_interval: Duration,
    /// Longest a reconcile may take (an API server that stops answering): it then fails
    /// and is retried with backoff.
    pub reconcile_timeout: Duration,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            default_connection: weir_crds::DEFAULT_CONNECTION.to_owned(),
            worker_image: format!("ghcr.io/weir-dev/weir-worker:{}", env!("CARGO_PKG_VERSION")),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            identity: "weir-operator".to_owned(),
            lease_namespace: "default".to_owned(),
            lease_name: "weir-operator".to_owned(),
            lease_duration: Duration::from_secs(15),
            kafka_timeout: Duration::from_secs(10),
            resync: Duration::from_secs(300),
            lag_interval: Duration::from_secs(5),
            reconcile_timeout: Duration::from_secs(120),
        }
    }
}

impl OperatorConfig {
    /// Whether resources in `namespace` are the operator's to reconcile.
    pub fn watches(&self, namespace: &str) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace)
    }
}
