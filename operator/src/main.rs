//! `weir-operator`: the Weir Kubernetes operator.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weir_operator::config::OperatorConfig;
use weir_operator::metrics::{self, Metrics};

#[derive(Debug, Parser)]
#[command(name = "weir-operator", version, about = "Weir's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (`weir-operator crds | kubectl apply --server-side -f -`).
    Crds,
    /// Run the controllers (in a cluster, or against the cluster of $KUBECONFIG).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Namespaces to watch, comma-separated; empty for all namespaces.
    #[arg(
        long,
        env = "WEIR_WATCH_NAMESPACES",
        value_delimiter = ',',
        default_value = ""
    )]
    namespaces: Vec<String>,
    /// The KafkaConnection used by resources that name none.
    #[arg(long, env = "WEIR_DEFAULT_CONNECTION", default_value = weir_crds::DEFAULT_CONNECTION)]
    default_connection: String,
    /// The worker image for pipelines that name none.
    #[arg(long, env = "WEIR_WORKER_IMAGE")]
    worker_image: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// This replica's identity in the leader Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "WEIR_LEASE_NAME", default_value = "weir-operator")]
    lease_name: String,
    /// How long a leader's Lease lasts without renewal.
    #[arg(long, env = "WEIR_LEASE_DURATION", default_value = "15s", value_parser = humantime_duration)]
    lease_duration: Duration,
    /// How often a Ready resource is checked again for drift.
    #[arg(long, env = "WEIR_RESYNC", default_value = "5m", value_parser = humantime_duration)]
    resync: Duration,
    /// How often each pipeline's consumer-group lag is read and the autoscaler decides.
    #[arg(long, env = "WEIR_LAG_INTERVAL", default_value = "5s", value_parser = humantime_duration)]
    lag_interval: Duration,
    /// Longest a reconcile may take before it fails and is retried.
    #[arg(long, env = "WEIR_RECONCILE_TIMEOUT", default_value = "2m", value_parser = humantime_duration)]
    reconcile_timeout: Duration,
    /// Log format: json or text.
    #[arg(long, env = "WEIR_LOG_FORMAT", default_value = "json")]
    log_format: String,
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    weir_crds::duration::parse_duration(text)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => {
            std::io::stdout()
                .lock()
                .write_all(weir_operator::crds_yaml()?.as_bytes())?;
            Ok(())
        }
        Command::Run(args) => {
            init_logs(&args.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run(args))
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let defaults = OperatorConfig::default();
    let config = OperatorConfig {
        namespaces: args
            .namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        default_connection: args.default_connection,
        worker_image: args.worker_image.unwrap_or(defaults.worker_image.clone()),
        metrics_addr: args.metrics_addr,
        identity: args
            .identity
            .unwrap_or_else(|| format!("weir-operator-{}", std::process::id())),
        lease_namespace: args.lease_namespace,
        lease_name: args.lease_name,
        lease_duration: args.lease_duration,
        resync: args.resync,
        lag_interval: args.lag_interval,
        reconcile_timeout: args.reconcile_timeout,
        ..defaults
    };
    let client = kube::Client::try_default()
        .await
        .context("cannot configure the Kubernetes client (in-cluster or $KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| format!("cannot serve metrics on {}", config.metrics_addr))?;
    tracing::info!(addr = %config.metrics_addr, "serving /metrics /healthz /readyz");
    tokio::spawn(metrics::serve(listener, metrics.clone()));

    metrics.set_ready(true);
    match weir_operator::run(client, config, metrics, signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            Ok(())
        }
        Err(lost) => Err(lost.into()),
    }
}

async fn signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
