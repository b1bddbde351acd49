//! The admin requests librdkafka does not offer to Rust — IncrementalAlterConfigs, a
//! topic's id from Metadata, and a `read_committed` Fetch whose record batches are counted
//! (not delivered) for the lag reader — spoken over Kafka's wire protocol (the
//! `kafka-protocol` crate's messages) on a connection of its own, made from the same
//! librdkafka properties [`client_config`](super::client_config) gives every other
//! client: plaintext or TLS (a CA, or the system's roots; mutual TLS with a client
//! certificate and key), SASL PLAIN or SCRAM-SHA-256/512. The connection lasts one call
//! (a count connects to each partition leader in turn); the operator alters configs
//! only when a topic changes, and counts records only on partitions with a small lag.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, BytesMut};
use hmac::{KeyInit as _, Mac as _};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, IncrementalAlterConfigsRequest,
    IncrementalAlterConfigsResponse, MetadataRequest, MetadataResponse, RequestHeader,
    ResponseHeader, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rdkafka::ClientConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Versions spoken: supported by every Kafka since 2.x (IncrementalAlterConfigs 1 since
/// 2.4, Metadata 12 — topic ids by name — since 3.1) up to 4.x.
const METADATA_VERSION: i16 = 12;
const ALTER_VERSION: i16 = 1;
/// Fetch 12 is the last that names topics (13 and later take topic ids); Kafka 2.7 to 4.x
/// speak it.
const FETCH_VERSION: i16 = 12;
/// `read_committed`: up to the last stable offset, with the aborted transactions listed.
const READ_COMMITTED: i8 = 1;
/// The most one Fetch answer may carry (the connection refuses answers above 64 MiB).
const FETCH_MAX_BYTES: i32 = 16 << 20;
const SASL_HANDSHAKE_VERSION: i16 = 1;
const SASL_AUTHENTICATE_VERSION: i16 = 2;

/// A topic resource, in DescribeConfigs and IncrementalAlterConfigs.
const TOPIC_RESOURCE: i8 = 2;
const SET: i8 = 0;
const DELETE: i8 = 1;

/// A partition's log range `[from, until)` whose records a `read_committed` consumer
/// would receive are to be counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedRange {
    pub topic: String,
    pub partition: i32,
    pub from: i64,
    pub until: i64,
}

/// Why a wire request failed. Messages name the broker and the cause, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot reach any of {servers}: {detail}")]
    Unreachable { servers: String, detail: String },
    #[error("TLS handshake with {server} failed: {detail}")]
    Tls { server: String, detail: String },
    #[error("SASL authentication at {server} failed: {detail}")]
    Authentication { server: String, detail: String },
    #[error("the client settings cannot be used: {0}")]
    Settings(String),
    #[error("{operation}: Kafka answered {code}{}", message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Refused {
        operation: &'static str,
        code: i16,
        message: Option<String>,
    },
    #[error("{operation}: {detail}")]
    Protocol {
        operation: &'static str,
        detail: String,
    },
    #[error("{operation}: no answer within {timeout:?}")]
    Timeout {
        operation: &'static str,
        timeout: Duration,
    },
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One connection to one broker, authenticated.
struct Connection {
    stream: Box<dyn Stream>,
    client_id: StrBytes,
    correlation: i32,
}

/// The settings of [`client_config`](super::client_config) this module uses.
#[derive(Clone)]
struct Settings {
    servers: Vec<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    sasl: Option<Sasl>,
    client_id: String,
}

#[derive(Clone)]
struct Sasl {
    mechanism: String,
    username: String,
    password: String,
}

