//! The HTTP sink: a batch's events sent as one request (a JSON array or NDJSON), or one
//! request per record with up to `concurrency` in flight and each key's records in order.
//!
//! Answers are judged by [`answer`]: a refused request (4xx) in Batch mode is sent again in
//! halves until the refused records stand alone, so only they go to the dead-letter topic.
//! A write that fails part-way (a 5xx, the receiver gone) is retried by the engine with the
//! same input; what this sink already delivered or saw refused in the failed write is
//! remembered and not sent again, so a retry sends only the rest; on the last try the
//! engine allows (`retry.attempts`), what still fails with a 5xx is refused rather than the
//! write, so only those records are dead-lettered. `Retry-After` closes a gate: no request
//! leaves before the time it asks for (at most `retry.maxBackoff` away).

pub mod answer;

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use sha2::{Digest, Sha256};
use weir_crds::{EventPipelineSpec, HttpEncoding, HttpMethod, HttpMode, SecretSource};

use super::{Rejected, Sink, SinkError, WriteInput, Written};
use crate::config::resolve_secret;
use crate::record::field;
use crate::retry::ErrorClass;

/// Requests in flight at once in PerRecord mode when `concurrency` is not set.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// How much of a response body is read; the rest is dropped with the connection.
const BODY_LIMIT: usize = 64 * 1024;
/// The header carrying the idempotency key.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A record's place in its topic: what the sink remembers between the tries of one write.
type Position = (String, i32, i64);

/// What the sink remembers between the tries of one input.
#[derive(Debug, Default)]
struct Memory {
    /// The positions of the input being tried, in order.
    input: Vec<Position>,
    /// Tries of that input so far, counted as the engine's retry loop counts them.
    tries: u32,
    /// Its records already delivered or refused by an earlier try.
    settled: HashMap<Position, Settled>,
}

/// What became of a record in a write that then failed as a whole.
#[derive(Clone, Debug)]
enum Settled {
    Delivered,
    Refused(String),
}

/// The fate of one request.
#[derive(Debug)]
enum Outcome {
    Delivered,
    /// The receiver refused the request's records (4xx); the reason names the status.
    Refused(String),
    /// The request failed as a whole; the write is retried by its class.
    Failed(SinkError),
}

pub struct HttpSink {
    /// `spec.sinks[i].http`, for messages.
    at: String,
    uri: Uri,
    /// The URL without its query or credentials, for messages.
    endpoint: String,
    method: Method,
    mode: HttpMode,
    encoding: HttpEncoding,
    timeout: Duration,
    concurrency: usize,
    /// `spec.idempotency.key`: the field path of each record's idempotency key.
    idempotency_key: Option<String>,
    /// `retry.maxBackoff`: the longest `Retry-After` honoured.
    max_wait: Duration,
    /// Headers from `headers`, with the defaults (Content-Type, User-Agent).
    plain_headers: HeaderMap,
    /// `headersFrom`: read when the sink is prepared, so a missing secret stops the start.
    /// (the name as the spec spells it, the header, where its value comes from)
    secret_headers: Vec<(String, HeaderName, SecretSource)>,
    headers: tokio::sync::OnceCell<HeaderMap>,
    client: HttpClient,
    /// `retry.attempts`: on the last try a request still failing with a 5xx refuses its
    /// records instead of failing the write, so that only they are dead-lettered, not
    /// records delivered by earlier tries.
    attempts: u32,
    memory: Mutex<Memory>,
    /// No request is sent before this instant (set from `Retry-After`).
    not_before: Mutex<Option<tokio::time::Instant>>,
}

impl std::fmt::Debug for HttpSink {
    // Header values are left out: some come from secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSink")
            .field("endpoint", &self.endpoint)
            .field("method", &self.method)
            .field("mode", &self.mode)
            .field("encoding", &self.encoding)
            .field(
                "headers",
                &self
                    .plain_headers
                    .keys()
                    .chain(self.secret_headers.iter().map(|(_, name, _)| name))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Sink for HttpSink {
    /// Reads the secret headers; nothing is sent (a request would deliver something).
    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move { self.headers().await.map(drop) })
    }

