//! The Helm chart, rendered by Helm's own Go SDK (helm-python-sdk, installed by
//! scripts/install-test-deps.sh): it lints without errors, its values do what they say, its
//! ClusterRole grants exactly `weir_operator::rbac::RULES`, and everything it renders is
//! accepted by the real API server.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::DynamicObject;
use serde::Deserialize as _;
use serde_json::{Value, json};
use weir_operator::rbac::RULES;
use weir_testkit::kube::apply;

const HELM_SDK_VERSION: &str = "0.2.2";

/// Lints and renders the chart: (lint report, every rendered document).
fn render(release: &str, namespace: &str, values: &Value) -> anyhow::Result<(Value, Vec<Value>)> {
    let python = weir_testkit::tools_dir()
        .join(format!("helm-python-{HELM_SDK_VERSION}"))
        .join("bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} is missing: run scripts/install-test-deps.sh (it installs helm-python-sdk)",
        python.display()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(&python)
        .arg(root.join("testkit/helm/render.py"))
        .arg(root.join("charts/weir"))
        .args([release, namespace, &values.to_string()])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "helm render failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout)?;
    let mut documents = Vec::new();
    let manifests = result["manifests"].as_object().cloned().unwrap_or_default();
    for (path, text) in manifests {
        for document in serde_yaml_ng::Deserializer::from_str(text.as_str().unwrap_or_default()) {
            let value = Value::deserialize(document).with_context(|| path.clone())?;
            if !value.is_null() {
                documents.push(value);
            }
        }
    }
    Ok((result["lint"].clone(), documents))
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents
        .iter()
        .filter(|d| d["kind"] == json!(kind))
        .collect()
}

#[tokio::test]
async fn the_chart_lints_renders_and_is_accepted_by_the_api_server() -> anyhow::Result<()> {
    let (lint, documents) = render("weir", "weir-system", &json!({}))?;
    assert_eq!(lint["errors"], json!([]), "lint: {lint}");
    let severe: Vec<&Value> = lint["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["severity"].as_i64().unwrap_or(0) > 1)
        .collect();
    assert!(severe.is_empty(), "lint warnings or errors: {severe:?}");

    // Three CRDs, and the operator with its identity and role.
    assert_eq!(of_kind(&documents, "CustomResourceDefinition").len(), 3);
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    ] {
        assert_eq!(of_kind(&documents, kind).len(), 1, "{kind}");
    }
    let role: ClusterRole = serde_json::from_value(of_kind(&documents, "ClusterRole")[0].clone())?;
    let granted: BTreeSet<(String, String, String)> = role
        .rules
        .unwrap_or_default()
        .into_iter()
        .flat_map(|rule| {
            let groups = rule.api_groups.unwrap_or_default();
            let resources = rule.resources.unwrap_or_default();
            let verbs = rule.verbs;
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |r| {
                    let g = g.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |v| (g.clone(), r.clone(), v))
                })
            })
        })
        .collect();
    let used: BTreeSet<(String, String, String)> = RULES
        .iter()
        .flat_map(|rule| {
            rule.resources.iter().flat_map(move |r| {
                rule.verbs
                    .iter()
                    .map(move |v| (rule.group.to_owned(), (*r).to_owned(), (*v).to_owned()))
            })
        })
        .collect();
    assert_eq!(
        granted, used,
        "the rendered ClusterRole differs from operator/src/rbac.rs"
    );

    let deployment: Deployment =
        serde_json::from_value(of_kind(&documents, "Deployment")[0].clone())?;
    let spec = deployment.spec.clone().unwrap_or_default();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap_or_default();
    assert_eq!(pod.service_account_name.as_deref(), Some("weir-operator"));
    let container = &pod.containers[0];
    assert_eq!(container.args.as_deref(), Some(&["run".to_owned()][..]));
    let security = container.security_context.clone().unwrap_or_default();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let env: Vec<String> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    for name in [
        "POD_NAME",
        "POD_NAMESPACE",
        "WEIR_WORKER_IMAGE",
        "WEIR_WATCH_NAMESPACES",
    ] {
        assert!(
            env.contains(&name.to_owned()),
            "{name} missing from {env:?}"
        );
    }

    // Everything applies to the real API server (CRDs first, as Helm installs them).
    let server = weir_testkit::KubeApiServer::shared().await?;
    let client = server.admin_client()?;
    let namespace = server.create_namespace("weir-system").await?;
    let mut ordered: Vec<&Value> = of_kind(&documents, "CustomResourceDefinition");
    ordered.extend(
        documents
            .iter()
            .filter(|d| d["kind"] != json!("CustomResourceDefinition")),
    );
    for document in ordered {
        let mut object: DynamicObject = serde_json::from_value(document.clone())?;
        if object.metadata.namespace.is_some() {
            object.metadata.namespace = Some(namespace.clone());
        }
        let name = object.metadata.name.clone().unwrap_or_default();
        apply(&client, &namespace, &object, "helm")
            .await
            .with_context(|| format!("the API server refused {} {name}", document["kind"]))?;
    }
    Ok(())
}

#[test]
fn values_switch_crds_off_and_set_the_watched_namespaces() -> anyhow::Result<()> {
    let values = json!({
        "crds": {"install": false},
        "operator": {"watchNamespaces": ["shop", "billing"], "replicas": 3},
    });
    let (_, documents) = render("prod", "ops", &values)?;
    assert!(of_kind(&documents, "CustomResourceDefinition").is_empty());
    let deployment: Deployment =
        serde_json::from_value(of_kind(&documents, "Deployment")[0].clone())?;
    assert_eq!(deployment.metadata.name.as_deref(), Some("prod-operator"));
    assert_eq!(deployment.metadata.namespace.as_deref(), Some("ops"));
    let spec = deployment.spec.unwrap_or_default();
    assert_eq!(spec.replicas, Some(3));
    let env = spec.template.spec.unwrap_or_default().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let watched = env
        .iter()
        .find(|e| e.name == "WEIR_WATCH_NAMESPACES")
        .and_then(|e| e.value.clone());
    assert_eq!(watched.as_deref(), Some("shop,billing"));
    Ok(())
}
