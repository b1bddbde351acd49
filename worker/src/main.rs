//! `weir-worker`: runs an EventPipeline. Exit codes: 0 success (including a clean stop on
//! SIGTERM/SIGINT), 2 invalid spec, 1 other failures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
        /// Kafka bootstrap servers, overriding the file's KafkaConnection.
        #[arg(long, env = "WEIR_KAFKA_BOOTSTRAP_SERVERS")]
        bootstrap_servers: Option<String>,
        /// Namespace for the default consumer group `<namespace>.<name>`.
        #[arg(long, env = "WEIR_NAMESPACE")]
        namespace: Option<String>,
        /// A stable identity for this worker in its consumer group (static membership,
        /// e.g. the pod name): a restarted worker takes its partitions back at once instead
        /// of waiting for a rebalance.
        #[arg(long, env = "WEIR_INSTANCE_ID")]
        instance_id: Option<String>,
        /// Address of the /metrics, /healthz and /readyz server.
        #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "0.0.0.0:9090")]
        metrics_addr: SocketAddr,
        /// Log format: json or text.
        #[arg(long, env = "WEIR_LOG_FORMAT", default_value = "json")]
        log_format: String,
    },
    /// Check a pipeline file: parse it and report every problem with its field path.
    Validate {
        /// The EventPipeline YAML file.
        #[arg(short, long)]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Validate { file } => validate(file),
        Command::Run {
            file,
            bootstrap_servers,
            namespace,
            instance_id,
            metrics_addr,
            log_format,
        } => {
            init_logs(&log_format);
            let overrides = Overrides {
                bootstrap_servers,
                namespace,
                instance_id,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(file, overrides, metrics_addr))
        }
    }
}

async fn run(file: PathBuf, overrides: Overrides, metrics_addr: SocketAddr) -> ExitCode {
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
        wait_for_signal().await;
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
    match engine.run().await {
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

async fn wait_for_signal() {
    let mut terminate = match tokio::signal::unix::signal(
        tokio::signal::unix::SignalKind::terminate(),
    ) {
        Ok(signal) => signal,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the worker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn,sqlx=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
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

fn validate(file: PathBuf) -> ExitCode {
    match config::read(&file) {
        Ok(read) => {
            let pipeline = read.pipeline;
            eprintln!(
                "{}: EventPipeline {:?} is valid ({} sink(s), topics {})",
                file.display(),
                pipeline.metadata.name,
                pipeline.spec.sinks.len(),
                pipeline.spec.source.topics.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            if err.is_spec_error() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
