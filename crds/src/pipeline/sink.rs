//! Sink specs: one struct per kind; a `Sink` sets exactly one of them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::DurationString;
use crate::reference::{ConnectionRef, SecretSource};

/// The sink kinds, in the order `Sink` lists them.
pub const SINK_KINDS: &[&str] = &[
    "postgres", "mysql", "sqlite", "redis", "mongodb", "http", "kafka",
];

/// One destination. Set exactly one kind.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.postgres) ? 1 : 0) + (has(self.mysql) ? 1 : 0) + (has(self.sqlite) ? 1 : 0) + (has(self.redis) ? 1 : 0) + (has(self.mongodb) ? 1 : 0) + (has(self.http) ? 1 : 0) + (has(self.kafka) ? 1 : 0) == 1",
    "message": "set exactly one sink kind: postgres, mysql, sqlite, redis, mongodb, http or kafka"
}]))]
pub struct Sink {
    /// A name for metrics and logs; defaults to the kind and position, e.g. `postgres-0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Write to a PostgreSQL table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<SqlSink>,
    /// Write to a MySQL or MariaDB table (`url: mysql://host:3306/app`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<SqlSink>,
    /// Write to a table in a SQLite database file (`url: sqlite:///data/todos.db`): for
    /// local and edge use with `weir-worker run`. The operator refuses it: its worker pods
    /// have a read-only root, no volume for the file, and more than one replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite: Option<SqlSink>,
    /// Write keys to Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSink>,
    /// MongoDB: not available in this version (refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mongodb: Option<MongoSink>,
    /// Send the events to an HTTP endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSink>,
    /// Produce to a Kafka topic.
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
            self.mongodb.is_some(),
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

/// A table in PostgreSQL, MySQL/MariaDB or SQLite. PostgreSQL and MySQL write a batch as two
/// key-disjoint shards at once, one transaction each (one transaction with exactly-once);
/// SQLite in one transaction per batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.url) != has(self.urlFrom)",
    "message": "set exactly one of url, urlFrom"
}]))]
pub struct SqlSink {
    /// The connection URL when it holds no secret, e.g. `sqlite:///data/todos.db`,
    /// `mysql://db.example:3306/app` or `postgres://db.example:5432/app` (credentials from
    /// the environment or a passfile). A URL with a password belongs in `urlFrom`.
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
    /// Stale-write guard for upserts and updates: a row is written only when the event's
    /// value of this column is greater than the stored one (or the row has none), so a
    /// replayed or late event never moves a row back to an older version. Events it holds
    /// back are counted as skipped. Deletes are not guarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
}

/// Which column orders the versions of a row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Guard {
    /// A column written by every upsert and update (of type integer, bigint, numeric or
    /// timestamptz), e.g. `version` or `updated_at`. An event without a value for it is
    /// refused (dead-lettered).
    #[schemars(length(min = 1))]
    pub column: String,
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
    /// else as JSON text. Defaults to the event, written the same way; without a transform,
    /// the record's own bytes (so with format: Raw, exactly what was consumed).
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

/// MongoDB: not available in this version (a pipeline with a mongodb sink is refused).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.url) != has(self.urlFrom)",
    "message": "set exactly one of url, urlFrom"
}]))]
pub struct MongoSink {
    /// The connection string when it holds no secret, e.g. `mongodb://db.example:27017`
    /// (`?tls=true` for TLS). A connection string with a password belongs in `urlFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Where the connection string with credentials, e.g.
    /// `mongodb://user:pass@host:27017/?authSource=admin`, comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretSource>,
    /// The database.
    #[schemars(length(min = 1))]
    pub database: String,
    /// The collection.
    #[schemars(length(min = 1))]
    pub collection: String,
    /// Insert (the default: insert each document), Upsert (insert or overwrite the
    /// document with the same keyFields), Update (`$set` the document's fields on the
    /// existing document with the same keyFields), Delete (by keyFields), or Rules (one
    /// action per event chosen by `rules`).
    #[serde(default)]
    pub mode: MongoMode,
    /// Top-level fields of the document that identify it, matched by Upsert, Update and
    /// Delete: an Update, a Set upsert or a Delete applies to every document they match
    /// (with `_id`, the one document), a Replace upsert to one. Defaults to `_id`.
    #[serde(default = "default_key_fields")]
    #[schemars(length(min = 1, max = 16))]
    pub key_fields: Vec<String>,
    /// How Upsert writes an existing document: Replace (the default: the new document
    /// replaces it) or Set (`$set` of the new document's fields; other fields stay).
    #[serde(default)]
    pub upsert: MongoUpsert,
    /// Field → CEL expression giving its value: the document written. Defaults to the
    /// event itself (a JSON object).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub document: BTreeMap<String, String>,
    /// With mode Rules: the first rule whose `when` holds decides the action; an event no
    /// rule matches is skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub rules: Vec<MongoRule>,
    /// Stale-write guard for upserts and updates: a document is written only when the
    /// event's value of this field is greater than the stored one (or the stored document
    /// has none), so a replayed or late event never moves a document back to an older
    /// version. Needs keyFields `[_id]`. Events it holds back are counted as skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<MongoGuard>,
}

fn default_key_fields() -> Vec<String> {
    vec!["_id".to_owned()]
}

/// How a MongoDB sink writes a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MongoMode {
    #[default]
    Insert,
    Upsert,
    Update,
    Delete,
    Rules,
}

/// How an upsert writes over an existing document.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MongoUpsert {
    #[default]
    Replace,
    Set,
}

