//! The Kafka admin operations the operator needs (topics; a group's committed offsets and
//! the high watermarks, for lag), each bounded by a timeout so a slow or unreachable
//! broker fails the caller (which retries with backoff) instead of blocking it. A failure
//! whose cause is known (wrong password, unknown CA, missing client certificate) is
//! reported as such, not as a timeout.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::config::FromClientConfigAndContext as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::producer::{Producer as _, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::observe::{Cause, Failure, Observer};
use super::records::Counted;
use super::wire::{CommittedRange, Wire, WireError};

/// A failed admin operation.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{operation} timed out after {timeout:?}: is the broker reachable?")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
    #[error("{operation}: no answer from the broker within {timeout:?} ({code}): is it reachable?")]
    Unreachable {
        operation: &'static str,
        timeout: Duration,
        code: RDKafkaErrorCode,
    },
    /// The client cannot work with the brokers, for a known reason.
    #[error("{operation}: {failure}")]
    Connection {
        operation: &'static str,
        failure: Failure,
    },
    #[error("{operation}: {source}")]
    Kafka {
        operation: &'static str,
        source: KafkaError,
    },
    #[error("{operation}: {message}")]
    Refused {
        operation: &'static str,
        code: RDKafkaErrorCode,
        message: String,
    },
    /// A request librdkafka does not offer, over the wire protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl AdminError {
    /// The cause, for a condition reason: `AuthenticationFailed`, `TlsHandshakeFailed`,
    /// `Unreachable` or `KafkaError`.
    pub fn cause(&self) -> Cause {
        match self {
            AdminError::Connection { failure, .. } => failure.cause,
            AdminError::Timeout { .. } | AdminError::Unreachable { .. } => Cause::Unreachable,
            AdminError::Kafka { .. } | AdminError::Refused { .. } => Cause::Other,
            AdminError::Wire(wire) => match wire {
                WireError::Authentication { .. } => Cause::Authentication,
                WireError::Tls { .. } => Cause::Tls,
                WireError::Unreachable { .. } | WireError::Timeout { .. } => Cause::Unreachable,
                WireError::Settings(_) | WireError::Refused { .. } | WireError::Protocol { .. } => {
                    Cause::Other
                }
            },
        }
    }
}

/// A topic as Kafka has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicState {
    pub partitions: i32,
    pub replication_factor: i32,
    /// Every config with its current value.
    pub configs: BTreeMap<String, String>,
    /// The configs set on the topic itself (not broker defaults).
    pub topic_configs: BTreeMap<String, String>,
}

/// What the brokers answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterInfo {
    pub brokers: i32,
    pub cluster_id: Option<String>,
}

/// A partition of a topic.
pub type Partition = (String, i32);

/// An admin client with a timeout on every operation.
#[derive(Clone)]
pub struct Admin {
    clients: Arc<Mutex<Clients>>,
    /// For the short-lived consumers that read offsets; holds secrets, so never shown.
    config: ClientConfig,
    observer: Observer,
    timeout: Duration,
}

/// The librdkafka clients of an [`Admin`].
#[derive(Clone)]
struct Clients {
    admin: Arc<AdminClient<Observer>>,
    /// A client whose events are polled (the admin client's are not): it sees why
    /// connecting fails, and answers metadata requests.
    probe: Arc<ThreadedProducer<Observer>>,
}

impl Clients {
    fn new(config: &ClientConfig, observer: &Observer) -> Result<Clients, AdminError> {
        let created = |source| AdminError::Kafka {
            operation: "creating the admin client",
            source,
        };
        Ok(Clients {
            admin: Arc::new(
                AdminClient::from_config_and_context(config, observer.clone()).map_err(created)?,
            ),
            probe: Arc::new(
                ThreadedProducer::from_config_and_context(config, observer.clone())
                    .map_err(created)?,
            ),
        })
    }
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("connection", &self.observer.label())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Admin {
    /// An admin client for `config`, its log lines labelled with the bootstrap servers.
    pub fn new(config: &ClientConfig, timeout: Duration) -> Result<Self, AdminError> {
        let label = format!(
            "Kafka at {}",
            config.get("bootstrap.servers").unwrap_or_default()
        );
        Self::with_observer(config, Observer::new(label), timeout)
    }

    /// An admin client for `config` reporting to `observer`.
    pub fn with_observer(
        config: &ClientConfig,
        observer: Observer,
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        Ok(Self {
            clients: Arc::new(Mutex::new(Clients::new(config, &observer)?)),
            config: config.clone(),
            observer,
            timeout,
        })
    }

    /// The clients, made anew after a failure that needs a change (credentials,
    /// certificates): librdkafka reports such a failure once per broker and then only
    /// "all brokers are down", so fresh clients are what says again, at once, why.
    fn clients(&self) -> Result<Clients, AdminError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if self.observer.take_standing() {
            let old = std::mem::replace(&mut *clients, Clients::new(&self.config, &self.observer)?);
            // Closing a librdkafka client can take a moment: not on this thread.
            std::thread::spawn(move || drop(old));
        }
        Ok(clients.clone())
    }

