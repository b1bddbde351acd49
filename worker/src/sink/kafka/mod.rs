//! The Kafka sink: each event becomes one record on a topic of the pipeline's cluster, or
//! of another one its `connectionRef` names (at least once only). At least once: an
//! idempotent producer acknowledged by all in-sync replicas, every record of
//! a batch awaited. Exactly once: a transactional producer; a transaction per batch carries
//! the records and the consumed offsets (`send_offsets_to_transaction` with the consumer's
//! group metadata), and any failure aborts it.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use serde_json::Value;
use weir_crds::{KafkaCompression, KafkaSink as KafkaSpec};

use super::{Rejected, Sink, SinkError, WriteInput, Written};
use crate::commit::{Commit, CommitError, Transaction};
use crate::kafka::{Admin, AdminError, Observer};
use crate::retry::ErrorClass;
use crate::transform::{Expression, Variables, context_with};

/// How long a transactional call may block.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What a producer needs from the worker: the pipeline's client settings, those of other
/// clusters a sink names in `connectionRef`, and, for a transactional producer, a stable
/// identity.
#[derive(Clone, Debug)]
pub struct Connection {
    pub client: ClientConfig,
    /// Names the pipeline's connection in log lines and errors.
    pub label: String,
    /// By KafkaConnection name.
    pub others: BTreeMap<String, ClientConfig>,
    /// `transactional.id`: the consumer group and the worker's instance id, so that a
    /// restarted worker fences its predecessor's producer.
    pub transactional_id: String,
}

/// One record ready to send.
struct Outgoing {
    index: usize,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

pub struct KafkaSink {
    topic: String,
    key: Option<Expression>,
    value: Option<Expression>,
    headers: Vec<(String, Expression)>,
    variables: Variables,
    /// Without a value expression or a transform, the record's value is sent as it is.
    value_as_is: bool,
    /// The connection's properties and the producer's, with the label naming the
    /// connection; `None` when only checked (no connection).
    settings: Option<Settings>,
    /// Created by `prepare`, once the topic's record size limit is known.
    producer: std::sync::OnceLock<FutureProducer<Observer>>,
    /// The topic's `max.message.bytes` (0 until `prepare` read it, or when it could not).
    max_bytes: std::sync::atomic::AtomicUsize,
    transactional: bool,
}

/// What `prepare` creates the producer from.
struct Settings {
    /// The connection's own properties (what an admin client of the cluster needs).
    connection: ClientConfig,
    producer: ClientConfig,
    /// Shared by every client of this sink and every attempt to prepare it, so the
    /// connection's failures are said once, then at most every 30 s.
    observer: Observer,
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .field("transactional", &self.transactional)
            .finish()
    }
}

