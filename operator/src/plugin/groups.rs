//! `kubectl weir groups [describe GROUP]`: the consumer groups of a KafkaConnection's
//! cluster, and one group's members, committed offsets and lag per partition.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::kafka::{GroupInfo, Kafka, Member};
use super::table::{Table, or_dash};
use super::{PluginError, Report};

/// The consumer groups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupList {
    pub groups: Vec<GroupSummary>,
}

/// One line of the list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupSummary {
    pub name: String,
    pub state: String,
    pub protocol: String,
    pub members: usize,
}

/// Every consumer group of the cluster.
pub async fn list(kafka: &Kafka) -> Result<GroupList, PluginError> {
    let groups = kafka.groups(None).await?;
    Ok(GroupList {
        groups: groups
            .into_iter()
            .map(|g| GroupSummary {
                members: g.members.len(),
                name: g.name,
                state: g.state,
                protocol: g.protocol,
            })
            .collect(),
    })
}

impl Report for GroupList {
    fn table(&self) -> String {
        if self.groups.is_empty() {
            return "No consumer groups.\n".to_owned();
        }
        let mut table = Table::new(&["GROUP", "STATE", "MEMBERS", "PROTOCOL"]);
        for g in &self.groups {
            table.row(vec![
                g.name.clone(),
                g.state.clone(),
                g.members.to_string(),
                if g.protocol.is_empty() {
                    "-".to_owned()
                } else {
                    g.protocol.clone()
                },
            ]);
        }
        table.to_string()
    }
}

/// One group in detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupDescription {
    pub name: String,
    pub state: String,
    pub protocol: String,
    pub members: Vec<Member>,
    pub partitions: Vec<GroupPartition>,
    pub lag: i64,
}

/// A partition the group has committed on or is assigned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupPartition {
    pub topic: String,
    pub partition: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committed: Option<i64>,
    pub end: i64,
    /// `end - committed`; absent without a commit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// The group `name`: its members, and its offsets on every topic it has committed on or
/// is assigned.
pub async fn describe(kafka: &Kafka, name: &str) -> Result<GroupDescription, PluginError> {
    let info = kafka
        .groups(Some(name))
        .await?
        .into_iter()
        .next()
        .unwrap_or_else(|| GroupInfo {
            name: name.to_owned(),
            state: "Dead".to_owned(),
            protocol: String::new(),
            members: Vec::new(),
        });
    let topics = kafka.topics().await?;
    let committed = kafka.committed(name, &topics).await?;
    let mut wanted: Vec<String> = committed.keys().map(|(t, _)| t.clone()).collect();
    wanted.extend(
        info.members
            .iter()
            .flat_map(|m| m.partitions.iter().map(|(t, _)| t.clone())),
    );
    wanted.sort();
    wanted.dedup();
    let marks = kafka.watermarks(&wanted).await?;
    Ok(assemble(info, &committed, &marks))
}

fn assemble(
    info: GroupInfo,
    committed: &BTreeMap<(String, i32), i64>,
    marks: &BTreeMap<(String, i32), (i64, i64)>,
) -> GroupDescription {
    let partitions: Vec<GroupPartition> = marks
        .iter()
        .filter_map(|(key, &(_, end))| {
            let commit = committed.get(key).copied();
            let consumer = info
                .members
                .iter()
                .find(|m| m.partitions.contains(key))
                .map(|m| m.client_id.clone());
            if commit.is_none() && consumer.is_none() {
                return None;
            }
            Some(GroupPartition {
                topic: key.0.clone(),
                partition: key.1,
                committed: commit,
                end,
                lag: commit.map(|c| (end - c).max(0)),
                consumer,
            })
        })
        .collect();
    GroupDescription {
        lag: partitions.iter().filter_map(|p| p.lag).sum(),
        name: info.name,
        state: info.state,
        protocol: info.protocol,
        members: info.members,
        partitions,
    }
}

impl Report for GroupDescription {
    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Group:    {} ({}, {} member(s){})",
            self.name,
            self.state,
            self.members.len(),
            if self.protocol.is_empty() {
                String::new()
            } else {
                format!(", {}", self.protocol)
            }
        );
        let _ = writeln!(out, "Lag:      {} records", self.lag);
        if !self.members.is_empty() {
            let mut members = Table::new(&["MEMBER", "CLIENT", "HOST", "PARTITIONS"]);
            for m in &self.members {
                let partitions: Vec<String> = m
                    .partitions
                    .iter()
                    .map(|(t, p)| format!("{t}/{p}"))
                    .collect();
                members.row(vec![
                    m.id.clone(),
                    m.client_id.clone(),
                    m.host.clone(),
                    if partitions.is_empty() {
                        "-".to_owned()
                    } else {
                        partitions.join(",")
                    },
                ]);
            }
            let _ = write!(out, "\n{members}");
        }
        let mut partitions =
            Table::new(&["TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "CONSUMER"]);
        for p in &self.partitions {
            partitions.row(vec![
                p.topic.clone(),
                p.partition.to_string(),
                or_dash(p.committed),
                p.end.to_string(),
                or_dash(p.lag),
                or_dash(p.consumer.as_deref()),
            ]);
        }
        if partitions.is_empty() {
            let _ = writeln!(out, "\nNo committed offsets.");
        } else {
            let _ = write!(out, "\n{partitions}");
        }
        out
    }
}
