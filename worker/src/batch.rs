//! Batches close on max records, max bytes or max wait, whichever comes first. With
//! `batch.compaction: LastWriteWins` a batch is a chunk of records read, folded into a
//! [`crate::compaction::Window`] as soon as it is full.

use std::time::Duration;

use tokio::time::Instant;

use crate::record::Record;

/// What a batch holds: a consumed record, alone or with what has been made of it already.
pub trait Batched {
    fn record(&self) -> &Record;
}

impl Batched for Record {
    fn record(&self) -> &Record {
        self
    }
}

/// The limits of one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// Records waiting to be written, in the order they were consumed.
#[derive(Debug)]
pub struct Batch<T = Record> {
    limits: Limits,
    records: Vec<T>,
    bytes: usize,
    opened: Option<Instant>,
}

impl<T: Batched> Batch<T> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            records: Vec::with_capacity(limits.max_records.min(10_000)),
            bytes: 0,
            opened: None,
        }
    }

    pub fn push(&mut self, item: T) {
        if self.opened.is_none() {
            self.opened = Some(Instant::now());
        }
        self.bytes += item.record().size();
        self.records.push(item);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Full by count or by size: write it now.
    pub fn is_full(&self) -> bool {
        self.records.len() >= self.limits.max_records || self.bytes >= self.limits.max_bytes
    }

    /// When the oldest record was taken; `None` while empty.
    pub fn opened(&self) -> Option<Instant> {
        self.opened
    }

    /// When the oldest record's wait runs out; `None` while empty.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|opened| opened + self.limits.max_wait)
    }

    /// Drops the records of partitions this worker no longer owns; the new owner reads them
    /// again from the last committed offset, so nothing is lost and nothing was applied.
    pub fn forget_partitions(&mut self, revoked: &[(String, i32)]) -> usize {
        let before = self.records.len();
        self.records.retain(|item| {
            let r = item.record();
            !revoked
                .iter()
                .any(|(t, p)| *t == r.topic && *p == r.partition)
        });
        self.bytes = self.records.iter().map(|item| item.record().size()).sum();
        if self.records.is_empty() {
            self.opened = None;
        }
        before - self.records.len()
    }

    /// Takes the records out, leaving the batch empty.
    pub fn take(&mut self) -> Vec<T> {
        self.bytes = 0;
        self.opened = None;
        std::mem::take(&mut self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, offset: i64, bytes: usize) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            key: None,
            payload: Some(vec![b'x'; bytes]),
            timestamp: None,
            headers: vec![],
        }
    }

    fn limits(max_records: usize, max_bytes: usize) -> Limits {
        Limits {
            max_records,
            max_bytes,
            max_wait: Duration::from_millis(100),
        }
    }

    #[test]
    fn closes_on_record_count() {
        let mut batch: Batch = Batch::new(limits(2, 1 << 20));
        batch.push(record(0, 0, 1));
        assert!(!batch.is_full());
        batch.push(record(0, 1, 1));
        assert!(batch.is_full());
    }

    #[test]
    fn closes_on_bytes() {
        let mut batch: Batch = Batch::new(limits(1000, 10));
        batch.push(record(0, 0, 6));
        assert!(!batch.is_full());
        batch.push(record(0, 1, 6));
        assert!(batch.is_full());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_starts_with_the_first_record() {
        let mut batch: Batch = Batch::new(limits(10, 1000));
        assert_eq!(batch.deadline(), None);
        let start = Instant::now();
        batch.push(record(0, 0, 1));
        tokio::time::advance(Duration::from_millis(30)).await;
        batch.push(record(0, 1, 1));
        assert_eq!(batch.deadline(), Some(start + Duration::from_millis(100)));
        batch.take();
        assert_eq!(batch.deadline(), None);
    }

    #[test]
    fn revoked_partitions_are_forgotten_in_order() {
        let mut batch: Batch = Batch::new(limits(10, 1000));
        for (p, o) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            batch.push(record(p, o, 1));
        }
        assert_eq!(batch.forget_partitions(&[("t".into(), 1)]), 2);
        let kept: Vec<(i32, i64)> = batch
            .take()
            .iter()
            .map(|r| (r.partition, r.offset))
            .collect();
        assert_eq!(kept, vec![(0, 0), (0, 1)]);
    }
}
