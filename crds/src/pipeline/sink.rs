//! Sink specs: one struct per kind; a `Sink` sets exactly one of them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::DurationString;
use crate::reference::{ConnectionRef, SecretSource};

/// The sink kinds, in the order `Sink` lists them.
pub const SINK_KINDS: &[&str] = &["postgres", "mysql", "sqlite", "redis", "http", "kafka"];

/// One destination. Set exactly one kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.postgres) ? 1 : 0) + (has(self.mysql) ? 1 : 0) + (has(self.sqlite) ? 1 : 0) + (has(self.redis) ? 1 : 0) + (has(self.http) ? 1 : 0) + (has(self.kafka) ? 1 : 0) == 1",
    "message": "set exactly one sink kind: postgres, mysql, sqlite, redis, http or kafka"
}]))]
pub struct Sink {
    /// A name for metrics and logs; defaults to the kind and position, e.g. `postgres-0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Write to a PostgreSQL table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<SqlSink>,
    /// MySQL or MariaDB: not available in this version (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<SqlSink>,
    /// Write to a table in a SQLite database file (`url: sqlite:///data/todos.db`): for
    /// local and edge use. In Kubernetes the file must be on a volume of the worker's pod,
    /// and only one worker may write it (maxReplicas: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite: Option<SqlSink>,
    /// Write keys to Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSink>,
    /// HTTP: not available in this version (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
    /// Another Kafka topic: not available in this version (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSink>,
}

impl Sink {
    /// The kinds that are set (exactly one is valid).
    pub fn kinds(&self) -> Vec<&'static str> {
        let set = [
            self.postgres.is_some(),
            self.mysql.is_some(),
            self.sqlite.is_some(),
            self.redis.is_some(),
            self.http.is_some(),
            self.kafka.is_some(),
        ];
        SINK_KINDS
            .iter()
            .zip(set)
            .filter_map(|(kind, set)| set.then_some(*kind))
            .collect()
    }
}

/// A table in PostgreSQL or SQLite, written in one transaction per batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.url) != has(self.urlFrom)",
    "message": "set exactly one of url, urlFrom"
}]))]
pub struct SqlSink {
    /// The connection URL when it holds no secret, e.g. `sqlite:///data/todos.db` or
    /// `postgres://db.example:5432/app` (credentials from the environment or a
    /// passfile). A URL with a password belongs in `urlFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Where the connection URL with credentials, e.g.
    /// `postgres://user:pass@host:5432/db`, comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretSource>,
    /// The table, optionally schema-qualified (`projections.todos`).
    #[schemars(length(min = 1))]
    pub table: String,
    /// Insert (the default), Upsert (on keyColumns), Delete (by keyColumns), or Rules
    /// (one action per event chosen by `rules`, for event-sourced projections).
    #[serde(default)]
    pub mode: WriteMode,
    /// Columns identifying a row; needed by Upsert, Delete and Rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub key_columns: Vec<String>,
    /// How columns are filled from the event (Insert, Upsert, Delete).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub columns: Vec<Column>,
    /// With mode Rules: the first rule whose `when` holds decides the action; an event no
    /// rule matches is skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub rules: Vec<ProjectionRule>,
}

/// How a SQL sink writes a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum WriteMode {
    #[default]
    Insert,
    Upsert,
    Delete,
    Rules,
}

/// One column and where its value comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Column {
    /// The column's name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Dotted path of the JSON field holding the value, e.g. `event.payload.title`.
    /// Defaults to `event.<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The column's SQL type: text, integer, bigint, numeric, boolean, timestamptz, jsonb,
    /// uuid.
    #[serde(rename = "type")]
    pub type_: ColumnType,
}

/// Column types a SQL sink writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    #[default]
    Text,
    Integer,
    Bigint,
    Numeric,
    Boolean,
    Timestamptz,
    Jsonb,
    Uuid,
}

/// "When this holds, do that": one step of an event-sourced projection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionRule {
    /// A CEL condition over the event, e.g. `event.type == "TodoCreated"`.
    #[schemars(length(min = 1))]
    pub when: String,
    /// Upsert (insert or replace the listed columns), Update (set the listed columns of an
    /// existing row) or Delete (remove the row).
    pub action: RuleAction,
    /// Columns written by Upsert and Update; keyColumns must be among them for Upsert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<Column>,
}

/// What a projection rule does to the row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RuleAction {
    #[default]
    Upsert,
    Update,
    Delete,
}

/// Redis: one command per record, sent as one pipeline per batch in the batch's order. A
/// record whose key or value cannot be computed, or whose command Redis refuses (such as
/// WRONGTYPE: Hset on a key holding a string), goes to the dead-letter topic; the rest of the
/// batch lands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.url) != has(self.urlFrom)",
    "message": "set exactly one of url, urlFrom"
}]))]
pub struct RedisSink {
    /// The connection URL when it holds no secret: `redis://host:6379/0`, or
    /// `rediss://host:6380/0` for TLS (the server's certificate is verified against the
    /// system's trusted roots; SSL_CERT_FILE in the worker's environment names other ones).
    /// A URL with a password belongs in `urlFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Where the connection URL with credentials, e.g.
    /// `redis://user:password@host:6379/0` or `rediss://:password@host:6380/0`, comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretSource>,
    /// Set (the default: SET key value), Hset (HSET key with the `fields`) or Del (DEL key).
    #[serde(default)]
    pub command: RedisCommand,
    /// A CEL expression giving the key, e.g. `"user:" + event.email`; it must give a
    /// non-empty string or a number.
    #[schemars(length(min = 1))]
    pub key: String,
    /// With Set: a CEL expression giving the value. A string is written as it is, anything
    /// else as JSON text. Defaults to the event, written the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// With Hset: hash field → CEL expression giving its value (a string as it is, anything
    /// else as JSON text).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// Expiry set with each Set or Hset, e.g. `24h` (at least 1ms). Omit for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<DurationString>,
    /// Wrap each batch's commands in MULTI/EXEC, so that other clients see all of a batch's
    /// writes or none of them. Redis does not roll back: a command it refuses while the
    /// transaction runs (such as WRONGTYPE) fails alone and the others still apply.
    #[serde(default)]
    pub transaction: bool,
}

/// The Redis command a record becomes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RedisCommand {
    #[default]
    Set,
    Hset,
    Del,
}

/// HTTP: not available in this version (a pipeline with an http sink is refused).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.url) != has(self.urlFrom)",
    "message": "set exactly one of url, urlFrom"
}]))]
pub struct HttpSink {
    /// The endpoint, when it holds no secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The endpoint, from a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretSource>,
    /// Headers sent with every request; values from secrets go in `headersFrom`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Headers whose values are secret (e.g. Authorization).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub headers_from: BTreeMap<String, SecretSource>,
    /// JsonArray (the default: one JSON array per batch) or Ndjson (one line per record).
    #[serde(default)]
    pub encoding: HttpEncoding,
    /// Timeout of one request.
    #[serde(default = "default_http_timeout")]
    pub timeout: DurationString,
}

fn default_http_timeout() -> DurationString {
    DurationString::new("10s")
}

/// How an HTTP batch is encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HttpEncoding {
    #[default]
    JsonArray,
    Ndjson,
}

/// Another Kafka topic: not available in this version (a pipeline with a kafka sink is
/// refused).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSink {
    /// The topic to produce to.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub topic: String,
    /// The KafkaConnection of the target cluster; defaults to the pipeline's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_ref: Option<ConnectionRef>,
    /// A CEL expression giving the record key; defaults to the source record's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}
