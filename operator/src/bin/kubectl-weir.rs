//! `kubectl weir`: pipelines, consumer groups and dead letters from the command line.
//! On PATH as `kubectl-weir`, kubectl runs it for `kubectl weir …`. See docs/plugin.md.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weir_operator::plugin::{
    self, Format, PluginError, Target, dead_letters, groups, replay, reset, status,
};

/// Pipelines, consumer groups and dead letters of Weir, read with your kubeconfig and
/// through each pipeline's KafkaConnection.
#[derive(Debug, Parser)]
#[command(name = "kubectl weir", version)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output: table, json or yaml.
    #[arg(short = 'o', long, global = true, default_value = "table")]
    output: Format,
    /// Bound on each Kafka request, e.g. 10s.
    #[arg(long, global = true, default_value = "10s", value_parser = timeout)]
    kafka_timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Workers, lag per partition (live from Kafka), rates, time to drain, last scale,
    /// last replay and conditions of a pipeline.
    Status { pipeline: String },
    /// The consumer groups of a KafkaConnection's cluster, or one in detail.
    Groups {
        /// The KafkaConnection in the namespace.
        #[arg(long, default_value = "default")]
        connection: String,
        #[command(subcommand)]
        action: Option<GroupsAction>,
    },
    /// Moves a consumer group's committed offsets; refused while the group has members.
    ResetOffsets {
        group: String,
        /// earliest, latest, an RFC 3339 time, a duration before now (2h) or an offset.
        #[arg(long)]
        to: String,
        /// TOPIC or TOPIC:PARTITION[,PARTITION…]; repeatable. Default: every topic the
        /// group has committed offsets on.
        #[arg(long)]
        topic: Vec<String>,
        /// Show the plan, commit nothing.
        #[arg(long)]
        dry_run: bool,
        /// The KafkaConnection in the namespace.
        #[arg(long, default_value = "default")]
        connection: String,
    },
    /// Asks the operator to replay a pipeline: writes spec.replay with a new token.
    Replay {
        pipeline: String,
        /// earliest, latest, an RFC 3339 time, a duration before now (2h), or
        /// TOPIC:PARTITION=OFFSET[,…].
        #[arg(long)]
        to: String,
        /// Empty the sinks first (rebuild a projection).
        #[arg(long)]
        truncate: bool,
        /// The replay's token (default: replay-<unix seconds>).
        #[arg(long)]
        token: Option<String>,
    },
    /// Lists a pipeline's dead letters with the reason the worker recorded.
    DeadLetters {
        pipeline: String,
        /// Only those dead-lettered at or after: an RFC 3339 time or a duration before now.
        #[arg(long)]
        since: Option<String>,
        /// Keep printing dead letters as they arrive.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Sends each dead letter not re-sent before back to its source topic.
    Redrive {
        pipeline: String,
        /// Only those dead-lettered at or after: an RFC 3339 time or a duration before now.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum GroupsAction {
    /// Members, committed offsets and lag of one group.
    Describe { group: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The plugin's errors carry their causes in their own message.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn timeout(text: &str) -> Result<Duration, String> {
    plugin::parse_duration(text)
        .ok_or_else(|| format!("{text:?}: use a duration such as 10s or 1m"))
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn since(text: Option<&str>) -> Result<Option<i64>, PluginError> {
    text.map(plugin::parse_time).transpose()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let target = Target::from_kubeconfig(cli.context, cli.namespace, cli.kafka_timeout).await?;
    let format = cli.output;
    match cli.command {
        Command::Status { pipeline } => {
            let report = status::status(&target, &pipeline).await?;
            print(&plugin::render(&report, format)?)?;
        }
        Command::Groups { connection, action } => {
            let kafka = target.connection_kafka(&connection).await?;
            match action {
                None => print(&plugin::render(&groups::list(&kafka).await?, format)?)?,
                Some(GroupsAction::Describe { group }) => print(&plugin::render(
                    &groups::describe(&kafka, &group).await?,
                    format,
                )?)?,
            }
        }
        Command::ResetOffsets {
            group,
            to,
            topic,
            dry_run,
            connection,
        } => {
            let request = reset::ResetRequest {
                group,
                topics: topic
                    .iter()
                    .map(|t| t.parse())
                    .collect::<Result<_, PluginError>>()?,
                to: to.parse()?,
                dry_run,
            };
            let kafka = target.connection_kafka(&connection).await?;
            print(&plugin::render(
                &reset::reset(&kafka, &request).await?,
                format,
            )?)?;
        }
        Command::Replay {
            pipeline,
            to,
            truncate,
            token,
        } => {
            let report = replay::replay(&target, &pipeline, to.parse()?, truncate, token).await?;
            print(&plugin::render(&report, format)?)?;
        }
        Command::DeadLetters {
            pipeline,
            since: from,
            follow,
        } => {
            let from = since(from.as_deref())?;
            if !follow {
                let report = dead_letters::list(&target, &pipeline, from).await?;
                print(&plugin::render(&report, format)?)?;
                return Ok(());
            }
            let (report, stream) = dead_letters::list_and_follow(&target, &pipeline, from).await?;
            // One line per dead letter, so a script can read them as they come.
            let line = |d: &dead_letters::DeadLetter| -> anyhow::Result<String> {
                Ok(match format {
                    Format::Table => d.row().join("   ") + "\n",
                    Format::Json => serde_json::to_string(d)? + "\n",
                    Format::Yaml => format!("---\n{}", serde_yaml_ng::to_string(d)?),
                })
            };
            if format == Format::Table {
                print(&(dead_letters::DeadLetter::HEADER.join("   ") + "\n"))?;
            }
            for d in &report.dead_letters {
                print(&line(d)?)?;
            }
            loop {
                tokio::select! {
                    next = stream.next(Duration::from_millis(500)) => {
                        if let Some(d) = next? {
                            print(&line(&d)?)?;
                        }
                    }
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Command::Redrive {
            pipeline,
            since: from,
        } => {
            let report = dead_letters::redrive(&target, &pipeline, since(from.as_deref())?).await?;
            print(&plugin::render(&report, format)?)?;
        }
    }
    Ok(())
}
