//! FerretDB (for the MongoDB sink): the MongoDB wire protocol on a PostgreSQL server of its
//! own, built from Go modules into the tools directory (testkit/ferretdb), one server per
//! test run with a fresh database name per test. PostgreSQL, not SQLite, underneath:
//! FerretDB's SQLite backend scans the whole collection for every update whose filter is
//! not a lone string `_id`, so a batch of 2000 upserts took minutes; on PostgreSQL a
//! filter's equalities become SQL.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::postgres::PostgresServer;
use crate::process::{Supervised, run, which};
use crate::{HarnessError, Result, env, free_port, tools_dir, unique_name};

const PART: &str = "ferretdb";

/// The FerretDB version testkit/ferretdb/go.mod builds.
pub const FERRETDB_VERSION: &str = "1.24.2";

/// The build of testkit/ferretdb/main.go: part of the installed directory's name (as in
/// testkit/ferretdb/build.sh), so that a changed main.go is built afresh.
pub const FERRETDB_BUILD: &str = "pg";

/// A FerretDB server on a loopback port storing on a PostgreSQL server of its own (no
/// authentication). Dropping it stops both and deletes the data.
#[derive(Debug)]
pub struct FerretDbServer {
    // Declared first, so dropped first: FerretDB stops before its PostgreSQL.
    _process: Supervised,
    _postgres: PostgresServer,
    port: u16,
}

impl FerretDbServer {
    /// Starts a server, building FerretDB first when the tools directory lacks it.
    pub fn start() -> Result<FerretDbServer> {
        let binary = binary()?;
        let postgres = PostgresServer::start()?;
        let dir = tempfile::Builder::new()
            .prefix("weir-ferretdb-")
            .tempdir()
            .map_err(|source| HarnessError::io(PART, "creating the data directory", source))?
            .keep();
        let port = free_port(PART)?;
        let args = [
            "-listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "-dir".to_owned(),
            dir.display().to_string(),
            "-postgresql-url".to_owned(),
            postgres.url("postgres"),
        ];
        let mut process = Supervised::spawn(
            PART,
            "TERM",
            Some(&dir),
            &dir.join("ferretdb.log"),
            &binary,
            &args,
        )?;
        let ready = process.wait_ready("listening", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if ready.is_err() {
            return Err(process.start_error("the server did not accept connections"));
        }
        Ok(FerretDbServer {
            _process: process,
            _postgres: postgres,
            port,
        })
    }

    /// The shared server's URL: `$WEIR_TEST_MONGODB_URL`, else a server started by (and
    /// dying with) this process.
    pub fn shared_url() -> Result<String> {
        static SHARED: crate::Shared<FerretDbServer> = OnceLock::new();
        crate::shared_url(&SHARED, PART, env::MONGODB_URL, || {
            FerretDbServer::start().map(|server| (server.url(), server))
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mongodb://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("mongodb://127.0.0.1:{}/", self.port)
    }

    /// The shared server's URL and a database name no other test uses.
    pub async fn test_database() -> Result<(String, String)> {
        let url = tokio::task::spawn_blocking(FerretDbServer::shared_url)
            .await
            .map_err(|e| HarnessError::Start {
                part: PART,
                detail: e.to_string(),
            })??;
        Ok((url, unique_name("test").replace('-', "_")))
    }
}

/// The installed FerretDB, built first when missing (testkit/ferretdb/build.sh takes a
/// lock, so concurrent callers build once).
fn binary() -> Result<PathBuf> {
    let binary = tools_dir()
        .join(format!("ferretdb-{FERRETDB_VERSION}-{FERRETDB_BUILD}"))
        .join("bin/ferretdb");
    if binary.is_file() {
        return Ok(binary);
    }
    if which("go").is_none() {
        return Err(HarnessError::Missing {
            part: PART,
            hint: format!(
                "no FerretDB {FERRETDB_VERSION} at {} and no `go` on PATH to build it: install Go 1.26 and run scripts/install-test-deps.sh",
                binary.display()
            ),
        });
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ferretdb/build.sh");
    eprintln!(
        "weir-testkit: building FerretDB {FERRETDB_VERSION} into {} (about a minute, once)",
        binary.display()
    );
    run(
        PART,
        Command::new("bash")
            .arg(&script)
            .env(env::TOOLS_DIR, tools_dir()),
    )?;
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(HarnessError::Start {
            part: PART,
            detail: format!(
                "{} finished without building {}",
                script.display(),
                binary.display()
            ),
        })
    }
}
