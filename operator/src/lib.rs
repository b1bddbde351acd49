//! Weir's operator: a controller per resource kind (KafkaConnection, KafkaTopic,
//! EventPipeline) in one binary, leader-elected through a Lease, with Prometheus metrics.
//!
//! - [`controllers`]: one folder per kind in stages (dereference, validate, build, apply,
//!   status); [`render`] is the pipeline's build stage: pure functions from an
//!   EventPipeline to the objects that run it.
//! - [`apply`]: the one server-side-apply helper, and the deletion of orphaned children.
//! - [`error`]: the reconcile error and its bounded categories.
//! - [`kafka`]: the Kafka admin operations a KafkaTopic needs, with timeouts.
//! - [`connection`]: the KafkaConnection controller.
//! - [`leader`]: Lease-based leader election.
//! - [`rbac`]: the one list of API permissions the code uses (the chart's ClusterRole is
//!   checked against it).

pub mod apply;
pub mod autoscale;
pub mod conditions;
pub mod config;
pub mod connection;
pub mod context;
pub mod controllers;
pub mod error;
pub mod kafka;
pub mod leader;
pub mod metrics;
pub mod plugin;
pub mod rbac;

/// The pipeline's build stage, by its usual name.
pub use controllers::pipeline::build as render;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "weir-operator";

/// The CustomResourceDefinitions as one multi-document YAML stream, ready for
/// `kubectl apply --server-side -f -`.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for (i, crd) in weir_crds::crds().iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml_ng::to_string(crd)?);
    }
    Ok(out)
}

/// Leadership was lost: another replica may act now, so this one must stop.
#[derive(Debug, thiserror::Error)]
#[error("lost the leader Lease {0}: stopping so a restart campaigns again")]
pub struct LostLease(String);

/// Campaigns for the leader Lease, runs the controllers while holding it, and stops them
/// when `shutdown` resolves (then releases the Lease so another replica leads at once) or
/// when the Lease is lost (an error: the caller should exit).
pub async fn run(
    client: kube::Client,
    config: config::OperatorConfig,
    metrics: std::sync::Arc<metrics::Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), LostLease> {
    let elector = leader::Elector::new(
        client.clone(),
        &config.lease_namespace,
        &config.lease_name,
        &config.identity,
        config.lease_duration,
    );
    let lease = format!("{}/{}", config.lease_namespace, config.lease_name);
    tracing::info!(identity = %config.identity, %lease, "waiting for the leader Lease");
    let mut shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        () = elector.acquire(std::time::Duration::from_secs(2)) => {}
        () = &mut shutdown => return Ok(()),
    }
    metrics.set_leader(true);
    tracing::info!(identity = %config.identity, "leading: starting the controllers");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controllers = tokio::spawn(controllers::run(
        client,
        config,
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let lost = tokio::select! {
        () = elector.keep() => true,
        () = &mut shutdown => false,
    };
    // Finish the reconciles in flight before anyone else may act.
    let _ = stop.send(());
    let _ = controllers.await;
    metrics.set_leader(false);
    if lost {
        return Err(LostLease(lease));
    }
    if let Err(e) = elector.release().await {
        tracing::warn!(error = %e, "cannot release the leader Lease; it expires on its own");
    }
    Ok(())
}
