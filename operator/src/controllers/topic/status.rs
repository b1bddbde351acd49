//! The KafkaTopic's status from what the reconcile found and did: pure.

use weir_crds::condition::types::{READY, RECONCILING};
use weir_crds::{KafkaTopic, KafkaTopicStatus};

use super::build::Plan;
use super::validate::Refusal;
use super::{ERROR, topic_name};
use crate::conditions;
use crate::context::Error;
use crate::kafka::TopicState;

/// The status every outcome starts from: the last one, with this generation and name.
pub fn base(topic: &KafkaTopic) -> KafkaTopicStatus {
    let mut status = topic.status.clone().unwrap_or_default();
    status.observed_generation = topic.metadata.generation;
    status.topic_name = Some(topic_name(topic));
    conditions::remove(&mut status.conditions, ERROR);
    status
}

/// Not applied, for `refusal`.
pub fn refused(topic: &KafkaTopic, refusal: &Refusal) -> KafkaTopicStatus {
    let mut status = base(topic);
    conditions::set(
        &mut status.conditions,
        READY,
        false,
        refusal.reason,
        refusal.message.clone(),
        topic.metadata.generation,
    );
    conditions::remove(&mut status.conditions, RECONCILING);
    status
}

/// The reconcile failed with `error`: `Error=True` and `Ready=False`, both with the
/// error's category as reason.
pub fn failed(topic: &KafkaTopic, error: &Error) -> KafkaTopicStatus {
    let mut status = topic.status.clone().unwrap_or_default();
    let reason = error.category().as_str();
    for type_ in [ERROR, READY] {
        conditions::set(
            &mut status.conditions,
            type_,
            type_ == ERROR,
            reason,
            error.to_string(),
            topic.metadata.generation,
        );
    }
    status
}

/// Kafka has the topic as `state` after the plan was carried out.
pub fn applied(
    mut status: KafkaTopicStatus,
    topic: &KafkaTopic,
    plan: &Plan,
    state: &TopicState,
) -> KafkaTopicStatus {
    let name = topic_name(topic);
    let generation = topic.metadata.generation;
    status.partitions = Some(state.partitions);
    status.replication_factor = Some(state.replication_factor);
    status.config = plan
        .managed
        .keys()
        .filter_map(|k| state.configs.get(k).map(|v| (k.clone(), v.clone())))
        .collect();
    conditions::remove(&mut status.conditions, RECONCILING);
    match plan.problems.first() {
        None if !plan.drifted.is_empty() => {
            let keys: Vec<&str> = plan.drifted.iter().map(|(k, _)| k.as_str()).collect();
            conditions::set(
                &mut status.conditions,
                READY,
                true,
                "Drifted",
                format!(
                    "{} of Kafka topic {name} had been changed outside this resource and was put back to the spec (see the Drifted Event for when and what was found)",
                    keys.join(", ")
                ),
                generation,
            )
        }
        // The last drift stays reported until the spec changes.
        None if status.conditions.iter().any(|c| {
            c.type_ == READY && c.reason == "Drifted" && c.observed_generation == generation
        }) => {}
        None => conditions::set(
            &mut status.conditions,
            READY,
            true,
            "Applied",
            format!("Kafka topic {name} matches the spec"),
            generation,
        ),
        // The first problem names the reason; the message lists them all.
        Some((reason, _)) => {
            let all: Vec<String> = plan.problems.iter().map(|(_, m)| m.clone()).collect();
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                reason,
                all.join("; "),
                generation,
            )
        }
    }
    status
}
