//! The lag reader: a consumer group's committed offsets and the topics' high watermarks,
//! through the Kafka client module both binaries share, and what two readings say: lag per
//! partition and in total, the arrival rate (watermark growth) and the drain rate
//! (committed-offset growth).
//!
//! Lag is what the group's `read_committed` consumers would still receive. Offsets alone
//! overstate it on a topic written by transactional producers: every transaction leaves a
//! commit or abort marker that takes an offset but is never delivered, and the records of
//! an aborted transaction are never delivered either, so a fully consumed partition would
//! keep an offset lag of one or more forever. A partition whose offset lag is small (at
//! most [`COUNT_BELOW`]), where that difference decides whether workers are needed at
//! all, has its records counted: a `read_committed` Fetch from the committed offset (at
//! most [`COUNT_BYTES`]) whose record batch headers are counted, markers and aborted
//! transactions left out. Above that, and wherever the Fetch cannot be made, the offset
//! difference stands: one marker per transaction is then a small share of the backlog.
//! The rates stay in offsets, as the policy compares them with each other.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::kafka::{Admin, AdminError, CommittedRange};
use weir_crds::{Lag, StartPosition, TopicLag};

/// A topic and partition.
pub type Partition = (String, i32);

/// Partitions with at most this offset lag have their records counted.
pub const COUNT_BELOW: i64 = 1000;
/// The most bytes read per partition and reading to count them; what lies beyond is
/// counted by offsets.
pub const COUNT_BYTES: i32 = 256 << 10;

/// One reading of a group on its topics.
#[derive(Clone, Debug)]
pub struct Reading {
    pub at: Instant,
    /// Per partition: the group's committed offset (none before its first commit) and the
    /// high watermark.
    pub offsets: BTreeMap<Partition, (Option<i64>, i64)>,
    /// Where the group starts on a partition it has not committed on.
    pub start: StartPosition,
    /// The log start offsets (the oldest retained records) of the partitions without a
    /// commit, under Earliest: read only then.
    pub low: BTreeMap<Partition, i64>,
    /// Per partition whose records were counted: the records a `read_committed`
    /// consumer would still receive up to the high watermark.
    pub counted: BTreeMap<Partition, i64>,
}

/// Reads `group`'s committed offsets and the high watermarks of `topics`, and counts the
/// records of the partitions with a small lag. A failed count is no failed reading: those
/// partitions are counted by offsets.
pub async fn read(
    admin: &Admin,
    group: &str,
    topics: &[String],
    start: StartPosition,
) -> Result<Reading, AdminError> {
    let high = admin.high_watermarks(topics).await?;
    let committed = admin.committed_offsets(group, topics).await?;
    let mut reading = Reading {
        at: Instant::now(),
        offsets: high
            .into_iter()
            .map(|(p, h)| {
                let c = committed.get(&p).copied();
                (p, (c, h))
            })
            .collect(),
        start,
        low: BTreeMap::new(),
        counted: BTreeMap::new(),
    };
    if start == StartPosition::Earliest && reading.offsets.values().any(|(c, _)| c.is_none()) {
        reading.low = admin.low_watermarks(topics).await?;
    }
    reading.counted = count(admin, reading.ranges_to_count()).await;
    Ok(reading)
}

/// For each range of 1 to [`COUNT_BELOW`] offsets, the records a `read_committed`
/// consumer at `from` would still receive up to `until` (what the Fetch did not reach
/// counted by offsets). A range that could not be read is absent: count it by offsets.
pub async fn count(admin: &Admin, ranges: Vec<CommittedRange>) -> BTreeMap<Partition, i64> {
    let ranges: Vec<CommittedRange> = ranges
        .into_iter()
        .filter(|r| (1..=COUNT_BELOW).contains(&(r.until - r.from)))
        .collect();
    if ranges.is_empty() {
        return BTreeMap::new();
    }
    match admin.count_committed(&ranges, COUNT_BYTES).await {
        Ok(counts) => ranges
            .into_iter()
            .filter_map(|range| {
                let partition = (range.topic, range.partition);
                let c = counts.get(&partition)?;
                Some((partition, c.records + (range.until - c.reached)))
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "lag counted by offsets: the records could not be read");
            BTreeMap::new()
        }
    }
}

