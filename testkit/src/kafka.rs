//! A real Apache Kafka broker (one KRaft node in combined broker+controller mode) with a
//! PLAINTEXT listener and secured ones ([`security`]: SASL_SSL with SCRAM-SHA-512, SSL
//! with required client certificates, SASL_PLAINTEXT with PLAIN), and librdkafka's mock
//! cluster for faults a real broker cannot produce on demand.

pub mod security;

pub use security::KafkaSecurity;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer};

use crate::process::{NotReady, Supervised, run, which};
use crate::{HarnessError, KAFKA_VERSION, Result, env, free_port, tools_dir, unique_name};

const PART: &str = "kafka";

/// A running broker. Dropping it stops the broker and deletes its data.
#[derive(Debug)]
pub struct KafkaServer {
    bootstrap: String,
    /// The secured listeners; `None` for a broker shared through the environment
    /// without them.
    security: Option<KafkaSecurity>,
    /// The data directory of a broker this process started.
    dir: Option<PathBuf>,
    process: Option<Supervised>,
}

impl KafkaServer {
    /// The broker every test of this run shares: the one named by
    /// `$WEIR_TEST_KAFKA_BOOTSTRAP`, else one started by (and dying with) this process.
    pub fn shared() -> Result<&'static KafkaServer> {
        static SHARED: OnceLock<std::result::Result<KafkaServer, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| match std::env::var(env::KAFKA_BOOTSTRAP) {
                Ok(bootstrap) if !bootstrap.is_empty() => {
                    let security = match std::env::var_os(env::KAFKA_SECURITY) {
                        Some(path) => {
                            Some(KafkaSecurity::load(Path::new(&path)).map_err(|e| e.to_string())?)
                        }
                        None => None,
                    };
                    Ok(KafkaServer {
                        bootstrap,
                        security,
                        dir: None,
                        process: None,
                    })
                }
                _ => KafkaServer::start().map_err(|e| e.to_string()),
            })
            .as_ref()
            .map_err(|detail| HarnessError::Start {
                part: PART,
                detail: detail.clone(),
            })
    }

    /// Starts a new broker on free loopback ports in a temporary directory.
    pub fn start() -> Result<KafkaServer> {
        let libs = kafka_libs()?;
        let java = java()?;
        let dir = tempfile::Builder::new()
            .prefix("weir-kafka-")
            .tempdir()
            .map_err(|source| HarnessError::io(PART, "creating the data directory", source))?
            .keep();
        let port = free_port(PART)?;
        let controller_port = free_port(PART)?;
        let ports = security::Ports {
            sasl_ssl: free_port(PART)?,
            ssl: free_port(PART)?,
            sasl_plaintext: free_port(PART)?,
        };
        let (security, broker_keys) = security::generate(ports)?;
        let mut text = server_properties(&dir, port, controller_port, ports);
        text.push_str(&security.broker_properties(&dir, &broker_keys)?);
        security.save(&security::file_in(&dir))?;
        let properties = dir.join("server.properties");
        std::fs::write(&properties, text)
            .map_err(|source| HarnessError::io(PART, "writing server.properties", source))?;
        let classpath = format!("{}/*", libs.display());
        let log4j = log4j_config(&dir)?;
        run(
            PART,
            Command::new(&java)
                .args(jvm_flags(&dir, &log4j))
                .args(["-cp", &classpath, "kafka.tools.StorageTool", "format"])
                .args(["-t", &cluster_id()])
                .args(["--add-scram", &security.add_scram()])
                .arg("-c")
                .arg(&properties),
        )?;
        let mut args = jvm_flags(&dir, &log4j);
        args.extend(["-Xmx512m".to_owned(), "-cp".to_owned(), classpath]);
        args.push("kafka.Kafka".to_owned());
        args.push(properties.display().to_string());
        let mut process = Supervised::spawn(
            PART,
            "KILL",
            Some(&dir),
            &dir.join("stdout.log"),
            &java,
            &args,
        )?;
        let bootstrap = format!("127.0.0.1:{port}");
        let ready = process.wait_ready("broker metadata", Duration::from_secs(90), || {
            metadata_answers(&bootstrap)
        });
        match ready {
            Ok(()) => Ok(KafkaServer {
                bootstrap,
                security: Some(security),
                dir: Some(dir),
                process: Some(process),
            }),
            Err(NotReady::Exited) => Err(process.start_error("the broker exited")),
            Err(NotReady::TimedOut) => {
                let detail = format!(
                    "no metadata answer on {bootstrap} within 90 s; server.log:\n{}",
                    crate::process::log_tail(&dir.join("server.log"))
                );
                Err(HarnessError::Start { part: PART, detail })
            }
        }
    }

    /// host:port of the PLAINTEXT listener.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The secured listeners and their credentials.
    pub fn security(&self) -> Option<&KafkaSecurity> {
        self.security.as_ref()
    }

    /// Where the secured listeners' description is saved (for `$WEIR_TEST_KAFKA_SECURITY`):
    /// beside the broker's data, deleted with it.
    pub fn security_file(&self) -> Option<PathBuf> {
        self.dir.as_deref().map(security::file_in)
    }

    /// Whether this handle owns the broker process (false when shared from the environment).
    pub fn is_owned(&self) -> bool {
        self.process.is_some()
    }
}

