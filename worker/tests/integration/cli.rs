//! `weir-worker validate`: the worker's own start-up checks on every EventPipeline of a
//! file — exit 0 when all would start, exit 2 listing every problem with its field path —
//! and `run` on a file of several pipelines asks which one.

use std::path::PathBuf;
use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir-worker"))
}

fn examples() -> anyhow::Result<Vec<PathBuf>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// No example can claim what the engine lacks: each file's every pipeline passes the checks
/// `weir-worker run` makes before it starts (validate(), every CEL expression against the
/// worker's function table, every sink built from its spec).
#[test]
fn every_example_passes_the_workers_start_up_checks() -> anyhow::Result<()> {
    let mut checked = 0;
    for file in examples()? {
        let text = std::fs::read_to_string(&file)?;
        let pipelines = text.matches("kind: EventPipeline").count();
        if pipelines == 0 {
            continue;
        }
        let output = worker().arg("validate").arg("-f").arg(&file).output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}:\n{stderr}", file.display());
        assert_eq!(
            stderr.matches(" is valid (").count(),
            pipelines,
            "{}: not every pipeline was checked:\n{stderr}",
            file.display()
        );
        checked += pipelines;
    }
    assert!(checked >= 5, "only {checked} example pipelines found");
    Ok(())
}

#[test]
fn run_on_a_file_of_several_pipelines_says_how_to_pick_one() -> anyhow::Result<()> {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/todo-projection.yaml"
    );
    let output = worker()
        .args(["run", "--bootstrap-servers", "127.0.0.1:1", "-f", file])
        .env("WEIR_METRICS_ADDR", "127.0.0.1:0")
        .output()?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pick one with --pipeline NAME")
            && stderr.contains("todo-projection")
            && stderr.contains("todo-cache"),
        "{stderr}"
    );
    let output = worker()
        .args(["run", "--bootstrap-servers", "127.0.0.1:1", "-f", file])
        .args(["--pipeline", "nope"])
        .output()?;
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no EventPipeline named \"nope\""),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn a_function_the_worker_lacks_is_refused_before_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {name: hashing}
spec:
  source: {topics: [users]}
  transform:
    set:
      hash: md5(event.password)
  sinks:
    - sqlite:
        url: "sqlite::memory:"
        table: users
        columns: [{name: hash, type: text}]
"#,
    )?;
    let output = worker().arg("validate").arg("-f").arg(&file).output()?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("spec.transform.set[\"hash\"]") && stderr.contains("md5"),
        "{stderr}"
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
    - sqlite: {url: "sqlite::memory:", table: orders, columns: [{name: id, type: bigint}]}
  batch: {maxWait: soon}
  scaling: {minReplicas: 3, maxReplicas: 1}
  delivery: ExactlyOnce
"#,
    )?;
    let output = worker().arg("validate").arg("-f").arg(&file).output()?;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for path in [
        "spec.source.topics",
        "spec.batch.maxWait",
        "spec.scaling.minReplicas",
        "spec.delivery",
    ] {
        assert!(stderr.contains(path), "{path} missing from:\n{stderr}");
    }
    Ok(())
}
