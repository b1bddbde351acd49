//! What a worker runs: the EventPipeline from its file, the Kafka client settings from a
//! KafkaConnection in the same file (or flags), and secret values from the environment or
//! files, never from logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;
use weir_crds::load::Resource;
use weir_crds::{
    DEFAULT_CONNECTION, EventPipelineSpec, KafkaConnectionSpec, KafkaTopicSpec, Manifest, Problems,
    SecretKeySelector, SecretSource,
};

use crate::kafka::{Credentials, Role};
use crate::sink::Replay;

/// Settings from the command line or environment that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub bootstrap_servers: Option<String>,
    pub namespace: Option<String>,
    pub instance_id: Option<String>,
    /// Records decoded and transformed at once; default: the cores the worker may use.
    pub transform_threads: Option<usize>,
    /// The EventPipeline to run when the file holds several.
    pub pipeline: Option<String>,
    /// A replay to carry out in the sinks before consuming (the group was reset).
    pub replay: Option<Replay>,
}

/// A pipeline ready to run.
#[derive(Clone)]
pub struct WorkerConfig {
    pub name: String,
    pub namespace: String,
    pub spec: EventPipelineSpec,
    /// Client properties shared by the consumer and producers (with the connection's
    /// secrets: never log them).
    pub kafka: ClientConfig,
    /// Names the Kafka connection in log lines: `KafkaConnection <namespace>/<name>`, or
    /// the bootstrap servers given on the command line.
    pub connection: String,
    /// Producer properties of the other clusters kafka sinks name in `connectionRef`, by
    /// KafkaConnection name (with their secrets: never log them).
    pub sink_connections: BTreeMap<String, ClientConfig>,
    /// Static group membership (`group.instance.id`), e.g. the pod name.
    pub instance_id: Option<String>,
    /// Records decoded and transformed at once, one thread each.
    pub transform_threads: usize,
    /// A replay to carry out in the sinks before consuming: the consumer group was reset
    /// (by the operator's `spec.replay`, or by hand), and the first worker to start with
    /// this token makes the sinks forget their kept offsets and keys, truncating when asked.
    pub replay: Option<Replay>,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not `kafka`: it holds the connection's password and private key.
        f.debug_struct("WorkerConfig")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("connection", &self.connection)
            .field("instance_id", &self.instance_id)
            .field("transform_threads", &self.transform_threads)
            .finish_non_exhaustive()
    }
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

/// A pipeline file's contents: its EventPipelines, KafkaConnections and KafkaTopics.
#[derive(Clone, Debug)]
pub struct PipelineFile {
    pub pipelines: Vec<Manifest<EventPipelineSpec>>,
    pub connections: Vec<Manifest<KafkaConnectionSpec>>,
    /// KafkaTopics in the file: the worker does not apply them, but the embedded broker
    /// takes their partitions.
    pub topics: Vec<Manifest<KafkaTopicSpec>>,
}

