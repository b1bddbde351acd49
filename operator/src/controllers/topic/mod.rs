//! KafkaTopic through the Kafka admin API, in stages: validate the spec (pure) →
//! [`dereference`] (the owner of the name, the connection, the topic as Kafka has it: the
//! only IO before apply) → validate against the cluster (pure) → [`build`] a plan (pure:
//! create when missing, raise partitions, set the managed configs; what Kafka cannot do —
//! lowering partitions, changing the replication factor — becomes a condition) → apply it
//! through the admin API → [`status`] (pure). An existing topic is adopted; configs the
//! spec does not manage are left alone. `deletionPolicy: Delete` deletes the topic through
//! a finalizer, which is present only under that policy; Retain never deletes.
//!
//! Kafka topic names are cluster-wide while KafkaTopics are namespaced: when several
//! KafkaTopics claim one name on one cluster, the oldest owns it and the others report
//! `Ready=False, reason=Conflict` and are never applied.

pub mod build;
pub mod dereference;
pub mod status;
pub mod validate;

use std::sync::Arc;

use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use rdkafka::types::RDKafkaErrorCode;
use serde_json::json;
use weir_crds::condition::types::{READY, RECONCILING};
use weir_crds::{DeletionPolicy, KafkaTopic, KafkaTopicStatus};

use crate::conditions;
use crate::context::{Context, Error};
use crate::kafka::{AdminError, TopicState};
use crate::render::connection_name;
use build::Plan;
use dereference::Dereferenced;
use validate::Refusal;

pub const KIND: &str = "KafkaTopic";
/// Present only under `deletionPolicy: Delete`: deleting the resource deletes the topic.
pub const FINALIZER: &str = "weir.dev/delete-topic";
/// The condition that is True while the last reconcile failed.
pub const ERROR: &str = "Error";

pub async fn reconcile(topic: Arc<KafkaTopic>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = ctx
        .reconcile(KIND, topic.as_ref(), reconcile_inner(&topic, &ctx))
        .await;
    if let Err(e) = &result
        && !e.is_conflict()
    {
        // The failure goes to status too, so `kubectl get` shows it.
        let status = status::failed(&topic, e);
        if let Err(write) = ctx
            .write_status(topic.as_ref(), topic.status.as_ref(), &status)
            .await
        {
            tracing::warn!(error = %write, "cannot record the failure in status");
        }
    }
    result
}

/// The topic's name in Kafka.
pub fn topic_name(topic: &KafkaTopic) -> String {
    topic
        .spec
        .effective_topic_name(&topic.name_any())
        .to_owned()
}

/// Which Kafka cluster a topic lives on, as far as the operator can tell: the cluster id
/// its KafkaConnection reported, else that connection's bootstrap servers.
fn cluster_key(ctx: &Context, topic: &KafkaTopic) -> String {
    let namespace = topic.namespace().unwrap_or_default();
    let name = connection_name(topic.spec.connection_ref.as_ref(), &ctx.config);
    match ctx.connection(&namespace, name) {
        Some(c) => match c.status.as_ref().and_then(|s| s.cluster_id.clone()) {
            Some(id) => format!("id:{id}"),
            None => {
                let mut servers = c.spec.bootstrap_servers.clone();
                servers.sort();
                format!("servers:{}", servers.join(","))
            }
        },
        None => format!("connection:{namespace}/{name}"),
    }
}

/// The KafkaTopic that owns this topic's name on its cluster: the oldest claimant.
fn owner(ctx: &Context, topic: &KafkaTopic) -> Option<Arc<KafkaTopic>> {
    let name = topic_name(topic);
    let cluster = cluster_key(ctx, topic);
    ctx.topics
        .state()
        .into_iter()
        .filter(|t| topic_name(t) == name && cluster_key(ctx, t) == cluster)
        .min_by(|a, b| {
            let key = |t: &KafkaTopic| {
                (
                    t.metadata.creation_timestamp.as_ref().map(|ts| ts.0),
                    t.namespace(),
                    t.name_any(),
                )
            };
            key(a).cmp(&key(b))
        })
}

