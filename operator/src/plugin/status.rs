//! `kubectl weir status PIPELINE`: workers, lag per partition read live from Kafka (the
//! group's committed offsets against the high watermarks; on a partition with a small
//! lag, the records a read_committed consumer would still receive, as the operator counts
//! them), and what the operator wrote in the status (rates, time to drain, last scale,
//! last replay, conditions).

use std::fmt::Write as _;

use kube::ResourceExt as _;
use serde::Serialize;
use weir_crds::{EventPipeline, ReplayStatus, StartPosition};

use super::table::{Table, or_dash};
use super::{PluginError, Report, Target};
use crate::kafka::CommittedRange;

/// A pipeline's state.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PipelineStatus {
    pub name: String,
    pub namespace: String,
    pub consumer_group: String,
    pub topics: Vec<String>,
    /// `spec.replicas`, when pinned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec_replicas: Option<i32>,
    /// From the status: workers asked for, wanted by the autoscaler, ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Members of the consumer group now (read from Kafka).
    pub group_members: usize,
    /// The group's state (Stable, Empty, …).
    pub group_state: String,
    /// Sum of the partitions' lag.
    pub lag: i64,
    pub partitions: Vec<PartitionLag>,
    /// Records committed per second (status.consumptionRate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumption_rate: Option<f64>,
    /// Records produced per second (status.arrivalRate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrival_rate: Option<f64>,
    /// Seconds to drain the live lag at the consumption rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_replay: Option<ReplayStatus>,
    pub conditions: Vec<weir_crds::Condition>,
}

/// The lag of one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset; absent before its first commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committed: Option<i64>,
    /// Low watermark: the oldest retained offset.
    pub start: i64,
    /// High watermark: the offset the next record gets.
    pub end: i64,
    /// Records not yet consumed (without a commit: from where the group would start);
    /// transaction markers and aborted records are not counted where the lag is small
    /// enough to read them (see the operator's docs).
    pub lag: i64,
    /// The client id of the member consuming it, when one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// The status of the EventPipeline `name`.
pub async fn status(target: &Target, name: &str) -> Result<PipelineStatus, PluginError> {
    let pipeline = target.pipeline(name).await?;
    let kafka = target.pipeline_kafka(&pipeline).await?;
    let group = pipeline.spec.consumer_group(&target.namespace, name);
    let topics = pipeline.spec.source.topics.clone();
    let marks = kafka.watermarks(&topics).await?;
    let committed = kafka.committed(&group, &topics).await?;
    let info = kafka.groups(Some(&group)).await?.into_iter().next();
    let ranges = marks
        .iter()
        .filter_map(|(p, (start, end))| {
            let from = match (committed.get(p), pipeline.spec.source.start_position) {
                (Some(c), _) => *c,
                (None, StartPosition::Earliest) => *start,
                (None, StartPosition::Latest) => return None,
            };
            Some(CommittedRange {
                topic: p.0.clone(),
                partition: p.1,
                from,
                until: *end,
            })
        })
        .collect();
    let counted = crate::autoscale::lag::count(kafka.admin(), ranges).await;
    Ok(assemble(
        &pipeline,
        &target.namespace,
        group,
        &marks,
        &committed,
        &counted,
        info,
    ))
}

