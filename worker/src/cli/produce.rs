//! `weir-worker produce`: loads events from a JSON Lines or CSV file into a topic.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use weir_worker::input::{BadLine, EventReader, InputError, InputFormat};

/// Deliveries awaited at most at once; the producer's own queue bounds memory too.
const MAX_PENDING: usize = 10_000;

/// What to do with a line that cannot become an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnBadLine {
    /// Stop at the first bad line (nothing after it is sent).
    Fail,
    /// Report the line and go on.
    Skip,
}

/// Where events are read from.
#[derive(Clone, Debug)]
pub enum Input {
    /// A file; `-` is standard input.
    File(PathBuf),
    /// Data built into the binary (the quickstart's sample events).
    Embedded {
        name: &'static str,
        bytes: &'static [u8],
    },
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::File(path) => path.display().fmt(f),
            Input::Embedded { name, .. } => f.write_str(name),
        }
    }
}

/// The input of a load: where, which format, and how events are keyed.
#[derive(Clone, Debug)]
pub struct Load {
    pub input: Input,
    pub format: InputFormat,
    /// Field path of each event's key (`email`, `payload.userId`).
    pub key: Option<String>,
    /// Events per second at most; 0 for as fast as the broker takes them.
    pub rate: u32,
    pub on_bad_line: OnBadLine,
}

/// What a load did.
#[derive(Debug, Default)]
pub struct Loaded {
    pub produced: u64,
    pub skipped: Vec<BadLine>,
}

/// The `produce` command: loads, then prints the final count.
#[allow(
    clippy::print_stdout,
    reason = "the final count is the command's output"
)]
pub async fn command(bootstrap: &str, topic: &str, input: &Load) -> anyhow::Result<()> {
    let producer = producer(bootstrap)?;
    let bar = ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    let loaded = load(&producer, topic, input, &bar).await?;
    println!(
        "produced {} events to {topic}{}",
        loaded.produced,
        match loaded.skipped.len() {
            0 => String::new(),
            n => format!(" ({n} bad lines skipped)"),
        }
    );
    Ok(())
}

/// A producer for loading: idempotent, so a retried send is not doubled.
pub fn producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("message.timeout.ms", "60000")
        .create()
        .context("cannot create the Kafka producer")
}

/// Sends every event of `load` to `topic`, showing progress on `bar` (hidden when stderr
/// is not a terminal); returns once every event is acknowledged by the broker.
pub async fn load(
    producer: &FutureProducer,
    topic: &str,
    load: &Load,
    bar: &ProgressBar,
) -> anyhow::Result<Loaded> {
    let (input, size) = open(&load.input)?;
    match size {
        Some(size) => {
            bar.set_length(size);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {percent:>3}% {msg} ({elapsed})",
                )?
                .progress_chars("=> "),
            );
        }
        None => bar.set_style(ProgressStyle::with_template(
            "{prefix} {spinner} {msg} ({elapsed})",
        )?),
    }
    bar.set_prefix(format!("loading {}", load.input));
    let mut reader = EventReader::new(input, load.format, load.key.clone());
    let mut loaded = Loaded::default();
    let mut pending = FuturesUnordered::new();
    let started = tokio::time::Instant::now();
    let mut sent: u64 = 0;
    while let Some(item) = reader.next() {
        let event = match item {
            Ok(event) => event,
            Err(InputError::Bad(bad)) => match load.on_bad_line {
                OnBadLine::Fail => {
                    bail!(
                        "{}: {bad} (pass --on-bad-line skip to skip such lines)",
                        load.input
                    )
                }
                OnBadLine::Skip => {
                    bar.suspend(|| eprintln!("skipped {}: {bad}", load.input));
                    loaded.skipped.push(bad);
                    continue;
                }
            },
            Err(InputError::Io(e)) => {
                return Err(e).with_context(|| format!("cannot read {}", load.input));
            }
        };
        if load.rate > 0 {
            // Pacing: event n leaves no earlier than n / rate seconds after the start.
            let due = started + Duration::from_secs_f64(sent as f64 / f64::from(load.rate));
            tokio::time::sleep_until(due).await;
        }
        let payload = serde_json::to_vec(&event.value)?;
        loop {
            let mut record = FutureRecord::to(topic).payload(&payload);
            if let Some(key) = &event.key {
                record = record.key(key);
            }
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    match pending.next().await {
                        Some(delivery) => acknowledged(delivery, topic, &mut loaded)?,
                        None => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                Err((e, _)) => return Err(e).context(format!("cannot send to topic {topic}")),
            }
        }
        sent += 1;
        while pending.len() >= MAX_PENDING {
            if let Some(delivery) = pending.next().await {
                acknowledged(delivery, topic, &mut loaded)?;
            }
        }
        if sent.is_multiple_of(256) {
            bar.set_position(reader.bytes_read());
            bar.set_message(format!("{sent} events"));
        }
    }
    while let Some(delivery) = pending.next().await {
        acknowledged(delivery, topic, &mut loaded)?;
    }
    bar.set_position(reader.bytes_read());
    bar.set_message(format!("{} events", loaded.produced));
    bar.finish();
    Ok(loaded)
}

fn acknowledged(
    delivery: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
    topic: &str,
    loaded: &mut Loaded,
) -> anyhow::Result<()> {
    match delivery {
        Ok(Ok(_)) => {
            loaded.produced += 1;
            Ok(())
        }
        Ok(Err((e, _))) => Err(e).context(format!(
            "the broker did not take an event for topic {topic}"
        )),
        Err(_) => bail!("the producer stopped before every event to {topic} was acknowledged"),
    }
}

/// The input's reader and its size when known.
fn open(input: &Input) -> anyhow::Result<(Box<dyn Read + Send>, Option<u64>)> {
    let path = match input {
        Input::Embedded { bytes, .. } => return Ok((Box::new(*bytes), Some(bytes.len() as u64))),
        Input::File(path) if path == Path::new("-") => {
            return Ok((Box::new(std::io::stdin()), None));
        }
        Input::File(path) => path,
    };
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().ok().map(|m| m.len());
    Ok((Box::new(file), size))
}
