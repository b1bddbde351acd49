//! The controllers, one folder per kind in stages, and their wiring: one controller per
//! kind, sharing caches of KafkaConnections and KafkaTopics. (KafkaConnection's lives in
//! `crate::connection`.)

pub mod pipeline;
pub mod topic;

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::Controller;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::watcher;
use kube::{Api, Client};
use weir_crds::{EventPipeline, KafkaConnection, KafkaTopic};

use crate::config::OperatorConfig;
use crate::connection;
use crate::context::Context;
use crate::metrics::Metrics;

/// An Api over the watched namespaces: the single one configured, else all (several
/// namespaces are filtered in `Context::reconcile`).
fn api<K>(client: &Client, config: &OperatorConfig) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match config.namespaces.as_slice() {
        [one] => Api::namespaced(client.clone(), one),
        _ => Api::all(client.clone()),
    }
}

/// Reconciles run at once by each controller.
pub const RECONCILE_CONCURRENCY: u16 = 16;

/// Runs the three controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));
    // Reconciles at once per controller: enough to keep the broker busy, few enough that a
    // burst of thousands of resources neither times out admin requests nor grows memory.
    let limits = ControllerConfig::default().concurrency(RECONCILE_CONCURRENCY);
    let watch = watcher::Config::default().any_semantic();
    let connections = Controller::new(api::<KafkaConnection>(&client, &config), watch.clone());
    let connection_store = connections.store();
    let connections = connections.watches(
        api::<Secret>(&client, &config),
        watch.clone(),
        connection::secret_mapper(connection_store.clone()),
    );
    let topics = Controller::new(api::<KafkaTopic>(&client, &config), watch.clone());
    let topic_store = topics.store();
    let pipelines = Controller::new(api::<EventPipeline>(&client, &config), watch.clone());
    let pipeline_store = pipelines.store();
    let pipelines = pipelines
        .owns(api::<Deployment>(&client, &config), watch.clone())
        .owns(api::<ConfigMap>(&client, &config), watch.clone())
        .watches(
            api::<KafkaConnection>(&client, &config),
            watch.clone(),
            pipeline::connection_mapper(pipeline_store, config.default_connection.clone()),
        );
    let ctx = Arc::new(Context::new(
        client.clone(),
        config,
        metrics.clone(),
        connection_store,
        topic_store,
    ));
    let connections = connections
        .with_config(limits.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(connection::reconcile, connection::error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(controller = connection::KIND, error = %e, "reconcile did not complete");
            }
        });
    let topics = topics
        .with_config(limits.clone())
        .graceful_shutdown_on(shutdown.clone())
        .run(topic::reconcile, topic::error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(controller = topic::KIND, error = %e, "reconcile did not complete");
            }
        });
    let pipelines = pipelines
        .with_config(limits.clone())
        .graceful_shutdown_on(shutdown)
        .run(pipeline::reconcile, pipeline::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(controller = pipeline::KIND, error = %e, "reconcile did not complete");
            }
        });
    futures::join!(connections, topics, pipelines);
}
