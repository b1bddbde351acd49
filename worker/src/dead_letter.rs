//! The dead-letter topic: a refused record goes there alone, with the reason in headers.

use std::time::{Duration, SystemTime};

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::record::Record;
use crate::retry::ErrorClass;

/// Header names on dead-lettered records.
/// Header names on dead-lettered records.
pub use crate::kafka::headers;

/// Why a record is dead-lettered.
#[derive(Clone, Debug)]
pub struct Failure {
    pub class: ErrorClass,
    pub reason: String,
    /// Tries made before the record was given up.
    pub attempts: u32,
    /// When the first of them failed.
    pub first_failure: SystemTime,
    /// The sink that refused it; `None` when it failed before the sinks (decode, filter,
    /// transform).
    pub sink: Option<String>,
}

#[derive(Clone)]
pub struct DeadLetter {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetter")
            .field("topic", &self.topic)
            .finish()
    }
}

impl DeadLetter {
    /// An idempotent producer acknowledged by all in-sync replicas: a dead-lettered
    /// record is committed past only once the broker has it.
    pub fn new(kafka: &ClientConfig, topic: &str) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = kafka
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()?;
        Ok(Self {
            producer,
            topic: topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends one record and waits for the broker's acknowledgement.
    pub async fn send(
        &self,
        record: &Record,
        failure: &Failure,
    ) -> Result<(), rdkafka::error::KafkaError> {
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let attempts = failure.attempts.to_string();
        let first_failure = humantime::format_rfc3339_millis(failure.first_failure).to_string();
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 8);
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        for (key, value) in [
            (headers::ERROR_CLASS, failure.class.as_str()),
            (headers::ERROR_MESSAGE, failure.reason.as_str()),
            (headers::ATTEMPTS, attempts.as_str()),
            (headers::SOURCE_TOPIC, record.topic.as_str()),
            (headers::SOURCE_PARTITION, partition.as_str()),
            (headers::SOURCE_OFFSET, offset.as_str()),
            (headers::FIRST_FAILURE, first_failure.as_str()),
        ]
        .into_iter()
        .chain(failure.sink.as_deref().map(|sink| (headers::SINK, sink)))
        {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut message = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &record.key {
            message = message.key(key);
        }
        if let Some(payload) = &record.payload {
            message = message.payload(payload);
        }
        self.producer
            .send(message, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}
