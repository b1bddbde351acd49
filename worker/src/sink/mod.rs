//! Sinks: each kind in its own folder with the same slots (build from spec, prepare, write
//! one batch, close). Batching, retry classification and offset commits are shared, in the
//! engine.

pub mod postgres;
pub mod sql;
pub mod sqlite;

use serde_json::Value;
use weir_crds::{EventPipelineSpec, Sink as SinkSpec};

use self::sql::Idempotency;
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

/// A failure of a whole write, classified for the retry policy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub class: ErrorClass,
    pub message: String,
}

/// A configured sink.
#[derive(Debug)]
pub enum Sink {
    Postgres(postgres::PostgresSink),
    Sqlite(sqlite::SqliteSink),
}

impl Sink {
    /// Builds every sink of a pipeline. `scope` names the pipeline's bookkeeping (its
    /// consumer group).
    pub fn from_spec(spec: &EventPipelineSpec, scope: &str) -> Result<Vec<(String, Sink)>, String> {
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
        if spec.delivery == weir_crds::Delivery::ExactlyOnce {
            return Err("spec.delivery: ExactlyOnce is not available in this worker version yet; use AtLeastOnce with spec.idempotency for effectively-once projections".into());
        }
        spec.sinks
            .iter()
            .enumerate()
            .map(|(i, sink)| {
                let name = sink_name(sink, i);
                let built = match sink {
                    SinkSpec { postgres: Some(pg), .. } => {
                        let url = sql_url(pg, &format!("spec.sinks[{i}].postgres"))?;
                        Sink::Postgres(postgres::PostgresSink::new(pg.clone(), &url, idempotency.clone())?)
                    }
                    SinkSpec { sqlite: Some(lite), .. } => {
                        let url = sql_url(lite, &format!("spec.sinks[{i}].sqlite"))?;
                        Sink::Sqlite(sqlite::SqliteSink::new(lite.clone(), &url, idempotency.clone())?)
                    }
                    other => {
                        return Err(format!(
                            "spec.sinks[{i}]: the {} sink is not available in this worker version yet; the postgres and sqlite sinks are",
                            other.kinds().join("/")
                        ));
                    }
                };
                Ok((name, built))
            })
            .collect()
    }

    pub async fn prepare(&self) -> Result<(), SinkError> {
        match self {
            Sink::Postgres(s) => s.prepare().await,
            Sink::Sqlite(s) => s.prepare().await,
        }
    }

    pub async fn write(&mut self, input: &[WriteInput<'_>]) -> Result<Vec<Rejected>, SinkError> {
        match self {
            Sink::Postgres(s) => s.write(input).await,
            Sink::Sqlite(s) => s.write(input).await,
        }
    }

    /// Events skipped since the last call: matched by no rule, or already applied.
    pub fn take_skipped(&mut self) -> usize {
        match self {
            Sink::Postgres(s) => s.take_skipped(),
            Sink::Sqlite(s) => s.take_skipped(),
        }
    }

    pub async fn close(&self) {
        match self {
            Sink::Postgres(s) => s.close().await,
            Sink::Sqlite(s) => s.close().await,
        }
    }
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

/// A SQL sink's connection URL: `url`, or the secret `urlFrom` names.
fn sql_url(spec: &weir_crds::SqlSink, at: &str) -> Result<String, String> {
    match (&spec.url, &spec.url_from) {
        (Some(url), _) => Ok(url.clone()),
        (None, Some(from)) => resolve_secret(from).map_err(|e| format!("{at}.urlFrom: {e}")),
        (None, None) => Err(format!("{at}: set url or urlFrom")),
    }
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