impl KafkaSink {
    /// Compiles the expressions and, given a connection, creates the producer (it connects
    /// in the background; `prepare` checks the topic). `untouched`: the pipeline has no
    /// transform, so a record's value is its event.
    pub fn new(
        spec: &KafkaSpec,
        untouched: bool,
        exactly_once: bool,
        connection: Option<&Connection>,
    ) -> Result<Self, String> {
        let compile = |what: &str, source: &str| {
            Expression::compile(source).map_err(|e| format!("kafka.{what}: {e}"))
        };
        let key = spec.key.as_deref().map(|k| compile("key", k)).transpose()?;
        let value = spec
            .value
            .as_deref()
            .map(|v| compile("value", v))
            .transpose()?;
        let headers = spec
            .headers
            .iter()
            .map(|(name, source)| {
                Ok((
                    name.clone(),
                    compile(&format!("headers[{name:?}]"), source)?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let variables = key
            .iter()
            .chain(&value)
            .chain(headers.iter().map(|(_, e)| e))
            .fold(Variables::default(), |all, e| all.and(e.variables()));
        let settings = connection
            .map(|connection| settings(spec, exactly_once, connection))
            .transpose()?;
        Ok(Self {
            topic: spec.topic.clone(),
            value_as_is: value.is_none() && untouched,
            key,
            value,
            headers,
            variables,
            settings,
            producer: std::sync::OnceLock::new(),
            max_bytes: std::sync::atomic::AtomicUsize::new(0),
            transactional: exactly_once,
        })
    }

    fn producer(&self) -> Result<&FutureProducer<Observer>, SinkError> {
        self.producer.get().ok_or_else(|| {
            SinkError::new(
                ErrorClass::Fatal,
                "the kafka sink's producer is not created (built without a connection, or not prepared)",
            )
        })
    }

    /// Reads the topic's record size limit and creates the producer with batches under it,
    /// so a request of small records is never over the limit. A limit that cannot be read
    /// (the topic missing, DescribeConfigs refused, a cluster without it) is not enforced.
    async fn create_producer(&self, settings: &Settings) -> Result<(), SinkError> {
        let admin = Admin::with_observer(
            &settings.connection,
            settings.observer.clone(),
            Duration::from_secs(10),
        )
        .map_err(|e| SinkError::new(ErrorClass::Unavailable, e.to_string()))?;
        let limit = match admin.describe(&self.topic).await {
            Ok(state) => state
                .and_then(|s| s.configs.get("max.message.bytes").cloned())
                .and_then(|v| v.parse::<usize>().ok()),
            Err(e @ AdminError::Refused { .. }) => {
                tracing::debug!(topic = %self.topic, error = %e, "the topic's max.message.bytes cannot be read; not checked");
                None
            }
            Err(e) => return Err(SinkError::new(ErrorClass::Unavailable, e.to_string())),
        };
        let mut config = settings.producer.clone();
        if let Some(limit) = limit {
            self.max_bytes
                .store(limit, std::sync::atomic::Ordering::Relaxed);
            // librdkafka's default batch.size is 1,000,000 bytes.
            config.set(
                "batch.size",
                limit
                    .saturating_sub(BATCH_OVERHEAD)
                    .clamp(1, 1_000_000)
                    .to_string(),
            );
        }
        // Connection failures are said once, with their cause, then counted (not
        // librdkafka's lines on every attempt).
        let producer = config
            .create_with_context(settings.observer.clone())
            .map_err(|e| {
                SinkError::new(
                    ErrorClass::Fatal,
                    format!("cannot create the kafka sink's producer: {e}"),
                )
            })?;
        let _ = self.producer.set(producer);
        Ok(())
    }

    /// Refuses, before it is sent, a record the topic would refuse for its size (the
    /// broker refuses its whole produce request, and in a transaction the transaction).
    fn check_size(&self, record: &Outgoing) -> Result<(), String> {
        let limit = self.max_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if limit == 0 {
            return Ok(());
        }
        let size = record.key.as_ref().map_or(0, Vec::len)
            + record.value.as_ref().map_or(0, Vec::len)
            + record
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len) + 8)
                .sum::<usize>()
            + BATCH_OVERHEAD;
        if size > limit {
            return Err(format!(
                "the record is about {size} bytes, over topic {}'s max.message.bytes ({limit}): raise the topic's limit, or make the record smaller",
                self.topic
            ));
        }
        Ok(())
    }

    /// The records of a batch, and the events refused before sending (an expression that
    /// fails, a record over the topic's size limit).
    fn outgoing(&self, input: &[WriteInput<'_>]) -> (Vec<Outgoing>, Vec<Rejected>) {
        let mut out = Vec::with_capacity(input.len());
        let mut rejected = Vec::new();
        for item in input {
            match self
                .record(item)
                .and_then(|record| self.check_size(&record).map(|()| record))
            {
                Ok(record) => out.push(record),
                Err(reason) => rejected.push(Rejected {
                    index: item.index,
                    class: ErrorClass::Permanent,
                    reason,
                }),
            }
        }
        (out, rejected)
    }

    fn record(&self, item: &WriteInput<'_>) -> Result<Outgoing, String> {
        let context = context_with(item.record, item.event, self.variables);
        let key = match &self.key {
            Some(expression) => match expression.eval(&context)? {
                Value::Null => None,
                Value::String(s) => Some(s.into_bytes()),
                other => Some(other.to_string().into_bytes()),
            },
            None => item.record.key.clone(),
        };
        let value = match &self.value {
            Some(expression) => match expression.eval(&context)? {
                Value::Null => None,
                Value::String(s) => Some(s.into_bytes()),
                other => Some(other.to_string().into_bytes()),
            },
            None if self.value_as_is => item.record.payload.clone(),
            None => Some(item.event.to_string().into_bytes()),
        };
        let mut set: Vec<(&str, Option<Vec<u8>>)> = Vec::with_capacity(self.headers.len());
        for (name, expression) in &self.headers {
            let value = match expression.eval(&context)? {
                Value::Null => None,
                Value::String(s) => Some(s.into_bytes()),
                other => Some(other.to_string().into_bytes()),
            };
            set.push((name, value));
        }
        let mut headers = OwnedHeaders::new_with_capacity(item.record.headers.len() + set.len());
        for (name, value) in &item.record.headers {
            if !set.iter().any(|(n, _)| n == name) {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
        }
        for (name, value) in &set {
            headers = headers.insert(Header {
                key: name,
                value: value.as_ref(),
            });
        }
        Ok(Outgoing {
            index: item.index,
            key,
            value,
            headers,
        })
    }

    /// Sends every record and waits for every acknowledgement; the records in `singly`
    /// last, each alone (its acknowledgement awaited before the next is sent, so it is a
    /// produce request of its own).
    async fn send_all(
        &self,
        records: Vec<Outgoing>,
        singly: &HashSet<usize>,
    ) -> Result<Sent, SinkError> {
        let producer = self.producer()?;
        let (alone, batched): (Vec<Outgoing>, Vec<Outgoing>) =
            records.into_iter().partition(|r| singly.contains(&r.index));
        let mut pending: std::collections::VecDeque<(usize, DeliveryFuture)> =
            std::collections::VecDeque::with_capacity(batched.len());
        let mut sent = Sent::default();
        for record in batched.into_iter().chain(alone) {
            loop {
                let mut message = FutureRecord::to(&self.topic).headers(record.headers.clone());
                if let Some(key) = &record.key {
                    message = message.key(key);
                }
                if let Some(value) = &record.value {
                    message = message.payload(value);
                }
                match producer.send_result(message) {
                    Ok(delivery) => {
                        pending.push_back((record.index, delivery));
                        break;
                    }
                    // The producer's queue is full: wait for the oldest record, then retry.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        match pending.pop_front() {
                            Some((index, delivery)) => sent.settle(index, delivery.await),
                            None => tokio::task::yield_now().await,
                        }
                    }
                    Err((e, _)) => {
                        match classify(&e) {
                            ErrorClass::Permanent => sent.before_sending.push(Rejected {
                                index: record.index,
                                class: ErrorClass::Permanent,
                                reason: format!("topic {}: {e}", self.topic),
                            }),
                            class => {
                                sent.failure
                                    .get_or_insert(SinkError::new(class, e.to_string()));
                            }
                        }
                        break;
                    }
                }
            }
            if singly.contains(&record.index) {
                while let Some((index, delivery)) = pending.pop_front() {
                    sent.settle(index, delivery.await);
                }
            }
        }
        for (index, delivery) in pending {
            sent.settle(index, delivery.await);
        }
        Ok(sent)
    }

    /// One transaction: begin, send, dead-letter what was refused, send the offsets,
    /// commit. Any failure aborts it.
    async fn transaction(
        &self,
        input: &[WriteInput<'_>],
        tx: &Transaction<'_>,
    ) -> Result<Written, CommitError> {
        let producer = self.producer()?;
        let metadata = tx.group_metadata.ok_or_else(|| {
            CommitError::Fenced("the consumer is not in its group (no group metadata)".into())
        })?;
        blocking(|| producer.begin_transaction()).map_err(transaction_error)?;
        match self.in_transaction(producer, input, tx, metadata).await {
            Ok(written) => Ok(written),
            Err(e) => Err(abort(producer, e)),
        }
    }

    /// Sends the batch, dead-letters what was refused before sending, sends the offsets and
    /// commits, inside the open transaction.
    async fn in_transaction(
        &self,
        producer: &FutureProducer<Observer>,
        input: &[WriteInput<'_>],
        tx: &Transaction<'_>,
        metadata: &ConsumerGroupMetadata,
    ) -> Result<Written, CommitError> {
        let (records, mut rejected) = self.outgoing(input);
        // A record that failed in a transaction makes it abortable: the batch is tried
        // again in a new one.
        let retried = |e: SinkError| {
            CommitError::Sink(SinkError::new(
                match e.class {
                    ErrorClass::Fatal => ErrorClass::Fatal,
                    ErrorClass::Unavailable => ErrorClass::Unavailable,
                    _ => ErrorClass::Transient,
                },
                e.message,
            ))
        };
        let sent = self
            .send_all(records, &HashSet::new())
            .await
            .map_err(retried)?;
        // A record the broker refused leaves the transaction unable to commit: it is
        // aborted and the batch tried again (the record is not dead-lettered: see
        // docs/worker.md).
        if let Some(e) = sent.failure {
            return Err(retried(e));
        }
        if let Some(refused) = sent.by_broker.first() {
            return Err(retried(SinkError::new(
                ErrorClass::Transient,
                format!(
                    "the broker refused a record of the transaction ({}): it is aborted",
                    refused.reason
                ),
            )));
        }
        rejected.extend(sent.before_sending);
        rejected.sort_by_key(|r| r.index);
        tx.before_commit.dead_letter(&rejected).await?;
        let offsets = tx.offsets.to_list();
        blocking(|| producer.send_offsets_to_transaction(&offsets, metadata, TRANSACTION_TIMEOUT))
            .map_err(transaction_error)?;
        blocking(|| producer.commit_transaction(TRANSACTION_TIMEOUT)).map_err(transaction_error)?;
        Ok(Written {
            rejected,
            skipped: 0,
        })
    }
}

/// Aborts the open transaction whatever the failure, so readers never wait on it, and
/// returns the failure; fencing when the abort finds the producer fenced (a producer fenced
/// by its id cannot abort: the broker aborted it already).
fn abort(producer: &FutureProducer<Observer>, cause: CommitError) -> CommitError {
    if let Err(abort) = blocking(|| producer.abort_transaction(TRANSACTION_TIMEOUT)) {
        tracing::warn!(error = %abort, "aborting the transaction failed");
        if let CommitError::Fenced(_) = transaction_error(abort) {
            return match cause {
                CommitError::Fenced(_) => cause,
                other => CommitError::Fenced(other.to_string()),
            };
        }
    }
    cause
}

/// What a batch's sending left: records refused before they were sent (librdkafka's own
/// checks: they never reach a transaction), records the broker refused, and the first
/// other failure.
#[derive(Default)]
struct Sent {
    before_sending: Vec<Rejected>,
    by_broker: Vec<Rejected>,
    failure: Option<SinkError>,
}

impl Sent {
    /// Adds one acknowledgement's outcome.
    fn settle(
        &mut self,
        index: usize,
        delivered: Result<
            rdkafka::producer::future_producer::OwnedDeliveryResult,
            futures::channel::oneshot::Canceled,
        >,
    ) {
        match delivered {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => match classify(&e) {
                ErrorClass::Permanent => self.by_broker.push(Rejected {
                    index,
                    class: ErrorClass::Permanent,
                    reason: e.to_string(),
                }),
                class => {
                    self.failure
                        .get_or_insert(SinkError::new(class, e.to_string()));
                }
            },
            Err(_) => {
                self.failure.get_or_insert(SinkError::new(
                    ErrorClass::Transient,
                    "the producer dropped a record before its acknowledgement",
                ));
            }
        }
    }
}

impl Sink for KafkaSink {
    /// Checks the topic exists; with exactly-once, registers the transactional id (which
    /// aborts what a predecessor with the same id left open, and fences it).
    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let settings = self.settings.as_ref().ok_or_else(|| {
                SinkError::new(
                    ErrorClass::Fatal,
                    "the kafka sink was built without a connection",
                )
            })?;
            if self.producer.get().is_none() {
                self.create_producer(settings).await?;
            }
            let producer = self.producer()?;
            let metadata = blocking(|| {
                producer
                    .client()
                    .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            })
            .map_err(|e| SinkError::new(ErrorClass::Unavailable, e.to_string()))?;
            let missing = metadata.topics().iter().any(|t| {
                t.name() == self.topic && (t.error().is_some() || t.partitions().is_empty())
            });
            if missing {
                return Err(SinkError::new(
                    ErrorClass::Fatal,
                    format!(
                        "topic {:?} does not exist: create it (a KafkaTopic) first",
                        self.topic
                    ),
                ));
            }
            if self.transactional {
                blocking(|| producer.init_transactions(TRANSACTION_TIMEOUT)).map_err(|e| {
                    SinkError::new(
                        match transaction_error(e.clone()) {
                            CommitError::Fenced(_) => ErrorClass::Fatal,
                            _ => ErrorClass::Unavailable,
                        },
                        format!("cannot start transactions: {e}"),
                    )
                })?;
            }
            Ok(())
        })
    }

    fn write<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
    ) -> BoxFuture<'a, Result<Written, SinkError>> {
        Box::pin(async move {
            if self.transactional {
                return Err(SinkError::new(
                    ErrorClass::Fatal,
                    "a transactional kafka sink writes only with its offsets",
                ));
            }
            let (records, mut rejected) = self.outgoing(input);
            let sent = self.send_all(records, &HashSet::new()).await?;
            if let Some(e) = sent.failure {
                return Err(e);
            }
            rejected.extend(sent.before_sending);
            // The broker refuses a whole produce request over the topic's
            // max.message.bytes: what it refused is sent again record by record, and only
            // a record refused alone is dead-lettered.
            if sent.by_broker.len() > 1 {
                let again: HashSet<usize> = sent.by_broker.iter().map(|r| r.index).collect();
                let refused: Vec<WriteInput<'_>> = input
                    .iter()
                    .filter(|i| again.contains(&i.index))
                    .copied()
                    .collect();
                let (records, _) = self.outgoing(&refused);
                let alone = self.send_all(records, &again).await?;
                if let Some(e) = alone.failure {
                    return Err(e);
                }
                rejected.extend(alone.before_sending);
                rejected.extend(alone.by_broker);
            } else {
                rejected.extend(sent.by_broker);
            }
            rejected.sort_by_key(|r| r.index);
            Ok(Written {
                rejected,
                skipped: 0,
            })
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(producer) = self.producer.get()
                && let Err(e) = blocking(|| producer.flush(Duration::from_secs(10)))
            {
                tracing::warn!(error = %e, "flushing the kafka sink's producer failed");
            }
        })
    }

    fn reads_event(&self) -> bool {
        !self.value_as_is || self.variables.reads_event()
    }

    fn commit(&self) -> Commit {
        if self.transactional {
            Commit::KafkaTransaction
        } else {
            Commit::Group
        }
    }

    fn write_committing<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
        tx: &'a Transaction<'a>,
    ) -> BoxFuture<'a, Result<Written, CommitError>> {
        Box::pin(self.transaction(input, tx))
    }
}

