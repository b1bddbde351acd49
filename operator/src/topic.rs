//! KafkaTopic through the Kafka admin API: create when missing, adopt an existing topic,
//! raise partitions (a decrease is refused with a condition, never attempted), keep the
//! managed configs (others are left alone), report a replication-factor change as
//! unsupported. `deletionPolicy: Delete` deletes the topic through a finalizer, which is
//! present only under that policy; Retain never deletes.
//!
//! Kafka topic names are cluster-wide while KafkaTopics are namespaced: when several
//! KafkaTopics claim one name on one cluster, the oldest owns it and the others report
//! `Ready=False, reason=Conflict` and are never applied.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use weir_crds::condition::types::{READY, RECONCILING};
use weir_crds::{DeletionPolicy, KafkaTopic};

use crate::conditions;
use crate::connection;
use crate::context::{Context, Error};
use crate::kafka::{Admin, TopicState};
use crate::render::connection_name;

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
        let mut status = topic.status.clone().unwrap_or_default();
        conditions::set(
            &mut status.conditions,
            ERROR,
            true,
            "ReconcileFailed",
            e.to_string(),
            topic.metadata.generation,
        );
        conditions::set(
            &mut status.conditions,
            READY,
            false,
            "ReconcileFailed",
            e.to_string(),
            topic.metadata.generation,
        );
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

fn is_owner(ctx: &Context, topic: &KafkaTopic) -> Result<(), Arc<KafkaTopic>> {
    match owner(ctx, topic) {
        Some(o) if o.uid() != topic.uid() => Err(o),
        _ => Ok(()),
    }
}

async fn reconcile_inner(topic: &KafkaTopic, ctx: &Context) -> Result<Action, Error> {
    let patched;
    let marked;
    let mut topic = topic;
    let namespace = topic.namespace().unwrap_or_default();
    let api: Api<KafkaTopic> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = topic_name(topic);
    let generation = topic.metadata.generation;
    let has_finalizer = topic.finalizers().iter().any(|f| f == FINALIZER);

    if topic.metadata.deletion_timestamp.is_some() {
        if has_finalizer {
            if topic.spec.deletion_policy == DeletionPolicy::Delete && is_owner(ctx, topic).is_ok()
            {
                let config = connection::resolve(
                    ctx,
                    &namespace,
                    connection_name(topic.spec.connection_ref.as_ref(), &ctx.config),
                )
                .await?;
                ctx.admin(&config)?.delete(&name).await?;
                ctx.event(
                    topic,
                    false,
                    "Deleted",
                    format!("deleted Kafka topic {name} (deletionPolicy: Delete)"),
                )
                .await;
            }
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

    let mut status = topic.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.topic_name = Some(name.clone());
    conditions::remove(&mut status.conditions, ERROR);

    if let Err(problems) = topic.spec.validate(&topic.name_any()) {
        conditions::set(
            &mut status.conditions,
            READY,
            false,
            "InvalidSpec",
            problems.to_string(),
            generation,
        );
        conditions::remove(&mut status.conditions, RECONCILING);
        ctx.write_status(topic, topic.status.as_ref(), &status)
            .await?;
        return Ok(Action::await_change());
    }
    if let Err(owner) = is_owner(ctx, topic) {
        let message = format!(
            "Kafka topic {name} on this cluster is managed by KafkaTopic {}/{} (created first); this resource is not applied",
            owner.namespace().unwrap_or_default(),
            owner.name_any()
        );
        let was = conditions::reason(&status.conditions, READY).map(str::to_owned);
        conditions::set(
            &mut status.conditions,
            READY,
            false,
            "Conflict",
            message.clone(),
            generation,
        );
        conditions::remove(&mut status.conditions, RECONCILING);
        ctx.write_status(topic, topic.status.as_ref(), &status)
            .await?;
        if was.as_deref() != Some("Conflict") {
            ctx.event(topic, true, "Conflict", message).await;
        }
        return Ok(Action::requeue(
            ctx.config.resync.min(std::time::Duration::from_secs(60)),
        ));
    }

    let config = connection::resolve(
        ctx,
        &namespace,
        connection_name(topic.spec.connection_ref.as_ref(), &ctx.config),
    )
    .await?;
    let admin = ctx.admin(&config)?;
    let managed: BTreeMap<String, String> = topic
        .spec
        .config
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().to_owned()))
        .collect();
    let mut problems: Vec<(&str, String)> = Vec::new();
    let state = match admin.describe(&name).await? {
        None => {
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
                .write_status(topic, topic.status.as_ref(), &status)
                .await?
            {
                marked = written;
                topic = &marked;
            }
            admin
                .create(
                    &name,
                    topic.spec.partitions,
                    topic.spec.replication_factor,
                    &managed,
                )
                .await?;
            ctx.event(
                topic,
                false,
                "Created",
                format!(
                    "created Kafka topic {name} with {} partition(s)",
                    topic.spec.partitions
                ),
            )
            .await;
            admin.describe(&name).await?.ok_or_else(|| {
                Error::Connection(format!(
                    "Kafka topic {name} was created but is not visible yet"
                ))
            })?
        }
        Some(state) => {
            if status.adopted.is_none() {
                // The cache may lag behind this operator's own status write after creating
                // the topic: ask the API server before calling the topic adopted.
                status.adopted = api
                    .get_status(&topic.name_any())
                    .await?
                    .status
                    .and_then(|s| s.adopted);
            }
            if status.adopted.is_none() {
                status.adopted = Some(true);
                ctx.event(topic, false, "Adopted", format!("Kafka topic {name} already existed with {} partition(s); it is now managed by this resource", state.partitions)).await;
            }
            reconcile_existing(ctx, topic, &admin, &name, &managed, state, &mut problems).await?
        }
    };

    status.partitions = Some(state.partitions);
    status.replication_factor = Some(state.replication_factor);
    status.config = managed
        .keys()
        .filter_map(|k| state.configs.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    conditions::remove(&mut status.conditions, RECONCILING);
    match problems.first() {
        None => conditions::set(
            &mut status.conditions,
            READY,
            true,
            "Applied",
            format!("Kafka topic {name} matches the spec"),
            generation,
        ),
        // The first problem names the reason; the message lists them all.
        Some((reason, _)) => {
            let all: Vec<String> = problems.iter().map(|(_, m)| m.clone()).collect();
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                reason,
                all.join("; "),
                generation,
            )
        }
    }
    ctx.write_status(topic, topic.status.as_ref(), &status)
        .await?;
    Ok(Action::requeue(ctx.config.resync))
}

