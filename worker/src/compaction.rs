//! `batch.compaction: LastWriteWins`: a [`Window`] folds records as they are read, keeping
//! only each record key's latest event to be written, in a compact form (the record's
//! value, or the transformed event as JSON, never the decoded tree). Its memory is that of
//! the records it keeps, bounded by `batch.maxBytes` and `batch.maxRecords`, not that of the
//! records it has read. A closed window ([`Closed`]) gives its events back a chunk at a
//! time, decoded again by [`crate::shards::Shards::expand`], and the offsets after every
//! record it read, superseded and filtered ones included: those become durable once every
//! kept event is written.

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hashbrown::HashTable;
use tokio::time::Instant;

use crate::batch::Limits;
use crate::commit::Offsets;
use crate::record::Record;
use crate::shards::{Compact, Outcome, Prepared};

/// What a kept record costs besides its bytes (the slot, the index entry, allocations),
/// counted against `batch.maxBytes`.
const SLOT_OVERHEAD: usize = 160;

/// One kept record: a [`Record`] without its topic (the window's partition table has it),
/// its key and value in one allocation, its event in compact form.
#[derive(Debug)]
struct Slot {
    /// Arrival order in the window: the kept events are written in it.
    seq: u32,
    partition: u32,
    offset: i64,
    timestamp: i64,
    /// The key's length at the start of `data`; [`NO_KEY`] without a key.
    key_len: u32,
    flags: u8,
    /// The key's bytes, then the value's.
    data: Box<[u8]>,
    headers: Option<Box<[Header]>>,
    event: Compact,
}

/// A record header: name and value.
type Header = (String, Vec<u8>);

const NO_KEY: u32 = u32::MAX;
const HAS_VALUE: u8 = 1;
const HAS_TIMESTAMP: u8 = 2;

impl Slot {
    fn new(seq: u32, partition: u32, record: Record, event: Compact) -> Self {
        let key_len = record
            .key
            .as_ref()
            .map_or(NO_KEY, |k| k.len().min(NO_KEY as usize - 1) as u32);
        let mut flags = 0;
        if record.payload.is_some() {
            flags |= HAS_VALUE;
        }
        if record.timestamp.is_some() {
            flags |= HAS_TIMESTAMP;
        }
        let data = match (record.key, record.payload) {
            (None, None) => Box::default(),
            (Some(only), None) | (None, Some(only)) => only.into_boxed_slice(),
            (Some(mut key), Some(payload)) => {
                key.truncate(key_len as usize);
                key.reserve_exact(payload.len());
                key.extend_from_slice(&payload);
                key.into_boxed_slice()
            }
        };
        Self {
            seq,
            partition,
            offset: record.offset,
            timestamp: record.timestamp.unwrap_or_default(),
            key_len,
            flags,
            data,
            headers: (!record.headers.is_empty()).then(|| record.headers.into_boxed_slice()),
            event,
        }
    }

    fn key(&self) -> Option<&[u8]> {
        (self.key_len != NO_KEY).then(|| &self.data[..self.key_len as usize])
    }

    fn bytes(&self) -> usize {
        let json = match &self.event {
            Compact::Json(json) => json.len(),
            Compact::Payload | Compact::Null => 0,
        };
        SLOT_OVERHEAD
            + self.data.len()
            + self.headers.as_ref().map_or(0, |headers| {
                headers.iter().map(|(k, v)| k.len() + v.len() + 48).sum()
            })
            + json
    }

    /// The record again, in the topic's partition.
    fn into_record(self, topic: String, partition: i32) -> (Record, Compact) {
        let mut data = self.data.into_vec();
        let (key, payload) = match (self.key_len, self.flags & HAS_VALUE != 0) {
            (NO_KEY, false) => (None, None),
            (NO_KEY, true) => (None, Some(data)),
            (_, false) => (Some(data), None),
            (len, true) => {
                let payload = data.split_off(len as usize);
                data.shrink_to_fit();
                (Some(data), Some(payload))
            }
        };
        let record = Record {
            topic,
            partition,
            offset: self.offset,
            key,
            payload,
            timestamp: (self.flags & HAS_TIMESTAMP != 0).then_some(self.timestamp),
            headers: self.headers.map(Vec::from).unwrap_or_default(),
        };
        (record, self.event)
    }
}

