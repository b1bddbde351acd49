//! `weir-operator`: the Weir Kubernetes operator.

use std::io::Write;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "weir-operator", version, about = "Weir's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (`weir-operator crds | kubectl apply --server-side -f -`).
    Crds,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds => {
            std::io::stdout()
                .lock()
                .write_all(weir_operator::crds_yaml()?.as_bytes())?;
        }
    }
    Ok(())
}
