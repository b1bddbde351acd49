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

/// The checks, in order: the spec (the worker's own `validate()`, CEL included), the
/// connection's existence, and what the worker of this version can use.
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
    // The worker of this version connects over plaintext only: a Deployment rendered for
    // a TLS or SASL connection would only restart, refusing it at start.
    if connection.spec.tls.is_some() || connection.spec.sasl.is_some() {
        return Err(Refusal {
            reason: "ConnectionNotSupported",
            message: format!(
                "KafkaConnection {namespace}/{name} uses TLS or SASL, which this version's worker cannot use yet: reference a plaintext KafkaConnection (spec.connectionRef)"
            ),
            spec: false,
        });
    }
    Ok(connection)
}
