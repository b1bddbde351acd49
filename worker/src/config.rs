//! What a worker runs: the EventPipeline from its file, the Kafka client settings from a
//! KafkaConnection in the same file (or flags), and secret values from the environment or
//! files, never from logs.

use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;
use weir_crds::load::Resource;
use weir_crds::{
    DEFAULT_CONNECTION, EventPipelineSpec, KafkaConnectionSpec, KafkaTopicSpec, Manifest, Problems,
    SecretSource,
};

/// Settings from the command line or environment that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub bootstrap_servers: Option<String>,
    pub namespace: Option<String>,
    pub instance_id: Option<String>,
}

/// A pipeline ready to run.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub name: String,
    pub namespace: String,
    pub spec: EventPipelineSpec,
    /// Client properties shared by the consumer and producers.
    pub kafka: ClientConfig,
    /// Static group membership (`group.instance.id`), e.g. the pod name.
    pub instance_id: Option<String>,
}

impl WorkerConfig {
    pub fn consumer_group(&self) -> String {
        self.spec.consumer_group(&self.namespace, &self.name)
    }
}

/// Why a pipeline file cannot be run. `Invalid` is the user's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Load {
        path: PathBuf,
        source: weir_crds::LoadError,
    },
    #[error("{path}: EventPipeline {name:?} is invalid, {problems}")]
    Invalid {
        path: PathBuf,
        name: String,
        problems: Problems,
    },
    #[error("{path}: {message}")]
    Unusable { path: PathBuf, message: String },
}

impl ConfigError {
    /// Whether the user must change the file or flags (as opposed to an I/O failure).
    pub fn is_spec_error(&self) -> bool {
        !matches!(self, ConfigError::Read { .. })
    }
}

/// A pipeline file's contents: its one EventPipeline (validated) and any KafkaConnections.
#[derive(Clone, Debug)]
pub struct PipelineFile {
    pub pipeline: Manifest<EventPipelineSpec>,
    pub connections: Vec<Manifest<KafkaConnectionSpec>>,
    /// KafkaTopics in the file: the worker does not apply them, but the embedded broker
    /// takes their partitions.
    pub topics: Vec<Manifest<KafkaTopicSpec>>,
}

/// Reads and validates a pipeline file: exactly one EventPipeline, optionally
/// KafkaConnections and KafkaTopics.
pub fn read(path: &Path) -> Result<PipelineFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let resources = weir_crds::load::from_yaml(&text).map_err(|source| ConfigError::Load {
        path: path.to_owned(),
        source,
    })?;
    let unusable = |message: String| ConfigError::Unusable {
        path: path.to_owned(),
        message,
    };
    let mut pipelines = Vec::new();
    let mut connections = Vec::new();
    let mut topics = Vec::new();
    for resource in resources {
        match resource {
            Resource::EventPipeline(p) => pipelines.push(p),
            Resource::KafkaConnection(c) => connections.push(c),
            Resource::KafkaTopic(t) => topics.push(t),
        }
    }
    let pipeline = match pipelines.len() {
        1 => pipelines.remove(0),
        n => {
            return Err(unusable(format!(
                "expected exactly one EventPipeline, found {n}"
            )));
        }
    };
    pipeline
        .spec
        .validate()
        .map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            name: pipeline.metadata.name.clone(),
            problems,
        })?;
    Ok(PipelineFile {
        pipeline,
        connections,
        topics,
    })
}

/// Reads the pipeline file and resolves what running it needs.
pub fn load(path: &Path, overrides: &Overrides) -> Result<WorkerConfig, ConfigError> {
    let PipelineFile {
        pipeline,
        connections,
        ..
    } = read(path)?;
    let unusable = |message: String| ConfigError::Unusable {
        path: path.to_owned(),
        message,
    };
    let wanted = pipeline
        .spec
        .connection_ref
        .as_ref()
        .map_or(DEFAULT_CONNECTION, |r| r.name.as_str());
    let connection = connections
        .iter()
        .find(|c| c.metadata.name == wanted)
        .map(|c| &c.spec);
    if let Some(connection) = connection {
        connection
            .validate()
            .map_err(|problems| ConfigError::Invalid {
                path: path.to_owned(),
                name: wanted.to_owned(),
                problems,
            })?;
    }
    let kafka =
        client_config(connection, overrides.bootstrap_servers.as_deref()).map_err(unusable)?;
    let namespace = overrides
        .namespace
        .clone()
        .or(pipeline.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    Ok(WorkerConfig {
        name: pipeline.metadata.name,
        namespace,
        spec: pipeline.spec,
        kafka,
        instance_id: overrides.instance_id.clone(),
    })
}

/// Client properties from a KafkaConnection, with `bootstrap` taking precedence.
pub fn client_config(
    connection: Option<&KafkaConnectionSpec>,
    bootstrap: Option<&str>,
) -> Result<ClientConfig, String> {
    let mut config = ClientConfig::new();
    let servers = match (bootstrap, connection) {
        (Some(servers), _) => servers.to_owned(),
        (None, Some(c)) => c.bootstrap_servers.join(","),
        (None, None) => {
            return Err(format!(
                "no Kafka connection: add a KafkaConnection named {DEFAULT_CONNECTION:?} (or the pipeline's connectionRef) to the file, or pass --bootstrap-servers"
            ));
        }
    };
    config.set("bootstrap.servers", servers);
    if let Some(c) = connection {
        if c.tls.is_some() || c.sasl.is_some() {
            return Err("KafkaConnection tls/sasl are not supported by this worker build yet: use a plaintext listener or --bootstrap-servers".into());
        }
        for (key, value) in &c.properties {
            config.set(key, value);
        }
    }
    Ok(config)
}

/// The value a SecretSource names: an environment variable, a file, or (in Kubernetes)
/// the variable the operator sets for a Secret key.
pub fn resolve_secret(source: &SecretSource) -> Result<String, String> {
    if let Some(name) = &source.env {
        return std::env::var(name).map_err(|_| format!("environment variable {name} is not set"));
    }
    if let Some(path) = &source.file {
        return std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("cannot read {path}: {e}"));
    }
    if let Some(selector) = &source.secret_key_ref {
        let name = selector.env_name();
        return std::env::var(&name).map_err(|_| {
            format!(
                "Secret {:?} key {:?} is not available: outside Kubernetes set {name}, or use env or file instead",
                selector.name, selector.key
            )
        });
    }
    Err("set one of secretKeyRef, env, file".into())
}
