//! Redis: a server per test (it starts in milliseconds), which the test may stop and start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::process::{Janitor, Supervised, which};
use crate::{HarnessError, Result, free_port};

const PART: &str = "redis";

/// A Redis server on a loopback port, without persistence. Dropping it stops it.
#[derive(Debug)]
pub struct RedisServer {
    process: Option<Supervised>,
    port: u16,
    dir: PathBuf,
    _janitor: Janitor,
}

impl RedisServer {
    pub fn start() -> Result<RedisServer> {
        let dir = tempfile::Builder::new()
            .prefix("weir-redis-")
            .tempdir()
            .map_err(|source| HarnessError::Io {
                part: PART,
                context: "creating the data directory".into(),
                source,
            })?
            .keep();
        let janitor = Janitor::spawn(PART, &dir)?;
        let mut server = RedisServer {
            process: None,
            port: free_port(PART)?,
            dir,
            _janitor: janitor,
        };
        server.start_again()?;
        Ok(server)
    }

    /// Stops the server at once.
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts the server again on the same port, waiting until it answers PING.
    pub fn start_again(&mut self) -> Result<()> {
        if self.process.is_some() {
            return Ok(());
        }
        let binary = which("redis-server").ok_or_else(|| HarnessError::Missing {
            part: PART,
            hint: "no redis-server on PATH: run scripts/install-test-deps.sh (apt-get install redis-server)".into(),
        })?;
        let args = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            &self.dir.display().to_string(),
        ]
        .map(str::to_owned);
        let mut process = Supervised::spawn(
            PART,
            "KILL",
            None,
            &self.dir.join("redis.log"),
            &binary,
            &args,
        )?;
        let port = self.port;
        if process
            .wait_ready("PONG", Duration::from_secs(20), || ping(port))
            .is_err()
        {
            return Err(process.start_error("no answer to PING"));
        }
        self.process = Some(process);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}
