//! `kubectl weir reset-offsets GROUP --to earliest|latest|TIME|OFFSET`: moves a consumer
//! group's committed offsets, per topic and partition. Refused while the group has
//! members, as Kafka's kafka-consumer-groups tool refuses it (a member would overwrite
//! the reset with its next commit); `--dry-run` shows the plan without committing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::kafka::{Kafka, Partition};
use super::table::{Table, or_dash};
use super::{PluginError, Report, parse_time};

/// Where offsets move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetTo {
    /// The oldest retained record.
    Earliest,
    /// After the newest record: the group skips everything produced so far.
    Latest,
    /// The first record at or after this time (milliseconds since the epoch).
    Time(i64),
    /// This offset on every selected partition (kept within the retained records).
    Offset(i64),
}

impl std::str::FromStr for ResetTo {
    type Err = PluginError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "earliest" => Ok(ResetTo::Earliest),
            "latest" => Ok(ResetTo::Latest),
            _ => match s.parse::<i64>() {
                Ok(offset) if offset >= 0 => Ok(ResetTo::Offset(offset)),
                Ok(_) => Err(PluginError::Invalid(format!(
                    "--to {s}: an offset is 0 or more"
                ))),
                Err(_) => parse_time(s).map(ResetTo::Time).map_err(|_| {
                    PluginError::Invalid(format!(
                        "--to {s:?}: use earliest, latest, an RFC 3339 time (2026-11-23T10:00:00Z), a duration before now (2h) or an offset (1500)"
                    ))
                }),
            },
        }
    }
}

impl std::fmt::Display for ResetTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetTo::Earliest => f.write_str("earliest"),
            ResetTo::Latest => f.write_str("latest"),
            ResetTo::Time(ms) => f.write_str(&super::format_millis(*ms)),
            ResetTo::Offset(offset) => write!(f, "offset {offset}"),
        }
    }
}

/// A topic, and optionally some of its partitions: `orders` or `orders:0,2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSelection {
    pub topic: String,
    /// `None`: every partition.
    pub partitions: Option<Vec<i32>>,
}

impl std::str::FromStr for TopicSelection {
    type Err = PluginError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            PluginError::Invalid(format!(
                "--topic {s:?}: use TOPIC or TOPIC:PARTITION[,PARTITION…], e.g. orders:0,2"
            ))
        };
        match s.split_once(':') {
            None if !s.is_empty() => Ok(TopicSelection {
                topic: s.to_owned(),
                partitions: None,
            }),
            None => Err(invalid()),
            Some((topic, list)) => {
                let partitions = list
                    .split(',')
                    .map(|p| p.trim().parse::<i32>().map_err(|_| invalid()))
                    .collect::<Result<Vec<_>, _>>()?;
                if topic.is_empty() {
                    return Err(invalid());
                }
                Ok(TopicSelection {
                    topic: topic.to_owned(),
                    partitions: Some(partitions),
                })
            }
        }
    }
}

/// What to reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResetRequest {
    pub group: String,
    /// Empty: every topic the group has committed offsets on.
    pub topics: Vec<TopicSelection>,
    pub to: ResetTo,
    pub dry_run: bool,
}

/// The plan, and whether it was carried out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResetPlan {
    pub group: String,
    pub state: String,
    pub members: usize,
    pub to: String,
    /// False for `--dry-run`.
    pub executed: bool,
    pub partitions: Vec<ResetPartition>,
}

/// One partition's move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResetPartition {
    pub topic: String,
    pub partition: i32,
    /// The committed offset before; absent when the group had none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<i64>,
    pub new: i64,
}

