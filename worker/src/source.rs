//! The Kafka consumer: the pipeline's group, manual offsets, cooperative rebalancing, and a
//! bounded prefetch so memory stays flat however large the lag.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rdkafka::consumer::{ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};
use weir_crds::StartPosition;

use crate::config::WorkerConfig;
use crate::kafka::Observer;
use crate::metrics::Metrics;
use crate::record::Record;

/// Partitions taken away from this worker, noted by the rebalance callback (which runs
/// inside the consumer's poll, on the engine's task) for the engine to act on.
#[derive(Clone, Debug, Default)]
pub struct Revocations(Arc<Mutex<Vec<(String, i32)>>>);

impl Revocations {
    pub fn take(&self) -> Vec<(String, i32)> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// Records revocations (librdkafka does the incremental assignment itself) and publishes
/// the lag librdkafka's statistics report.
#[derive(Debug)]
pub struct SourceContext {
    revocations: Revocations,
    /// Partitions assigned, for an engine that keeps offsets in the sink to claim.
    assigned: Revocations,
    metrics: Arc<Metrics>,
    gate: Arc<tokio::sync::Mutex<()>>,
    /// Classifies and logs (throttled) what librdkafka reports about the connection.
    observer: Observer,
}

impl ClientContext for SourceContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.observer.log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let all_down =
            error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown);
        let failure = self.observer.failed(error.rdkafka_error_code(), reason);
        if all_down || failure.cause.needs_a_change() {
            // Not ready until the connection works again.
            self.metrics.set_ready(false);
        }
    }

    fn stats(&self, statistics: Statistics) {
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.observer.connected();
            self.metrics.set_ready(true);
        }
        let mut lag = BTreeMap::new();
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                // -1 is librdkafka's internal partition; a negative lag means unknown.
                if partition >= 0 && p.consumer_lag >= 0 {
                    lag.insert((topic.clone(), partition), p.consumer_lag);
                }
            }
        }
        self.metrics.set_lag(lag);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                let revoked = list(partitions);
                // Wait for the batch being written: its records of these partitions land and
                // their offsets are stored before librdkafka commits and lets them go.
                let _written = self.wait_for_write();
                tracing::info!(partitions = ?revoked, "partitions revoked");
                if let Ok(mut pending) = self.revocations.0.lock() {
                    pending.extend(revoked);
                }
            }
            Rebalance::Assign(partitions) => {
                let assigned = list(partitions);
                tracing::info!(partitions = ?assigned, "partitions assigned");
                if let Ok(mut pending) = self.assigned.0.lock() {
                    pending.extend(assigned);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

impl SourceContext {
    /// An error the consumer's poll returned: counted with the connection's other
    /// failures, logged only as the throttle allows.
    pub fn consumer_error(&self, error: &rdkafka::error::KafkaError) {
        self.observer.consumer_error(error);
    }

    /// The partitions assigned since the last call.
    pub fn take_assigned(&self) -> Vec<(String, i32)> {
        self.assigned.take()
    }

    /// Takes the write gate, blocking this thread (the callback runs inside the consumer's
    /// poll, on the engine's task; tokio moves that worker's other tasks elsewhere
    /// meanwhile).
    fn wait_for_write(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                Some(tokio::task::block_in_place(|| {
                    handle.block_on(self.gate.clone().lock_owned())
                }))
            }
            // Outside a multi-threaded runtime nothing can be written concurrently.
            _ => self.gate.clone().try_lock_owned().ok(),
        }
    }
}

fn list(partitions: &TopicPartitionList) -> Vec<(String, i32)> {
    partitions
        .elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

pub type Consumer = StreamConsumer<SourceContext>;

/// A consumer in the pipeline's group, subscribed to its topics.
pub fn consumer(
    config: &WorkerConfig,
    metrics: Arc<Metrics>,
    gate: Arc<tokio::sync::Mutex<()>>,
) -> Result<(Consumer, Revocations), rdkafka::error::KafkaError> {
    let context = SourceContext {
        revocations: Revocations::default(),
        assigned: Revocations::default(),
        metrics,
        gate,
        observer: Observer::new(config.connection.clone()),
    };
    let revocations = context.revocations.clone();
    let reset = match config.spec.source.start_position {
        StartPosition::Earliest => "earliest",
        StartPosition::Latest => "latest",
    };
    // Per partition: about two batches' worth, so the next batch is ready when the last
    // one is written, without queueing hundreds of thousands of records.
    // With compaction, records are read into a window a chunk of at most 1000 at a time.
    let read_at_once = match config.spec.batch.compaction {
        weir_crds::Compaction::LastWriteWins => config.spec.batch.max_records.clamp(1, 1000),
        weir_crds::Compaction::None => config.spec.batch.max_records.max(1),
    };
    let prefetch_records = (read_at_once as usize * 2).clamp(1000, 100_000);
    let mut client = config.kafka.clone();
    // The worker's identity (the pod name) names its client, not a static group member:
    // librdkafka sends no LeaveGroup for a static member, so a stopped worker's
    // partitions would sit unowned for the session timeout, and a Deployment's pods never
    // come back under the same name to claim them. A dynamic member leaves on close, and
    // the others take its partitions at their next heartbeat.
    if let Some(id) = &config.instance_id {
        client.set("client.id", id);
    }
    let consumer: Consumer = client
        .set("group.id", config.consumer_group())
        // The engine stores a partition's offset only after every sink acknowledged the
        // records before it; librdkafka commits stored offsets every second, before it gives
        // up revoked partitions, and on close.
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", reset)
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Bounded prefetch: librdkafka stops fetching when this much is queued, which is
        // how backpressure reaches the broker without the engine buffering anything.
        .set("queued.max.messages.kbytes", "4096")
        .set("queued.min.messages", prefetch_records.to_string())
        // When the queue is full, look again soon: the default (1 s) stalls a worker that
        // drains its queue in milliseconds.
        .set("fetch.queue.backoff.ms", "5")
        .set("fetch.max.bytes", "2097152")
        // Per partition and fetch. A compressed batch is held decompressed until its last
        // record is consumed: with librdkafka's 1 MiB, six partitions of lz4 batches kept
        // about 25 MiB more resident than 128 KiB does, with no throughput difference
        // measured (docs/benchmarks.md). The broker still sends a larger batch whole.
        .set("max.partition.fetch.bytes", "131072")
        .set("session.timeout.ms", "10000")
        .set("statistics.interval.ms", "5000")
        .set("heartbeat.interval.ms", "1000")
        .create_with_context(context)?;
    let topics: Vec<&str> = config
        .spec
        .source
        .topics
        .iter()
        .map(String::as_str)
        .collect();
    rdkafka::consumer::Consumer::subscribe(&consumer, &topics)?;
    Ok((consumer, revocations))
}

/// Copies a message out of the consumer's buffers.
pub fn owned(message: &BorrowedMessage<'_>) -> Record {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        timestamp: message.timestamp().to_millis(),
        headers,
    }
}
