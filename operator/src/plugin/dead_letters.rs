//! `kubectl weir dead-letters PIPELINE [--since …] [--follow]` lists the records on a
//! pipeline's dead-letter topic with the error headers the worker writes;
//! `kubectl weir redrive PIPELINE [--since …]` sends each of them back to its source
//! topic once. Redrive remembers how far it got as the committed offsets of its own
//! consumer group on the dead-letter topic (`kubectl-weir.redrive.<namespace>.<name>`),
//! committed in the same Kafka transaction as the re-sent records: a second run sends
//! only what was dead-lettered since, and the records of a run interrupted mid-chunk are
//! aborted: the workers, which read with `isolation.level=read_committed` (librdkafka's
//! default), never see them. A second redrive started meanwhile fences the first (same
//! transactional id).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use kube::ResourceExt as _;
use rdkafka::message::{Header, OwnedHeaders};
use serde::Serialize;
use weir_crds::EventPipeline;

use super::kafka::{Kafka, Partition, Record, RecordReader};
use super::table::{Table, clip, or_dash};
use super::{PluginError, Report, Target, format_millis};

pub use weir_worker::kafka::headers;

/// A dead-lettered record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_topic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_partition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_offset: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
    /// The sink that refused it; absent when it failed before the sinks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
}

impl DeadLetter {
    fn from_record(record: &Record) -> DeadLetter {
        let header = |name: &str| {
            record
                .headers
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let text = |bytes: &Option<Vec<u8>>| {
            bytes
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
        };
        DeadLetter {
            partition: record.partition,
            offset: record.offset,
            time: record.timestamp.map(format_millis),
            key: text(&record.key),
            value: text(&record.payload),
            error_class: header(headers::ERROR_CLASS),
            error_message: header(headers::ERROR_MESSAGE),
            attempts: header(headers::ATTEMPTS),
            source_topic: header(headers::SOURCE_TOPIC),
            source_partition: header(headers::SOURCE_PARTITION),
            source_offset: header(headers::SOURCE_OFFSET),
            first_failure: header(headers::FIRST_FAILURE),
            sink: header(headers::SINK),
        }
    }

    /// The cells of its table row.
    pub fn row(&self) -> Vec<String> {
        let source = match (
            &self.source_topic,
            &self.source_partition,
            &self.source_offset,
        ) {
            (Some(t), Some(p), Some(o)) => format!("{t}/{p}@{o}"),
            (Some(t), _, _) => t.clone(),
            _ => "-".to_owned(),
        };
        vec![
            format!("{}@{}", self.partition, self.offset),
            or_dash(self.time.as_deref()),
            source,
            or_dash(self.error_class.as_deref()),
            or_dash(self.attempts.as_deref()),
            or_dash(self.sink.as_deref()),
            clip(self.error_message.as_deref().unwrap_or("-"), 80),
        ]
    }

    pub const HEADER: [&'static str; 7] = [
        "PARTITION@OFFSET",
        "TIME",
        "SOURCE",
        "CLASS",
        "ATTEMPTS",
        "SINK",
        "MESSAGE",
    ];
}

/// The dead letters of a pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterList {
    pub pipeline: String,
    pub topic: String,
    pub dead_letters: Vec<DeadLetter>,
}

impl Report for DeadLetterList {
    fn table(&self) -> String {
        if self.dead_letters.is_empty() {
            return format!("No dead letters on {}.\n", self.topic);
        }
        let mut table = Table::new(&DeadLetter::HEADER);
        for d in &self.dead_letters {
            table.row(d.row());
        }
        table.to_string()
    }
}

/// The dead-letter topic of a pipeline, and a Kafka client on its connection.
async fn dead_letter_topic(
    target: &Target,
    name: &str,
) -> Result<(EventPipeline, Kafka, String), PluginError> {
    let pipeline = target.pipeline(name).await?;
    let topic = pipeline
        .spec
        .dead_letter
        .as_ref()
        .map(|d| d.topic.clone())
        .ok_or_else(|| PluginError::NoDeadLetter {
            namespace: target.namespace.clone(),
            name: name.to_owned(),
        })?;
    let kafka = target.pipeline_kafka(&pipeline).await?;
    Ok((pipeline, kafka, topic))
}

