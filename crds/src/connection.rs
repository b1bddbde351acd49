//! KafkaConnection: how to reach a Kafka cluster.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::problems::{Collector, Problems};
use crate::reference::SecretKeySelector;

/// How to reach a Kafka cluster. KafkaTopics and EventPipelines name one in `connectionRef`;
/// without it they use the KafkaConnection named `default` in their namespace.
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
        kind = "KafkaConnection",
        plural = "kafkaconnections",
        namespaced,
        doc = "How to reach a Kafka cluster: bootstrap servers, TLS and SASL.",
        status = "KafkaConnectionStatus",
        shortname = "kconn",
        category = "weir",
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].status"#
        ),
        printcolumn(name = "Brokers", type_ = "integer", json_path = ".status.brokers"),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KafkaConnectionSpec {
    /// Bootstrap brokers as host:port, e.g. `kafka-0.kafka:9092`.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: Vec<String>,
    /// TLS to the brokers (`SSL`, or `SASL_SSL` with `sasl`). Omit for plaintext. With
    /// `clientCert` and `clientKey`, mutual TLS. The operator and the workers both use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// SASL authentication (`SASL_PLAINTEXT`, or `SASL_SSL` with `tls`). Omit for none.
    /// The operator and the workers both use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<SaslConfig>,
    /// Extra librdkafka client properties, e.g. `client.rack` or `socket.keepalive.enable`.
    /// Refused here: credentials (use `sasl` and `tls`, which read Secrets) and what Weir
    /// sets on its clients itself (the consumer group, commits, prefetch, producer acks
    /// and batching), each with the field that decides it. `compression.type` applies to
    /// dead letters; a kafka sink compresses as its own `compression` says.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

/// TLS settings; certificates and keys are read from Secrets in PEM form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.clientCert) == has(self.clientKey)",
    "message": "clientCert and clientKey must be set together"
}]))]
pub struct TlsConfig {
    /// CA certificate that signed the brokers' certificates. Omit to use the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<SecretKeySelector>,
    /// Client certificate for mutual TLS (with clientKey).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<SecretKeySelector>,
    /// Client private key for mutual TLS (with clientCert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<SecretKeySelector>,
    /// Skip verification of the brokers' hostnames. Only for test clusters.
    #[serde(default)]
    pub insecure_skip_hostname_verification: bool,
}

/// SASL authentication.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.username) != has(self.usernameSecretRef)",
    "message": "set exactly one of username, usernameSecretRef"
}]))]
pub struct SaslConfig {
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub mechanism: SaslMechanism,
    /// The user name, when it is not secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The user name, read from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeySelector>,
    /// The password, read from a Secret.
    pub password_secret_ref: SecretKeySelector,
}

/// A SASL mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

/// Observed state of a KafkaConnection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaConnectionStatus {
    /// The metadata.generation last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Brokers that answered the last metadata request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<i32>,
    /// The Kafka cluster id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// Ready when a metadata request succeeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// librdkafka properties that carry credentials: they must come from Secrets, never inline.
const SECRET_PROPERTIES: &[(&str, &str)] = &[
    ("sasl.password", "spec.sasl.passwordSecretRef"),
    (
        "sasl.username",
        "spec.sasl.username or spec.sasl.usernameSecretRef",
    ),
    ("ssl.key.password", "spec.tls.clientKey"),
    ("ssl.key.pem", "spec.tls.clientKey"),
    ("ssl.certificate.pem", "spec.tls.clientCert"),
    ("ssl.ca.pem", "spec.tls.caCert"),
    (
        "sasl.oauthbearer.client.secret",
        "a Secret (OAUTHBEARER is not supported yet)",
    ),
    ("bootstrap.servers", "spec.bootstrapServers"),
    ("security.protocol", "spec.tls and spec.sasl"),
];