impl PipelineFile {
    /// The EventPipeline to run: the one named `name`, or the file's only one.
    pub fn pick(
        &self,
        path: &Path,
        name: Option<&str>,
    ) -> Result<&Manifest<EventPipelineSpec>, ConfigError> {
        let names = || {
            self.pipelines
                .iter()
                .map(|p| p.metadata.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let unusable = |message: String| ConfigError::Unusable {
            path: path.to_owned(),
            message,
        };
        match (name, self.pipelines.as_slice()) {
            (None, [only]) => Ok(only),
            (None, []) => Err(unusable("holds no EventPipeline".into())),
            (None, _) => Err(unusable(format!(
                "holds {} EventPipelines ({}): pick one with --pipeline NAME",
                self.pipelines.len(),
                names()
            ))),
            (Some(name), _) => self
                .pipelines
                .iter()
                .find(|p| p.metadata.name == name)
                .ok_or_else(|| {
                    unusable(format!(
                        "has no EventPipeline named {name:?}; it holds: {}",
                        names()
                    ))
                }),
        }
    }

    /// The KafkaConnection a pipeline uses, when the file holds it.
    pub fn connection_of(
        &self,
        spec: &EventPipelineSpec,
    ) -> Option<&Manifest<KafkaConnectionSpec>> {
        let wanted = spec
            .connection_ref
            .as_ref()
            .map_or(DEFAULT_CONNECTION, |r| r.name.as_str());
        self.connections.iter().find(|c| c.metadata.name == wanted)
    }
}

/// Reads a pipeline file (YAML, one or more documents).
pub fn read(path: &Path) -> Result<PipelineFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let resources = weir_crds::load::from_yaml(&text).map_err(|source| ConfigError::Load {
        path: path.to_owned(),
        source,
    })?;
    let mut file = PipelineFile {
        pipelines: Vec::new(),
        connections: Vec::new(),
        topics: Vec::new(),
    };
    for resource in resources {
        match resource {
            Resource::EventPipeline(p) => file.pipelines.push(p),
            Resource::KafkaConnection(c) => file.connections.push(c),
            Resource::KafkaTopic(t) => file.topics.push(t),
        }
    }
    Ok(file)
}

/// The worker's start-up checks of a pipeline, short of connecting: `validate()` (shared
/// with the operator), then compiling every expression and building every sink from its
/// spec, with placeholder connection URLs where the real ones come from secrets.
pub fn check(path: &Path, pipeline: &Manifest<EventPipelineSpec>) -> Result<(), ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        path: path.to_owned(),
        name: pipeline.metadata.name.clone(),
        problems,
    };
    pipeline.spec.validate().map_err(invalid)?;
    let unusable = |message: String| ConfigError::Unusable {
        path: path.to_owned(),
        message: format!("EventPipeline {:?}: {message}", pipeline.metadata.name),
    };
    crate::transform::Transformer::from_spec(&pipeline.spec).map_err(unusable)?;
    crate::sink::check(&pipeline.spec).map_err(unusable)?;
    Ok(())
}

