//! The embedded development broker: librdkafka's in-process mock cluster.
//!
//! **For local use only.** It keeps everything in memory, forgets it when the process
//! exits, has no security and no replication worth the name, and answers only the requests
//! librdkafka's own clients need. It listens on a loopback port, so other processes on
//! this machine (e.g. `weir-worker produce`) can reach it while it runs. Never point
//! production pipelines at it.

use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// A running embedded broker; dropping it stops it and loses its data.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap_servers", &self.bootstrap_servers())
            .finish()
    }
}

impl EmbeddedBroker {
    /// Starts a one-broker cluster on a free loopback port.
    pub fn start() -> Result<Self, KafkaError> {
        Ok(Self {
            cluster: MockCluster::new(1)?,
        })
    }

    /// The address clients connect to.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates a topic with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), KafkaError> {
        self.cluster.create_topic(name, partitions.max(1), 1)
    }
}