/// One test's view of the shared broker: client builders and topics with unique names.
#[derive(Clone, Debug)]
pub struct TestKafka {
    bootstrap: String,
    security: Option<KafkaSecurity>,
}

impl TestKafka {
    /// The shared broker (started on first use).
    pub fn shared() -> Result<TestKafka> {
        let server = KafkaServer::shared()?;
        Ok(TestKafka {
            bootstrap: server.bootstrap().to_owned(),
            security: server.security().cloned(),
        })
    }

    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// A view of the broker at `bootstrap` (e.g. one a benchmark started itself).
    pub fn at(bootstrap: &str) -> TestKafka {
        TestKafka {
            bootstrap: bootstrap.to_owned(),
            security: None,
        }
    }

    /// The secured listeners of the shared broker and their credentials.
    pub fn security(&self) -> Result<&KafkaSecurity> {
        self.security.as_ref().ok_or_else(|| HarnessError::Missing {
            part: PART,
            hint: format!(
                "the shared broker has no secured listeners: {} is not set (restart weir-test-services)",
                env::KAFKA_SECURITY
            ),
        })
    }

    /// A client config pointing at the broker.
    pub fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        config
    }

    pub fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        Ok(self.config().create()?)
    }

    /// An idempotent producer that waits for all in-sync replicas.
    pub fn producer(&self) -> Result<FutureProducer> {
        Ok(self
            .config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()?)
    }

    /// A consumer in `group` reading from the earliest offset, committing only when told to.
    pub fn consumer(&self, group: &str) -> Result<StreamConsumer> {
        Ok(self
            .config()
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .create()?)
    }

    /// Creates a topic named `<prefix>-<unique>` and waits until the broker reports it.
    pub async fn create_topic(
        &self,
        prefix: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<String> {
        let name = unique_name(prefix);
        let mut topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
        for (key, value) in configs {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self.admin()?.create_topics([&topic], &options).await?;
        for result in results {
            result.map_err(|(topic, code)| HarnessError::Start {
                part: PART,
                detail: format!("creating topic {topic}: {code}"),
            })?;
        }
        let bootstrap = self.bootstrap.clone();
        let wanted = name.clone();
        tokio::task::spawn_blocking(move || {
            crate::wait_until(PART, "topic metadata", Duration::from_secs(30), || {
                topic_partitions(&bootstrap, &wanted)
                    .filter(|n| *n == partitions as usize)
                    .map(|_| ())
            })
        })
        .await
        .map_err(|e| HarnessError::Start {
            part: PART,
            detail: e.to_string(),
        })??;
        Ok(name)
    }

    /// The offsets `group` has committed on each partition of `topic` (OffsetFetch through
    /// the group coordinator); partitions without a commit are absent.
    pub fn committed_offsets(&self, group: &str, topic: &str) -> Result<HashMap<i32, i64>> {
        let consumer: BaseConsumer = self.config().set("group.id", group).create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut list = rdkafka::TopicPartitionList::new();
        for t in metadata.topics() {
            for p in t.partitions() {
                list.add_partition(topic, p.id());
            }
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10))?;
        let offsets = committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect();
        Ok(offsets)
    }

    /// Runs one of Kafka's own command-line tools (a client not written here), e.g.
    /// `org.apache.kafka.tools.consumer.group.ConsumerGroupCommand`, against this broker;
    /// returns its standard output.
    pub fn kafka_tool(&self, class: &str, args: &[&str]) -> Result<String> {
        let libs = kafka_libs()?;
        let output = Command::new(java()?)
            .args(["-Xshare:auto", "-XX:TieredStopAtLevel=1", "-Xmx256m"])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                quiet_log4j()?.display()
            ))
            .arg("-cp")
            .arg(format!("{}/*", libs.display()))
            .arg(class)
            .args(["--bootstrap-server", &self.bootstrap])
            .args(args)
            .output()
            .map_err(|source| HarnessError::io(PART, "running a Kafka tool", source))?;
        if !output.status.success() {
            return Err(HarnessError::Start {
                part: PART,
                detail: format!(
                    "{class} {args:?} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// An in-process librdkafka mock cluster with `brokers` brokers, for injecting faults a
/// real broker cannot produce on demand (broker down/up, request errors, latency). Tests
/// using it say so. It has no admin API and does not enforce transactions.
pub fn mock_cluster(brokers: i32) -> Result<MockCluster<'static, DefaultProducerContext>> {
    Ok(MockCluster::new(brokers)?)
}

fn metadata_answers(bootstrap: &str) -> bool {
    let consumer: std::result::Result<BaseConsumer, _> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create();
    consumer
        .map(|c| c.fetch_metadata(None, Duration::from_secs(2)).is_ok())
        .unwrap_or(false)
}

fn topic_partitions(bootstrap: &str, topic: &str) -> Option<usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .ok()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()?;
    let topic = metadata.topics().first()?;
    if topic.error().is_some() {
        return None;
    }
    let partitions = topic.partitions();
    let all_led = partitions.iter().all(|p| p.leader() >= 0);
    (all_led && !partitions.is_empty()).then_some(partitions.len())
}

fn server_properties(
    dir: &Path,
    port: u16,
    controller_port: u16,
    secured: security::Ports,
) -> String {
    let security::Ports {
        sasl_ssl,
        ssl,
        sasl_plaintext,
    } = secured;
    let advertised = format!(
        "PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sasl_ssl},SSL://127.0.0.1:{ssl},SASL_PLAINTEXT://127.0.0.1:{sasl_plaintext}"
    );
    format!(
        "process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners={advertised},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners={advertised}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT
log.dirs={logs}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.flush.interval.messages=9223372036854775807
",
        logs = dir.join("kafka-logs").display()
    )
}

fn jvm_flags(dir: &Path, log4j: &Path) -> Vec<String> {
    vec![
        "-Xshare:auto".to_owned(),
        "-XX:+UseSerialGC".to_owned(),
        "-XX:TieredStopAtLevel=1".to_owned(),
        "-Djava.awt.headless=true".to_owned(),
        format!("-Dkafka.logs.dir={}", dir.display()),
        format!("-Dlog4j2.configurationFile={}", log4j.display()),
    ]
}

fn log4j_config(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("log4j2.properties");
    std::fs::write(&path, include_str!("../kafka/log4j2.properties"))
        .map_err(|source| HarnessError::io(PART, "writing log4j2.properties", source))?;
    Ok(path)
}

/// A log4j2 config that prints only errors, for Kafka's command-line tools.
fn quiet_log4j() -> Result<PathBuf> {
    let path = std::env::temp_dir().join("weir-kafka-tools-log4j2.properties");
    std::fs::write(
        &path,
        "status = error\nappender.err.type = Console\nappender.err.name = err\nappender.err.target = SYSTEM_ERR\nappender.err.layout.type = PatternLayout\nappender.err.layout.pattern = %p %m%n\nrootLogger.level = ERROR\nrootLogger.appenderRef.err.ref = err\n",
    )
    .map_err(|source| HarnessError::io(PART, "writing the tools' log4j2 config", source))?;
    Ok(path)
}

/// The installed broker jars.
pub fn kafka_libs() -> Result<PathBuf> {
    let libs = tools_dir().join(format!("kafka-{KAFKA_VERSION}/libs"));
    if libs.join(".complete").is_file() {
        Ok(libs)
    } else {
        Err(HarnessError::Missing {
            part: PART,
            hint: format!(
                "no Kafka {KAFKA_VERSION} jars in {}: run scripts/install-test-deps.sh",
                libs.display()
            ),
        })
    }
}

fn java() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let candidate = PathBuf::from(home).join("bin/java");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    which("java").ok_or_else(|| HarnessError::Missing {
        part: PART,
        hint: "no `java` on PATH: install a JDK 17 or newer".into(),
    })
}

/// A Kafka cluster id: 16 random bytes in unpadded URL-safe base64 (22 characters), never
/// starting with `-` (command-line parsers would read it as an option; Kafka's own
/// generator avoids it for the same reason).
fn cluster_id() -> String {
    loop {
        let id = encode_cluster_id();
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn encode_cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = String::with_capacity(22);
    for byte in bytes {
        bits = (bits << 8) | u32::from(byte);
        count += 8;
        while count >= 6 {
            count -= 6;
            out.push(char::from(ALPHABET[((bits >> count) & 63) as usize]));
        }
    }
    if count > 0 {
        out.push(char::from(ALPHABET[((bits << (6 - count)) & 63) as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_ids_are_22_url_safe_characters() {
        for _ in 0..1000 {
            let id = super::cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
        }
        let id = super::cluster_id();
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }
}
