//! The lag reader: a consumer group's committed offsets and the topics' high watermarks,
//! through the Kafka client module both binaries share, and what two readings say: lag per
//! partition and in total, the arrival rate (watermark growth) and the drain rate
//! (committed-offset growth).

use std::collections::BTreeMap;
use std::time::Instant;

use weir_crds::{Lag, StartPosition, TopicLag};

use crate::kafka::{Admin, AdminError};

/// A topic and partition.
pub type Partition = (String, i32);

/// One reading of a group on its topics.
#[derive(Clone, Debug)]
pub struct Reading {
    pub at: Instant,
    /// Per partition: the group's committed offset (none before its first commit) and the
    /// high watermark.
    pub offsets: BTreeMap<Partition, (Option<i64>, i64)>,
    /// Where the group starts on a partition it has not committed on.
    pub start: StartPosition,
}

/// Reads `group`'s committed offsets and the high watermarks of `topics`.
pub async fn read(
    admin: &Admin,
    group: &str,
    topics: &[String],
    start: StartPosition,
) -> Result<Reading, AdminError> {
    let high = admin.high_watermarks(topics).await?;
    let committed = admin.committed_offsets(group, topics).await?;
    Ok(Reading {
        at: Instant::now(),
        offsets: high
            .into_iter()
            .map(|(p, h)| {
                let c = committed.get(&p).copied();
                (p, (c, h))
            })
            .collect(),
        start,
    })
}

impl Reading {
    /// Lag of one partition: records up to the high watermark not yet committed. Without a
    /// commit, from the start position: everything under Earliest (this counts from offset
    /// 0: records already removed by retention are counted too), nothing under Latest.
    pub fn partition_lag(&self, committed: Option<i64>, high: i64) -> i64 {
        match (committed, self.start) {
            (Some(c), _) => (high - c).max(0),
            (None, StartPosition::Earliest) => high.max(0),
            (None, StartPosition::Latest) => 0,
        }
    }

    /// Lag per partition, in partition order.
    pub fn lags(&self) -> Vec<i64> {
        self.offsets
            .values()
            .map(|(c, h)| self.partition_lag(*c, *h))
            .collect()
    }

    pub fn total(&self) -> i64 {
        self.lags().iter().sum()
    }

    /// Per topic and in total, for status.
    pub fn lag(&self) -> Lag {
        let mut topics: BTreeMap<&str, i64> = BTreeMap::new();
        for ((topic, _), (c, h)) in &self.offsets {
            *topics.entry(topic).or_default() += self.partition_lag(*c, *h);
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
    for ((c0, h0), (c1, h1)) in before.offsets.values().zip(now.offsets.values()) {
        arrival += (h1 - h0).max(0) as f64 / seconds;
        // Lag that went away counts as drained: a first commit, or one past the last.
        let lag0 = before.partition_lag(*c0, *h0);
        let lag1 = now.partition_lag(*c1, *h1);
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
        let now = reading(
            t0 + Duration::from_secs(2),
            &[(0, Some(140), 170), (1, Some(30), 50)],
        );
        let r = rates(&before, &now).expect("rates");
        assert_eq!(r.arrival, (20.0 + 10.0) / 2.0);
        assert_eq!(r.drained, vec![20.0, 15.0]);
        assert_eq!(now.lag().total, 30 + 20);
    }
}
