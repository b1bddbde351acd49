//! Retry classification, exponential backoff with jitter, and the one retry loop every
//! caller (sink writes, sink preparation, dead-letter produces) runs under.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use weir_crds::Retry;

use crate::metrics::Metrics;
use crate::sink::SinkError;

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

/// How long [`Retrier::run`] keeps trying failures that are neither fatal nor an outage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Up to `retry.attempts` tries in all; then the failure is given back.
    Attempts,
    /// Until it succeeds (or shutdown): for work that must happen before the batch's
    /// offsets move, such as producing a dead letter.
    Succeeded,
}

/// The result of an operation run under the retry policy.
#[derive(Debug)]
pub struct Tried<T> {
    /// The value, or the last failure once [`Limit::Attempts`] tries were made.
    pub outcome: Result<T, SinkError>,
    /// Tries made, the successful one included.
    pub attempts: u32,
    /// When the first try failed; `None` when it succeeded.
    pub first_failure: Option<SystemTime>,
}

/// Why [`Retrier::run`] stopped trying without an outcome.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// The failure cannot pass by retrying (the spec does not fit the destination).
    #[error("{0}")]
    Fatal(SinkError),
    /// Shutdown was asked for while the operation was still failing.
    #[error("stopped while retrying {what}")]
    Shutdown { what: String },
}

/// Runs operations under the pipeline's retry policy: unavailable destinations are retried
/// without limit (the worker reports not-ready meanwhile), other failures up to the
/// [`Limit`], fatal ones not at all; waits follow the backoff and end early on shutdown.
#[derive(Clone, Debug)]
pub struct Retrier {
    backoff: Backoff,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
}

impl Retrier {
    pub fn new(backoff: Backoff, shutdown: watch::Receiver<bool>, metrics: Arc<Metrics>) -> Self {
        Self {
            backoff,
            shutdown,
            metrics,
        }
    }

    /// Tries `op` until it succeeds, fails fatally, or `limit` is reached; `what` names it
    /// in logs and metrics (a sink's name, "the dead-letter topic").
    pub async fn run<T, Fut>(
        &self,
        what: &str,
        limit: Limit,
        mut op: impl FnMut() -> Fut,
    ) -> Result<Tried<T>, Stopped>
    where
        Fut: Future<Output = Result<T, SinkError>>,
    {
        let mut attempt = 1u32;
        let mut first_failure = None;
        loop {
            let e = match op().await {
                Ok(value) => {
                    self.metrics.set_reachable(what, true);
                    self.metrics.set_ready(true);
                    return Ok(Tried {
                        outcome: Ok(value),
                        attempts: attempt,
                        first_failure,
                    });
                }
                Err(e) => e,
            };
            first_failure.get_or_insert_with(SystemTime::now);
            match e.class {
                ErrorClass::Fatal => return Err(Stopped::Fatal(e)),
                ErrorClass::Transient | ErrorClass::Permanent
                    if limit == Limit::Attempts && attempt >= self.backoff.attempts =>
                {
                    tracing::warn!(%what, attempts = attempt, error = %e.message, "giving up");
                    return Ok(Tried {
                        outcome: Err(e),
                        attempts: attempt,
                        first_failure,
                    });
                }
                class => {
                    if class == ErrorClass::Unavailable {
                        self.metrics.set_reachable(what, false);
                    }
                    tracing::warn!(%what, attempt, class = class.as_str(), error = %e.message, "failed; retrying");
                    self.metrics.retried(what);
                    self.pause(attempt, what).await?;
                    attempt += 1;
                }
            }
        }
    }

    /// Waits out the backoff after failed try `attempt`, unless shutdown is asked for.
    async fn pause(&self, attempt: u32, what: &str) -> Result<(), Stopped> {
        let delay = self.backoff.delay(attempt, fastrand::f64());
        let mut shutdown = self.shutdown.clone();
        let stopped = || Stopped::Shutdown {
            what: what.to_owned(),
        };
        if *shutdown.borrow() {
            return Err(stopped());
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = shutdown.changed() => Err(stopped()),
        }
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

    fn retrier(attempts: u32) -> (Retrier, watch::Sender<bool>, Arc<Metrics>) {
        let (stop, shutdown) = watch::channel(false);
        let metrics = Metrics::new("p");
        let backoff = Backoff {
            attempts,
            ..backoff(0.0)
        };
        (
            Retrier::new(backoff, shutdown, metrics.clone()),
            stop,
            metrics,
        )
    }

    fn failure(class: ErrorClass) -> SinkError {
        SinkError::new(class, class.as_str())
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_tried_up_to_the_attempts_and_counted() {
        let (retrier, _stop, _) = retrier(3);
        let mut calls = 0;
        let tried = retrier
            .run("s", Limit::Attempts, || {
                calls += 1;
                async { Err::<(), _>(failure(ErrorClass::Transient)) }
            })
            .await
            .expect("not stopped");
        assert_eq!(calls, 3);
        assert_eq!(tried.attempts, 3);
        assert!(tried.outcome.is_err());
        assert!(tried.first_failure.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_retried_past_the_attempts_and_marks_the_worker_not_ready() {
        let (retrier, _stop, metrics) = retrier(2);
        let mut calls = 0;
        let tried = retrier
            .run("s", Limit::Attempts, || {
                calls += 1;
                assert!(calls == 1 || !metrics.is_ready());
                let result = if calls < 6 {
                    Err(failure(ErrorClass::Unavailable))
                } else {
                    Ok(calls)
                };
                async move { result }
            })
            .await
            .expect("not stopped");
        assert_eq!(tried.outcome, Ok(6));
        assert_eq!(tried.attempts, 6);
        assert!(metrics.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_failure_stops_at_once_and_success_first_time_has_no_failure_time() {
        let (retrier, _stop, _) = retrier(5);
        let stopped = retrier
            .run("s", Limit::Succeeded, || async {
                Err::<(), _>(failure(ErrorClass::Fatal))
            })
            .await;
        assert!(matches!(stopped, Err(Stopped::Fatal(_))));
        let tried = retrier
            .run("s", Limit::Attempts, || async { Ok::<_, SinkError>(()) })
            .await
            .expect("not stopped");
        assert_eq!((tried.attempts, tried.first_failure), (1, None));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_wait_between_tries() {
        let (retrier, stop, _) = retrier(5);
        let run = retrier.run("the sink", Limit::Succeeded, || async {
            Err::<(), _>(failure(ErrorClass::Transient))
        });
        let (stopped, _) = tokio::join!(run, async { stop.send(true) });
        assert!(
            matches!(stopped, Err(Stopped::Shutdown { ref what }) if what == "the sink"),
            "{stopped:?}"
        );
    }
}
