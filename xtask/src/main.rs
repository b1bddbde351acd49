//! `cargo xtask generate` rewrites every generated file; `cargo xtask crds` prints the CRDs.

use std::io::Write;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Weir repository tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Regenerate every generated file (CRD YAML, chart CRD templates, the chart's README and
    /// values.schema.json, deploy/, docs/functions.md).
    Generate,
    /// Fail when a committed generated file differs from what the types generate.
    Check,
    /// Print the CustomResourceDefinitions as one multi-document YAML stream.
    Crds,
}

fn main() -> anyhow::Result<()> {
    let root = xtask::repo_root();
    match Cli::parse().command {
        Command::Generate => {
            let changed = xtask::write_all(&root)?;
            let mut err = std::io::stderr().lock();
            if changed.is_empty() {
                writeln!(err, "generated files are up to date")?;
            }
            for path in changed {
                writeln!(err, "wrote {}", path.display())?;
            }
        }
        Command::Check => {
            let stale = xtask::stale_files(&root)?;
            anyhow::ensure!(
                stale.is_empty(),
                "generated files differ from the Rust types: {}; run `{}`",
                stale
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                xtask::GENERATE_COMMAND
            );
        }
        Command::Crds => {
            let mut out = std::io::stdout().lock();
            for (i, crd) in weir_crds::crds().iter().enumerate() {
                if i > 0 {
                    writeln!(out, "---")?;
                }
                write!(out, "{}", serde_yaml_ng::to_string(crd)?)?;
            }
        }
    }
    Ok(())
}
