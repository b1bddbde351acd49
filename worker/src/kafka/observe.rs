//! What librdkafka reports about the connection, turned into a cause a user can act on,
//! and logged so that an outage costs a few lines instead of dozens a second.
//!
//! librdkafka retries a broker it cannot reach or authenticate with forever, reporting
//! every attempt (an error event, often a log line too). [`Observer`] is the client
//! context of every Weir client: it classifies each report ([`Cause`]), remembers the
//! last one (the operator's KafkaConnection status comes from it), and logs through a
//! [`Throttle`]: the first failure at once, then at most one line per interval with the
//! count of the failures in between, and one line when the connection works again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message as _, Statistics};

/// How often a continuing outage is logged again.
pub const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Why a client cannot work with the brokers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cause {
    /// SASL authentication failed: a wrong user name, password or mechanism.
    Authentication,
    /// The TLS handshake failed: an unknown CA, an expired or rejected certificate, a
    /// missing client certificate, or TLS against a listener that does not speak it.
    Tls,
    /// No broker answers: down, a wrong address, a network policy.
    Unreachable,
    /// Anything else librdkafka reports.
    Other,
}

impl Cause {
    /// The condition reason (`KafkaConnection` status, worker logs).
    pub fn reason(self) -> &'static str {
        match self {
            Cause::Authentication => "AuthenticationFailed",
            Cause::Tls => "TlsHandshakeFailed",
            Cause::Unreachable => "Unreachable",
            Cause::Other => "KafkaError",
        }
    }

    /// What to check, in words.
    pub fn advice(self) -> &'static str {
        match self {
            Cause::Authentication => {
                "SASL authentication failed: check the user name, the password and the mechanism (spec.sasl)"
            }
            Cause::Tls => {
                "the TLS handshake failed: check the CA (spec.tls.caCert), the client certificate and key (spec.tls.clientCert, clientKey) and that the listener speaks TLS"
            }
            Cause::Unreachable => {
                "no broker answers: check spec.bootstrapServers and that the brokers are up and reachable"
            }
            Cause::Other => "the Kafka client reported an error",
        }
    }

    /// How much a cause says: a specific one (credentials, certificates) more than
    /// "unreachable", which says more than anything else.
    fn rank(self) -> u8 {
        match self {
            Cause::Authentication | Cause::Tls => 2,
            Cause::Unreachable => 1,
            Cause::Other => 0,
        }
    }

    /// Whether retrying cannot help until something is changed (credentials,
    /// certificates).
    pub fn needs_a_change(self) -> bool {
        matches!(self, Cause::Authentication | Cause::Tls)
    }

    /// The cause of a librdkafka error code and its text.
    pub fn classify(code: Option<RDKafkaErrorCode>, text: &str) -> Cause {
        let lower = text.to_ascii_lowercase();
        match code {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                Cause::Authentication
            }
            Some(RDKafkaErrorCode::SSL) => Cause::Tls,
            _ if lower.contains("sasl authentication") => Cause::Authentication,
            _ if lower.contains("ssl")
                || lower.contains("tls")
                || lower.contains("certificate") =>
            {
                Cause::Tls
            }
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::MessageTimedOut,
            ) => Cause::Unreachable,
            _ if lower.contains("connect") || lower.contains("disconnected") => Cause::Unreachable,
            _ => Cause::Other,
        }
    }
}

/// A classified failure: the cause and librdkafka's own words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub cause: Cause,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.cause.advice(), self.detail)
    }
}

/// What the throttle lets through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ThrottleReport {
    /// The first failure of an outage, or a new cause.
    First,
    /// The outage goes on: `suppressed` failures were not logged since the last line.
    Again { suppressed: u64, lasting: Duration },
    /// The connection works again after `failures` failures over `lasted`.
    Recovered { failures: u64, lasted: Duration },
}

#[derive(Clone, Debug)]
struct Outage {
    since: Instant,
    logged: Instant,
    cause: Cause,
    suppressed: u64,
    failures: u64,
}

/// Decides which failure reports become log lines (pure; tested with synthetic times).
#[derive(Clone, Debug)]
pub struct Throttle {
    interval: Duration,
    outage: Option<Outage>,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            outage: None,
        }
    }

    /// A failure at `now`: log it (and how) or not.
    pub fn failure(&mut self, cause: Cause, now: Instant) -> Option<ThrottleReport> {
        match &mut self.outage {
            None => {
                self.outage = Some(Outage {
                    since: now,
                    logged: now,
                    cause,
                    suppressed: 0,
                    failures: 1,
                });
                Some(ThrottleReport::First)
            }
            Some(outage) => {
                outage.failures += 1;
                // A more specific cause is news; the "all brokers are down" that follows a
                // failed handshake is not.
                if outage.cause != cause && cause.rank() >= outage.cause.rank() {
                    outage.cause = cause;
                    outage.logged = now;
                    outage.suppressed = 0;
                    return Some(ThrottleReport::First);
                }
                if now.duration_since(outage.logged) >= self.interval {
                    let suppressed = outage.suppressed;
                    outage.logged = now;
                    outage.suppressed = 0;
                    return Some(ThrottleReport::Again {
                        suppressed,
                        lasting: now.duration_since(outage.since),
                    });
                }
                outage.suppressed += 1;
                None
            }
        }
    }

    /// The connection works at `now`: the end of an outage is logged once.
    pub fn recovered(&mut self, now: Instant) -> Option<ThrottleReport> {
        self.outage.take().map(|o| ThrottleReport::Recovered {
            failures: o.failures,
            lasted: now.duration_since(o.since),
        })
    }
}

