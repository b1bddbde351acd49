//! EventPipeline, in stages: [`dereference`] (its KafkaConnection and current Deployment:
//! the only IO before apply) → [`validate`] (pure: the worker's own `validate()`, CEL
//! included, and what the connection allows) → [`build`] (pure: every child object) →
//! apply (server-side apply of each child, then the deletion of labelled children the
//! spec no longer has) → [`status`] (pure). An apply that changes nothing is not stored by
//! the API server, so a second reconcile writes nothing. Replicas are set through the
//! Deployment's scale subresource, never by the apply: `spec.replicas` when pinned, else
//! `scaling.minReplicas`.

pub mod build;
pub mod dereference;
pub mod replay;
pub mod status;
pub mod validate;

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::json;
use weir_crds::condition::types::READY;
use weir_crds::{EventPipeline, KafkaConnection, KafkaTopic};

use crate::apply::{apply, delete_orphans};
use crate::conditions;
use crate::context::{Context, Error};
use build::{CONFIG_HASH_ANNOTATION, Names, Rendered, render_with};
use validate::Refusal;

pub const KIND: &str = "EventPipeline";

/// The pipelines that use a KafkaConnection (by reference, as the namespace's default, or in
/// a kafka sink's connectionRef), so a change to it re-renders them (and a pipeline refused
/// for its connection is reconsidered).
pub fn connection_mapper(
    pipelines: Store<EventPipeline>,
    default_connection: String,
) -> impl Fn(KafkaConnection) -> Vec<ObjectRef<EventPipeline>> + Send + Sync + 'static {
    move |connection| {
        let namespace = connection.namespace();
        let name = connection.name_any();
        pipelines
            .state()
            .iter()
            .filter(|p| {
                p.namespace() == namespace
                    && (p
                        .spec
                        .connection_ref
                        .as_ref()
                        .map_or(default_connection.as_str(), |r| r.name.as_str())
                        == name
                        || dereference::sink_connection_names(p).contains(&name))
            })
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect()
    }
}

/// Reports why the pipeline cannot run (`Ready=False` with the refusal's reason, and a
/// Warning Event when the reason is new) and applies nothing.
async fn refuse(
    ctx: &Context,
    pipeline: &EventPipeline,
    refusal: Refusal,
) -> Result<Action, Error> {
    let was = pipeline
        .status
        .as_ref()
        .and_then(|s| conditions::reason(&s.conditions, READY))
        .map(str::to_owned);
    // Not run: no figures to report.
    ctx.metrics.forget_pipeline(
        &pipeline.namespace().unwrap_or_default(),
        &pipeline.name_any(),
    );
    let status = status::refused(pipeline, &refusal);
    ctx.write_status(pipeline, pipeline.status.as_ref(), &status)
        .await?;
    if was.as_deref() != Some(refusal.reason) {
        ctx.event(pipeline, true, refusal.reason, refusal.message.clone())
            .await;
    }
    Ok(if refusal.spec {
        Action::await_change()
    } else {
        // What it refers to is watched; the requeue is a safety net.
        Action::requeue(ctx.config.resync)
    })
}

pub async fn reconcile(pipeline: Arc<EventPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.reconcile(KIND, pipeline.as_ref(), reconcile_inner(&pipeline, &ctx))
        .await
}

