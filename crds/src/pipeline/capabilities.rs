//! What this version of the worker and operator can run. A spec the schema accepts but that
//! asks for something not built yet is refused here, with the field path and what to use
//! instead, so that "accepted" means "runs": the operator reports these problems as
//! `Ready=False InvalidSpec` before rendering anything, and the worker refuses to start on
//! them. Each refusal goes when its feature lands.

use super::*;
use crate::problems::Collector;

/// Sink kinds the worker writes to.
pub const RUNNABLE_SINKS: &[&str] = &[
    "postgres", "mysql", "sqlite", "redis", "mongodb", "http", "kafka",
];

/// Why a sink of `kind` cannot be emptied by `spec.replay.truncateSinks` (`None`: it can).
/// The worker empties the SQL sinks' tables itself, in one transaction with the replay's
/// record, before it writes anything.
pub fn untruncatable(kind: &str) -> Option<&'static str> {
    match kind {
        "postgres" | "mysql" | "sqlite" => None,
        "mongodb" => {
            Some("emptying a MongoDB collection on replay is not available in this version yet")
        }
        "redis" => Some(
            "Weir cannot tell the keys it wrote from the other keys in the database (the replay overwrites the keys it sets anyway)",
        ),
        "http" => Some("Weir cannot empty what an HTTP endpoint stored"),
        "kafka" => Some(
            "records cannot be deleted from a Kafka topic (use a new topic, or one with cleanup.policy compact)",
        ),
        _ => Some("this sink kind is not known to this version"),
    }
}

impl EventPipelineSpec {
    pub(super) fn check_capabilities(&self, spec: &mut Collector<'_>) {
        for (i, sink) in self.sinks.iter().enumerate() {
            for kind in sink.kinds() {
                if !RUNNABLE_SINKS.contains(&kind) {
                    spec.index("sinks", i).field_error(
                        kind,
                        format!(
                            "the {kind} sink is not available in this version yet; the sinks that run are {}",
                            RUNNABLE_SINKS.join(", ")
                        ),
                    );
                }
            }
        }
        if self.delivery == Delivery::ExactlyOnce {
            self.check_exactly_once(spec);
        }
        if self.replay.as_ref().is_some_and(|r| r.truncate_sinks) {
            for (i, sink) in self.sinks.iter().enumerate() {
                for kind in sink.kinds() {
                    let Some(why) = untruncatable(kind) else {
                        continue;
                    };
                    let named = sink
                        .name
                        .as_ref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default();
                    spec.at("replay").field_error(
                        "truncateSinks",
                        format!(
                            "the {kind} sink spec.sinks[{i}]{named} cannot be truncated: {why}. Set truncateSinks to false and empty it yourself while the workers are held at zero (kubectl scale eventpipeline --replicas 0, empty it, apply the replay, then remove spec.replicas)"
                        ),
                    );
                }
            }
        }
        if self.idempotency.is_some() {
            if !self.sinks.iter().any(|s| {
                s.postgres.is_some() || s.mysql.is_some() || s.sqlite.is_some() || s.http.is_some()
            }) {
                spec.field_error(
                    "idempotency",
                    "needs a postgres, mysql or sqlite sink, which records the applied keys in its own transaction, or an http sink, which sends them as Idempotency-Key headers; remove it (Redis SET, HSET and DEL give the same result when repeated)",
                );
            }
            // A kafka sink records no keys and a repeated record is a second record on its
            // topic: spec.idempotency would silently not hold for it.
            for (i, sink) in self.sinks.iter().enumerate() {
                if sink.kafka.is_some() {
                    spec.index("sinks", i).field_error(
                        "kafka",
                        "spec.idempotency does not apply to a kafka sink (it records no keys, so a redelivered record is written again): give it a pipeline of its own, with delivery: ExactlyOnce for no duplicates",
                    );
                }
            }
        }
    }