/// Brings an existing topic toward the spec; changes Kafka cannot make go to `problems`.
async fn reconcile_existing(
    ctx: &Context,
    topic: &KafkaTopic,
    admin: &Admin,
    name: &str,
    managed: &BTreeMap<String, String>,
    mut state: TopicState,
    problems: &mut Vec<(&'static str, String)>,
) -> Result<TopicState, Error> {
    let wanted = topic.spec.partitions;
    let mut changed = false;
    if wanted > state.partitions {
        admin.add_partitions(name, wanted).await?;
        ctx.event(
            topic,
            false,
            "PartitionsIncreased",
            format!(
                "raised Kafka topic {name} from {} to {wanted} partitions",
                state.partitions
            ),
        )
        .await;
        changed = true;
    } else if wanted < state.partitions {
        problems.push((
            "PartitionDecreaseRefused",
            format!(
                "spec.partitions is {wanted} but Kafka topic {name} has {}: Kafka cannot remove partitions; set spec.partitions to {} or more, or create a new topic",
                state.partitions, state.partitions
            ),
        ));
    }
    if let Some(rf) = topic.spec.replication_factor
        && rf != state.replication_factor
    {
        problems.push((
            "ReplicationFactorChangeUnsupported",
            format!(
                "spec.replicationFactor is {rf} but Kafka topic {name} has {}: changing it needs a partition reassignment, which this operator does not do; set it back to {} or reassign with Kafka's tools",
                state.replication_factor, state.replication_factor
            ),
        ));
    }
    let drift: Vec<&String> = managed
        .iter()
        .filter(|(k, v)| state.configs.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .collect();
    if !drift.is_empty() {
        admin.set_configs(name, managed, &state).await?;
        ctx.event(
            topic,
            false,
            "ConfigUpdated",
            format!(
                "set {} on Kafka topic {name}",
                drift
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .await;
        changed = true;
    }
    if changed {
        state = admin.describe(name).await?.unwrap_or(state);
    }
    Ok(state)
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
