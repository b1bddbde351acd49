//! EventPipeline: consume → filter/transform → batch → sink → commit.

mod capabilities;
mod sink;
mod status;
mod validate;
mod worker;

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use capabilities::{RUNNABLE_SINKS, untruncatable};
pub use sink::*;
pub use status::*;
pub use worker::*;

use crate::duration::DurationString;
use crate::reference::ConnectionRef;

/// A pipeline from Kafka topics to one or more sinks, run by a worker Deployment whose
/// replicas the lag autoscaler sets (or `spec.replicas` pins).
// The kube derive repeats `type_ = ...` across printer columns, which clippy mistakes
// for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "weir.dev",
        version = "v1alpha1",
        kind = "EventPipeline",
        plural = "eventpipelines",
        namespaced,
        doc = "A pipeline from Kafka topics to sinks, run by a worker Deployment.",
        status = "EventPipelineStatus",
        shortname = "pipe",
        category = "weir",
        scale(
            spec_replicas_path = ".spec.replicas",
            status_replicas_path = ".status.replicas",
            label_selector_path = ".status.selector"
        ),
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].status"#
        ),
        printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
        printcolumn(name = "Lag", type_ = "integer", json_path = ".status.lag.total"),
        printcolumn(
            name = "Drain",
            type_ = "number",
            json_path = ".status.lagSeconds",
            description = "Seconds to drain the lag at the consumption rate"
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase")]
pub struct EventPipelineSpec {
    /// The KafkaConnection to consume from; defaults to the one named `default` in this
    /// namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_ref: Option<ConnectionRef>,
    /// Where events come from.
    pub source: Source,
    /// A CEL expression; events for which it is false are skipped (and committed). Variables:
    /// `event` (the decoded value), `key`, `headers`, `topic`, `partition`, `offset`,
    /// `timestamp`. Example: `event.type != "Heartbeat"`. The functions it can call are
    /// listed in docs/functions.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Reshapes each event before it reaches the sinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
    /// Where events go (at most 16). Every sink must acknowledge a record before its offset
    /// is committed.
    #[schemars(length(min = 1, max = 16))]
    pub sinks: Vec<Sink>,
    /// How records are grouped into writes.
    #[serde(default)]
    pub batch: Batch,
    /// Retries of transient failures (connection loss, deadlocks, broker unavailable).
    #[serde(default)]
    pub retry: Retry,
    /// Where records that fail permanently go, with the reason in their headers. Without it
    /// a permanent failure stops the pipeline rather than skip a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
    /// Skips records whose idempotency key a postgres, mysql or sqlite sink already applied
    /// within the window; an http sink sends the key as an Idempotency-Key header. Refused
    /// beside a kafka sink, which records no keys, and with format: Raw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    /// AtLeastOnce (the default): offsets are committed after every sink acknowledged.
    /// ExactlyOnce: each event is applied once even when a worker is killed or loses its
    /// partitions; needs exactly one sink that commits the consumed offsets with the data
    /// (postgres, mysql, or kafka on the pipeline's own cluster).
    #[serde(default)]
    pub delivery: Delivery,
    /// How the lag autoscaler sizes the worker Deployment (when `replicas` is not set).
    #[serde(default)]
    pub scaling: Scaling,
    /// Pins the number of workers; the autoscaler then only reports what it would run
    /// (`status.desiredReplicas`). Set by `kubectl scale eventpipeline` through the scale
    /// subresource; 0 stops the pipeline. Remove it to hand the count back to the autoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// A one-shot reset of the consumer group's offsets, carried out once per token: the
    /// workers are scaled to zero, the group (once it has no members) is reset, the token
    /// is recorded in `status.lastReplay`, and the workers resume with the token. Before
    /// they write anything, the first of them forgets, in each SQL sink's database, the
    /// pipeline's idempotency keys and (with ExactlyOnce) the offsets stored with the rows,
    /// so every replayed event is applied again; with `truncateSinks` it empties the tables
    /// too. Applying the same token again does nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
    /// Overrides for the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerTemplate>,
}

/// Where events come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Topics to consume.
    #[schemars(length(min = 1, max = 100))]
    pub topics: Vec<String>,
    /// The consumer group. Defaults to `<namespace>.<name>`; each pipeline reading the same
    /// topic needs its own group to see every event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer_group: Option<String>,
    /// Where a new consumer group starts: Earliest (the default) or Latest.
    #[serde(default)]
    pub start_position: StartPosition,
    /// How record values are decoded: Json (the default), or Raw: any bytes, `event` their
    /// text, copied as they are by a kafka or redis sink without a value expression (SQL
    /// and MongoDB sinks, idempotency and transform set/remove need Json).
    #[serde(default)]
    pub format: PayloadFormat,
}

