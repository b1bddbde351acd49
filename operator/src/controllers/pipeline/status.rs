//! The pipeline's status from what the reconcile found and did: pure, so a reconcile that
//! finds nothing new computes the status the object already has (and writes nothing).

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt as _;
use weir_crds::condition::types::{DEGRADED, READY, SCALING};
use weir_crds::{EventPipeline, EventPipelineStatus};

use super::build::{Names, selector_string};
use super::validate::Refusal;
use crate::autoscale::Step;
use crate::autoscale::policy::Reason;
use crate::conditions;

/// The status every outcome starts from: the last one, with this generation and selector.
pub fn base(pipeline: &EventPipeline) -> EventPipelineStatus {
    let mut status = pipeline.status.clone().unwrap_or_default();
    status.observed_generation = pipeline.metadata.generation;
    status.selector = Some(selector_string(&pipeline.name_any()));
    status
}

/// The status of a pipeline that gets no workers.
pub fn refused(pipeline: &EventPipeline, refusal: &Refusal) -> EventPipelineStatus {
    let mut status = base(pipeline);
    conditions::set(
        &mut status.conditions,
        READY,
        false,
        refusal.reason,
        refusal.message.clone(),
        pipeline.metadata.generation,
    );
    status
}

/// The status of a pipeline whose objects were applied and whose Deployment is asked for
/// `desired` workers.
pub fn running(
    pipeline: &EventPipeline,
    deployment: &Deployment,
    desired: i32,
) -> EventPipelineStatus {
    let mut status = base(pipeline);
    let generation = pipeline.metadata.generation;
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    status.replicas = Some(desired);
    status.ready_replicas = Some(ready);
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
                Names::of(&pipeline.name_any()).worker
            ),
            generation,
        );
    }
    status
}

/// How the replica count was chosen this reconcile.
#[derive(Clone, Debug)]
pub struct Scaling<'a> {
    /// What the Deployment is asked to run now.
    pub replicas: i32,
    /// What the Deployment was asked before this reconcile.
    pub before: Option<i32>,
    /// `spec.replicas`, when it pins the count.
    pub pinned: Option<i32>,
    /// The autoscaler's reading and decision; absent when the lag could not be read.
    pub step: Option<&'a Step>,
    /// Why the lag could not be read.
    pub unread: Option<String>,
}

/// The replicas to run: `spec.replicas` when pinned, else the autoscaler's decision, else
/// (no reading) what runs now, or `minReplicas` for a new Deployment.
pub fn replicas(pipeline: &EventPipeline, before: Option<i32>, step: Option<&Step>) -> i32 {
    pipeline.spec.replicas.unwrap_or_else(|| {
        step.map(|s| s.decision.replicas)
            .or(before)
            .unwrap_or(pipeline.spec.scaling.min_replicas)
    })
}

/// Rounded to one decimal, so a status written from rates does not change by noise.
fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// The autoscaler's part of the status: lag, rates, desired replicas, the last scale, and
/// the `Scaling` and `Degraded` conditions.
pub fn scaled(
    mut status: EventPipelineStatus,
    pipeline: &EventPipeline,
    scaling: &Scaling<'_>,
) -> EventPipelineStatus {
    let generation = pipeline.metadata.generation;
    match scaling.step {
        Some(step) => {
            let lag = step.reading.lag();
            let drain = step.rates.as_ref().map(|r| r.drain());
            status.lag_seconds = drain
                .filter(|d| *d > 0.0)
                .map(|d| round(lag.total as f64 / d));
            status.consumption_rate = drain.map(round);
            status.arrival_rate = step.rates.as_ref().map(|r| round(r.arrival));
            status.lag = Some(lag);
            status.desired_replicas = Some(step.decision.replicas);
            let decision = &step.decision;
            let message = describe_stuck(step);
            match scaling.pinned {
                Some(n) => conditions::set(
                    &mut status.conditions,
                    SCALING,
                    false,
                    "Pinned",
                    format!(
                        "spec.replicas pins {n} worker(s); the autoscaler would run {}: {message}",
                        decision.replicas
                    ),
                    generation,
                ),
                None => conditions::set(
                    &mut status.conditions,
                    SCALING,
                    true,
                    decision.reason.as_str(),
                    message.clone(),
                    generation,
                ),
            }
            let degraded = matches!(
                decision.reason,
                Reason::SinkSaturated | Reason::StuckPartition
            ) || !decision.stuck.is_empty();
            conditions::set(
                &mut status.conditions,
                DEGRADED,
                degraded,
                if degraded {
                    decision.reason.as_str()
                } else {
                    "AsExpected"
                },
                if degraded {
                    message
                } else {
                    "more workers would drain faster, if needed".to_owned()
                },
                generation,
            );
            if scaling.pinned.is_none() && scaling.before.unwrap_or(0) != scaling.replicas {
                status.last_scale_time = Some(conditions::now());
                status.last_scale_reason = Some(format!(
                    "{} → {}: {}",
                    scaling.before.unwrap_or_default(),
                    scaling.replicas,
                    decision.message
                ));
            }
        }
        None => {
            let why = scaling.unread.clone().unwrap_or_else(|| {
                "the source topics have no partitions (do they exist?)".to_owned()
            });
            conditions::set(
                &mut status.conditions,
                SCALING,
                false,
                "LagUnknown",
                format!(
                    "the consumer group's lag cannot be read, so the replicas stay as they are: {why}"
                ),
                generation,
            );
        }
    }
    status
}

/// The decision's message, with stuck partitions named by topic and partition.
fn describe_stuck(step: &Step) -> String {
    if step.decision.stuck.is_empty() {
        return step.decision.message.clone();
    }
    let partitions = step.reading.partitions();
    let names: Vec<String> = step
        .decision
        .stuck
        .iter()
        .filter_map(|i| partitions.get(*i))
        .map(|(topic, p)| format!("{topic}/{p}"))
        .collect();
    format!("stuck: {}; {}", names.join(", "), step.decision.message)
}
