//! The run loop: consume → decode/filter/transform → batch → sinks → dead letters → commit.
//!
//! A closed batch is written in its own task while the engine reads the next one; the next
//! write starts only when the previous one is done. A batch's offsets are stored only after every sink
//! acknowledged it and every refused record is on the dead-letter topic; librdkafka commits
//! stored offsets every second, before giving up revoked partitions and on close. So a
//! worker killed at any instant resumes from a point before anything unacknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt as _;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::batch::{Batch, Limits};
use crate::config::WorkerConfig;
use crate::dead_letter::{DeadLetter, Failure};
use crate::metrics::Metrics;
use crate::record::Record;
use crate::retry::{Backoff, ErrorClass};
use crate::sink::{Rejected, Sink, WriteInput};
use crate::source::{self, Consumer, Revocations};
use crate::transform::Transformer;
use weir_crds::PayloadFormat;

/// A consumed record and its event: decoded and transformed as it arrives, so this work
/// overlaps the write of the previous batch instead of delaying the next one. `Ok(None)`:
/// filtered out; `Err`: undecodable or failing its transform (a dead letter).
#[derive(Debug)]
struct Pending {
    record: Record,
    event: Result<Option<Value>, String>,
}

impl crate::batch::Batched for Pending {
    fn record(&self) -> &Record {
        &self.record
    }
}

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
    batch: Batch<Pending>,
    format: PayloadFormat,
    transformer: Transformer,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
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
        let sinks =
            Sink::from_spec(&config.spec, &config.consumer_group()).map_err(EngineError::Setup)?;
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
        let format = config.spec.source.format;
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let (consumer, revocations) = source::consumer(&config, metrics.clone(), gate.clone())?;
        let consumer = Arc::new(consumer);
        let writer = Writer {
            pipeline: config.name.clone(),
            sinks,
            dead_letter,
            backoff: Backoff::from_spec(&config.spec.retry),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            consumer: consumer.clone(),
        };
        Ok(Self {
            config,
            consumer,
            revocations,
            gate,
            writer: Some(writer),
            in_flight: None,
            batch: Batch::new(limits),
            format,
            transformer,
            metrics,
            shutdown,
        })
    }

    /// Runs until shutdown is signalled: then the batch in flight is written and committed
    /// and the consumer leaves its group.
    pub async fn run(mut self) -> Result<(), EngineError> {
        if let Some(writer) = &self.writer {
            for (name, sink) in &writer.sinks {
                writer.retry_unavailable(name, || sink.prepare()).await?;
            }
        }
        self.metrics.set_ready(true);
        tracing::info!(
            pipeline = %self.config.name,
            group = %self.config.consumer_group(),
            topics = ?self.config.spec.source.topics,
            "consuming"
        );
        let mut flushed = self.consume().await;
        // Finish the batches in flight, commit, leave the group, whatever stopped the loop.
        if flushed.is_ok() {
            flushed = self.flush().await;
        }
        let settled = self.settle().await;
        let flushed = flushed.and(settled);
        if flushed.is_ok() {
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
            for (_, sink) in &writer.sinks {
                sink.close().await;
            }
        }
        flushed
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
            let deadline = self.batch.deadline();
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
                    self.take(first);
                    // Take whatever else is already fetched without going back through the
                    // select (one timer and one wake-up per record would cost more than
                    // the record).
                    while !self.batch.is_full() {
                        let next = match self.consumer.recv().now_or_never() {
                            Some(message) => message.map(|m| source::owned(&m)),
                            None => break,
                        };
                        self.take(next);
                    }
                    self.forget_revoked();
                    if self.batch.is_full() {
                        self.flush().await?;
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
                    let record = message.map(|m| source::owned(&m));
                    self.take(record);
                    self.forget_revoked();
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
            Ok(record) => {
                Metrics::add(&self.metrics.consumed, 1);
                let event = record
                    .decode(self.format)
                    .map_err(|e| format!("decode: {e}"))
                    .and_then(|event| {
                        self.transformer
                            .apply(&record, event)
                            .map_err(|e| format!("transform: {e}"))
                    });
                self.batch.push(Pending { record, event });
            }
            Err(e) => tracing::warn!(error = %e, "consumer error; retrying"),
        }
    }

    fn forget_revoked(&mut self) {
        let revoked = self.revocations.take();
        if !revoked.is_empty() {
            let dropped = self.batch.forget_partitions(&revoked);
            if dropped > 0 {
                tracing::info!(
                    dropped,
                    "unwritten records of revoked partitions left to their new owner"
                );
            }
        }
    }

    /// Hands the batch to the writer once the previous batch is written (so per-key order
    /// and offset order hold), and goes back to reading while it is written.
    async fn flush(&mut self) -> Result<(), EngineError> {
        self.wait_for_writer().await?;
        // Taken before the task starts, so a rebalance from now on waits for this batch;
        // partitions revoked until then are dropped from it.
        let guard = self.gate.clone().lock_owned().await;
        self.forget_revoked();
        let pending = self.batch.take();
        if pending.is_empty() {
            return Ok(());
        }
        let Some(mut writer) = self.writer.take() else {
            return Err(EngineError::Setup("the batch writer is missing".into()));
        };
        let span =
            tracing::info_span!("batch", pipeline = %self.config.name, records = pending.len());
        self.in_flight = Some(tokio::spawn(
            async move {
                let result = writer.write_batch(pending).await;
                drop(guard);
                (writer, result)
            }
            .instrument(span),
        ));
        Ok(())
    }
}

