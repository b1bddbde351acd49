//! What a user installs beside the operator: the Grafana dashboard the chart ships queries
//! only metrics the operator and the worker expose, and every example file (resources plus
//! the Secrets they reference) is accepted as-is by the real API server on top of the
//! chart's CRDs, with strict field validation.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use kube::api::DynamicObject;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Every series name the two expositions can hold (histograms with their _bucket, _sum and
/// _count series), from their `# TYPE` lines.
fn exposed_metrics() -> BTreeSet<String> {
    let operator = weir_operator::metrics::Metrics::default().render();
    let worker = weir_worker::metrics::Metrics::new("p").render();
    let mut out = BTreeSet::new();
    for line in operator.lines().chain(worker.lines()) {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            out.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    out
}

/// Every `weir_…` identifier in the dashboard's queries and variables.
fn queried_metrics(dashboard: &Value, out: &mut BTreeSet<String>) {
    match dashboard {
        Value::String(text) => {
            let mut rest = text.as_str();
            while let Some(start) = rest.find("weir_") {
                let tail = &rest[start..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let preceded_by_word = rest[..start]
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                if !preceded_by_word {
                    out.insert(tail[..end].to_owned());
                }
                rest = &tail[end..];
            }
        }
        Value::Array(items) => items.iter().for_each(|i| queried_metrics(i, out)),
        Value::Object(map) => map
            .iter()
            .filter(|(key, _)| *key != "uid" && *key != "title")
            .for_each(|(_, v)| queried_metrics(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_metrics_the_code_exposes() -> anyhow::Result<()> {
    let path = repo().join("charts/weir/dashboards/weir.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut queried = BTreeSet::new();
    queried_metrics(&dashboard, &mut queried);
    let exposed = exposed_metrics();
    let unknown: Vec<&String> = queried.difference(&exposed).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries {unknown:?}, which no code exposes (exposed: {exposed:?})"
    );
    for needed in [
        "weir_consumer_lag",
        "weir_records_consumed_total",
        "weir_records_dead_lettered_total",
        "weir_sink_records_written_total",
        "weir_operator_reconcile_errors_total",
    ] {
        assert!(
            queried.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    Ok(())
}

fn example_files() -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("examples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Secret names an object references (`secretKeyRef`, `caCert`, `passwordSecretRef` ...).
fn referenced_secrets(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let is_selector = key == "secretKeyRef"
                    || key.ends_with("SecretRef")
                    || matches!(key.as_str(), "caCert" | "clientCert" | "clientKey");
                if is_selector && let Some(name) = child["name"].as_str() {
                    out.insert(name.to_owned());
                }
                referenced_secrets(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| referenced_secrets(i, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_example_installs_as_is_with_the_secrets_it_references() -> anyhow::Result<()> {
    let server = weir_testkit::KubeApiServer::shared().await?;
    server
        .install_crds(&repo().join("crds"))
        .await
        .context("installing the CRDs the chart installs")?;
    let client = server.admin_client()?;
    for path in example_files()? {
        let text = std::fs::read_to_string(&path)?;
        let what = path.display().to_string();
        let objects: Vec<DynamicObject> = weir_testkit::kube::yaml_documents(&text, &what)?;
        // Each file carries every Secret it references.
        let mut referenced = BTreeSet::new();
        let mut provided = BTreeSet::new();
        for object in &objects {
            let value = serde_json::to_value(object)?;
            if value["kind"] == "Secret" {
                provided.insert(object.metadata.name.clone().unwrap_or_default());
            } else {
                referenced_secrets(&value["spec"], &mut referenced);
            }
        }
        let missing: Vec<&String> = referenced.difference(&provided).collect();
        assert!(
            missing.is_empty(),
            "{what} references Secrets it does not provide: {missing:?}"
        );

        let namespace = server.create_namespace("example").await?;
        let connection = std::fs::read_to_string(repo().join("examples/connection.yaml"))?;
        for object in
            weir_testkit::kube::yaml_documents::<DynamicObject>(&connection, "connection.yaml")?
                .into_iter()
                .chain(objects)
        {
            let name = object.metadata.name.clone().unwrap_or_default();
            weir_testkit::kube::apply(&client, &namespace, &object, "kubectl")
                .await
                .with_context(|| format!("{what}: the API server refused {name}"))?;
        }
    }
    Ok(())
}
