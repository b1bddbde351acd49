//! The chart rendered by Helm's own Go SDK (helm-python-sdk, installed by
//! scripts/install-test-deps.sh, through testkit/helm/render.py), kubectl built from the
//! API server's Go module, and what the chart tests share.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::Client;
use kube::api::DynamicObject;
use serde::Deserialize as _;
use serde_json::{Value, json};
use weir_operator::rbac::RULES;

pub const HELM_SDK_VERSION: &str = "0.2.2";

/// What Helm made of the chart.
#[derive(Debug)]
pub struct Rendered {
    pub lint: Value,
    /// Every object, in the order of the template files.
    pub documents: Vec<Value>,
    /// NOTES.txt as Helm prints it after an install.
    pub notes: String,
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Renders the chart; `Err` of the inner result is the schema's refusal of `values`.
pub fn try_render(
    release: &str,
    namespace: &str,
    values: &Value,
) -> anyhow::Result<Result<Rendered, String>> {
    let python = weir_testkit::tools_dir()
        .join(format!("helm-python-{HELM_SDK_VERSION}"))
        .join("bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} is missing: run scripts/install-test-deps.sh (it installs helm-python-sdk)",
        python.display()
    );
    let output = Command::new(&python)
        .arg(repo().join("testkit/helm/render.py"))
        .arg(repo().join("charts/weir"))
        .args([release, namespace, &values.to_string()])
        .output()?;
    let result: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "helm render failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    if let Some(refusal) = result["values_error"].as_str() {
        return Ok(Err(refusal.to_owned()));
    }
    anyhow::ensure!(
        output.status.success(),
        "helm render failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut documents = Vec::new();
    let mut notes = String::new();
    for (path, text) in result["manifests"].as_object().cloned().unwrap_or_default() {
        let text = text.as_str().unwrap_or_default();
        if path.ends_with("NOTES.txt") {
            notes = text.to_owned();
            continue;
        }
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let value = Value::deserialize(document).with_context(|| path.clone())?;
            if !value.is_null() {
                documents.push(value);
            }
        }
    }
    Ok(Ok(Rendered {
        lint: result["lint"].clone(),
        documents,
        notes,
    }))
}

/// Renders the chart, which must accept `values`.
pub fn render(release: &str, namespace: &str, values: &Value) -> anyhow::Result<Rendered> {
    try_render(release, namespace, values)?
        .map_err(|refusal| anyhow::anyhow!("the chart's schema refused {values}: {refusal}"))
}

pub fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents
        .iter()
        .filter(|d| d["kind"] == json!(kind))
        .collect()
}

pub type Grant = (String, String, String);

/// Every (group, resource, verb) that `rules` grant.
pub fn grants(rules: &[PolicyRule]) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    for rule in rules {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

/// Every (group, resource, verb) of `weir_operator::rbac::RULES` whose group `keep` admits.
pub fn code_grants(keep: impl Fn(&str) -> bool) -> BTreeSet<Grant> {
    RULES
        .iter()
        .filter(|rule| keep(rule.group))
        .flat_map(|rule| {
            rule.resources.iter().flat_map(move |r| {
                rule.verbs
                    .iter()
                    .map(move |v| (rule.group.to_owned(), (*r).to_owned(), (*v).to_owned()))
            })
        })
        .collect()
}

/// Deserializes every rendered object into its k8s-openapi type (or Weir's), proving the
/// chart writes no field the type lacks only where serde would tell; the API server's strict
/// validation then checks the rest.
pub fn typed_check(document: &Value) -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let kind = document["kind"].as_str().unwrap_or_default();
    let value = document.clone();
    let what = || format!("{kind} {}", document["metadata"]["name"]);
    match kind {
        "CustomResourceDefinition" => {
            serde_json::from_value::<CustomResourceDefinition>(value).with_context(what)?;
        }
        "Namespace" => {
            serde_json::from_value::<Namespace>(value).with_context(what)?;
        }
        "ServiceAccount" => {
            serde_json::from_value::<ServiceAccount>(value).with_context(what)?;
        }
        "ClusterRole" => {
            serde_json::from_value::<ClusterRole>(value).with_context(what)?;
        }
        "ClusterRoleBinding" => {
            serde_json::from_value::<ClusterRoleBinding>(value).with_context(what)?;
        }
        "Role" => {
            serde_json::from_value::<Role>(value).with_context(what)?;
        }
        "RoleBinding" => {
            serde_json::from_value::<RoleBinding>(value).with_context(what)?;
        }
        "Deployment" => {
            serde_json::from_value::<Deployment>(value).with_context(what)?;
        }
        "Service" => {
            serde_json::from_value::<Service>(value).with_context(what)?;
        }
        "ConfigMap" => {
            serde_json::from_value::<ConfigMap>(value).with_context(what)?;
        }
        "KafkaConnection" => {
            serde_json::from_value::<weir_crds::KafkaConnection>(value).with_context(what)?;
        }
        // No k8s-openapi type: prometheus-operator's kinds are checked field by field by
        // the chart tests.
        "ServiceMonitor" | "PodMonitor" => {}
        other => anyhow::bail!("the chart renders a {other}, which the tests do not know"),
    }
    Ok(())
}

/// Server-side applies `documents` (CRDs first, as Helm installs them) with strict field
/// validation as `manager`; a namespaced object without a namespace goes to `namespace`.
pub async fn apply_all(
    client: &Client,
    namespace: &str,
    documents: &[Value],
    manager: &str,
) -> anyhow::Result<()> {
    let mut ordered: Vec<&Value> = of_kind(documents, "CustomResourceDefinition");
    ordered.extend(
        documents
            .iter()
            .filter(|d| d["kind"] != json!("CustomResourceDefinition")),
    );
    for document in ordered {
        let object: DynamicObject = serde_json::from_value(document.clone())?;
        let name = object.metadata.name.clone().unwrap_or_default();
        let target = object.metadata.namespace.clone();
        weir_testkit::kube::apply(
            client,
            target.as_deref().unwrap_or(namespace),
            &object,
            manager,
        )
        .await
        .with_context(|| format!("the API server refused {} {name}", document["kind"]))?;
        if document["kind"] == "CustomResourceDefinition" {
            wait_established(client, &name).await?;
        }
    }
    Ok(())
}

/// Waits until a CRD's kinds are served.
pub async fn wait_established(client: &Client, name: &str) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    weir_testkit::wait_for(
        "the CRD to be Established",
        std::time::Duration::from_secs(30),
        || {
            let crds = crds.clone();
            async move {
                let crd = crds.get_opt(name).await.ok().flatten()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{name}: {e}"))
}

/// The kubectl of the API server's Go module (testkit/kube/build.sh builds it once into the
/// tools directory; a warm run returns at once).
pub fn kubectl() -> anyhow::Result<PathBuf> {
    let go_mod = std::fs::read_to_string(repo().join("testkit/kube/go.mod"))?;
    let version = go_mod
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes v"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no k8s.io/kubernetes version in testkit/kube/go.mod")?
        .to_owned();
    let path = weir_testkit::tools_dir()
        .join(format!("kube-{version}"))
        .join("bin/kubectl");
    if !path.exists() {
        let status = Command::new(repo().join("testkit/kube/build.sh")).status()?;
        anyhow::ensure!(status.success(), "testkit/kube/build.sh failed");
    }
    anyhow::ensure!(
        path.exists(),
        "{} is missing after the build",
        path.display()
    );
    Ok(path)
}
