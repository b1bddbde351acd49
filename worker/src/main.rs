//! `weir-worker`: runs an EventPipeline, loads events into topics, and shows the whole
//! thing working in one command (`quickstart`). Exit codes: 0 success (including a clean
//! stop on SIGTERM/SIGINT), 2 invalid spec or arguments, 1 other failures.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::produce::{Input, Load, OnBadLine};
use indicatif::ProgressBar;
use tokio::sync::watch;
use weir_worker::config::{self, Overrides};
use weir_worker::engine::{Engine, EngineError};
use weir_worker::metrics::{self, Metrics};

#[derive(Debug, Parser)]
#[command(name = "weir-worker", version, about = "Weir's pipeline worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a pipeline: the file holds the EventPipeline and, optionally, the KafkaConnection
    /// it uses.
    Run {
        /// The pipeline file (YAML, as applied to Kubernetes).
        #[arg(short, long)]
        file: PathBuf,
        /// The EventPipeline to run, when the file holds several.
        #[arg(short, long, env = "WEIR_PIPELINE")]
        pipeline: Option<String>,
        /// Kafka bootstrap servers, overriding the file's KafkaConnection.
        #[arg(long, env = "WEIR_KAFKA_BOOTSTRAP_SERVERS")]
        bootstrap_servers: Option<String>,
        /// Namespace for the default consumer group `<namespace>.<name>`.
        #[arg(long, env = "WEIR_NAMESPACE")]
        namespace: Option<String>,
        /// This worker's name, e.g. the pod name: its Kafka `client.id`, as the broker and
        /// `kafka-consumer-groups --describe` show it. Not a static group membership: a
        /// worker leaves its group on SIGTERM and the others take its partitions at once.
        #[arg(long, env = "WEIR_INSTANCE_ID")]
        instance_id: Option<String>,
        /// Records decoded and transformed at once, one thread each (CPU-heavy transforms
        /// such as bcrypt use them all). Default: the cores this process may use — its
        /// cgroup's CPU quota (the pod's CPU limit) when it has one.
        #[arg(long, env = "WEIR_TRANSFORM_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
        transform_threads: Option<u16>,
        /// Address of the /metrics, /healthz and /readyz server.
        #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "0.0.0.0:9090")]
        metrics_addr: SocketAddr,
        /// Log format: json or text.
        #[arg(long, env = "WEIR_LOG_FORMAT", default_value = "json")]
        log_format: String,
        /// Start the embedded development broker (in memory, for local use only) with the
        /// pipeline's topics, instead of connecting to Kafka. Its address is logged, so
        /// `weir-worker produce --bootstrap-servers <it>` can feed it.
        #[arg(long, conflicts_with = "bootstrap_servers")]
        embedded_broker: bool,
        /// Carry out this replay in the sinks before consuming, once per token across all
        /// workers: the consumer group was reset (the operator sets this after a
        /// `spec.replay`; by hand, reset the group first), so the SQL sinks forget the
        /// offsets they keep (ExactlyOnce) and the idempotency keys, and the events from the
        /// reset position are applied again. A token already carried out does nothing.
        #[arg(long, env = "WEIR_REPLAY_TOKEN", value_parser = clap::builder::NonEmptyStringValueParser::new())]
        replay_token: Option<String>,
        /// With --replay-token: empty the SQL sinks' tables too, in the same transaction.
        #[arg(long, env = "WEIR_REPLAY_TRUNCATE", requires = "replay_token", action = clap::ArgAction::Set, default_value_t = false, num_args = 0..=1, default_missing_value = "true")]
        replay_truncate: bool,
    },
    /// Load events into a topic from a JSON Lines or CSV file (CSV: the header row names
    /// the fields).
    Produce {
        /// The topic to write to.
        #[arg(short, long)]
        topic: String,
        /// A JSON Lines file (`-` for standard input).
        #[arg(long, conflicts_with = "csv", required_unless_present = "csv")]
        jsonl: Option<PathBuf>,
        /// A CSV file with a header row (`-` for standard input).
        #[arg(long)]
        csv: Option<PathBuf>,
        /// The field whose value keys each event (e.g. `email` or `payload.userId`); events
        /// of one key stay in order on one partition.
        #[arg(short, long)]
        key: Option<String>,
        /// At most this many events per second (0: as fast as the broker takes them).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// A line that is not JSON, or not CSV matching the header, or has no key: stop
        /// (fail) or report it and go on (skip).
        #[arg(long, value_enum, default_value_t = OnBadLine::Fail)]
        on_bad_line: OnBadLine,
        /// Kafka bootstrap servers.
        #[arg(long, env = "WEIR_KAFKA_BOOTSTRAP_SERVERS")]
        bootstrap_servers: String,
    },
    /// See a pipeline run with nothing installed: an embedded broker, the sample todo
    /// events, the todo-projection pipeline into a SQLite file, then the projected table.
    Quickstart {
        /// The SQLite file the projection writes (kept between runs).
        #[arg(long, default_value = "weir-quickstart.db")]
        database: PathBuf,
    },
    /// Check a pipeline file as the worker checks it before starting: every EventPipeline
    /// in it, every problem with its field path.
    Validate {
        /// The YAML file (one or more documents).
        #[arg(short, long)]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match Cli::parse().command {
        Command::Validate { file } => runtime.block_on(async { validate(file) }),
        Command::Run {
            file,
            pipeline,
            bootstrap_servers,
            namespace,
            instance_id,
            transform_threads,
            metrics_addr,
            log_format,
            embedded_broker,
            replay_token,
            replay_truncate,
        } => {
            let status = cli::status::line();
            init_logs(&log_format, "info,rdkafka=warn,sqlx=warn", status.clone());
            let overrides = Overrides {
                bootstrap_servers,
                namespace,
                instance_id,
                transform_threads: transform_threads.map(usize::from),
                pipeline,
                replay: replay_token.map(|token| weir_worker::sink::Replay {
                    token,
                    truncate: replay_truncate,
                }),
            };
            runtime.block_on(run(file, overrides, metrics_addr, embedded_broker, status))
        }
        Command::Produce {
            topic,
            jsonl,
            csv,
            key,
            rate,
            on_bad_line,
            bootstrap_servers,
        } => {
            let (path, format) = match (jsonl, csv) {
                (Some(path), _) => (path, weir_worker::input::InputFormat::JsonLines),
                (None, Some(path)) => (path, weir_worker::input::InputFormat::Csv),
                (None, None) => {
                    eprintln!("error: name the input with --jsonl or --csv");
                    return ExitCode::from(2);
                }
            };
            let load = Load {
                input: Input::File(path),
                format,
                key,
                rate,
                on_bad_line,
            };
            report(runtime.block_on(cli::produce::command(&bootstrap_servers, &topic, &load)))
        }
        Command::Quickstart { database } => {
            // The output is the table and counts; logs only for errors unless RUST_LOG asks.
            init_logs("text", "error", None);
            report(runtime.block_on(cli::quickstart::run(&database)))
        }
    }
}

