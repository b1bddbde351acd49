//! The scaling policy: a pure function from what the lag reader measured to a replica
//! count and its reason.
//!
//! - With a drain rate per replica measured while the replicas were busy: the fewest
//!   replicas whose busiest one (partitions are shared evenly, so 6 replicas on 10
//!   partitions do what 5 do) keeps up with the arrival rate (the median of the last three
//!   readings: one spike is not load) plus the backlog over `targetCatchUpTime`. A
//!   partition is consumed by one replica at most, so its demand counts up to what one
//!   replica drains.
//! - Before anything is measured: KEDA's rule, `ceil(lag / targetLagPerReplica)`, but a
//!   partition's lag is worth one replica at most.
//! - Bounded by `minReplicas`, `maxReplicas` and the partition count; from zero as soon as
//!   the lag exceeds `activationLag`.
//! - Up at most doubling (or 4 more) per decision, as the HPA, so that whether more
//!   replicas raise the drain rate is measured before going further: when they stop
//!   raising it (the sink is the bottleneck) it goes back to the fewest that drained as
//!   much and says so. A partition whose lag stands still while replicas run (a stuck
//!   record) is left out and reported.
//! - Down only after `cooldown` during which a lower count would have done with 15 %
//!   headroom, by at most half at a time, so a steady noisy load does not flap.

use std::collections::BTreeMap;

/// The spec's scaling bounds and targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub target_lag_per_replica: i64,
    /// Seconds within which a backlog should clear.
    pub target_catch_up: f64,
    pub activation_lag: i64,
    /// Seconds of lower demand before scaling down.
    pub cooldown: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 10,
            target_lag_per_replica: 10_000,
            target_catch_up: 60.0,
            activation_lag: 0,
            cooldown: 300.0,
        }
    }
}

/// One reading of the lag reader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// Seconds on any monotonic clock.
    pub at: f64,
    /// Replicas that ran during the interval that ends now.
    pub replicas: i32,
    /// Lag per partition, now.
    pub lag: Vec<i64>,
    /// Records committed per second per partition over the interval (empty on the first
    /// reading).
    pub drained: Vec<f64>,
    /// Records produced per second over the interval (watermark growth), all partitions.
    pub arrival_rate: Option<f64>,
}

impl Observation {
    pub fn total_lag(&self) -> i64 {
        self.lag.iter().sum()
    }

    pub fn drain_rate(&self) -> Option<f64> {
        (!self.drained.is_empty()).then(|| self.drained.iter().sum())
    }
}

/// Why the count is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The count covers the arrival rate and the backlog within the catch-up time.
    Demand,
    /// Nothing measured yet: KEDA's lag-per-replica rule.
    LagPerReplica,
    /// Scaled from zero: the lag went past the activation lag.
    Activated,
    /// No lag past the activation lag and minReplicas 0: no workers.
    Idle,
    /// Held at maxReplicas.
    MaxReplicas,
    /// Held at the partition count (more replicas would have no partition).
    PartitionCount,
    /// More replicas stopped raising the drain rate: the sink is the bottleneck.
    SinkSaturated,
    /// A partition's lag stands still while replicas run: a record is stuck.
    StuckPartition,
    /// Lower demand has not lasted the cooldown yet.
    Cooldown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Demand => "Demand",
            Reason::LagPerReplica => "LagPerReplica",
            Reason::Activated => "Activated",
            Reason::Idle => "Idle",
            Reason::MaxReplicas => "MaxReplicas",
            Reason::PartitionCount => "PartitionCount",
            Reason::SinkSaturated => "SinkSaturated",
            Reason::StuckPartition => "StuckPartition",
            Reason::Cooldown => "Cooldown",
        }
    }
}

/// The decision of one reading.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub replicas: i32,
    pub reason: Reason,
    /// The reason in words, with the figures.
    pub message: String,
    /// Partitions judged stuck (by index into `Observation::lag`).
    pub stuck: Vec<usize>,
}

/// What the policy remembers between readings of one pipeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Memory {
    /// Drain rate (records/s) measured while the replicas were busy, per replica count,
    /// with when it was last measured.
    busy_drain: BTreeMap<i32, (f64, f64)>,
    /// The last three arrival rates (their median is the estimate: one spike is not load).
    arrivals: Vec<f64>,
    /// What one replica drains, from the latest busy readings; kept when they age out.
    per_replica: Option<f64>,
    /// The lag of the previous reading, per partition.
    last_lag: Vec<i64>,
    /// Since when each partition's lag has stood still with replicas running.
    still_since: Vec<Option<f64>>,
    /// Since when fewer replicas would have done.
    lower_since: Option<f64>,
}

