//! The run loop: consume → decode/filter/transform → batch → sinks → dead letters → commit.
//!
//! A closed batch is decoded and transformed on every core (`shards`) and then written in
//! its own task, while the engine reads the next one; the next write starts only when the
//! previous one is done. The sinks of a pipeline write each batch concurrently, each under
//! the retry policy on its own, so a failing sink is retried alone. A batch's offsets are
//! stored only after every sink acknowledged it and every refused record is on the
//! dead-letter topic; librdkafka commits stored offsets every second, before giving up
//! revoked partitions and on close. So a worker killed at any instant resumes from a point
//! before anything unacknowledged.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer as _};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;
use weir_crds::Compaction;

use crate::batch::{Batch, Limits};
use crate::commit::{self, Commit, Offsets, Positions};
use crate::compaction::Window;
use crate::config::WorkerConfig;
use crate::dead_letter::DeadLetter;
use crate::metrics::Metrics;
use crate::record::Record;
use crate::retry::{Backoff, Limit, Retrier, Stopped};
use crate::shards::Shards;
use crate::sink::Sink;
use crate::source::{self, Consumer, Revocations};
use crate::transform::Transformer;

mod writer;
use writer::{SinkSlot, Writer};

/// With compaction: most records read into a window at a time (each chunk is prepared on
/// every core, then folded), and most of its events in one write.
const CHUNK: usize = 1000;
/// With compaction: most bytes read into a window at a time.
const CHUNK_BYTES: usize = 1 << 20;

/// Why the engine stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Setup(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("sink {sink}: {message}")]
    Fatal { sink: String, message: String },
    #[error(
        "record {topic}/{partition}@{offset} failed permanently ({reason}) and spec.deadLetter is not set: stopping rather than skipping it; set a dead-letter topic or fix the record"
    )]
    PoisonWithoutDeadLetter {
        topic: String,
        partition: i32,
        offset: i64,
        reason: String,
    },
    #[error(
        "stopped while {0} could not be reached; the batch in flight was not committed and will be read again"
    )]
    StoppedWhileUnavailable(String),
    /// Another worker owns the partitions now: nothing of the batch was committed.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// A pipeline being run.
pub struct Engine {
    config: WorkerConfig,
    consumer: Arc<Consumer>,
    revocations: Revocations,
    /// Held by the batch being written; the rebalance callback takes it before giving up
    /// partitions, so a revoked partition's records in flight are written and their
    /// offsets stored (and committed by librdkafka) first.
    gate: Arc<tokio::sync::Mutex<()>>,
    /// The writer, when no batch is being written.
    writer: Option<Writer>,
    /// The batch being written, which hands the writer back.
    in_flight: Option<JoinHandle<(Writer, Result<(), EngineError>)>>,
    batch: Batch,
    /// With `batch.compaction: LastWriteWins`: the window `batch`'s chunks are folded into.
    window: Option<Window>,
    /// With compaction: the bytes the window being written still keeps.
    writing: Arc<std::sync::atomic::AtomicUsize>,
    shards: Shards,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    /// How a batch's offsets become durable.
    commit: Commit,
    /// With offsets kept by the sink: the sink, asked for them on assignment.
    keeper: Option<(String, Arc<dyn Sink>)>,
    /// With offsets kept by the sink: where each claimed partition resumes.
    positions: Positions,
    retrier: Retrier,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("pipeline", &self.config.name)
            .finish()
    }
}

