//! `kubectl weir replay PIPELINE --to earliest|latest|TIME|TOPIC:PARTITION=OFFSET…
//! [--truncate]`: writes a new `spec.replay` with a fresh token (a JSON merge patch); the
//! operator carries it out once and records it in `status.lastReplay`.

use std::fmt::Write as _;

use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde_json::json;
use weir_crds::{EventPipeline, PartitionOffset, Replay, ReplayTarget};

use super::{PluginError, Report, Target, format_millis, parse_time};

/// Where the replay rewinds to, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayTo {
    Earliest,
    Latest,
    /// Milliseconds since the epoch.
    Time(i64),
    Offsets(Vec<PartitionOffset>),
}

impl std::str::FromStr for ReplayTo {
    type Err = PluginError;

    /// `earliest`, `latest`, a time (RFC 3339 or a duration before now), or
    /// `TOPIC:PARTITION=OFFSET` pairs separated by commas.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "earliest" => return Ok(ReplayTo::Earliest),
            "latest" => return Ok(ReplayTo::Latest),
            _ => {}
        }
        if s.contains('=') {
            let invalid = |part: &str| {
                PluginError::Invalid(format!(
                    "--to {part:?}: an offset is TOPIC:PARTITION=OFFSET, e.g. orders:0=1500"
                ))
            };
            let offsets = s
                .split(',')
                .map(|part| {
                    let (at, offset) = part.split_once('=').ok_or_else(|| invalid(part))?;
                    let (topic, partition) = at.rsplit_once(':').ok_or_else(|| invalid(part))?;
                    Ok(PartitionOffset {
                        topic: topic.to_owned(),
                        partition: partition.parse().map_err(|_| invalid(part))?,
                        offset: offset.parse().map_err(|_| invalid(part))?,
                    })
                })
                .collect::<Result<Vec<_>, PluginError>>()?;
            return Ok(ReplayTo::Offsets(offsets));
        }
        parse_time(s).map(ReplayTo::Time).map_err(|_| {
            PluginError::Invalid(format!(
                "--to {s:?}: use earliest, latest, an RFC 3339 time (2026-11-23T10:00:00Z), a duration before now (2h), or TOPIC:PARTITION=OFFSET[,…]"
            ))
        })
    }
}

/// The replay written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayRequested {
    pub pipeline: String,
    pub namespace: String,
    pub replay: Replay,
}

/// Writes `spec.replay` of the pipeline `name`: a new token (`token`, else
/// `replay-<unix seconds>`), the target, and whether to truncate the sinks.
pub async fn replay(
    target: &Target,
    name: &str,
    to: ReplayTo,
    truncate: bool,
    token: Option<String>,
) -> Result<ReplayRequested, PluginError> {
    // The pipeline must exist, and a token must differ from the last one.
    let pipeline = target.pipeline(name).await?;
    let token = token.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("replay-{now}")
    });
    if pipeline
        .spec
        .replay
        .as_ref()
        .is_some_and(|r| r.token == token)
    {
        return Err(PluginError::Invalid(format!(
            "EventPipeline {}/{name} already has replay token {token:?}: a replay runs once per token, so pick another",
            target.namespace
        )));
    }
    let (to, timestamp, offsets) = match to {
        ReplayTo::Earliest => (ReplayTarget::Earliest, None, Vec::new()),
        ReplayTo::Latest => (ReplayTarget::Latest, None, Vec::new()),
        ReplayTo::Time(ms) => (ReplayTarget::Timestamp, Some(format_millis(ms)), Vec::new()),
        ReplayTo::Offsets(offsets) => (ReplayTarget::Offsets, None, offsets),
    };
    let replay = Replay {
        token,
        to,
        timestamp,
        offsets,
        truncate_sinks: truncate,
    };
    acceptable(
        &pipeline.spec,
        &replay,
        &format!("{}/{name}", target.namespace),
    )?;
    // Every field is written, absent ones as null: a merge patch would keep a previous
    // replay's timestamp or offsets otherwise.
    let patch = json!({"spec": {"replay": {
        "token": replay.token,
        "to": replay.to,
        "timestamp": replay.timestamp,
        "offsets": if replay.offsets.is_empty() { serde_json::Value::Null } else { json!(replay.offsets) },
        "truncateSinks": replay.truncate_sinks,
    }}});
    let api: Api<EventPipeline> = Api::namespaced(target.client.clone(), &target.namespace);
    api.patch(
        name,
        &PatchParams {
            field_manager: Some("kubectl-weir".to_owned()),
            ..PatchParams::default()
        },
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(ReplayRequested {
        pipeline: name.to_owned(),
        namespace: target.namespace.clone(),
        replay,
    })
}

