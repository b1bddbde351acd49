//! Retry classification and exponential backoff with jitter.

use std::time::Duration;

use weir_crds::Retry;

/// How a failure should be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The destination cannot be reached (connection refused or lost, pool timed out):
    /// retried without limit, and the worker reports not-ready meanwhile. Dead-lettering
    /// every record during an outage would empty the topic into the dead-letter topic.
    Unavailable,
    /// A failure that may pass (deadlock, serialization failure): retried up to
    /// `retry.attempts` tries, then treated as permanent.
    Transient,
    /// The record itself is refused (undecodable, constraint violation, bad value): never
    /// retried; it goes to the dead-letter topic.
    Permanent,
    /// The pipeline's configuration does not fit the destination (no such table or
    /// column): nothing can succeed until the spec or the schema changes.
    Fatal,
}

impl ErrorClass {
    /// A bounded label for metrics and dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// Exponential backoff: `initial * multiplier^(attempt-1)`, capped at `max`, with up to
/// `jitter` of each wait drawn at random.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub attempts: u32,
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: f64,
}

impl Backoff {
    /// From a validated spec (invalid durations fall back to the defaults).
    pub fn from_spec(retry: &Retry) -> Self {
        Self {
            attempts: retry.attempts.max(1) as u32,
            initial: retry
                .initial_backoff
                .parse()
                .unwrap_or(Duration::from_millis(200)),
            max: retry.max_backoff.parse().unwrap_or(Duration::from_secs(30)),
            multiplier: retry.multiplier.max(1.0),
            jitter: retry.jitter.clamp(0.0, 1.0),
        }
    }

    /// The wait after failed try number `attempt` (1-based). `random` is in [0, 1).
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(60) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max.as_secs_f64());
        let jittered = capped * (1.0 - self.jitter * random);
        Duration::from_secs_f64(jittered.max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(jitter: f64) -> Backoff {
        Backoff {
            attempts: 5,
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            jitter,
        }
    }

    #[test]
    fn doubles_from_the_initial_wait_up_to_the_cap() {
        let b = backoff(0.0);
        let waits: Vec<u128> = (1..=5).map(|a| b.delay(a, 0.5).as_millis()).collect();
        assert_eq!(waits, vec![200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let b = backoff(0.2);
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(200));
        let shortest = b.delay(1, 0.999_999);
        assert!(shortest >= Duration::from_millis(160) && shortest < Duration::from_millis(161));
    }
}
