//! Leader election through a coordination.k8s.io Lease, as client-go does it: the holder
//! renews `renewTime` well within `leaseDurationSeconds`; another replica takes the Lease
//! over only once it has expired. Every write is a compare-and-swap on the Lease's
//! resourceVersion, so two replicas never both believe they hold it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

/// One replica's view of the Lease.
#[derive(Clone, Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// Takes or renews the Lease; true when this replica holds it afterwards. A lost race
    /// (409 Conflict) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let seconds = self.duration.as_secs().max(1) as i32;
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let ours = holder == self.identity;
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(lasts)) => {
                renewed.0 + SignedDuration::from_secs(i64::from(lasts)) < now
            }
            _ => true,
        };
        if !ours && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let mut next = lease.clone();
        let mut spec = spec;
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(seconds);
        next.spec = Some(spec);
        // `replace` sends the resourceVersion read above: a concurrent writer wins, we lose.
        conflict_is_false(
            self.api
                .replace(&self.name, &PostParams::default(), &next)
                .await,
        )
    }

    /// Gives the Lease up (on shutdown), so another replica need not wait for it to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await?
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            conflict_is_false(
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await,
            )?;
        }
        Ok(())
    }

    /// Waits until this replica holds the Lease, trying every `retry`.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read or take the leader Lease"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the Lease every third of its duration; returns when it could not be renewed
    /// for a whole duration (leadership is then lost: stop acting).
    pub async fn keep(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = tokio::time::Instant::now(),
                Ok(false) => return,
                Err(e) => tracing::warn!(error = %e, "cannot renew the leader Lease"),
            }
            if last_renewal.elapsed() >= self.duration {
                return;
            }
        }
    }
}

fn conflict_is_false<T>(result: Result<T, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
