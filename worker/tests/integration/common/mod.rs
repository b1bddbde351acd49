//! Running the real `weir-worker` binary as a process against the harness's real Kafka
//! broker and PostgreSQL, as it runs in a pod.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use weir_testkit::{TestKafka, free_port, unique_name};

pub const DEADLINE: Duration = Duration::from_secs(90);

/// The run's shared broker (started on first use), from async tests.
pub async fn kafka() -> anyhow::Result<TestKafka> {
    Ok(tokio::task::spawn_blocking(TestKafka::shared).await??)
}

/// Events `{"id": n}` for each `n` of `range`, keyed `n % 97` (97 keys, so per-key order
/// is checked across many keys).
pub fn events(range: std::ops::Range<i64>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|id| {
            (
                (id % 97).to_string(),
                format!("{{\"id\": {id}}}").into_bytes(),
            )
        })
        .collect()
}

/// A worker process. Killed when dropped.
pub struct Worker {
    child: Child,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Worker {
    /// Starts `weir-worker run` on `pipeline` (an EventPipeline document as JSON).
    pub fn start(
        dir: &Path,
        kafka: &TestKafka,
        pipeline: &Value,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Worker> {
        start_with_args(dir, kafka, pipeline, env, &[])
    }

    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -s {signal} failed");
        Ok(())
    }

    /// Waits for the process to exit, failing after `deadline`.
    pub fn wait(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                start.elapsed() < deadline,
                "worker still running after {deadline:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then asserts a clean exit (code 0) within the deadline. The signal waits
    /// until the worker serves /healthz, which it starts after its signal handlers: a
    /// SIGTERM in the first milliseconds of the process meets the default action instead.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.is_running() && http_get(self.metrics_port, "/healthz").is_none() {
            anyhow::ensure!(
                start.elapsed() < DEADLINE,
                "worker never served /healthz; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal("TERM")?;
        let status = self.wait(DEADLINE)?;
        anyhow::ensure!(
            status.code() == Some(0),
            "worker exited with {status} after SIGTERM; log:\n{}",
            self.log_text()
        );
        Ok(())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of a counter on /metrics, if the server answers.
    pub fn metric(&self, name: &str) -> Option<u64> {
        let text = http_get(self.metrics_port, "/metrics")?;
        text.lines()
            .find(|line| line.starts_with(name) && line[name.len()..].starts_with('{'))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The value of one sample on /metrics: `name` with exactly these labels, e.g.
    /// `weir_batch_records_bucket` and `pipeline="x",le="1000"`.
    pub fn sample(&self, name: &str, labels: &str) -> Option<f64> {
        let text = http_get(self.metrics_port, "/metrics")?;
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The status code of /readyz.
    pub fn readyz(&self) -> Option<u16> {
        let text = http_get(self.metrics_port, "/readyz")?;
        text.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `deadline` with `what`.
pub fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        anyhow::ensure!(
            start.elapsed() < deadline,
            "{what} not reached within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wakes (SIGCONT) a worker stopped with a batch read but not written after the group gave
/// its partitions to another member, and waits until it has settled. Either its commit
/// reaches the broker or database first and is refused as fenced: it says so and exits 0
/// (returns `true`); or librdkafka first reports the session it lost: the batch of the
/// revoked partitions is dropped unwritten and the worker rejoins as an ordinary member,
/// which is then stopped (returns `false`). Which comes first depends on the machine's
/// load, not on the worker; in both, the caller checks that nothing was written twice.
pub fn wake_zombie(zombie: &mut Worker) -> anyhow::Result<bool> {
    zombie.signal("CONT")?;
    let fenced = wait_until(
        "the zombie to be fenced or to drop its batch",
        DEADLINE,
        || {
            if !zombie.is_running() {
                return Ok(Some(true));
            }
            Ok(zombie
                .log_text()
                .contains("revoked partitions left to their new owner")
                .then_some(false))
        },
    )
    .with_context(|| zombie.log_text())?;
    if fenced {
        let status = zombie.wait(DEADLINE)?;
        let log = zombie.log_text();
        anyhow::ensure!(
            log.contains("fenced"),
            "exited without saying fenced: {log}"
        );
        anyhow::ensure!(
            status.code() == Some(0),
            "a fenced worker exits cleanly, not with {status}: {log}"
        );
    } else {
        zombie.stop()?;
    }
    Ok(fenced)
}

/// Produces `(key, value)` records in order and waits for every acknowledgement.
pub async fn produce(
    kafka: &TestKafka,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka.producer()?;
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in records {
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(key).payload(value))
                .map_err(|(e, _)| e)?,
        );
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The sum of the group's committed offsets on `topic`.
pub fn committed_total(kafka: &TestKafka, group: &str, topic: &str) -> anyhow::Result<i64> {
    Ok(kafka.committed_offsets(group, topic)?.values().sum())
}

/// Waits until the group has committed `total` offsets on `topic` (every record handled).
pub fn wait_committed(
    kafka: &TestKafka,
    group: &str,
    topic: &str,
    total: i64,
    worker: Option<&Worker>,
) -> anyhow::Result<()> {
    let mut last = String::new();
    wait_until(
        &format!("{total} committed offsets on {topic}"),
        DEADLINE,
        || {
            // The group coordinator may still be loading (NotCoordinator): ask again.
            match committed_total(kafka, group, topic) {
                Ok(committed) => {
                    last = format!("{committed} committed");
                    Ok((committed >= total).then_some(()))
                }
                Err(e) => {
                    last = e.to_string();
                    Ok(None)
                }
            }
        },
    )
    .with_context(|| {
        format!(
            "last: {last}\n{}",
            worker.map(Worker::log_text).unwrap_or_default()
        )
    })
}

/// A record read back: its value and headers.
pub type ReadRecord = (Option<Vec<u8>>, HashMap<String, String>);

/// Every record of `topic` (all partitions, from the start) with its headers, until
/// `count` have been read.
pub fn read_topic(kafka: &TestKafka, topic: &str, count: usize) -> anyhow::Result<Vec<ReadRecord>> {
    read_with(kafka, topic, count, |message| {
        let mut headers = HashMap::new();
        if let Some(h) = message.headers() {
            use rdkafka::message::Headers;
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        (message.payload().map(<[u8]>::to_vec), headers)
    })
}

/// Every record of `topic` (all partitions, from the start) as its key and its value
/// parsed as JSON (null when it is not JSON), until `count` have been read.
pub fn read_keyed(
    kafka: &TestKafka,
    topic: &str,
    count: usize,
) -> anyhow::Result<Vec<(Option<String>, Value)>> {
    read_with(kafka, topic, count, |message| {
        (
            message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            message
                .payload()
                .and_then(|p| serde_json::from_slice(p).ok())
                .unwrap_or(Value::Null),
        )
    })
}

fn read_with<T>(
    kafka: &TestKafka,
    topic: &str,
    count: usize,
    convert: impl Fn(&rdkafka::message::BorrowedMessage<'_>) -> T,
) -> anyhow::Result<Vec<T>> {
    let consumer: BaseConsumer = kafka
        .config()
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < count {
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "read {} of {count} records from {topic}",
            out.len()
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            out.push(convert(&message?));
        }
    }
    consumer.unsubscribe();
    Ok(out)
}

/// A pipeline document as JSON.
pub fn pipeline(name: &str, spec: Value) -> Value {
    serde_json::json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "EventPipeline",
        "metadata": {"name": name, "namespace": "test"},
        "spec": spec,
    })
}

/// Extra command-line arguments for a worker.
pub fn start_with_args(
    dir: &Path,
    kafka: &TestKafka,
    pipeline: &Value,
    env: &[(&str, &str)],
    args: &[&str],
) -> anyhow::Result<Worker> {
    start_documents(dir, kafka, &[pipeline], env, args)
}

/// Starts a worker on a file of several documents (the pipeline and, e.g., its
/// KafkaConnection).
pub fn start_documents(
    dir: &Path,
    kafka: &TestKafka,
    documents: &[&Value],
    env: &[(&str, &str)],
    args: &[&str],
) -> anyhow::Result<Worker> {
    let file = dir.join(format!("{}.yaml", unique_name("pipeline")));
    let mut text = String::new();
    for document in documents {
        text.push_str("---\n");
        text.push_str(&serde_yaml_ng::to_string(document)?);
    }
    std::fs::write(&file, text)?;
    let metrics_port = free_port("worker")?;
    let log = dir.join(format!("{}.log", unique_name("worker")));
    let out = std::fs::File::create(&log)?;
    let child = Command::new(env!("CARGO_BIN_EXE_weir-worker"))
        .args(["run", "-f"])
        .arg(&file)
        .args(["--bootstrap-servers", kafka.bootstrap()])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
        .args(["--log-format", "text"])
        .args(args)
        .env("RUST_LOG", "info,weir_worker=debug")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    Ok(Worker {
        child,
        metrics_port,
        log,
    })
}

/// [`wait_committed`] from async code.
pub async fn wait_committed_async(
    kafka: &TestKafka,
    group: &str,
    topic: &str,
    total: i64,
) -> anyhow::Result<()> {
    let (kafka, group, topic) = (kafka.clone(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || wait_committed(&kafka, &group, &topic, total, None)).await?
}
