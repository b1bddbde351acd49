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
    /// Managed configs to set, incrementally (the topic's other configs stay as the
    /// broker has them): the spec changed them, or someone changed them on the broker.
    pub set_configs: BTreeMap<String, String>,
    /// Of those, the ones someone changed on the broker after this resource set them, as
    /// (key, value found): reported as drift before they are put back.
    pub drifted: Vec<(String, Option<String>)>,
    /// Configs this resource set before and the spec no longer manages: back to the
    /// broker's default.
    pub unset_configs: Vec<String>,
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
    // What this resource set last time (its status), to tell someone else's change on
    // the broker from a change of the spec.
    let applied = topic
        .status
        .as_ref()
        .map(|s| s.config.clone())
        .unwrap_or_default();
    for (key, wanted) in &managed {
        let found = state.configs.get(key);
        if found == Some(wanted) {
            continue;
        }
        if applied.get(key) == Some(wanted) {
            plan.drifted.push((key.clone(), found.cloned()));
        }
        plan.set_configs.insert(key.clone(), wanted.clone());
    }
    plan.unset_configs = applied
        .keys()
        .filter(|k| !managed.contains_key(*k) && state.topic_configs.contains_key(*k))
        .cloned()
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

    /// `topic` as last applied with `applied` as its managed configs.
    fn applied(mut topic: KafkaTopic, applied: &[(&str, &str)]) -> KafkaTopic {
        topic.status = Some(weir_crds::KafkaTopicStatus {
            config: applied
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        });
        topic
    }

    #[test]
    fn a_managed_config_changed_on_the_broker_is_drift_and_is_put_back() {
        let t = applied(topic(3, None, "2000"), &[("retention.ms", "2000")]);
        let p = plan(&t, "t", Some(&state(3, 1, "1000")));
        assert_eq!(
            p.drifted,
            vec![("retention.ms".to_owned(), Some("1000".to_owned()))]
        );
        assert_eq!(
            p.set_configs.get("retention.ms").map(String::as_str),
            Some("2000")
        );
        assert!(p.unset_configs.is_empty());
    }

    #[test]
    fn a_config_the_spec_stopped_managing_goes_back_to_the_default() {
        let t = applied(
            topic(3, None, "1000"),
            &[("retention.ms", "1000"), ("cleanup.policy", "compact")],
        );
        let mut current = state(3, 1, "1000");
        current
            .topic_configs
            .insert("cleanup.policy".to_owned(), "compact".to_owned());
        let p = plan(&t, "t", Some(&current));
        assert_eq!(p.unset_configs, vec!["cleanup.policy".to_owned()]);
        assert!(p.set_configs.is_empty() && p.drifted.is_empty());
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
                same.set_configs.len(),
                same.problems.len()
            ),
            (false, None, 0, 0)
        );
    }

    #[test]
    fn raises_partitions_sets_changed_configs_and_refuses_what_kafka_cannot_do() {
        let p = plan(&topic(6, None, "2000"), "t", Some(&state(3, 1, "1000")));
        assert_eq!(p.raise_partitions, Some(6));
        assert_eq!(
            p.set_configs,
            BTreeMap::from([("retention.ms".to_owned(), "2000".to_owned())])
        );
        assert_eq!(p.drifted, vec![], "a spec change is not drift");
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