async fn reconcile_inner(topic: &KafkaTopic, ctx: &Context) -> Result<Action, Error> {
    let patched;
    let mut topic = topic;
    let namespace = topic.namespace().unwrap_or_default();
    let api: Api<KafkaTopic> = Api::namespaced(ctx.client.clone(), &namespace);
    let has_finalizer = topic.finalizers().iter().any(|f| f == FINALIZER);

    if topic.metadata.deletion_timestamp.is_some() {
        if has_finalizer {
            cleanup(ctx, topic).await?;
            set_finalizer(ctx, &api, topic, false).await?;
        }
        return Ok(Action::await_change());
    }
    let wants_finalizer = topic.spec.deletion_policy == DeletionPolicy::Delete;
    if wants_finalizer != has_finalizer {
        // Go on with the object as patched: its resourceVersion guards the status write.
        patched = set_finalizer(ctx, &api, topic, wants_finalizer).await?;
        topic = &patched;
    }

    let name = topic_name(topic);
    if let Err(refusal) = validate::spec(topic) {
        return refuse(ctx, topic, refusal, Action::await_change()).await;
    }
    if let Err(refusal) = validate::ownership(&name, dereference::other_owner(ctx, topic).as_ref())
    {
        let recheck = ctx.config.resync.min(std::time::Duration::from_secs(60));
        return refuse(ctx, topic, refusal, Action::requeue(recheck)).await;
    }
    let refs = dereference::dereference(ctx, topic).await?;
    validate::against_cluster(topic, &refs)?;
    let plan = build::plan(topic, &name, refs.current.as_ref());
    let (topic, mut status, state) = carry_out(ctx, &api, topic, &refs, &plan).await?;
    if status.topic_id.is_none() {
        // Read once: a topic keeps its id for life.
        match refs.admin.topic_id(&name).await {
            Ok(id) => status.topic_id = id,
            Err(e) => {
                tracing::warn!(topic = %name, error = %e, "cannot read the topic id; the next reconcile tries again")
            }
        }
    }
    let status = status::applied(status, &topic, &plan, &state);
    ctx.write_status(&topic, topic.status.as_ref(), &status)
        .await?;
    Ok(Action::requeue(ctx.config.resync))
}

/// Reports why the topic is not applied (a Warning Event when the reason is new).
async fn refuse(
    ctx: &Context,
    topic: &KafkaTopic,
    refusal: Refusal,
    then: Action,
) -> Result<Action, Error> {
    let was = topic
        .status
        .as_ref()
        .and_then(|s| conditions::reason(&s.conditions, READY))
        .map(str::to_owned);
    let status = status::refused(topic, &refusal);
    ctx.write_status(topic, topic.status.as_ref(), &status)
        .await?;
    if refusal.reason == "Conflict" && was.as_deref() != Some(refusal.reason) {
        ctx.event(topic, true, refusal.reason, refusal.message)
            .await;
    }
    Ok(then)
}

/// Deletes the Kafka topic of a deleted resource under `deletionPolicy: Delete`, when this
/// resource owns the name.
async fn cleanup(ctx: &Context, topic: &KafkaTopic) -> Result<(), Error> {
    if topic.spec.deletion_policy != DeletionPolicy::Delete
        || dereference::other_owner(ctx, topic).is_some()
    {
        return Ok(());
    }
    let name = topic_name(topic);
    let (admin, _) = dereference::admin(ctx, topic).await?;
    admin.delete(&name).await?;
    ctx.event(
        topic,
        false,
        "Deleted",
        format!("deleted Kafka topic {name} (deletionPolicy: Delete)"),
    )
    .await;
    Ok(())
}