async fn reconcile_inner(pipeline: &EventPipeline, ctx: &Context) -> Result<Action, Error> {
    let refs = dereference::dereference(ctx, pipeline).await?;
    let connection = match validate::validate(pipeline, &refs) {
        Ok(connection) => connection,
        Err(refusal) => return refuse(ctx, pipeline, refusal).await,
    };
    let uid = pipeline.uid().unwrap_or_default();
    let replayed = ctx.autoscaler(&uid, |s| s.replayed.clone())?;
    // Rendered as carried out as soon as this operator recorded it, even before the cache
    // shows the status: workers started without the token would skip the truncation.
    let seen = replay::remembered(pipeline, replayed.as_ref());
    let sink_connections: Vec<&KafkaConnection> = refs
        .sink_connections
        .iter()
        .filter_map(|(_, c)| c.as_deref())
        .collect();
    let rendered = match render_with(&seen, Some(&connection), &sink_connections, &ctx.config) {
        Ok(rendered) => rendered,
        Err(e) => {
            let refusal = Refusal {
                reason: "InvalidSpec",
                message: e.to_string(),
                spec: true,
            };
            return refuse(ctx, pipeline, refusal).await;
        }
    };
    if let Some(pending) = replay::pending(pipeline)
        && replayed.as_ref().map(|r| r.token.as_str()) != Some(pending.token.as_str())
    {
        return run_replay(ctx, pipeline, &refs, &rendered, &connection, pending).await;
    }
    let before = refs
        .deployment
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.replicas);
    let (step, unread) = match refs.lag {
        Some(Ok(reading)) if !reading.offsets.is_empty() => {
            let step = ctx.autoscaler(&uid, |state| {
                state.step(&pipeline.spec, reading, before.unwrap_or(0))
            })?;
            (Some(step), None)
        }
        Some(Ok(_)) => (None, None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let desired = status::replicas(pipeline, before, step.as_ref());
    let deployment = match refs.deployment.clone() {
        Some(d)
            if ctx.applied_recently(&uid, pipeline.metadata.generation, &rendered.config_hash) =>
        {
            d
        }
        _ => {
            let d = apply_all(ctx, pipeline, &rendered).await?;
            ctx.mark_applied(&uid, pipeline.metadata.generation, &rendered.config_hash);
            announce(ctx, pipeline, refs.deployment.as_ref(), &rendered).await;
            d
        }
    };
    let current = deployment.spec.as_ref().and_then(|s| s.replicas);
    if current != Some(desired) {
        scale(
            ctx,
            &pipeline.namespace().unwrap_or_default(),
            &rendered.deployment.name_any(),
            desired,
        )
        .await?;
    }
    let scaling = status::Scaling {
        replicas: desired,
        before,
        pinned: pipeline.spec.replicas,
        step: step.as_ref(),
        unread,
    };
    if before.is_some_and(|b| b != desired)
        && scaling.pinned.is_none()
        && let Some(step) = &step
    {
        ctx.event(
            pipeline,
            false,
            "Scaled",
            format!(
                "{} → {} worker(s): {}",
                before.unwrap_or_default(),
                desired,
                step.decision.message
            ),
        )
        .await;
    }
    let status = status::scaled(
        status::running(pipeline, &deployment, desired),
        pipeline,
        &scaling,
    );
    record(ctx, pipeline, &status);
    ctx.write_status(pipeline, pipeline.status.as_ref(), &status)
        .await?;
    Ok(Action::requeue(ctx.config.lag_interval))
}

/// One step of a replay: the workers scaled to zero, then (no member left) the group
/// reset and the replay recorded; the next reconcile scales the workers back.
async fn run_replay(
    ctx: &Context,
    pipeline: &EventPipeline,
    refs: &dereference::Dereferenced,
    rendered: &Rendered,
    connection: &KafkaConnection,
    pending: &weir_crds::Replay,
) -> Result<Action, Error> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let uid = pipeline.uid().unwrap_or_default();
    let deployment = match refs.deployment.clone() {
        Some(d) => d,
        None => {
            let d = apply_all(ctx, pipeline, rendered).await?;
            ctx.mark_applied(&uid, pipeline.metadata.generation, &rendered.config_hash);
            d
        }
    };
    if deployment.spec.as_ref().and_then(|s| s.replicas) != Some(0) {
        scale(ctx, &namespace, &rendered.deployment.name_any(), 0).await?;
        ctx.event(
            pipeline,
            false,
            "Replaying",
            format!(
                "replay {}: scaling the workers to zero to reset the consumer group",
                pending.token
            ),
        )
        .await;
    }
    let config =
        crate::connection::client_config(&ctx.client, &namespace, &connection.spec).await?;
    let kafka = crate::plugin::kafka::Kafka::new(config, ctx.config.kafka_timeout)
        .map_err(|e| Error::Connection(e.to_string()))?;
    let group = pipeline
        .spec
        .consumer_group(&namespace, &pipeline.name_any());
    let base = status::running(pipeline, &deployment, 0);
    match replay::step(&kafka, &group, pipeline, pending).await {
        replay::Progress::Waiting(members) => {
            let status = replay::waiting(base, pipeline, pending, members);
            ctx.write_status(pipeline, pipeline.status.as_ref(), &status)
                .await?;
            Ok(Action::requeue(std::time::Duration::from_secs(1)))
        }
        replay::Progress::Finished(done) => {
            let (warning, reason, note) = match &done.error {
                None => (
                    false,
                    "Replayed",
                    format!(
                        "replay {}: consumer group {group} reset ({:?}); the workers resume{}",
                        done.token,
                        pending.to,
                        replay::resuming(&done)
                    ),
                ),
                Some(e) => (true, "ReplayFailed", e.clone()),
            };
            let status = replay::finished(base, pipeline, done.clone());
            ctx.write_status(pipeline, pipeline.status.as_ref(), &status)
                .await?;
            ctx.autoscaler(&uid, |s| s.replayed = Some(done))?;
            ctx.event(pipeline, warning, reason, note).await;
            Ok(Action::requeue(std::time::Duration::from_millis(100)))
        }
    }
}