/// A partition the window has read from.
#[derive(Debug)]
struct Partition {
    topic: String,
    partition: i32,
    /// The offset after its last record read in this window; `None` once revoked (or
    /// before its first record).
    next: Option<i64>,
}

/// A compaction window being filled.
#[derive(Debug)]
pub struct Window {
    limits: Limits,
    hasher: std::collections::hash_map::RandomState,
    /// Index into `slots` of each keyed slot, by its key.
    by_key: HashTable<u32>,
    slots: Vec<Slot>,
    /// Records that failed to decode or transform: dead letters, written with the window.
    failed: Vec<(Record, String)>,
    partitions: Vec<Partition>,
    seq: u32,
    bytes: usize,
    counts: Counts,
    opened: Option<Instant>,
}

/// What a window did with the records it read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Records read into the window (each counted once).
    pub read: usize,
    /// Dropped by the filter.
    pub filtered: usize,
    /// Superseded by a later event of their key.
    pub compacted: usize,
    /// Read a second time (a partition fetched again): ignored.
    pub repeated: usize,
}

impl Window {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            hasher: Default::default(),
            by_key: HashTable::new(),
            slots: Vec::new(),
            failed: Vec::new(),
            partitions: Vec::new(),
            seq: 0,
            bytes: 0,
            counts: Counts::default(),
            opened: None,
        }
    }

    /// Folds prepared records, in the order they were read; `opened` is when the first of
    /// them was read (the window's wait starts then, if it is the window's first).
    pub fn fold(&mut self, prepared: Vec<(Record, Outcome)>, opened: Option<Instant>) {
        if prepared.is_empty() {
            return;
        }
        if self.opened.is_none() {
            self.opened = Some(opened.unwrap_or_else(Instant::now));
        }
        for (record, outcome) in prepared {
            let p = self.partition(&record);
            let partition = &mut self.partitions[p];
            if partition.next.is_some_and(|next| record.offset < next) {
                self.counts.repeated += 1;
                continue;
            }
            partition.next = Some(record.offset + 1);
            self.counts.read += 1;
            self.seq = self.seq.wrapping_add(1);
            match outcome {
                Outcome::Filtered => self.counts.filtered += 1,
                Outcome::Failed(reason) => {
                    self.bytes += SLOT_OVERHEAD + record.size();
                    self.failed.push((record, reason));
                }
                Outcome::Write(event) => self.keep(p, record, event),
            }
        }
    }

    fn keep(&mut self, partition: usize, record: Record, event: Compact) {
        let slot = Slot::new(self.seq, partition as u32, record, event);
        self.bytes += slot.bytes();
        let Some(key) = slot.key() else {
            self.slots.push(slot);
            return;
        };
        let hasher = &self.hasher;
        let hash = hasher.hash_one(key);
        let slots = &mut self.slots;
        let found = self
            .by_key
            .find(hash, |&i| slots[i as usize].key() == Some(key))
            .copied();
        match found {
            Some(i) => {
                let old = std::mem::replace(&mut slots[i as usize], slot);
                self.bytes -= old.bytes();
                self.counts.compacted += 1;
            }
            None => {
                let i = slots.len() as u32;
                slots.push(slot);
                self.by_key
                    .insert_unique(hash, i, |&i| key_hash(hasher, &slots[i as usize]));
            }
        }
    }

    fn partition(&mut self, record: &Record) -> usize {
        if let Some(i) = self
            .partitions
            .iter()
            .position(|p| p.partition == record.partition && p.topic == record.topic)
        {
            return i;
        }
        self.partitions.push(Partition {
            topic: record.topic.clone(),
            partition: record.partition,
            next: None,
        });
        self.partitions.len() - 1
    }

    /// Nothing read since the window opened (or everything read was revoked).
    pub fn is_empty(&self) -> bool {
        self.partitions.iter().all(|p| p.next.is_none())
    }

    /// Keeps as many records or bytes as the batch limits allow: close it now.
    pub fn is_full(&self) -> bool {
        self.slots.len() + self.failed.len() >= self.limits.max_records
            || self.bytes >= self.limits.max_bytes
    }

    /// When the window's wait runs out; `None` while empty.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|opened| opened + self.limits.max_wait)
    }

    /// `batch.maxBytes`.
    pub fn max_bytes(&self) -> usize {
        self.limits.max_bytes
    }

    /// What the window keeps, in bytes as counted against `batch.maxBytes`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops what was read from partitions this worker no longer owns; the new owner reads
    /// them again from the last committed offset. Returns how many kept records went.
    pub fn forget_partitions(&mut self, revoked: &[(String, i32)]) -> usize {
        let gone: Vec<u32> = self
            .partitions
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| {
                p.next.is_some()
                    && revoked
                        .iter()
                        .any(|(t, n)| *t == p.topic && *n == p.partition)
            })
            .map(|(i, p)| {
                p.next = None;
                i as u32
            })
            .collect();
        if gone.is_empty() {
            return 0;
        }
        let before = self.slots.len() + self.failed.len();
        self.slots.retain(|s| !gone.contains(&s.partition));
        self.failed.retain(|(r, _)| {
            !revoked
                .iter()
                .any(|(t, n)| *t == r.topic && *n == r.partition)
        });
        self.by_key.clear();
        let hasher = &self.hasher;
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(key) = slot.key() {
                let slots = &self.slots;
                self.by_key
                    .insert_unique(hasher.hash_one(key), i as u32, |&i| {
                        key_hash(hasher, &slots[i as usize])
                    });
            }
        }
        self.bytes = self.slots.iter().map(Slot::bytes).sum::<usize>()
            + self
                .failed
                .iter()
                .map(|(r, _)| SLOT_OVERHEAD + r.size())
                .sum::<usize>();
        if self.is_empty() {
            self.opened = None;
        }
        before - (self.slots.len() + self.failed.len())
    }

    /// Closes the window, leaving it empty: its kept events in the order they arrived.
    pub fn take(&mut self) -> Closed {
        let window = std::mem::replace(self, Window::new(self.limits));
        let mut offsets = Offsets::default();
        for p in &window.partitions {
            if let Some(next) = p.next {
                offsets.0.insert((p.topic.clone(), p.partition), next);
            }
        }
        let mut slots = window.slots;
        // Last first: chunks are taken from the end.
        slots.sort_unstable_by_key(|s| std::cmp::Reverse(s.seq));
        Closed {
            offsets,
            held: Held(Arc::new(AtomicUsize::new(window.bytes))),
            counts: window.counts,
            failed: window.failed,
            slots,
            topics: window
                .partitions
                .into_iter()
                .map(|p| (p.topic, p.partition))
                .collect(),
        }
    }
}

