//! `kubectl weir`: a kubectl plugin for pipelines, consumer groups and dead letters.
//!
//! Each subcommand is a library function returning a serialisable report (printed as a
//! table, JSON or YAML by the `kubectl-weir` binary), so tests drive them directly:
//! [`status`] (replicas, lag per partition read live from Kafka, the status the operator
//! writes), [`groups`] (list and describe consumer groups), [`reset`] (reset a group's
//! offsets, refused while it has members), [`replay`] (writes `spec.replay`),
//! [`dead_letters`] (list, follow and redrive a pipeline's dead letters).
//!
//! Kubernetes is read with the user's kubeconfig, Kafka through the pipeline's
//! KafkaConnection and its Secrets (kept in memory, never printed).

pub mod dead_letters;
pub mod groups;
pub mod kafka;
pub mod replay;
pub mod reset;
pub mod status;
pub mod table;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff;
use kube::api::Api;
use kube::{Client, ResourceExt as _};
use rdkafka::ClientConfig;
use weir_crds::condition::ConditionStatus;
use weir_crds::{DEFAULT_CONNECTION, EventPipeline, KafkaConnection, SecretKeySelector};
use weir_worker::kafka::{self as weir_kafka, AdminError, Credentials, Role};

pub use kafka::Kafka;

/// Why a subcommand failed. Each message names the object and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "EventPipeline {namespace}/{name} not found: check the name, or pass its namespace with -n (kubectl get eventpipelines -A lists them)"
    )]
    PipelineNotFound { namespace: String, name: String },
    #[error(
        "KafkaConnection {namespace}/{name} not found: create it (examples/connection.yaml), or name another one{hint}"
    )]
    ConnectionNotFound {
        namespace: String,
        name: String,
        hint: String,
    },
    #[error(
        "KafkaConnection {namespace}/{name} is not Ready ({reason}: {message}): fix it first (kubectl describe kafkaconnection {name} -n {namespace})"
    )]
    ConnectionNotReady {
        namespace: String,
        name: String,
        reason: String,
        message: String,
    },
    #[error(
        "KafkaConnection {namespace}/{name}: {detail}: create the Secret or correct the reference"
    )]
    Secret {
        namespace: String,
        name: String,
        detail: String,
    },
    #[error("cannot read the kubeconfig ({0}): set KUBECONFIG, or pick a context with --context")]
    Kubeconfig(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("Kafka: {0}")]
    Admin(#[from] AdminError),
    #[error("Kafka: {operation}: {source}")]
    Kafka {
        operation: &'static str,
        source: rdkafka::error::KafkaError,
    },
    #[error(
        "consumer group {group} has {members} active member(s) ({clients}): stop them first (for a pipeline: kubectl scale eventpipeline NAME --replicas=0), as Kafka's kafka-consumer-groups tool requires; --dry-run shows the plan meanwhile"
    )]
    GroupActive {
        group: String,
        members: usize,
        clients: String,
    },
    #[error(
        "EventPipeline {namespace}/{name} has no spec.deadLetter: its failures stop it instead of being dead-lettered, so there is nothing to list"
    )]
    NoDeadLetter { namespace: String, name: String },
    /// Bad input on the command line.
    #[error("{0}")]
    Invalid(String),
}

