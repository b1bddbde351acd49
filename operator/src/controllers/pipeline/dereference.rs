//! What a pipeline's reconcile reads before it writes anything: its KafkaConnection (from
//! the cache), its worker Deployment as it is now (for the Created and Rolled Events, the
//! replica count and the ready count), and its consumer group's lag from the broker. The
//! only IO before apply.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt as _;
use kube::api::Api;
use weir_crds::{EventPipeline, KafkaConnection};

use super::build::{Names, connection_name};
use crate::autoscale::lag::{self, Reading};
use crate::connection;
use crate::context::{Context, Error};

/// What a pipeline refers to.
#[derive(Clone, Debug)]
pub struct Dereferenced {
    /// The KafkaConnection's namespace-qualified name, whether or not it exists.
    pub connection_name: String,
    pub connection: Option<Arc<KafkaConnection>>,
    /// The KafkaConnections its kafka sinks name in `connectionRef`: (name, the object when
    /// it exists), in the order of the sinks.
    pub sink_connections: Vec<(String, Option<Arc<KafkaConnection>>)>,
    /// The worker Deployment, when it exists.
    pub deployment: Option<Deployment>,
    /// The consumer group's offsets, or why they could not be read (not read without a
    /// connection).
    pub lag: Option<Result<Reading, String>>,
}

pub async fn dereference(ctx: &Context, pipeline: &EventPipeline) -> Result<Dereferenced, Error> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let name = connection_name(pipeline.spec.connection_ref.as_ref(), &ctx.config).to_owned();
    let connection = ctx.connection(&namespace, &name);
    let sink_connections = sink_connection_names(pipeline)
        .into_iter()
        .map(|name| {
            let found = ctx.connection(&namespace, &name);
            (name, found)
        })
        .collect();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let deployment = deployments
        .get_opt(&Names::of(&pipeline.name_any()).worker)
        .await?;
    let lag = match &connection {
        Some(connection) => Some(read_lag(ctx, pipeline, &namespace, connection).await),
        None => None,
    };
    Ok(Dereferenced {
        connection_name: name,
        connection,
        sink_connections,
        deployment,
        lag,
    })
}

/// The KafkaConnections a pipeline's kafka sinks name in `connectionRef`, each once.
pub fn sink_connection_names(pipeline: &EventPipeline) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for sink in &pipeline.spec.sinks {
        if let Some(reference) = sink.kafka.as_ref().and_then(|k| k.connection_ref.as_ref())
            && !names.contains(&reference.name)
        {
            names.push(reference.name.clone());
        }
    }
    names
}

/// A failure to read the lag does not fail the reconcile: the replicas stay as they are
/// and the status says why.
async fn read_lag(
    ctx: &Context,
    pipeline: &EventPipeline,
    namespace: &str,
    connection: &KafkaConnection,
) -> Result<Reading, String> {
    let config = connection::client_config(&ctx.client, namespace, &connection.spec)
        .await
        .map_err(|e| e.to_string())?;
    let admin = ctx.admin(&config).map_err(|e| e.to_string())?;
    let group = pipeline
        .spec
        .consumer_group(namespace, &pipeline.name_any());
    lag::read(
        &admin,
        &group,
        &pipeline.spec.source.topics,
        pipeline.spec.source.start_position,
    )
    .await
    .map_err(|e| e.to_string())
}