/// A closed window's kept bytes, shared with the engine; 0 once the window is gone.
#[derive(Debug)]
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

fn key_hash(hasher: &std::collections::hash_map::RandomState, slot: &Slot) -> u64 {
    slot.key().map_or(0, |key| hasher.hash_one(key))
}

/// A closed window, being written.
#[derive(Debug)]
pub struct Closed {
    /// The offset after the last record read from each partition.
    pub offsets: Offsets,
    pub counts: Counts,
    held: Held,
    failed: Vec<(Record, String)>,
    /// Newest first.
    slots: Vec<Slot>,
    topics: Vec<(String, i32)>,
}

impl Closed {
    /// The records that failed before any sink: dead letters.
    pub fn take_failed(&mut self) -> Vec<Prepared> {
        std::mem::take(&mut self.failed)
            .into_iter()
            .map(|(record, reason)| Prepared {
                record,
                event: Err(reason),
            })
            .collect()
    }

    /// What the window keeps until it is written, in bytes as counted against
    /// `batch.maxBytes`: falls as its chunks are taken, to 0 when it is dropped.
    pub fn held(&self) -> Arc<AtomicUsize> {
        self.held.0.clone()
    }

    /// Kept events not yet taken.
    pub fn remaining(&self) -> usize {
        self.slots.len()
    }