    /// Exactly-once needs one sink that commits the consumed offsets in its own transaction
    /// with the data: a postgres or mysql table (offsets in the same database
    /// transaction) or a kafka topic on the pipeline's own cluster (a Kafka transaction).
    /// Several sinks cannot commit atomically together.
    fn check_exactly_once(&self, spec: &mut Collector<'_>) {
        const WHICH: &str = "ExactlyOnce needs exactly one sink that commits the consumed offsets in its own transaction: postgres, mysql, or kafka on the pipeline's own cluster";
        if self.sinks.len() > 1 {
            spec.field_error(
                "delivery",
                format!(
                    "{WHICH}; this pipeline has {} sinks: use AtLeastOnce (with spec.idempotency for the SQL sinks), or one pipeline per sink",
                    self.sinks.len()
                ),
            );
            return;
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            for kind in sink.kinds() {
                let mut at = spec.index("sinks", i);
                match kind {
                    "postgres" | "mysql" => {}
                    "kafka" if sink.kafka.as_ref().is_some_and(|k| k.connection_ref.is_some()) => {
                        at.at("kafka").field_error(
                            "connectionRef",
                            "ExactlyOnce needs the kafka sink on the pipeline's own cluster (one transaction covers the records and the consumed offsets): remove connectionRef, or use delivery AtLeastOnce",
                        );
                    }
                    "kafka" => {}
                    other => at.field_error(
                        other,
                        format!(
                            "the {other} sink cannot commit the consumed offsets in its own transaction, so spec.delivery ExactlyOnce is refused: use AtLeastOnce{}",
                            match other {
                                "sqlite" => " with spec.idempotency",
                                _ => "",
                            }
                        ),
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: serde_json::Value) -> EventPipelineSpec {
        let mut doc = serde_json::json!({
            "source": {"topics": ["in"]},
            "sinks": [{"postgres": {"urlFrom": {"env": "DB"}, "table": "t", "columns": [{"name": "a", "type": "text"}]}}]
        });
        if let (Some(doc), Some(extra)) = (doc.as_object_mut(), extra.as_object()) {
            doc.extend(extra.clone());
        }
        serde_json::from_value(doc).expect("spec parses")
    }

    fn paths(spec: &EventPipelineSpec) -> Vec<String> {
        match spec.validate() {
            Ok(()) => vec![],
            Err(problems) => problems.iter().map(|p| p.path.clone()).collect(),
        }
    }

    #[test]
    fn what_runs_is_accepted() {
        assert_eq!(paths(&spec(serde_json::json!({}))), Vec::<String>::new());
        let pinned = spec(serde_json::json!({"replicas": 0, "scaling": {"minReplicas": 0}}));
        assert_eq!(paths(&pinned), Vec::<String>::new());
        let replay = spec(serde_json::json!({"replay": {"token": "t1", "to": "Earliest"}}));
        assert_eq!(paths(&replay), Vec::<String>::new());
        // The lag autoscaler runs: every scaling field is accepted.
        let scaled = spec(serde_json::json!({"scaling": {
            "minReplicas": 0, "maxReplicas": 12, "targetLagPerReplica": 500,
            "targetCatchUpTime": "2m", "activationLag": 10, "cooldown": "1m"
        }}));
        assert_eq!(paths(&scaled), Vec::<String>::new());
    }

    #[test]
    fn every_sink_kind_runs_a_kafka_sink_on_another_cluster_at_least_once() {
        let sinks = serde_json::json!([
            {"http": {"url": "http://x"}},
            {"kafka": {"topic": "out"}},
            {"mysql": {"urlFrom": {"env": "DB"}, "table": "t", "columns": [{"name": "a", "type": "text"}]}},
            {"mongodb": {"urlFrom": {"env": "M"}, "database": "d", "collection": "c"}},
            {"kafka": {"topic": "out", "connectionRef": {"name": "other"}}}
        ]);
        assert_eq!(
            paths(&spec(serde_json::json!({"sinks": sinks}))),
            Vec::<String>::new()
        );
        let exactly_once = spec(serde_json::json!({"delivery": "ExactlyOnce", "sinks": [
            {"kafka": {"topic": "out", "connectionRef": {"name": "other"}}}
        ]}));
        assert_eq!(
            paths(&exactly_once),
            vec!["spec.sinks[0].kafka.connectionRef".to_owned()]
        );
    }

    #[test]
    fn truncating_sql_sinks_on_replay_is_accepted() {
        let truncate = serde_json::json!({"token": "t1", "to": "Earliest", "truncateSinks": true});
        let s = spec(serde_json::json!({"replay": truncate}));
        assert_eq!(paths(&s), Vec::<String>::new());
        let s = spec(serde_json::json!({"replay": truncate, "sinks": [
            {"mysql": {"urlFrom": {"env": "DB"}, "table": "t", "columns": [{"name": "a", "type": "text"}]}},
            {"sqlite": {"url": "sqlite:///x.db", "table": "t", "columns": [{"name": "a", "type": "text"}]}}
        ]}));
        assert_eq!(paths(&s), Vec::<String>::new());
    }

    #[test]
    fn truncating_a_sink_that_cannot_be_emptied_is_refused_naming_the_field_and_the_sink() {
        for (sink, kind) in [
            (
                serde_json::json!({"redis": {"urlFrom": {"env": "R"}, "key": "event.id"}}),
                "redis",
            ),
            (serde_json::json!({"http": {"url": "http://x"}}), "http"),
            (serde_json::json!({"kafka": {"topic": "out"}}), "kafka"),
            (
                serde_json::json!({"mongodb": {"urlFrom": {"env": "M"}, "database": "d", "collection": "c"}}),
                "mongodb",
            ),
        ] {
            let s = spec(serde_json::json!({
                "replay": {"token": "t1", "to": "Earliest", "truncateSinks": true},
                "sinks": [
                    {"postgres": {"urlFrom": {"env": "DB"}, "table": "t", "columns": [{"name": "a", "type": "text"}]}},
                    sink
                ]
            }));
            let problems = s.validate().expect_err("refused");
            let refused: Vec<_> = problems
                .iter()
                .filter(|p| p.path == "spec.replay.truncateSinks")
                .collect();
            assert_eq!(refused.len(), 1, "{kind}: {problems}");
            let message = &refused[0].message;
            assert!(
                message.contains(&format!("the {kind} sink spec.sinks[1]")),
                "{message}"
            );
            assert!(message.contains("Set truncateSinks to false"), "{message}");
            // Without truncation the same replay runs.
            let mut kept = s.clone();
            if let Some(replay) = kept.replay.as_mut() {
                replay.truncate_sinks = false;
            }
            assert_eq!(paths(&kept), Vec::<String>::new(), "{kind}");
        }
    }

    #[test]
    fn exactly_once_runs_with_one_postgres_mysql_or_kafka_sink() {
        let s = spec(serde_json::json!({"delivery": "ExactlyOnce"}));
        assert_eq!(paths(&s), Vec::<String>::new());
        for sink in [
            serde_json::json!({"mysql": {"urlFrom": {"env": "DB"}, "table": "t", "columns": [{"name": "a", "type": "text"}]}}),
            serde_json::json!({"kafka": {"topic": "out"}}),
        ] {
            let s = spec(serde_json::json!({"delivery": "ExactlyOnce", "sinks": [sink]}));
            assert_eq!(paths(&s), Vec::<String>::new());
        }
    }

    #[test]
    fn exactly_once_is_refused_with_sinks_that_cannot_commit_offsets_naming_the_field() {
        for (sink, path) in [
            (
                serde_json::json!({"redis": {"urlFrom": {"env": "R"}, "key": "event.id"}}),
                "spec.sinks[0].redis",
            ),
            (
                serde_json::json!({"http": {"url": "http://x"}}),
                "spec.sinks[0].http",
            ),
        ] {
            let s = spec(serde_json::json!({"delivery": "ExactlyOnce", "sinks": [sink]}));
            let problems = s.validate().expect_err("refused");
            let problem = problems
                .iter()
                .find(|p| p.path == path && p.message.contains("ExactlyOnce"))
                .unwrap_or_else(|| panic!("{path} not refused for ExactlyOnce: {problems}"));
            assert!(problem.message.contains("AtLeastOnce"), "{problem}");
        }
        let two = spec(serde_json::json!({"delivery": "ExactlyOnce", "sinks": [
            {"postgres": {"urlFrom": {"env": "DB"}, "table": "t", "columns": [{"name": "a", "type": "text"}]}},
            {"postgres": {"urlFrom": {"env": "DB"}, "table": "u", "columns": [{"name": "a", "type": "text"}]}}
        ]}));
        assert!(paths(&two).contains(&"spec.delivery".to_owned()));
    }

    #[test]
    fn idempotency_needs_a_sink_that_records_keys() {
        let s = spec(serde_json::json!({
            "idempotency": {"key": "event.id"},
            "sinks": [{"redis": {"urlFrom": {"env": "R"}, "key": "event.id"}}]
        }));
        assert!(paths(&s).contains(&"spec.idempotency".to_owned()));
        let http = spec(serde_json::json!({
            "idempotency": {"key": "event.id"},
            "sinks": [{"http": {"url": "http://x"}}]
        }));
        assert_eq!(
            paths(&http),
            Vec::<String>::new(),
            "sent as Idempotency-Key"
        );
        let with_kafka = spec(serde_json::json!({
            "idempotency": {"key": "event.id"},
            "sinks": [
                {"postgres": {"urlFrom": {"env": "DB"}, "table": "t", "columns": [{"name": "a", "type": "text"}]}},
                {"kafka": {"topic": "copies"}}
            ]
        }));
        assert_eq!(paths(&with_kafka), vec!["spec.sinks[1].kafka".to_owned()]);
    }
}