/// Everything a batch write needs. It moves into the task that writes a batch while the
/// engine reads the next one, and comes back when the write is done.
struct Writer {
    pipeline: String,
    sinks: Vec<(String, Sink)>,
    dead_letter: Option<DeadLetter>,
    backoff: Backoff,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    consumer: Arc<Consumer>,
}

impl Writer {
    async fn write_batch(&mut self, pending: Vec<Pending>) -> Result<(), EngineError> {
        let started = Instant::now();
        let mut failures: BTreeMap<usize, Failure> = BTreeMap::new();
        let mut events: Vec<(usize, Value)> = Vec::with_capacity(pending.len());
        let mut records: Vec<Record> = Vec::with_capacity(pending.len());
        let now = SystemTime::now();
        for (index, Pending { record, event }) in pending.into_iter().enumerate() {
            records.push(record);
            match event {
                Ok(Some(event)) => events.push((index, event)),
                Ok(None) => Metrics::add(&self.metrics.filtered, 1),
                Err(reason) => {
                    failures.insert(
                        index,
                        Failure {
                            class: ErrorClass::Permanent,
                            reason,
                            attempts: 1,
                            first_failure: now,
                        },
                    );
                }
            }
        }

        for i in 0..self.sinks.len() {
            let input: Vec<WriteInput<'_>> = events
                .iter()
                .filter(|(index, _)| !failures.contains_key(index))
                .map(|(index, event)| WriteInput {
                    index: *index,
                    record: &records[*index],
                    event,
                })
                .collect();
            if input.is_empty() {
                continue;
            }
            let rejected = self.write_with_retries(i, &input).await?;
            Metrics::add(&self.metrics.skipped, self.sinks[i].1.take_skipped());
            for Rejected {
                index,
                class,
                reason,
            } in rejected
            {
                let sink = &self.sinks[i].0;
                failures.entry(index).or_insert(Failure {
                    class,
                    reason: format!("sink {sink}: {reason}"),
                    attempts: 1,
                    first_failure: SystemTime::now(),
                });
            }
        }

        if !failures.is_empty() {
            self.dead_letter_all(&records, &failures).await?;
        }
        let written = events
            .iter()
            .filter(|(i, _)| !failures.contains_key(i))
            .count();
        Metrics::add(&self.metrics.written, written);
        self.store_offsets(&records);
        self.metrics
            .observe_batch(records.len(), started.elapsed().as_secs_f64());
        tracing::debug!(
            pipeline = %self.pipeline,
            records = records.len(),
            written,
            dead_lettered = failures.len(),
            millis = started.elapsed().as_millis() as u64,
            "batch written"
        );
        Ok(())
    }

