//! deploy/ with the real kubectl (built from the API server's Go module, kustomize inside):
//! the kustomize base renders exactly the single-file bundle, the example overlay renders
//! its changes, every object deserializes into its k8s-openapi type, and both apply to the
//! real API server as the README shows them (`kubectl apply --server-side -f
//! deploy/bundle.yaml`, `kubectl apply --server-side -k deploy/overlays/example`). That the
//! bundle is what the generator renders from the chart is the drift check's job
//! (`cargo xtask check`, xtask/tests/generated_files.rs).

use crate::helm;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde::Deserialize as _;
use serde_json::Value;

fn kubectl(args: &[&str], kubeconfig: Option<&Path>) -> anyhow::Result<String> {
    let mut command = Command::new(helm::kubectl()?);
    command.current_dir(helm::repo()).args(args);
    if let Some(kubeconfig) = kubeconfig {
        command.arg("--kubeconfig").arg(kubeconfig);
    }
    let output = command.output()?;
    anyhow::ensure!(
        output.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Objects by (kind, namespace, name).
fn objects(yaml: &str) -> anyhow::Result<BTreeMap<(String, String, String), Value>> {
    let mut out = BTreeMap::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = Value::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        helm::typed_check(&value)?;
        let key = (
            value["kind"].as_str().unwrap_or_default().to_owned(),
            value["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        anyhow::ensure!(out.insert(key.clone(), value).is_none(), "{key:?} twice");
    }
    Ok(out)
}

/// kustomize writes `1.0` where serde writes `1`: compare numbers by value.
fn numbers_as_floats(value: Value) -> Value {
    match value {
        Value::Number(n) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Number(n), Value::Number),
        Value::Array(items) => Value::Array(items.into_iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, numbers_as_floats(v)))
                .collect(),
        ),
        other => other,
    }
}

#[tokio::test]
async fn the_bundle_and_the_kustomize_overlay_render_and_apply_with_kubectl() -> anyhow::Result<()>
{
    let bundle = objects(&std::fs::read_to_string(
        helm::repo().join("deploy/bundle.yaml"),
    )?)?;
    let base = objects(&kubectl(&["kustomize", "deploy/base"], None)?)?;
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        bundle.keys().collect::<Vec<_>>(),
        "the kustomize base and the bundle hold different objects"
    );
    for (key, object) in &bundle {
        assert!(
            base.get(key).cloned().map(numbers_as_floats)
                == Some(numbers_as_floats(object.clone())),
            "kustomize renders {key:?} differently from the bundle:\n{}\n{}",
            serde_json::to_string(object)?,
            serde_json::to_string(&base[key])?
        );
    }
    let kinds: Vec<&str> = bundle.keys().map(|(kind, ..)| kind.as_str()).collect();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "Deployment",
    ] {
        assert!(kinds.contains(&kind), "the bundle has no {kind}: {kinds:?}");
    }

    let overlay = objects(&kubectl(&["kustomize", "deploy/overlays/example"], None)?)?;
    let key = (
        "Deployment".to_owned(),
        "weir-system".to_owned(),
        "weir-operator".to_owned(),
    );
    let deployment: Deployment =
        serde_json::from_value(overlay.get(&key).context("no operator Deployment")?.clone())?;
    let spec = deployment.spec.unwrap_or_default();
    assert_eq!(spec.replicas, Some(3));
    let container = &spec.template.spec.unwrap_or_default().containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("ghcr.io/weir-dev/weir-operator:0.1.0")
    );
    let worker_image = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WEIR_WORKER_IMAGE")
        .and_then(|e| e.value.clone());
    assert_eq!(
        worker_image.as_deref(),
        Some("ghcr.io/weir-dev/weir-worker:0.1.0")
    );

    let server = weir_testkit::KubeApiServer::shared().await?;
    let kubeconfig = Some(server.kubeconfig());
    kubectl(
        &["apply", "--server-side", "-f", "deploy/bundle.yaml"],
        kubeconfig,
    )?;
    kubectl(
        &["apply", "--server-side", "-k", "deploy/overlays/example"],
        kubeconfig,
    )?;
    let deployments: Api<Deployment> = Api::namespaced(server.admin_client()?, "weir-system");
    let stored = deployments.get("weir-operator").await?;
    assert_eq!(
        stored.spec.and_then(|s| s.replicas),
        Some(3),
        "the overlay applied over the bundle"
    );
    Ok(())
}
