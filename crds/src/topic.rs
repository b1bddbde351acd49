//! KafkaTopic: one Kafka topic kept in the state the resource declares.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::condition::Condition;
use crate::problems::{Collector, Problems};
use crate::reference::ConnectionRef;

/// Legal Kafka topic names (the broker's own rule).
pub const TOPIC_NAME_PATTERN: &str = r"^[a-zA-Z0-9._-]{1,249}$";

/// A Kafka topic. The operator creates it when missing, adopts an existing topic of the same
/// name, raises partitions (never lowers them), and keeps the configs listed in `config`.
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
        kind = "KafkaTopic",
        plural = "kafkatopics",
        namespaced,
        doc = "A Kafka topic kept in the state this resource declares.",
        status = "KafkaTopicStatus",
        shortname = "ktopic",
        category = "weir",
        printcolumn(name = "Topic", type_ = "string", json_path = ".status.topicName"),
        printcolumn(name = "Partitions", type_ = "integer", json_path = ".spec.partitions"),
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].status"#
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.topicName) == has(oldSelf.topicName) && (!has(self.topicName) || self.topicName == oldSelf.topicName)",
    "message": "topicName is immutable: create a new KafkaTopic for a new topic name"
}]))]
pub struct KafkaTopicSpec {
    /// The topic's name in Kafka. Defaults to metadata.name; cannot change once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub topic_name: Option<String>,
    /// The KafkaConnection to use; defaults to the one named `default` in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_ref: Option<ConnectionRef>,
    /// Number of partitions. Can be raised later, never lowered.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 100000))]
    pub partitions: i32,
    /// Replicas of each partition. Defaults to the broker's default.replication.factor.
    /// Cannot be changed through this resource once the topic exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32767))]
    pub replication_factor: Option<i32>,
    /// Topic configs this resource manages, e.g. `retention.ms: "604800000"`,
    /// `cleanup.policy: compact`. Configs not listed here are left as they are.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, ConfigValue>,
    /// What happens to the Kafka topic when this resource is deleted: Retain (the default)
    /// keeps it; Delete deletes it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn default_partitions() -> i32 {
    1
}

/// What happens to the Kafka topic when its KafkaTopic is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep the topic and its data.
    #[default]
    Retain,
    /// Delete the topic and its data.
    Delete,
}

/// A topic config value. Numbers may be written bare; booleans as "true"/"false".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigValue(pub String);

impl ConfigValue {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ConfigValue {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

impl Serialize for ConfigValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ConfigValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ConfigValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<ConfigValue, E> {
                Ok(ConfigValue(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for ConfigValue {
    fn schema_name() -> Cow<'static, str> {
        "ConfigValue".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

/// Observed state of a KafkaTopic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTopicStatus {
    /// The metadata.generation last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The topic's name in Kafka.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_name: Option<String>,
    /// The topic id Kafka assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_id: Option<String>,
    /// Partitions the topic has now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Replication factor the topic has now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_factor: Option<i32>,
    /// True when the topic existed before this resource and was adopted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<bool>,
    /// The effective values of the configs this resource manages.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Ready, Reconciling and Degraded, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Topic configs whose values must be integers (milliseconds, bytes, counts); -1 means
/// "unlimited" where Kafka allows it.
const INTEGER_CONFIGS: &[&str] = &[
    "retention.ms",
    "retention.bytes",
    "segment.ms",
    "segment.bytes",
    "segment.index.bytes",
    "segment.jitter.ms",
    "delete.retention.ms",
    "min.compaction.lag.ms",
    "max.compaction.lag.ms",
    "max.message.bytes",
    "min.insync.replicas",
    "flush.messages",
    "flush.ms",
    "file.delete.delay.ms",
    "index.interval.bytes",
    "local.retention.ms",
    "local.retention.bytes",
    "message.timestamp.before.max.ms",
    "message.timestamp.after.max.ms",
];

const BOOLEAN_CONFIGS: &[&str] = &[
    "unclean.leader.election.enable",
    "preallocate",
    "remote.storage.enable",
];

impl KafkaTopicSpec {
    /// The topic's name in Kafka: `topicName`, or else the resource's name.
    pub fn effective_topic_name<'a>(&'a self, resource_name: &'a str) -> &'a str {
        self.topic_name.as_deref().unwrap_or(resource_name)
    }

    /// Every problem the API server's schema cannot catch, with its field path.
    /// `resource_name` is metadata.name, the topic name when `topicName` is not set.
    pub fn validate(&self, resource_name: &str) -> Result<(), Problems> {
        let mut out = Vec::new();
        let mut spec = Collector::new("spec", &mut out);
        let name = self.effective_topic_name(resource_name);
        if !is_valid_topic_name(name) {
            let field = if self.topic_name.is_some() {
                "topicName"
            } else {
                "topicName (defaulted from metadata.name)"
            };
            spec.field_error(
                field,
                format!("{name:?} is not a legal Kafka topic name: use 1-249 of a-z A-Z 0-9 . _ -"),
            );
        }
        if self.partitions < 1 {
            spec.field_error(
                "partitions",
                format!("must be at least 1, got {}", self.partitions),
            );
        }
        if let Some(rf) = self.replication_factor
            && rf < 1
        {
            spec.field_error(
                "replicationFactor",
                format!("must be at least 1, got {rf}; omit it for the broker's default"),
            );
        }
        for (key, value) in &self.config {
            let mut at = spec.key("config", key);
            let value = value.as_str();
            if INTEGER_CONFIGS.contains(&key.as_str()) && value.parse::<i64>().is_err() {
                at.error(format!("must be an integer, got {value:?}"));
            } else if BOOLEAN_CONFIGS.contains(&key.as_str()) && !matches!(value, "true" | "false")
            {
                at.error(format!("must be \"true\" or \"false\", got {value:?}"));
            } else if key == "cleanup.policy" {
                let ok = value
                    .split(',')
                    .map(str::trim)
                    .all(|p| matches!(p, "delete" | "compact"));
                if !ok {
                    at.error(format!(
                        "must be delete, compact or \"compact,delete\", got {value:?}"
                    ));
                }
            }
        }
        Problems(out).into_result()
    }
}

/// Kafka's own rule for topic names.
pub fn is_valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}
