//! KafkaConnections to the real broker's secured listeners (the harness's throwaway CA and
//! users), the operator against the real API server: a wrong password, an unknown CA and a
//! missing client certificate each give their own reason on the first reconcile; fixing
//! the Secret recovers without a restart; topics are created, altered and deleted over
//! SASL_SSL/SCRAM-SHA-512 and over mutual TLS; and the password and the private key appear
//! in no status, no Event and no line the operator logged (captured in this process).

use crate::common;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Cluster, Operator, config, eventually, eventually_within, ready};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use weir_crds::{KafkaConnection, KafkaTopic};
use weir_testkit::{KafkaSecurity, TestKafka, unique_name};

/// Everything this process logs, for the search for secrets.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut out) = self.0.lock() {
            out.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn install() -> Captured {
        let captured = Captured::default();
        let writer = captured.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,kube=info,hyper=info,tower=info,h2=info,rustls=info",
            ))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        captured
    }

    fn text(&self) -> String {
        self.0
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    let mut secret = Secret::default();
    secret.metadata.name = Some(name.to_owned());
    secret.string_data = Some(
        data.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    );
    secret
}

async fn put(api: &Api<Secret>, secret: Secret) -> anyhow::Result<()> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    match api.get_opt(&name).await? {
        Some(current) => {
            let mut secret = secret;
            secret.metadata.resource_version = current.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &secret).await?;
        }
        None => {
            api.create(&PostParams::default(), &secret).await?;
        }
    }
    Ok(())
}

fn scram_connection(name: &str, s: &KafkaSecurity, ca_secret: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {{name: {name}}}\nspec:\n  bootstrapServers: [\"{}\"]\n  tls:\n    caCert: {{name: {ca_secret}, key: ca.crt}}\n  sasl:\n    mechanism: SCRAM-SHA-512\n    usernameSecretRef: {{name: kafka-user, key: username}}\n    passwordSecretRef: {{name: kafka-user, key: password}}\n",
        s.sasl_ssl
    )
}

fn mtls_connection(name: &str, s: &KafkaSecurity, with_client_cert: bool) -> String {
    let client = if with_client_cert {
        "    clientCert: {name: kafka-client, key: tls.crt}\n    clientKey: {name: kafka-client, key: tls.key}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {{name: {name}}}\nspec:\n  bootstrapServers: [\"{}\"]\n  tls:\n    caCert: {{name: kafka-ca, key: ca.crt}}\n{client}",
        s.ssl
    )
}

async fn ready_of(
    api: &Api<KafkaConnection>,
    name: &str,
) -> anyhow::Result<Option<(String, String, String)>> {
    let status = serde_json::to_value(&api.get(name).await?.status)?;
    Ok(ready(Some(&status)))
}

/// A line of a PEM body: what a leaked key would show.
fn pem_body_line(pem: &str) -> String {
    pem.lines()
        .find(|l| !l.starts_with("-----") && l.len() > 20)
        .unwrap_or_default()
        .to_owned()
}

/// Asserts that none of `secrets` is in the namespace's statuses and Events, or in the log.
async fn assert_nowhere(
    cluster: &Cluster,
    ns: &str,
    secrets: &[&str],
    log: &Captured,
) -> anyhow::Result<()> {
    let connections: Api<KafkaConnection> = Api::namespaced(cluster.admin.clone(), ns);
    let topics: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), ns);
    let events: Api<Event> = Api::namespaced(cluster.admin.clone(), ns);
    let mut seen = serde_json::to_string(&connections.list(&ListParams::default()).await?.items)?;
    seen.push_str(&serde_json::to_string(
        &topics.list(&ListParams::default()).await?.items,
    )?);
    seen.push_str(&serde_json::to_string(
        &events.list(&ListParams::default()).await?.items,
    )?);
    let log = log.text();
    assert!(
        log.contains("starting the controllers"),
        "nothing was captured"
    );
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(
            !seen.contains(secret),
            "a secret is in a status or an Event"
        );
        assert!(!log.contains(secret), "a secret is in the operator's log");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_unknown_ca_and_missing_client_certificate_are_named_and_fixing_the_secret_recovers()