/// Drain rates measured longer ago than this are forgotten (the sink may have changed).
const FORGET_AFTER: f64 = 600.0;
/// A partition whose lag has not moved for this long while replicas run is stuck.
const STUCK_AFTER: f64 = 15.0;
/// Headroom a lower replica count must leave before scaling down to it.
const DOWN_HEADROOM: f64 = 1.15;
/// Weight of a new reading in the smoothed rates.
const SMOOTHING: f64 = 0.5;
/// More replicas that add less than this share of what each replica drained before mean
/// the sink is saturated.
const SATURATION_GAIN: f64 = 0.5;

impl Memory {
    /// The replica count past which more replicas did not raise the drain rate, when that
    /// was measured: the smallest count that reached 90 % of the best drain rate seen.
    fn saturation(&self) -> Option<(i32, f64)> {
        let counts: Vec<(i32, f64)> = self.busy_drain.iter().map(|(n, (r, _))| (*n, *r)).collect();
        let saturated = counts.windows(2).any(|w| {
            let ((a, ra), (b, rb)) = (w[0], w[1]);
            let per = ra / f64::from(a);
            rb - ra < SATURATION_GAIN * per * f64::from(b - a)
        });
        if !saturated {
            return None;
        }
        let best = counts.iter().map(|(_, r)| *r).fold(0.0, f64::max);
        counts
            .iter()
            .find(|(_, r)| *r >= 0.9 * best)
            .map(|(n, _)| (*n, best))
    }
}

/// The replica count for `now`, remembering what it needs in `memory`.
pub fn decide(settings: &Settings, now: &Observation, memory: &mut Memory) -> Decision {
    let partitions = now.lag.len().max(1) as i32;
    let ceiling = settings.max_replicas.min(partitions).max(0);
    let floor = settings.min_replicas.clamp(0, ceiling.max(0));
    let current = now.replicas;
    learn(now, memory);
    let stuck: Vec<usize> = memory
        .still_since
        .iter()
        .enumerate()
        .filter(|(_, since)| since.is_some_and(|s| now.at - s >= STUCK_AFTER))
        .map(|(p, _)| p)
        .collect();
    // The lag more replicas can do something about.
    let lag: i64 = now
        .lag
        .iter()
        .enumerate()
        .filter(|(p, _)| !stuck.contains(p))
        .map(|(_, l)| *l)
        .sum();

    if current == 0 {
        if lag <= settings.activation_lag && floor == 0 {
            return decision(
                0,
                Reason::Idle,
                format!(
                    "lag {lag} is within the activation lag {}: no workers",
                    settings.activation_lag
                ),
                stuck,
            );
        }
        if lag > settings.activation_lag {
            let wanted = keda_rule(lag, settings).clamp(floor.max(1), ceiling.max(1));
            return decision(
                wanted,
                Reason::Activated,
                format!(
                    "lag {lag} exceeds the activation lag {}: starting {wanted} worker(s)",
                    settings.activation_lag
                ),
                stuck,
            );
        }
    }

    let (mut wanted, mut reason, mut message) = match memory.per_replica {
        Some(per) if per > 0.0 => {
            let arrival = median(&memory.arrivals);
            let up = replicas_for(now, &stuck, arrival, per, settings, ceiling, 1.0);
            let down = replicas_for(now, &stuck, arrival, per, settings, ceiling, DOWN_HEADROOM);
            // Up for the demand; down only to a count that leaves headroom.
            let wanted = if up.replicas > current {
                up.replicas
            } else {
                down.replicas.min(current)
            };
            let reason = if up.partition_bound && wanted >= partitions {
                Reason::PartitionCount
            } else {
                Reason::Demand
            };
            (
                wanted,
                reason,
                format!(
                    "{arrival:.0} records/s arriving, lag {lag}, {per:.0} records/s per replica: {wanted} replica(s) drain {:.0} records/s, keeping up and clearing the backlog within {:.0}s{}",
                    up.demand,
                    settings.target_catch_up,
                    if up.partition_bound {
                        " as far as one replica per partition can"
                    } else {
                        ""
                    }
                ),
            )
        }
        // Nothing left to consume, nothing stuck and minReplicas 0: no worker is needed
        // (after the cooldown), measured or not. A backlog drained within one reading
        // leaves no busy interval to measure, and must not hold a worker for ever.
        _ if lag == 0 && stuck.is_empty() && floor == 0 => (
            0,
            Reason::Idle,
            "no lag and minReplicas 0: no workers".to_owned(),
        ),
        _ => {
            // KEDA's rule, per partition: a partition's lag is worth one replica at most.
            let per = settings.target_lag_per_replica.max(1) as f64;
            let wanted = now
                .lag
                .iter()
                .enumerate()
                .filter(|(p, _)| !stuck.contains(p))
                .map(|(_, l)| (*l as f64 / per).min(1.0))
                .sum::<f64>()
                .ceil() as i32;
            (
                wanted.max(current.min(1)),
                Reason::LagPerReplica,
                format!(
                    "no drain rate measured yet: lag {lag} at {} per replica, one replica per partition at most",
                    settings.target_lag_per_replica
                ),
            )
        }
    };
    if wanted >= current && current > 0 {
        match memory.saturation() {
            // More replicas than `enough` drained no faster: run `enough`, at once (the
            // extra ones are measured to do nothing).
            Some((enough, best)) if enough < wanted => {
                wanted = enough;
                reason = Reason::SinkSaturated;
                message = format!(
                    "more replicas stopped raising the drain rate ({best:.0} records/s at most, reached with {enough}): the bottleneck is past the workers (the sink, most often); running {enough}"
                );
            }
            // As the HPA: at most double (or 4 more), so the effect of more replicas is
            // measured before going further.
            _ => wanted = wanted.min((current * 2).max(current + 4)),
        }
    }
    if !stuck.is_empty() && wanted <= current && reason != Reason::SinkSaturated {
        let list: Vec<String> = stuck.iter().map(|p| p.to_string()).collect();
        reason = Reason::StuckPartition;
        message = format!(
            "partition(s) {} have not moved for {STUCK_AFTER:.0}s while workers run (a stuck record?): their lag does not count toward scaling; {message}",
            list.join(", ")
        );
    }
    if wanted > ceiling {
        (reason, message) = if ceiling < settings.max_replicas {
            (
                Reason::PartitionCount,
                format!(
                    "{wanted} replica(s) wanted; held at the {partitions} partition(s), the most that can consume"
                ),
            )
        } else {
            (
                Reason::MaxReplicas,
                format!(
                    "{wanted} replica(s) wanted; held at maxReplicas {}",
                    settings.max_replicas
                ),
            )
        };
        wanted = ceiling;
    }
    wanted = wanted.max(floor);
    if wanted < current && reason != Reason::SinkSaturated {
        let since = *memory.lower_since.get_or_insert(now.at);
        if now.at - since < settings.cooldown {
            return decision(
                current,
                Reason::Cooldown,
                format!(
                    "{wanted} replica(s) would do; scaling down after {:.0}s of that ({:.0}s so far)",
                    settings.cooldown,
                    now.at - since
                ),
                stuck,
            );
        }
        // By at most half at a time; a restarted cooldown before the next step.
        wanted = wanted.max(current / 2).max(floor);
        memory.lower_since = None;
    } else {
        memory.lower_since = None;
    }
    decision(wanted, reason, message, stuck)
}