    /// One sink's write with the retry policy: unavailable destinations are retried without
    /// limit (the worker reports not-ready), transient failures up to `retry.attempts` tries
    /// (then every record of the write is refused), fatal ones stop the pipeline.
    async fn write_with_retries(
        &mut self,
        sink_index: usize,
        input: &[WriteInput<'_>],
    ) -> Result<Vec<Rejected>, EngineError> {
        let mut attempt = 1u32;
        loop {
            let (name, sink) = &mut self.sinks[sink_index];
            match sink.write(input).await {
                Ok(rejected) => {
                    self.metrics.set_ready(true);
                    return Ok(rejected);
                }
                Err(e) => match e.class {
                    ErrorClass::Fatal => {
                        return Err(EngineError::Fatal {
                            sink: name.clone(),
                            message: e.message,
                        });
                    }
                    ErrorClass::Transient | ErrorClass::Permanent
                        if attempt >= self.backoff.attempts =>
                    {
                        tracing::warn!(sink = %name, attempts = attempt, error = %e.message, "giving up on this write");
                        return Ok(input
                            .iter()
                            .map(|item| Rejected {
                                index: item.index,
                                class: ErrorClass::Transient,
                                reason: format!("{} (after {attempt} attempts)", e.message),
                            })
                            .collect());
                    }
                    class => {
                        if class == ErrorClass::Unavailable {
                            self.metrics.set_ready(false);
                        }
                        let name = name.clone();
                        tracing::warn!(sink = %name, attempt, class = class.as_str(), error = %e.message, "write failed; retrying");
                        Metrics::add(&self.metrics.retries, 1);
                        self.pause(attempt, &name).await?;
                        attempt += 1;
                    }
                },
            }
        }
    }

    /// Waits out the backoff for `attempt`, unless shutdown is asked for.
    async fn pause(&self, attempt: u32, what: &str) -> Result<(), EngineError> {
        let delay = self.backoff.delay(attempt, fastrand::f64());
        let mut shutdown = self.shutdown.clone();
        if *shutdown.borrow() {
            return Err(EngineError::StoppedWhileUnavailable(what.to_owned()));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = shutdown.changed() => Err(EngineError::StoppedWhileUnavailable(what.to_owned())),
        }
    }

    async fn retry_unavailable<F, Fut>(&self, name: &str, mut op: F) -> Result<(), EngineError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), crate::sink::SinkError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(()) => return Ok(()),
                Err(e) if e.class == ErrorClass::Fatal => {
                    return Err(EngineError::Fatal {
                        sink: name.to_owned(),
                        message: e.message,
                    });
                }
                Err(e) => {
                    self.metrics.set_ready(false);
                    tracing::warn!(sink = %name, attempt, error = %e.message, "sink not ready; retrying");
                    self.pause(attempt, name).await?;
                    attempt += 1;
                }
            }
        }
    }

    async fn dead_letter_all(
        &mut self,
        records: &[Record],
        failures: &BTreeMap<usize, Failure>,
    ) -> Result<(), EngineError> {
        Metrics::add(&self.metrics.failed, failures.len());
        let Some(dead_letter) = self.dead_letter.clone() else {
            let Some((index, failure)) = failures.iter().next() else {
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
        for (index, failure) in failures {
            let record = &records[*index];
            tracing::warn!(
                topic = %record.topic, partition = record.partition, offset = record.offset,
                class = failure.class.as_str(), reason = %failure.reason,
                dead_letter = %dead_letter.topic(), "record dead-lettered"
            );
            let mut attempt = 1;
            loop {
                match dead_letter.send(record, failure).await {
                    Ok(()) => break,
                    Err(e) => {
                        self.metrics.set_ready(false);
                        tracing::warn!(error = %e, attempt, "dead-letter produce failed; retrying");
                        Metrics::add(&self.metrics.retries, 1);
                        self.pause(attempt, "the dead-letter topic").await?;
                        attempt += 1;
                    }
                }
            }
            Metrics::add(&self.metrics.dead_lettered, 1);
        }
        Ok(())
    }

    /// Stores, per partition, the offset after the batch's last record, for the next commit.
    fn store_offsets(&self, records: &[Record]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for record in records {
            let entry = next
                .entry((record.topic.as_str(), record.partition))
                .or_insert(0);
            *entry = (*entry).max(record.offset + 1);
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in &next {
            if let Err(e) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
                tracing::warn!(error = %e, "cannot build the commit");
            }
        }
        // A failed store (the partition was revoked meanwhile) is not a loss: the records
        // were applied and the next owner reads them again (at-least-once).
        match self.consumer.store_offsets(&list) {
            Ok(()) => Metrics::add(&self.metrics.commits, 1),
            Err(e) => {
                tracing::warn!(error = %e, "offset store failed; records will be read again")
            }
        }
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