impl Engine {
    /// Connects the consumer and builds the sinks; nothing is read until `run`. Must be
    /// called inside a multi-threaded tokio runtime.
    pub fn new(
        config: WorkerConfig,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, EngineError> {
        let transformer = Transformer::from_spec(&config.spec).map_err(EngineError::Setup)?;
        let group = config.consumer_group();
        let connection = crate::sink::kafka::Connection {
            client: config.kafka.clone(),
            label: config.connection.clone(),
            others: config.sink_connections.clone(),
            // Stable across restarts with static membership, so a restarted worker fences
            // its predecessor's producer.
            transactional_id: format!(
                "weir-{group}-{}",
                config
                    .instance_id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
            ),
        };
        let sinks = crate::sink::build_in(&config.spec, &group, Some(&connection))
            .map_err(EngineError::Setup)?
            .into_iter()
            .map(|named| SinkSlot {
                counters: metrics.sink(&named.name),
                name: named.name,
                sink: Arc::from(named.sink),
            })
            .collect::<Vec<SinkSlot>>();
        let named: Vec<(&str, Commit)> = sinks
            .iter()
            .map(|slot| (slot.name.as_str(), slot.sink.commit()))
            .collect();
        let commit = commit::choose(config.spec.delivery, &named).map_err(EngineError::Setup)?;
        let keeper = match (commit, sinks.first()) {
            (Commit::InSinkTransaction, Some(slot)) => Some((slot.name.clone(), slot.sink.clone())),
            _ => None,
        };
        let dead_letter = config
            .spec
            .dead_letter
            .as_ref()
            .map(|d| DeadLetter::new(&config.kafka, &d.topic))
            .transpose()?;
        let batch = &config.spec.batch;
        let limits = Limits {
            max_records: batch.max_records.max(1) as usize,
            max_bytes: batch.max_bytes.max(1) as usize,
            max_wait: batch.max_wait.parse().map_err(EngineError::Setup)?,
        };
        // With compaction the batch limits are the window's; records are read and folded
        // into it in chunks of at most CHUNK records (or the window's size), and written
        // back in chunks of the same size.
        let (window, limits) = match batch.compaction {
            Compaction::LastWriteWins => (
                Some(Window::new(limits)),
                Limits {
                    max_records: limits.max_records.min(CHUNK),
                    max_bytes: limits.max_bytes.min(CHUNK_BYTES),
                    ..limits
                },
            ),
            Compaction::None => (None, limits),
        };
        let decode = transformer.reads_event()
            || sinks.iter().any(|slot: &SinkSlot| slot.sink.reads_event());
        let shards = Shards::new(
            config.transform_threads,
            config.spec.source.format,
            decode,
            transformer,
        )
        .map_err(|e| EngineError::Setup(format!("cannot start the transform threads: {e}")))?;
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let (consumer, revocations) = source::consumer(&config, metrics.clone(), gate.clone())?;
        let consumer = Arc::new(consumer);
        let retrier = Retrier::new(
            Backoff::from_spec(&config.spec.retry),
            shutdown.clone(),
            metrics.clone(),
        );
        let writer = Writer {
            pipeline: config.name.clone(),
            sinks,
            dead_letter,
            retrier: retrier.clone(),
            metrics: metrics.clone(),
            consumer: consumer.clone(),
            commit,
            chunk: limits.max_records,
            shards: shards.clone(),
        };
        Ok(Self {
            config,
            consumer,
            revocations,
            gate,
            writer: Some(writer),
            in_flight: None,
            batch: Batch::new(limits),
            window,
            writing: Arc::default(),
            shards,
            metrics,
            shutdown,
            commit,
            keeper,
            positions: Positions::default(),
            retrier,
        })
    }

    /// Runs until shutdown is signalled: then the batch in flight is written and committed
    /// and the consumer leaves its group.
    pub async fn run(mut self) -> Result<(), EngineError> {
        if let Some(writer) = &self.writer {
            writer.prepare_sinks().await?;
            if let Some(replay) = &self.config.replay {
                writer.replay(replay).await?;
            }
        }
        self.metrics.set_ready(true);
        tracing::info!(
            pipeline = %self.config.name,
            group = %self.config.consumer_group(),
            topics = ?self.config.spec.source.topics,
            transform_threads = self.shards.threads(),
            "consuming"
        );
        let mut flushed = self.consume().await;
        // Finish the batches in flight, commit, leave the group, whatever stopped the loop.
        if flushed.is_ok() {
            flushed = self.flush().await;
        }
        let settled = self.settle().await;
        let flushed = flushed.and(settled);
        // With a Kafka transaction the group's offsets are committed by the transactions.
        if flushed.is_ok() && self.commit != Commit::KafkaTransaction {
            match self.consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => Metrics::add(&self.metrics.commits, 1),
                // Nothing stored since the last automatic commit.
                Err(rdkafka::error::KafkaError::ConsumerCommit(
                    rdkafka::types::RDKafkaErrorCode::NoOffset,
                )) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "final offset commit failed; the last records will be read again")
                }
            }
        }
        self.consumer.unsubscribe();
        if let Some(writer) = &self.writer {
            for slot in &writer.sinks {
                slot.sink.close().await;
            }
        }
        match flushed {
            // Another worker owns the partitions: exiting is the clean way out, a restarted
            // worker joins the group afresh.
            Err(EngineError::Fenced(reason)) => {
                tracing::warn!(%reason, "fenced by the partitions' new owner: nothing of the batch in flight was committed; exiting");
                Ok(())
            }
            other => other,
        }
    }

    /// Waits for the batch being written, taking the writer back.
    async fn settle(&mut self) -> Result<(), EngineError> {
        let Some(handle) = self.in_flight.take() else {
            return Ok(());
        };
        self.take_back(handle.await)
    }

    fn take_back(&mut self, done: WriteResult) -> Result<(), EngineError> {
        match done {
            Ok((writer, result)) => {
                self.writer = Some(writer);
                result
            }
            Err(e) => Err(EngineError::Setup(format!("the batch writer failed: {e}"))),
        }
    }

    async fn consume(&mut self) -> Result<(), EngineError> {
        loop {
            if *self.shutdown.borrow() {
                return Ok(());
            }
            let deadline = match (self.batch.deadline(), self.window.as_ref()) {
                (batch, Some(window)) => window.deadline().or(batch),
                (batch, None) => batch,
            };
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                // A write that fails stops the pipeline now, not at the next batch.
                done = wait_in_flight(&mut self.in_flight), if self.in_flight.is_some() => {
                    self.in_flight = None;
                    self.take_back(done)?;
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.flush().await?;
                }
                message = self.consumer.recv() => {
                    let first = message.map(|m| source::owned(&m));
                    self.claim_assigned().await?;
                    self.take(first);
                    // Take whatever else is already fetched without going back through the
                    // select (one timer and one wake-up per record would cost more than
                    // the record).
                    while !self.batch.is_full() {
                        let next = match self.consumer.recv().now_or_never() {
                            Some(message) => message.map(|m| source::owned(&m)),
                            None => break,
                        };
                        self.claim_assigned().await?;
                        self.take(next);
                    }
                    self.forget_revoked();
                    if self.batch.is_full() {
                        self.batch_full().await?;
                    }
                }
            }
        }
    }

    /// Waits for the batch being written. Most writes take milliseconds; one that takes
    /// longer (a sink being retried) pauses the assigned partitions and keeps polling, so
    /// nothing more is fetched and the group does not take this worker for dead
    /// (`max.poll.interval.ms`).
    async fn wait_for_writer(&mut self) -> Result<(), EngineError> {
        let Some(handle) = self.in_flight.as_mut() else {
            return Ok(());
        };
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(500), handle).await {
            self.in_flight = None;
            return self.take_back(done);
        }
        let paused = self.set_paused(true);
        tracing::info!("the batch write is slow: partitions paused until it is done");
        let result = loop {
            tokio::select! {
                biased;
                done = wait_in_flight(&mut self.in_flight) => {
                    self.in_flight = None;
                    break self.take_back(done);
                }
                message = self.consumer.recv() => {
                    // Records fetched before the pause still arrive; they join the batch.
                    // Revocations are applied by `flush` once this write is done, to
                    // the batch being prepared too.
                    let record = message.map(|m| source::owned(&m));
                    self.claim_assigned().await?;
                    self.take(record);
                }
            }
        };
        if paused {
            self.set_paused(false);
            tracing::info!("partitions resumed");
        }
        result
    }

    /// Pauses or resumes every assigned partition; false when it could not.
    fn set_paused(&self, pause: bool) -> bool {
        let assignment = match self.consumer.assignment() {
            Ok(assignment) => assignment,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the assignment");
                return false;
            }
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        drop(assignment);
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, pause, "cannot pause or resume the partitions");
                false
            }
        }
    }

    fn take(&mut self, message: Result<Record, rdkafka::error::KafkaError>) {
        match message {
            // With offsets kept by the sink: read again from the group's older offset
            // before the seek to the sink's took effect (applied already), or a second time
            // after the seek rewound the fetch (in a batch already).
            Ok(record) if self.keeper.is_some() && !self.positions.admit(&record) => {}
            Ok(record) => {
                Metrics::add(&self.metrics.consumed, 1);
                self.batch.push(record);
            }
            Err(e) => self.consumer.context().consumer_error(&e),
        }
    }

    /// With offsets kept by the sink: claims the partitions assigned since the last look
    /// (fencing out their previous owner) and seeks each to the offset stored with the
    /// data. Runs before any record of theirs joins a batch.
    async fn claim_assigned(&mut self) -> Result<(), EngineError> {
        let Some((name, sink)) = &self.keeper else {
            return Ok(());
        };
        let assigned = self.consumer.context().take_assigned();
        if assigned.is_empty() {
            return Ok(());
        }
        let tried = self
            .retrier
            .run(name, Limit::Succeeded, || sink.claim(&assigned))
            .await
            .map_err(|e| stopped(name, e))?;
        let stored = tried.outcome.map_err(|e| EngineError::Fatal {
            sink: name.clone(),
            message: e.message,
        })?;
        for ((topic, partition), next) in assigned.iter().zip(stored) {
            self.positions.set(topic, *partition, next);
            let Some(next) = next else {
                tracing::info!(%topic, partition, "claimed; no offset stored with the data yet: resuming from the group's");
                continue;
            };
            tracing::info!(%topic, partition, next, "claimed; resuming from the offset stored with the data");
            // The group's offset may lag the one stored with the data (a worker stopped
            // between the two commits): bring it up, so lag is right even when nothing
            // more arrives on this partition.
            let mut stored = Offsets::default();
            stored.0.insert((topic.clone(), *partition), next);
            commit::store(&self.consumer, &stored, &self.metrics);
            // Records before `next` that arrive anyway are dropped by `take`.
            if let Err(e) = self.consumer.seek(
                topic,
                *partition,
                rdkafka::Offset::Offset(next),
                Duration::from_secs(10),
            ) {
                tracing::warn!(%topic, partition, next, error = %e, "cannot seek; records before the stored offset are read and dropped");
            }
        }
        Ok(())
    }

    fn forget_revoked(&mut self) {
        if self.keeper.is_none() {
            // Assignments matter only to offsets kept by the sink; drop the notes.
            drop(self.consumer.context().take_assigned());
        }
        let revoked = self.revocations.take();
        if !revoked.is_empty() {
            let dropped = self.batch.forget_partitions(&revoked)
                + self
                    .window
                    .as_mut()
                    .map_or(0, |w| w.forget_partitions(&revoked));
            if dropped > 0 {
                tracing::info!(
                    dropped,
                    "unwritten records of revoked partitions left to their new owner"
                );
            }
        }
    }

    /// The batch is full: written, or with compaction folded into the window, which is
    /// written once it is full.
    async fn batch_full(&mut self) -> Result<(), EngineError> {
        if self.window.is_none() {
            return self.flush().await;
        }
        self.fold().await?;
        let Some(window) = self.window.as_ref() else {
            return Ok(());
        };
        // The window being written and this one keep `batch.maxBytes` at most together:
        // at that, this one closes and is written once the other is.
        let writing = self.writing.load(std::sync::atomic::Ordering::Relaxed);
        if window.is_full() || window.bytes() + writing >= window.max_bytes() {
            return self.flush().await;
        }
        Ok(())
    }

    /// With compaction: prepares the batch's records (on every core) and folds them into
    /// the window.
    async fn fold(&mut self) -> Result<(), EngineError> {
        let opened = self.batch.opened();
        let records = self.batch.take();
        if records.is_empty() {
            return Ok(());
        }
        let prepared = self
            .shards
            .prepare_compact(records)
            .await
            .map_err(|e| EngineError::Setup(format!("preparing the batch failed: {e}")))?;
        if let Some(window) = self.window.as_mut() {
            window.fold(prepared, opened);
        }
        Ok(())
    }

    /// With compaction: folds what is read and hands the window to the writer once the
    /// previous one is written; the engine goes back to reading while it is written.
    async fn flush_window(&mut self) -> Result<(), EngineError> {
        self.fold().await?;
        if self.window.as_ref().is_none_or(Window::is_empty) {
            return self.wait_for_writer().await;
        }
        // Records read meanwhile stay in the batch, for the next window.
        self.wait_for_writer().await?;
        // As for a batch: a rebalance from now on waits for this window; partitions
        // revoked until then are dropped from it.
        let guard = self.gate.clone().lock_owned().await;
        self.forget_revoked();
        let Some(closed) = self
            .window
            .as_mut()
            .filter(|w| !w.is_empty())
            .map(Window::take)
        else {
            return Ok(());
        };
        self.writing = closed.held();
        let Some(mut writer) = self.writer.take() else {
            return Err(EngineError::Setup("the batch writer is missing".into()));
        };
        let span = tracing::info_span!("batch", pipeline = %self.config.name);
        self.in_flight = Some(tokio::spawn(
            async move {
                let result = writer.write_window(closed).await;
                drop(guard);
                (writer, result)
            }
            .instrument(span),
        ));
        Ok(())
    }

    /// Starts preparing the batch (decode, filter, transform on every core) at once, and
    /// hands it to the writer once the previous batch is written (so per-key order and
    /// offset order hold); the engine goes back to reading while it is written.
    async fn flush(&mut self) -> Result<(), EngineError> {
        if self.window.is_some() {
            return self.flush_window().await;
        }
        self.forget_revoked();
        let records = self.batch.take();
        if records.is_empty() {
            return self.wait_for_writer().await;
        }
        let shards = self.shards.clone();
        let prepared = tokio::spawn(async move { shards.prepare(records).await });
        self.wait_for_writer().await?;
        // Taken before the write starts, so a rebalance from now on waits for this batch;
        // partitions revoked until then are dropped from it and from the next one.
        let guard = self.gate.clone().lock_owned().await;
        let revoked = self.revocations.take();
        if !revoked.is_empty() {
            self.batch.forget_partitions(&revoked);
        }
        let Some(mut writer) = self.writer.take() else {
            return Err(EngineError::Setup("the batch writer is missing".into()));
        };
        let span = tracing::info_span!("batch", pipeline = %self.config.name);
        self.in_flight = Some(tokio::spawn(
            async move {
                let result = match prepared.await {
                    Ok(Ok(mut prepared)) => {
                        let before = prepared.len();
                        prepared.retain(|p| {
                            !revoked
                                .iter()
                                .any(|(t, n)| *t == p.record.topic && *n == p.record.partition)
                        });
                        if prepared.len() < before {
                            tracing::info!(
                                dropped = before - prepared.len(),
                                "unwritten records of revoked partitions left to their new owner"
                            );
                        }
                        // A partition revoked and assigned back between two fetches can
                        // bring its records twice (read before the revocation, and again
                        // from the claimed position): each record is written once.
                        let mut seen = std::collections::HashSet::new();
                        let fetched = prepared.len();
                        prepared.retain(|p| {
                            seen.insert((
                                p.record.topic.clone(),
                                p.record.partition,
                                p.record.offset,
                            ))
                        });
                        if prepared.len() < fetched {
                            tracing::debug!(
                                repeated = fetched - prepared.len(),
                                "records fetched twice in one batch written once"
                            );
                        }
                        writer.write_batch(prepared).await
                    }
                    Ok(Err(e)) => Err(EngineError::Setup(format!(
                        "preparing the batch failed: {e}"
                    ))),
                    Err(e) => Err(EngineError::Setup(format!(
                        "preparing the batch failed: {e}"
                    ))),
                };
                drop(guard);
                (writer, result)
            }
            .instrument(span),
        ));
        Ok(())
    }
}

/// The engine's error for a retry loop that stopped without an outcome.
pub(super) fn stopped(what: &str, stopped: Stopped) -> EngineError {
    match stopped {
        Stopped::Fatal(e) => EngineError::Fatal {
            sink: what.to_owned(),
            message: e.message,
        },
        Stopped::Shutdown { .. } => EngineError::StoppedWhileUnavailable(what.to_owned()),
    }
}

type WriteResult = Result<(Writer, Result<(), EngineError>), tokio::task::JoinError>;

async fn wait_in_flight(
    in_flight: &mut Option<JoinHandle<(Writer, Result<(), EngineError>)>>,
) -> WriteResult {
    match in_flight {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