impl Reading {
    /// Where the group's consumers read next on a partition: the committed offset, or
    /// without a commit the start position's (the oldest retained record under
    /// Earliest; `None` under Latest: nothing of what is there now will be read).
    fn next_offset(&self, partition: &Partition, committed: Option<i64>) -> Option<i64> {
        match (committed, self.start) {
            (Some(c), _) => Some(c),
            (None, StartPosition::Earliest) => Some(self.low.get(partition).copied().unwrap_or(0)),
            (None, StartPosition::Latest) => None,
        }
    }

    /// Offset lag of one partition: offsets from where the group reads next up to the
    /// high watermark.
    pub fn partition_lag(&self, partition: &Partition, committed: Option<i64>, high: i64) -> i64 {
        self.next_offset(partition, committed)
            .map_or(0, |next| (high - next).max(0))
    }

    /// Lag of one partition: its counted records, else its offset lag.
    fn lag_of(&self, partition: &Partition, committed: Option<i64>, high: i64) -> i64 {
        self.counted
            .get(partition)
            .copied()
            .unwrap_or_else(|| self.partition_lag(partition, committed, high))
    }

    /// The partitions whose records are worth counting: an offset lag from 1 to
    /// [`COUNT_BELOW`], from where the group's consumers read next.
    fn ranges_to_count(&self) -> Vec<CommittedRange> {
        self.offsets
            .iter()
            .filter_map(|(p, (c, h))| {
                let from = self.next_offset(p, *c)?;
                (1..=COUNT_BELOW)
                    .contains(&(h - from))
                    .then(|| CommittedRange {
                        topic: p.0.clone(),
                        partition: p.1,
                        from,
                        until: *h,
                    })
            })
            .collect()
    }

    /// Lag per partition, in partition order.
    pub fn lags(&self) -> Vec<i64> {
        self.offsets
            .iter()
            .map(|(p, (c, h))| self.lag_of(p, *c, *h))
            .collect()
    }

    pub fn total(&self) -> i64 {
        self.lags().iter().sum()
    }

    /// Per topic and in total, for status.
    pub fn lag(&self) -> Lag {
        let mut topics: BTreeMap<&str, i64> = BTreeMap::new();
        for (partition, (c, h)) in &self.offsets {
            *topics.entry(&partition.0).or_default() += self.lag_of(partition, *c, *h);
        }
        Lag {
            total: self.total(),
            topics: topics
                .into_iter()
                .map(|(topic, lag)| TopicLag {
                    topic: topic.to_owned(),
                    lag,
                })
                .collect(),
        }
    }

    /// The partitions, in the order of [`Reading::lags`].
    pub fn partitions(&self) -> Vec<&Partition> {
        self.offsets.keys().collect()
    }
}

/// What happened between two readings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rates {
    pub seconds: f64,
    /// Records produced per second (all partitions).
    pub arrival: f64,
    /// Records committed per second, per partition in the order of [`Reading::lags`].
    pub drained: Vec<f64>,
}

impl Rates {
    pub fn drain(&self) -> f64 {
        self.drained.iter().sum()
    }
}