/// Where a consumer group without committed offsets starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StartPosition {
    /// The oldest retained record.
    #[default]
    Earliest,
    /// Only records produced after the group first joins.
    Latest,
}

/// How record values are decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PayloadFormat {
    /// UTF-8 JSON; an undecodable record goes to the dead-letter topic.
    #[default]
    Json,
    /// Any bytes: `event` is the value as text (invalid UTF-8 replaced), for CEL; a kafka
    /// or redis sink with no value expression writes the original bytes. Field paths (SQL
    /// and MongoDB sinks, idempotency keys) and transform set/remove need Json objects and
    /// are refused with it.
    Raw,
}

/// Reshapes each event. Expressions are CEL over the input event; all see the event as it
/// arrived, so their order does not matter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transform {
    /// Fields to set: field name → CEL expression, e.g.
    /// `passwordHash: bcrypt(event.password, 10)` or `email: event.email.lowerAscii()`.
    /// The functions expressions can call are listed in docs/functions.md.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Top-level fields to remove after `set`, e.g. `[password]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// How records are grouped into writes. A batch closes at whichever limit comes first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// Most records in one batch. With `compaction: LastWriteWins`, most records a window
    /// keeps (one per key), however many it has read.
    #[serde(default = "default_max_records")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_records: i32,
    /// Most bytes (sum of record values) in one batch. With `compaction: LastWriteWins`,
    /// most bytes the window being filled and the one being written keep together: each
    /// kept record's key and value plus about 160 bytes of bookkeeping; a window closes when
    /// they reach it, so this bounds the worker's memory for windows.
    #[serde(default = "default_max_bytes")]
    #[schemars(range(min = 1))]
    pub max_bytes: i64,
    /// Longest time a record waits for its batch to fill.
    #[serde(default = "default_max_wait")]
    pub max_wait: DurationString,
    /// None (the default) writes every record in order. LastWriteWins folds records into a
    /// window as they are read, keeping only the last event of each record key, and writes
    /// the window when maxWait has passed since its first record or it keeps maxRecords or
    /// maxBytes (the earlier events are acknowledged with it, counted in
    /// `weir_records_compacted_total`): with an upsert sink the table ends as it would
    /// without compaction, with fewer writes. A later event the filter drops or that is
    /// dead-lettered does not supersede an earlier one. "Last" is arrival order: with keys
    /// spread over several topics, prefer the stale-write guard. For a time window, set
    /// maxWait to it (e.g. 1s) and maxRecords high; maxBytes bounds the memory.
    #[serde(default)]
    pub compaction: Compaction,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            max_records: default_max_records(),
            max_bytes: default_max_bytes(),
            max_wait: default_max_wait(),
            compaction: Compaction::default(),
        }
    }
}

fn default_max_records() -> i32 {
    1000
}
fn default_max_bytes() -> i64 {
    4 * 1024 * 1024
}
fn default_max_wait() -> DurationString {
    DurationString::new("100ms")
}

/// Per-key compaction within a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Compaction {
    /// Every record is written, in order.
    #[default]
    None,
    /// Only the last record per key is written.
    LastWriteWins,
}

/// Exponential backoff with jitter for transient failures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Tries in all, the first included, before a record counts as failed.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub attempts: i32,
    /// Wait before the second try.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: DurationString,
    /// Longest wait between tries.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: DurationString,
    /// Factor the wait grows by after each try.
    #[serde(default = "default_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,
    /// Fraction of each wait drawn at random (0 = none, 1 = up to the full wait).
    #[serde(default = "default_jitter")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: f64,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
        }
    }
}

fn default_attempts() -> i32 {
    5
}
fn default_initial_backoff() -> DurationString {
    DurationString::new("200ms")
}
fn default_max_backoff() -> DurationString {
    DurationString::new("30s")
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_jitter() -> f64 {
    0.2
}

/// The dead-letter topic. Its records carry the original key and value, and headers
/// `weir.error.class`, `weir.error.message`, `weir.attempts` (tries made),
/// `weir.source.topic`, `weir.source.partition`, `weir.source.offset`,
/// `weir.first.failure` (when the first try failed) and, for a record a sink refused,
/// `weir.sink` (that sink's name; the other sinks still applied the record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The topic's name.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub topic: String,
    /// When true (the default) the operator creates the topic as a KafkaTopic owned by
    /// this pipeline.
    #[serde(default = "default_true")]
    pub create: bool,
    /// Partitions of the created topic.
    #[serde(default = "default_dead_letter_partitions")]
    #[schemars(range(min = 1))]
    pub partitions: i32,
}