    pub fn observer(&self) -> &Observer {
        &self.observer
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout))
    }

    /// Runs `future` within the timeout; returns early when the observer learns of a
    /// failure retrying cannot fix (credentials, certificates), and explains a timeout by
    /// the failure seen meanwhile.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        future: impl Future<Output = Result<T, KafkaError>>,
    ) -> Result<T, AdminError> {
        let started = Instant::now();
        let mut failures = self.observer.subscribe();
        failures.borrow_and_update();
        let observer = self.observer.clone();
        let fatal = async move {
            loop {
                if failures.changed().await.is_err() {
                    return std::future::pending::<Failure>().await;
                }
                if let Some(failure) = observer.failure_since(started)
                    && failure.cause.needs_a_change()
                {
                    return failure;
                }
            }
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(self.timeout + Duration::from_secs(2), future) => outcome,
            failure = fatal => return Err(AdminError::Connection { operation, failure }),
        };
        let known = || {
            self.observer
                .failure_since(started)
                .filter(|f| f.cause != Cause::Other)
        };
        match outcome {
            Ok(Ok(value)) => {
                self.observer.connected();
                Ok(value)
            }
            Ok(Err(source)) => Err(match source.rdkafka_error_code() {
                Some(
                    code @ (RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::AllBrokersDown),
                ) => match known() {
                    Some(failure) => AdminError::Connection { operation, failure },
                    None => AdminError::Unreachable {
                        operation,
                        timeout: self.timeout,
                        code,
                    },
                },
                _ => AdminError::Kafka { operation, source },
            }),
            Err(_) => Err(match known() {
                Some(failure) => AdminError::Connection { operation, failure },
                None => AdminError::Timeout {
                    operation,
                    timeout: self.timeout,
                },
            }),
        }
    }

    /// Runs blocking librdkafka calls off the async threads, bounded as above.
    async fn blocking<T: Send + 'static>(
        &self,
        operation: &'static str,
        work: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
    ) -> Result<T, AdminError> {
        let handle = tokio::task::spawn_blocking(work);
        self.bounded(operation, async {
            handle.await.map_err(|_| KafkaError::Canceled)?
        })
        .await
    }

    /// Brokers and cluster id, from a metadata request.
    pub async fn cluster(&self) -> Result<ClusterInfo, AdminError> {
        let probe = self.clients()?.probe;
        let timeout = self.timeout;
        self.blocking("metadata request", move || {
            let metadata = probe.client().fetch_metadata(None, timeout)?;
            let cluster_id = probe.client().fetch_cluster_id(timeout);
            Ok(ClusterInfo {
                brokers: metadata.brokers().len() as i32,
                cluster_id,
            })
        })
        .await
    }

    /// The partitions of `topics` (a topic that does not exist has none).
    pub async fn partitions(&self, topics: &[String]) -> Result<Vec<Partition>, AdminError> {
        let probe = self.clients()?.probe;
        let timeout = self.timeout;
        let topics = topics.to_vec();
        self.blocking("metadata request", move || {
            let mut out = Vec::new();
            for topic in topics {
                let metadata = probe.client().fetch_metadata(Some(&topic), timeout)?;
                for t in metadata.topics().iter().filter(|t| t.error().is_none()) {
                    out.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
                }
            }
            Ok(out)
        })
        .await
    }

    /// The offsets `group` has committed on the partitions of `topics` (an OffsetFetch
    /// through the group's coordinator; the group is not joined). Partitions without a
    /// commit are absent.
    pub async fn committed_offsets(
        &self,
        group: &str,
        topics: &[String],
    ) -> Result<BTreeMap<Partition, i64>, AdminError> {
        let partitions = self.partitions(topics).await?;
        let mut config = self.config.clone();
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        let observer = self.observer.clone();
        let timeout = self.timeout;
        self.blocking("reading the group's committed offsets", move || {
            let consumer = BaseConsumer::from_config_and_context(&config, observer)?;
            let offsets = {
                let mut list = TopicPartitionList::new();
                for (topic, partition) in &partitions {
                    list.add_partition(topic, *partition);
                }
                // A new consumer's first OffsetFetch can meet a coordinator still being
                // found or loaded (NotCoordinator, CoordinatorLoadInProgress on a busy
                // broker): asked again, within the timeout.
                let deadline = Instant::now() + timeout;
                let committed = loop {
                    match consumer.committed_offsets(list.clone(), timeout) {
                        Err(e)
                            if Instant::now() < deadline
                                && matches!(
                                    e.rdkafka_error_code(),
                                    Some(
                                        RDKafkaErrorCode::NotCoordinator
                                            | RDKafkaErrorCode::CoordinatorLoadInProgress
                                            | RDKafkaErrorCode::CoordinatorNotAvailable
                                    )
                                ) =>
                        {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        result => break result?,
                    }
                };
                committed
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                        _ => None,
                    })
                    .collect()
            };
            // Deliver the events queued meanwhile (failures) to the observer.
            let _ = consumer.poll(Duration::ZERO);
            Ok(offsets)
        })
        .await
    }

    /// The high watermark (the offset the next record will get) of every partition of
    /// `topics`, in one ListOffsets request per broker.
    pub async fn high_watermarks(
        &self,
        topics: &[String],
    ) -> Result<BTreeMap<Partition, i64>, AdminError> {
        // A timestamp of -1 asks for the latest offset.
        self.list_offsets(topics, Offset::End, "reading the high watermarks")
            .await
    }

    /// The log start offset (the oldest record retention kept) of every partition of
    /// `topics`, in one ListOffsets request per broker.
    pub async fn low_watermarks(
        &self,
        topics: &[String],
    ) -> Result<BTreeMap<Partition, i64>, AdminError> {
        // A timestamp of -2 asks for the earliest offset.
        self.list_offsets(topics, Offset::Beginning, "reading the low watermarks")
            .await
    }

    async fn list_offsets(
        &self,
        topics: &[String],
        which: Offset,
        operation: &'static str,
    ) -> Result<BTreeMap<Partition, i64>, AdminError> {
        let partitions = self.partitions(topics).await?;
        let mut config = self.config.clone();
        // The high watermark, not the last stable offset of read_committed.
        config.set("isolation.level", "read_uncommitted");
        let observer = self.observer.clone();
        let timeout = self.timeout;
        self.blocking(operation, move || {
            if partitions.is_empty() {
                return Ok(BTreeMap::new());
            }
            let consumer = BaseConsumer::from_config_and_context(&config, observer)?;
            let offsets = {
                let mut list = TopicPartitionList::new();
                for (topic, partition) in &partitions {
                    list.add_partition_offset(topic, *partition, which)?;
                }
                let found = consumer.offsets_for_times(list, timeout)?;
                found
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                        _ => None,
                    })
                    .collect()
            };
            let _ = consumer.poll(Duration::ZERO);
            Ok(offsets)
        })
        .await
    }

    /// The topic's partitions, replication factor and configs; `None` when it does not exist.
    pub async fn describe(&self, topic: &str) -> Result<Option<TopicState>, AdminError> {
        let probe = self.clients()?.probe;
        let timeout = self.timeout;
        let name = topic.to_owned();
        let found = self
            .blocking("metadata request", move || {
                probe
                    .client()
                    .fetch_metadata(Some(&name), timeout)
                    .map(|m| {
                        m.topics().first().map(|t| {
                            (
                                t.error(),
                                t.partitions().len() as i32,
                                t.partitions()
                                    .first()
                                    .map_or(0, |p| p.replicas().len() as i32),
                            )
                        })
                    })
            })
            .await?;
        let (partitions, replication_factor) = match found {
            None => return Ok(None),
            Some((Some(error), _, _)) => {
                let code = RDKafkaErrorCode::from(error);
                if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                    return Ok(None);
                }
                return Err(AdminError::Refused {
                    operation: "describing the topic",
                    code,
                    message: code.to_string(),
                });
            }
            Some((None, partitions, replication_factor)) => (partitions, replication_factor),
        };
        let results = self
            .bounded(
                "describing the topic's configs",
                self.clients()?
                    .admin
                    .describe_configs([&ResourceSpecifier::Topic(topic)], &self.options()),
            )
            .await?;
        let mut state = TopicState {
            partitions,
            replication_factor,
            configs: BTreeMap::new(),
            topic_configs: BTreeMap::new(),
        };
        for result in results {
            let resource = result.map_err(|code| AdminError::Refused {
                operation: "describing the topic's configs",
                code,
                message: code.to_string(),
            })?;
            for entry in resource.entries {
                let Some(value) = entry.value else { continue };
                if entry.source == ConfigSource::DynamicTopic {
                    state
                        .topic_configs
                        .insert(entry.name.clone(), value.clone());
                }
                state.configs.insert(entry.name, value);
            }
        }
        Ok(Some(state))
    }

    /// Creates the topic; `replication_factor` `None` takes the broker's default.
    pub async fn create(
        &self,
        topic: &str,
        partitions: i32,
        replication_factor: Option<i32>,
        configs: &BTreeMap<String, String>,
    ) -> Result<(), AdminError> {
        let mut new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(replication_factor.unwrap_or(-1)),
        );
        for (key, value) in configs {
            new = new.set(key, value);
        }
        let results = self
            .bounded(
                "creating the topic",
                self.clients()?.admin.create_topics([&new], &self.options()),
            )
            .await?;
        refused("creating the topic", results)
    }

    /// Raises the topic to `partitions` partitions.
    pub async fn add_partitions(&self, topic: &str, partitions: i32) -> Result<(), AdminError> {
        let new = NewPartitions::new(topic, partitions.max(0) as usize);
        let results = self
            .bounded(
                "adding partitions",
                self.clients()?
                    .admin
                    .create_partitions([&new], &self.options()),
            )
            .await?;
        refused("adding partitions", results)
    }

    /// Sets `managed` on the topic and keeps every other config set on it. Kafka's
    /// AlterConfigs replaces a topic's whole config set, so the configs set on the topic
    /// (`current.topic_configs`) are sent along unchanged.
    pub async fn set_configs(
        &self,
        topic: &str,
        managed: &BTreeMap<String, String>,
        current: &TopicState,
    ) -> Result<(), AdminError> {
        let mut all = current.topic_configs.clone();
        all.extend(managed.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (key, value) in &all {
            alter = alter.set(key, value);
        }
        let results = self
            .bounded(
                "altering the topic's configs",
                self.clients()?
                    .admin
                    .alter_configs([&alter], &self.options()),
            )
            .await?;
        for result in results {
            result.map_err(|(_, code)| AdminError::Refused {
                operation: "altering the topic's configs",
                code,
                message: code.to_string(),
            })?;
        }
        Ok(())
    }

    /// Deletes the topic; a topic already gone is not an error.
    pub async fn delete(&self, topic: &str) -> Result<(), AdminError> {
        let results = self
            .bounded(
                "deleting the topic",
                self.clients()?
                    .admin
                    .delete_topics(&[topic], &self.options()),
            )
            .await?;
        match refused("deleting the topic", results) {
            Err(AdminError::Refused {
                code: RDKafkaErrorCode::UnknownTopicOrPartition,
                ..
            }) => Ok(()),
            other => other,
        }
    }
}

