//! PostgreSQL: a server shared by the run with a fresh database per test, or a dedicated
//! server a test may stop and start again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::process::{Janitor, Supervised, run, running_as_root, which};
use crate::{HarnessError, Result, env, free_port, unique_name};

const PART: &str = "postgres";

/// A PostgreSQL server on a loopback port with its data in a temporary directory
/// (superuser `postgres`, trust authentication). Dropping it stops it and deletes the data.
#[derive(Debug)]
pub struct PostgresServer {
    process: Option<Supervised>,
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    _janitor: Janitor,
}

impl PostgresServer {
    /// Initialises a data directory and starts a server on it.
    pub fn start() -> Result<PostgresServer> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("weir-postgres-")
            .tempdir()
            .map_err(|source| HarnessError::io(PART, "creating the data directory", source))?
            .keep();
        let janitor = Janitor::spawn(PART, &dir)?;
        if running_as_root() {
            // PostgreSQL refuses to run as root: the directory belongs to `postgres`.
            run(PART, Command::new("chown").arg("postgres:").arg(&dir))?;
        }
        let data = dir.join("data");
        run(
            PART,
            as_postgres(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
                .args(["--locale=C"]),
        )?;
        let mut server = PostgresServer {
            process: None,
            port: free_port(PART)?,
            dir,
            bin,
            _janitor: janitor,
        };
        server.start_again()?;
        Ok(server)
    }

    /// The shared server's admin URL: `$WEIR_TEST_POSTGRES_URL`, else a server started by
    /// (and dying with) this process.
    pub fn shared_admin_url() -> Result<String> {
        static SHARED: crate::Shared<PostgresServer> = OnceLock::new();
        crate::shared_url(&SHARED, PART, env::POSTGRES_URL, || {
            PostgresServer::start().map(|server| (server.url("postgres"), server))
        })
    }

    /// Stops the server (a fast shutdown: connections are cut, committed data is kept).
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts the server again on the same port and data, waiting until it accepts
    /// connections.
    pub fn start_again(&mut self) -> Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let postgres = self.bin.join("postgres");
        let mut args = Vec::new();
        let program = if running_as_root() {
            args.extend(setpriv_args());
            args.push(postgres.display().to_string());
            which("setpriv").ok_or_else(|| HarnessError::Missing {
                part: PART,
                hint: "setpriv (util-linux) is needed to run PostgreSQL as `postgres`".into(),
            })?
        } else {
            postgres
        };
        args.extend(
            [
                "-D",
                &self.dir.join("data").display().to_string(),
                "-p",
                &self.port.to_string(),
                "-k",
                &self.dir.display().to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=300",
            ]
            .map(str::to_owned),
        );
        let mut process = Supervised::spawn(
            PART,
            "INT",
            None,
            &self.dir.join("postgres.log"),
            &program,
            &args,
        )?;
        let isready = self.bin.join("pg_isready");
        let port = self.port.to_string();
        let ready = process.wait_ready("accepting connections", Duration::from_secs(30), || {
            Command::new(&isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &port])
                .status()
                .is_ok_and(|s| s.success())
        });
        if ready.is_err() {
            return Err(process.start_error("the server did not accept connections"));
        }
        self.process = Some(process);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database with a unique name on this server.
    pub async fn create_database(&self) -> Result<TestDatabase> {
        TestDatabase::create_on(&self.url("postgres")).await
    }
}

/// A fresh database for one test on the shared server.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDatabase {
    /// A new, empty database on the shared server.
    pub async fn create() -> Result<TestDatabase> {
        let admin_url = tokio::task::spawn_blocking(PostgresServer::shared_admin_url)
            .await
            .map_err(|e| HarnessError::Start {
                part: PART,
                detail: e.to_string(),
            })??;
        Self::create_on(&admin_url).await
    }

    async fn create_on(admin_url: &str) -> Result<TestDatabase> {
        let name = unique_name("test").replace('-', "_");
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url)
            .await?;
        // `name` is built here from a UUID: letters, digits and underscores only.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        admin.close().await;
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => format!("{admin_url}/{name}"),
        };
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await?;
        Ok(TestDatabase { name, url, pool })
    }
}

fn setpriv_args() -> Vec<String> {
    ["--reuid=postgres", "--regid=postgres", "--init-groups"]
        .map(str::to_owned)
        .to_vec()
}

/// A command that runs `program` as the `postgres` user when we are root.
fn as_postgres(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("setpriv");
        command.args(setpriv_args()).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// The newest installed PostgreSQL's bin directory.
fn bin_dir() -> Result<PathBuf> {
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    candidates
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| HarnessError::Missing {
            part: PART,
            hint: "no /usr/lib/postgresql/<version>/bin/initdb: run scripts/install-test-deps.sh (apt-get install postgresql)".into(),
        })
}