impl Settings {
    fn from_config(config: &ClientConfig) -> Result<Settings, WireError> {
        let get = |key: &str| config.get(key).map(str::to_owned);
        let servers: Vec<String> = get("bootstrap.servers")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(WireError::Settings("no bootstrap.servers".into()));
        }
        let protocol = get("security.protocol")
            .unwrap_or_else(|| "plaintext".into())
            .to_ascii_lowercase();
        let (tls, sasl) = match protocol.as_str() {
            "plaintext" => (false, false),
            "ssl" => (true, false),
            "sasl_plaintext" => (false, true),
            "sasl_ssl" => (true, true),
            other => {
                return Err(WireError::Settings(format!(
                    "security.protocol {other:?} is not one of plaintext, ssl, sasl_plaintext, sasl_ssl"
                )));
            }
        };
        let tls = if tls {
            Some(Arc::new(tls_config(config)?))
        } else {
            None
        };
        let sasl = if sasl {
            let mechanism = get("sasl.mechanism")
                .or_else(|| get("sasl.mechanisms"))
                .unwrap_or_else(|| "PLAIN".into())
                .to_ascii_uppercase();
            if !matches!(
                mechanism.as_str(),
                "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512"
            ) {
                return Err(WireError::Settings(format!(
                    "sasl.mechanism {mechanism:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                )));
            }
            Some(Sasl {
                mechanism,
                username: get("sasl.username").unwrap_or_default(),
                password: get("sasl.password").unwrap_or_default(),
            })
        } else {
            None
        };
        Ok(Settings {
            servers,
            tls,
            sasl,
            client_id: get("client.id").unwrap_or_else(|| "weir-admin".into()),
        })
    }
}

/// TLS as librdkafka's `ssl.*` properties describe it.
fn tls_config(config: &ClientConfig) -> Result<rustls::ClientConfig, WireError> {
    let settings = |detail: String| WireError::Settings(detail);
    let mut roots = rustls::RootCertStore::empty();
    match (config.get("ssl.ca.pem"), config.get("ssl.ca.location")) {
        (Some(pem), _) => {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| settings(format!("ssl.ca.pem: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| settings(format!("ssl.ca.pem: {e}")))?;
            }
        }
        (None, Some(path)) if path != "probe" => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| settings(format!("ssl.ca.location {path}: {e}")))?
            {
                let cert = cert.map_err(|e| settings(format!("ssl.ca.location {path}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| settings(format!("ssl.ca.location {path}: {e}")))?;
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| settings(e.to_string()))?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| settings(format!("the CA certificates: {e}")))?;
    let check_names = config
        .get("ssl.endpoint.identification.algorithm")
        .is_none_or(|v| !v.eq_ignore_ascii_case("none"));
    let builder = if check_names {
        builder.with_webpki_verifier(verifier)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName(verifier)))
    };
    match (config.get("ssl.certificate.pem"), config.get("ssl.key.pem")) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| settings(format!("ssl.certificate.pem: {e}")))?;
            // The key's own error could quote it: say only which property is wrong.
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                .map_err(|_| settings("ssl.key.pem is not a PEM private key".into()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| settings(format!("the client certificate and key: {e}")))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// Verifies the broker's certificate chain but not its name
/// (`ssl.endpoint.identification.algorithm=none`, as librdkafka does).
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The wire client: each call connects to the first bootstrap server that answers.
#[derive(Clone)]
pub struct Wire {
    settings: Settings,
    timeout: Duration,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("servers", &self.settings.servers)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Wire {
    /// A client for the brokers and security settings of `config` (librdkafka
    /// properties, as [`client_config`](super::client_config) makes them).
    pub fn new(config: &ClientConfig, timeout: Duration) -> Result<Wire, WireError> {
        Ok(Wire {
            settings: Settings::from_config(config)?,
            timeout,
        })
    }

    /// The id Kafka gave `topic` (as Kafka's tools print it: base64url without padding is
    /// theirs; this is the UUID), or `None` when there is no such topic.
    pub async fn topic_id(&self, topic: &str) -> Result<Option<uuid::Uuid>, WireError> {
        const OPERATION: &str = "reading the topic id";
        let request = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_owned())),
            ))]))
            .with_allow_auto_topic_creation(false);
        let response: MetadataResponse = self
            .call(OPERATION, ApiKey::Metadata, METADATA_VERSION, &request)
            .await?;
        let Some(found) = response.topics.first() else {
            return Ok(None);
        };
        match found.error_code {
            0 => Ok(Some(found.topic_id).filter(|id| !id.is_nil())),
            // UNKNOWN_TOPIC_OR_PARTITION
            3 => Ok(None),
            code => Err(WireError::Refused {
                operation: OPERATION,
                code,
                message: None,
            }),
        }
    }

    /// Sets `set` and removes `delete` (back to the broker's default) on `topic`'s
    /// configs, leaving every other config as it is at that moment: Kafka applies the
    /// change to the config set it holds, so a concurrent change to another key is kept.
    pub async fn alter_topic_configs(
        &self,
        topic: &str,
        set: &BTreeMap<String, String>,
        delete: &[String],
    ) -> Result<(), WireError> {
        const OPERATION: &str = "altering the topic's configs";
        let configs = set
            .iter()
            .map(|(k, v)| {
                AlterableConfig::default()
                    .with_name(StrBytes::from_string(k.clone()))
                    .with_config_operation(SET)
                    .with_value(Some(StrBytes::from_string(v.clone())))
            })
            .chain(delete.iter().map(|k| {
                AlterableConfig::default()
                    .with_name(StrBytes::from_string(k.clone()))
                    .with_config_operation(DELETE)
            }))
            .collect();
        let request = IncrementalAlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(TOPIC_RESOURCE)
                .with_resource_name(StrBytes::from_string(topic.to_owned()))
                .with_configs(configs),
        ]);
        let response: IncrementalAlterConfigsResponse = self
            .call(
                OPERATION,
                ApiKey::IncrementalAlterConfigs,
                ALTER_VERSION,
                &request,
            )
            .await?;
        for resource in response.responses {
            if resource.error_code != 0 {
                return Err(WireError::Refused {
                    operation: OPERATION,
                    code: resource.error_code,
                    message: resource.error_message.map(|m| m.to_string()),
                });
            }
        }
        Ok(())
    }

    /// For each range, the records a `read_committed` consumer positioned at `from` would
    /// receive before `until` (data records; no transaction markers, no records of aborted
    /// transactions), read with one Fetch per partition leader of at most
    /// `partition_bytes` per partition. A partition is left out of the answer when its
    /// leader cannot be reached or refuses (the caller counts offsets for it instead); the
    /// count may stop short of `until` ([`Counted::reached`](super::records::Counted)).
    pub async fn count_committed(
        &self,
        ranges: &[CommittedRange],
        partition_bytes: i32,
    ) -> Result<BTreeMap<(String, i32), super::records::Counted>, WireError> {
        const OPERATION: &str = "counting the records a read_committed consumer receives";
        if ranges.is_empty() {
            return Ok(BTreeMap::new());
        }
        let work = async {
            let mut topics: Vec<&str> = ranges.iter().map(|r| r.topic.as_str()).collect();
            topics.sort_unstable();
            topics.dedup();
            let request = MetadataRequest::default()
                .with_topics(Some(
                    topics
                        .iter()
                        .map(|t| {
                            MetadataRequestTopic::default()
                                .with_name(Some(TopicName(StrBytes::from_string((*t).to_owned()))))
                        })
                        .collect(),
                ))
                .with_allow_auto_topic_creation(false);
            let metadata: MetadataResponse = self
                .connect()
                .await?
                .request(OPERATION, ApiKey::Metadata, METADATA_VERSION, &request)
                .await?;
            let brokers: BTreeMap<i32, String> = metadata
                .brokers
                .iter()
                .map(|b| {
                    let host = b.host.as_str();
                    let address = if host.contains(':') {
                        format!("[{host}]:{}", b.port)
                    } else {
                        format!("{host}:{}", b.port)
                    };
                    (b.node_id.0, address)
                })
                .collect();
            let mut leaders: BTreeMap<(String, i32), i32> = BTreeMap::new();
            for topic in &metadata.topics {
                let Some(name) = topic.name.as_ref().filter(|_| topic.error_code == 0) else {
                    continue;
                };
                for p in topic.partitions.iter().filter(|p| p.error_code == 0) {
                    leaders.insert((name.0.to_string(), p.partition_index), p.leader_id.0);
                }
            }
            let mut by_leader: BTreeMap<i32, Vec<&CommittedRange>> = BTreeMap::new();
            for range in ranges {
                if let Some(leader) = leaders.get(&(range.topic.clone(), range.partition)) {
                    by_leader.entry(*leader).or_default().push(range);
                }
            }
            let partition_bytes = partition_bytes.clamp(1, FETCH_MAX_BYTES);
            let per_request = usize::try_from(FETCH_MAX_BYTES / partition_bytes)
                .unwrap_or(1)
                .max(1);
            let mut counted = BTreeMap::new();
            for (leader, ranges) in by_leader {
                let Some(address) = brokers.get(&leader) else {
                    continue;
                };
                let Ok(mut connection) = self.connect_to(address).await? else {
                    continue;
                };
                for chunk in ranges.chunks(per_request) {
                    let answer = connection
                        .request(
                            OPERATION,
                            ApiKey::Fetch,
                            FETCH_VERSION,
                            &fetch_request(chunk, partition_bytes),
                        )
                        .await?;
                    counted.extend(count_answer(chunk, &answer));
                }
            }
            Ok(counted)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| WireError::Timeout {
                operation: OPERATION,
                timeout: self.timeout,
            })?
    }

    async fn call<Req: Encodable, Resp: Decodable>(
        &self,
        operation: &'static str,
        key: ApiKey,
        version: i16,
        request: &Req,
    ) -> Result<Resp, WireError> {
        let work = async {
            let mut connection = self.connect().await?;
            connection.request(operation, key, version, request).await
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| WireError::Timeout {
                operation,
                timeout: self.timeout,
            })?
    }

    async fn connect(&self) -> Result<Connection, WireError> {
        let mut last = String::new();
        for server in &self.settings.servers {
            match self.connect_to(server).await? {
                Ok(connection) => return Ok(connection),
                Err(unreachable) => last = unreachable,
            }
        }
        Err(WireError::Unreachable {
            servers: self.settings.servers.join(","),
            detail: last,
        })
    }

    /// A connection to `server` (host:port), authenticated; the inner error says why the
    /// server could not be reached (the caller may try another).
    async fn connect_to(&self, server: &str) -> Result<Result<Connection, String>, WireError> {
        let tcp = match TcpStream::connect(server).await {
            Ok(tcp) => tcp,
            Err(e) => return Ok(Err(format!("{server}: {e}"))),
        };
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Stream> = match &self.settings.tls {
            None => Box::new(tcp),
            Some(tls) => {
                let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
                let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                    .map_err(|e| WireError::Settings(format!("{server}: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                match connector.connect(name, tcp).await {
                    Ok(stream) => Box::new(stream),
                    Err(e) => {
                        return Err(WireError::Tls {
                            server: server.to_owned(),
                            detail: e.to_string(),
                        });
                    }
                }
            }
        };
        let mut connection = Connection {
            stream,
            client_id: StrBytes::from_string(self.settings.client_id.clone()),
            correlation: 0,
        };
        if let Some(sasl) = &self.settings.sasl {
            connection.authenticate(server, sasl).await?;
        }
        Ok(Ok(connection))
    }
}

/// A sessionless `read_committed` Fetch of `ranges` that answers at once with what is there.
fn fetch_request(ranges: &[&CommittedRange], partition_bytes: i32) -> FetchRequest {
    let mut topics: BTreeMap<&str, Vec<FetchPartition>> = BTreeMap::new();
    for range in ranges {
        topics.entry(&range.topic).or_default().push(
            FetchPartition::default()
                .with_partition(range.partition)
                .with_fetch_offset(range.from)
                .with_partition_max_bytes(partition_bytes),
        );
    }
    FetchRequest::default()
        .with_max_wait_ms(0)
        .with_min_bytes(0)
        .with_max_bytes(FETCH_MAX_BYTES)
        .with_isolation_level(READ_COMMITTED)
        .with_topics(
            topics
                .into_iter()
                .map(|(topic, partitions)| {
                    FetchTopic::default()
                        .with_topic(TopicName(StrBytes::from_string(topic.to_owned())))
                        .with_partitions(partitions)
                })
                .collect(),
        )
}

/// The counts of a Fetch answer's partitions that answered without an error.
fn count_answer(
    ranges: &[&CommittedRange],
    answer: &FetchResponse,
) -> Vec<((String, i32), super::records::Counted)> {
    let mut out = Vec::new();
    if answer.error_code != 0 {
        return out;
    }
    for topic in &answer.responses {
        for partition in topic.partitions.iter().filter(|p| p.error_code == 0) {
            let Some(range) = ranges.iter().find(|r| {
                r.topic == topic.topic.0.as_str() && r.partition == partition.partition_index
            }) else {
                continue;
            };
            let aborted: Vec<super::records::Aborted> = partition
                .aborted_transactions
                .iter()
                .flatten()
                .map(|a| super::records::Aborted {
                    producer_id: a.producer_id.0,
                    first_offset: a.first_offset,
                })
                .collect();
            let bytes = partition.records.as_deref().unwrap_or_default();
            if let Some(counted) = super::records::count(bytes, &aborted, range.from, range.until) {
                out.push(((range.topic.clone(), range.partition), counted));
            }
        }
    }
    out
}

impl Connection {
    async fn request<Req: Encodable, Resp: Decodable>(
        &mut self,
        operation: &'static str,
        key: ApiKey,
        version: i16,
        request: &Req,
    ) -> Result<Resp, WireError> {
        let failed = |detail: String| WireError::Protocol { operation, detail };
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(self.client_id.clone()));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, key.request_header_version(version))
            .map_err(|e| failed(format!("encoding the request header: {e}")))?;
        request
            .encode(&mut body, version)
            .map_err(|e| failed(format!("encoding the request: {e}")))?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(i32::try_from(body.len()).map_err(|e| failed(e.to_string()))?);
        frame.extend_from_slice(&body);
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| failed(format!("sending: {e}")))?;
        self.stream
            .flush()
            .await
            .map_err(|e| failed(format!("sending: {e}")))?;
        let size = self
            .stream
            .read_i32()
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?;
        let size = usize::try_from(size).map_err(|_| failed(format!("answer size {size}")))?;
        if size > 64 << 20 {
            return Err(failed(format!("an answer of {size} bytes")));
        }
        let mut answer = vec![0; size];
        self.stream
            .read_exact(&mut answer)
            .await
            .map_err(|e| failed(format!("reading the answer: {e}")))?;
        let mut answer = bytes::Bytes::from(answer);
        let header = ResponseHeader::decode(&mut answer, key.response_header_version(version))
            .map_err(|e| failed(format!("decoding the answer's header: {e}")))?;
        if header.correlation_id != self.correlation {
            return Err(failed(format!(
                "answer {} to request {}",
                header.correlation_id, self.correlation
            )));
        }
        let response =
            Resp::decode(&mut answer, version).map_err(|e| failed(format!("decoding: {e}")))?;
        if answer.has_remaining() {
            return Err(failed(format!(
                "{} bytes after the answer",
                answer.remaining()
            )));
        }
        Ok(response)
    }

    /// SaslHandshake, then SaslAuthenticate rounds: PLAIN, or SCRAM (RFC 5802 / 7677).
    async fn authenticate(&mut self, server: &str, sasl: &Sasl) -> Result<(), WireError> {
        const OPERATION: &str = "authenticating";
        let refused = |detail: String| WireError::Authentication {
            server: server.to_owned(),
            detail,
        };
        let handshake: SaslHandshakeResponse = self
            .request(
                OPERATION,
                ApiKey::SaslHandshake,
                SASL_HANDSHAKE_VERSION,
                &SaslHandshakeRequest::default()
                    .with_mechanism(StrBytes::from_string(sasl.mechanism.clone())),
            )
            .await?;
        if handshake.error_code != 0 {
            let offered: Vec<String> = handshake.mechanisms.iter().map(|m| m.to_string()).collect();
            return Err(refused(format!(
                "the broker does not accept {} (it offers {})",
                sasl.mechanism,
                offered.join(", ")
            )));
        }
        match sasl.mechanism.as_str() {
            "PLAIN" => {
                let message = format!("\0{}\0{}", sasl.username, sasl.password);
                self.sasl_round(server, message.into_bytes()).await?;
                Ok(())
            }
            mechanism => {
                let scram = Scram::new(mechanism, &sasl.username);
                let server_first = self.sasl_round(server, scram.client_first()).await?;
                let (client_final, expected) = scram
                    .client_final(&server_first, &sasl.password)
                    .map_err(refused)?;
                let server_final = self.sasl_round(server, client_final).await?;
                let text = String::from_utf8_lossy(&server_final);
                match text.strip_prefix("v=") {
                    Some(signature) if signature == expected => Ok(()),
                    _ => Err(refused(
                        "the broker's SCRAM signature does not match: it does not know this password"
                            .into(),
                    )),
                }
            }
        }
    }

    async fn sasl_round(&mut self, server: &str, bytes: Vec<u8>) -> Result<Vec<u8>, WireError> {
        let response: SaslAuthenticateResponse = self
            .request(
                "authenticating",
                ApiKey::SaslAuthenticate,
                SASL_AUTHENTICATE_VERSION,
                &SaslAuthenticateRequest::default().with_auth_bytes(bytes.into()),
            )
            .await?;
        if response.error_code != 0 {
            return Err(WireError::Authentication {
                server: server.to_owned(),
                detail: response
                    .error_message
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| format!("error {}", response.error_code)),
            });
        }
        Ok(response.auth_bytes.to_vec())
    }
}

