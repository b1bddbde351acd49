//! `spec.replay`: a one-shot reset of the pipeline's consumer group, identified by its
//! token. A token not yet in `status.lastReplay`: the workers are scaled to zero; once the
//! group has no members its offsets are moved (Kafka refuses a reset while members could
//! overwrite it with their next commit); the token and time are recorded, and the normal
//! reconcile scales the workers back. A token already recorded does nothing, so applying
//! the same YAML from Git again is safe. A replay that cannot finish records why and the
//! workers resume.

use std::collections::BTreeMap;

use kube::ResourceExt as _;
use weir_crds::condition::types::SCALING;
use weir_crds::{EventPipeline, EventPipelineStatus, Replay, ReplayStatus, ReplayTarget};

use crate::conditions;
use crate::plugin::kafka::Kafka;
use crate::plugin::reset::{ResetRequest, ResetTo, TopicSelection, reset};

/// The condition that is True while a replay waits for the workers to stop.
pub const REPLAYING: &str = "Replaying";

/// Whether `replay` is still to be carried out.
pub fn pending(pipeline: &EventPipeline) -> Option<&Replay> {
    let replay = pipeline.spec.replay.as_ref()?;
    let done = pipeline
        .status
        .as_ref()
        .and_then(|s| s.last_replay.as_ref())
        .is_some_and(|r| r.token == replay.token);
    (!done).then_some(replay)
}

/// The replay the workers carry out: `spec.replay` once its group reset is recorded
/// without error. Its token (and whether to truncate) is rendered into the worker's
/// environment from then on, so the first worker to start empties what it must before it
/// writes, and any later start with the same token skips it. Never before the reset: a
/// worker truncating then would write again from the old offsets.
pub fn carried_out(pipeline: &EventPipeline) -> Option<&ReplayStatus> {
    let replay = pipeline.spec.replay.as_ref()?;
    pipeline
        .status
        .as_ref()?
        .last_replay
        .as_ref()
        .filter(|done| done.token == replay.token && done.error.is_none())
}

/// `pipeline` as this operator knows it: with `replayed` (the replay it last recorded) as
/// its `status.lastReplay` when the cached status does not show it yet.
pub fn remembered<'a>(
    pipeline: &'a EventPipeline,
    replayed: Option<&ReplayStatus>,
) -> std::borrow::Cow<'a, EventPipeline> {
    let wanted = pipeline.spec.replay.as_ref().map(|r| r.token.as_str());
    let shown = pipeline
        .status
        .as_ref()
        .and_then(|s| s.last_replay.as_ref())
        .map(|r| r.token.as_str());
    match replayed {
        Some(done) if Some(done.token.as_str()) == wanted && shown != wanted => {
            let mut seen = pipeline.clone();
            seen.status.get_or_insert_with(Default::default).last_replay = Some(done.clone());
            std::borrow::Cow::Owned(seen)
        }
        _ => std::borrow::Cow::Borrowed(pipeline),
    }
}

/// Where a replay ends after a step.
#[derive(Debug)]
pub enum Progress {
    /// The group still has members (workers stopping): look again shortly.
    Waiting(usize),
    /// Done (or failed: `error` says why); the workers may run again.
    Finished(ReplayStatus),
}

