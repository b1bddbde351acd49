//! Why a reconcile failed. Every error has a bounded [`Category`]: it is the reason of the
//! failure's condition and Warning Event and the `category` label of the error metric, and
//! it decides between "wait for a change" (permanent) and "retry with backoff" (transient).

use std::time::Duration;

use crate::kafka::AdminError;

/// A failed reconcile; said as what was being done to which object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] AdminError),
    /// A KafkaConnection could not be turned into client properties (a Secret or one of
    /// its keys is missing).
    #[error("{0}")]
    Connection(String),
    #[error(
        "KafkaConnection {namespace}/{name} does not exist: create it, or set spec.connectionRef"
    )]
    ConnectionNotFound { namespace: String, name: String },
    #[error("{0}")]
    Render(#[from] crate::controllers::pipeline::build::RenderError),
    #[error(
        "spec.replicationFactor {wanted} exceeds the cluster's {brokers} broker(s): set spec.replicationFactor to {brokers} or less (or leave it out for the broker's default), or add brokers"
    )]
    ReplicationFactorTooHigh { wanted: i32, brokers: i32 },
    #[error(
        "spec.replicationFactor {wanted} was refused by the broker (more replicas than brokers?): set it to the number of brokers or less, or leave it out for the broker's default"
    )]
    ReplicationFactorRefused { wanted: i32 },
    #[error("Kafka topic {0} was created but is not visible yet")]
    TopicNotVisible(String),
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("the {0} is poisoned (a thread panicked while holding it)")]
    Poisoned(&'static str),
    #[error(
        "the reconcile did not finish within {0:?} (the API server or the broker stopped answering)"
    )]
    Timeout(Duration),
}

/// The bounded kinds of failure (condition reasons, Event reasons, metric labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// The API server refused or failed a request.
    KubernetesApi,
    /// A write lost a race (409): retried at once, not a failure.
    Conflict,
    /// No broker answered in time.
    KafkaUnreachable,
    /// A broker answered with an error.
    KafkaRefused,
    /// The referenced KafkaConnection does not exist.
    ConnectionNotFound,
    /// A Secret the KafkaConnection references is missing or lacks the key.
    SecretNotReady,
    /// The spec asks for something that cannot be done; waits for a change.
    InvalidSpec,
    /// The reconcile ran out of time.
    Timeout,
    /// A fault of the operator itself.
    Internal,
}

impl Category {
    /// The category as a condition and Event reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::KubernetesApi => "KubernetesApiError",
            Category::Conflict => "Conflict",
            Category::KafkaUnreachable => "KafkaUnreachable",
            Category::KafkaRefused => "KafkaRefused",
            Category::ConnectionNotFound => "ConnectionNotFound",
            Category::SecretNotReady => "SecretNotReady",
            Category::InvalidSpec => "InvalidSpec",
            Category::Timeout => "Timeout",
            Category::Internal => "InternalError",
        }
    }

    /// Every category, for metrics that list each one.
    pub const ALL: [Category; 9] = [
        Category::KubernetesApi,
        Category::Conflict,
        Category::KafkaUnreachable,
        Category::KafkaRefused,
        Category::ConnectionNotFound,
        Category::SecretNotReady,
        Category::InvalidSpec,
        Category::Timeout,
        Category::Internal,
    ];
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    pub fn category(&self) -> Category {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => Category::Conflict,
            Error::Kube(_) => Category::KubernetesApi,
            Error::Kafka(AdminError::Timeout { .. } | AdminError::Unreachable { .. }) => {
                Category::KafkaUnreachable
            }
            Error::Kafka(_) | Error::TopicNotVisible(_) => Category::KafkaRefused,
            Error::Connection(_) => Category::SecretNotReady,
            Error::ConnectionNotFound { .. } => Category::ConnectionNotFound,
            Error::Render(_)
            | Error::ReplicationFactorTooHigh { .. }
            | Error::ReplicationFactorRefused { .. } => Category::InvalidSpec,
            Error::Timeout(_) => Category::Timeout,
            Error::Serialize { .. } | Error::Poisoned(_) => Category::Internal,
        }
    }

    /// Retrying cannot help until the object (or the cluster) changes.
    pub fn is_permanent(&self) -> bool {
        self.category() == Category::InvalidSpec
    }

    /// A write lost a race (409 Conflict: the object changed since it was read). Not a
    /// failure: the reconcile runs again at once on fresh data.
    pub fn is_conflict(&self) -> bool {
        self.category() == Category::Conflict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_are_distinct_reasons() {
        let mut reasons: Vec<&str> = Category::ALL.iter().map(|c| c.as_str()).collect();
        reasons.sort_unstable();
        reasons.dedup();
        assert_eq!(reasons.len(), Category::ALL.len());
    }

    #[test]
    fn a_replication_factor_above_the_broker_count_is_said_in_the_users_terms() {
        let e = Error::ReplicationFactorTooHigh {
            wanted: 3,
            brokers: 1,
        };
        assert!(
            e.to_string()
                .starts_with("spec.replicationFactor 3 exceeds the cluster's 1 broker(s)"),
            "{e}"
        );
        assert!(e.is_permanent());
        assert_eq!(e.category(), Category::InvalidSpec);
    }
}