fn default_true() -> bool {
    true
}
fn default_dead_letter_partitions() -> i32 {
    1
}

/// Skips records whose key was already applied within the window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Idempotency {
    /// Path of the field holding the idempotency key, e.g. `event.idempotencyKey`.
    pub key: String,
    /// How long an applied key is remembered.
    #[serde(default = "default_idempotency_window")]
    pub window: DurationString,
}

fn default_idempotency_window() -> DurationString {
    DurationString::new("24h")
}

/// The delivery guarantee.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Delivery {
    /// Offsets are committed after every sink acknowledged; a crash may apply a record again.
    #[default]
    AtLeastOnce,
    /// Each event is applied once. With a postgres or mysql sink the consumed offsets are
    /// kept in the table `weir_offsets` of the same database and written in the same
    /// transaction as the rows; a worker resumes from them, and one that lost its
    /// partitions commits nothing. With a kafka sink the records and the consumed offsets
    /// are committed in one Kafka transaction (readers use
    /// `isolation.level=read_committed`). Needs exactly one sink.
    ExactlyOnce,
}

/// The lag autoscaler. Every lag interval (5 s by default) the operator reads the consumer
/// group's committed offsets and the high watermarks, measures the arrival rate and the
/// drain rate per worker, and runs enough workers to keep up with the arrivals and clear
/// the backlog within `targetCatchUpTime`, between `minReplicas` and `maxReplicas` and
/// never more than the topics' partitions. When more workers stop raising the drain rate
/// (the sink is the bottleneck) or a partition does not move (a stuck record), it stops
/// scaling up and says so in the `Scaling` and `Degraded` conditions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "minReplicas must not exceed maxReplicas"
}]))]
pub struct Scaling {
    /// Fewest workers; 0 lets an idle pipeline scale to zero (it starts again once the lag
    /// exceeds `activationLag`).
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,
    /// Most workers (also capped at the partition count).
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1))]
    pub max_replicas: i32,
    /// Lag per worker, KEDA's rule, used until a drain rate has been measured.
    #[serde(default = "default_target_lag")]
    #[schemars(range(min = 1))]
    pub target_lag_per_replica: i64,
    /// How soon a backlog should be cleared (default 60s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_catch_up_time: Option<DurationString>,
    /// Lag above which a pipeline at zero workers starts one.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub activation_lag: i64,
    /// How long fewer workers must have been enough before scaling down (by at most half
    /// at a time).
    #[serde(default = "default_cooldown")]
    pub cooldown: DurationString,
}

impl Default for Scaling {
    fn default() -> Self {
        Self {
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_lag_per_replica: default_target_lag(),
            target_catch_up_time: None,
            activation_lag: 0,
            cooldown: default_cooldown(),
        }
    }
}

fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    10
}
fn default_target_lag() -> i64 {
    10_000
}
fn default_cooldown() -> DurationString {
    DurationString::new("5m")
}

/// A one-shot offset reset, identified by its token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.to != 'Timestamp' || has(self.timestamp)", "message": "to: Timestamp needs timestamp"},
    {"rule": "self.to != 'Offsets' || (has(self.offsets) && size(self.offsets) > 0)", "message": "to: Offsets needs offsets"}
]))]
pub struct Replay {
    /// Any string unique to this replay, e.g. `rebuild-2026-11-23`.
    #[schemars(length(min = 1, max = 63))]
    pub token: String,
    /// Earliest, Latest, Timestamp or Offsets.
    pub to: ReplayTarget,
    /// With `to: Timestamp`, the RFC 3339 time to rewind to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// With `to: Offsets`, the offset of each partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<PartitionOffset>,
    /// Empty the sinks' tables before the replayed events are written: the first worker to
    /// start after the reset empties each postgres, mysql or sqlite table (every row, in one
    /// transaction with the record of this token in the sink's database, so a restarted or
    /// second worker does not empty it again). Refused with redis, http, kafka or mongodb
    /// sinks, which cannot be emptied.
    #[serde(default)]
    pub truncate_sinks: bool,
}

/// Where a replay moves the group's offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ReplayTarget {
    Earliest,
    Latest,
    Timestamp,
    Offsets,
}

/// An offset for one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionOffset {
    pub topic: String,
    #[schemars(range(min = 0))]
    pub partition: i32,
    #[schemars(range(min = 0))]
    pub offset: i64,
}

impl EventPipelineSpec {
    /// The consumer group: `source.consumerGroup`, or `<namespace>.<name>`.
    pub fn consumer_group(&self, namespace: &str, name: &str) -> String {
        self.source
            .consumer_group
            .clone()
            .unwrap_or_else(|| format!("{namespace}.{name}"))
    }
}