    /// The next `n` kept events (oldest first), as records with their compact events.
    pub fn next_chunk(&mut self, n: usize) -> Vec<(Record, Compact)> {
        let n = n.min(self.slots.len());
        let mut chunk = Vec::with_capacity(n);
        let mut bytes = 0;
        for _ in 0..n {
            let Some(slot) = self.slots.pop() else { break };
            let (topic, partition) = self
                .topics
                .get(slot.partition as usize)
                .cloned()
                .unwrap_or_default();
            bytes += slot.bytes();
            chunk.push(slot.into_record(topic, partition));
        }
        // What is taken is the writer's now: a chunk at a time, far below the window.
        let _ = self
            .held
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                Some(held.saturating_sub(bytes))
            });
        // Give the written part back to the allocator as the window drains.
        if self.slots.len() < self.slots.capacity() / 2 {
            self.slots.shrink_to_fit();
        }
        chunk
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(key: Option<&str>, partition: i32, offset: i64) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: Some(format!("v{offset}").into_bytes()),
            timestamp: None,
            headers: vec![],
        }
    }

    fn limits(max_records: usize, max_bytes: usize) -> Limits {
        Limits {
            max_records,
            max_bytes,
            max_wait: Duration::from_secs(1),
        }
    }

    fn write() -> Outcome {
        Outcome::Write(Compact::Payload)
    }

    fn drain(closed: &mut Closed) -> Vec<(i32, i64)> {
        let mut all = Vec::new();
        while closed.remaining() > 0 {
            all.extend(
                closed
                    .next_chunk(2)
                    .into_iter()
                    .map(|(r, _)| (r.partition, r.offset)),
            );
        }
        all
    }

    #[tokio::test]
    async fn keeps_each_keys_last_written_event_in_arrival_order() {
        let mut window = Window::new(limits(100, 1 << 20));
        window.fold(
            vec![
                (record(Some("a"), 0, 0), write()),
                (record(Some("b"), 0, 1), write()),
                (record(Some("a"), 0, 2), write()),
                // Filtered out: a's offset 2 stays the one written.
                (record(Some("a"), 0, 3), Outcome::Filtered),
                // Dead-lettered: b's offset 1 stays written.
                (record(Some("b"), 0, 4), Outcome::Failed("bad".into())),
                (record(None, 1, 0), write()),
                (record(None, 1, 1), write()),
            ],
            None,
        );
        // The next chunk, read later: c, then a again.
        window.fold(
            vec![
                (record(Some("c"), 1, 2), write()),
                (record(Some("a"), 1, 3), write()),
            ],
            None,
        );
        let mut closed = window.take();
        assert!(window.is_empty(), "the window is empty once closed");
        assert_eq!(
            closed.counts,
            Counts {
                read: 9,
                filtered: 1,
                compacted: 2,
                repeated: 0
            }
        );
        let failed = closed.take_failed();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].record.offset, 4);
        assert_eq!(
            drain(&mut closed),
            vec![(0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
        );
        assert_eq!(
            closed.offsets.0,
            [(("t".to_owned(), 0), 5), (("t".to_owned(), 1), 4)].into()
        );
    }

    #[tokio::test]
    async fn a_kept_record_comes_back_whole() {
        let mut keyed = record(Some("key"), 0, 0);
        keyed.timestamp = Some(1_700_000_000_000);
        keyed.headers = vec![("h".into(), b"v".to_vec())];
        let mut tombstone = record(Some("gone"), 0, 1);
        tombstone.payload = None;
        let unkeyed = record(None, 0, 2);
        let mut empty = record(None, 0, 3);
        empty.payload = None;
        let records = vec![keyed, tombstone, unkeyed, empty];
        let mut window = Window::new(limits(100, 1 << 20));
        window.fold(
            records
                .iter()
                .cloned()
                .map(|r| (r, Outcome::Write(Compact::Json(b"{}".to_vec().into()))))
                .collect(),
            None,
        );
        let mut closed = window.take();
        let held = closed.held();
        assert!(held.load(Ordering::Relaxed) > 4 * SLOT_OVERHEAD);
        let back = closed.next_chunk(10);
        assert_eq!(held.load(Ordering::Relaxed), 0, "taken: held by the writer");
        assert_eq!(
            back,
            records
                .into_iter()
                .map(|r| (r, Compact::Json(b"{}".to_vec().into())))
                .collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn records_read_twice_are_folded_once() {
        let mut window = Window::new(limits(100, 1 << 20));
        window.fold(
            vec![
                (record(Some("a"), 0, 0), write()),
                (record(Some("b"), 0, 1), write()),
            ],
            None,
        );
        window.fold(
            vec![
                (record(Some("b"), 0, 1), write()),
                (record(Some("c"), 0, 2), write()),
            ],
            None,
        );
        let mut closed = window.take();
        assert_eq!(closed.counts.repeated, 1);
        assert_eq!(closed.counts.compacted, 0);
        assert_eq!(drain(&mut closed), vec![(0, 0), (0, 1), (0, 2)]);
    }

    #[tokio::test]
    async fn closes_on_kept_records_or_kept_bytes_not_on_records_read() {
        let mut window = Window::new(limits(2, 1 << 20));
        let same_key: Vec<_> = (0..50)
            .map(|o| (record(Some("a"), 0, o), write()))
            .collect();
        window.fold(same_key, None);
        assert!(
            !window.is_full(),
            "fifty versions of one key keep one record"
        );
        window.fold(vec![(record(Some("b"), 0, 50), write())], None);
        assert!(window.is_full());

        let mut window = Window::new(limits(1000, 3 * SLOT_OVERHEAD));
        let mut big = record(Some("a"), 0, 0);
        big.payload = Some(vec![b'x'; SLOT_OVERHEAD]);
        window.fold(vec![(big.clone(), write())], None);
        big.offset = 1;
        window.fold(vec![(big, write())], None);
        // One key byte and the value, once: the first version was superseded.
        assert_eq!(window.bytes(), 2 * SLOT_OVERHEAD + 1);
        assert!(
            !window.is_full(),
            "a superseded record's bytes are given back"
        );
        window.fold(vec![(record(Some("b"), 0, 2), write())], None);
        assert!(window.is_full());
    }

    #[tokio::test]
    async fn revoked_partitions_are_forgotten_and_leave_no_offsets() {
        let mut window = Window::new(limits(100, 1 << 20));
        window.fold(
            vec![
                (record(Some("a"), 0, 0), write()),
                (record(Some("b"), 1, 0), write()),
                (record(Some("c"), 1, 1), Outcome::Failed("bad".into())),
                (record(Some("d"), 0, 1), write()),
            ],
            None,
        );
        assert_eq!(window.forget_partitions(&[("t".into(), 1)]), 2);
        // Assigned back and read again from its committed offset.
        window.fold(vec![(record(Some("b"), 1, 0), write())], None);
        let mut closed = window.take();
        assert!(closed.take_failed().is_empty());
        assert_eq!(drain(&mut closed), vec![(0, 0), (0, 1), (1, 0)]);
        assert_eq!(
            closed.offsets.0,
            [(("t".to_owned(), 0), 2), (("t".to_owned(), 1), 1)].into()
        );

        let mut window = Window::new(limits(100, 1 << 20));
        window.fold(vec![(record(Some("a"), 1, 0), write())], None);
        window.forget_partitions(&[("t".into(), 1)]);
        assert!(window.is_empty());
        assert_eq!(
            window.deadline(),
            None,
            "an emptied window waits for nothing"
        );
    }
}