/// The status's figures as metrics.
fn record(ctx: &Context, pipeline: &EventPipeline, status: &weir_crds::EventPipelineStatus) {
    ctx.metrics.pipeline(
        &pipeline.namespace().unwrap_or_default(),
        &pipeline.name_any(),
        crate::metrics::PipelineFigures {
            lag: status.lag.as_ref().map_or(0, |l| l.total),
            lag_seconds: status.lag_seconds,
            arrival_rate: status.arrival_rate.unwrap_or(0.0),
            consumption_rate: status.consumption_rate.unwrap_or(0.0),
            desired_replicas: status.desired_replicas.or(status.replicas).unwrap_or(0),
            replicas: status.replicas.unwrap_or(0),
            ready_replicas: status.ready_replicas.unwrap_or(0),
        },
    );
}

/// Applies every child (the Deployment last, so it never starts on a half-written
/// configuration) and deletes the children an earlier spec made that this one has not.
async fn apply_all(
    ctx: &Context,
    pipeline: &EventPipeline,
    rendered: &Rendered,
) -> Result<Deployment, Error> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let name = pipeline.name_any();
    apply(ctx, &namespace, &name, &rendered.config_map).await?;
    apply(ctx, &namespace, &name, &rendered.service_account).await?;
    apply(ctx, &namespace, &name, &rendered.service).await?;
    apply(ctx, &namespace, &name, &rendered.pod_disruption_budget).await?;
    let mut topics = Vec::new();
    if let Some(topic) = &rendered.dead_letter_topic {
        apply::<KafkaTopic>(ctx, &namespace, &name, topic).await?;
        topics.push(topic.name_any());
    }
    let deployment = apply(ctx, &namespace, &name, &rendered.deployment).await?;
    for orphan in delete_orphans::<KafkaTopic>(ctx, &namespace, &name, &topics).await? {
        ctx.event(
            pipeline,
            false,
            "Deleted",
            format!("deleted KafkaTopic {orphan}, which the spec no longer has (its Kafka topic is retained)"),
        )
        .await;
    }
    Ok(deployment)
}

/// Sets the Deployment's replicas through its scale subresource.
pub async fn scale(
    ctx: &Context,
    namespace: &str,
    deployment: &str,
    replicas: i32,
) -> Result<(), Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    ctx.metrics.write();
    deployments
        .patch_scale(
            deployment,
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "autoscaling/v1",
                "kind": "Scale",
                "spec": {"replicas": replicas},
            })),
        )
        .await?;
    Ok(())
}

/// The Events of a rare, user-visible change: the workers created, or rolled.
async fn announce(
    ctx: &Context,
    pipeline: &EventPipeline,
    before: Option<&Deployment>,
    rendered: &Rendered,
) {
    let names = Names::of(&pipeline.name_any());
    match before.map(config_hash) {
        None => {
            ctx.event(pipeline, false, "Created", format!("created Deployment {} and its ConfigMap, ServiceAccount, Service and PodDisruptionBudget", names.worker)).await;
        }
        Some(old) if old.as_deref() != Some(rendered.config_hash.as_str()) => {
            ctx.event(pipeline, false, "Rolled", format!("the worker configuration changed (config hash {}): Deployment {} rolls its pods", rendered.config_hash, names.worker)).await;
        }
        Some(_) => {}
    }
}

fn config_hash(deployment: &Deployment) -> Option<String> {
    deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CONFIG_HASH_ANNOTATION)
        .cloned()
}

pub fn error_policy(object: Arc<EventPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry(KIND, object.as_ref(), error)
}