/// Replicas that work in parallel when `replicas` share `partitions` evenly: the busiest
/// has `ceil(partitions / replicas)` of them, so 6 replicas on 10 partitions do what 5 do.
fn effective(replicas: i32, partitions: i32) -> f64 {
    let replicas = replicas.clamp(1, partitions.max(1));
    let busiest = (partitions + replicas - 1) / replicas;
    f64::from(partitions) / f64::from(busiest)
}

/// A replica count for a demand.
struct Need {
    replicas: i32,
    /// Records/s to drain: the arrivals plus the backlog over the catch-up time.
    demand: f64,
    /// Some partition needs more than one replica drains: the backlog cannot clear in time.
    partition_bound: bool,
}

/// The fewest replicas whose busiest one keeps up with its partitions' share of the
/// arrivals plus their backlog over the catch-up time (times `headroom`); a partition's
/// demand counts up to what one replica drains, since only one replica consumes it.
fn replicas_for(
    now: &Observation,
    stuck: &[usize],
    arrival: f64,
    per: f64,
    settings: &Settings,
    ceiling: i32,
    headroom: f64,
) -> Need {
    let partitions = now.lag.len().max(1) as i32;
    let share = arrival / f64::from(partitions);
    let uncapped: Vec<f64> = now
        .lag
        .iter()
        .enumerate()
        .filter(|(p, _)| !stuck.contains(p))
        .map(|(_, l)| (share + *l as f64 / settings.target_catch_up) * headroom)
        .collect();
    let partition_bound = uncapped.iter().any(|d| *d > per);
    let total: f64 = uncapped.iter().map(|d| d.min(per)).sum();
    if total <= 0.0 {
        return Need {
            replicas: 0,
            demand: 0.0,
            partition_bound,
        };
    }
    let mean = total / uncapped.len().max(1) as f64;
    let replicas = (1..=ceiling.max(1))
        .find(|n| {
            let busiest = f64::from((partitions + n - 1) / n);
            busiest * mean <= per * 1.0001 && f64::from(*n) * per >= total * 0.9999
        })
        .unwrap_or(ceiling.max(1) + 1);
    Need {
        replicas,
        demand: total / headroom,
        partition_bound,
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// KEDA's Kafka rule: `ceil(lag / lagThreshold)`.
pub fn keda_rule(lag: i64, settings: &Settings) -> i32 {
    let per = settings.target_lag_per_replica.max(1);
    i32::try_from((lag.max(0) + per - 1) / per).unwrap_or(i32::MAX)
}

fn decision(replicas: i32, reason: Reason, message: String, stuck: Vec<usize>) -> Decision {
    Decision {
        replicas,
        reason,
        message,
        stuck,
    }
}

/// Takes in a reading: the drain rate at this replica count when the replicas were busy,
/// the smoothed arrival rate, and which partitions stand still.
fn learn(now: &Observation, memory: &mut Memory) {
    if let Some(arrival) = now.arrival_rate {
        memory.arrivals.push(arrival);
        if memory.arrivals.len() > 3 {
            memory.arrivals.remove(0);
        }
    }
    memory.still_since.resize(now.lag.len(), None);
    for (p, since) in memory.still_since.iter_mut().enumerate() {
        let lag = now.lag[p];
        let moved = now.drained.get(p).copied().unwrap_or(0.0) > 0.0;
        let still = now.replicas > 0
            && lag > 0
            && !moved
            && !now.drained.is_empty()
            && memory.last_lag.get(p).is_some_and(|last| *last > 0);
        *since = match (still, *since) {
            (true, Some(s)) => Some(s),
            (true, None) => Some(now.at),
            (false, _) => None,
        };
    }
    // Busy: at both ends of the interval (the end only, on the first reading), at least
    // half the partitions that move had more than a second of their own work queued; the
    // drain rate then measured what the replicas can do, not what arrived (nor what one
    // slow partition gives).
    let queued = |lag: &[i64]| {
        let moving: Vec<usize> = (0..lag.len())
            .filter(|p| memory.still_since.get(*p).is_none_or(|s| s.is_none()))
            .collect();
        let busy = moving
            .iter()
            .filter(|p| lag[**p] as f64 > now.drained.get(**p).copied().unwrap_or(0.0).max(1.0))
            .count();
        !moving.is_empty() && 2 * busy >= moving.len()
    };
    let busy = !now.drained.is_empty()
        && queued(&now.lag)
        && (memory.last_lag.len() != now.lag.len() || queued(&memory.last_lag));
    memory
        .busy_drain
        .retain(|_, (_, at)| now.at - *at <= FORGET_AFTER);
    if let (true, Some(drain)) = (busy && now.replicas > 0, now.drain_rate()) {
        let entry = memory
            .busy_drain
            .entry(now.replicas)
            .or_insert((drain, now.at));
        *entry = (entry.0 + SMOOTHING * (drain - entry.0), now.at);
        let partitions = now.lag.len().max(1) as i32;
        memory.per_replica = memory
            .busy_drain
            .iter()
            .map(|(n, (rate, _))| rate / effective(*n, partitions))
            .reduce(f64::max);
    }
    memory.last_lag = now.lag.clone();
}

#[cfg(test)]
mod tests {
    //! The policy against a model of a pipeline, and the same inputs through KEDA's rule as
    //! KEDA and the HPA apply it: KEDA reads the lag every 30 s (its default polling
    //! interval), the HPA acts every 15 s on `ceil(lag / lagThreshold)` with its 10 %
    //! tolerance, its scale-up limit (double or 4 more per step) and its 5-minute
    //! scale-down stabilization; 0 → 1 when the lag exceeds the activation threshold, back
    //! to 0 after KEDA's 5-minute cooldown.
    //!
    //! The model: each partition is consumed by one replica (`p % replicas`); a replica
    //! drains up to `per_replica` records/s shared among its partitions with work, one
    //! partition at most `per_partition`; the sink takes at most `sink` records/s in all; a
    //! stuck partition drains nothing. Decisions take effect for the next 5 s interval.

    use super::*;

    const TICK: f64 = 5.0;

    #[derive(Clone)]
    struct World {
        per_replica: f64,
        per_partition: Vec<f64>,
        sink: f64,
        lag: Vec<f64>,
        stuck: Option<usize>,
    }

    impl World {
        fn new(partitions: usize) -> Self {
            World {
                per_replica: 100.0,
                per_partition: vec![100.0; partitions],
                sink: f64::INFINITY,
                lag: vec![0.0; partitions],
                stuck: None,
            }
        }

        fn backlog(mut self, total: f64) -> Self {
            let n = self.lag.len() as f64;
            self.lag.iter_mut().for_each(|l| *l += total / n);
            self
        }

        /// Runs one interval; returns the drain rate per partition.
        fn run(&mut self, replicas: i32, arrival: &[f64]) -> Vec<f64> {
            let n = self.lag.len();
            let mut drained = vec![0.0; n];
            let replicas = replicas.max(0) as usize;
            for r in 0..replicas {
                let mut demand: Vec<(usize, f64)> = (0..n)
                    .filter(|p| p % replicas == r && Some(*p) != self.stuck)
                    .map(|p| {
                        (
                            p,
                            (self.lag[p] / TICK + arrival[p]).min(self.per_partition[p]),
                        )
                    })
                    .collect();
                demand.sort_by(|a, b| a.1.total_cmp(&b.1));
                let mut capacity = self.per_replica;
                let mut left = demand.len();
                for (p, want) in demand {
                    let take = want.min(capacity / left as f64);
                    drained[p] = take;
                    capacity -= take;
                    left -= 1;
                }
            }
            let total: f64 = drained.iter().sum();
            if total > self.sink {
                let k = self.sink / total;
                drained.iter_mut().for_each(|d| *d *= k);
            }
            for p in 0..n {
                self.lag[p] = (self.lag[p] + (arrival[p] - drained[p]) * TICK).max(0.0);
            }
            drained
        }

        /// The lag more replicas can drain (a stuck partition's left out).
        fn drainable_lag(&self) -> f64 {
            self.lag
                .iter()
                .enumerate()
                .filter(|(p, _)| Some(*p) != self.stuck)
                .map(|(_, l)| l)
                .sum()
        }
    }

    /// What a scaler did over a run.
    #[derive(Debug)]
    struct Run {
        /// Replicas in each interval.
        replicas: Vec<i32>,
        changes: usize,
        /// Seconds until the drainable lag fell to one interval of arrivals for good.
        backlog_free_at: Option<f64>,
        reasons: Vec<Reason>,
    }

    impl Run {
        /// The replicas as `count×seconds` runs, for failure messages.
        fn shape(&self) -> String {
            let mut out = Vec::new();
            let mut i = 0;
            while i < self.replicas.len() {
                let r = self.replicas[i];
                let j = (i..self.replicas.len())
                    .find(|j| self.replicas[*j] != r)
                    .unwrap_or(self.replicas.len());
                out.push(format!("{r}x{}s", (j - i) as f64 * TICK));
                i = j;
            }
            format!(
                "{} (backlog-free at {:?})",
                out.join(" "),
                self.backlog_free_at
            )
        }

        fn max(&self) -> i32 {
            self.replicas.iter().copied().max().unwrap_or(0)
        }

        fn replica_seconds(&self) -> f64 {
            self.replicas.iter().map(|r| f64::from(*r) * TICK).sum()
        }

        fn after(&self, seconds: f64) -> &[i32] {
            &self.replicas[(seconds / TICK) as usize..]
        }
    }

    /// KEDA's Kafka scaler and the HPA, as they treat the same readings.
    struct Keda {
        settings: Settings,
        metric: i64,
        recommendations: Vec<(f64, i32)>,
        last_active: f64,
    }

    impl Keda {
        fn new(settings: &Settings) -> Self {
            Keda {
                settings: settings.clone(),
                metric: 0,
                recommendations: Vec::new(),
                last_active: 0.0,
            }
        }

        fn decide(&mut self, now: &Observation) -> i32 {
            let s = &self.settings;
            let current = now.replicas;
            let at = now.at;
            if (at % 30.0).abs() < 1e-9 {
                self.metric = now.total_lag();
            }
            let active = self.metric > s.activation_lag;
            if active {
                self.last_active = at;
            }
            let ceiling = s.max_replicas.min(now.lag.len() as i32);
            if current == 0 {
                return i32::from(active).max(s.min_replicas);
            }
            if !active && s.min_replicas == 0 && at - self.last_active >= 300.0 {
                return 0;
            }
            if (at % 15.0).abs() > 1e-9 {
                return current;
            }
            let ratio = self.metric as f64 / (f64::from(current) * s.target_lag_per_replica as f64);
            let mut desired = if (ratio - 1.0).abs() <= 0.1 {
                current
            } else {
                keda_rule(self.metric, s)
            };
            desired = desired.clamp(s.min_replicas.max(1), ceiling);
            desired = desired.min((current * 2).max(current + 4));
            self.recommendations.push((at, desired));
            self.recommendations.retain(|(t, _)| at - t < 300.0);
            if desired < current {
                desired = self
                    .recommendations
                    .iter()
                    .map(|(_, r)| *r)
                    .max()
                    .unwrap_or(desired)
                    .min(current);
            }
            desired
        }
    }

    /// Runs `seconds` of `world` under `arrival` (records/s per partition at a time) with
    /// `scaler` choosing the replicas, starting from `start`.
    fn simulate(
        mut world: World,
        arrival: &dyn Fn(f64) -> Vec<f64>,
        seconds: f64,
        start: i32,
        scaler: &mut dyn FnMut(&Observation) -> (i32, Option<Reason>),
    ) -> Run {
        let mut replicas = start;
        let mut run = Run {
            replicas: Vec::new(),
            changes: 0,
            backlog_free_at: None,
            reasons: Vec::new(),
        };
        let mut t = 0.0;
        while t < seconds {
            let rates = arrival(t);
            let drained = world.run(replicas, &rates);
            t += TICK;
            run.replicas.push(replicas);
            let arriving: f64 = rates.iter().sum();
            if world.drainable_lag() <= (arriving * TICK).max(100.0) {
                run.backlog_free_at.get_or_insert(t);
            } else {
                run.backlog_free_at = None;
            }
            let now = Observation {
                at: t,
                replicas,
                lag: world.lag.iter().map(|l| l.round() as i64).collect(),
                drained,
                arrival_rate: Some(arriving),
            };
            let (next, reason) = scaler(&now);
            run.reasons.extend(reason);
            if next != replicas {
                run.changes += 1;
                replicas = next;
            }
        }
        run
    }

    /// The policy and KEDA over the same world and load.
    fn both(
        settings: &Settings,
        world: &World,
        arrival: &dyn Fn(f64) -> Vec<f64>,
        seconds: f64,
        start: i32,
    ) -> (Run, Run) {
        let mut memory = Memory::default();
        let weir = simulate(world.clone(), arrival, seconds, start, &mut |now| {
            let d = decide(settings, now, &mut memory);
            (d.replicas, Some(d.reason))
        });
        let mut keda = Keda::new(settings);
        let lag_rule = simulate(world.clone(), arrival, seconds, start, &mut |now| {
            (keda.decide(now), None)
        });
        (weir, lag_rule)
    }

    fn even(total: f64, partitions: usize) -> Vec<f64> {
        vec![total / partitions as f64; partitions]
    }

    /// The comparison every scenario makes: backlog-free no later, no more replica changes.
    fn no_worse(weir: &Run, keda: &Run) {
        let time = |r: &Run| r.backlog_free_at.unwrap_or(f64::INFINITY);
        assert!(
            time(weir) <= time(keda),
            "backlog-free at {:?} vs KEDA's {:?}\npolicy {}\nKEDA {}",
            weir.backlog_free_at,
            keda.backlog_free_at,
            weir.shape(),
            keda.shape()
        );
        assert!(
            weir.changes <= keda.changes,
            "{} replica changes vs KEDA's {}\npolicy {}\nKEDA {}",
            weir.changes,
            keda.changes,
            weir.shape(),
            keda.shape()
        );
    }

    #[test]
    fn step_load_is_met_and_the_backlog_cleared_where_the_lag_rule_keeps_one() {
        let settings = Settings::default();
        let load = |t: f64| even(if t < 60.0 { 50.0 } else { 600.0 }, 10);
        let (weir, keda) = both(&settings, &World::new(10), &load, 1200.0, 1);
        no_worse(&weir, &keda);
        assert!(
            weir.backlog_free_at
                .is_some_and(|t| t <= 60.0 + 60.0 + 30.0),
            "{}",
            weir.shape()
        );
        // The lag rule holds replicas only while there is lag: it never clears the backlog.
        assert!(keda.backlog_free_at.is_none(), "{}", keda.shape());
        assert!(
            weir.after(300.0).iter().all(|r| *r >= 6),
            "{}",
            weir.shape()
        );
    }

    #[test]
    fn a_ramp_is_followed_without_a_standing_backlog() {
        let settings = Settings::default();
        let load = |t: f64| even((t * 800.0 / 600.0).min(800.0), 10);
        let (weir, keda) = both(&settings, &World::new(10), &load, 1200.0, 1);
        no_worse(&weir, &keda);
        assert!(weir.backlog_free_at.is_some(), "{}", weir.shape());
    }

    #[test]
    fn a_burst_then_idle_scales_up_at_once_and_down_by_halves_after_the_cooldown() {
        let settings = Settings::default();
        let world = World::new(10).backlog(200_000.0);
        let load = |_: f64| even(20.0, 10);
        let (weir, keda) = both(&settings, &world, &load, 1500.0, 1);
        no_worse(&weir, &keda);
        assert!(
            weir.backlog_free_at < keda.backlog_free_at,
            "{}\n{}",
            weir.shape(),
            keda.shape()
        );
        // Up within two readings; down only after the cooldown, each step at most half.
        assert_eq!(weir.max(), 10);
        assert!(weir.replicas[..3].contains(&5), "{}", weir.shape());
        let freed = weir.backlog_free_at.unwrap_or_default();
        let steps: Vec<(i32, i32)> = weir
            .replicas
            .windows(2)
            .filter(|w| w[1] < w[0])
            .map(|w| (w[0], w[1]))
            .collect();
        assert!(steps.iter().all(|(a, b)| *b >= a / 2), "{steps:?}");
        let first_down = weir.replicas.windows(2).position(|w| w[1] < w[0]);
        assert!(
            first_down.is_some_and(|i| (i as f64 + 1.0) * TICK >= freed.min(200.0) + 250.0 - TICK),
            "{:?}",
            weir.replicas
        );
        assert_eq!(weir.replicas.last(), Some(&1));
    }

    #[test]
    fn one_slow_partition_gets_its_replica_and_no_more() {
        // Partition 0 drains at 20 records/s whatever runs it (slow records); one replica
        // has room for it and for the other partitions' arrivals.
        let settings = Settings::default();
        let mut world = World::new(10);
        world.per_partition[0] = 20.0;
        world.lag[0] = 20_000.0;
        let load = |_: f64| even(50.0, 10);
        let (weir, keda) = both(&settings, &world, &load, 2400.0, 1);
        no_worse(&weir, &keda);
        assert!(weir.backlog_free_at.is_some(), "{}", weir.shape());
        // The lag rule runs more replicas for the one partition only one can drain.
        assert!(keda.max() >= 2, "{}", keda.shape());
        assert_eq!(weir.max(), 1, "{}", weir.shape());
        assert!(weir.replica_seconds() < 0.8 * keda.replica_seconds());
    }

    #[test]
    fn the_partition_count_caps_the_replicas() {
        let settings = Settings::default();
        let world = World::new(4).backlog(400_000.0);
        let load = |_: f64| even(100.0, 4);
        let (weir, keda) = both(&settings, &world, &load, 1800.0, 1);
        no_worse(&weir, &keda);
        assert_eq!(weir.max(), 4);
        assert!(
            weir.reasons.contains(&Reason::PartitionCount),
            "{:?}",
            weir.reasons
        );
    }

    #[test]
    fn scales_to_zero_when_idle_and_activates_within_one_reading() {
        let settings = Settings {
            min_replicas: 0,
            activation_lag: 100,
            ..Settings::default()
        };
        let world = World::new(10);
        let load = |t: f64| {
            even(
                if (120.0..125.0).contains(&t) {
                    1000.0
                } else {
                    0.0
                },
                10,
            )
        };
        let (weir, keda) = both(&settings, &world, &load, 1200.0, 0);
        no_worse(&weir, &keda);
        // The backlog appears in the interval ending at 125 s; the decision of that
        // reading runs a worker in the next interval.
        let first = weir
            .replicas
            .iter()
            .position(|r| *r > 0)
            .map(|i| i as f64 * TICK);
        assert_eq!(first, Some(125.0), "{}", weir.shape());
        let keda_first = keda
            .replicas
            .iter()
            .position(|r| *r > 0)
            .map(|i| i as f64 * TICK);
        assert!(keda_first > first, "{keda_first:?}");
        assert!(weir.replicas[..24].iter().all(|r| *r == 0));
        assert_eq!(weir.replicas.last(), Some(&0));
        assert!(weir.reasons.contains(&Reason::Activated) && weir.reasons.contains(&Reason::Idle));
    }

    #[test]
    fn a_backlog_drained_within_one_reading_still_scales_back_to_zero() {
        // Drained before any interval was busy: no drain rate per replica is ever measured.
        let settings = Settings {
            min_replicas: 0,
            max_replicas: 2,
            target_lag_per_replica: 1000,
            cooldown: 10.0,
            ..Settings::default()
        };
        let mut memory = Memory::default();
        let at = |t: f64, replicas: i32, lag: Vec<i64>, drained: Vec<f64>| Observation {
            at: t,
            replicas,
            lag,
            drained,
            arrival_rate: Some(0.0),
        };
        let first = decide(
            &settings,
            &at(0.0, 0, vec![2500, 2500], vec![]),
            &mut memory,
        );
        assert_eq!((first.replicas, first.reason), (2, Reason::Activated));
        let mut replicas = 2;
        let mut counts = vec![replicas];
        for tick in 1..=10 {
            let t = f64::from(tick) * 5.0;
            let drained = if tick == 1 {
                vec![500.0, 500.0]
            } else {
                vec![0.0, 0.0]
            };
            let d = decide(
                &settings,
                &at(t, replicas, vec![0, 0], drained),
                &mut memory,
            );
            assert!(memory.per_replica.is_none(), "nothing was measured busy");
            if d.replicas != replicas {
                counts.push(d.replicas);
            }
            replicas = d.replicas;
        }
        // Down by halves, each after the cooldown: 2 → 1 → 0.
        assert_eq!(counts, vec![2, 1, 0]);
        let idle = decide(
            &settings,
            &at(55.0, 0, vec![0, 0], vec![0.0, 0.0]),
            &mut memory,
        );
        assert_eq!((idle.replicas, idle.reason), (0, Reason::Idle));
    }

    #[test]
    fn a_constant_noisy_load_does_not_flap() {
        let settings = Settings::default();
        let mut rng = fastrand::Rng::with_seed(7);
        let noise: Vec<f64> = (0..400).map(|_| 0.85 + 0.3 * rng.f64()).collect();
        let load = move |t: f64| even(350.0 * noise[(t / TICK) as usize % noise.len()], 10);
        let (weir, keda) = both(&settings, &World::new(10), &load, 1800.0, 4);
        no_worse(&weir, &keda);
        assert!(weir.changes <= 1, "{}", weir.shape());
        let settled = weir.after(60.0);
        assert!(
            settled.iter().all(|r| *r == settled[0]),
            "{:?}",
            weir.replicas
        );
    }

    #[test]
    fn a_saturated_sink_stops_the_scale_up_where_the_lag_rule_goes_to_the_maximum() {
        let settings = Settings::default();
        let mut world = World::new(10).backlog(150_000.0);
        world.sink = 500.0;
        let load = |_: f64| even(200.0, 10);
        let (weir, keda) = both(&settings, &world, &load, 1800.0, 1);
        no_worse(&weir, &keda);
        assert!(
            weir.reasons.contains(&Reason::SinkSaturated),
            "{}\n{}",
            weir.shape(),
            keda.shape()
        );
        // Once measured, never more than the sink can use; the lag rule holds the maximum.
        assert!(
            weir.after(30.0).iter().all(|r| *r <= 5),
            "{:?}",
            weir.replicas
        );
        assert_eq!(keda.max(), 10);
        assert!(
            weir.replica_seconds() < 0.9 * keda.replica_seconds(),
            "{}\n{}",
            weir.shape(),
            keda.shape()
        );
    }

    #[test]
    fn a_stuck_partition_is_reported_and_not_scaled_for() {
        let settings = Settings::default();
        let mut world = World::new(10);
        world.stuck = Some(3);
        world.lag[3] = 20_000.0;
        let load = |_: f64| even(200.0, 10);
        let (weir, keda) = both(&settings, &world, &load, 1800.0, 2);
        no_worse(&weir, &keda);
        assert!(
            weir.reasons.contains(&Reason::StuckPartition),
            "{:?}",
            weir.reasons
        );
        assert!(weir.max() <= 3, "{}\n{:?}", weir.shape(), weir.reasons);
        assert!(keda.max() > weir.max() + 2, "{}", keda.shape());
        let mut memory = Memory::default();
        let mut last = None;
        simulate(world, &load, 60.0, 2, &mut |now| {
            let d = decide(&settings, now, &mut memory);
            last = Some(d.clone());
            (d.replicas, None)
        });
        assert_eq!(last.map(|d| d.stuck), Some(vec![3]));
    }

    #[test]
    fn keda_rule_is_ceil_of_lag_over_the_threshold() {
        let s = Settings::default();
        assert_eq!(keda_rule(0, &s), 0);
        assert_eq!(keda_rule(1, &s), 1);
        assert_eq!(keda_rule(10_000, &s), 1);
        assert_eq!(keda_rule(10_001, &s), 2);
    }
}
