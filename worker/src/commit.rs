//! How a batch's consumed offsets become durable. Three ways, chosen once per pipeline:
//!
//! - [`Commit::Group`] (at-least-once, the default): once every sink acknowledged a batch
//!   and its refused records are on the dead-letter topic, the offset after each
//!   partition's last record is stored in the consumer, and librdkafka commits stored
//!   offsets to the consumer group every second, before giving up revoked partitions and
//!   on close. A worker killed in between reads the records after the last commit again.
//! - [`Commit::InSinkTransaction`] (exactly-once into a database): the offsets are written
//!   by the sink in the same database transaction as the rows, compare-and-set against the
//!   values this worker claimed when the partitions were assigned; on assignment the
//!   worker seeks to the stored offsets. The group's own offsets are stored afterwards, so
//!   lag stays visible to every Kafka tool, but they are not what the worker resumes from.
//! - [`Commit::KafkaTransaction`] (exactly-once into Kafka): the sink produces the batch
//!   and the consumer group's offsets in one Kafka transaction.
//!
//! Each sink says which of these it can do ([`crate::sink::Sink::commit`]); `validate()`
//! refuses `delivery: ExactlyOnce` with sinks that cannot (`weir_crds` capabilities), and
//! [`choose`] checks it again when the engine starts.

use std::collections::{BTreeMap, HashMap};

use futures::future::BoxFuture;
use rdkafka::consumer::{Consumer as _, ConsumerGroupMetadata};
use rdkafka::{Offset, TopicPartitionList};
use weir_crds::Delivery;

use crate::metrics::Metrics;
use crate::record::Record;
use crate::sink::{Rejected, SinkError};
use crate::source::Consumer;

/// How a batch's offsets become durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// The consumer group's commit, after every sink acknowledged (at-least-once).
    Group,
    /// In the sink's own database transaction, with the rows (exactly-once).
    InSinkTransaction,
    /// In a Kafka transaction, with the produced records (exactly-once).
    KafkaTransaction,
}

impl Commit {
    pub fn is_exactly_once(self) -> bool {
        self != Commit::Group
    }
}

/// The commit a pipeline uses: the group's for at-least-once; for exactly-once, that of
/// its one sink, which must support one. `sinks` is each sink's name and what it supports.
pub fn choose(delivery: Delivery, sinks: &[(&str, Commit)]) -> Result<Commit, String> {
    if delivery == Delivery::AtLeastOnce {
        return Ok(Commit::Group);
    }
    match sinks {
        [(_, commit)] if commit.is_exactly_once() => Ok(*commit),
        [(name, _)] => Err(format!(
            "spec.delivery: ExactlyOnce needs a sink that commits offsets in its own transaction; sink {name} cannot"
        )),
        _ => Err(format!(
            "spec.delivery: ExactlyOnce needs exactly one sink, the pipeline has {}",
            sinks.len()
        )),
    }
}

/// The offset after each partition's last record of a batch: where reading resumes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offsets(pub BTreeMap<(String, i32), i64>);

impl Offsets {
    /// The offsets after `records` (every record of the batch: filtered and refused ones
    /// included, they are done with too).
    pub fn after(records: &[Record]) -> Self {
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for record in records {
            let entry = next
                .entry((record.topic.clone(), record.partition))
                .or_insert(0);
            *entry = (*entry).max(record.offset + 1);
        }
        Self(next)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// As the list Kafka's commit calls take.
    pub fn to_list(&self) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in &self.0 {
            if let Err(e) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
                tracing::warn!(error = %e, "cannot build the offset list");
            }
        }
        list
    }
}

/// Stores the offsets in the consumer for librdkafka's next commit to the group.
pub fn store(consumer: &Consumer, offsets: &Offsets, metrics: &Metrics) {
    if offsets.is_empty() {
        return;
    }
    // A failed store (the partition was revoked meanwhile) is not a loss: the records
    // were applied and the next owner reads them again (at-least-once), or, with the
    // offsets kept by the sink, the next owner resumes from those.
    match consumer.store_offsets(&offsets.to_list()) {
        Ok(()) => Metrics::add(&metrics.commits, 1),
        Err(e) => tracing::warn!(error = %e, "offset store failed; records will be read again"),
    }
}

/// Why an exactly-once write did not commit.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The write failed; nothing was committed. Retried by its class.
    #[error("{0}")]
    Sink(#[from] SinkError),
    /// Another worker owns these partitions now (it claimed them after this one lost
    /// them): nothing was committed, and this worker must stop.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Something that must stop the pipeline before the commit (a refused record with no
    /// dead-letter topic to hold it): nothing was committed.
    #[error("{0}")]
    Stop(String),
}