/// Plans the reset and, unless `dry_run`, commits it for the group.
pub async fn reset(kafka: &Kafka, request: &ResetRequest) -> Result<ResetPlan, PluginError> {
    let group = kafka.groups(Some(&request.group)).await?.into_iter().next();
    let (state, members) =
        group.map_or_else(|| ("Dead".to_owned(), Vec::new()), |g| (g.state, g.members));
    let selections = if request.topics.is_empty() {
        let all = kafka.topics().await?;
        let committed = kafka.committed(&request.group, &all).await?;
        let mut topics: Vec<String> = committed.keys().map(|(t, _)| t.clone()).collect();
        topics.dedup();
        if topics.is_empty() {
            return Err(PluginError::Invalid(format!(
                "consumer group {} has no committed offsets: name the topics to reset with --topic",
                request.group
            )));
        }
        topics
            .into_iter()
            .map(|topic| TopicSelection {
                topic,
                partitions: None,
            })
            .collect()
    } else {
        request.topics.clone()
    };
    let topics: Vec<String> = selections.iter().map(|s| s.topic.clone()).collect();
    let marks = kafka.watermarks(&topics).await?;
    let mut chosen: Vec<Partition> = Vec::new();
    for selection in &selections {
        let of_topic: Vec<Partition> = marks
            .keys()
            .filter(|(t, _)| *t == selection.topic)
            .cloned()
            .collect();
        if of_topic.is_empty() {
            return Err(PluginError::Invalid(format!(
                "topic {:?} does not exist on this cluster",
                selection.topic
            )));
        }
        match &selection.partitions {
            None => chosen.extend(of_topic),
            Some(wanted) => {
                for p in wanted {
                    let key = (selection.topic.clone(), *p);
                    if !of_topic.contains(&key) {
                        return Err(PluginError::Invalid(format!(
                            "topic {:?} has no partition {p} (it has {})",
                            selection.topic,
                            of_topic.len()
                        )));
                    }
                    chosen.push(key);
                }
            }
        }
    }
    chosen.sort();
    chosen.dedup();
    let current = kafka.committed(&request.group, &topics).await?;
    let at_time = match request.to {
        ResetTo::Time(ms) => kafka.offsets_for_time(&chosen, ms).await?,
        _ => BTreeMap::new(),
    };
    let partitions: Vec<ResetPartition> = chosen
        .iter()
        .map(|key| {
            let (low, high) = marks.get(key).copied().unwrap_or((0, 0));
            let new = match request.to {
                ResetTo::Earliest => low,
                ResetTo::Latest => high,
                ResetTo::Time(_) => at_time.get(key).copied().unwrap_or(high),
                ResetTo::Offset(offset) => offset.clamp(low, high),
            };
            ResetPartition {
                topic: key.0.clone(),
                partition: key.1,
                current: current.get(key).copied(),
                new,
            }
        })
        .collect();
    let plan = ResetPlan {
        group: request.group.clone(),
        state,
        members: members.len(),
        to: request.to.to_string(),
        executed: false,
        partitions,
    };
    if request.dry_run {
        return Ok(plan);
    }
    if !members.is_empty() {
        let mut clients: Vec<String> = members.iter().map(|m| m.client_id.clone()).collect();
        clients.sort();
        clients.dedup();
        return Err(PluginError::GroupActive {
            group: request.group.clone(),
            members: members.len(),
            clients: clients.join(", "),
        });
    }
    let offsets: BTreeMap<Partition, i64> = plan
        .partitions
        .iter()
        .map(|p| ((p.topic.clone(), p.partition), p.new))
        .collect();
    kafka.commit(&request.group, &offsets).await?;
    Ok(ResetPlan {
        executed: true,
        ..plan
    })
}

impl Report for ResetPlan {
    fn table(&self) -> String {
        let mut out = String::new();
        let mut table = Table::new(&["TOPIC", "PARTITION", "CURRENT-OFFSET", "NEW-OFFSET"]);
        for p in &self.partitions {
            table.row(vec![
                p.topic.clone(),
                p.partition.to_string(),
                or_dash(p.current),
                p.new.to_string(),
            ]);
        }
        out.push_str(&table.to_string());
        if self.executed {
            let _ = writeln!(
                out,
                "\nConsumer group {} reset to {} on {} partition(s).",
                self.group,
                self.to,
                self.partitions.len()
            );
        } else {
            let _ = writeln!(
                out,
                "\nDry run: nothing committed. Group {} is {} with {} member(s){}.",
                self.group,
                self.state,
                self.members,
                if self.members > 0 {
                    ": the reset is refused until they stop"
                } else {
                    ""
                }
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_topic_selections_parse() {
        assert_eq!("earliest".parse::<ResetTo>().unwrap(), ResetTo::Earliest);
        assert_eq!("Latest".parse::<ResetTo>().unwrap(), ResetTo::Latest);
        assert_eq!("150".parse::<ResetTo>().unwrap(), ResetTo::Offset(150));
        assert_eq!(
            "2026-11-23T10:00:00Z".parse::<ResetTo>().unwrap(),
            ResetTo::Time(1_795_428_000_000)
        );
        let error = "soon".parse::<ResetTo>().unwrap_err().to_string();
        assert!(error.contains("earliest, latest"), "{error}");
        assert_eq!(
            "orders:0,2".parse::<TopicSelection>().unwrap(),
            TopicSelection {
                topic: "orders".into(),
                partitions: Some(vec![0, 2])
            }
        );
        assert!("orders:x".parse::<TopicSelection>().is_err());
    }
}
