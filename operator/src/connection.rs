//! KafkaConnection: resolves bootstrap servers, TLS and SASL (from Secrets) into client
//! properties; Ready when a metadata request succeeds, with the broker count and cluster id.
//! A change to a referenced Secret triggers a reconcile (see `secret_mapper`).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt as _};

use rdkafka::ClientConfig;
use weir_crds::condition::types::READY;
use weir_crds::{KafkaConnection, KafkaConnectionSpec, SecretKeySelector};
use weir_worker::kafka::{self, Credentials, Role};

use crate::conditions;
use crate::context::{Context, Error};

pub const KIND: &str = "KafkaConnection";

/// The client properties of `spec` in `namespace`, with Secret values read from the API
/// (kept in memory only; the messages name Secrets and keys, never values).
pub async fn client_config(
    client: &Client,
    namespace: &str,
    spec: &KafkaConnectionSpec,
) -> Result<ClientConfig, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut read: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    for (_, selector) in kafka::secret_selectors(spec) {
        if !read.contains_key(&selector.name) {
            read.insert(
                selector.name.clone(),
                secrets.get_opt(&selector.name).await?,
            );
        }
    }
    let credentials = Credentials::resolve(spec, |selector: &SecretKeySelector| {
        let secret = read
            .get(&selector.name)
            .and_then(Option::as_ref)
            .ok_or_else(|| format!("Secret {:?} does not exist", selector.name))?;
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(&selector.key))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(&selector.key).cloned())
            })
            .ok_or_else(|| format!("Secret {:?} has no key {:?}", selector.name, selector.key))
    })
    .map_err(|e| Error::Connection(e.to_string()))?;
    let mut config = kafka::client_config(spec, &credentials, Role::Admin);
    config.set("log_level", "3");
    Ok(config)
}

/// The client properties of the KafkaConnection `name` in `namespace`, from the cache.
pub async fn resolve(ctx: &Context, namespace: &str, name: &str) -> Result<ClientConfig, Error> {
    let connection = ctx.connection(namespace, name).ok_or_else(|| {
        Error::Connection(format!(
            "KafkaConnection {namespace}/{name} does not exist: create it, or set spec.connectionRef"
        ))
    })?;
    client_config(&ctx.client, namespace, &connection.spec).await
}

/// Which connections a Secret change concerns: those in its namespace that reference it.
pub fn secret_mapper(
    connections: Store<KafkaConnection>,
) -> impl Fn(Secret) -> Vec<ObjectRef<KafkaConnection>> + Send + Sync + 'static {
    move |secret| {
        let namespace = secret.namespace();
        let name = secret.name_any();
        connections
            .state()
            .iter()
            .filter(|c| c.namespace() == namespace && referenced_secrets(&c.spec).contains(&name))
            .map(|c| ObjectRef::from_obj(c.as_ref()))
            .collect()
    }
}

/// The Secrets a connection reads.
pub fn referenced_secrets(spec: &KafkaConnectionSpec) -> Vec<String> {
    kafka::secret_selectors(spec)
        .into_iter()
        .map(|(_, s)| s.name.clone())
        .collect()
}

pub async fn reconcile(
    connection: Arc<KafkaConnection>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    ctx.reconcile(
        KIND,
        connection.as_ref(),
        reconcile_inner(&connection, &ctx),
    )
    .await
}

async fn reconcile_inner(connection: &KafkaConnection, ctx: &Context) -> Result<Action, Error> {
    let namespace = connection.namespace().unwrap_or_default();
    let generation = connection.metadata.generation;
    let mut status = connection.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let (action, event) = match connection.spec.validate() {
        Err(problems) => {
            conditions::set(
                &mut status.conditions,
                READY,
                false,
                "InvalidSpec",
                problems.to_string(),
                generation,
            );
            (Action::await_change(), None)
        }
        Ok(()) => match probe(ctx, &namespace, &connection.spec).await {
            Ok(info) => {
                let was_ready = conditions::is_true(&status.conditions, READY);
                status.brokers = Some(info.brokers);
                status.cluster_id = info.cluster_id.clone();
                conditions::set(
                    &mut status.conditions,
                    READY,
                    true,
                    "Connected",
                    format!("{} broker(s) answered", info.brokers),
                    generation,
                );
                let event = (!was_ready).then(|| {
                    (
                        false,
                        "Connected",
                        format!(
                            "{} broker(s) answered; cluster {}",
                            info.brokers,
                            info.cluster_id.unwrap_or_default()
                        ),
                    )
                });
                (Action::requeue(ctx.config.resync), event)
            }
            Err(e) => {
                let was_ready = conditions::is_true(&status.conditions, READY);
                let reason = failure_reason(&e);
                let before = conditions::reason(&status.conditions, READY).map(str::to_owned);
                let message = format!("KafkaConnection {namespace}/{}: {e}", connection.name_any());
                conditions::set(
                    &mut status.conditions,
                    READY,
                    false,
                    reason,
                    message.clone(),
                    generation,
                );
                // An Event when it stops working or fails for another reason, not per retry.
                let event = (was_ready || before.as_deref() != Some(reason))
                    .then_some((true, reason, message));
                (Action::requeue(Context::backoff(2)), event)
            }
        },
    };
    ctx.write_status(connection, connection.status.as_ref(), &status)
        .await?;
    if let Some((warning, reason, note)) = event {
        ctx.event(connection, warning, reason, note).await;
    }
    Ok(action)
}

/// The condition reason of a failed probe: `SecretNotReady`, `AuthenticationFailed`,
/// `TlsHandshakeFailed`, `Unreachable` or `KafkaError`.
fn failure_reason(error: &Error) -> &'static str {
    match error {
        Error::Connection(_) => "SecretNotReady",
        Error::Kafka(e) => e.cause().reason(),
        _ => "Unreachable",
    }
}

async fn probe(
    ctx: &Context,
    namespace: &str,
    spec: &KafkaConnectionSpec,
) -> Result<crate::kafka::ClusterInfo, Error> {
    let config = client_config(&ctx.client, namespace, spec).await?;
    let admin = ctx.admin(&config)?;
    Ok(admin.cluster().await?)
}

pub fn error_policy(object: Arc<KafkaConnection>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.retry(KIND, object.as_ref(), error)
}
