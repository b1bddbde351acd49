//! What every reconcile shares: the API client, the configuration, caches of the watched
//! resources, the event recorder and the metrics; and the reconcile error type.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::controller::Action;
use tracing::Instrument as _;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use weir_crds::{KafkaConnection, KafkaTopic};

use crate::config::OperatorConfig;
use crate::kafka::Admin;
use crate::metrics::Metrics;

pub use crate::error::{Category, Error};

/// A client configuration as a sorted list of properties (a cache key).
type ClientProperties = Vec<(String, String)>;

/// A pipeline's last apply: its generation, config hash and time.
type Applied = (Option<i64>, String, Instant);

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
    /// Failures in a row per object (`kind/namespace/name`), for the retry backoff.
    failures: Arc<Mutex<HashMap<String, u32>>>,
    /// The category of each object's last failure: a Warning Event is published when it
    /// is new, not once per retry.
    last_failure: Arc<Mutex<HashMap<String, Category>>>,
    /// The autoscaler's memory per pipeline (by uid).
    autoscaler: Arc<Mutex<HashMap<String, crate::autoscale::PipelineState>>>,
    /// Per pipeline (by uid): the generation and config hash last applied, and when, so a
    /// lag-interval reconcile re-applies the children only when they may differ.
    applied: Arc<Mutex<HashMap<String, Applied>>>,
    /// One admin client per distinct set of client properties: a librdkafka client owns
    /// threads and connections, far too much to make per reconcile.
    admins: Arc<Mutex<HashMap<ClientProperties, Admin>>>,
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
            failures: Arc::default(),
            last_failure: Arc::default(),
            autoscaler: Arc::default(),
            applied: Arc::default(),
            admins: Arc::default(),
        }
    }

    /// The admin client for these client properties, made on first use.
    pub fn admin(&self, config: &rdkafka::ClientConfig) -> Result<Admin, Error> {
        // The real values: `config_map()` masks passwords and keys, and a client made
        // with an old password must not serve the new one.
        let mut key: ClientProperties = config
            .config_map()
            .into_keys()
            .map(|k| (k.to_owned(), config.get(k).unwrap_or_default().to_owned()))
            .collect();
        key.sort();
        let mut admins = self
            .admins
            .lock()
            .map_err(|_| Error::Poisoned("admin client cache"))?;
        if let Some(admin) = admins.get(&key) {
            return Ok(admin.clone());
        }
        let admin = Admin::new(config, self.config.kafka_timeout)?;
        admins.insert(key, admin.clone());
        Ok(admin)
    }

    /// Runs `f` on the autoscaler's memory of the pipeline with `uid`.
    pub fn autoscaler<T>(
        &self,
        uid: &str,
        f: impl FnOnce(&mut crate::autoscale::PipelineState) -> T,
    ) -> Result<T, Error> {
        let mut states = self
            .autoscaler
            .lock()
            .map_err(|_| Error::Poisoned("autoscaler state"))?;
        Ok(f(states.entry(uid.to_owned()).or_default()))
    }

    /// Whether the pipeline `uid`'s children were applied for this generation and config
    /// hash within the resync period.
    pub fn applied_recently(&self, uid: &str, generation: Option<i64>, hash: &str) -> bool {
        self.applied.lock().is_ok_and(|applied| {
            applied.get(uid).is_some_and(|(g, h, at)| {
                *g == generation && h == hash && at.elapsed() < self.config.resync
            })
        })
    }

    /// Records that the pipeline `uid`'s children were applied.
    pub fn mark_applied(&self, uid: &str, generation: Option<i64>, hash: &str) {
        if let Ok(mut applied) = self.applied.lock() {
            applied.insert(
                uid.to_owned(),
                (generation, hash.to_owned(), Instant::now()),
            );
        }
    }

    /// Runs one reconcile of `object` in a span, counting it in the metrics; a success
    /// resets the object's retry backoff.
    pub async fn reconcile<K: Resource<DynamicType = ()>>(
        &self,
        kind: &'static str,
        object: &K,
        work: impl Future<Output = Result<Action, Error>>,
    ) -> Result<Action, Error> {
        let key = key(kind, object);
        // With several watched namespaces the watch covers all of them: skip the others.
        if !self
            .config
            .watches(object.meta().namespace.as_deref().unwrap_or_default())
        {
            return Ok(Action::await_change());
        }
        let span = tracing::info_span!(
            "reconcile",
            kind,
            namespace = object.meta().namespace.as_deref().unwrap_or_default(),
            name = object.meta().name.as_deref().unwrap_or_default(),
            generation = object.meta().generation,
        );
        let started = Instant::now();
        self.metrics.started();
        let limit = self.config.reconcile_timeout;
        let result = tokio::time::timeout(limit, work.instrument(span))
            .await
            .unwrap_or(Err(Error::Timeout(limit)));
        let category = result.as_ref().err().map(Error::category);
        self.metrics
            .finished(kind, started.elapsed().as_secs_f64(), category);
        match &result {
            Ok(_) => {
                if let Ok(mut failures) = self.failures.lock() {
                    failures.remove(&key);
                }
                if let Ok(mut last) = self.last_failure.lock() {
                    last.remove(&key);
                }
            }
            Err(e) if !e.is_conflict() => {
                let category = e.category();
                let new = self
                    .last_failure
                    .lock()
                    .map(|mut last| last.insert(key.clone(), category) != Some(category))
                    .unwrap_or(true);
                if new {
                    // In the background: an API server that stopped answering (the cause of
                    // a timeout) must not hold up the retry.
                    self.warn_in_background(object, category.as_str(), e.to_string());
                }
            }
            Err(_) => {}
        }
        result
    }

    /// The error policy: a lost write race (409) is retried at once; a permanent error
    /// (the spec asks for what cannot be done) waits for the resync period; any other is
    /// retried after a backoff that doubles with each failure in a row of this object
    /// (5 s up to 5 min), drawn at random within ±20 % so objects failing together (a
    /// broker outage) do not retry in lockstep.
    pub fn retry<K: Resource<DynamicType = ()>>(
        &self,
        kind: &'static str,
        object: &K,
        error: &Error,
    ) -> Action {
        if error.is_conflict() {
            tracing::debug!(kind, %error, "lost a write race; reconciling again on fresh data");
            return Action::requeue(Duration::from_millis(200));
        }
        let failures = self
            .failures
            .lock()
            .map(|mut f| {
                let n = f.entry(key(kind, object)).or_insert(0);
                *n += 1;
                *n
            })
            .unwrap_or(1);
        let wait = if error.is_permanent() {
            self.config.resync
        } else {
            jitter(Self::backoff(failures - 1), fastrand::f64())
        };
        tracing::warn!(
            kind,
            namespace = object.meta().namespace.as_deref().unwrap_or_default(),
            name = object.meta().name.as_deref().unwrap_or_default(),
            %error,
            category = %error.category(),
            failures,
            retry_in = ?wait,
            "reconcile failed"
        );
        Action::requeue(wait)
    }

    /// The KafkaConnection `name` in `namespace`, from the cache.
    pub fn connection(&self, namespace: &str, name: &str) -> Option<Arc<KafkaConnection>> {
        self.connections
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// Writes `status` to `object`'s status subresource unless it is what the object has
    /// already (a reconcile that finds nothing new writes nothing); returns the object as
    /// written, when it was.
    pub async fn write_status<K, S>(
        &self,
        object: &K,
        current: Option<&S>,
        status: &S,
    ) -> Result<Option<K>, Error>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        S: serde::Serialize + PartialEq,
    {
        if current == Some(status) {
            return Ok(None);
        }
        let api: kube::Api<K> = kube::Api::namespaced(
            self.client.clone(),
            object.meta().namespace.as_deref().unwrap_or_default(),
        );
        self.metrics.write();
        let written = api
            .patch_status(
                object.meta().name.as_deref().unwrap_or_default(),
                &kube::api::PatchParams::default(),
                // The resourceVersion makes the write fail (409) when the object changed since
                // this reconcile read it from the cache: a stale view never overwrites a newer one.
                &kube::api::Patch::Merge(serde_json::json!({
                    "metadata": {"resourceVersion": object.meta().resource_version},
                    "status": status,
                })),
            )
            .await?;
        Ok(Some(written))
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

    /// Publishes a Warning Event about `object` without waiting for the API server.
    pub fn warn_in_background<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        reason: &'static str,
        note: String,
    ) {
        self.metrics.write();
        let recorder = self.recorder.clone();
        let reference = object.object_ref(&());
        tokio::spawn(async move {
            let event = Event {
                type_: EventType::Warning,
                reason: reason.to_owned(),
                note: Some(note),
                action: "Reconcile".to_owned(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, reason, "cannot publish an event");
            }
        });
    }

    /// How long to wait before retrying after `failures` failures in a row (before jitter).
    pub fn backoff(failures: u32) -> Duration {
        let seconds = 5u64.saturating_mul(1 << failures.min(6));
        Duration::from_secs(seconds.min(300))
    }
}

fn key<K: Resource<DynamicType = ()>>(kind: &str, object: &K) -> String {
    format!(
        "{kind}/{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// `wait` moved by up to ±20 %, `unit` in [0, 1) choosing where; whole milliseconds.
pub fn jitter(wait: Duration, unit: f64) -> Duration {
    let factor = 0.8 + 0.4 * unit.clamp(0.0, 1.0);
    Duration::from_millis((wait.as_millis() as f64 * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes_and_jitter_stays_within_a_fifth() {
        assert_eq!(Context::backoff(0), Duration::from_secs(5));
        assert_eq!(Context::backoff(1), Duration::from_secs(10));
        assert_eq!(Context::backoff(20), Duration::from_secs(300));
        assert_eq!(jitter(Duration::from_secs(10), 0.0), Duration::from_secs(8));
        assert_eq!(
            jitter(Duration::from_secs(10), 0.5),
            Duration::from_secs(10)
        );
        assert!(jitter(Duration::from_secs(10), 0.999) < Duration::from_secs(12));
    }
}