/// "When this holds, do that" for a MongoDB sink.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MongoRule {
    /// A CEL condition over the event, e.g. `topic == "user-delete-queue"`.
    #[schemars(length(min = 1))]
    pub when: String,
    /// Upsert, Update or Delete, as the modes of the same names.
    pub action: RuleAction,
    /// Field → CEL expression: the document this rule writes. Defaults to the sink's
    /// `document`, else the event.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    pub document: BTreeMap<String, String>,
}

/// Which field orders the versions of a document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MongoGuard {
    /// A top-level field of the written document holding a number that grows with each
    /// version, e.g. `version`. An upsert or update whose document has no number there is
    /// refused (dead-lettered).
    #[schemars(length(min = 1))]
    pub field: String,
}

/// HTTP: the events sent to an endpoint, a batch per request (a JSON array, or NDJSON) or
/// one request per record (the event as the body). A connection error, a timeout, 429 and
/// 5xx are retried (waiting at least what `Retry-After` asks, at most `retry.maxBackoff`);
/// 401, 403, 404 and 405 stop the pipeline (the URL or the credentials are wrong); any other
/// 4xx refuses the records of the request, which go to the dead-letter topic with the status
/// and the start of the response body. A batch refused so is sent again in halves until the
/// refused records stand alone. With `spec.idempotency`, every request carries an
/// `Idempotency-Key` header, the same on every retry, so the receiver can drop a repeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.url) != has(self.urlFrom)",
    "message": "set exactly one of url, urlFrom"
}, {
    "rule": "!(has(self.mode) && self.mode == 'PerRecord' && has(self.encoding) && self.encoding == 'Ndjson')",
    "message": "encoding Ndjson needs mode Batch: with PerRecord each request's body is one event"
}, {
    "rule": "!has(self.concurrency) || (has(self.mode) && self.mode == 'PerRecord')",
    "message": "concurrency needs mode PerRecord: with Batch each batch is one request"
}]))]
pub struct HttpSink {
    /// The endpoint when it holds no secret, e.g. `https://notify.example/v1/events`
    /// (`https://` is verified against the system's trusted roots; SSL_CERT_FILE in the
    /// worker's environment names other ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Where the endpoint comes from when it holds a secret (a token in the query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<SecretSource>,
    /// Post (the default), Put or Patch.
    #[serde(default)]
    pub method: HttpMethod,
    /// Headers sent with every request, e.g. `X-Source: weir`; values that are secret go in
    /// `headersFrom`. `Content-Type` defaults to `application/json` (`application/x-ndjson`
    /// with Ndjson).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub headers: BTreeMap<String, String>,
    /// Headers whose values are secret, e.g. `Authorization` from a Secret holding
    /// `Bearer <token>`. Their values never appear in logs or dead letters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub headers_from: BTreeMap<String, SecretSource>,
    /// Batch (the default: one request per batch, its body encoded as `encoding` says) or
    /// PerRecord (one request per record, its body the event as JSON).
    #[serde(default)]
    pub mode: HttpMode,
    /// With Batch: JsonArray (the default: a JSON array of the batch's events) or Ndjson
    /// (one event per line).
    #[serde(default)]
    pub encoding: HttpEncoding,
    /// How long one request may take, from connecting to the end of the response.
    #[serde(default = "default_http_timeout")]
    pub timeout: DurationString,
    /// With PerRecord: how many requests may be in flight at once (default 8). Records with
    /// the same Kafka key are still sent one after the other, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub concurrency: Option<u32>,
}

fn default_http_timeout() -> DurationString {
    DurationString::new("10s")
}

/// The HTTP method of every request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HttpMethod {
    #[default]
    Post,
    Put,
    Patch,
}

/// How an HTTP sink turns records into requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HttpMode {
    #[default]
    Batch,
    PerRecord,
}

/// How an HTTP batch is encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HttpEncoding {
    #[default]
    JsonArray,
    Ndjson,
}

/// Another Kafka topic: each event becomes one record, produced by an idempotent producer
/// acknowledged by all in-sync replicas. Records are partitioned by key with the same hash
/// as Java's producers (murmur2), so a key keeps its partition and its order; a record
/// without a key goes to any partition. With `delivery: ExactlyOnce` each batch's records and
/// the consumed offsets are committed in one Kafka transaction (aborted on any failure), so
/// readers using `isolation.level=read_committed` see every event once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSink {
    /// The topic to produce to.
    #[schemars(regex(pattern = r"^[a-zA-Z0-9._-]{1,249}$"))]
    pub topic: String,
    /// The KafkaConnection (in the pipeline's namespace) of the cluster to produce to, when
    /// it is not the pipeline's own; its TLS and SASL settings apply to this sink's producer.
    /// At-least-once only: an exactly-once transaction cannot span two clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_ref: Option<ConnectionRef>,
    /// A CEL expression giving the record key (a string as it is, a number as its digits,
    /// anything else as JSON text, null for no key), e.g. `event.userId`. Defaults to the
    /// source record's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A CEL expression giving the record value (a string as it is, null for a tombstone,
    /// anything else as JSON text), e.g. `{"id": event.id, "type": event.type}`. Defaults
    /// to the source record's value as it is, or, when the pipeline has a transform, the
    /// transformed event as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Headers to set: name → CEL expression giving its value (a string as it is, anything
    /// else as JSON text, null for a header without value). The source record's headers are
    /// kept; one of the same name is replaced.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub headers: BTreeMap<String, String>,
    /// None (the default), Gzip, Snappy or Lz4.
    #[serde(default)]
    pub compression: KafkaCompression,
}

/// How a kafka sink compresses its record batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum KafkaCompression {
    #[default]
    None,
    Gzip,
    Snappy,
    Lz4,
}
