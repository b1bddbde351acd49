//! A server process under a watchdog.
//!
//! Each server runs as the child of a small bash wrapper whose standard input is a pipe
//! from the owning test process. When that process exits, however it exits (normal end,
//! panic, SIGKILL), the pipe closes, the wrapper kills the server with the given signal,
//! waits for it and deletes its data directory. Dropping a [`Supervised`] does the same at
//! once and waits for it.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{HarnessError, Result};

const WATCHDOG: &str = r#"
sig="$1"; dir="$2"; log="$3"; shift 3
exec 3<&0
"$@" </dev/null >>"$log" 2>&1 &
child=$!
# A background job's stdin is /dev/null unless redirected: read the owner's pipe on fd 3.
( read -r _ <&3; kill -s "$sig" "$child" 2>/dev/null ) &
watcher=$!
wait "$child"
kill "$watcher" 2>/dev/null
if [ -n "$dir" ]; then rm -rf "$dir"; fi
"#;

/// Why a server did not become ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotReady {
    Exited,
    TimedOut,
}

#[derive(Debug)]
pub(crate) struct Supervised {
    part: &'static str,
    wrapper: Option<Child>,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Supervised {
    /// Starts `program args` with output appended to `log`. On exit of the owner the
    /// process gets `signal` (e.g. "KILL", "QUIT") and `cleanup_dir`, if any, is deleted.
    pub(crate) fn spawn(
        part: &'static str,
        signal: &str,
        cleanup_dir: Option<&Path>,
        log: &Path,
        program: &Path,
        args: &[String],
    ) -> Result<Self> {
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg("weir-watchdog")
            .arg(signal)
            .arg(cleanup_dir.map(Path::as_os_str).unwrap_or_default())
            .arg(log)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut wrapper = command.spawn().map_err(|source| HarnessError::Io {
            part,
            context: format!("starting {}", program.display()),
            source,
        })?;
        let stdin = wrapper.stdin.take();
        Ok(Self {
            part,
            wrapper: Some(wrapper),
            stdin,
            log: log.to_owned(),
        })
    }

    /// The last lines of the server's output, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Whether the server (its wrapper) is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.wrapper.as_mut().map(|w| w.try_wait()), Some(Ok(None)))
    }

    /// Polls `ready` until it holds; fails when the server exits first or `deadline`
    /// passes.
    pub(crate) fn wait_ready(
        &mut self,
        what: &str,
        deadline: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> std::result::Result<(), NotReady> {
        let outcome = crate::wait_until(self.part, what, deadline, || {
            if !self.is_running() {
                return Some(Err(NotReady::Exited));
            }
            ready().then_some(Ok(()))
        });
        outcome.unwrap_or(Err(NotReady::TimedOut))
    }

    /// A start error carrying the server's recent output.
    pub(crate) fn start_error(&self, what: &str) -> HarnessError {
        HarnessError::Start {
            part: self.part,
            detail: format!("{what}; last output:\n{}", self.log_tail()),
        }
    }

    /// Stops the server and waits (bounded) until it and its wrapper are gone.
    pub(crate) fn stop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut wrapper) = self.wrapper.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = wrapper.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = wrapper.kill();
            let _ = wrapper.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs a command to completion, failing with its output when it does not succeed.
pub(crate) fn run(part: &'static str, command: &mut Command) -> Result<()> {
    let output = command.output().map_err(|source| HarnessError::Io {
        part,
        context: format!("running {command:?}"),
        source,
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Start {
            part,
            detail: format!(
                "{command:?} failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// Whether we run as root (PostgreSQL refuses to).
pub(crate) fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Finds `name` on PATH.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Deletes a directory when its owner process exits (or when dropped), for servers that
/// are stopped and started again on the same data.
#[derive(Debug)]
pub(crate) struct Janitor {
    child: Option<Child>,
}

impl Janitor {
    pub(crate) fn spawn(part: &'static str, dir: &Path) -> Result<Self> {
        let child = Command::new("bash")
            .arg("-c")
            .arg(r#"read -r _; rm -rf -- "$1""#)
            .arg("weir-janitor")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| HarnessError::Io {
                part,
                context: format!("starting the cleanup of {}", dir.display()),
                source,
            })?;
        Ok(Self { child: Some(child) })
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}
