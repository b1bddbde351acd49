//! Sinks: every kind behind the one [`Sink`] trait, each in its own folder with the same
//! slots — build from its spec, prepare, write one batch (acknowledged or refused records),
//! classify its errors, close — and its tests. Batching, retries and offset commits are
//! shared machinery in the engine, which names no sink kind.

pub mod http;
pub mod kafka;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod sql;
pub mod sqlite;

use std::fmt;

use futures::future::BoxFuture;
use serde_json::Value;
use weir_crds::{EventPipelineSpec, Sink as SinkSpec};

use self::sql::Idempotency;
use crate::commit::{Commit, CommitError, Transaction};
use crate::config::resolve_secret;
use crate::record::Record;
use crate::retry::ErrorClass;

/// One event handed to a sink: its position in the batch, its record and decoded value.
#[derive(Clone, Copy, Debug)]
pub struct WriteInput<'a> {
    pub index: usize,
    pub record: &'a Record,
    pub event: &'a Value,
}

/// An event a sink refused permanently; it goes to the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub index: usize,
    pub class: ErrorClass,
    pub reason: String,
}

/// What a sink did with a batch it acknowledged: everything not refused is applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Events refused permanently (they go to the dead-letter topic).
    pub rejected: Vec<Rejected>,
    /// Events acknowledged without being written: matched by no rule, or already applied.
    pub skipped: usize,
}

/// A failure of a whole write, classified for the retry policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub class: ErrorClass,
    pub message: String,
}

impl SinkError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }
}

/// A replay to carry out in the sinks, once per token: the operator reset the consumer
/// group, and the first worker to start with the token makes each sink forget what would
/// stop the replayed events from being applied again (the offsets it keeps, the
/// idempotency keys), emptying its table first when `truncate` was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    pub token: String,
    pub truncate: bool,
}

/// What [`Sink::replay`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replayed {
    /// This worker carried it out; `truncated` names the tables it emptied.
    Applied { truncated: Vec<String> },
    /// Carried out before (by another worker, or by this one before a restart).
    Already,
    /// The sink keeps nothing a replay must forget, and nothing was to be truncated.
    Nothing,
}

/// A destination. The engine writes one batch at a time to it; a write either
/// acknowledges the batch (some events possibly refused) or fails as a whole, and the
/// engine retries it by its [`ErrorClass`]. A write may be repeated after a failure, so it
/// must be safe to apply twice (upserts, idempotency keys, SET/DEL).
pub trait Sink: Send + Sync + fmt::Debug {
    /// Checks the destination answers and creates Weir's own bookkeeping there. Retried
    /// while the destination is unavailable; `Fatal` stops the pipeline.
    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Writes one batch, in order.
    fn write<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
    ) -> BoxFuture<'a, Result<Written, SinkError>>;

    /// Carries out `replay` once per token across every worker of the pipeline, after
    /// [`Sink::prepare`] and before any write: the first call records the token in the
    /// destination in the same transaction as the forgetting (and the truncation), so a
    /// concurrent or later call with the same token does nothing. Retried while the
    /// destination is unavailable.
    fn replay<'a>(&'a self, replay: &'a Replay) -> BoxFuture<'a, Result<Replayed, SinkError>> {
        Box::pin(async move {
            if replay.truncate {
                Err(SinkError::new(
                    ErrorClass::Fatal,
                    "spec.replay.truncateSinks: this sink cannot be truncated",
                ))
            } else {
                Ok(Replayed::Nothing)
            }
        })
    }

    /// Releases connections; called once, after the last write.
    fn close(&self) -> BoxFuture<'_, ()>;

    /// Whether writes read the decoded event (`WriteInput::event`). A sink that writes only
    /// from the record itself (its key, its bytes as they are) says no; when nothing in the
    /// pipeline reads the event, a record is only checked to be JSON, never decoded.
    fn reads_event(&self) -> bool {
        true
    }

    /// How this sink can make a batch's offsets durable beyond the consumer group's
    /// commit, for `delivery: ExactlyOnce` ([`crate::commit`]). A sink that returns
    /// anything but `Group` implements [`Sink::claim`] and [`Sink::write_committing`].
    fn commit(&self) -> Commit {
        Commit::Group
    }

    /// For offsets kept by the sink: called when partitions are assigned, before any of
    /// their records is written. Claims them (fencing out a previous owner that has not
    /// noticed it lost them) and returns, for each, the next offset stored with the data
    /// (`None`: nothing stored yet, resume from the group's committed offset).
    fn claim<'a>(
        &'a self,
        partitions: &'a [(String, i32)],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, SinkError>> {
        Box::pin(async move { Ok(vec![None; partitions.len()]) })
    }

    /// Writes one batch and commits its offsets with it, atomically (exactly-once). The
    /// records it refuses are handed to `tx.before_commit` before the commit, and listed
    /// in the result as `write` lists them.
    fn write_committing<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
        tx: &'a Transaction<'a>,
    ) -> BoxFuture<'a, Result<Written, CommitError>> {
        let _ = (input, tx);
        Box::pin(async {
            Err(CommitError::Stop(
                "this sink cannot commit offsets in its own transaction".into(),
            ))
        })
    }
}

