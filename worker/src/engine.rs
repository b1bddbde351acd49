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

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt as _;
use futures::future::BoxFuture;
use rdkafka::consumer::{CommitMode, Consumer as _};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;
use weir_crds::Compaction;

use crate::batch::{Batch, Limits};
use crate::commit::{self, BeforeCommit, Commit, CommitError, Offsets, Positions, Transaction};
use crate::compaction::{Closed, Window};
use crate::config::WorkerConfig;
use crate::dead_letter::{DeadLetter, Failure};
use crate::metrics::{Metrics, SinkCounters};
use crate::record::Record;
use crate::retry::{Backoff, ErrorClass, Limit, Retrier, Stopped};
use crate::shards::{Prepared, Shards};
use crate::sink::{Rejected, Sink, SinkError, WriteInput};
use crate::source::{self, Consumer, Revocations};
use crate::transform::Transformer;

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

/// A sink of the pipeline with its name and counters.
#[derive(Debug)]
struct SinkSlot {
    name: String,
    sink: Arc<dyn Sink>,
    counters: Arc<SinkCounters>,
}

/// Everything a batch write needs. It moves into the task that writes a batch while the
/// engine reads the next one, and comes back when the write is done.
struct Writer {
    pipeline: String,
    sinks: Vec<SinkSlot>,
    dead_letter: Option<DeadLetter>,
    retrier: Retrier,
    metrics: Arc<Metrics>,
    consumer: Arc<Consumer>,
    commit: Commit,
    /// With compaction: how many of a window's events one write takes.
    chunk: usize,
    /// With compaction: decodes a window's kept events again, a chunk at a time.
    shards: Shards,
}

/// Where a write moves the consumed offsets.
#[derive(Clone, Copy, Debug)]
enum Advance<'a> {
    /// Past every record written.
    PastTheseRecords,
    /// To these (a compaction window's: past every record it read).
    To(&'a Offsets),
    /// Not yet: more of the window is to be written.
    NotYet,
}

/// What a write did.
#[derive(Clone, Copy, Debug, Default)]
struct Done {
    written: usize,
    dead_lettered: usize,
}

impl Writer {
    /// Prepares every sink, waiting out outages.
    async fn prepare_sinks(&self) -> Result<(), EngineError> {
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
    async fn replay(&self, replay: &crate::sink::Replay) -> Result<(), EngineError> {
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
    async fn write_batch(&mut self, prepared: Vec<Prepared>) -> Result<(), EngineError> {
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
    async fn write_window(&mut self, mut window: Closed) -> Result<(), EngineError> {
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

    fn written(&self, records: usize, done: Done, started: Instant) {
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
    async fn write(
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
    async fn write_committing(
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
    async fn dead_letter_all(
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
    fn store_offsets(&self, records: &[Record]) {
        commit::store(&self.consumer, &Offsets::after(records), &self.metrics);
    }
}

/// Dead-letters what a sink refuses inside its exactly-once transaction, before it commits.
struct RefusedFirst<'w> {
    writer: &'w Writer,
    records: &'w [Record],
    sink: &'w str,
    /// Why the pipeline must stop, when dead-lettering could not be done.
    stopped: std::sync::Mutex<Option<EngineError>>,
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

/// The engine's error for a retry loop that stopped without an outcome.
fn stopped(what: &str, stopped: Stopped) -> EngineError {
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