/// Applies the plan through the admin API; returns the object as last written, the status
/// so far and the topic as Kafka has it afterwards.
async fn carry_out(
    ctx: &Context,
    api: &Api<KafkaTopic>,
    topic: &KafkaTopic,
    refs: &Dereferenced,
    plan: &Plan,
) -> Result<(KafkaTopic, KafkaTopicStatus, TopicState), Error> {
    let name = topic_name(topic);
    let generation = topic.metadata.generation;
    let admin = &refs.admin;
    let mut topic = topic.clone();
    let mut status = status::base(&topic);
    let Some(current) = &refs.current else {
        // Recorded before creating, so no later reconcile (nor a restart after a crash
        // between the two) takes this operator's own topic for an adopted one.
        status.adopted = Some(false);
        conditions::set(
            &mut status.conditions,
            RECONCILING,
            true,
            "Creating",
            format!("creating Kafka topic {name}"),
            generation,
        );
        if let Some(written) = ctx
            .write_status(&topic, topic.status.as_ref(), &status)
            .await?
        {
            topic = written;
        }
        admin
            .create(
                &name,
                topic.spec.partitions,
                topic.spec.replication_factor,
                &plan.managed,
            )
            .await
            .map_err(|e| in_users_terms(e, &topic))?;
        ctx.event(
            &topic,
            false,
            "Created",
            format!(
                "created Kafka topic {name} with {} partition(s)",
                topic.spec.partitions
            ),
        )
        .await;
        let state = admin
            .describe(&name)
            .await?
            .ok_or_else(|| Error::TopicNotVisible(name.clone()))?;
        return Ok((topic, status, state));
    };
    if status.adopted.is_none() {
        // The cache may lag behind this operator's own status write after creating the
        // topic: ask the API server before calling the topic adopted.
        status.adopted = api
            .get_status(&topic.name_any())
            .await?
            .status
            .and_then(|s| s.adopted);
    }
    if status.adopted.is_none() {
        status.adopted = Some(true);
        ctx.event(&topic, false, "Adopted", format!("Kafka topic {name} already existed with {} partition(s); it is now managed by this resource", current.partitions)).await;
    }
    let mut changed = false;
    if let Some(wanted) = plan.raise_partitions {
        admin.add_partitions(&name, wanted).await?;
        ctx.event(
            &topic,
            false,
            "PartitionsIncreased",
            format!(
                "raised Kafka topic {name} from {} to {wanted} partitions",
                current.partitions
            ),
        )
        .await;
        changed = true;
    }
    if !plan.drifted.is_empty() {
        // Said before it is put back, so whoever changed it can see why it reverted.
        let found: Vec<String> = plan
            .drifted
            .iter()
            .map(|(key, value)| {
                format!(
                    "{key} (found {}, spec {})",
                    value.as_deref().unwrap_or("the default"),
                    plan.managed.get(key).map_or("", String::as_str)
                )
            })
            .collect();
        ctx.event(
            &topic,
            true,
            "Drifted",
            format!(
                "managed config of Kafka topic {name} changed outside this resource: {}; putting it back",
                found.join(", ")
            ),
        )
        .await;
    }
    if !plan.set_configs.is_empty() || !plan.unset_configs.is_empty() {
        admin
            .alter_configs(&name, &plan.set_configs, &plan.unset_configs)
            .await?;
        let mut done = Vec::new();
        if !plan.set_configs.is_empty() {
            let keys: Vec<&str> = plan.set_configs.keys().map(String::as_str).collect();
            done.push(format!("set {}", keys.join(", ")));
        }
        if !plan.unset_configs.is_empty() {
            done.push(format!(
                "reset {} to the broker's default (no longer in spec.config)",
                plan.unset_configs.join(", ")
            ));
        }
        ctx.event(
            &topic,
            false,
            "ConfigUpdated",
            format!("{} on Kafka topic {name}", done.join("; ")),
        )
        .await;
        changed = true;
    }
    let state = if changed {
        admin
            .describe(&name)
            .await?
            .unwrap_or_else(|| current.clone())
    } else {
        current.clone()
    };
    Ok((topic, status, state))
}

/// A broker refusal said in the spec's terms where one is known.
fn in_users_terms(error: AdminError, topic: &KafkaTopic) -> Error {
    match (&error, topic.spec.replication_factor) {
        (
            AdminError::Refused {
                code: RDKafkaErrorCode::InvalidReplicationFactor,
                ..
            },
            Some(wanted),
        ) => Error::ReplicationFactorRefused { wanted },
        _ => error.into(),
    }
}

async fn set_finalizer(
    ctx: &Context,
    api: &Api<KafkaTopic>,
    topic: &KafkaTopic,
    present: bool,
) -> Result<KafkaTopic, Error> {
    let mut finalizers: Vec<String> = topic
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(FINALIZER.to_owned());
    }
    ctx.metrics.write();
    // The resourceVersion makes this a compare-and-swap: a concurrent change fails it (409)
    // and the reconcile runs again on fresh data.
    Ok(api
        .patch(
            &topic.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"finalizers": finalizers, "resourceVersion": topic.resource_version()}
            })),
        )
        .await?)
}

pub fn error_policy(object: Arc<KafkaTopic>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry(KIND, object.as_ref(), error)
}