/// A record batch's own bytes besides its records' keys, values and headers (the batch
/// header, one record's length fields and attributes), so a size check errs on the safe side.
const BATCH_OVERHEAD: usize = 128;

fn settings(
    spec: &KafkaSpec,
    exactly_once: bool,
    connection: &Connection,
) -> Result<Settings, String> {
    let (base, label) = match &spec.connection_ref {
        // Another cluster: at least once (validate() refuses ExactlyOnce with it).
        Some(reference) => (
            connection
                .others
                .get(&reference.name)
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "kafka.connectionRef: KafkaConnection {:?} was not given to the worker",
                        reference.name
                    )
                })?,
            format!("KafkaConnection {} (a kafka sink's)", reference.name),
        ),
        None => (connection.client.clone(), connection.label.clone()),
    };
    let mut config = base.clone();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The Java producer's hash: a key lands on the partition Java clients choose.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .set(
            "compression.type",
            match spec.compression {
                KafkaCompression::None => "none",
                KafkaCompression::Gzip => "gzip",
                KafkaCompression::Snappy => "snappy",
                KafkaCompression::Lz4 => "lz4",
            },
        );
    if exactly_once {
        config
            .set("transactional.id", &connection.transactional_id)
            .set("transaction.timeout.ms", "60000");
    }
    Ok(Settings {
        connection: base,
        producer: config,
        observer: Observer::new(label),
    })
}

