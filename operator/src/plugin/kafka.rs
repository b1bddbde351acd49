//! The Kafka calls the plugin makes beyond [`weir_worker::kafka::Admin`]: both watermarks
//! of a partition, offsets for a time, the consumer groups and their members, committing
//! offsets for a group it does not join, reading and producing records. Each runs off the
//! async threads and is bounded by the target's Kafka timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use weir_worker::kafka::Admin;

use super::PluginError;

/// A topic's partition.
pub type Partition = (String, i32);

/// A Kafka client on one KafkaConnection.
#[derive(Clone)]
pub struct Kafka {
    admin: Admin,
    /// Holds secrets: never printed.
    config: ClientConfig,
    timeout: Duration,
}

/// A consumer group as the coordinator describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupInfo {
    pub name: String,
    /// Stable, Empty, PreparingRebalance, CompletingRebalance or Dead.
    pub state: String,
    /// The assignment strategy (range, cooperative-sticky, …).
    pub protocol: String,
    pub members: Vec<Member>,
}

/// A member of a consumer group and the partitions assigned to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub id: String,
    pub client_id: String,
    pub host: String,
    pub partitions: Vec<Partition>,
}

/// A record read from a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch, when the record carries one.
    pub timestamp: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Kafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kafka")
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl Kafka {
    pub fn new(config: ClientConfig, timeout: Duration) -> Result<Kafka, PluginError> {
        Ok(Kafka {
            admin: Admin::new(&config, timeout)?,
            config,
            timeout,
        })
    }

    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    fn consumer(&self, group: Option<&str>) -> Result<BaseConsumer, PluginError> {
        let mut config = self.config.clone();
        config
            .set("group.id", group.unwrap_or("kubectl-weir"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_uncommitted");
        config
            .create()
            .map_err(PluginError::kafka("creating a consumer"))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
    ) -> Result<T, PluginError> {
        let handle = tokio::task::spawn_blocking(work);
        match tokio::time::timeout(self.timeout * 4, handle).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PluginError::Kafka {
                operation,
                source: KafkaError::Canceled,
            }),
            Err(_) => Err(PluginError::Invalid(format!(
                "Kafka: {operation} timed out after {:?}: is the broker reachable?",
                self.timeout * 4
            ))),
        }
    }

    /// The partitions of `topics` (a topic that does not exist has none).
    pub async fn partitions(&self, topics: &[String]) -> Result<Vec<Partition>, PluginError> {
        Ok(self.admin.partitions(topics).await?)
    }

    /// Every topic of the cluster but Kafka's internal ones.
    pub async fn topics(&self) -> Result<Vec<String>, PluginError> {
        let consumer = self.consumer(None)?;
        let timeout = self.timeout;
        self.blocking("listing topics", move || {
            let metadata = consumer
                .fetch_metadata(None, timeout)
                .map_err(PluginError::kafka("listing topics"))?;
            let mut topics: Vec<String> = metadata
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|name| !name.starts_with("__"))
                .collect();
            topics.sort();
            Ok(topics)
        })
        .await
    }

    /// Low and high watermark of each partition of `topics`.
    pub async fn watermarks(
        &self,
        topics: &[String],
    ) -> Result<BTreeMap<Partition, (i64, i64)>, PluginError> {
        let partitions = self.partitions(topics).await?;
        let consumer = self.consumer(None)?;
        let timeout = self.timeout;
        self.blocking("reading the watermarks", move || {
            let mut out = BTreeMap::new();
            for (topic, partition) in partitions {
                let marks = consumer
                    .fetch_watermarks(&topic, partition, timeout)
                    .map_err(PluginError::kafka("reading the watermarks"))?;
                out.insert((topic, partition), marks);
            }
            Ok(out)
        })
        .await
    }

    /// The offsets `group` committed on the partitions of `topics`.
    pub async fn committed(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<BTreeMap<Partition, i64>, PluginError> {
        Ok(self.admin.committed_offsets(group, topics).await?)
    }

    /// For each partition, the first offset whose record is at or after `at_ms`; a
    /// partition with no such record is absent (the caller takes its high watermark).
    pub async fn offsets_for_time(
        &self,
        partitions: &[Partition],
        at_ms: i64,
    ) -> Result<BTreeMap<Partition, i64>, PluginError> {
        let consumer = self.consumer(None)?;
        let timeout = self.timeout;
        let partitions = partitions.to_vec();
        self.blocking("looking up offsets for a time", move || {
            let mut list = TopicPartitionList::new();
            for (topic, partition) in &partitions {
                list.add_partition_offset(topic, *partition, Offset::Offset(at_ms))
                    .map_err(PluginError::kafka("looking up offsets for a time"))?;
            }
            let found = consumer
                .offsets_for_times(list, timeout)
                .map_err(PluginError::kafka("looking up offsets for a time"))?;
            Ok(found
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                    _ => None,
                })
                .collect())
        })
        .await
    }

    /// Every consumer group, or only `name`, with members and their partitions. A group
    /// the coordinator does not know comes back with state `Dead` and no members.
    pub async fn groups(&self, name: Option<&str>) -> Result<Vec<GroupInfo>, PluginError> {
        let consumer = self.consumer(None)?;
        let timeout = self.timeout;
        let name = name.map(str::to_owned);
        self.blocking("listing consumer groups", move || {
            let list = consumer
                .fetch_group_list(name.as_deref(), timeout)
                .map_err(PluginError::kafka("listing consumer groups"))?;
            let mut groups: Vec<GroupInfo> = list
                .groups()
                .iter()
                .map(|g| GroupInfo {
                    name: g.name().to_owned(),
                    state: g.state().to_owned(),
                    protocol: g.protocol().to_owned(),
                    members: g
                        .members()
                        .iter()
                        .map(|m| Member {
                            id: m.id().to_owned(),
                            client_id: m.client_id().to_owned(),
                            host: m.client_host().to_owned(),
                            partitions: m.assignment().map(assigned).unwrap_or_default(),
                        })
                        .collect(),
                })
                .collect();
            groups.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(groups)
        })
        .await
    }

    /// Commits `offsets` for `group` without joining it (Kafka accepts this only while
    /// the group has no members).
    pub async fn commit(
        &self,
        group: &str,
        offsets: &BTreeMap<Partition, i64>,
    ) -> Result<(), PluginError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let consumer = self.consumer(Some(group))?;
        let offsets = offsets.clone();
        self.blocking("committing offsets", move || {
            let mut list = TopicPartitionList::new();
            for ((topic, partition), offset) in &offsets {
                list.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    .map_err(PluginError::kafka("committing offsets"))?;
            }
            consumer
                .commit(&list, CommitMode::Sync)
                .map_err(PluginError::kafka("committing offsets"))
        })
        .await
    }

    /// A reader of `topic` from `start` (per partition), without a consumer group.
    pub fn reader(
        &self,
        topic: &str,
        start: &BTreeMap<i32, i64>,
    ) -> Result<RecordReader, PluginError> {
        let consumer = self.consumer(None)?;
        let mut list = TopicPartitionList::new();
        for (partition, offset) in start {
            list.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .map_err(PluginError::kafka("assigning the partitions"))?;
        }
        consumer
            .assign(&list)
            .map_err(PluginError::kafka("assigning the partitions"))?;
        Ok(RecordReader {
            consumer: Arc::new(consumer),
        })
    }

    /// An idempotent producer acknowledged by all in-sync replicas.
    pub fn producer(&self) -> Result<FutureProducer, PluginError> {
        self.config
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(PluginError::kafka("creating a producer"))
    }

    /// A transactional producer with the id `transactional_id`, its transactions
    /// initialised (which fences an earlier producer with the same id).
    pub async fn transactional_producer(
        &self,
        transactional_id: &str,
    ) -> Result<Arc<FutureProducer>, PluginError> {
        let producer: FutureProducer = self
            .config
            .clone()
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .map_err(PluginError::kafka("creating a transactional producer"))?;
        let producer = Arc::new(producer);
        let timeout = self.timeout;
        let init = producer.clone();
        self.blocking("initialising transactions", move || {
            init.init_transactions(timeout)
                .map_err(PluginError::kafka("initialising transactions"))
        })
        .await?;
        Ok(producer)
    }

    /// Begins a transaction on `producer`.
    pub fn begin(producer: &FutureProducer) -> Result<(), PluginError> {
        producer
            .begin_transaction()
            .map_err(PluginError::kafka("beginning a transaction"))
    }

    /// Adds `offsets` of `group` to the open transaction and commits it: the records sent
    /// in it and the group's progress become visible together, or neither.
    pub async fn commit_transaction(
        &self,
        producer: &Arc<FutureProducer>,
        group: &str,
        offsets: &BTreeMap<Partition, i64>,
    ) -> Result<(), PluginError> {
        let consumer = self.consumer(Some(group))?;
        let producer = producer.clone();
        let offsets = offsets.clone();
        let timeout = self.timeout;
        self.blocking("committing the transaction", move || {
            let metadata = consumer
                .group_metadata()
                .ok_or_else(|| PluginError::Kafka {
                    operation: "reading the group's metadata",
                    source: KafkaError::Canceled,
                })?;
            let mut list = TopicPartitionList::new();
            for ((topic, partition), offset) in &offsets {
                list.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    .map_err(PluginError::kafka("committing the transaction"))?;
            }
            let done = producer
                .send_offsets_to_transaction(&list, &metadata, timeout)
                .and_then(|()| producer.commit_transaction(timeout));
            if let Err(source) = done {
                let _ = producer.abort_transaction(timeout);
                return Err(PluginError::Kafka {
                    operation: "committing the transaction",
                    source,
                });
            }
            Ok(())
        })
        .await
    }

    /// Sends one record and waits for the broker's acknowledgement.
    pub async fn send(
        producer: &FutureProducer,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<(), PluginError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(source, _)| PluginError::Kafka {
                operation: "sending a record",
                source,
            })
    }
}