/// Where each partition of `topic` starts: `from` (else the low watermark), moved up to
/// the first record at or after `since`; and where it ends now (the high watermark).
async fn span(
    kafka: &Kafka,
    topic: &str,
    from: &BTreeMap<Partition, i64>,
    since: Option<i64>,
) -> Result<(BTreeMap<i32, i64>, BTreeMap<i32, i64>), PluginError> {
    let marks = kafka.watermarks(&[topic.to_owned()]).await?;
    let at_since = match since {
        Some(ms) => {
            let partitions: Vec<Partition> = marks.keys().cloned().collect();
            Some(kafka.offsets_for_time(&partitions, ms).await?)
        }
        None => None,
    };
    let mut start = BTreeMap::new();
    let mut end = BTreeMap::new();
    for (key, &(low, high)) in &marks {
        let mut first = from.get(key).copied().unwrap_or(low).max(low);
        if let Some(at_since) = &at_since {
            first = first.max(at_since.get(key).copied().unwrap_or(high));
        }
        start.insert(key.1, first.min(high));
        end.insert(key.1, high);
    }
    Ok((start, end))
}

/// Reads every record from `start` up to `end` (per partition).
async fn read_span(
    kafka: &Kafka,
    topic: &str,
    start: &BTreeMap<i32, i64>,
    end: &BTreeMap<i32, i64>,
    timeout: Duration,
) -> Result<(Vec<Record>, RecordReader), PluginError> {
    let reader = kafka.reader(topic, start)?;
    let mut position = start.clone();
    let mut records = Vec::new();
    let mut last_progress = Instant::now();
    while position
        .iter()
        .any(|(p, at)| end.get(p).is_some_and(|e| at < e))
    {
        match reader.next(Duration::from_millis(200)).await? {
            Some(record) => {
                position.insert(record.partition, record.offset + 1);
                if record.offset < end.get(&record.partition).copied().unwrap_or(0) {
                    records.push(record);
                }
                last_progress = Instant::now();
            }
            None if last_progress.elapsed() > timeout => {
                return Err(PluginError::Invalid(format!(
                    "Kafka: reading {topic} stalled for {timeout:?} before its end: is the broker reachable?"
                )));
            }
            None => {}
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok((records, reader))
}

/// The pipeline's dead letters, from the first at or after `since` (ms since the epoch).
pub async fn list(
    target: &Target,
    name: &str,
    since: Option<i64>,
) -> Result<DeadLetterList, PluginError> {
    let (list, _) = list_and_follow(target, name, since).await?;
    Ok(list)
}

/// The dead letters so far, and a reader positioned after them (for `--follow`).
pub async fn list_and_follow(
    target: &Target,
    name: &str,
    since: Option<i64>,
) -> Result<(DeadLetterList, Follow), PluginError> {
    let (_, kafka, topic) = dead_letter_topic(target, name).await?;
    let (start, end) = span(&kafka, &topic, &BTreeMap::new(), since).await?;
    let (records, reader) = read_span(&kafka, &topic, &start, &end, target.kafka_timeout).await?;
    Ok((
        DeadLetterList {
            pipeline: name.to_owned(),
            topic,
            dead_letters: records.iter().map(DeadLetter::from_record).collect(),
        },
        Follow { reader },
    ))
}

/// Dead letters as they arrive.
#[derive(Debug)]
pub struct Follow {
    reader: RecordReader,
}

impl Follow {
    /// The next dead letter, or `None` when none arrived within `wait`.
    pub async fn next(&self, wait: Duration) -> Result<Option<DeadLetter>, PluginError> {
        Ok(self
            .reader
            .next(wait)
            .await?
            .map(|r| DeadLetter::from_record(&r)))
    }
}

/// What a redrive did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RedriveReport {
    pub pipeline: String,
    pub dead_letter_topic: String,
    /// The plugin's consumer group holding the progress.
    pub progress_group: String,
    /// Records re-sent, per source topic.
    pub sent: BTreeMap<String, usize>,
    /// Dead letters passed over, with why (no source topic to send them to).
    pub skipped: Vec<String>,
}

impl RedriveReport {
    pub fn total(&self) -> usize {
        self.sent.values().sum()
    }
}

impl Report for RedriveReport {
    fn table(&self) -> String {
        let mut out = String::new();
        if self.sent.is_empty() {
            let _ = writeln!(
                out,
                "Nothing to redrive: every dead letter on {} was re-sent before (progress in consumer group {}).",
                self.dead_letter_topic, self.progress_group
            );
        } else {
            let mut table = Table::new(&["SOURCE TOPIC", "RE-SENT"]);
            for (topic, count) in &self.sent {
                table.row(vec![topic.clone(), count.to_string()]);
            }
            out.push_str(&table.to_string());
            let _ = writeln!(
                out,
                "\nRe-sent {} dead letter(s) from {} to their source topics.",
                self.total(),
                self.dead_letter_topic
            );
        }
        for skip in &self.skipped {
            let _ = writeln!(out, "Skipped {skip}");
        }
        out
    }
}

/// The consumer group redrive keeps its progress in.
pub fn progress_group(namespace: &str, name: &str) -> String {
    format!("kubectl-weir.redrive.{namespace}.{name}")
}

/// Sends each dead letter not re-sent before (and at or after `since`) back to its source
/// topic, with its key, value and own headers (the error headers removed, and
/// `weir.redriven.from` added), in transactions of 500 records that also commit the
/// progress.
pub async fn redrive(
    target: &Target,
    name: &str,
    since: Option<i64>,
) -> Result<RedriveReport, PluginError> {
    let (pipeline, kafka, topic) = dead_letter_topic(target, name).await?;
    let group = progress_group(&target.namespace, &pipeline.name_any());
    // One transaction per chunk: the re-sent records and the progress commit together.
    // Initialising the transactional id fences an earlier redrive of the same pipeline
    // still running, so the progress read after it is final.
    let producer = kafka.transactional_producer(&group).await?;
    let done = kafka
        .committed(&group, std::slice::from_ref(&topic))
        .await?;
    let (start, end) = span(&kafka, &topic, &done, since).await?;
    let (records, _) = read_span(&kafka, &topic, &start, &end, target.kafka_timeout).await?;
    let sources = &pipeline.spec.source.topics;
    let mut report = RedriveReport {
        pipeline: name.to_owned(),
        dead_letter_topic: topic.clone(),
        progress_group: group.clone(),
        sent: BTreeMap::new(),
        skipped: Vec::new(),
    };
    for chunk in records.chunks(500) {
        Kafka::begin(&producer)?;
        let mut sends = Vec::new();
        for record in chunk {
            let header_topic = record
                .headers
                .iter()
                .rev()
                .find(|(k, _)| k == headers::SOURCE_TOPIC)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            let destination = match (header_topic, sources.as_slice()) {
                (Some(t), _) => t,
                (None, [only]) => only.clone(),
                (None, _) => {
                    report.skipped.push(format!(
                        "{topic}/{}@{}: no {} header, and the pipeline reads several topics",
                        record.partition,
                        record.offset,
                        headers::SOURCE_TOPIC
                    ));
                    continue;
                }
            };
            let from = format!("{topic}/{}@{}", record.partition, record.offset);
            let mut kept = OwnedHeaders::new();
            for (key, value) in &record.headers {
                if !headers::ALL.contains(&key.as_str()) {
                    kept = kept.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
            }
            kept = kept.insert(Header {
                key: headers::REDRIVEN_FROM,
                value: Some(&from),
            });
            *report.sent.entry(destination.clone()).or_default() += 1;
            let producer = &*producer;
            sends.push(async move {
                Kafka::send(
                    producer,
                    &destination,
                    record.key.as_deref(),
                    record.payload.as_deref(),
                    kept,
                )
                .await
            });
        }
        try_join_all(sends).await?;
        let mut progress = BTreeMap::new();
        for record in chunk {
            let key = (topic.clone(), record.partition);
            let next = record.offset + 1;
            let entry = progress.entry(key).or_insert(next);
            *entry = (*entry).max(next);
        }
        kafka
            .commit_transaction(&producer, &group, &progress)
            .await?;
    }
    Ok(report)
}
