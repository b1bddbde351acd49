//! `weir-worker`: runs an EventPipeline. Exit codes: 0 success, 2 invalid spec, 1 other
//! failures.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weir_worker::spec::{SpecError, load_pipeline};

#[derive(Debug, Parser)]
#[command(name = "weir-worker", version, about = "Weir's pipeline worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a pipeline file: parse it and report every problem with its field path.
    Validate {
        /// The EventPipeline YAML file.
        #[arg(short, long)]
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Validate { file } => match load_pipeline(&file) {
            Ok(pipeline) => {
                eprintln!(
                    "{}: EventPipeline {:?} is valid ({} sink(s), topics {})",
                    file.display(),
                    pipeline.metadata.name,
                    pipeline.spec.sinks.len(),
                    pipeline.spec.source.topics.join(", ")
                );
                ExitCode::SUCCESS
            }
            Err(
                err @ (SpecError::Load { .. }
                | SpecError::Invalid { .. }
                | SpecError::WrongKind { .. }),
            ) => {
                eprintln!("error: {err}");
                ExitCode::from(2)
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
    }
}