/// The client context of every Weir Kafka client: classifies, remembers and logs (with a
/// throttle) what librdkafka reports; `label` names the connection in every line. Clones
/// share their state, so the clients of one connection share one throttle.
#[derive(Clone, Debug)]
pub struct Observer(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    label: String,
    throttle: Mutex<Throttle>,
    last: Mutex<Option<(Failure, Instant)>>,
    /// The last failure that needs a change (credentials, certificates): the generic
    /// "all brokers are down" that follows it must not hide it.
    last_specific: Mutex<Option<(Failure, Instant)>>,
    /// Bumped on every failure, so a caller can wait for one.
    failures: tokio::sync::watch::Sender<u64>,
}

impl Observer {
    /// An observer for the connection `label` (e.g. `KafkaConnection shop/default`).
    pub fn new(label: impl Into<String>) -> Self {
        Self::with_interval(label, LOG_INTERVAL)
    }

    pub fn with_interval(label: impl Into<String>, interval: Duration) -> Self {
        Self(Arc::new(Inner {
            label: label.into(),
            throttle: Mutex::new(Throttle::new(interval)),
            last: Mutex::new(None),
            last_specific: Mutex::new(None),
            failures: tokio::sync::watch::Sender::new(0),
        }))
    }

    pub fn label(&self) -> &str {
        &self.0.label
    }

    /// The failure seen at or after `since`: the last one that needs a change
    /// (credentials, certificates) if any, else the last one.
    pub fn failure_since(&self, since: Instant) -> Option<Failure> {
        let recent = |slot: &Mutex<Option<(Failure, Instant)>>| {
            slot.lock()
                .ok()?
                .as_ref()
                .filter(|(_, at)| *at >= since)
                .map(|(f, _)| f.clone())
        };
        recent(&self.0.last_specific).or_else(|| recent(&self.0.last))
    }

    /// Whether a failure that needs a change (credentials, certificates) stands, not yet
    /// followed by a working connection; forgets it.
    pub fn take_standing(&self) -> bool {
        self.0
            .last_specific
            .lock()
            .map(|mut last| last.take().is_some())
            .unwrap_or(false)
    }

    /// Changes with every failure reported.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.failures.subscribe()
    }

    /// Notes a failure: remembered, and logged when the throttle lets it through.
    pub fn failed(&self, code: Option<RDKafkaErrorCode>, detail: &str) -> Failure {
        let failure = Failure {
            cause: Cause::classify(code, detail),
            detail: steady(detail).to_owned(),
        };
        let now = Instant::now();
        if let Ok(mut last) = self.0.last.lock() {
            *last = Some((failure.clone(), now));
        }
        if failure.cause.needs_a_change()
            && let Ok(mut last) = self.0.last_specific.lock()
        {
            *last = Some((failure.clone(), now));
        }
        self.0.failures.send_modify(|n| *n += 1);
        let report = self
            .0
            .throttle
            .lock()
            .ok()
            .and_then(|mut t| t.failure(failure.cause, now));
        match report {
            Some(ThrottleReport::First) => tracing::warn!(
                connection = %self.0.label,
                reason = failure.cause.reason(),
                "cannot work with Kafka: {failure}"
            ),
            Some(ThrottleReport::Again {
                suppressed,
                lasting,
            }) => tracing::warn!(
                connection = %self.0.label,
                reason = failure.cause.reason(),
                suppressed,
                lasting_s = lasting.as_secs(),
                "still cannot work with Kafka after {}s ({suppressed} more failures since the last line): {failure}",
                lasting.as_secs()
            ),
            _ => {}
        }
        failure
    }

    /// Notes that the connection works (a broker is up, a request was answered).
    pub fn connected(&self) {
        let report = self
            .0
            .throttle
            .lock()
            .ok()
            .and_then(|mut t| t.recovered(Instant::now()));
        for slot in [&self.0.last, &self.0.last_specific] {
            if let Ok(mut last) = slot.lock() {
                *last = None;
            }
        }
        if let Some(ThrottleReport::Recovered { failures, lasted }) = report {
            tracing::info!(
                connection = %self.0.label,
                failures,
                lasted_s = lasted.as_secs(),
                "connected to Kafka again after {}s ({failures} failures)",
                lasted.as_secs()
            );
        }
    }

    /// An error a consumer's poll returned (the same events reach `error` too, so they
    /// only count here).
    pub fn consumer_error(&self, error: &KafkaError) {
        let code = error.rdkafka_error_code();
        match code {
            // Reported through the client's error callback already.
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Authentication
                | RDKafkaErrorCode::SSL
                | RDKafkaErrorCode::Resolve,
            ) => {}
            _ => {
                self.failed(code, &error.to_string());
            }
        }
    }

    /// Reads librdkafka's statistics: a broker in state `UP` means the connection works.
    pub fn statistics(&self, statistics: &Statistics) {
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.connected();
        }
    }
}