-> anyhow::Result<()> {
    let log = Captured::install();
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let s = kafka.security()?.clone();
    let ns = cluster.namespace("secured").await?;
    let secrets: Api<Secret> = Api::namespaced(cluster.admin.clone(), &ns);
    let wrong_password = format!("wrong-{}", unique_name("pw"));
    put(&secrets, secret("kafka-ca", &[("ca.crt", &s.ca_pem)])).await?;
    put(&secrets, secret("other-ca", &[("ca.crt", &s.other_ca_pem)])).await?;
    put(
        &secrets,
        secret(
            "kafka-user",
            &[("username", &s.scram_user), ("password", &wrong_password)],
        ),
    )
    .await?;
    put(
        &secrets,
        secret(
            "kafka-client",
            &[
                ("tls.crt", &s.client_cert_pem),
                ("tls.key", &s.client_key_pem),
            ],
        ),
    )
    .await?;
    let mut settings = config(&unique_name("lease"), "op-secured");
    // Only the Secret watch or the first reconcile can explain what follows in time.
    settings.resync = Duration::from_secs(600);
    let operator = Operator::start(cluster.operator_client()?, settings);
    let api: Api<KafkaConnection> = Api::namespaced(cluster.admin.clone(), &ns);
    cluster
        .apply_yaml(&ns, &scram_connection("scram", &s, "kafka-ca"))
        .await?;
    cluster
        .apply_yaml(&ns, &scram_connection("unknown-ca", &s, "other-ca"))
        .await?;
    cluster
        .apply_yaml(&ns, &mtls_connection("no-client-cert", &s, false))
        .await?;
    cluster
        .apply_yaml(&ns, &mtls_connection("mtls", &s, true))
        .await?;

    // A failed probe is retried after 20 s: a reason within 15 s is the first reconcile's.
    let first = Duration::from_secs(15);
    for (name, reason, words) in [
        (
            "scram",
            "AuthenticationFailed",
            "SASL authentication failed",
        ),
        (
            "unknown-ca",
            "TlsHandshakeFailed",
            "certificate verify failed",
        ),
        (
            "no-client-cert",
            "TlsHandshakeFailed",
            "TLS handshake failed",
        ),
    ] {
        let (status, _, message) = eventually_within(first, reason, || async {
            Ok(ready_of(&api, name).await?.filter(|r| r.1 == reason))
        })
        .await?;
        assert_eq!(status, "False");
        assert!(
            message.starts_with(&format!("KafkaConnection {ns}/{name}: ")),
            "{message}"
        );
        assert!(message.contains(words), "{message}");
    }
    eventually_within(first, "mutual TLS Ready", || async {
        Ok(ready_of(&api, "mtls").await?.filter(|r| r.0 == "True"))
    })
    .await?;

    // Fixing the password is picked up through the Secret watch, without a restart.
    put(
        &secrets,
        secret(
            "kafka-user",
            &[("username", &s.scram_user), ("password", &s.scram_password)],
        ),
    )
    .await?;
    eventually_within(first, "the fixed password to work", || async {
        Ok(ready_of(&api, "scram").await?.filter(|r| r.0 == "True"))
    })
    .await?;
    let events: Api<Event> = Api::namespaced(cluster.admin.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "AuthenticationFailed"),
        "{reasons:?}"
    );
    assert_nowhere(
        &cluster,
        &ns,
        &[
            &wrong_password,
            &s.scram_password,
            &pem_body_line(&s.client_key_pem),
        ],
        &log,
    )
    .await?;
    operator.stop().await
}

fn topic_yaml(name: &str, topic: &str, connection: &str, retention_ms: i64) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {{name: {name}}}\nspec:\n  topicName: {topic}\n  connectionRef: {{name: {connection}}}\n  partitions: 2\n  deletionPolicy: Delete\n  config:\n    retention.ms: \"{retention_ms}\"\n"
    )
}

