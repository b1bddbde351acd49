//! Whether a KafkaTopic can be applied: pure.

use std::sync::Arc;

use kube::ResourceExt as _;
use weir_crds::KafkaTopic;

use super::dereference::Dereferenced;
use crate::context::Error;

/// Why a topic is not applied: `Ready=False` with this reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

/// The spec on its own.
pub fn spec(topic: &KafkaTopic) -> Result<(), Refusal> {
    topic
        .spec
        .validate(&topic.name_any())
        .map_err(|problems| Refusal {
            reason: "InvalidSpec",
            message: problems.to_string(),
        })
}

/// Another KafkaTopic owns this topic's name on its cluster.
pub fn ownership(name: &str, other_owner: Option<&Arc<KafkaTopic>>) -> Result<(), Refusal> {
    match other_owner {
        None => Ok(()),
        Some(owner) => Err(Refusal {
            reason: "Conflict",
            message: format!(
                "Kafka topic {name} on this cluster is managed by KafkaTopic {}/{} (created first); this resource is not applied",
                owner.namespace().unwrap_or_default(),
                owner.name_any()
            ),
        }),
    }
}

/// What the cluster can do: a topic to create with more replicas than brokers would only
/// be refused by the broker in its own terms.
pub fn against_cluster(topic: &KafkaTopic, refs: &Dereferenced) -> Result<(), Error> {
    match (topic.spec.replication_factor, refs.brokers, &refs.current) {
        (Some(wanted), Some(brokers), None) if brokers > 0 && wanted > brokers => {
            Err(Error::ReplicationFactorTooHigh { wanted, brokers })
        }
        _ => Ok(()),
    }
}