impl ClientContext for Observer {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                // A connection failure is often both a log line and an error event: both
                // go through the throttle as one kind of failure.
                if Cause::classify(None, log_message) == Cause::Other {
                    tracing::warn!(connection = %self.0.label, facility = fac, "librdkafka: {log_message}");
                } else {
                    self.failed(None, log_message);
                }
            }
            _ => {
                tracing::debug!(connection = %self.0.label, facility = fac, "librdkafka: {log_message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.failed(error.rdkafka_error_code(), reason);
    }

    fn stats(&self, statistics: Statistics) {
        self.statistics(&statistics);
    }
}

impl ConsumerContext for Observer {}

impl ProducerContext for Observer {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        if let Err((error, message)) = result {
            tracing::debug!(connection = %self.0.label, topic = message.topic(), %error, "delivery failed");
        }
    }
}

/// librdkafka's words without what changes from one attempt to the next (the thread
/// name, how long the attempt took, how many repeats were suppressed), so that a status
/// made from them stays the same while the cause does.
fn steady(detail: &str) -> &str {
    let detail = match detail
        .strip_prefix("[thrd:")
        .and_then(|d| d.split_once("]: "))
    {
        Some((_, rest)) => rest,
        None => detail,
    };
    match detail.rfind(" (after ") {
        Some(at) if detail.ends_with(')') => &detail[..at],
        _ => detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_changes_between_attempts_is_left_out() {
        assert_eq!(
            steady(
                "[thrd:sasl_ssl://127.0.0.1:1/bootstrap]: sasl_ssl://127.0.0.1:1/bootstrap: SASL authentication error: Authentication failed (after 282ms in state AUTH_REQ, 2 identical error(s) suppressed)"
            ),
            "sasl_ssl://127.0.0.1:1/bootstrap: SASL authentication error: Authentication failed"
        );
        assert_eq!(steady("1/1 brokers are down"), "1/1 brokers are down");
    }

    #[test]
    fn an_outage_is_logged_once_then_every_interval_with_a_count_then_once_when_over() {
        let mut throttle = Throttle::new(Duration::from_secs(30));
        let start = Instant::now();
        let mut lines = Vec::new();
        // 40 failures a second for 65 s.
        for tick in 0..(65 * 40) {
            let now = start + Duration::from_millis(25 * tick);
            if let Some(report) = throttle.failure(Cause::Unreachable, now) {
                lines.push(report);
            }
        }
        let end = start + Duration::from_secs(66);
        lines.extend(throttle.recovered(end));
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0], ThrottleReport::First);
        assert!(
            matches!(lines[1], ThrottleReport::Again { suppressed, lasting } if suppressed == 30 * 40 - 1 && lasting == Duration::from_secs(30)),
            "{:?}",
            lines[1]
        );
        assert!(matches!(lines[2], ThrottleReport::Again { .. }));
        assert!(
            matches!(lines[3], ThrottleReport::Recovered { failures, .. } if failures == 65 * 40),
            "{:?}",
            lines[3]
        );
        // Nothing more to say while it works.
        assert_eq!(throttle.recovered(end), None);
    }

    #[test]
    fn a_new_cause_is_logged_at_once() {
        let mut throttle = Throttle::new(Duration::from_secs(30));
        let now = Instant::now();
        assert_eq!(
            throttle.failure(Cause::Unreachable, now),
            Some(ThrottleReport::First)
        );
        assert_eq!(throttle.failure(Cause::Unreachable, now), None);
        assert_eq!(
            throttle.failure(Cause::Authentication, now),
            Some(ThrottleReport::First)
        );
        // The generic failure that follows a specific one is only counted.
        assert_eq!(throttle.failure(Cause::Unreachable, now), None);
        assert_eq!(
            throttle.failure(Cause::Tls, now),
            Some(ThrottleReport::First)
        );
    }

    #[test]
    fn librdkafka_reports_are_classified() {
        use RDKafkaErrorCode as C;
        let cases = [
            (
                Some(C::Authentication),
                "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
                Cause::Authentication,
            ),
            (
                Some(C::SSL),
                "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
                Cause::Tls,
            ),
            (
                Some(C::BrokerTransportFailure),
                "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused",
                Cause::Unreachable,
            ),
            (
                Some(C::AllBrokersDown),
                "1/1 brokers are down",
                Cause::Unreachable,
            ),
            (Some(C::InvalidArgument), "bad", Cause::Other),
        ];
        for (code, text, cause) in cases {
            assert_eq!(Cause::classify(code, text), cause, "{text}");
        }
        assert_eq!(Cause::Tls.reason(), "TlsHandshakeFailed");
        assert_eq!(Cause::Authentication.reason(), "AuthenticationFailed");
    }
}
