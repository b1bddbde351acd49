//! The HTTP sink through the real `weir-worker` binary and the real Kafka broker, sending
//! to an HTTP/1.1 receiver written here and served over real TCP on loopback.
//!
//! The receiver's scripted answers (500, 429 and 503 with `Retry-After`, 400 for marked
//! records) and its stop and restart on the same port are the fault injection: a real
//! receiver gives none of them on demand. Everything else is real: the worker's HTTP client,
//! TLS-less TCP, connection reuse and loss, the broker, the dead-letter topic and the
//! committed offsets.

use crate::common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::{
    DEADLINE, Worker, kafka, pipeline, produce, read_topic, wait_committed_async, wait_until,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// One request the receiver read, with the status it answered.
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    /// Header names lower-cased.
    headers: HashMap<String, String>,
    body: Vec<u8>,
    status: u16,
}

impl Received {
    /// The `id` of every event in the body: a JSON array (Batch) or one object (PerRecord).
    fn ids(&self) -> Vec<i64> {
        let body: Value = serde_json::from_slice(&self.body).unwrap_or(Value::Null);
        let events = match body {
            Value::Array(events) => events,
            event => vec![event],
        };
        events.iter().filter_map(|e| e["id"].as_i64()).collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A scripted answer: status and extra headers.
type Answer = (u16, Vec<(&'static str, String)>);

#[derive(Default)]
struct State {
    received: Vec<Received>,
    /// Answers for the next requests, in order; then 200 (or 400 for a marked body).
    script: VecDeque<Answer>,
}

/// The receiver: answers 400 with a JSON error to any request whose body holds
/// `"poison":true`, 500 to one holding `"crash":true` (a receiver's bug a record triggers),
/// else follows its script, else 200.
struct Receiver {
    port: u16,
    state: Arc<Mutex<State>>,
    tasks: Option<JoinSet<()>>,
    /// Serves HTTPS with this certificate when set.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Receiver {
    async fn start(script: Vec<Answer>) -> anyhow::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            ..State::default()
        }));
        let mut receiver = Receiver {
            port,
            state,
            tasks: None,
            tls: None,
        };
        receiver.serve(listener);
        Ok(receiver)
    }

