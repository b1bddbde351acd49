//! `weir-worker quickstart`: the README's first command. The embedded broker is librdkafka's
//! mock cluster (the product's own local-use broker, not a test double); the SQLite file is
//! real. The expected rows are worked out by hand from examples/data/todo-events.jsonl.

use crate::common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::Context;
use common::wait_until;

/// The projected table as the quickstart prints it, one line per todo.
const EXPECTED_ROWS: &[&str] = &[
    "0b7d5c8e-4c59-4b1e-9d3e-2f1a6c7b8d01 | alice   | Write the quickstart guide | 2        | 2026-11-23T09:00:00Z | 3       | 2026-11-23T09:13:00Z |",
    "0b7d5c8e-4c59-4b1e-9d3e-2f1a6c7b8d02 | alice   | Review the pipeline spec   | 3        | 2026-11-23T09:01:00Z | 3       |                      | bob",
    "0b7d5c8e-4c59-4b1e-9d3e-2f1a6c7b8d04 | bob     | Upgrade Kafka              | 1        | 2026-11-23T09:03:00Z | 2       | 2026-11-23T09:08:00Z |",
    "0b7d5c8e-4c59-4b1e-9d3e-2f1a6c7b8d05 | carol   | Plan the sprint            | 3        | 2026-11-23T09:04:00Z | 2       |                      | alice",
    "0b7d5c8e-4c59-4b1e-9d3e-2f1a6c7b8d07 | carol   | Book the venue             | 1        | 2026-11-23T09:10:00Z | 3       |                      |",
];

fn quickstart(database: &std::path::Path) -> anyhow::Result<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir-worker"))
        .arg("quickstart")
        .arg("--database")
        .arg(database)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // A guard against a hang, not a speed target.
    let exited = wait_until("the quickstart to exit", Duration::from_secs(120), || {
        Ok(child.try_wait()?.map(|_| ()))
    });
    if exited.is_err() {
        let _ = child.kill();
    }
    let output = child.wait_with_output()?;
    exited.with_context(|| String::from_utf8_lossy(&output.stderr).into_owned())?;
    Ok(output)
}

/// The lines of the printed table (between its rule and the blank line after it).
fn table_rows(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("-----"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

fn count(stdout: &str, stage: &str) -> Option<u64> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(stage))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[test]
fn quickstart_projects_the_sample_and_a_second_run_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let database = dir.path().join("quickstart.db");

    let first = quickstart(&database)?;
    let stdout = String::from_utf8(first.stdout)?;
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        first.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        first.status
    );
    assert_eq!(table_rows(&stdout), EXPECTED_ROWS, "{stdout}");
    assert_eq!(count(&stdout, "loaded"), Some(17), "{stdout}");
    assert_eq!(count(&stdout, "consumed"), Some(17), "{stdout}");
    // The duplicated TodoCompleted (same eventId) is skipped by idempotency.
    assert_eq!(count(&stdout, "skipped"), Some(1), "{stdout}");
    assert_eq!(count(&stdout, "dead-lettered"), Some(1), "{stdout}");
    // The poison event: a priority that is not an integer, with the reason in its headers.
    assert!(stdout.contains("\"eventId\":\"evt-008\""), "{stdout}");
    assert!(
        stdout.contains(
            "weir.error.message=sink sqlite-0: column \"priority\": \"urgent\" is not an integer"
        ),
        "{stdout}"
    );

    let second = quickstart(&database)?;
    let stdout = String::from_utf8(second.stdout)?;
    assert!(second.status.success(), "{stdout}");
    assert_eq!(table_rows(&stdout), EXPECTED_ROWS, "{stdout}");
    // Every event but the poison one was applied by the first run.
    assert_eq!(count(&stdout, "skipped"), Some(16), "{stdout}");
    assert_eq!(count(&stdout, "dead-lettered"), Some(1), "{stdout}");
    Ok(())
}
