//! KafkaConnection: resolves bootstrap servers, TLS and SASL (from Secrets) into client
//! properties; Ready when a metadata request succeeds, with the broker count and cluster id.
//! A change to a referenced Secret triggers a reconcile (see `secret_mapper`).

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt as _};
use rdkafka::ClientConfig;
use weir_crds::condition::types::READY;
use weir_crds::{KafkaConnection, KafkaConnectionSpec, SaslMechanism, SecretKeySelector};

use crate::conditions;
use crate::context::{Context, Error};

pub const KIND: &str = "KafkaConnection";

/// The client properties of `spec` in `namespace`, with Secret values read from the API.
pub async fn client_config(
    client: &Client,
    namespace: &str,
    spec: &KafkaConnectionSpec,
) -> Result<ClientConfig, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |selector: SecretKeySelector| {
        let secrets = secrets.clone();
        async move {
            let secret = secrets.get_opt(&selector.name).await?.ok_or_else(|| {
                Error::Connection(format!("Secret {:?} does not exist", selector.name))
            })?;
            let value = secret
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
                .ok_or_else(|| {
                    Error::Connection(format!(
                        "Secret {:?} has no key {:?}",
                        selector.name, selector.key
                    ))
                })?;
            Ok::<_, Error>(value)
        }
    };
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", spec.bootstrap_servers.join(","));
    let protocol = match (&spec.tls, &spec.sasl) {
        (None, None) => "PLAINTEXT",
        (Some(_), None) => "SSL",
        (None, Some(_)) => "SASL_PLAINTEXT",
        (Some(_), Some(_)) => "SASL_SSL",
    };
    config.set("security.protocol", protocol);
    if let Some(tls) = &spec.tls {
        if let Some(ca) = &tls.ca_cert {
            config.set("ssl.ca.pem", read(ca.clone()).await?);
        }
        if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
            config.set("ssl.certificate.pem", read(cert.clone()).await?);
            config.set("ssl.key.pem", read(key.clone()).await?);
        }
        if tls.insecure_skip_hostname_verification {
            config.set("ssl.endpoint.identification.algorithm", "none");
        }
    }
    if let Some(sasl) = &spec.sasl {
        config.set(
            "sasl.mechanisms",
            match sasl.mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            },
        );
        let username = match (&sasl.username, &sasl.username_secret_ref) {
            (Some(user), _) => user.clone(),
            (None, Some(selector)) => read(selector.clone()).await?,
            (None, None) => String::new(),
        };
        config.set("sasl.username", username);
        config.set(
            "sasl.password",
            read(sasl.password_secret_ref.clone()).await?,
        );
    }
    for (key, value) in &spec.properties {
        config.set(key, value);
    }
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
    let mut names = Vec::new();
    if let Some(tls) = &spec.tls {
        names.extend(
            [&tls.ca_cert, &tls.client_cert, &tls.client_key]
                .into_iter()
                .flatten()
                .map(|s| s.name.clone()),
        );
    }
    if let Some(sasl) = &spec.sasl {
        names.extend(sasl.username_secret_ref.iter().map(|s| s.name.clone()));
        names.push(sasl.password_secret_ref.name.clone());
    }
    names
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
                let reason = match e {
                    Error::Connection(_) => "SecretNotReady",
                    _ => "Unreachable",
                };
                conditions::set(
                    &mut status.conditions,
                    READY,
                    false,
                    reason,
                    e.to_string(),
                    generation,
                );
                let event = was_ready.then(|| (true, reason, e.to_string()));
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
