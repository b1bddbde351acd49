//! The Kafka client module against the real broker's secured listeners (the harness's
//! throwaway CA and users): SASL_SSL with SCRAM-SHA-512, SSL with a required client
//! certificate, SASL_PLAINTEXT with PLAIN. The worker binary runs a pipeline over each,
//! writing to PostgreSQL and dead-lettering, with its secrets from the environment as the
//! operator hands them over; wrong credentials and certificates are named as such; the
//! password and the private key appear in no log line.

use crate::common;

use std::time::Duration;

use anyhow::Context as _;
use common::{
    DEADLINE, Worker, kafka, pipeline, produce, read_topic, start_documents, wait_committed,
    wait_until,
};
use serde_json::{Value, json};
use weir_crds::{KafkaConnectionSpec, SecretKeySelector};
use weir_testkit::{KafkaSecurity, TestDatabase, TestKafka};
use weir_worker::kafka::{self, Admin, AdminError, Cause, Credentials, Role};

/// How a test connects: the KafkaConnection and the environment the worker reads its
/// Secret keys from (`WEIR_SECRET_<NAME>_<KEY>`, as the operator sets them).
struct Listener {
    connection: Value,
    env: Vec<(String, String)>,
    /// The values that must never be logged.
    secrets: Vec<String>,
}

impl Listener {
    fn spec(&self) -> anyhow::Result<KafkaConnectionSpec> {
        Ok(serde_json::from_value(self.connection["spec"].clone())?)
    }

    fn credentials(&self) -> anyhow::Result<Credentials> {
        let env = self.env.clone();
        Ok(Credentials::resolve(
            &self.spec()?,
            |s: &SecretKeySelector| {
                env.iter()
                    .find(|(k, _)| *k == s.env_name())
                    .map(|(_, v)| v.clone())
                    .ok_or("not set")
            },
        )?)
    }

    async fn admin(&self) -> anyhow::Result<Admin> {
        let config = kafka::client_config(&self.spec()?, &self.credentials()?, Role::Admin);
        Ok(Admin::new(&config, Duration::from_secs(10))?)
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

fn connection(spec: Value) -> Value {
    json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "KafkaConnection",
        "metadata": {"name": "default", "namespace": "test"},
        "spec": spec,
    })
}

/// A line of a PEM body: what a leaked key would show.
fn pem_body_line(pem: &str) -> String {
    pem.lines()
        .find(|l| !l.starts_with("-----") && l.len() > 20)
        .unwrap_or_default()
        .to_owned()
}

fn scram(security: &KafkaSecurity, password: &str, ca: &str) -> Listener {
    Listener {
        connection: connection(json!({
            "bootstrapServers": [security.sasl_ssl],
            "tls": {"caCert": {"name": "kafka-ca", "key": "ca.crt"}},
            "sasl": {
                "mechanism": "SCRAM-SHA-512",
                "username": security.scram_user,
                "passwordSecretRef": {"name": "kafka-user", "key": "password"},
            },
        })),
        env: vec![
            ("WEIR_SECRET_KAFKA_CA_CA_CRT".into(), ca.to_owned()),
            (
                "WEIR_SECRET_KAFKA_USER_PASSWORD".into(),
                password.to_owned(),
            ),
        ],
        secrets: vec![password.to_owned()],
    }
}

fn mutual_tls(security: &KafkaSecurity, cert: &str, key: &str, ca: &str) -> Listener {
    Listener {
        connection: connection(json!({
            "bootstrapServers": [security.ssl],
            "tls": {
                "caCert": {"name": "kafka-ca", "key": "ca.crt"},
                "clientCert": {"name": "kafka-client", "key": "tls.crt"},
                "clientKey": {"name": "kafka-client", "key": "tls.key"},
            },
        })),
        env: vec![
            ("WEIR_SECRET_KAFKA_CA_CA_CRT".into(), ca.to_owned()),
            ("WEIR_SECRET_KAFKA_CLIENT_TLS_CRT".into(), cert.to_owned()),
            ("WEIR_SECRET_KAFKA_CLIENT_TLS_KEY".into(), key.to_owned()),
        ],
        secrets: vec![pem_body_line(key)],
    }
}

fn tls_without_client_cert(security: &KafkaSecurity) -> Listener {
    Listener {
        connection: connection(json!({
            "bootstrapServers": [security.ssl],
            "tls": {"caCert": {"name": "kafka-ca", "key": "ca.crt"}},
        })),
        env: vec![(
            "WEIR_SECRET_KAFKA_CA_CA_CRT".into(),
            security.ca_pem.clone(),
        )],
        secrets: Vec::new(),
    }
}

