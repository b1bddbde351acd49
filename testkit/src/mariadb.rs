//! MariaDB (for the MySQL sink): a server shared by the run with a fresh database per test.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

use crate::process::{Janitor, Supervised, run, running_as_root, which};
use crate::{HarnessError, Result, env, free_port, unique_name};

const PART: &str = "mariadb";

/// A MariaDB server on a loopback port with its data in a temporary directory (user
/// `root` from 127.0.0.1, no password). Dropping it stops it and deletes the data.
#[derive(Debug)]
pub struct MariaDbServer {
    process: Option<Supervised>,
    port: u16,
    _janitor: Janitor,
}

impl MariaDbServer {
    /// Initialises a data directory and starts a server on it.
    pub fn start() -> Result<MariaDbServer> {
        let missing = |name: &str| HarnessError::Missing {
            part: PART,
            hint: format!(
                "no {name} on PATH: run scripts/install-test-deps.sh (apt-get install mariadb-server)"
            ),
        };
        let install = which("mariadb-install-db").ok_or_else(|| missing("mariadb-install-db"))?;
        let server = which("mariadbd")
            .or_else(|| Some(PathBuf::from("/usr/sbin/mariadbd")).filter(|p| p.is_file()))
            .ok_or_else(|| missing("mariadbd"))?;
        let dir = tempfile::Builder::new()
            .prefix("weir-mariadb-")
            .tempdir()
            .map_err(|source| HarnessError::io(PART, "creating the data directory", source))?
            .keep();
        let janitor = Janitor::spawn(PART, &dir)?;
        // As root the server drops to `mysql`, which must own its directory.
        let user = if running_as_root() {
            run(PART, Command::new("chown").arg("mysql:").arg(&dir))?;
            "mysql".to_owned()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "mysql".into())
        };
        let data = dir.join("data");
        run(
            PART,
            Command::new(install)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--user={user}"))
                .args(["--auth-root-authentication-method=normal", "--skip-test-db"]),
        )?;
        let port = free_port(PART)?;
        let args = [
            "--no-defaults".to_owned(),
            format!("--datadir={}", data.display()),
            format!("--socket={}", dir.join("mariadb.sock").display()),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".to_owned(),
            format!("--user={user}"),
            "--skip-name-resolve".to_owned(),
            "--skip-log-bin".to_owned(),
            // Test data need not survive a power cut.
            "--innodb-flush-log-at-trx-commit=0".to_owned(),
            "--innodb-doublewrite=0".to_owned(),
            "--innodb-buffer-pool-size=256M".to_owned(),
            "--max-connections=500".to_owned(),
        ];
        let mut process =
            Supervised::spawn(PART, "TERM", None, &dir.join("mariadb.log"), &server, &args)?;
        let ready = process.wait_ready("ready for connections", Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if ready.is_err() {
            return Err(process.start_error("the server did not accept connections"));
        }
        Ok(MariaDbServer {
            process: Some(process),
            port,
            _janitor: janitor,
        })
    }

    /// The shared server's admin URL: `$WEIR_TEST_MYSQL_URL`, else a server started by
    /// (and dying with) this process.
    pub fn shared_admin_url() -> Result<String> {
        static SHARED: crate::Shared<MariaDbServer> = OnceLock::new();
        crate::shared_url(&SHARED, PART, env::MYSQL_URL, || {
            MariaDbServer::start().map(|server| (server.url("mysql"), server))
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for MariaDbServer {
    fn drop(&mut self) {
        self.process = None;
    }
}

/// A fresh database for one test on the shared MariaDB server.
#[derive(Debug)]
pub struct TestMySqlDatabase {
    pub name: String,
    pub url: String,
    pub pool: MySqlPool,
}

impl TestMySqlDatabase {
    /// A new, empty database on the shared server.
    pub async fn create() -> Result<TestMySqlDatabase> {
        let admin_url = tokio::task::spawn_blocking(MariaDbServer::shared_admin_url)
            .await
            .map_err(|e| HarnessError::Start {
                part: PART,
                detail: e.to_string(),
            })??;
        let name = unique_name("test").replace('-', "_");
        let admin = MySqlPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
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
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await?;
        Ok(TestMySqlDatabase { name, url, pool })
    }
}