fn assemble(
    pipeline: &EventPipeline,
    namespace: &str,
    group: String,
    marks: &std::collections::BTreeMap<super::kafka::Partition, (i64, i64)>,
    committed: &std::collections::BTreeMap<super::kafka::Partition, i64>,
    counted: &std::collections::BTreeMap<super::kafka::Partition, i64>,
    info: Option<super::kafka::GroupInfo>,
) -> PipelineStatus {
    let members = info.as_ref().map_or(&[][..], |g| g.members.as_slice());
    let partitions: Vec<PartitionLag> = marks
        .iter()
        .map(|((topic, partition), &(start, end))| {
            let commit = committed.get(&(topic.clone(), *partition)).copied();
            let offsets = match (commit, pipeline.spec.source.start_position) {
                (Some(c), _) => (end - c).max(0),
                (None, StartPosition::Earliest) => end - start,
                (None, StartPosition::Latest) => 0,
            };
            let lag = counted
                .get(&(topic.clone(), *partition))
                .copied()
                .unwrap_or(offsets);
            let consumer = members
                .iter()
                .find(|m| m.partitions.contains(&(topic.clone(), *partition)))
                .map(|m| m.client_id.clone());
            PartitionLag {
                topic: topic.clone(),
                partition: *partition,
                committed: commit,
                start,
                end,
                lag,
                consumer,
            }
        })
        .collect();
    let lag = partitions.iter().map(|p| p.lag).sum();
    let status = pipeline.status.clone().unwrap_or_default();
    let drain_seconds = status
        .consumption_rate
        .filter(|rate| *rate > 0.0)
        .map(|rate| lag as f64 / rate);
    PipelineStatus {
        name: pipeline.name_any(),
        namespace: namespace.to_owned(),
        consumer_group: group,
        topics: pipeline.spec.source.topics.clone(),
        spec_replicas: pipeline.spec.replicas,
        replicas: status.replicas,
        desired_replicas: status.desired_replicas,
        ready_replicas: status.ready_replicas,
        group_members: members.len(),
        group_state: info.map_or_else(|| "Dead".to_owned(), |g| g.state),
        lag,
        partitions,
        consumption_rate: status.consumption_rate,
        arrival_rate: status.arrival_rate,
        drain_seconds,
        last_scale_time: status.last_scale_time,
        last_scale_reason: status.last_scale_reason,
        last_replay: status.last_replay,
        conditions: status.conditions,
    }
}

fn rate(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}/s"))
}

impl Report for PipelineStatus {
    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Pipeline:        {}/{}", self.namespace, self.name);
        let _ = writeln!(
            out,
            "Consumer group:  {} ({}, {} member(s))",
            self.consumer_group, self.group_state, self.group_members
        );
        let _ = writeln!(
            out,
            "Workers:         {} asked, {} ready, {} wanted by the autoscaler{}",
            or_dash(self.replicas),
            or_dash(self.ready_replicas),
            or_dash(self.desired_replicas),
            self.spec_replicas
                .map_or_else(String::new, |r| format!(" (spec.replicas pins {r})"))
        );
        let _ = writeln!(
            out,
            "Lag:             {} records; consuming {}, arriving {}; drains in {}",
            self.lag,
            rate(self.consumption_rate),
            rate(self.arrival_rate),
            self.drain_seconds
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.0}s"))
        );
        let scale = match (&self.last_scale_time, &self.last_scale_reason) {
            (None, None) => "-".to_owned(),
            (time, reason) => format!(
                "{} ({})",
                time.as_deref().unwrap_or("-"),
                reason.as_deref().unwrap_or("-")
            ),
        };
        let _ = writeln!(out, "Last scale:      {scale}");
        let replay = self.last_replay.as_ref().map_or_else(
            || "-".to_owned(),
            |r| {
                format!(
                    "{} at {}{}",
                    r.token,
                    r.completed_at,
                    if r.truncated { ", sinks truncated" } else { "" }
                )
            },
        );
        let _ = writeln!(out, "Last replay:     {replay}");
        let mut partitions =
            Table::new(&["TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "CONSUMER"]);
        for p in &self.partitions {
            partitions.row(vec![
                p.topic.clone(),
                p.partition.to_string(),
                or_dash(p.committed),
                p.end.to_string(),
                p.lag.to_string(),
                or_dash(p.consumer.as_deref()),
            ]);
        }
        let _ = write!(out, "\n{partitions}");
        if !self.conditions.is_empty() {
            let mut conditions = Table::new(&["CONDITION", "STATUS", "REASON", "SINCE", "MESSAGE"]);
            for c in &self.conditions {
                conditions.row(vec![
                    c.type_.clone(),
                    format!("{:?}", c.status),
                    c.reason.clone(),
                    c.last_transition_time.clone(),
                    c.message.clone(),
                ]);
            }
            let _ = write!(out, "\n{conditions}");
        }
        out
    }
}