/// librdkafka properties Weir sets itself on the clients it makes, after the connection's
/// own: a value given here would be replaced, so it is refused with what decides it.
const WEIR_PROPERTIES: &[(&str, &str)] = &[
    (
        "ssl.ca.location",
        "spec.tls.caCert (without it, the system's roots)",
    ),
    (
        "ssl.endpoint.identification.algorithm",
        "spec.tls.insecureSkipHostnameVerification",
    ),
    ("sasl.mechanism", "spec.sasl.mechanism"),
    ("sasl.mechanisms", "spec.sasl.mechanism"),
    ("group.id", "an EventPipeline's spec.source.consumerGroup"),
    (
        "auto.offset.reset",
        "an EventPipeline's spec.source.startPosition",
    ),
    (
        "enable.auto.commit",
        "the worker, which commits only past acknowledged records",
    ),
    (
        "enable.auto.offset.store",
        "the worker, which commits only past acknowledged records",
    ),
    (
        "auto.commit.interval.ms",
        "the worker, which commits only past acknowledged records",
    ),
    (
        "partition.assignment.strategy",
        "the worker (cooperative-sticky, so a scale-up moves partitions without stopping the others)",
    ),
    (
        "session.timeout.ms",
        "the worker (10 s, with a heartbeat every second)",
    ),
    (
        "heartbeat.interval.ms",
        "the worker (10 s session, a heartbeat every second)",
    ),
    (
        "queued.max.messages.kbytes",
        "the worker's bounded prefetch",
    ),
    (
        "queued.min.messages",
        "the worker's bounded prefetch (from spec.batch)",
    ),
    ("fetch.max.bytes", "the worker's bounded prefetch"),
    ("max.partition.fetch.bytes", "the worker's bounded prefetch"),
    ("fetch.queue.backoff.ms", "the worker's bounded prefetch"),
    ("statistics.interval.ms", "the worker's lag metrics"),
    (
        "enable.idempotence",
        "Weir's producers (idempotent, acks=all, for dead letters and kafka sinks)",
    ),
    (
        "acks",
        "Weir's producers (idempotent, acks=all, for dead letters and kafka sinks)",
    ),
    (
        "request.required.acks",
        "Weir's producers (idempotent, acks=all, for dead letters and kafka sinks)",
    ),
    ("linger.ms", "Weir's producers (5 ms)"),
    ("queue.buffering.max.ms", "Weir's producers (linger.ms 5)"),
    ("queue.buffering.max.messages", "the kafka sink's producer"),
    (
        "partitioner",
        "the kafka sink's producer (murmur2_random, the Java clients' choice)",
    ),
    ("fetch.message.max.bytes", "the worker's bounded prefetch"),
    (
        "transactional.id",
        "an EventPipeline's delivery: ExactlyOnce, for its kafka sink alone (here it would make every producer transactional)",
    ),
    (
        "transaction.timeout.ms",
        "an EventPipeline's delivery: ExactlyOnce, for its kafka sink alone",
    ),
];

impl KafkaConnectionSpec {
    /// Every problem the API server's schema cannot catch, with its field path.
    pub fn validate(&self) -> Result<(), Problems> {
        let mut out = Vec::new();
        let mut spec = Collector::new("spec", &mut out);
        if self.bootstrap_servers.is_empty() {
            spec.field_error(
                "bootstrapServers",
                "must list at least one broker as host:port",
            );
        }
        for (i, server) in self.bootstrap_servers.iter().enumerate() {
            let valid = server
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                spec.index("bootstrapServers", i).error(format!(
                    "{server:?} is not host:port, e.g. \"kafka-0.kafka:9092\""
                ));
            }
        }
        for key in self.properties.keys() {
            if let Some((_, instead)) = SECRET_PROPERTIES.iter().find(|(k, _)| k == key) {
                spec.key("properties", key)
                    .error(format!("set through {instead}, not as a property"));
            } else if let Some((_, by)) = WEIR_PROPERTIES.iter().find(|(k, _)| k == key) {
                spec.key("properties", key).error(format!(
                    "is decided by {by}, not by the connection: remove it"
                ));
            }
        }
        Problems(out).into_result()
    }
}
