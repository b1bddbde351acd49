//! Observed state of an EventPipeline.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

/// Observed state of an EventPipeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPipelineStatus {
    /// The metadata.generation last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Workers the Deployment is asked to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Workers the autoscaler would run (equal to `replicas` unless `spec.replicas` pins
    /// them, and the autoscaler then only reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Workers ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Label selector of the worker pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The consumer group's lag, read every lag interval (5 s by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<Lag>,
    /// Seconds to drain the lag at the current consumption rate (absent while nothing is
    /// consumed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Records committed per second over the last interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumption_rate: Option<f64>,
    /// Records produced to the source topics per second over the last interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_rate: Option<f64>,
    /// When the autoscaler last changed the replicas (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// Why the autoscaler last changed the replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// The last replay carried out (or tried: see its `error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_replay: Option<ReplayStatus>,
    /// Ready, Scaling and Degraded, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Lag of a consumer group: the records a read_committed consumer at the group's committed
/// offsets would still receive (transaction markers and aborted transactions are not lag;
/// a partition without a commit counts from the start position).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lag {
    /// Sum over all topics.
    pub total: i64,
    /// Per topic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<TopicLag>,
}

/// Lag of one topic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicLag {
    pub topic: String,
    pub lag: i64,
}

/// A replay that was carried out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStatus {
    /// The replay's token.
    pub token: String,
    /// When the group was reset (RFC 3339).
    pub completed_at: String,
    /// Whether truncating the sinks was asked (`truncateSinks`) and the group was reset: the
    /// first worker that starts with this token empties the tables before it writes
    /// anything (its log says when). False when the replay failed.
    #[serde(default)]
    pub truncated: bool,
    /// Why the replay could not finish (the workers resumed; change the token to try
    /// again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
