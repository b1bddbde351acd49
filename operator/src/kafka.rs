//! The Kafka admin operations a KafkaTopic needs, each bounded by a timeout so a slow or
//! unreachable broker fails the reconcile (which is retried with backoff) instead of
//! blocking it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

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

/// An admin client with a timeout on every operation.
#[derive(Clone)]
pub struct Admin {
    client: Arc<AdminClient<DefaultClientContext>>,
    timeout: Duration,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Admin {
    pub fn new(config: &ClientConfig, timeout: Duration) -> Result<Self, AdminError> {
        let client = config.create().map_err(|source| AdminError::Kafka {
            operation: "creating the admin client",
            source,
        })?;
        Ok(Self {
            client: Arc::new(client),
            timeout,
        })
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new()
            .request_timeout(Some(self.timeout))
            .operation_timeout(Some(self.timeout))
    }

    async fn bounded<T>(
        &self,
        operation: &'static str,
        future: impl Future<Output = Result<T, KafkaError>>,
    ) -> Result<T, AdminError> {
        match tokio::time::timeout(self.timeout + Duration::from_secs(2), future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(match source.rdkafka_error_code() {
                Some(
                    code @ (RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::RequestTimedOut
                    | RDKafkaErrorCode::OperationTimedOut
                    | RDKafkaErrorCode::AllBrokersDown),
                ) => AdminError::Unreachable {
                    operation,
                    timeout: self.timeout,
                    code,
                },
                _ => AdminError::Kafka { operation, source },
            }),
            Err(_) => Err(AdminError::Timeout {
                operation,
                timeout: self.timeout,
            }),
        }
    }

    /// Brokers and cluster id, from a metadata request.
    pub async fn cluster(&self) -> Result<ClusterInfo, AdminError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let answer = tokio::task::spawn_blocking(move || {
            let metadata = client.inner().fetch_metadata(None, timeout)?;
            let cluster_id = client.inner().fetch_cluster_id(timeout);
            Ok::<_, KafkaError>(ClusterInfo {
                brokers: metadata.brokers().len() as i32,
                cluster_id,
            })
        });
        self.bounded("metadata request", async {
            answer.await.map_err(|_| KafkaError::Canceled)?
        })
        .await
    }

    /// The topic's partitions, replication factor and configs; `None` when it does not exist.
    pub async fn describe(&self, topic: &str) -> Result<Option<TopicState>, AdminError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            client
                .inner()
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
        });
        let found = self
            .bounded("metadata request", async {
                metadata.await.map_err(|_| KafkaError::Canceled)?
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
                self.client
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
                self.client.create_topics([&new], &self.options()),
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
                self.client.create_partitions([&new], &self.options()),
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
                self.client.alter_configs([&alter], &self.options()),
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
                self.client.delete_topics(&[topic], &self.options()),
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