/// A built sink with the name its metrics, logs and dead letters use.
#[derive(Debug)]
pub struct NamedSink {
    /// `spec.sinks[i].name`, or the kind and position, e.g. `postgres-0`.
    pub name: String,
    pub sink: Box<dyn Sink>,
}

/// Builds every sink of a pipeline. `scope` names the pipeline's bookkeeping (its consumer
/// group). Connections are made on first use, so an unreachable destination is retried by
/// the engine rather than failing the start. Call inside a tokio runtime.
pub fn build(spec: &EventPipelineSpec, scope: &str) -> Result<Vec<NamedSink>, String> {
    build_in(spec, scope, None)
}

/// Builds every sink as [`build`] does, the kafka sinks' producers on `kafka` (without it,
/// a kafka sink is built but cannot write).
pub fn build_in(
    spec: &EventPipelineSpec,
    scope: &str,
    kafka: Option<&kafka::Connection>,
) -> Result<Vec<NamedSink>, String> {
    build_with(
        spec,
        scope,
        kafka,
        &|kind, url_given, from, at| match (url_given, from) {
            (Some(url), _) => Ok(url.clone()),
            (None, Some(from)) => resolve_secret(from).map_err(|e| format!("{at}.urlFrom: {e}")),
            (None, None) => Err(format!("{at}: set url or urlFrom ({kind})")),
        },
    )
}

/// Builds every sink as [`build`] does, without reading secrets: a URL that comes from a
/// secret is replaced by a placeholder of its kind (nothing connects until a write). The
/// worker's start-up check. Call inside a tokio runtime.
pub fn check(spec: &EventPipelineSpec) -> Result<(), String> {
    build_with(spec, "check", None, &|kind, url_given, _, _| {
        Ok(url_given.clone().unwrap_or_else(|| {
            match kind {
                "postgres" => "postgres://weir-check.invalid/check",
                "mysql" => "mysql://weir-check.invalid/check",
                "sqlite" => "sqlite::memory:",
                "mongodb" => "mongodb://weir-check.invalid/",
                "http" => "http://weir-check.invalid/",
                _ => "redis://weir-check.invalid/",
            }
            .to_owned()
        }))
    })
    .map(drop)
}

/// How a sink's connection URL is found: (kind, `url`, `urlFrom`, field path) → URL.
type UrlOf<'a> = dyn Fn(&str, &Option<String>, &Option<weir_crds::SecretSource>, &str) -> Result<String, String>
    + 'a;

