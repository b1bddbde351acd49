//! `weir-worker validate`: exit 0 on a valid pipeline, exit 2 listing every problem with
//! its field path on an invalid one.

use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir-worker"))
}

#[test]
fn valid_example_pipeline_exits_zero() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/job-ingest.yaml");
    // The worker runs one EventPipeline: take it out of the example file.
    let text = std::fs::read_to_string(examples)?;
    let pipeline = text
        .split("\n---\n")
        .find(|doc| doc.contains("kind: EventPipeline"))
        .ok_or_else(|| anyhow::anyhow!("no pipeline in job-ingest.yaml"))?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, pipeline)?;
    let output = worker().arg("validate").arg("-f").arg(&file).output()?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn invalid_pipeline_exits_two_listing_every_problem() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {name: broken}
spec:
  source: {topics: []}
  sinks:
    - postgres:
        urlFrom: {env: DATABASE_URL}
        table: orders
        mode: Upsert
        keyColumns: [id]
        columns: [{name: id, type: bigint}]
  batch: {maxWait: soon}
  scaling: {minReplicas: 3, maxReplicas: 1}
"#,
    )?;
    let output = worker().arg("validate").arg("-f").arg(&file).output()?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for path in [
        "spec.source.topics",
        "spec.batch.maxWait",
        "spec.scaling.minReplicas",
    ] {
        assert!(stderr.contains(path), "{path} missing from:\n{stderr}");
    }
    Ok(())
}
