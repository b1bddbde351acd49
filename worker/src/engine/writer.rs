//! The batch writer: every sink of the pipeline writes a batch (each under the retry
//! policy on its own), refused records go to the dead-letter topic, and the commit seam
//! makes the batch's offsets durable. It moves into the task that writes a batch while the
//! engine reads the next one.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::future::BoxFuture;
use rdkafka::consumer::Consumer as _;

use crate::commit::{self, BeforeCommit, Commit, CommitError, Offsets, Transaction};
use crate::compaction::Closed;
use crate::dead_letter::{DeadLetter, Failure};
use crate::metrics::{Metrics, SinkCounters};
use crate::record::Record;
use crate::retry::{ErrorClass, Limit, Retrier};
use crate::shards::{Prepared, Shards};
use crate::sink::{Rejected, Sink, SinkError, WriteInput};
use crate::source::Consumer;

use super::{EngineError, stopped};

/// A sink of the pipeline with its name and counters.
#[derive(Debug)]
pub(super) struct SinkSlot {
    pub(super) name: String,
    pub(super) sink: Arc<dyn Sink>,
    pub(super) counters: Arc<SinkCounters>,
}

/// Everything a batch write needs. It moves into the task that writes a batch while the
/// engine reads the next one, and comes back when the write is done.
pub(super) struct Writer {
    pub(super) pipeline: String,
    pub(super) sinks: Vec<SinkSlot>,
    pub(super) dead_letter: Option<DeadLetter>,
    pub(super) retrier: Retrier,
    pub(super) metrics: Arc<Metrics>,
    pub(super) consumer: Arc<Consumer>,
    pub(super) commit: Commit,
    /// With compaction: how many of a window's events one write takes.
    pub(super) chunk: usize,
    /// With compaction: decodes a window's kept events again, a chunk at a time.
    pub(super) shards: Shards,
}

/// Where a write moves the consumed offsets.
#[derive(Clone, Copy, Debug)]
pub(super) enum Advance<'a> {
    /// Past every record written.
    PastTheseRecords,
    /// To these (a compaction window's: past every record it read).
    To(&'a Offsets),
    /// Not yet: more of the window is to be written.
    NotYet,
}

/// What a write did.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Done {
    pub(super) written: usize,
    pub(super) dead_lettered: usize,
}

impl Writer {
    /// Prepares every sink, waiting out outages.
    pub(super) async fn prepare_sinks(&self) -> Result<(), EngineError> {
        for slot in &self.sinks {
            let tried = self
                .retrier
                .run(&slot.name, Limit::Succeeded, || slot.sink.prepare())
                .await
                .map_err(|e| stopped(&slot.name, e))?;
            if let Err(e) = tried.outcome {
                return Err(EngineError::Fatal {
                    sink: slot.name.clone(),
                    message: e.message,
                });
            }
        }
        Ok(())
    }