    /// A receiver over HTTPS, its certificate (for 127.0.0.1) signed by `ca`.
    async fn start_tls(certificate: &Certificates) -> anyhow::Result<Receiver> {
        let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![certificate.server.clone()],
            certificate.server_key.clone_key(),
        )?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut receiver = Receiver {
            port: listener.local_addr()?.port(),
            state: Arc::default(),
            tasks: None,
            tls: Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        };
        receiver.serve(listener);
        Ok(receiver)
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/events", self.port)
    }

    fn serve(&mut self, listener: TcpListener) {
        let mut tasks = JoinSet::new();
        let state = self.state.clone();
        let tls = self.tls.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (state, tls) = (state.clone(), tls.clone());
                connections.spawn(async move {
                    match tls {
                        Some(tls) => {
                            // A client that refuses the certificate ends the handshake.
                            if let Ok(stream) = tls.accept(stream).await {
                                connection(stream, state).await;
                            }
                        }
                        None => connection(stream, state).await,
                    }
                });
            }
        });
        self.tasks = Some(tasks);
    }

    /// Stops listening and drops every open connection (the worker sees them reset).
    async fn stop(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Listens again on the same port.
    async fn restart(&mut self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.serve(listener);
        Ok(())
    }

    fn received(&self) -> Vec<Received> {
        self.state
            .lock()
            .map(|s| s.received.clone())
            .unwrap_or_default()
    }

    /// Requests answered 2xx.
    fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// How many times each id was accepted.
    fn accepted_ids(&self) -> BTreeMap<i64, usize> {
        let mut counts = BTreeMap::new();
        for request in self.accepted() {
            for id in request.ids() {
                *counts.entry(id).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// Serves one connection: HTTP/1.1 requests with a Content-Length body, kept alive.
async fn connection<S>(stream: S, state: Arc<Mutex<State>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        let (status, extra, text) = {
            let Ok(mut state) = state.lock() else { return };
            let text = String::from_utf8_lossy(&body);
            let (status, extra, text) = if text.contains("\"poison\":true") {
                (400, vec![], r#"{"error":"title too long"}"#.to_owned())
            } else if text.contains("\"crash\":true") {
                (500, vec![], "NullPointerException".to_owned())
            } else {
                match state.script.pop_front() {
                    Some((status, extra)) => (status, extra, format!("scripted {status}")),
                    None => (200, vec![], "ok".to_owned()),
                }
            };
            state.received.push(Received {
                at: Instant::now(),
                headers: headers.clone(),
                body,
                status,
            });
            (status, extra, text)
        };
        let mut response = format!(
            "HTTP/1.1 {status} Scripted\r\nContent-Length: {}\r\n",
            text.len()
        );
        for (name, value) in extra {
            response.push_str(&format!("{name}: {value}\r\n"));
        }
        response.push_str("\r\n");
        response.push_str(&text);
        if write.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// `{"id": i}` events keyed `k<i % keys>`, those in `poison` marked for the receiver to refuse.
fn events(ids: std::ops::Range<i64>, keys: i64, poison: &[i64]) -> Vec<(String, Vec<u8>)> {
    marked(ids, keys, poison, "poison")
}

/// [`events`] with those in `which` marked `"<mark>": true`.
fn marked(
    ids: std::ops::Range<i64>,
    keys: i64,
    which: &[i64],
    mark: &str,
) -> Vec<(String, Vec<u8>)> {
    ids.map(|id| {
        let mut event = json!({"id": id});
        if which.contains(&id) {
            event[mark] = json!(true);
        }
        (format!("k{}", id % keys), event.to_string().into_bytes())
    })
    .collect()
}

fn http_pipeline(name: &str, topic: &str, http: Value, extra: Value) -> Value {
    let mut spec = json!({
        "source": {"topics": [topic]},
        "sinks": [{"name": "notify", "http": http}],
        "batch": {"maxRecords": 100, "maxWait": "50ms"},
        "retry": {"attempts": 5, "initialBackoff": "100ms", "maxBackoff": "5s"},
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    pipeline(name, spec)
}

fn assert_each_once(receiver: &Receiver, ids: impl Iterator<Item = i64>) {
    let expected: BTreeMap<i64, usize> = ids.map(|id| (id, 1)).collect();
    assert_eq!(
        receiver.accepted_ids(),
        expected,
        "each record accepted once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_retried_after_500_and_429_waits_out_retry_after_and_lands_once() -> anyhow::Result<()>
{
    let kafka = kafka().await?;
    let topic = kafka.create_topic("http-retry", 1, &[]).await?;
    let receiver = Receiver::start(vec![
        (500, vec![]),
        (429, vec![("Retry-After", "2".into())]),
    ])
    .await?;
    produce(&kafka, &topic, &events(0..40, 4, &[])).await?;
    let dir = tempfile::tempdir()?;
    let spec = http_pipeline(
        "http-retry",
        &topic,
        json!({"url": receiver.url(), "headers": {"X-Source": "weir"}, "headersFrom": {"Authorization": {"env": "NOTIFY_TOKEN"}}}),
        json!({"idempotency": {"key": "event.id"}}),
    );
    let mut worker = Worker::start(
        dir.path(),
        &kafka,
        &spec,
        &[("NOTIFY_TOKEN", "Bearer s3cret-token")],
    )?;
    wait_committed_async(&kafka, "test.http-retry", &topic, 40)
        .await
        .with_context(|| worker.log_text())?;

    let received = receiver.received();
    let statuses: Vec<u16> = received.iter().map(|r| r.status).take(3).collect();
    assert_eq!(statuses, vec![500, 429, 200], "{received:?}");
    let (failed, limited, landed) = (&received[0], &received[1], &received[2]);
    assert_eq!(failed.body, landed.body, "the retry sends the same batch");
    assert!(
        landed.at.duration_since(limited.at) >= Duration::from_secs(2),
        "the request after `Retry-After: 2` came {:?} after it",
        landed.at.duration_since(limited.at)
    );
    let key = failed.header("idempotency-key");
    assert!(key.is_some_and(|k| k.len() == 64), "a batch key: {key:?}");
    assert_eq!(limited.header("idempotency-key"), key);
    assert_eq!(landed.header("idempotency-key"), key);
    for request in &received {
        assert_eq!(request.header("authorization"), Some("Bearer s3cret-token"));
        assert_eq!(request.header("x-source"), Some("weir"));
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    assert_each_once(&receiver, 0..40);
    worker.stop()?;
    assert!(
        !worker.log_text().contains("s3cret-token"),
        "a secret header's value was logged"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn per_record_requests_keep_key_order_carry_their_key_and_land_once() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("http-each", 2, &[]).await?;
    // A Retry-After of an hour: capped by retry.maxBackoff (1s here), else nothing lands
    // within the deadline.
    let receiver = Receiver::start(vec![
        (503, vec![("Retry-After", "3600".into())]),
        (500, vec![]),
        (502, vec![]),
    ])
    .await?;
    produce(&kafka, &topic, &events(0..60, 5, &[])).await?;
    let dir = tempfile::tempdir()?;
    let spec = http_pipeline(
        "http-each",
        &topic,
        json!({"url": receiver.url(), "mode": "PerRecord", "concurrency": 4, "method": "Put"}),
        json!({
            "idempotency": {"key": "event.id"},
            "retry": {"attempts": 5, "initialBackoff": "100ms", "maxBackoff": "1s"},
        }),
    );
    let mut worker = Worker::start(dir.path(), &kafka, &spec, &[])?;
    wait_committed_async(&kafka, "test.http-each", &topic, 60)
        .await
        .with_context(|| worker.log_text())?;

    let received = receiver.received();
    assert!(
        received.len() >= 63,
        "3 refused tries and 60 records: {received:?}"
    );
    for request in &received {
        let ids = request.ids();
        assert_eq!(ids.len(), 1, "one record per request");
        assert_eq!(
            request.header("idempotency-key"),
            Some(ids[0].to_string().as_str()),
            "the key is the record's, on every try"
        );
    }
    assert_each_once(&receiver, 0..60);
    // Per key, the records were accepted in the order they were produced.
    let mut by_key: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for request in receiver.accepted() {
        let id = request.ids()[0];
        by_key.entry(id % 5).or_default().push(id);
    }
    for (key, ids) in by_key {
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted, "key k{key} out of order");
    }
    worker.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_the_receiver_refuses_goes_to_the_dead_letter_topic_with_the_status()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    for mode in ["Batch", "PerRecord"] {
        let name = format!("http-refused-{}", mode.to_lowercase());
        let topic = kafka.create_topic(&name, 1, &[]).await?;
        let dead_letter = kafka.create_topic(&format!("{name}-dlq"), 1, &[]).await?;
        let receiver = Receiver::start(vec![]).await?;
        produce(&kafka, &topic, &events(0..30, 3, &[7, 19])).await?;
        let dir = tempfile::tempdir()?;
        let spec = http_pipeline(
            &name,
            &topic,
            json!({"url": receiver.url(), "mode": mode}),
            json!({"deadLetter": {"topic": dead_letter}}),
        );
        let mut worker = Worker::start(dir.path(), &kafka, &spec, &[])?;
        wait_committed_async(&kafka, &format!("test.{name}"), &topic, 30)
            .await
            .with_context(|| worker.log_text())?;

        let dead = read_topic(&kafka, &dead_letter, 2)?;
        let mut dead_ids = Vec::new();
        for (value, headers) in &dead {
            let event: Value = serde_json::from_slice(value.as_deref().unwrap_or_default())?;
            dead_ids.push(event["id"].as_i64().unwrap_or(-1));
            let message = headers
                .get("weir.error.message")
                .cloned()
                .unwrap_or_default();
            assert!(
                message.contains("HTTP 400") && message.contains("title too long"),
                "{mode}: {message}"
            );
            assert_eq!(
                headers.get("weir.error.class").map(String::as_str),
                Some("permanent")
            );
            assert_eq!(headers.get("weir.sink").map(String::as_str), Some("notify"));
        }
        dead_ids.sort_unstable();
        assert_eq!(dead_ids, vec![7, 19], "{mode}");
        assert_each_once(&receiver, (0..30).filter(|id| *id != 7 && *id != 19));
        worker.stop()?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_receiver_going_away_mid_stream_loses_nothing() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("http-away", 2, &[]).await?;
    let mut receiver = Receiver::start(vec![]).await?;
    let dir = tempfile::tempdir()?;
    let spec = http_pipeline(
        "http-away",
        &topic,
        json!({"url": receiver.url(), "timeout": "2s"}),
        json!({"batch": {"maxRecords": 50, "maxWait": "20ms"}}),
    );
    let mut worker = Worker::start(dir.path(), &kafka, &spec, &[])?;
    produce(&kafka, &topic, &events(0..500, 7, &[])).await?;
    wait_until("the receiver has accepted a batch", DEADLINE, || {
        Ok((!receiver.accepted().is_empty()).then_some(()))
    })?;

    receiver.stop().await;
    produce(&kafka, &topic, &events(500..1000, 7, &[])).await?;
    wait_until(
        "the worker reports not ready while the receiver is gone",
        DEADLINE,
        || Ok((worker.readyz() == Some(503)).then_some(())),
    )
    .with_context(|| worker.log_text())?;
    receiver.restart().await?;

    wait_committed_async(&kafka, "test.http-away", &topic, 1000)
        .await
        .with_context(|| worker.log_text())?;
    let accepted = receiver.accepted_ids();
    let missing: Vec<i64> = (0..1000).filter(|id| !accepted.contains_key(id)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert_eq!(worker.readyz(), Some(200));
    worker.stop()?;
    Ok(())
}

/// The todo-notifications pipeline exactly as shipped in examples/todo-projection.yaml,
/// pointed at this test's topics and receiver, on the sample todo events: every assignment
/// and completion is sent once per record (the duplicated event twice, with the same key),
/// with the Secret's Authorization header handed over as the operator does.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_notifications_pipeline_sends_each_assignment_and_completion()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("todo-notify", 3, &[]).await?;
    let dead_letter = kafka.create_topic("todo-notify-dlq", 1, &[]).await?;
    let receiver = Receiver::start(vec![]).await?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let text = std::fs::read_to_string(format!("{root}/todo-projection.yaml"))?;
    let mut doc = serde_yaml_ng::Deserializer::from_str(&text)
        .map(<Value as serde::Deserialize>::deserialize)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|d| d["kind"] == "EventPipeline" && d["metadata"]["name"] == "todo-notifications")
        .context("todo-notifications missing from the example")?;
    doc["metadata"]["namespace"] = json!("test");
    doc["spec"]["source"]["topics"] = json!([topic]);
    doc["spec"]["deadLetter"]["topic"] = json!(dead_letter);
    doc["spec"]["sinks"][0]["http"]["url"] = json!(receiver.url());

    let lines = std::fs::read_to_string(format!("{root}/data/todo-events.jsonl"))?;
    let records: Vec<(String, Vec<u8>)> = lines
        .lines()
        .map(|line| {
            let event: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            let user = event["payload"]["userId"].as_str().unwrap_or("").to_owned();
            (user, line.as_bytes().to_vec())
        })
        .collect();
    produce(&kafka, &topic, &records).await?;
    let dir = tempfile::tempdir()?;
    let mut worker = Worker::start(
        dir.path(),
        &kafka,
        &doc,
        &[(
            "WEIR_SECRET_TODO_NOTIFICATIONS_AUTHORIZATION",
            "Bearer n0tify",
        )],
    )?;
    wait_committed_async(
        &kafka,
        "test.todo-notifications",
        &topic,
        records.len() as i64,
    )
    .await
    .with_context(|| worker.log_text())?;

    let mut sent: Vec<(String, String)> = Vec::new();
    for request in receiver.accepted() {
        let event: Value = serde_json::from_slice(&request.body)?;
        let id = event["eventId"].as_str().unwrap_or_default().to_owned();
        assert_eq!(request.header("idempotency-key"), Some(id.as_str()));
        assert_eq!(request.header("authorization"), Some("Bearer n0tify"));
        sent.push((id, event["type"].as_str().unwrap_or_default().to_owned()));
    }
    sent.sort();
    let expected: Vec<(String, String)> = [
        ("evt-007", "TodoAssigned"),
        ("evt-009", "TodoCompleted"),
        ("evt-009", "TodoCompleted"),
        ("evt-013", "TodoAssigned"),
        ("evt-014", "TodoCompleted"),
    ]
    .iter()
    .map(|(id, kind)| ((*id).to_owned(), (*kind).to_owned()))
    .collect();
    assert_eq!(sent, expected);
    worker.stop()?;
    Ok(())
}

/// A receiver answering 404 (a wrong URL) stops the worker instead of dead-lettering every
/// record; so does a secret header that cannot be read, named by its field path.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_url_or_a_missing_secret_header_stops_the_worker_naming_it() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let topic = kafka.create_topic("http-fatal", 1, &[]).await?;
    let receiver = Receiver::start(vec![(404, vec![])]).await?;
    produce(&kafka, &topic, &events(0..3, 1, &[])).await?;
    let dir = tempfile::tempdir()?;
    for (name, http, words) in [
        (
            "http-404",
            json!({"url": receiver.url()}),
            "HTTP 404 Not Found from",
        ),
        (
            "http-nosecret",
            json!({"url": receiver.url(), "headersFrom": {"Authorization": {"env": "WEIR_TEST_UNSET_TOKEN"}}}),
            "spec.sinks[0].http.headersFrom[\"Authorization\"]: environment variable WEIR_TEST_UNSET_TOKEN is not set",
        ),
    ] {
        let spec = http_pipeline(name, &topic, http, json!({}));
        let mut worker = Worker::start(dir.path(), &kafka, &spec, &[])?;
        let status = worker.wait(DEADLINE)?;
        let log = worker.log_text();
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(log.contains(words), "{name}: {log}");
        assert_eq!(
            common::committed_total(&kafka, &format!("test.{name}"), &topic)?,
            0,
            "nothing committed past a record that was not delivered"
        );
    }
    assert_eq!(receiver.accepted().len(), 0);
    Ok(())
}

/// A record the receiver answers 500 on every try is dead-lettered alone once
/// `retry.attempts` tries are spent, in both modes: the records delivered by earlier tries
/// are not dead-lettered with it, and are not sent again.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_failing_with_500_on_every_try_is_dead_lettered_alone() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    for mode in ["Batch", "PerRecord"] {
        let name = format!("http-crash-{}", mode.to_lowercase());
        let topic = kafka.create_topic(&name, 1, &[]).await?;
        let dead_letter = kafka.create_topic(&format!("{name}-dlq"), 1, &[]).await?;
        let receiver = Receiver::start(vec![]).await?;
        produce(&kafka, &topic, &marked(0..20, 4, &[5], "crash")).await?;
        let dir = tempfile::tempdir()?;
        let spec = http_pipeline(
            &name,
            &topic,
            json!({"url": receiver.url(), "mode": mode}),
            json!({
                "deadLetter": {"topic": dead_letter},
                "retry": {"attempts": 3, "initialBackoff": "50ms", "maxBackoff": "1s"},
            }),
        );
        let mut worker = Worker::start(dir.path(), &kafka, &spec, &[])?;
        wait_committed_async(&kafka, &format!("test.{name}"), &topic, 20)
            .await
            .with_context(|| worker.log_text())?;

        let dead = read_topic(&kafka, &dead_letter, 1)?;
        let (value, headers) = &dead[0];
        let event: Value = serde_json::from_slice(value.as_deref().unwrap_or_default())?;
        assert_eq!(event["id"], json!(5), "{mode}");
        let message = headers
            .get("weir.error.message")
            .cloned()
            .unwrap_or_default();
        assert!(
            message.contains("HTTP 500") && message.contains("NullPointerException"),
            "{mode}: {message}"
        );
        assert_eq!(headers.get("weir.attempts").map(String::as_str), Some("3"));
        assert_each_once(&receiver, (0..20).filter(|id| *id != 5));
        let failed = receiver
            .received()
            .iter()
            .filter(|r| r.ids().contains(&5))
            .count();
        assert!(failed >= 3, "{mode}: record 5 tried {failed} times");
        assert_eq!(
            worker.metric("weir_records_dead_lettered_total"),
            Some(1),
            "{mode}: only record 5 is dead-lettered"
        );
        worker.stop()?;
    }
    Ok(())
}

/// A throwaway CA, a certificate for 127.0.0.1 it signed, and a second CA that signed
/// nothing here.
struct Certificates {
    ca_pem: String,
    other_ca_pem: String,
    server: tokio_rustls::rustls::pki_types::CertificateDer<'static>,
    server_key: tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
}

fn certificates() -> anyhow::Result<Certificates> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_authority = |name: &str| -> anyhow::Result<(CertificateParams, KeyPair)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ok((params, key))
    };
    let (ca, ca_key) = ca_authority("weir test CA")?;
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let (other, other_key) = ca_authority("another CA")?;
    let other_ca_pem = other.self_signed(&other_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate()?;
    let server =
        CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&server_key, &issuer)?;
    Ok(Certificates {
        ca_pem,
        other_ca_pem,
        server: server.der().clone(),
        server_key: tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(
            server_key.serialize_der().into(),
        ),
    })
}

/// https:// is verified against the trusted roots the worker's SSL_CERT_FILE names: with the
/// CA that signed the receiver's certificate the events land; with another CA nothing is
/// sent, the worker reports not ready and keeps retrying (an untrusted certificate is an
/// outage, not a reason to dead-letter).
#[tokio::test(flavor = "multi_thread")]
async fn https_is_verified_against_the_trusted_roots() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let dir = tempfile::tempdir()?;
    let certificates = certificates()?;
    let ca = dir.path().join("ca.pem");
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&ca, &certificates.ca_pem)?;
    std::fs::write(&other, &certificates.other_ca_pem)?;
    let receiver = Receiver::start_tls(&certificates).await?;

    let topic = kafka.create_topic("http-tls", 1, &[]).await?;
    produce(&kafka, &topic, &events(0..10, 2, &[])).await?;
    let trusted = http_pipeline(
        "http-tls",
        &topic,
        json!({"url": receiver.url()}),
        json!({}),
    );
    let ca_text = ca.display().to_string();
    let mut worker = Worker::start(dir.path(), &kafka, &trusted, &[("SSL_CERT_FILE", &ca_text)])?;
    wait_committed_async(&kafka, "test.http-tls", &topic, 10)
        .await
        .with_context(|| worker.log_text())?;
    assert_each_once(&receiver, 0..10);
    worker.stop()?;
    let before = receiver.received().len();

    let topic = kafka.create_topic("http-untrusted", 1, &[]).await?;
    produce(&kafka, &topic, &events(0..10, 2, &[])).await?;
    let untrusted = http_pipeline(
        "http-untrusted",
        &topic,
        json!({"url": receiver.url()}),
        json!({}),
    );
    let other_text = other.display().to_string();
    let worker = Worker::start(
        dir.path(),
        &kafka,
        &untrusted,
        &[("SSL_CERT_FILE", &other_text)],
    )?;
    wait_until("the worker reports not ready and retries", DEADLINE, || {
        Ok(
            (worker.readyz() == Some(503) && worker.metric("weir_retries_total").unwrap_or(0) >= 2)
                .then_some(()),
        )
    })
    .with_context(|| worker.log_text())?;
    let log = worker.log_text();
    assert!(log.contains("invalid peer certificate"), "{log}");
    assert_eq!(
        receiver.received().len(),
        before,
        "a request passed an untrusted certificate"
    );
    assert_eq!(
        common::committed_total(&kafka, "test.http-untrusted", &topic)?,
        0
    );
    // Dropped, so killed: a worker stopped while its sink is unreachable exits with 1.
    Ok(())
}