    fn write<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
    ) -> BoxFuture<'a, Result<Written, SinkError>> {
        Box::pin(self.write_batch(input))
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl HttpSink {
    /// Builds the sink for `spec.sinks[i].http` (`at`) of `pipeline`, sending to `url`.
    /// Connections are made on first use. Secret headers are read by `prepare`.
    pub fn new(
        spec: &weir_crds::HttpSink,
        url: &str,
        at: &str,
        pipeline: &EventPipelineSpec,
    ) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|_| format!("{at}.url: not a valid URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{at}.url: must start with http:// or https://")),
        };
        let Some(authority) = uri.authority() else {
            return Err(format!("{at}.url: names no host"));
        };
        if authority.as_str().contains('@') {
            return Err(format!(
                "{at}.url: holds credentials, which are not sent: put them in headersFrom (Authorization)"
            ));
        }
        let endpoint = format!(
            "{}://{}{}",
            uri.scheme_str().unwrap_or("http"),
            authority,
            uri.path()
        );
        let timeout = spec
            .timeout
            .parse()
            .map_err(|e| format!("{at}.timeout: {e}"))?;
        let header_name = |name: &str, field: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{at}.{field}[{name:?}]: not a valid HTTP header name"))
        };
        let mut plain_headers = HeaderMap::new();
        plain_headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(match (spec.mode, spec.encoding) {
                (HttpMode::Batch, HttpEncoding::Ndjson) => "application/x-ndjson",
                _ => "application/json",
            }),
        );
        plain_headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("weir-worker/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in &spec.headers {
            let value = HeaderValue::from_str(value).map_err(|_| {
                format!("{at}.headers[{name:?}]: holds characters a header value cannot")
            })?;
            plain_headers.insert(header_name(name, "headers")?, value);
        }
        let secret_headers = spec
            .headers_from
            .iter()
            .map(|(name, source)| {
                Ok((
                    name.clone(),
                    header_name(name, "headersFrom")?,
                    source.clone(),
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            at: at.to_owned(),
            uri,
            endpoint,
            method: match spec.method {
                HttpMethod::Post => Method::POST,
                HttpMethod::Put => Method::PUT,
                HttpMethod::Patch => Method::PATCH,
            },
            mode: spec.mode,
            encoding: spec.encoding,
            timeout,
            concurrency: spec
                .concurrency
                .map_or(DEFAULT_CONCURRENCY, |n| n.clamp(1, 256) as usize),
            idempotency_key: pipeline.idempotency.as_ref().map(|i| i.key.clone()),
            max_wait: pipeline
                .retry
                .max_backoff
                .parse()
                .map_err(|e| format!("spec.retry.maxBackoff: {e}"))?,
            plain_headers,
            secret_headers,
            headers: tokio::sync::OnceCell::new(),
            client: client(https, timeout)?,
            attempts: pipeline.retry.attempts.max(1) as u32,
            memory: Mutex::new(Memory::default()),
            not_before: Mutex::new(None),
        })
    }

    /// Every header of a request but the idempotency key, the secret ones read once.
    async fn headers(&self) -> Result<&HeaderMap, SinkError> {
        self.headers
            .get_or_try_init(|| async {
                let mut headers = self.plain_headers.clone();
                for (spelt, name, source) in &self.secret_headers {
                    let at = format!("{}.headersFrom[{spelt:?}]", self.at);
                    let fatal = |message: String| SinkError::new(ErrorClass::Fatal, message);
                    let value = resolve_secret(source).map_err(|e| fatal(format!("{at}: {e}")))?;
                    let mut value = HeaderValue::from_str(&value).map_err(|_| {
                        fatal(format!(
                            "{at}: the secret holds characters a header value cannot (a line break?)"
                        ))
                    })?;
                    // hyper keeps sensitive values out of its own debug output.
                    value.set_sensitive(true);
                    headers.insert(name.clone(), value);
                }
                Ok(headers)
            })
            .await
    }

    async fn write_batch(&self, input: &[WriteInput<'_>]) -> Result<Written, SinkError> {
        let (pending, last) = {
            let mut memory = self.lock_memory();
            let current: Vec<Position> = input.iter().map(position).collect();
            if memory.input != current {
                *memory = Memory {
                    input: current,
                    ..Memory::default()
                };
            }
            memory.tries += 1;
            let pending: Vec<&WriteInput<'_>> = input
                .iter()
                .filter(|item| !memory.settled.contains_key(&position(item)))
                .collect();
            (pending, memory.tries >= self.attempts)
        };
        match self.mode {
            HttpMode::Batch => self.send_batches(&pending, last).await?,
            HttpMode::PerRecord => self.send_each(&pending, last).await?,
        }
        let settled = std::mem::take(&mut *self.lock_memory()).settled;
        let rejected = input
            .iter()
            .filter_map(|item| match settled.get(&position(item)) {
                Some(Settled::Refused(reason)) => Some(Rejected {
                    index: item.index,
                    class: ErrorClass::Permanent,
                    reason: reason.clone(),
                }),
                _ => None,
            })
            .collect();
        Ok(Written {
            rejected,
            skipped: 0,
        })
    }

    /// Batch mode: one request for all of `items`; a refused request is sent again in
    /// halves, in order, until each refused record stands alone. On the `last` try a
    /// request still failing with a 5xx is split the same way, and the records that still
    /// fail alone are refused.
    async fn send_batches(&self, items: &[&WriteInput<'_>], last: bool) -> Result<(), SinkError> {
        let mut ranges = VecDeque::new();
        if !items.is_empty() {
            ranges.push_back(0..items.len());
        }
        while let Some(range) = ranges.pop_front() {
            let part = &items[range.clone()];
            let body = self.batch_body(part);
            match self.send(body, self.batch_key(part)).await {
                Outcome::Delivered => self.settle(part, Settled::Delivered),
                Outcome::Refused(reason) if part.len() == 1 => {
                    self.settle(part, Settled::Refused(reason));
                }
                Outcome::Failed(e)
                    if last && e.class == ErrorClass::Transient && part.len() == 1 =>
                {
                    self.settle(part, Settled::Refused(e.message));
                }
                Outcome::Refused(_) => {
                    let middle = range.start + part.len() / 2;
                    ranges.push_front(middle..range.end);
                    ranges.push_front(range.start..middle);
                }
                Outcome::Failed(e) if last && e.class == ErrorClass::Transient => {
                    let middle = range.start + part.len() / 2;
                    ranges.push_front(middle..range.end);
                    ranges.push_front(range.start..middle);
                }
                Outcome::Failed(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// PerRecord mode: one request per record, up to `concurrency` at once; the records of
    /// one key (of one partition, for records without a key) one after the other, in order.
    /// A failed request stops its key's chain; the other chains go on, so a retry has less
    /// to send. On the `last` try a record still failing with a 5xx is refused and its key's
    /// chain goes on.
    async fn send_each(&self, items: &[&WriteInput<'_>], last: bool) -> Result<(), SinkError> {
        let mut chains: Vec<Vec<&WriteInput<'_>>> = Vec::new();
        let mut chain_of: HashMap<(&str, i32, Option<&[u8]>), usize> = HashMap::new();
        for item in items {
            let record = item.record;
            let group = (
                record.topic.as_str(),
                record.partition,
                record.key.as_deref(),
            );
            let next = chains.len();
            let chain = *chain_of.entry(group).or_insert(next);
            if chain == next {
                chains.push(Vec::new());
            }
            chains[chain].push(item);
        }
        let sends: Vec<_> = chains
            .into_iter()
            .map(|chain| self.send_chain(chain, last))
            .collect();
        let failures: Vec<SinkError> = futures::stream::iter(sends)
            .buffer_unordered(self.concurrency)
            .filter_map(std::future::ready)
            .collect()
            .await;
        // The most telling failure decides how the write is retried: one that stops the
        // pipeline, else an outage (never given up), else a transient one.
        let rank = |e: &SinkError| match e.class {
            ErrorClass::Fatal => 0,
            ErrorClass::Unavailable => 1,
            ErrorClass::Transient => 2,
            ErrorClass::Permanent => 3,
        };
        match failures.into_iter().min_by_key(rank) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends one key's records in order; stops at the first failed request.
    async fn send_chain(&self, chain: Vec<&WriteInput<'_>>, last: bool) -> Option<SinkError> {
        for item in chain {
            let body = Bytes::from(serde_json::to_vec(item.event).unwrap_or_default());
            match self.send(body, self.record_key(item)).await {
                Outcome::Delivered => self.settle(&[item], Settled::Delivered),
                Outcome::Refused(reason) => self.settle(&[item], Settled::Refused(reason)),
                Outcome::Failed(e) if last && e.class == ErrorClass::Transient => {
                    self.settle(&[item], Settled::Refused(e.message));
                }
                Outcome::Failed(e) => return Some(e),
            }
        }
        None
    }

    fn batch_body(&self, items: &[&WriteInput<'_>]) -> Bytes {
        let mut body = Vec::with_capacity(items.len() * 64 + 2);
        let ndjson = self.encoding == HttpEncoding::Ndjson;
        if !ndjson {
            body.push(b'[');
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 && !ndjson {
                body.push(b',');
            }
            // Writing a Value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut body, item.event);
            if ndjson {
                body.push(b'\n');
            }
        }
        if !ndjson {
            body.push(b']');
        }
        Bytes::from(body)
    }

    /// A record's idempotency key: its `spec.idempotency.key` field (a string as it is,
    /// anything else as JSON text); `None` without idempotency or when the field is missing.
    fn record_key(&self, item: &WriteInput<'_>) -> Option<String> {
        let path = self.idempotency_key.as_deref()?;
        match field(item.event, path)? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }

    /// A request of several records: the hex SHA-256 of their keys in order (a record
    /// without one counts as `topic/partition@offset`), so the same records give the same
    /// key on every try; a request of one record carries that record's key.
    fn batch_key(&self, items: &[&WriteInput<'_>]) -> Option<String> {
        self.idempotency_key.as_ref()?;
        if let [item] = items {
            return self.record_key(item);
        }
        let mut hash = Sha256::new();
        for item in items {
            let key = self.record_key(item).unwrap_or_else(|| {
                let r = item.record;
                format!("{}/{}@{}", r.topic, r.partition, r.offset)
            });
            hash.update(key.as_bytes());
            hash.update(b"\n");
        }
        Some(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    fn settle(&self, items: &[&WriteInput<'_>], fate: Settled) {
        let mut memory = self.lock_memory();
        for item in items {
            memory.settled.insert(position(item), fate.clone());
        }
    }

    fn lock_memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends one request once the `Retry-After` gate is open, and judges the answer.
    async fn send(&self, body: Bytes, idempotency_key: Option<String>) -> Outcome {
        self.wait_turn().await;
        let headers = match self.headers().await {
            Ok(headers) => headers,
            Err(e) => return Outcome::Failed(e),
        };
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = headers.clone();
        if let Some(key) = idempotency_key {
            match HeaderValue::from_str(&key) {
                Ok(value) => {
                    request
                        .headers_mut()
                        .insert(HeaderName::from_static(IDEMPOTENCY_KEY), value);
                }
                Err(_) => {
                    return Outcome::Refused(
                        "the idempotency key holds characters a header value cannot".into(),
                    );
                }
            }
        }
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let mut body = response.into_body();
            let mut start = Vec::new();
            while start.len() < BODY_LIMIT {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            start.extend_from_slice(&data);
                        }
                    }
                    // A body cut short still leaves the status to judge by.
                    Some(Err(_)) | None => break,
                }
            }
            Ok::<_, hyper_util::client::legacy::Error>((status, retry_after, start))
        };
        let (status, retry_after, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => {
                return Outcome::Failed(SinkError::new(
                    ErrorClass::Unavailable,
                    format!("{} gave no answer within {:?}", self.endpoint, self.timeout),
                ));
            }
            Ok(Err(e)) => {
                return Outcome::Failed(SinkError::new(
                    ErrorClass::Unavailable,
                    format!("cannot reach {}: {}", self.endpoint, chain(&e)),
                ));
            }
            Ok(Ok(answered)) => answered,
        };
        let Some(class) = answer::class_of(status.as_u16()) else {
            return Outcome::Delivered;
        };
        let mut message = format!("HTTP {} from {}", status, self.endpoint);
        if class != ErrorClass::Permanent
            && class != ErrorClass::Fatal
            && let Some(wait) = retry_after
                .as_deref()
                .and_then(|v| answer::retry_after(v, SystemTime::now()))
        {
            let wait = wait.min(self.max_wait);
            self.close_gate(wait);
            message.push_str(&format!(" (Retry-After: waiting {wait:?})"));
        }
        let quoted = answer::body_start(&body);
        if !quoted.is_empty() {
            message.push_str(": ");
            message.push_str(&quoted);
        }
        match class {
            ErrorClass::Permanent => Outcome::Refused(message),
            ErrorClass::Fatal => Outcome::Failed(SinkError::new(
                class,
                format!("{message} — check {}.url, method and headers", self.at),
            )),
            _ => Outcome::Failed(SinkError::new(class, message)),
        }
    }

    /// Waits until the instant the last `Retry-After` named, if it is still ahead.
    async fn wait_turn(&self) {
        let until = *self
            .not_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(until) = until
            && until > tokio::time::Instant::now()
        {
            tokio::time::sleep_until(until).await;
        }
    }

    /// Holds every request back for `wait` from now (a later gate already set stays).
    fn close_gate(&self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut gate = self
            .not_before
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *gate = Some(gate.map_or(until, |set| set.max(until)));
    }
}

fn position(item: &WriteInput<'_>) -> Position {
    let r = item.record;
    (r.topic.clone(), r.partition, r.offset)
}

/// An error and its sources, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// One client (a connection pool) per sink: HTTP/1.1, TLS by rustls against the system's
/// trusted roots for https:// (SSL_CERT_FILE names other ones).
fn client(https: bool, timeout: Duration) -> Result<HttpClient, String> {
    // rustls needs a process-wide crypto provider; an already installed one is kept.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = if https {
        builder
            .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("cannot load the system's trusted certificates: {e}"))?
    } else {
        // Never used for http://, but the connector wants a TLS configuration.
        builder.with_tls_config(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    let connector = builder.https_or_http().enable_http1().wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