    /// Carries out a replay in every sink, waiting out outages; before any record is read.
    pub(super) async fn replay(&self, replay: &crate::sink::Replay) -> Result<(), EngineError> {
        for slot in &self.sinks {
            let tried = self
                .retrier
                .run(&slot.name, Limit::Succeeded, || slot.sink.replay(replay))
                .await
                .map_err(|e| stopped(&slot.name, e))?;
            match tried.outcome {
                Ok(crate::sink::Replayed::Applied { truncated }) => {
                    Metrics::add(&self.metrics.replays, 1);
                    tracing::info!(sink = %slot.name, token = %replay.token, ?truncated, "replay carried out: kept offsets and idempotency keys forgotten, the tables listed truncated");
                }
                Ok(crate::sink::Replayed::Already) => {
                    tracing::info!(sink = %slot.name, token = %replay.token, "replay already carried out; nothing to do");
                }
                Ok(crate::sink::Replayed::Nothing) => {}
                Err(e) => {
                    return Err(EngineError::Fatal {
                        sink: slot.name.clone(),
                        message: e.message,
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes a prepared batch and makes its offsets durable.
    pub(super) async fn write_batch(&mut self, prepared: Vec<Prepared>) -> Result<(), EngineError> {
        let started = Instant::now();
        let records = prepared.len();
        let done = self.write(prepared, Advance::PastTheseRecords).await?;
        self.written(records, done, started);
        Ok(())
    }

    /// Writes a closed compaction window: its kept events a chunk at a time (the next
    /// chunk decoded while one is written), its dead letters with the first; then the
    /// offsets after every record it read become durable. Exactly-once writes the window
    /// in one transaction with those offsets.
    pub(super) async fn write_window(&mut self, mut window: Closed) -> Result<(), EngineError> {
        let started = Instant::now();
        Metrics::add(&self.metrics.filtered, window.counts.filtered);
        Metrics::add(&self.metrics.compacted, window.counts.compacted);
        if window.counts.repeated > 0 {
            tracing::debug!(
                repeated = window.counts.repeated,
                "records fetched twice in one window folded once"
            );
        }
        let exactly_once = self.commit.is_exactly_once();
        let chunk = if exactly_once { usize::MAX } else { self.chunk };
        let offsets = std::mem::take(&mut window.offsets);
        let shards = self.shards.clone();
        let expand = |items: Vec<(Record, crate::shards::Compact)>| {
            let shards = shards.clone();
            tokio::spawn(async move { shards.expand(items).await })
        };
        let mut prepared = window.take_failed();
        let mut next = Some(expand(window.next_chunk(chunk)));
        let mut done = Done::default();
        while let Some(expanding) = next.take() {
            match expanding.await {
                Ok(Ok(events)) => prepared.extend(events),
                Ok(Err(e)) => {
                    return Err(EngineError::Setup(format!(
                        "preparing the batch failed: {e}"
                    )));
                }
                Err(e) => {
                    return Err(EngineError::Setup(format!(
                        "preparing the batch failed: {e}"
                    )));
                }
            }
            if window.remaining() > 0 {
                next = Some(expand(window.next_chunk(chunk)));
            }
            let advance = if exactly_once {
                Advance::To(&offsets)
            } else {
                Advance::NotYet
            };
            if !prepared.is_empty() || exactly_once {
                let part = self.write(std::mem::take(&mut prepared), advance).await?;
                done.written += part.written;
                done.dead_lettered += part.dead_lettered;
            }
        }
        if !exactly_once {
            commit::store(&self.consumer, &offsets, &self.metrics);
        }
        self.written(window.counts.read, done, started);
        Ok(())
    }

    pub(super) fn written(&self, records: usize, done: Done, started: Instant) {
        self.metrics
            .observe_batch(records, started.elapsed().as_secs_f64());
        tracing::debug!(
            pipeline = %self.pipeline,
            records,
            written = done.written,
            dead_lettered = done.dead_lettered,
            millis = started.elapsed().as_millis() as u64,
            "{}",
            if self.commit.is_exactly_once() {
                "batch written and committed"
            } else {
                "batch written"
            }
        );
    }

    /// Writes prepared events with every sink, dead-letters what failed, and moves the
    /// offsets as `advance` says.
    pub(super) async fn write(
        &mut self,
        prepared: Vec<Prepared>,
        advance: Advance<'_>,
    ) -> Result<Done, EngineError> {
        let now = SystemTime::now();
        let mut failures: Vec<(usize, Failure)> = Vec::new();
        let mut events = Vec::with_capacity(prepared.len());
        let mut records: Vec<Record> = Vec::with_capacity(prepared.len());
        let mut nothing: usize = 0;
        for (index, Prepared { record, event }) in prepared.into_iter().enumerate() {
            records.push(record);
            match event {
                Ok(Some(event)) => events.push((index, event)),
                Ok(None) => nothing += 1,
                Err(reason) => failures.push((
                    index,
                    Failure {
                        class: ErrorClass::Permanent,
                        reason,
                        attempts: 1,
                        first_failure: now,
                        sink: None,
                    },
                )),
            }
        }
        // Events with nothing to write: the filter's.
        Metrics::add(&self.metrics.filtered, nothing);
        let input: Vec<WriteInput<'_>> = events
            .iter()
            .map(|(index, event)| WriteInput {
                index: *index,
                record: &records[*index],
                event,
            })
            .collect();
        if self.commit.is_exactly_once() {
            let offsets = match advance {
                Advance::To(offsets) => offsets.clone(),
                Advance::PastTheseRecords | Advance::NotYet => Offsets::after(&records),
            };
            return self
                .write_committing(&records, &input, failures, &offsets)
                .await;
        }

        // Every sink writes the whole batch, concurrently, each retried on its own: a sink
        // that fails does not make the others write again, and a record one sink refuses
        // is still applied by the others.
        let retrier = &self.retrier;
        let input = &input;
        let writes = self.sinks.iter().map(|slot| async move {
            if input.is_empty() {
                return Ok((Vec::new(), 0));
            }
            let tried = retrier
                .run(&slot.name, Limit::Attempts, || slot.sink.write(input))
                .await
                .map_err(|e| stopped(&slot.name, e))?;
            let first_failure = tried.first_failure.unwrap_or_else(SystemTime::now);
            let failure = |class, reason: String| Failure {
                class,
                reason: format!("sink {}: {reason}", slot.name),
                attempts: tried.attempts,
                first_failure,
                sink: Some(slot.name.clone()),
            };
            let mut skipped = 0;
            let refused: Vec<(usize, Failure)> = match tried.outcome {
                Ok(written) => {
                    skipped = written.skipped;
                    let applied = input.len() - written.rejected.len() - written.skipped;
                    Metrics::add(&slot.counters.written, applied);
                    Metrics::add(&slot.counters.skipped, written.skipped);
                    written
                        .rejected
                        .into_iter()
                        .map(|r| (r.index, failure(r.class, r.reason)))
                        .collect()
                }
                // Tried `retry.attempts` times: every record of the write is given up.
                Err(e) => {
                    let reason = format!("{} (after {} attempts)", e.message, tried.attempts);
                    input
                        .iter()
                        .map(|item| (item.index, failure(ErrorClass::Transient, reason.clone())))
                        .collect()
                }
            };
            Metrics::add(&slot.counters.rejected, refused.len());
            Ok::<_, EngineError>((refused, skipped))
        });
        for written in futures::future::join_all(writes).await {
            let (refused, skipped) = written?;
            failures.extend(refused);
            Metrics::add(&self.metrics.skipped, skipped);
        }

        let failed: BTreeSet<usize> = failures.iter().map(|(index, _)| *index).collect();
        if !failures.is_empty() {
            self.dead_letter_all(&records, &failures, failed.len())
                .await?;
        }
        let written = events.iter().filter(|(i, _)| !failed.contains(i)).count();
        Metrics::add(&self.metrics.written, written);
        match advance {
            Advance::PastTheseRecords => self.store_offsets(&records),
            Advance::To(offsets) => commit::store(&self.consumer, offsets, &self.metrics),
            Advance::NotYet => {}
        }
        self.shards.discard((events, records));
        Ok(Done {
            written,
            dead_lettered: failures.len(),
        })
    }

    /// Exactly-once: the one sink writes the batch and commits its offsets in the same
    /// transaction. Records refused before the sink are dead-lettered first, those the sink
    /// refuses from inside its transaction, before it commits; the transaction is retried
    /// until it commits (the offsets cannot move without it). The group's offsets are stored
    /// afterwards for lag, unless the transaction committed them itself.
    pub(super) async fn write_committing(
        &self,
        records: &[Record],
        input: &[WriteInput<'_>],
        failures: Vec<(usize, Failure)>,
        offsets: &Offsets,
    ) -> Result<Done, EngineError> {
        let Some(slot) = self.sinks.first() else {
            return Err(EngineError::Setup("no sink".into()));
        };
        if !failures.is_empty() {
            self.dead_letter_all(records, &failures, failures.len())
                .await?;
        }
        let metadata = match self.commit {
            Commit::KafkaTransaction => self.consumer.group_metadata(),
            _ => None,
        };
        let hook = RefusedFirst {
            writer: self,
            records,
            sink: &slot.name,
            stopped: std::sync::Mutex::new(None),
        };
        let tx = Transaction {
            offsets,
            group_metadata: metadata.as_ref(),
            before_commit: &hook,
        };
        let tried = self
            .retrier
            .run(&slot.name, Limit::Succeeded, || async {
                match slot.sink.write_committing(input, &tx).await {
                    Ok(written) => Ok(Ok(written)),
                    Err(CommitError::Sink(e)) => Err(e),
                    Err(other) => Ok(Err(other)),
                }
            })
            .await
            .map_err(|e| stopped(&slot.name, e))?;
        let written = match tried.outcome {
            Ok(Ok(written)) => written,
            Ok(Err(CommitError::Fenced(reason))) => return Err(EngineError::Fenced(reason)),
            Ok(Err(other)) => {
                let held = hook.stopped.lock().ok().and_then(|mut e| e.take());
                return Err(held.unwrap_or_else(|| EngineError::Fatal {
                    sink: slot.name.clone(),
                    message: other.to_string(),
                }));
            }
            Err(e) => {
                return Err(EngineError::Fatal {
                    sink: slot.name.clone(),
                    message: e.message,
                });
            }
        };
        let applied = input.len() - written.rejected.len() - written.skipped;
        Metrics::add(&slot.counters.written, applied);
        Metrics::add(&slot.counters.skipped, written.skipped);
        Metrics::add(&slot.counters.rejected, written.rejected.len());
        Metrics::add(&self.metrics.skipped, written.skipped);
        Metrics::add(&self.metrics.written, applied);
        match self.commit {
            Commit::KafkaTransaction => Metrics::add(&self.metrics.commits, 1),
            _ => commit::store(&self.consumer, offsets, &self.metrics),
        }
        Ok(Done {
            written: applied,
            dead_lettered: failures.len() + written.rejected.len(),
        })
    }

    /// Sends every failure to the dead-letter topic (one record per refusing sink), each
    /// retried until the broker has it; without a dead-letter topic the pipeline stops.
    pub(super) async fn dead_letter_all(
        &self,
        records: &[Record],
        failures: &[(usize, Failure)],
        failed_records: usize,
    ) -> Result<(), EngineError> {
        Metrics::add(&self.metrics.failed, failed_records);
        let Some(dead_letter) = &self.dead_letter else {
            let Some((index, failure)) = failures.first() else {
                return Ok(());
            };
            let record = &records[*index];
            return Err(EngineError::PoisonWithoutDeadLetter {
                topic: record.topic.clone(),
                partition: record.partition,
                offset: record.offset,
                reason: failure.reason.clone(),
            });
        };
        const WHAT: &str = "the dead-letter topic";
        for (index, failure) in failures {
            let record = &records[*index];
            tracing::warn!(
                topic = %record.topic, partition = record.partition, offset = record.offset,
                class = failure.class.as_str(), reason = %failure.reason,
                sink = failure.sink.as_deref().unwrap_or(""),
                attempts = failure.attempts,
                dead_letter = %dead_letter.topic(), "record dead-lettered"
            );
            self.retrier
                .run(WHAT, Limit::Succeeded, || async {
                    dead_letter
                        .send(record, failure)
                        .await
                        .map_err(|e| SinkError::new(ErrorClass::Unavailable, e.to_string()))
                })
                .await
                .map_err(|e| stopped(WHAT, e))?;
            Metrics::add(&self.metrics.dead_lettered, 1);
        }
        Ok(())
    }

    /// Makes the batch's offsets durable the at-least-once way: stored for the group's
    /// next commit.
    pub(super) fn store_offsets(&self, records: &[Record]) {
        commit::store(&self.consumer, &Offsets::after(records), &self.metrics);
    }
}

/// Dead-letters what a sink refuses inside its exactly-once transaction, before it commits.
pub(super) struct RefusedFirst<'w> {
    pub(super) writer: &'w Writer,
    pub(super) records: &'w [Record],
    pub(super) sink: &'w str,
    /// Why the pipeline must stop, when dead-lettering could not be done.
    pub(super) stopped: std::sync::Mutex<Option<EngineError>>,
}

impl BeforeCommit for RefusedFirst<'_> {
    fn dead_letter<'a>(
        &'a self,
        rejected: &'a [Rejected],
    ) -> BoxFuture<'a, Result<(), CommitError>> {
        Box::pin(async move {
            if rejected.is_empty() {
                return Ok(());
            }
            let now = SystemTime::now();
            let failures: Vec<(usize, Failure)> = rejected
                .iter()
                .map(|r| {
                    (
                        r.index,
                        Failure {
                            class: r.class,
                            reason: format!("sink {}: {}", self.sink, r.reason),
                            attempts: 1,
                            first_failure: now,
                            sink: Some(self.sink.to_owned()),
                        },
                    )
                })
                .collect();
            match self
                .writer
                .dead_letter_all(self.records, &failures, failures.len())
                .await
            {
                Ok(()) => Ok(()),
                Err(e) => {
                    let message = e.to_string();
                    if let Ok(mut held) = self.stopped.lock() {
                        *held = Some(e);
                    }
                    Err(CommitError::Stop(message))
                }
            }
        })
    }
}
