//! References from one resource to another object or to a secret value.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The name of the KafkaConnection used when a resource names none.
pub const DEFAULT_CONNECTION: &str = "default";

/// A reference to a KafkaConnection in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRef {
    /// Name of the KafkaConnection in this namespace.
    pub name: String,
}

/// Selects one key of a Secret in the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

impl SecretKeySelector {
    /// The environment variable through which the operator hands this Secret key to the
    /// worker: `WEIR_SECRET_<NAME>_<KEY>`, upper-cased, every other character `_`.
    pub fn env_name(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!("WEIR_SECRET_{}_{}", clean(&self.name), clean(&self.key))
    }
}

/// Where a secret value (a password, a connection URL with credentials) comes from. Set
/// exactly one: `secretKeyRef` in Kubernetes, `env` or `file` when running the worker
/// outside Kubernetes. The value itself never appears in the resource or in logs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.secretKeyRef) ? 1 : 0) + (has(self.env) ? 1 : 0) + (has(self.file) ? 1 : 0) == 1",
    "message": "set exactly one of secretKeyRef, env, file"
}]))]
pub struct SecretSource {
    /// A key of a Secret in the resource's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeySelector>,
    /// The name of an environment variable of the worker process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// A path to a file whose content (trailing newline removed) is the value, for
    /// `weir-worker run`; the operator refuses it, as its worker pods mount no such file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl SecretSource {
    /// How many of the alternatives are set (exactly one is valid).
    pub fn alternatives_set(&self) -> usize {
        [
            self.secret_key_ref.is_some(),
            self.env.is_some(),
            self.file.is_some(),
        ]
        .into_iter()
        .filter(|set| *set)
        .count()
    }
}
