//! `weir-worker run --embedded-broker`: with nothing installed, the worker starts its own
//! development broker with the pipeline's topics and runs. On a terminal (a pseudo-terminal
//! made by util-linux `script`) it keeps a one-line status — consumed/s, written/s, lag,
//! dead-lettered — and piped it writes plain log lines only.

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PIPELINE: &str = r#"apiVersion: weir.dev/v1alpha1
kind: KafkaTopic
metadata: {name: events}
spec: {partitions: 2}
---
apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {name: local}
spec:
  source: {topics: [events]}
  sinks:
    - sqlite:
        url: sqlite://DB
        table: events
        columns: [{name: id, type: bigint}]
  deadLetter: {topic: events-dlq}
"#;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `command` until its output contains `wanted` (or 60 s pass); returns the output.
fn output_until(mut command: Command, wanted: &str) -> anyhow::Result<String> {
    let mut child = Killed(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
    );
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let stderr = child
        .0
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for mut pipe in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buffer) {
                if n == 0 || tx.send(buffer[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
    }
    let start = Instant::now();
    let mut text = String::new();
    while !text.contains(wanted) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "{wanted:?} never appeared in:\n{text}"
        );
        if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    Ok(text)
}

#[test]
fn on_a_terminal_a_status_line_and_piped_plain_logs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        PIPELINE.replace("DB", &dir.path().join("local.db").display().to_string()),
    )?;
    let worker = env!("CARGO_BIN_EXE_weir-worker");
    let port = weir_testkit::free_port("worker metrics")?;
    let args = format!(
        "{worker} run -f {} --embedded-broker --metrics-addr 127.0.0.1:{port} --log-format text",
        file.display()
    );

    // A terminal: the status line appears (redrawn every second).
    let mut tty = Command::new("script");
    tty.args(["-qfec", &args, "/dev/null"]);
    let text = output_until(tty, "dead-lettered")?;
    assert!(
        text.contains("local: consumed 0/s · written 0/s · lag 0 · dead-lettered 0"),
        "{text}"
    );

    // Piped: the embedded broker announces itself, and no status line is drawn.
    let port = weir_testkit::free_port("worker metrics")?;
    let mut piped = Command::new(worker);
    piped.args(["run", "-f"]).arg(&file).args([
        "--embedded-broker",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--log-format",
        "text",
    ]);
    let text = output_until(piped, "consuming")?;
    assert!(
        text.contains("embedded development broker started"),
        "{text}"
    );
    assert!(text.contains("for local use only"), "{text}");
    assert!(
        !text.contains("written 0/s"),
        "a status line was drawn on a pipe:\n{text}"
    );
    Ok(())
}
