//! What every reconcile shares: the API client, the configuration, caches of the watched
//! resources, the event recorder and the metrics; and the reconcile error type.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use weir_crds::{KafkaConnection, KafkaTopic};

use crate::config::OperatorConfig;
use crate::kafka::AdminError;
use crate::metrics::Metrics;

/// Why a reconcile failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] AdminError),
    #[error("{0}")]
    Connection(String),
    #[error("{0}")]
    Render(#[from] crate::render::RenderError),
}

/// State shared by the controllers.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub config: Arc<OperatorConfig>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Every KafkaConnection the operator watches.
    pub connections: Store<KafkaConnection>,
    /// Every KafkaTopic the operator watches (for topic-name conflicts across namespaces).
    pub topics: Store<KafkaTopic>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
        connections: Store<KafkaConnection>,
        topics: Store<KafkaTopic>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: crate::FIELD_MANAGER.to_owned(),
                instance: Some(config.identity.clone()),
            },
        );
        Self {
            client,
            config: Arc::new(config),
            metrics,
            recorder,
            connections,
            topics,
        }
    }

    /// The KafkaConnection `name` in `namespace`, from the cache.
    pub fn connection(&self, namespace: &str, name: &str) -> Option<Arc<KafkaConnection>> {
        self.connections
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// Publishes a Kubernetes Event about `object`; a failure is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        self.metrics.write();
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "cannot publish an event");
        }
    }

    /// How long to wait before retrying after `failures` failures in a row.
    pub fn backoff(failures: u32) -> Duration {
        let seconds = 5u64.saturating_mul(1 << failures.min(6));
        Duration::from_secs(seconds.min(300))
    }
}