fn refused(
    operation: &'static str,
    results: Vec<Result<String, (String, RDKafkaErrorCode)>>,
) -> Result<(), AdminError> {
    for result in results {
        result.map_err(|(_, code)| AdminError::Refused {
            operation,
            code,
            message: code.to_string(),
        })?;
    }
    Ok(())
}

/// The requests librdkafka does not offer, through [`Wire`] with this client's settings.
impl Admin {
    /// Sets `set` and removes `delete` (back to the defaults) on the topic's configs with
    /// IncrementalAlterConfigs: every other config stays as the broker has it at that
    /// moment, so a concurrent change to a key this call does not name is never lost.
    pub async fn alter_configs(
        &self,
        topic: &str,
        set: &BTreeMap<String, String>,
        delete: &[String],
    ) -> Result<(), AdminError> {
        Ok(self.wire()?.alter_topic_configs(topic, set, delete).await?)
    }

    /// The id Kafka gave the topic, as Kafka's own tools print it (base64url, no
    /// padding); `None` when there is no such topic.
    pub async fn topic_id(&self, topic: &str) -> Result<Option<String>, AdminError> {
        use base64::Engine as _;
        let id = self.wire()?.topic_id(topic).await?;
        Ok(id.map(|id| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())))
    }

    /// The records a `read_committed` consumer at each range's `from` would receive
    /// before its `until` (transaction markers and aborted transactions left out), by a
    /// Fetch of at most `partition_bytes` per partition from each partition's leader; a
    /// partition that could not be read is absent.
    pub async fn count_committed(
        &self,
        ranges: &[CommittedRange],
        partition_bytes: i32,
    ) -> Result<BTreeMap<Partition, Counted>, AdminError> {
        Ok(self
            .wire()?
            .count_committed(ranges, partition_bytes)
            .await?)
    }

    fn wire(&self) -> Result<Wire, AdminError> {
        Ok(Wire::new(&self.config, self.timeout)?)
    }
}