/// Runs a call that blocks (librdkafka's transactional calls) off the async workers.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

/// A produce error: the record itself refused (too large, invalid), or the broker not
/// reachable, or something else that may pass.
fn classify(error: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode::*;
    match error.rdkafka_error_code() {
        Some(MessageSizeTooLarge | InvalidMessageSize | InvalidMessage | InvalidRecord) => {
            ErrorClass::Permanent
        }
        Some(UnknownTopicOrPartition | UnknownTopic | TopicAuthorizationFailed) => {
            ErrorClass::Fatal
        }
        Some(
            MessageTimedOut
            | AllBrokersDown
            | BrokerTransportFailure
            | NetworkException
            | LeaderNotAvailable
            | NotLeaderForPartition,
        ) => ErrorClass::Unavailable,
        _ => ErrorClass::Transient,
    }
}

/// A transactional call's error: fencing (another producer with the same id, or a consumer
/// group that moved on) stops this worker; anything else aborts the transaction and the
/// batch is tried again.
fn transaction_error(error: KafkaError) -> CommitError {
    use RDKafkaErrorCode::*;
    let fatal = matches!(&error, KafkaError::Transaction(e) if e.is_fatal());
    let code = error.rdkafka_error_code();
    let fenced = fatal
        || matches!(
            code,
            Some(
                ProducerFenced
                    | InvalidProducerEpoch
                    | FencedInstanceId
                    | IllegalGeneration
                    | UnknownMemberId
                    | TransactionalIdAuthorizationFailed
            )
        );
    if fenced {
        return CommitError::Fenced(format!(
            "the Kafka transaction was refused ({error}): another worker owns these partitions or this producer's id"
        ));
    }
    CommitError::Sink(SinkError::new(
        match code {
            Some(AllBrokersDown | BrokerTransportFailure | MessageTimedOut) => {
                ErrorClass::Unavailable
            }
            _ => ErrorClass::Transient,
        },
        format!("the Kafka transaction failed and was aborted: {error}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_too_large_record_is_refused_alone_and_an_outage_fails_the_write() {
        assert_eq!(
            classify(&KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge
            )),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify(&KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut
            )),
            ErrorClass::Unavailable
        );
    }

    #[test]
    fn a_fenced_producer_stops_and_other_transaction_failures_are_retried() {
        assert!(matches!(
            transaction_error(KafkaError::MessageProduction(
                RDKafkaErrorCode::ProducerFenced
            )),
            CommitError::Fenced(_)
        ));
        assert!(matches!(
            transaction_error(KafkaError::MessageProduction(
                RDKafkaErrorCode::CoordinatorLoadInProgress
            )),
            CommitError::Sink(_)
        ));
    }
}
