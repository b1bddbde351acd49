//! The test harness: real services on loopback for Weir's integration tests.
//!
//! - [`kafka`]: a real Apache Kafka broker (single KRaft node, jars from Maven Central, run
//!   with the JDK), shared by every test of a run, with PLAINTEXT, SASL_SSL (SCRAM-SHA-512),
//!   SSL (client certificates required) and SASL_PLAINTEXT (PLAIN) listeners and a
//!   throwaway CA per broker; and librdkafka's in-process mock cluster for fault injection.
//! - [`postgres`]: a PostgreSQL server (shared, one fresh database per test) or a dedicated
//!   one a test may stop and start.
//! - [`mariadb`]: a MariaDB server (shared, one fresh database per test) for the MySQL sink.
//! - [`ferretdb`]: a FerretDB server, the MongoDB wire protocol on SQLite built from Go
//!   modules, for the MongoDB sink; shared by a run, one database name per test.
//! - [`redis`]: a Redis server per test.
//! - [`kube`]: a real Kubernetes API server (kube-apiserver on etcd, built from Go modules)
//!   for the operator: CRD schemas and CEL rules, server-side apply, RBAC.
//!
//! Shared servers come from the environment when the test command started them once for
//! the whole run (`weir-test-services`, see scripts/test.sh); otherwise the first test in a
//! process starts them. Every server runs under a watchdog that kills it and deletes its
//! data directory when the owning process exits, however it exits (panic, SIGKILL), so
//! nothing outlives a run. A part that cannot start fails the test with a message naming
//! the part and why: nothing is skipped silently.

pub mod ferretdb;
pub mod kafka;
pub mod kube;
pub mod mariadb;
pub mod postgres;
mod process;
pub mod redis;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use self::kube::{Identity, KubeApiServer};
pub use ferretdb::FerretDbServer;
pub use kafka::{KafkaSecurity, KafkaServer, TestKafka};
pub use mariadb::{MariaDbServer, TestMySqlDatabase};
pub use postgres::{PostgresServer, TestDatabase};
pub use redis::RedisServer;

/// Environment variables through which one run shares its servers with every test process.
pub mod env {
    /// Bootstrap address of the shared Kafka broker.
    pub const KAFKA_BOOTSTRAP: &str = "WEIR_TEST_KAFKA_BOOTSTRAP";
    /// A JSON file describing the shared broker's secured listeners and their throwaway
    /// credentials (`kafka::KafkaSecurity`: SASL_SSL/SCRAM-SHA-512, SSL with client
    /// certificates, SASL_PLAINTEXT/PLAIN).
    pub const KAFKA_SECURITY: &str = "WEIR_TEST_KAFKA_SECURITY";
    /// URL of the shared PostgreSQL server's `postgres` database (superuser, trust auth).
    pub const POSTGRES_URL: &str = "WEIR_TEST_POSTGRES_URL";
    /// URL of the shared MariaDB server's `mysql` database (root, no password).
    pub const MYSQL_URL: &str = "WEIR_TEST_MYSQL_URL";
    /// URL of the shared FerretDB server (no authentication).
    pub const MONGODB_URL: &str = "WEIR_TEST_MONGODB_URL";
    /// Where installed tools live (Kafka jars, kube-apiserver and etcd); see
    /// scripts/install-test-deps.sh.
    pub const TOOLS_DIR: &str = "WEIR_TOOLS_DIR";
}

/// The Kafka version whose jars scripts/install-test-deps.sh installs.
pub const KAFKA_VERSION: &str = "4.3.1";

/// The Kubernetes version whose kube-apiserver testkit/kube/go.mod builds.
pub const KUBERNETES_VERSION: &str = "1.36.3";

/// Why a part of the harness could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{part} is not installed: {hint}")]
    Missing { part: &'static str, hint: String },
    #[error("{part} did not start: {detail}")]
    Start { part: &'static str, detail: String },
    #[error("{part}: {context}: {source}")]
    Io {
        part: &'static str,
        context: String,
        source: std::io::Error,
    },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("kube-apiserver: {context}: {source}")]
    Kube {
        context: String,
        source: Box<::kube::Error>,
    },
    #[error("manifest {what}: {detail}")]
    Manifest { what: String, detail: String },
}

impl HarnessError {
    /// An I/O failure of `part` while doing `context`.
    pub fn io(part: &'static str, context: &str, source: std::io::Error) -> Self {
        HarnessError::Io {
            part,
            context: context.to_owned(),
            source,
        }
    }
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Where a server shared by the whole test process lives: its URL, and the server when
/// this process started it (kept, so it dies with the process).
type Shared<S> = std::sync::OnceLock<std::result::Result<(String, Option<S>), String>>;

/// The URL of the server in `slot`: `$variable` when set (the suite's shared server), else
/// one `start` gives on first use.
fn shared_url<S: Send + Sync>(
    slot: &'static Shared<S>,
    part: &'static str,
    variable: &str,
    start: impl FnOnce() -> Result<(String, S)>,
) -> Result<String> {
    slot.get_or_init(|| match std::env::var(variable) {
        Ok(url) if !url.is_empty() => Ok((url, None)),
        _ => start()
            .map(|(url, server)| (url, Some(server)))
            .map_err(|e| e.to_string()),
    })
    .as_ref()
    .map(|(url, _)| url.clone())
    .map_err(|detail| HarnessError::Start {
        part,
        detail: detail.clone(),
    })
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// The tools directory: `$WEIR_TOOLS_DIR`, else `~/.cache/weir-tools`.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(env::TOOLS_DIR) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/weir-tools")
}

/// Where the ports [`free_port`] picks from begin.
const FIRST_FREE_PORT: u16 = 10_000;

/// A loopback port that was free a moment ago, for a server the caller starts next.
///
/// Picked at random below the kernel's ephemeral range (`ip_local_port_range`, from 32768
/// by default): a port `bind(0)` hands out comes from that range, as does the local port
/// of every outgoing connection, and the tests open many, so one could take the port
/// before the server binds it (etcd then exits with "address already in use"). Below
/// the range only another `free_port` call could, and two at once pick the same port about
/// once in 23,000.
pub fn free_port(part: &'static str) -> Result<u16> {
    let ephemeral = ephemeral_range_start();
    if ephemeral > FIRST_FREE_PORT + 1000 {
        for _ in 0..100 {
            let port = fastrand::u16(FIRST_FREE_PORT..ephemeral);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| HarnessError::Io {
        part,
        context: "binding an ephemeral port".into(),
        source,
    })?;
    let port = listener
        .local_addr()
        .map_err(|source| HarnessError::Io {
            part,
            context: "reading an ephemeral port".into(),
            source,
        })?
        .port();
    Ok(port)
}

/// A name no other test of this run uses, e.g. `orders-3f2a9c1b`.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// Polls `check` until it returns `Some`, or fails after `deadline` with `what`.
/// This is how the harness (and tests) wait: on a condition with a deadline, never a bare
/// sleep.
pub fn wait_until<T>(
    part: &'static str,
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if start.elapsed() > deadline {
            return Err(HarnessError::Start {
                part,
                detail: format!("{what} not reached within {deadline:?}"),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Async form of [`wait_until`] for conditions checked with async clients.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if start.elapsed() > deadline {
            return Err(HarnessError::Start {
                part: "condition",
                detail: format!("{what} not reached within {deadline:?}"),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}
