//! Whether the pipeline can run, decided from its spec and what it refers to: pure.

use std::sync::Arc;

use kube::ResourceExt as _;
use weir_crds::{EventPipeline, KafkaConnection};

use super::dereference::Dereferenced;

/// Why a pipeline gets no workers: `Ready=False` with this reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
    /// Whether a change of the pipeline itself is needed (else of something it refers to,
    /// which is watched).
    pub spec: bool,
}

/// The checks, in order: the spec (the worker's own `validate()`, CEL included) and the
/// existence of its connection and of its kafka sinks' (the worker uses TLS and SASL as
/// the operator does).
pub fn validate(
    pipeline: &EventPipeline,
    refs: &Dereferenced,
) -> Result<Arc<KafkaConnection>, Refusal> {
    let namespace = pipeline.namespace().unwrap_or_default();
    if let Err(problems) = pipeline.spec.validate() {
        return Err(Refusal {
            reason: "InvalidSpec",
            message: problems.to_string(),
            spec: true,
        });
    }
    let name = &refs.connection_name;
    let Some(connection) = refs.connection.clone() else {
        return Err(Refusal {
            reason: "ConnectionNotFound",
            message: format!(
                "KafkaConnection {namespace}/{name} does not exist: create it, or set spec.connectionRef"
            ),
            spec: false,
        });
    };
    if let Some((missing, _)) = refs.sink_connections.iter().find(|(_, c)| c.is_none()) {
        return Err(Refusal {
            reason: "ConnectionNotFound",
            message: format!(
                "KafkaConnection {namespace}/{missing} (a kafka sink's connectionRef) does not exist: create it, or remove the sink's connectionRef to produce to the pipeline's own cluster"
            ),
            spec: false,
        });
    }
    Ok(connection)
}