/// The rates from `before` to `now`; `None` when no time passed or the partitions
/// changed (a topic gained partitions: start over).
pub fn rates(before: &Reading, now: &Reading) -> Option<Rates> {
    let seconds = now.at.duration_since(before.at).as_secs_f64();
    if seconds <= 0.0
        || before.offsets.len() != now.offsets.len()
        || before.offsets.keys().ne(now.offsets.keys())
    {
        return None;
    }
    let mut arrival = 0.0;
    let mut drained = Vec::with_capacity(now.offsets.len());
    for ((p, (c0, h0)), (c1, h1)) in before.offsets.iter().zip(now.offsets.values()) {
        arrival += (h1 - h0).max(0) as f64 / seconds;
        // Offset lag that went away counts as drained: a first commit, or one past the
        // last (offsets, like the arrival rate: the two are compared).
        let lag0 = before.partition_lag(p, *c0, *h0);
        let lag1 = now.partition_lag(p, *c1, *h1);
        let consumed = match (c0, c1) {
            (Some(a), Some(b)) => (b - a).max(0),
            _ => (lag0 + (h1 - h0) - lag1).max(0),
        };
        drained.push(consumed as f64 / seconds);
    }
    Some(Rates {
        seconds,
        arrival,
        drained,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reading(at: Instant, offsets: &[(i32, Option<i64>, i64)]) -> Reading {
        Reading {
            at,
            offsets: offsets
                .iter()
                .map(|(p, c, h)| (("t".to_owned(), *p), (*c, *h)))
                .collect(),
            start: StartPosition::Earliest,
            low: BTreeMap::new(),
            counted: BTreeMap::new(),
        }
    }

    #[test]
    fn lag_counts_from_the_commit_or_the_start_position_and_rates_from_the_growth() {
        let t0 = Instant::now();
        let before = reading(t0, &[(0, Some(100), 150), (1, None, 40)]);
        assert_eq!(before.lags(), vec![50, 40]);
        let mut latest = before.clone();
        latest.start = StartPosition::Latest;
        assert_eq!(latest.lags(), vec![50, 0]);
        // Retention removed partition 1's first 25 records: those are no lag.
        let mut retained = before.clone();
        retained.low.insert(("t".to_owned(), 1), 25);
        assert_eq!(retained.lags(), vec![50, 15]);
        assert_eq!(
            retained
                .ranges_to_count()
                .iter()
                .map(|r| (r.partition, r.from, r.until))
                .collect::<Vec<_>>(),
            vec![(0, 100, 150), (1, 25, 40)]
        );
        let now = reading(
            t0 + Duration::from_secs(2),
            &[(0, Some(140), 170), (1, Some(30), 50)],
        );
        let r = rates(&before, &now).expect("rates");
        assert_eq!(r.arrival, (20.0 + 10.0) / 2.0);
        assert_eq!(r.drained, vec![20.0, 15.0]);
        assert_eq!(now.lag().total, 30 + 20);
    }

    #[test]
    fn counted_records_replace_the_offset_lag_but_not_the_rates() {
        let t0 = Instant::now();
        let mut before = reading(
            t0,
            &[(0, Some(100), 102), (1, Some(10), 5000), (2, None, 3)],
        );
        // Partition 0 is consumed but for a marker and an aborted transaction's records;
        // partition 1 is too far behind to be counted; partition 2 counts from offset 0.
        let ranges = before.ranges_to_count();
        assert_eq!(
            ranges
                .iter()
                .map(|r| (r.partition, r.from, r.until))
                .collect::<Vec<_>>(),
            vec![(0, 100, 102), (2, 0, 3)]
        );
        before.counted.insert(("t".to_owned(), 0), 0);
        before.counted.insert(("t".to_owned(), 2), 2);
        assert_eq!(before.lags(), vec![0, 4990, 2]);
        assert_eq!(before.lag().total, 4992);
        let now = reading(
            t0 + Duration::from_secs(1),
            &[(0, Some(102), 102), (1, Some(10), 5000), (2, Some(3), 3)],
        );
        let r = rates(&before, &now).expect("rates");
        assert_eq!(r.drained, vec![2.0, 0.0, 3.0]);
        let mut latest = now.clone();
        latest.start = StartPosition::Latest;
        latest.offsets.insert(("t".to_owned(), 3), (None, 9));
        assert_eq!(latest.ranges_to_count(), vec![]);
    }
}