/// Refuses a replay the operator would refuse (`validate()` of the spec with it), such as
/// truncating a sink that cannot be emptied, before anything is written.
fn acceptable(
    spec: &weir_crds::EventPipelineSpec,
    replay: &Replay,
    pipeline: &str,
) -> Result<(), PluginError> {
    let mut with = spec.clone();
    with.replay = Some(replay.clone());
    let Err(problems) = with.validate() else {
        return Ok(());
    };
    let refused: Vec<String> = problems
        .iter()
        .filter(|p| p.path.starts_with("spec.replay"))
        .map(ToString::to_string)
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(PluginError::Invalid(format!(
        "EventPipeline {pipeline}: the operator would refuse this replay, so it is not written: {}",
        refused.join("; ")
    )))
}

impl Report for ReplayRequested {
    fn table(&self) -> String {
        let r = &self.replay;
        let to = match r.to {
            ReplayTarget::Earliest => "the earliest offsets".to_owned(),
            ReplayTarget::Latest => "the latest offsets".to_owned(),
            ReplayTarget::Timestamp => r.timestamp.clone().unwrap_or_default(),
            ReplayTarget::Offsets => r
                .offsets
                .iter()
                .map(|o| format!("{}:{}={}", o.topic, o.partition, o.offset))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Replay {:?} of {}/{} written: rewind to {to}{}.",
            r.token,
            self.namespace,
            self.pipeline,
            if r.truncate_sinks {
                ", sinks truncated first"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "The operator carries it out once; `kubectl weir status {}` shows it under Last replay.",
            self.pipeline
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_truncating_a_sink_that_cannot_be_emptied_is_not_written() {
        let spec: weir_crds::EventPipelineSpec = serde_json::from_value(json!({
            "source": {"topics": ["in"]},
            "sinks": [{"kafka": {"topic": "out"}}]
        }))
        .expect("spec parses");
        let mut replay = Replay {
            token: "t1".into(),
            to: ReplayTarget::Earliest,
            timestamp: None,
            offsets: vec![],
            truncate_sinks: true,
        };
        let refused = acceptable(&spec, &replay, "shop/copy")
            .expect_err("refused")
            .to_string();
        assert!(refused.contains("spec.replay.truncateSinks"), "{refused}");
        assert!(refused.contains("cannot be truncated"), "{refused}");
        replay.truncate_sinks = false;
        assert!(acceptable(&spec, &replay, "shop/copy").is_ok());
    }

    #[test]
    fn replay_targets_parse() {
        assert_eq!("EARLIEST".parse::<ReplayTo>().unwrap(), ReplayTo::Earliest);
        assert_eq!(
            "orders:0=15,orders.v2:3=0".parse::<ReplayTo>().unwrap(),
            ReplayTo::Offsets(vec![
                PartitionOffset {
                    topic: "orders".into(),
                    partition: 0,
                    offset: 15
                },
                PartitionOffset {
                    topic: "orders.v2".into(),
                    partition: 3,
                    offset: 0
                },
            ])
        );
        assert!("orders=15".parse::<ReplayTo>().is_err());
        assert!(matches!(
            "2026-11-23T10:00:00Z".parse::<ReplayTo>().unwrap(),
            ReplayTo::Time(1_795_428_000_000)
        ));
    }
}