/// What must happen inside an exactly-once transaction before it commits: the records the
/// sink refused are put on the dead-letter topic, and the broker has acknowledged them,
/// before the transaction that moves the offsets past them commits.
pub trait BeforeCommit: Send + Sync {
    fn dead_letter<'a>(
        &'a self,
        rejected: &'a [Rejected],
    ) -> BoxFuture<'a, Result<(), CommitError>>;
}

/// What a sink gets to commit a batch's offsets in its own transaction.
pub struct Transaction<'a> {
    /// The offsets after the batch.
    pub offsets: &'a Offsets,
    /// The consumer's group metadata (generation, member), for a Kafka transaction's offset
    /// commit: the group coordinator refuses it from a member that lost its partitions.
    pub group_metadata: Option<&'a ConsumerGroupMetadata>,
    pub before_commit: &'a dyn BeforeCommit,
}

impl std::fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("offsets", self.offsets)
            .finish()
    }
}

/// For offsets kept by the sink: per partition, the next offset to apply. Records before it
/// were applied already, or taken into a batch already, and are dropped: read again from
/// the group's older committed offset before the seek to the stored one took effect, or
/// read a second time after that seek rewound a fetch that had already delivered them.
#[derive(Debug, Default)]
pub struct Positions(HashMap<(String, i32), i64>);

impl Positions {
    /// Where a claimed partition resumes; `None` (nothing stored) accepts whatever the
    /// group's offset brings first.
    pub fn set(&mut self, topic: &str, partition: i32, next: Option<i64>) {
        match next {
            Some(next) => self.0.insert((topic.to_owned(), partition), next),
            None => self.0.remove(&(topic.to_owned(), partition)),
        };
    }

    /// Whether `record` is still to be applied; if so, the partition's next offset moves
    /// past it, so the same record read again is refused.
    pub fn admit(&mut self, record: &Record) -> bool {
        let key = (record.topic.clone(), record.partition);
        if self.0.get(&key).is_some_and(|next| record.offset < *next) {
            return false;
        }
        self.0.insert(key, record.offset + 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, partition: i32, offset: i64) -> Record {
        Record {
            topic: topic.into(),
            partition,
            offset,
            key: None,
            payload: None,
            timestamp: None,
            headers: vec![],
        }
    }

    #[test]
    fn offsets_after_a_batch_are_one_past_each_partitions_last_record() {
        let records = [record("a", 0, 7), record("a", 1, 3), record("a", 0, 9)];
        let offsets = Offsets::after(&records);
        assert_eq!(
            offsets.0.into_iter().collect::<Vec<_>>(),
            vec![(("a".into(), 0), 10), (("a".into(), 1), 4)]
        );
    }

    #[test]
    fn exactly_once_needs_exactly_one_sink_that_can_commit() {
        use Commit::*;
        assert_eq!(
            choose(Delivery::AtLeastOnce, &[("a", Group), ("b", Group)]),
            Ok(Group)
        );
        assert_eq!(
            choose(Delivery::ExactlyOnce, &[("pg", InSinkTransaction)]),
            Ok(InSinkTransaction)
        );
        assert!(
            choose(Delivery::ExactlyOnce, &[("redis-0", Group)])
                .unwrap_err()
                .contains("redis-0")
        );
        assert!(
            choose(
                Delivery::ExactlyOnce,
                &[("a", KafkaTransaction), ("b", Group)]
            )
            .is_err()
        );
    }

    #[test]
    fn records_before_the_stored_offset_or_taken_already_are_dropped() {
        let mut positions = Positions::default();
        positions.set("a", 0, Some(5));
        assert!(!positions.admit(&record("a", 0, 4)));
        assert!(positions.admit(&record("a", 0, 5)));
        assert!(positions.admit(&record("a", 0, 6)));
        // The seek to 5 took effect after 5 and 6 were delivered: both come again.
        assert!(!positions.admit(&record("a", 0, 5)));
        assert!(!positions.admit(&record("a", 0, 6)));
        assert!(positions.admit(&record("a", 0, 7)));
        assert!(positions.admit(&record("a", 1, 0)));
        // Claimed again with nothing stored: what the group's offset brings is taken.
        positions.set("a", 0, None);
        assert!(positions.admit(&record("a", 0, 0)));
    }
}
