//! Starts the servers one test run shares (Kafka, PostgreSQL, MariaDB, FerretDB), writes their addresses as
//! `KEY=value` lines to `--env-file`, and keeps them until its standard input closes; then
//! stops them and deletes their data. scripts/test.sh runs it around `cargo nextest run`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use weir_testkit::{FerretDbServer, KafkaServer, MariaDbServer, PostgresServer, env};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let env_file = match (args.next().as_deref(), args.next()) {
        (Some("--env-file"), Some(path)) => PathBuf::from(path),
        _ => anyhow::bail!("usage: weir-test-services --env-file <path>"),
    };
    let (kafka, postgres, mariadb, ferretdb) = std::thread::scope(|scope| {
        let kafka = scope.spawn(KafkaServer::start);
        let postgres = scope.spawn(PostgresServer::start);
        let mariadb = scope.spawn(MariaDbServer::start);
        let ferretdb = scope.spawn(FerretDbServer::start);
        (
            kafka.join(),
            postgres.join(),
            mariadb.join(),
            ferretdb.join(),
        )
    });
    let kafka = kafka
        .map_err(|_| anyhow::anyhow!("the Kafka start panicked"))?
        .context("starting Kafka")?;
    let postgres = postgres
        .map_err(|_| anyhow::anyhow!("the PostgreSQL start panicked"))?
        .context("starting PostgreSQL")?;
    let mariadb = mariadb
        .map_err(|_| anyhow::anyhow!("the MariaDB start panicked"))?
        .context("starting MariaDB")?;
    let ferretdb = ferretdb
        .map_err(|_| anyhow::anyhow!("the FerretDB start panicked"))?
        .context("starting FerretDB")?;
    let security = kafka
        .security_file()
        .context("the broker has no secured listeners")?;
    let lines = format!(
        "{}={}\n{}={}\n{}={}\n{}={}\n{}={}\n",
        env::KAFKA_BOOTSTRAP,
        kafka.bootstrap(),
        env::KAFKA_SECURITY,
        security.display(),
        env::POSTGRES_URL,
        postgres.url("postgres"),
        env::MYSQL_URL,
        mariadb.url("mysql"),
        env::MONGODB_URL,
        ferretdb.url()
    );
    let partial = env_file.with_extension("partial");
    std::fs::write(&partial, lines).context("writing the env file")?;
    std::fs::rename(&partial, &env_file).context("publishing the env file")?;
    // Hold the servers until whoever started us goes away.
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(kafka);
    drop(postgres);
    drop(mariadb);
    drop(ferretdb);
    Ok(())
}