fn build_with(
    spec: &EventPipelineSpec,
    scope: &str,
    kafka: Option<&kafka::Connection>,
    url: &UrlOf<'_>,
) -> Result<Vec<NamedSink>, String> {
    // Without a transform, a record's value is its event: the JSON as consumed, or with
    // format: Raw the bytes themselves (the event only their lossy UTF-8 text).
    let untouched = spec
        .transform
        .as_ref()
        .is_none_or(|t| t.set.is_empty() && t.remove.is_empty());
    let idempotency = spec
        .idempotency
        .as_ref()
        .map(|i| -> Result<Idempotency, String> {
            Ok(Idempotency {
                scope: scope.to_owned(),
                key: i.key.clone(),
                window: i.window.parse()?,
            })
        })
        .transpose()?;
    spec.sinks
        .iter()
        .enumerate()
        .map(|(i, sink)| {
            let at = format!("spec.sinks[{i}]");
            let built: Box<dyn Sink> = match sink {
                SinkSpec {
                    postgres: Some(pg), ..
                } => {
                    let url = url("postgres", &pg.url, &pg.url_from, &format!("{at}.postgres"))?;
                    let table = postgres::build(pg, &url, idempotency.clone())?.in_group(scope);
                    Box::new(match spec.delivery {
                        weir_crds::Delivery::ExactlyOnce => table.keeping_offsets(scope),
                        weir_crds::Delivery::AtLeastOnce => table,
                    })
                }
                SinkSpec {
                    mysql: Some(my), ..
                } => {
                    let url = url("mysql", &my.url, &my.url_from, &format!("{at}.mysql"))?;
                    let table = mysql::build(my, &url, idempotency.clone())?.in_group(scope);
                    Box::new(match spec.delivery {
                        weir_crds::Delivery::ExactlyOnce => table.keeping_offsets(scope),
                        weir_crds::Delivery::AtLeastOnce => table,
                    })
                }
                SinkSpec {
                    sqlite: Some(lite), ..
                } => {
                    let url = url("sqlite", &lite.url, &lite.url_from, &format!("{at}.sqlite"))?;
                    Box::new(sqlite::build(lite, &url, idempotency.clone())?.in_group(scope))
                }
                SinkSpec {
                    mongodb: Some(m), ..
                } => {
                    let url = url("mongodb", &m.url, &m.url_from, &format!("{at}.mongodb"))?;
                    Box::new(mongodb::MongoDbSink::new(m.clone(), &url)?)
                }
                SinkSpec { http: Some(h), .. } => {
                    let at = format!("{at}.http");
                    let url = url("http", &h.url, &h.url_from, &at)?;
                    Box::new(http::HttpSink::new(h, &url, &at, spec)?)
                }
                SinkSpec { kafka: Some(k), .. } => Box::new(
                    kafka::KafkaSink::new(
                        k,
                        untouched,
                        spec.delivery == weir_crds::Delivery::ExactlyOnce,
                        kafka,
                    )
                    .map_err(|e| format!("{at}.{e}"))?,
                ),
                SinkSpec { redis: Some(r), .. } => {
                    let url = url("redis", &r.url, &r.url_from, &format!("{at}.redis"))?;
                    Box::new(
                        redis::RedisSink::new(r.clone(), &url)?.with_payload_as_event(untouched),
                    )
                }
                other => {
                    return Err(format!(
                        "{at}: the {} sink is not available in this worker version",
                        other.kinds().join("/")
                    ));
                }
            };
            Ok(NamedSink {
                name: sink_name(sink, i),
                sink: built,
            })
        })
        .collect()
}

/// `name`, or the kind and position, e.g. `postgres-0`.
pub fn sink_name(sink: &SinkSpec, index: usize) -> String {
    sink.name.clone().unwrap_or_else(|| {
        format!(
            "{}-{index}",
            sink.kinds().first().copied().unwrap_or("sink")
        )
    })
}

/// Removes a password from any URL in a message.
pub fn redact(message: &str) -> String {
    message
        .split(' ')
        .map(|word| match (word.find("://"), word.find('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let credentials = &word[scheme + 3..at];
                match credentials.split_once(':') {
                    Some((user, _)) => format!("{}{user}:***{}", &word[..scheme + 3], &word[at..]),
                    None => word.to_owned(),
                }
            }
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact("cannot reach postgres://app:s3cret@db:5432/x now"),
            "cannot reach postgres://app:***@db:5432/x now"
        );
        assert_eq!(redact("sqlite:///data/x.db"), "sqlite:///data/x.db");
    }
}
