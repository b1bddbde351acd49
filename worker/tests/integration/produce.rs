//! `weir-worker produce` against the harness's real Kafka broker: CSV and JSON Lines in,
//! the right number of events with the right keys out; a malformed line is reported with
//! its line number and either stops the load or is skipped, per `--on-bad-line`.

use crate::common;

use std::process::{Command, Output};

use common::read_keyed;
use serde_json::json;
use weir_testkit::TestKafka;

fn produce(kafka: &TestKafka, topic: &str, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_weir-worker"))
        .arg("produce")
        .args(["--topic", topic, "--bootstrap-servers", kafka.bootstrap()])
        .args(args)
        .output()?)
}

fn sorted(
    mut records: Vec<(Option<String>, serde_json::Value)>,
) -> Vec<(Option<String>, serde_json::Value)> {
    records.sort_by_key(|(key, _)| key.clone());
    records
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_rows_become_keyed_events_and_a_bad_line_stops_or_is_skipped() -> anyhow::Result<()> {
    let kafka = TestKafka::shared()?;
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("users.csv");
    std::fs::write(
        &csv,
        "email,name,plan\nann@example.com,Ann,pro\nbo@example.com,\"Bo, Jr.\",\ncy@example.com,Cy\ndee@example.com,Dee,free\n",
    )?;

    // Default: the short line 4 stops the load, naming the line and the way around it.
    let topic = kafka.create_topic("users-fail", 3, &[]).await?;
    let failed = produce(
        &kafka,
        &topic,
        &["--csv", csv.to_str().unwrap_or_default(), "--key", "email"],
    )?;
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 4: 2 fields where the header has 3"),
        "{stderr}"
    );
    assert!(stderr.contains("--on-bad-line skip"), "{stderr}");

    // Skipping: the other three land, keyed by email, empty fields as null.
    let topic = kafka.create_topic("users-skip", 3, &[]).await?;
    let skipped = produce(
        &kafka,
        &topic,
        &[
            "--csv",
            csv.to_str().unwrap_or_default(),
            "--key",
            "email",
            "--on-bad-line",
            "skip",
        ],
    )?;
    let stdout = String::from_utf8_lossy(&skipped.stdout);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 4: 2 fields where the header has 3"),
        "{stderr}"
    );
    assert_eq!(
        stdout.trim(),
        format!("produced 3 events to {topic} (1 bad lines skipped)")
    );
    assert_eq!(
        sorted(read_keyed(&kafka, &topic, 3)?),
        vec![
            (
                Some("ann@example.com".into()),
                json!({"email": "ann@example.com", "name": "Ann", "plan": "pro"})
            ),
            (
                Some("bo@example.com".into()),
                json!({"email": "bo@example.com", "name": "Bo, Jr.", "plan": null})
            ),
            (
                Some("dee@example.com".into()),
                json!({"email": "dee@example.com", "name": "Dee", "plan": "free"})
            ),
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_are_produced_with_keys_from_a_nested_field() -> anyhow::Result<()> {
    let kafka = TestKafka::shared()?;
    let dir = tempfile::tempdir()?;
    let jsonl = dir.path().join("events.jsonl");
    let mut text = String::new();
    for i in 0..500 {
        text.push_str(&format!(
            "{{\"type\": \"Seen\", \"payload\": {{\"userId\": \"u{}\", \"n\": {i}}}}}\n",
            i % 7
        ));
    }
    text.push_str("\n{not json\n");
    std::fs::write(&jsonl, text)?;
    let topic = kafka.create_topic("events", 4, &[]).await?;
    let output = produce(
        &kafka,
        &topic,
        &[
            "--jsonl",
            jsonl.to_str().unwrap_or_default(),
            "--key",
            "payload.userId",
            "--on-bad-line",
            "skip",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("line 502: not JSON"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("produced 500 events to {topic} (1 bad lines skipped)")
    );
    let records = read_keyed(&kafka, &topic, 500)?;
    assert_eq!(records.len(), 500);
    for (key, value) in &records {
        assert_eq!(
            key.as_deref(),
            value["payload"]["userId"].as_str(),
            "{value}"
        );
    }
    // Every event arrived once.
    let mut seen: Vec<i64> = records
        .iter()
        .filter_map(|(_, v)| v["payload"]["n"].as_i64())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..500).collect::<Vec<_>>());
    Ok(())
}