/// A replay that truncates needs sinks that can be emptied (the check `validate()` makes
/// of `spec.replay.truncateSinks`).
fn check_truncatable(
    path: &Path,
    pipeline: &Manifest<EventPipelineSpec>,
    token: &str,
) -> Result<(), ConfigError> {
    for (i, sink) in pipeline.spec.sinks.iter().enumerate() {
        for kind in sink.kinds() {
            if let Some(why) = weir_crds::untruncatable(kind) {
                return Err(ConfigError::Unusable {
                    path: path.to_owned(),
                    message: format!(
                        "EventPipeline {:?}: replay {token} asks to truncate the sinks, but the {kind} sink spec.sinks[{i}] cannot be truncated: {why}",
                        pipeline.metadata.name
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Reads the pipeline file and resolves what running it needs: the pipeline `overrides`
/// names (or the file's only one), checked as [`check`] does, and its KafkaConnection.
pub fn load(path: &Path, overrides: &Overrides) -> Result<WorkerConfig, ConfigError> {
    let file = read(path)?;
    let pipeline = file.pick(path, overrides.pipeline.as_deref())?;
    check(path, pipeline)?;
    if let Some(replay) = overrides.replay.as_ref().filter(|r| r.truncate) {
        check_truncatable(path, pipeline, &replay.token)?;
    }
    let connection = file.connection_of(&pipeline.spec);
    if let Some(connection) = connection {
        connection
            .spec
            .validate()
            .map_err(|problems| ConfigError::Invalid {
                path: path.to_owned(),
                name: connection.metadata.name.clone(),
                problems,
            })?;
    }
    let kafka = client_config(
        connection.map(|c| &c.spec),
        overrides.bootstrap_servers.as_deref(),
    )
    .map_err(|message| ConfigError::Unusable {
        path: path.to_owned(),
        message: match connection {
            Some(c) => format!("KafkaConnection {:?}: {message}", c.metadata.name),
            None => message,
        },
    })?;
    let sink_connections = sink_connections(path, &file, pipeline)?;
    let namespace = overrides
        .namespace
        .clone()
        .or(pipeline.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    Ok(WorkerConfig {
        name: pipeline.metadata.name.clone(),
        namespace: namespace.clone(),
        spec: pipeline.spec.clone(),
        kafka,
        connection: match (&overrides.bootstrap_servers, connection) {
            (Some(servers), _) => format!("Kafka at {servers}"),
            (None, Some(c)) => format!(
                "KafkaConnection {}/{}",
                c.metadata.namespace.as_deref().unwrap_or(&namespace),
                c.metadata.name
            ),
            (None, None) => "Kafka".to_owned(),
        },
        sink_connections,
        instance_id: overrides.instance_id.clone(),
        transform_threads: overrides
            .transform_threads
            .unwrap_or_else(crate::shards::default_threads),
        replay: overrides.replay.clone(),
    })
}

/// The producer properties of every KafkaConnection the pipeline's kafka sinks name in
/// `connectionRef` (each from the file, with its secrets from the environment).
fn sink_connections(
    path: &Path,
    file: &PipelineFile,
    pipeline: &Manifest<EventPipelineSpec>,
) -> Result<BTreeMap<String, ClientConfig>, ConfigError> {
    let mut out = BTreeMap::new();
    for (i, sink) in pipeline.spec.sinks.iter().enumerate() {
        let Some(reference) = sink.kafka.as_ref().and_then(|k| k.connection_ref.as_ref()) else {
            continue;
        };
        let unusable = |message: String| ConfigError::Unusable {
            path: path.to_owned(),
            message: format!(
                "EventPipeline {:?}: spec.sinks[{i}].kafka.connectionRef: {message}",
                pipeline.metadata.name
            ),
        };
        let Some(connection) = file
            .connections
            .iter()
            .find(|c| c.metadata.name == reference.name)
        else {
            return Err(unusable(format!(
                "the file holds no KafkaConnection named {:?}: add it (the operator does)",
                reference.name
            )));
        };
        connection
            .spec
            .validate()
            .map_err(|problems| ConfigError::Invalid {
                path: path.to_owned(),
                name: connection.metadata.name.clone(),
                problems,
            })?;
        let credentials = Credentials::resolve(&connection.spec, kafka_secret)
            .map_err(|e| unusable(format!("KafkaConnection {:?}: {e}", reference.name)))?;
        out.insert(
            reference.name.clone(),
            crate::kafka::client_config(&connection.spec, &credentials, Role::Producer),
        );
    }
    Ok(out)
}

/// Client properties from a KafkaConnection (TLS and SASL included, its Secret keys read
/// from the variables the operator sets, see [`kafka_secret`]), with `bootstrap` taking
/// precedence over its servers. A Kafka sink's producer starts from these too, or calls
/// [`crate::kafka::client_config`] with [`crate::kafka::Role::Producer`].
pub fn client_config(
    connection: Option<&KafkaConnectionSpec>,
    bootstrap: Option<&str>,
) -> Result<ClientConfig, String> {
    let mut config = match connection {
        Some(spec) => {
            let credentials =
                Credentials::resolve(spec, kafka_secret).map_err(|e| e.to_string())?;
            crate::kafka::client_config(spec, &credentials, Role::Consumer)
        }
        None => ClientConfig::new(),
    };
    match (bootstrap, connection) {
        (Some(servers), _) => {
            config.set("bootstrap.servers", servers);
        }
        (None, Some(_)) => {}
        (None, None) => {
            return Err(format!(
                "no Kafka connection: add a KafkaConnection named {DEFAULT_CONNECTION:?} (or the pipeline's connectionRef) to the file, or pass --bootstrap-servers"
            ));
        }
    }
    Ok(config)
}

/// A Secret key of a KafkaConnection, as the worker receives it: the environment variable
/// the operator sets from it (`WEIR_SECRET_<NAME>_<KEY>`); outside Kubernetes, set it
/// yourself.
pub fn kafka_secret(selector: &SecretKeySelector) -> Result<String, String> {
    let name = selector.env_name();
    std::env::var(&name).map_err(|_| {
        format!(
            "is not available: in Kubernetes the operator sets {name} from it; outside, set {name}"
        )
    })
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
