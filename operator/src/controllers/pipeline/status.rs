//! The pipeline's status from what the reconcile found and did: pure, so a reconcile that
//! finds nothing new computes the status the object already has (and writes nothing).

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt as _;
use weir_crds::condition::types::READY;
use weir_crds::{EventPipeline, EventPipelineStatus};

use super::build::{Names, selector_string};
use super::validate::Refusal;
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
