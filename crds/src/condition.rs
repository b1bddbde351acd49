//! The standard Kubernetes condition (metav1.Condition), kept here so the spec and status
//! types need no Kubernetes client crates.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types used by every Weir resource.
pub mod types {
    pub const READY: &str = "Ready";
    pub const RECONCILING: &str = "Reconciling";
    pub const DEGRADED: &str = "Degraded";
    pub const SCALING: &str = "Scaling";
}

/// One aspect of the resource's current state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. Ready, Reconciling, Degraded.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A CamelCase word for the cause of the last transition, e.g. InvalidSpec.
    pub reason: String,
    /// What happened, in words meant for the person reading `kubectl describe`.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The metadata.generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}
