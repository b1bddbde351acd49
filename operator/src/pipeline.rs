//! EventPipeline: validate (the worker's own `validate()`, CEL compile included), render
//! (see `render`), and apply with server-side apply under the field manager
//! `weir-operator`. An apply that changes nothing is not stored by the API server, so a
//! second reconcile writes nothing. Replicas are set through the Deployment's scale
//! subresource, never by the apply: `spec.replicas` when pinned, else
//! `scaling.minReplicas` (the autoscaler takes this over).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use weir_crds::condition::types::READY;
use weir_crds::{EventPipeline, KafkaConnection, KafkaTopic};

use crate::conditions;
use crate::context::{Context, Error};
use crate::render::{self, CONFIG_HASH_ANNOTATION, Names, render};

pub const KIND: &str = "EventPipeline";

/// The pipelines that use a KafkaConnection (by reference, or as the namespace's default),
/// so a change to it re-renders them (and a pipeline refused for its connection is
/// reconsidered).
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
                    && p.spec
                        .connection_ref
                        .as_ref()
                        .map_or(default_connection.as_str(), |r| r.name.as_str())
                        == name
            })
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect()
    }
}

/// Reports why the pipeline cannot run (`Ready=False` with `reason`, and a Warning Event
/// when the reason is new) and renders nothing; the next change is awaited.
async fn refuse(
    ctx: &Context,
    pipeline: &EventPipeline,
    mut status: weir_crds::EventPipelineStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let was = conditions::reason(&status.conditions, READY).map(str::to_owned);
    conditions::set(
        &mut status.conditions,
        READY,
        false,
        reason,
        message.clone(),
        pipeline.metadata.generation,
    );
    ctx.write_status(pipeline, pipeline.status.as_ref(), &status)
        .await?;
    if was.as_deref() != Some(reason) {
        ctx.event(pipeline, true, reason, message).await;
    }
    Ok(Action::await_change())
}

pub async fn reconcile(pipeline: Arc<EventPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.reconcile(KIND, pipeline.as_ref(), reconcile_inner(&pipeline, &ctx))
        .await
}

async fn reconcile_inner(pipeline: &EventPipeline, ctx: &Context) -> Result<Action, Error> {
    let namespace = pipeline.namespace().unwrap_or_default();
    let name = pipeline.name_any();
    let generation = pipeline.metadata.generation;
    let mut status = pipeline.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.selector = Some(render::selector_string(&name));

    if let Err(problems) = pipeline.spec.validate() {
        return refuse(ctx, pipeline, status, "InvalidSpec", problems.to_string()).await;
    }
    let connection_name =
        render::connection_name(pipeline.spec.connection_ref.as_ref(), &ctx.config);
    let Some(connection) = ctx.connection(&namespace, connection_name) else {
        conditions::set(
            &mut status.conditions,
            READY,
            false,
            "ConnectionNotFound",
            format!(
                "KafkaConnection {namespace}/{connection_name} does not exist: create it, or set spec.connectionRef"
            ),
            generation,
        );
        ctx.write_status(pipeline, pipeline.status.as_ref(), &status)
            .await?;
        return Ok(Action::requeue(Context::backoff(1)));
    };
    // The worker of this version connects over plaintext only: a Deployment rendered for
    // a TLS or SASL connection would only restart, refusing it at start.
    if connection.spec.tls.is_some() || connection.spec.sasl.is_some() {
        let message = format!(
            "KafkaConnection {namespace}/{connection_name} uses TLS or SASL, which this version's worker cannot use yet: reference a plaintext KafkaConnection (spec.connectionRef)"
        );
        return refuse(ctx, pipeline, status, "ConnectionNotSupported", message).await;
    }
    let rendered = match render(pipeline, Some(&connection), &ctx.config) {
        Ok(rendered) => rendered,
        Err(e) => {
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                "InvalidSpec",
                e.to_string(),
                generation,
            );
            ctx.write_status(pipeline, pipeline.status.as_ref(), &status)
                .await?;
            return Ok(Action::await_change());
        }
    };
    let names = Names::of(&name);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let before = deployments.get_opt(&names.worker).await?;
    apply(ctx, &namespace, &rendered.config_map).await?;
    apply(ctx, &namespace, &rendered.service_account).await?;
    apply(ctx, &namespace, &rendered.service).await?;
    apply(ctx, &namespace, &rendered.pod_disruption_budget).await?;
    if let Some(topic) = &rendered.dead_letter_topic {
        apply::<KafkaTopic>(ctx, &namespace, topic).await?;
    }
    let deployment = apply(ctx, &namespace, &rendered.deployment).await?;
    match before.as_ref().map(config_hash) {
        None => {
            ctx.event(pipeline, false, "Created", format!("created Deployment {} and its ConfigMap, ServiceAccount, Service and PodDisruptionBudget", names.worker)).await;
        }
        Some(old) if old.as_deref() != Some(rendered.config_hash.as_str()) => {
            ctx.event(pipeline, false, "Rolled", format!("the worker configuration changed (config hash {}): Deployment {} rolls its pods", rendered.config_hash, names.worker)).await;
        }
        Some(_) => {}
    }

    let desired = pipeline
        .spec
        .replicas
        .unwrap_or(pipeline.spec.scaling.min_replicas);
    let current = deployment.spec.as_ref().and_then(|s| s.replicas);
    if current != Some(desired) {
        ctx.metrics.write();
        deployments
            .patch_scale(
                &names.worker,
                &PatchParams::apply(crate::FIELD_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "autoscaling/v1",
                    "kind": "Scale",
                    "spec": {"replicas": desired},
                })),
            )
            .await?;
    }
    let deployment_status = deployment.status.unwrap_or_default();
    status.replicas = Some(desired);
    status.ready_replicas = Some(deployment_status.ready_replicas.unwrap_or(0));
    let ready = deployment_status.ready_replicas.unwrap_or(0);
    if ready >= desired {
        conditions::set(
            &mut status.conditions,
            READY,
            true,
            "WorkersReady",
            format!("{ready}/{desired} workers ready"),
            generation,
        );
    } else {
        conditions::set(
            &mut status.conditions,
            READY,
            false,
            "WorkersNotReady",
            format!(
                "{ready}/{desired} workers ready (Deployment {})",
                names.worker
            ),
            generation,
        );
    }
    ctx.write_status(pipeline, pipeline.status.as_ref(), &status)
        .await?;
    Ok(Action::requeue(ctx.config.resync))
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

/// Server-side apply of `object` under the operator's field manager.
async fn apply<K>(ctx: &Context, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let mut body = serde_json::to_value(object).map_err(|e| Error::Connection(e.to_string()))?;
    body["apiVersion"] = json!(K::api_version(&()));
    body["kind"] = json!(K::kind(&()));
    ctx.metrics.write();
    Ok(api
        .patch(
            &object.name_any(),
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?)
}

pub fn error_policy(object: Arc<EventPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry(KIND, object.as_ref(), error)
}