fn plain(security: &KafkaSecurity, password: &str) -> Listener {
    Listener {
        connection: connection(json!({
            "bootstrapServers": [security.sasl_plaintext],
            "sasl": {
                "mechanism": "PLAIN",
                "username": security.plain_user,
                "passwordSecretRef": {"name": "kafka-user", "key": "password"},
            },
        })),
        env: vec![(
            "WEIR_SECRET_KAFKA_USER_PASSWORD".into(),
            password.to_owned(),
        )],
        secrets: vec![password.to_owned()],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_secured_listener_answers_metadata_offsets_and_watermarks() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let security = kafka.security()?.clone();
    let topic = kafka.create_topic("secured", 3, &[]).await?;
    let records: Vec<(String, Vec<u8>)> = (0..7).map(|i| (i.to_string(), b"{}".to_vec())).collect();
    produce(&kafka, &topic, &records).await?;
    let listeners = [
        (
            "SASL_SSL/SCRAM-SHA-512",
            scram(&security, &security.scram_password, &security.ca_pem),
        ),
        (
            "SSL with a client certificate",
            mutual_tls(
                &security,
                &security.client_cert_pem,
                &security.client_key_pem,
                &security.ca_pem,
            ),
        ),
        (
            "SASL_PLAINTEXT/PLAIN",
            plain(&security, &security.plain_password),
        ),
    ];
    for (name, listener) in listeners {
        let admin = listener.admin().await?;
        let cluster = admin.cluster().await.with_context(|| name.to_owned())?;
        assert_eq!(cluster.brokers, 1, "{name}");
        let watermarks = admin.high_watermarks(std::slice::from_ref(&topic)).await?;
        assert_eq!(watermarks.len(), 3, "{name}: {watermarks:?}");
        assert_eq!(
            watermarks.values().sum::<i64>(),
            7,
            "{name}: {watermarks:?}"
        );
        let committed = admin
            .committed_offsets("nobody-committed", std::slice::from_ref(&topic))
            .await?;
        assert!(committed.is_empty(), "{name}: {committed:?}");
    }
    Ok(())
}

/// The cause of a failed metadata request on `listener`.
async fn cause_of(listener: &Listener) -> anyhow::Result<(Cause, String)> {
    let admin = listener.admin().await?;
    match admin.cluster().await {
        Ok(_) => anyhow::bail!("the broker accepted the connection"),
        Err(e @ AdminError::Connection { .. }) => Ok((e.cause(), e.to_string())),
        Err(e) => anyhow::bail!("not a connection failure: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_wrong_ca_and_missing_or_foreign_client_certificates_are_named()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    let s = kafka.security()?.clone();
    let cases = [
        (
            "a wrong SCRAM password",
            scram(&s, "not-the-password", &s.ca_pem),
            Cause::Authentication,
        ),
        (
            "a wrong PLAIN password",
            plain(&s, "not-the-password"),
            Cause::Authentication,
        ),
        (
            "an unknown CA",
            scram(&s, &s.scram_password, &s.other_ca_pem),
            Cause::Tls,
        ),
        (
            "no client certificate",
            tls_without_client_cert(&s),
            Cause::Tls,
        ),
        (
            "a client certificate from another CA",
            mutual_tls(
                &s,
                &s.other_client_cert_pem,
                &s.other_client_key_pem,
                &s.ca_pem,
            ),
            Cause::Tls,
        ),
    ];
    for (what, listener, expected) in cases {
        let (cause, message) = cause_of(&listener).await.with_context(|| what.to_owned())?;
        assert_eq!(cause, expected, "{what}: {message}");
        for secret in &listener.secrets {
            assert!(!message.contains(secret.as_str()), "{what}: {message}");
        }
        assert!(!message.contains(&s.scram_password), "{what}: {message}");
    }
    Ok(())
}

/// Runs the worker over `listener`: 5 orders, one of them not JSON; 4 rows land in
/// PostgreSQL, 1 record is dead-lettered, every offset is committed, and the worker's
/// whole log holds none of the listener's secrets.
async fn pipeline_runs_over(listener: Listener, bootstrap: &str) -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("secure-orders", 1, &[]).await?;
    let dead_letter = kafka.create_topic("secure-orders-dlq", 1, &[]).await?;
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, amount numeric NOT NULL)")
        .execute(&db.pool)
        .await?;
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for id in 1..=5 {
        let value = if id == 3 {
            b"{not json".to_vec()
        } else {
            serde_json::to_vec(&json!({"id": id, "amount": id * 10}))?
        };
        records.push((id.to_string(), value));
    }
    produce(&kafka, &topic, &records).await?;
    let group = weir_testkit::unique_name("secure");
    let doc = pipeline(
        "orders",
        json!({
            "source": {"topics": [topic], "consumerGroup": group},
            "sinks": [{"postgres": {
                "urlFrom": {"env": "ORDERS_DB_URL"}, "table": "orders", "mode": "Upsert",
                "keyColumns": ["id"],
                "columns": [{"name": "id", "type": "bigint"}, {"name": "amount", "type": "numeric"}]
            }}],
            "batch": {"maxRecords": 1000, "maxWait": "200ms"},
            "deadLetter": {"topic": dead_letter},
        }),
    );
    let dir = tempfile::tempdir()?;
    let mut env = listener.env();
    env.push(("ORDERS_DB_URL", &db.url));
    // The file's KafkaConnection carries TLS and SASL; `--bootstrap-servers` (which the
    // helper passes) only replaces its address.
    let worker = start_documents(
        dir.path(),
        &TestKafka::at(bootstrap),
        &[&doc, &listener.connection],
        &env,
        &[],
    )?;
    let (k, t, g) = (kafka.clone(), topic.clone(), group.clone());
    let mut worker = tokio::task::spawn_blocking(move || {
        wait_committed(&k, &g, &t, 5, Some(&worker)).map(|()| worker)
    })
    .await??;
    // The lag reader's two reads, over the same listener.
    let admin = listener.admin().await?;
    let topics = std::slice::from_ref(&topic);
    let committed = admin.committed_offsets(&group, topics).await?;
    let watermarks = admin.high_watermarks(topics).await?;
    assert_eq!(committed.values().sum::<i64>(), 5, "{committed:?}");
    assert_eq!(committed, watermarks, "no lag left");
    let ids: Vec<(i64,)> = sqlx::query_as("SELECT id FROM orders ORDER BY id")
        .fetch_all(&db.pool)
        .await?;
    assert_eq!(
        ids.into_iter().map(|(i,)| i).collect::<Vec<_>>(),
        vec![1, 2, 4, 5]
    );
    let k = kafka.clone();
    let dead = tokio::task::spawn_blocking(move || read_topic(&k, &dead_letter, 1)).await??;
    assert_eq!(dead[0].0.as_deref(), Some(&b"{not json"[..]));
    worker.stop()?;
    let log = worker.log_text();
    assert!(log.contains("consuming"), "{log}");
    for secret in &listener.secrets {
        assert!(!secret.is_empty());
        assert!(
            !log.contains(secret.as_str()),
            "a secret is in the log:\n{log}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_consumes_writes_and_dead_letters_over_sasl_ssl_scram_512() -> anyhow::Result<()>
{
    let kafka = kafka().await?;
    let s = kafka.security()?.clone();
    pipeline_runs_over(scram(&s, &s.scram_password, &s.ca_pem), &s.sasl_ssl).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_consumes_writes_and_dead_letters_over_mutual_tls() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let s = kafka.security()?.clone();
    let listener = mutual_tls(&s, &s.client_cert_pem, &s.client_key_pem, &s.ca_pem);
    pipeline_runs_over(listener, &s.ssl).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_consumes_writes_and_dead_letters_over_sasl_plaintext_plain()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    let s = kafka.security()?.clone();
    pipeline_runs_over(plain(&s, &s.plain_password), &s.sasl_plaintext).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_a_wrong_password_says_so_is_not_ready_and_logs_no_secret()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    let s = kafka.security()?.clone();
    let topic = kafka.create_topic("secure-refused", 1, &[]).await?;
    let wrong = "wrong-password-1f2e3d";
    let listener = scram(&s, wrong, &s.ca_pem);
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE t (id bigint)")
        .execute(&db.pool)
        .await?;
    let doc = pipeline(
        "refused",
        json!({
            "source": {"topics": [topic]},
            "sinks": [{"postgres": {"urlFrom": {"env": "DB_URL"}, "table": "t", "mode": "Insert",
                "columns": [{"name": "id", "type": "bigint"}]}}],
        }),
    );
    let dir = tempfile::tempdir()?;
    let mut env = listener.env();
    env.push(("DB_URL", &db.url));
    let worker = start_documents(
        dir.path(),
        &TestKafka::at(&s.sasl_ssl),
        &[&doc, &listener.connection],
        &env,
        &[],
    )?;
    let said = |w: &Worker| {
        let log = w.log_text();
        log.contains("AuthenticationFailed") && log.contains("SASL authentication failed")
    };
    let mut worker = tokio::task::spawn_blocking(move || {
        wait_until("the worker names the failure", DEADLINE, || {
            Ok((said(&worker) && worker.readyz() == Some(503)).then_some(()))
        })
        .map(|()| worker)
    })
    .await??;
    // Its batch cannot be written: it would exit 1 after SIGTERM (not committed).
    worker.signal("KILL")?;
    worker.wait(DEADLINE)?;
    let log = worker.log_text();
    assert!(!log.contains(wrong), "the password is in the log:\n{log}");
    Ok(())
}

/// A kafka sink with its own `connectionRef`: the pipeline reads over the plaintext
/// listener, the sink's producer reaches the cluster over SASL_SSL with the analytics
/// connection's own CA and password; nothing of them is logged.
#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_sink_produces_through_its_own_connection() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let s = kafka.security()?.clone();
    let input = kafka.create_topic("own-connection-in", 2, &[]).await?;
    let output = kafka.create_topic("own-connection-out", 1, &[]).await?;
    let records: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (i.to_string(), format!("{{\"n\": {i}}}").into_bytes()))
        .collect();
    produce(&kafka, &input, &records).await?;
    let mut listener = scram(&s, &s.scram_password, &s.ca_pem);
    listener.connection["metadata"]["name"] = json!("analytics");
    let group = weir_testkit::unique_name("own-connection");
    let doc = pipeline(
        "copy",
        json!({
            "source": {"topics": [input], "consumerGroup": group},
            "sinks": [{"kafka": {"topic": output, "connectionRef": {"name": "analytics"}}}],
            "batch": {"maxRecords": 100, "maxWait": "100ms"},
        }),
    );
    let dir = tempfile::tempdir()?;
    let worker = start_documents(
        dir.path(),
        &kafka,
        &[&doc, &listener.connection],
        &listener.env(),
        &[],
    )?;
    let (k, t, g) = (kafka.clone(), input.clone(), group.clone());
    let mut worker = tokio::task::spawn_blocking(move || {
        wait_committed(&k, &g, &t, 20, Some(&worker)).map(|()| worker)
    })
    .await??;
    let k = kafka.clone();
    let copied = tokio::task::spawn_blocking(move || read_topic(&k, &output, 20)).await??;
    let mut values: Vec<Vec<u8>> = copied.into_iter().filter_map(|r| r.0).collect();
    values.sort();
    let mut sent: Vec<Vec<u8>> = records.into_iter().map(|(_, v)| v).collect();
    sent.sort();
    assert_eq!(values, sent, "every record copied as it is");
    worker.stop()?;
    let log = worker.log_text();
    assert!(
        !log.contains(&s.scram_password),
        "a secret is in the log:\n{log}"
    );
    Ok(())
}

/// The same sink with a wrong password for its connection: the worker says so once, naming
/// the sink's connection and the cause, and logs no secret.
#[tokio::test(flavor = "multi_thread")]
async fn a_kafka_sink_with_a_wrong_password_names_its_connection() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let s = kafka.security()?.clone();
    let input = kafka.create_topic("own-connection-refused", 1, &[]).await?;
    let output = kafka
        .create_topic("own-connection-refused-out", 1, &[])
        .await?;
    produce(&kafka, &input, &[("k".to_owned(), b"{}".to_vec())]).await?;
    let wrong = "wrong-password-7c1b2a";
    let mut listener = scram(&s, wrong, &s.ca_pem);
    listener.connection["metadata"]["name"] = json!("analytics");
    let doc = pipeline(
        "copy",
        json!({
            "source": {"topics": [input]},
            "sinks": [{"kafka": {"topic": output, "connectionRef": {"name": "analytics"}}}],
        }),
    );
    let dir = tempfile::tempdir()?;
    let worker = start_documents(
        dir.path(),
        &kafka,
        &[&doc, &listener.connection],
        &listener.env(),
        &[],
    )?;
    let mut worker = tokio::task::spawn_blocking(move || {
        wait_until("the worker names the failure", DEADLINE, || {
            let log = worker.log_text();
            Ok((log.contains("SASL authentication failed")
                && log.contains("KafkaConnection analytics"))
            .then_some(()))
        })
        .map(|()| worker)
    })
    .await??;
    // Its batch cannot be written: it would exit 1 after SIGTERM (not committed).
    worker.signal("KILL")?;
    worker.wait(DEADLINE)?;
    let log = worker.log_text();
    assert!(!log.contains(wrong), "the password is in the log:\n{log}");
    assert_eq!(
        log.matches("SASL authentication failed").count(),
        1,
        "said once, not on every attempt:\n{log}"
    );
    Ok(())
}