/// Exit code 0, or 1 with the error and its causes.
fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    file: PathBuf,
    mut overrides: Overrides,
    metrics_addr: SocketAddr,
    embedded_broker: bool,
    status: Option<ProgressBar>,
) -> ExitCode {
    // Listening from the first moment: a SIGTERM during start-up (a rolling update, a
    // scale-down) stops the worker cleanly instead of killing it by the default action.
    let signals = Signals::listen();
    // Kept alive while the pipeline runs.
    let mut broker = None;
    if embedded_broker {
        match start_embedded_broker(&file, overrides.pipeline.as_deref()) {
            Ok(started) => {
                overrides.bootstrap_servers = Some(started.bootstrap_servers());
                broker = Some(started);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let config = match config::load(&file, &overrides) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "cannot run this pipeline");
            eprintln!("error: {e}");
            return if e.is_spec_error() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    let metrics = Metrics::new(&config.name);
    if let Some(bar) = status {
        tokio::spawn(cli::status::follow(
            bar,
            config.name.clone(),
            metrics.clone(),
        ));
    }
    match tokio::net::TcpListener::bind(metrics_addr).await {
        Ok(listener) => {
            tracing::info!(addr = %metrics_addr, "serving /metrics /healthz /readyz");
            tokio::spawn(metrics::serve(listener, metrics.clone()));
        }
        Err(e) => {
            tracing::error!(addr = %metrics_addr, error = %e, "cannot serve metrics");
            return ExitCode::FAILURE;
        }
    }
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("stopping: finishing the batch in flight");
        let _ = stop.send(true);
    });
    let engine = match Engine::new(config, metrics, shutdown) {
        Ok(engine) => engine,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the pipeline");
            eprintln!("error: {e}");
            return match e {
                EngineError::Setup(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            };
        }
    };
    let result = engine.run().await;
    drop(broker);
    match result {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "pipeline stopped");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT, listened for from the moment this is made.
struct Signals {
    terminate: Option<tokio::signal::unix::Signal>,
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}");
                None
            }
        };
        Signals {
            terminate: listen(SignalKind::terminate(), "SIGTERM"),
            interrupt: listen(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Returns when either arrives (or never, when neither could be listened for).
    async fn wait(mut self) {
        let terminate = async {
            match self.terminate.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let interrupt = async {
            match self.interrupt.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = terminate => {}
            () = interrupt => {}
        }
    }
}

/// Starts the embedded broker with the topics the pipeline file names (partitions from its
/// KafkaTopics, else 1).
fn start_embedded_broker(
    file: &std::path::Path,
    pipeline: Option<&str>,
) -> anyhow::Result<weir_worker::embedded::EmbeddedBroker> {
    use anyhow::Context as _;
    let read = config::read(file)?;
    let spec = &read.pick(file, pipeline)?.spec;
    let broker = weir_worker::embedded::EmbeddedBroker::start()
        .context("cannot start the embedded broker")?;
    let wanted = spec
        .source
        .topics
        .iter()
        .chain(spec.dead_letter.as_ref().map(|d| &d.topic));
    for topic in wanted {
        let partitions = read
            .topics
            .iter()
            .find(|t| t.spec.effective_topic_name(&t.metadata.name) == topic)
            .map_or(1, |t| t.spec.partitions);
        broker.create_topic(topic, partitions)?;
    }
    tracing::warn!(
        bootstrap_servers = %broker.bootstrap_servers(),
        "embedded development broker started: in memory, for local use only; its data is lost when the worker exits"
    );
    Ok(broker)
}

fn init_logs(format: &str, default_filter: &str, status: Option<ProgressBar>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(move || cli::status::Stderr(status.clone()));
    if format == "text" {
        builder.init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    }
}

/// Checks every EventPipeline of the file as `run` would before starting; exit code 2 when
/// any is refused.
fn validate(file: PathBuf) -> ExitCode {
    let read = match config::read(&file) {
        Ok(read) => read,
        Err(err) => {
            eprintln!("error: {err}");
            return if err.is_spec_error() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            };
        }
    };
    if read.pipelines.is_empty() {
        eprintln!("error: {}: holds no EventPipeline", file.display());
        return ExitCode::from(2);
    }
    let mut refused = 0;
    for pipeline in &read.pipelines {
        match config::check(&file, pipeline) {
            Ok(()) => eprintln!(
                "{}: EventPipeline {:?} is valid ({} sink(s), topics {})",
                file.display(),
                pipeline.metadata.name,
                pipeline.spec.sinks.len(),
                pipeline.spec.source.topics.join(", ")
            ),
            Err(err) => {
                refused += 1;
                eprintln!("error: {err}");
            }
        }
    }
    if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}
