//! Sinks: each kind in its own folder with the same slots (build from spec, prepare, write
//! one batch, close). Batching, retry classification and offset commits are shared, in the
//! engine.

pub mod postgres;

use serde_json::Value;
use weir_crds::{EventPipelineSpec, Sink as SinkSpec};

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
}

impl Sink {
    /// Builds every sink of a pipeline. `scope` names the pipeline's bookkeeping (its
    /// consumer group).
    pub fn from_spec(spec: &EventPipelineSpec, scope: &str) -> Result<Vec<(String, Sink)>, String> {
        let idempotency = spec
            .idempotency
            .as_ref()
            .map(|i| -> Result<postgres::Idempotency, String> {
                Ok(postgres::Idempotency {
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
                        let url = resolve_secret(&pg.url_from)
                            .map_err(|e| format!("spec.sinks[{i}].postgres.urlFrom: {e}"))?;
                        Sink::Postgres(postgres::PostgresSink::new(pg.clone(), &url, idempotency.clone())?)
                    }
                    other => {
                        return Err(format!(
                            "spec.sinks[{i}]: the {} sink is not available in this worker version yet; the postgres sink is",
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
        }
    }

    pub async fn write(&mut self, input: &[WriteInput<'_>]) -> Result<Vec<Rejected>, SinkError> {
        match self {
            Sink::Postgres(s) => s.write(input).await,
        }
    }

    pub async fn close(&self) {
        match self {
            Sink::Postgres(s) => s.close().await,
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