/// A SCRAM client exchange.
struct Scram {
    sha512: bool,
    first_bare: String,
    nonce: String,
}

impl Scram {
    fn new(mechanism: &str, username: &str) -> Scram {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        // RFC 5802: '=' and ',' in a user name are escaped.
        let user = username.replace('=', "=3D").replace(',', "=2C");
        Scram {
            sha512: mechanism == "SCRAM-SHA-512",
            first_bare: format!("n={user},r={nonce}"),
            nonce,
        }
    }

    fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.first_bare).into_bytes()
    }

    /// The client-final message and the server signature to expect.
    fn client_final(
        &self,
        server_first: &[u8],
        password: &str,
    ) -> Result<(Vec<u8>, String), String> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let text = std::str::from_utf8(server_first)
            .map_err(|_| "the broker's SCRAM message is not text".to_owned())?;
        let field = |name: &str| {
            text.split(',')
                .find_map(|f| f.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .ok_or_else(|| format!("the broker's SCRAM message has no {name}"))
        };
        let nonce = field("r")?;
        if !nonce.starts_with(&self.nonce) {
            return Err("the broker's SCRAM nonce does not extend the client's".into());
        }
        let salt = b64
            .decode(field("s")?)
            .map_err(|_| "the broker's SCRAM salt is not base64".to_owned())?;
        let iterations: u32 = field("i")?
            .parse()
            .map_err(|_| "the broker's SCRAM iteration count is not a number".to_owned())?;
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{},{text},{without_proof}", self.first_bare);
        let salted = self.hi(password.as_bytes(), &salt, iterations);
        let client_key = self.hmac(&salted, b"Client Key");
        let stored = self.hash(&client_key);
        let signature = self.hmac(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = self.hmac(&salted, b"Server Key");
        let server_signature = b64.encode(self.hmac(&server_key, auth.as_bytes()));
        Ok((
            format!("{without_proof},p={}", b64.encode(proof)).into_bytes(),
            server_signature,
        ))
    }

    fn hmac(&self, key: &[u8], data: &[u8]) -> Vec<u8> {
        if self.sha512 {
            let mut mac = <hmac::Hmac<sha2::Sha512>>::new_from_slice(key)
                .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        } else {
            let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(key)
                .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
    }

    fn hash(&self, data: &[u8]) -> Vec<u8> {
        use sha2::Digest as _;
        if self.sha512 {
            sha2::Sha512::digest(data).to_vec()
        } else {
            sha2::Sha256::digest(data).to_vec()
        }
    }

    /// PBKDF2 with HMAC, one block: SCRAM's Hi().
    fn hi(&self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut block = salt.to_vec();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = self.hmac(password, &block);
        let mut out = u.clone();
        for _ in 1..iterations {
            u = self.hmac(password, &u);
            for (o, x) in out.iter_mut().zip(&u) {
                *o ^= x;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's SCRAM-SHA-256 example exchange.
    #[test]
    fn scram_sha_256_matches_the_rfc_example() {
        let scram = Scram {
            sha512: false,
            first_bare: "n=user,r=rOprNGfwEbeRWgbNEkqO".into(),
            nonce: "rOprNGfwEbeRWgbNEkqO".into(),
        };
        let server_first =
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let (client_final, server_signature) = scram
            .client_final(server_first, "pencil")
            .expect("exchange");
        assert_eq!(
            String::from_utf8(client_final).expect("text"),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            server_signature,
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn a_nonce_the_broker_did_not_extend_is_refused() {
        let scram = Scram::new("SCRAM-SHA-512", "u");
        let refused = scram
            .client_final(b"r=other,s=c2FsdA==,i=4096", "p")
            .expect_err("refused");
        assert!(refused.contains("nonce"), "{refused}");
    }

    #[test]
    fn settings_come_from_the_librdkafka_properties() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "a:9092, b:9093")
            .set("security.protocol", "SASL_PLAINTEXT")
            .set("sasl.mechanism", "SCRAM-SHA-512")
            .set("sasl.username", "u")
            .set("sasl.password", "p");
        let settings = Settings::from_config(&config).expect("settings");
        assert_eq!(settings.servers, vec!["a:9092", "b:9093"]);
        assert!(settings.tls.is_none());
        assert_eq!(
            settings.sasl.map(|s| s.mechanism),
            Some("SCRAM-SHA-512".to_owned())
        );
        config.set("security.protocol", "kerberos");
        assert!(Settings::from_config(&config).is_err());
    }
}