/// The topic's retention.ms as the broker has it (read over PLAINTEXT); `None` when the
/// topic does not exist.
async fn retention(kafka: &TestKafka, topic: &str) -> anyhow::Result<Option<String>> {
    let admin = weir_worker::kafka::Admin::new(&kafka.config(), Duration::from_secs(10))?;
    Ok(admin
        .describe(topic)
        .await?
        .and_then(|t| t.configs.get("retention.ms").cloned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_are_created_altered_and_deleted_over_sasl_ssl_and_mutual_tls() -> anyhow::Result<()>
{
    let log = Captured::install();
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let s = kafka.security()?.clone();
    let ns = cluster.namespace("secured-topics").await?;
    let secrets: Api<Secret> = Api::namespaced(cluster.admin.clone(), &ns);
    put(&secrets, secret("kafka-ca", &[("ca.crt", &s.ca_pem)])).await?;
    put(
        &secrets,
        secret(
            "kafka-user",
            &[("username", &s.scram_user), ("password", &s.scram_password)],
        ),
    )
    .await?;
    put(
        &secrets,
        secret(
            "kafka-client",
            &[
                ("tls.crt", &s.client_cert_pem),
                ("tls.key", &s.client_key_pem),
            ],
        ),
    )
    .await?;
    cluster
        .apply_yaml(&ns, &scram_connection("scram", &s, "kafka-ca"))
        .await?;
    cluster
        .apply_yaml(&ns, &mtls_connection("mtls", &s, true))
        .await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-secured-topics"),
    );
    let topics: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &ns);
    for connection in ["scram", "mtls"] {
        let topic = unique_name(connection);
        cluster
            .apply_yaml(&ns, &topic_yaml(connection, &topic, connection, 3_600_000))
            .await?;
        eventually(&format!("{topic} on the broker"), || async {
            Ok(retention(&kafka, &topic).await?.filter(|r| r == "3600000"))
        })
        .await?;
        cluster
            .apply_yaml(&ns, &topic_yaml(connection, &topic, connection, 7_200_000))
            .await?;
        eventually(&format!("{topic}'s new retention"), || async {
            Ok(retention(&kafka, &topic).await?.filter(|r| r == "7200000"))
        })
        .await?;
        topics.delete(connection, &DeleteParams::default()).await?;
        eventually(&format!("{topic} deleted"), || async {
            let gone = topics.get_opt(connection).await?.is_none()
                && retention(&kafka, &topic).await?.is_none();
            Ok(gone.then_some(()))
        })
        .await?;
    }
    assert_nowhere(
        &cluster,
        &ns,
        &[&s.scram_password, &pem_body_line(&s.client_key_pem)],
        &log,
    )
    .await?;
    operator.stop().await
}

/// The README's SASL_SSL KafkaConnection and its Secret, as a user would copy them (their
/// placeholders filled with the harness's broker, user, password and CA): applied to the
/// real API server, the connection becomes Ready.
#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_sasl_ssl_connection_applies_and_becomes_ready() -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"),
    )?;
    let block = readme
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(yaml, _)| yaml))
        .find(|yaml| yaml.contains("kind: KafkaConnection") && yaml.contains("SCRAM-SHA-512"))
        .ok_or_else(|| anyhow::anyhow!("the README shows no SASL_SSL KafkaConnection"))?;
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let s = kafka.security()?.clone();
    let start = block
        .find("  ca.crt: |\n")
        .ok_or_else(|| anyhow::anyhow!("no ca.crt in the README's Secret"))?;
    let end = block[start..]
        .find("-----END CERTIFICATE-----\n")
        .map(|i| start + i + "-----END CERTIFICATE-----\n".len())
        .ok_or_else(|| anyhow::anyhow!("no CA certificate in the README's Secret"))?;
    let ca: String = s.ca_pem.lines().map(|l| format!("    {l}\n")).collect();
    let mut yaml = format!("{}  ca.crt: |\n{ca}{}", &block[..start], &block[end..]);
    yaml = yaml.replace(
        "password: CHANGE-ME",
        &format!("password: {}", s.scram_password),
    );
    yaml = yaml.replace("username: weir\n", &format!("username: {}\n", s.scram_user));
    let servers = yaml
        .lines()
        .find(|l| l.trim_start().starts_with("bootstrapServers:"))
        .ok_or_else(|| anyhow::anyhow!("no bootstrapServers"))?
        .to_owned();
    yaml = yaml.replace(
        &servers,
        &format!("  bootstrapServers: [\"{}\"]", s.sasl_ssl),
    );
    let ns = cluster.namespace("readme").await?;
    cluster.apply_yaml(&ns, &yaml).await?;
    let operator = Operator::start(
        cluster.operator_client()?,
        config(&unique_name("lease"), "op-readme"),
    );
    let api: Api<KafkaConnection> = Api::namespaced(cluster.admin.clone(), &ns);
    eventually("the README's connection to be Ready", || async {
        Ok(ready_of(&api, "default").await?.filter(|r| r.0 == "True"))
    })
    .await?;
    operator.stop().await
}