impl PluginError {
    fn kafka(operation: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> PluginError {
        move |source| PluginError::Kafka { operation, source }
    }
}

/// Where a subcommand acts: the API client and the namespace (`-n`, else the kubeconfig
/// context's, else `default`).
#[derive(Clone)]
pub struct Target {
    pub client: Client,
    pub namespace: String,
    /// Bound on each Kafka request.
    pub kafka_timeout: Duration,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("namespace", &self.namespace)
            .field("kafka_timeout", &self.kafka_timeout)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Reads the user's kubeconfig (`KUBECONFIG`, else `~/.kube/config`, else the
    /// in-cluster service account), with `context` if given.
    pub async fn from_kubeconfig(
        context: Option<String>,
        namespace: Option<String>,
        kafka_timeout: Duration,
    ) -> Result<Target, PluginError> {
        let unreadable = |e: &dyn std::fmt::Display| PluginError::Kubeconfig(e.to_string());
        let config = match context {
            Some(context) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
                context: Some(context),
                ..Default::default()
            })
            .await
            .map_err(|e| unreadable(&e))?,
            None => kube::Config::infer().await.map_err(|e| unreadable(&e))?,
        };
        let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
        Ok(Target {
            client: Client::try_from(config)?,
            namespace,
            kafka_timeout,
        })
    }

    /// The EventPipeline `name` in the target namespace.
    pub async fn pipeline(&self, name: &str) -> Result<EventPipeline, PluginError> {
        let api: Api<EventPipeline> = Api::namespaced(self.client.clone(), &self.namespace);
        api.get_opt(name)
            .await?
            .ok_or_else(|| PluginError::PipelineNotFound {
                namespace: self.namespace.clone(),
                name: name.to_owned(),
            })
    }

    /// A Kafka client on the pipeline's KafkaConnection.
    pub async fn pipeline_kafka(&self, pipeline: &EventPipeline) -> Result<Kafka, PluginError> {
        let name = pipeline
            .spec
            .connection_ref
            .as_ref()
            .map_or(DEFAULT_CONNECTION, |r| r.name.as_str());
        let hint = if pipeline.spec.connection_ref.is_some() {
            format!(
                " in spec.connectionRef of EventPipeline {}",
                pipeline.name_any()
            )
        } else {
            format!(
                " with spec.connectionRef of EventPipeline {} (none is set, so {DEFAULT_CONNECTION:?} is used)",
                pipeline.name_any()
            )
        };
        self.kafka(name, hint).await
    }

    /// A Kafka client on the KafkaConnection `name` (`--connection`, `default` by default).
    pub async fn connection_kafka(&self, name: &str) -> Result<Kafka, PluginError> {
        self.kafka(name, " with --connection".to_owned()).await
    }

    async fn kafka(&self, name: &str, hint: String) -> Result<Kafka, PluginError> {
        let namespace = &self.namespace;
        let connections: Api<KafkaConnection> = Api::namespaced(self.client.clone(), namespace);
        let connection =
            connections
                .get_opt(name)
                .await?
                .ok_or_else(|| PluginError::ConnectionNotFound {
                    namespace: namespace.clone(),
                    name: name.to_owned(),
                    hint,
                })?;
        // A connection the operator found unusable is reported as such; one it has not
        // looked at yet (no status) is tried.
        if let Some(ready) = connection
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            && ready.status == ConditionStatus::False
        {
            return Err(PluginError::ConnectionNotReady {
                namespace: namespace.clone(),
                name: name.to_owned(),
                reason: ready.reason.clone(),
                message: ready.message.clone(),
            });
        }
        let config = self.client_config(name, &connection).await?;
        Kafka::new(config, self.kafka_timeout)
    }

    async fn client_config(
        &self,
        name: &str,
        connection: &KafkaConnection,
    ) -> Result<ClientConfig, PluginError> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let mut read: BTreeMap<String, Option<Secret>> = BTreeMap::new();
        for (_, selector) in weir_kafka::secret_selectors(&connection.spec) {
            if !read.contains_key(&selector.name) {
                let secret = secrets.get_opt(&selector.name).await?;
                read.insert(selector.name.clone(), secret);
            }
        }
        let credentials = Credentials::resolve(&connection.spec, |selector: &SecretKeySelector| {
            let secret = read
                .get(&selector.name)
                .and_then(Option::as_ref)
                .ok_or_else(|| format!("Secret {:?} does not exist", selector.name))?;
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(&selector.key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .ok_or_else(|| format!("Secret {:?} has no key {:?}", selector.name, selector.key))
        })
        .map_err(|e| PluginError::Secret {
            namespace: self.namespace.clone(),
            name: name.to_owned(),
            detail: e.to_string(),
        })?;
        let mut config = weir_kafka::client_config(&connection.spec, &credentials, Role::Admin);
        config
            .set("client.id", "kubectl-weir")
            .set("log_level", "3");
        Ok(config)
    }
}

/// How a report is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns for a person.
    #[default]
    Table,
    Json,
    Yaml,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" | "wide" => Ok(Format::Table),
            "json" => Ok(Format::Json),
            "yaml" => Ok(Format::Yaml),
            other => Err(format!("-o {other:?}: use table, json or yaml")),
        }
    }
}

/// A report printable as a table or as JSON/YAML.
pub trait Report: serde::Serialize {
    /// The text a person reads.
    fn table(&self) -> String;
}

/// `report` in `format`.
pub fn render<R: Report>(report: &R, format: Format) -> Result<String, PluginError> {
    let failed = |e: &dyn std::fmt::Display| PluginError::Invalid(format!("rendering: {e}"));
    match format {
        Format::Table => Ok(report.table()),
        Format::Json => serde_json::to_string_pretty(report)
            .map(|s| s + "\n")
            .map_err(|e| failed(&e)),
        Format::Yaml => serde_yaml_ng::to_string(report).map_err(|e| failed(&e)),
    }
}

/// A point in time given on the command line: RFC 3339 (`2026-11-23T10:00:00Z`) or a
/// duration before now (`90m`, `2h`, `1d`), as milliseconds since the epoch.
pub fn parse_time(text: &str) -> Result<i64, PluginError> {
    if let Some(ago) = parse_duration(text) {
        let at = SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| PluginError::Invalid(format!("{text:?} is before 1970")))?;
        return Ok(millis(at));
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|_| {
            PluginError::Invalid(format!(
                "{text:?} is neither an RFC 3339 time (2026-11-23T10:00:00Z) nor a duration before now (90m, 2h)"
            ))
        })
}

fn millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Milliseconds since the epoch as RFC 3339.
pub fn format_millis(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(at) => format!("{at:.3}"),
        Err(_) => ms.to_string(),
    }
}

/// A duration such as `90s`, `15m`, `2h` or `1h30m`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let signed = text.parse::<jiff::SignedDuration>().ok()?;
    Duration::try_from(signed).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_durations_before_now() {
        assert_eq!(
            parse_time("2026-11-23T10:00:00Z").unwrap(),
            1_795_428_000_000
        );
        let hour_ago = parse_time("1h").unwrap();
        let now = millis(SystemTime::now());
        assert!((now - hour_ago - 3_600_000).abs() < 60_000);
        let error = parse_time("yesterday").unwrap_err().to_string();
        assert!(error.contains("RFC 3339"), "{error}");
        assert_eq!(format_millis(1_795_428_000_000), "2026-11-23T10:00:00.000Z");
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("soon"), None);
    }
}
