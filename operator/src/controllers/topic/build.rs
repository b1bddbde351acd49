//! What to do to bring the Kafka topic to the spec: pure, from the spec and the topic as
//! Kafka has it.

use std::collections::BTreeMap;

use weir_crds::KafkaTopic;

use crate::kafka::TopicState;

/// The changes to make, and those Kafka cannot make.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The configs the spec manages.
    pub managed: BTreeMap<String, String>,
    /// The topic does not exist: create it.
    pub create: bool,
    /// Raise the partitions to this count.
    pub raise_partitions: Option<i32>,
    /// Managed configs that differ (set them all, keeping the topic's other configs).
    pub drifted_configs: Vec<String>,
    /// What cannot be done, as (reason, message); the first names the condition's reason.
    pub problems: Vec<(&'static str, String)>,
}

pub fn plan(topic: &KafkaTopic, name: &str, current: Option<&TopicState>) -> Plan {
    let managed: BTreeMap<String, String> = topic
        .spec
        .config
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().to_owned()))
        .collect();
    let Some(state) = current else {
        return Plan {
            managed,
            create: true,
            ..Plan::default()
        };
    };
    let mut plan = Plan::default();
    let wanted = topic.spec.partitions;
    if wanted > state.partitions {
        plan.raise_partitions = Some(wanted);
    } else if wanted < state.partitions {
        plan.problems.push((
            "PartitionDecreaseRefused",
            format!(
                "spec.partitions is {wanted} but Kafka topic {name} has {}: Kafka cannot remove partitions; set spec.partitions to {} or more, or create a new topic",
                state.partitions, state.partitions
            ),
        ));
    }
    if let Some(rf) = topic.spec.replication_factor
        && rf != state.replication_factor
    {
        plan.problems.push((
            "ReplicationFactorChangeUnsupported",
            format!(
                "spec.replicationFactor is {rf} but Kafka topic {name} has {}: changing it needs a partition reassignment, which this operator does not do; set it back to {} or reassign with Kafka's tools",
                state.replication_factor, state.replication_factor
            ),
        ));
    }
    plan.drifted_configs = managed
        .iter()
        .filter(|(k, v)| state.configs.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    plan.managed = managed;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(partitions: i32, rf: Option<i32>, retention: &str) -> KafkaTopic {
        let spec = serde_json::from_value(serde_json::json!({
            "partitions": partitions,
            "replicationFactor": rf,
            "config": {"retention.ms": retention},
        }))
        .expect("spec");
        KafkaTopic::new("t", spec)
    }

    fn state(partitions: i32, rf: i32, retention: &str) -> TopicState {
        TopicState {
            partitions,
            replication_factor: rf,
            configs: BTreeMap::from([("retention.ms".to_owned(), retention.to_owned())]),
            topic_configs: BTreeMap::new(),
        }
    }

    #[test]
    fn a_missing_topic_is_created_and_an_equal_one_left_alone() {
        assert!(plan(&topic(3, None, "1000"), "t", None).create);
        let same = plan(&topic(3, Some(1), "1000"), "t", Some(&state(3, 1, "1000")));
        assert_eq!(
            (
                same.create,
                same.raise_partitions,
                same.drifted_configs.len(),
                same.problems.len()
            ),
            (false, None, 0, 0)
        );
    }

    #[test]
    fn raises_partitions_sets_drifted_configs_and_refuses_what_kafka_cannot_do() {
        let p = plan(&topic(6, None, "2000"), "t", Some(&state(3, 1, "1000")));
        assert_eq!(p.raise_partitions, Some(6));
        assert_eq!(p.drifted_configs, vec!["retention.ms".to_owned()]);
        let p = plan(&topic(2, Some(3), "1000"), "t", Some(&state(3, 1, "1000")));
        let reasons: Vec<&str> = p.problems.iter().map(|(r, _)| *r).collect();
        assert_eq!(
            reasons,
            vec![
                "PartitionDecreaseRefused",
                "ReplicationFactorChangeUnsupported"
            ]
        );
    }
}