/// One step of the replay: with no member left, resets the group's offsets.
pub async fn step(
    kafka: &Kafka,
    group: &str,
    pipeline: &EventPipeline,
    replay: &Replay,
) -> Progress {
    let finished = |error: Option<String>| {
        Progress::Finished(ReplayStatus {
            token: replay.token.clone(),
            completed_at: conditions::now(),
            // The workers truncate (they start with the token); only once the group is reset.
            truncated: replay.truncate_sinks && error.is_none(),
            error,
        })
    };
    match kafka.groups(Some(group)).await {
        Ok(groups) => {
            let members = groups.iter().map(|g| g.members.len()).sum::<usize>();
            if members > 0 {
                return Progress::Waiting(members);
            }
        }
        Err(e) => return finished(Some(format!("cannot describe consumer group {group}: {e}"))),
    }
    let result = match replay.to {
        ReplayTarget::Offsets => {
            let offsets: BTreeMap<(String, i32), i64> = replay
                .offsets
                .iter()
                .map(|o| ((o.topic.clone(), o.partition), o.offset))
                .collect();
            kafka
                .commit(group, &offsets)
                .await
                .map_err(|e| e.to_string())
        }
        target => {
            let to = match target {
                ReplayTarget::Earliest => Ok(ResetTo::Earliest),
                ReplayTarget::Latest => Ok(ResetTo::Latest),
                _ => crate::plugin::parse_time(replay.timestamp.as_deref().unwrap_or_default())
                    .map(ResetTo::Time)
                    .map_err(|e| format!("spec.replay.timestamp: {e}")),
            };
            match to {
                Ok(to) => reset(
                    kafka,
                    &ResetRequest {
                        group: group.to_owned(),
                        topics: pipeline
                            .spec
                            .source
                            .topics
                            .iter()
                            .map(|t| TopicSelection {
                                topic: t.clone(),
                                partitions: None,
                            })
                            .collect(),
                        to,
                        dry_run: false,
                    },
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            }
        }
    };
    finished(result.err().map(|e| {
        format!(
            "resetting consumer group {group} of {}: {e}; the workers resumed (change the token to try again)",
            pipeline.name_any()
        )
    }))
}

/// The status while the replay waits for `members` to leave.
pub fn waiting(
    mut status: EventPipelineStatus,
    pipeline: &EventPipeline,
    replay: &Replay,
    members: usize,
) -> EventPipelineStatus {
    let generation = pipeline.metadata.generation;
    let message = format!(
        "replay {}: the workers are scaled to zero; waiting for {members} consumer-group member(s) to leave before resetting the offsets",
        replay.token
    );
    conditions::set(
        &mut status.conditions,
        REPLAYING,
        true,
        "WaitingForMembers",
        message.clone(),
        generation,
    );
    conditions::set(
        &mut status.conditions,
        SCALING,
        false,
        "Replaying",
        message,
        generation,
    );
    status.replicas = Some(0);
    status
}

/// What the workers do first when they resume after `done`.
pub fn resuming(done: &ReplayStatus) -> &'static str {
    if done.truncated {
        " and the first of them empties the SQL sinks' tables before it writes"
    } else {
        ""
    }
}

/// The status once the replay finished.
pub fn finished(
    mut status: EventPipelineStatus,
    pipeline: &EventPipeline,
    done: ReplayStatus,
) -> EventPipelineStatus {
    let generation = pipeline.metadata.generation;
    match &done.error {
        None => conditions::set(
            &mut status.conditions,
            REPLAYING,
            false,
            "Replayed",
            format!(
                "replay {} reset the consumer group at {}; the workers resume{}",
                done.token,
                done.completed_at,
                resuming(&done)
            ),
            generation,
        ),
        Some(error) => conditions::set(
            &mut status.conditions,
            REPLAYING,
            false,
            "ReplayFailed",
            error.clone(),
            generation,
        ),
    }
    status.last_replay = Some(done);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(token: &str, recorded: Option<ReplayStatus>) -> EventPipeline {
        let spec: weir_crds::EventPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"topics": ["in"]},
            "sinks": [{"postgres": {"urlFrom": {"env": "DB"}, "table": "t", "columns": [{"name": "a", "type": "text"}]}}],
            "replay": {"token": token, "to": "Earliest", "truncateSinks": true}
        }))
        .expect("spec parses");
        let mut pipeline = EventPipeline::new("p", spec);
        pipeline.status = recorded.map(|r| EventPipelineStatus {
            last_replay: Some(r),
            ..EventPipelineStatus::default()
        });
        pipeline
    }

    fn done(token: &str, error: Option<&str>) -> ReplayStatus {
        ReplayStatus {
            token: token.into(),
            completed_at: "2026-12-01T12:00:00Z".into(),
            truncated: error.is_none(),
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn a_replay_this_operator_recorded_is_carried_out_before_the_cache_shows_it() {
        // The cache still shows the previous replay; this operator just recorded t2.
        let stale = pipeline("t2", Some(done("t1", None)));
        assert_eq!(carried_out(&stale), None);
        let seen = remembered(&stale, Some(&done("t2", None)));
        assert_eq!(carried_out(&seen).map(|r| r.token.as_str()), Some("t2"));
        // What the cache shows wins once it shows the token; an older memory changes nothing.
        let fresh = pipeline("t2", Some(done("t2", None)));
        assert!(matches!(
            remembered(&fresh, Some(&done("t1", None))),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            carried_out(&remembered(&stale, Some(&done("t1", None)))),
            None
        );
    }

    #[test]
    fn a_failed_replay_is_not_carried_out_by_the_workers() {
        let failed = pipeline("t2", None);
        let seen = remembered(&failed, Some(&done("t2", Some("cannot reset"))));
        assert!(pending(&seen).is_none(), "recorded: not tried again");
        assert_eq!(carried_out(&seen), None);
    }
}
