//! The objects a pipeline's reconcile reads before it writes anything: its KafkaConnection
//! (from the cache) and its worker Deployment as it is now (for the Created and Rolled
//! Events and the ready count). The only IO before apply.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt as _;
use kube::api::Api;
use weir_crds::{EventPipeline, KafkaConnection};

use super::build::{Names, connection_name};
use crate::context::{Context, Error};

/// What a pipeline refers to.
#[derive(Clone, Debug)]
pub struct Dereferenced {
    /// The KafkaConnection's namespace-qualified name, whether or not it exists.
    pub connection_name: String,
    pub connection: Option<Arc<KafkaConnection>>,
    /// The worker Deployment, when it exists.
    pub deployment: Option<Deployment>,
}

pub async fn dereference(ctx: &Context, pipeline: &EventPipeline) -> Result<Dereferenced, Error> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let name = connection_name(pipeline.spec.connection_ref.as_ref(), &ctx.config).to_owned();
    let connection = ctx.connection(&namespace, &name);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let deployment = deployments
        .get_opt(&Names::of(&pipeline.name_any()).worker)
        .await?;
    Ok(Dereferenced {
        connection_name: name,
        connection,
        deployment,
    })
}
