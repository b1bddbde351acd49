//! Batches close on max records, max bytes or max wait, whichever comes first; with
//! `batch.compaction: LastWriteWins`, [`last_write_wins`] keeps only each key's last event
//! of a batch.

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

/// `batch.compaction: LastWriteWins`: of the events of one record key in a batch, only the
/// last is written; the earlier ones become "nothing to write" (their offsets are
/// acknowledged with the batch). Only an event that will be written supersedes: a later
/// record the filter dropped, or one that failed and goes to the dead-letter topic, leaves
/// the earlier events as they are, so an upsert table ends as the uncompacted run leaves
/// it. Records without a key are all written. Returns how many events were dropped.
pub fn last_write_wins(prepared: &mut [crate::shards::Prepared]) -> usize {
    let mut last: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
    for (i, p) in prepared.iter().enumerate() {
        if let (Some(key), Ok(Some(_))) = (p.record.key.as_deref(), &p.event) {
            last.insert(key, i);
        }
    }
    let superseded: Vec<usize> = prepared
        .iter()
        .enumerate()
        .filter(|(i, p)| {
            matches!(p.event, Ok(Some(_)))
                && p.record
                    .key
                    .as_deref()
                    .is_some_and(|key| last.get(key).is_some_and(|l| l != i))
        })
        .map(|(i, _)| i)
        .collect();
    for &i in &superseded {
        prepared[i].event = Ok(None);
    }
    superseded.len()
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

    fn prepared(
        key: Option<&str>,
        offset: i64,
        event: Result<Option<i64>, &str>,
    ) -> crate::shards::Prepared {
        let mut record = record(0, offset, 1);
        record.key = key.map(|k| k.as_bytes().to_vec());
        crate::shards::Prepared {
            record,
            event: event
                .map(|e| e.map(|v| serde_json::json!({"v": v})))
                .map_err(str::to_owned),
        }
    }

    #[test]
    fn last_write_wins_keeps_each_keys_last_written_event() {
        let mut batch = vec![
            prepared(Some("a"), 0, Ok(Some(1))),
            prepared(Some("b"), 1, Ok(Some(1))),
            prepared(Some("a"), 2, Ok(Some(2))),
            // Filtered out: a's version 2 stays the one written.
            prepared(Some("a"), 3, Ok(None)),
            // Fails (dead-lettered): b's version 1 stays written.
            prepared(Some("b"), 4, Err("bad")),
            prepared(None, 5, Ok(Some(1))),
            prepared(None, 6, Ok(Some(2))),
        ];
        assert_eq!(last_write_wins(&mut batch), 1);
        let written: Vec<i64> = batch
            .iter()
            .filter(|p| matches!(p.event, Ok(Some(_))))
            .map(|p| p.record.offset)
            .collect();
        assert_eq!(written, vec![1, 2, 5, 6]);
        assert!(
            batch[4].event.is_err(),
            "a failure still goes to the dead-letter topic"
        );
    }
}
