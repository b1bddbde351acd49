//! Starts the servers one test run shares (Kafka, PostgreSQL), writes their addresses as
//! `KEY=value` lines to `--env-file`, and keeps them until its standard input closes; then
//! stops them and deletes their data. scripts/test.sh runs it around `cargo nextest run`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use weir_testkit::{KafkaServer, PostgresServer, env};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let env_file = match (args.next().as_deref(), args.next()) {
        (Some("--env-file"), Some(path)) => PathBuf::from(path),
        _ => anyhow::bail!("usage: weir-test-services --env-file <path>"),
    };
    let (kafka, postgres) = std::thread::scope(|scope| {
        let kafka = scope.spawn(KafkaServer::start);
        let postgres = scope.spawn(PostgresServer::start);
        (kafka.join(), postgres.join())
    });
    let kafka = kafka
        .map_err(|_| anyhow::anyhow!("the Kafka start panicked"))?
        .context("starting Kafka")?;
    let postgres = postgres
        .map_err(|_| anyhow::anyhow!("the PostgreSQL start panicked"))?
        .context("starting PostgreSQL")?;
    let lines = format!(
        "{}={}\n{}={}\n",
        env::KAFKA_BOOTSTRAP,
        kafka.bootstrap(),
        env::POSTGRES_URL,
        postgres.url("postgres")
    );
    let partial = env_file.with_extension("partial");
    std::fs::write(&partial, lines).context("writing the env file")?;
    std::fs::rename(&partial, &env_file).context("publishing the env file")?;
    // Hold the servers until whoever started us goes away.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(kafka);
    drop(postgres);
    Ok(())
}