/// Reads records of one topic's assigned partitions.
pub struct RecordReader {
    consumer: Arc<BaseConsumer>,
}

impl std::fmt::Debug for RecordReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordReader").finish_non_exhaustive()
    }
}

impl RecordReader {
    /// The next record, or `None` when none arrives within `wait`.
    pub async fn next(&self, wait: Duration) -> Result<Option<Record>, PluginError> {
        let consumer = self.consumer.clone();
        let polled = tokio::task::spawn_blocking(move || {
            consumer.poll(wait).map(|result| {
                result.map(|m| Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
        })
        .await
        .map_err(|_| PluginError::Kafka {
            operation: "reading records",
            source: KafkaError::Canceled,
        })?;
        match polled {
            None => Ok(None),
            Some(Ok(record)) => Ok(Some(record)),
            Some(Err(source)) => Err(PluginError::Kafka {
                operation: "reading records",
                source,
            }),
        }
    }
}

/// The partitions in a member's assignment (Kafka's ConsumerProtocolAssignment: version,
/// then topics with their partitions, then user data). Unreadable bytes give none.
pub fn assigned(bytes: &[u8]) -> Vec<Partition> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Some(head)
    }
    fn i16_(bytes: &mut &[u8]) -> Option<i16> {
        take(bytes, 2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32_(bytes: &mut &[u8]) -> Option<i32> {
        take(bytes, 4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    let parse = |mut bytes: &[u8]| -> Option<Vec<Partition>> {
        let _version = i16_(&mut bytes)?;
        let topics = i32_(&mut bytes)?;
        let mut out = Vec::new();
        for _ in 0..topics.max(0) {
            let length = i16_(&mut bytes)?;
            let name = String::from_utf8_lossy(take(&mut bytes, length.max(0) as usize)?);
            let name = name.into_owned();
            let count = i32_(&mut bytes)?;
            for _ in 0..count.max(0) {
                out.push((name.clone(), i32_(&mut bytes)?));
            }
        }
        Some(out)
    };
    let mut partitions = parse(bytes).unwrap_or_default();
    partitions.sort();
    partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_assignment_lists_its_partitions() {
        // version 3, two topics: "ab" [1, 0] and "c" [], then empty user data.
        let mut bytes = vec![0, 3, 0, 0, 0, 2, 0, 2, b'a', b'b', 0, 0, 0, 2];
        bytes.extend([0, 0, 0, 1, 0, 0, 0, 0]);
        bytes.extend([0, 1, b'c', 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            assigned(&bytes),
            vec![("ab".to_owned(), 0), ("ab".to_owned(), 1)]
        );
        assert_eq!(assigned(&[0, 1, 0]), vec![]);
    }
}
