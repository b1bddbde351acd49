//! Every file in examples/ loads into the Rust types, passes `validate()`, and validates
//! against the OpenAPI schema of the generated CRD YAML that `kubectl apply` would use; the
//! Secrets beside them are real Secrets holding placeholders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every document of a YAML file as JSON.
fn documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The committed CRDs' schemas by kind, compiled as JSON Schema.
fn schemas() -> anyhow::Result<BTreeMap<String, jsonschema::Validator>> {
    let mut validators = BTreeMap::new();
    for path in yaml_files(&repo().join("crds"))? {
        for crd in documents(&path)? {
            let kind = crd["spec"]["names"]["kind"]
                .as_str()
                .context("CRD without a kind")?
                .to_owned();
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            let validator = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft4)
                .build(schema)
                .with_context(|| format!("compiling the schema of {kind}"))?;
            validators.insert(kind, validator);
        }
    }
    anyhow::ensure!(
        validators.len() == 3,
        "expected 3 CRDs, found {validators:?}"
    );
    Ok(validators)
}

/// Schema violations of one document, as "path: message" lines.
fn schema_errors(validators: &BTreeMap<String, jsonschema::Validator>, doc: &Value) -> Vec<String> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let Some(validator) = validators.get(kind) else {
        return vec![format!("no CRD for kind {kind:?}")];
    };
    validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn every_example_loads_and_validates() -> anyhow::Result<()> {
    let files = yaml_files(&repo().join("examples"))?;
    assert!(
        files.len() >= 6,
        "expected the examples of every job, found {files:?}"
    );
    let mut kinds = BTreeMap::<&str, usize>::new();
    for path in &files {
        let text = std::fs::read_to_string(path)?;
        let resources = weir_crds::load::from_yaml(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        anyhow::ensure!(
            !resources.is_empty(),
            "{} holds no resource",
            path.display()
        );
        for resource in &resources {
            resource
                .validate()
                .map_err(|e| anyhow::anyhow!("{} {}: {e}", path.display(), resource.name()))?;
            *kinds.entry(resource.kind()).or_default() += 1;
        }
    }
    assert!(kinds.get("KafkaConnection") >= Some(&1), "{kinds:?}");
    assert!(kinds.get("KafkaTopic") >= Some(&12), "{kinds:?}");
    assert!(kinds.get("EventPipeline") >= Some(&5), "{kinds:?}");
    Ok(())
}

#[test]
fn every_example_deserializes_into_the_kube_resource_types() -> anyhow::Result<()> {
    for path in yaml_files(&repo().join("examples"))? {
        for doc in documents(&path)? {
            let name = format!("{} {}", path.display(), doc["metadata"]["name"]);
            match doc["kind"].as_str() {
                Some("KafkaConnection") => {
                    serde_json::from_value::<weir_crds::KafkaConnection>(doc).context(name)?;
                }
                Some("KafkaTopic") => {
                    serde_json::from_value::<weir_crds::KafkaTopic>(doc).context(name)?;
                }
                Some("EventPipeline") => {
                    serde_json::from_value::<weir_crds::EventPipeline>(doc).context(name)?;
                }
                Some("Secret") => {
                    let secret: k8s_openapi::api::core::v1::Secret =
                        serde_json::from_value(doc).context(name.clone())?;
                    let values = secret.string_data.unwrap_or_default();
                    anyhow::ensure!(
                        !values.is_empty() && values.values().all(|v| v.contains("CHANGE-ME")),
                        "{name}: an example Secret holds placeholders only, marked CHANGE-ME"
                    );
                }
                other => anyhow::bail!("{name}: unexpected kind {other:?}"),
            }
        }
    }
    Ok(())
}

#[test]
fn every_example_validates_against_the_generated_crd_schema() -> anyhow::Result<()> {
    let validators = schemas()?;
    for path in yaml_files(&repo().join("examples"))? {
        for doc in documents(&path)? {
            if doc["apiVersion"] == "v1" {
                continue; // a Secret: the API server's own schema, checked by the install test
            }
            let errors = schema_errors(&validators, &doc);
            assert!(
                errors.is_empty(),
                "{} {}: {errors:#?}",
                path.display(),
                doc["metadata"]["name"]
            );
        }
    }
    Ok(())
}

/// The schema itself refuses what the API server must refuse at apply time.
#[test]
fn generated_schema_refuses_invalid_resources_with_their_path() -> anyhow::Result<()> {
    let validators = schemas()?;
    let pipeline = || -> anyhow::Result<Value> {
        documents(&repo().join("examples/job-ingest.yaml"))?
            .into_iter()
            .find(|d| d["kind"] == "EventPipeline")
            .context("no pipeline in job-ingest.yaml")
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            serde_json::json!({
                "apiVersion": "weir.dev/v1alpha1", "kind": "KafkaTopic",
                "metadata": {"name": "t"}, "spec": {"partitions": 0}
            }),
            "/spec/partitions",
        ),
        (
            {
                let mut p = pipeline()?;
                p["spec"]["source"]["topics"] = serde_json::json!([]);
                p
            },
            "/spec/source/topics",
        ),
        (
            {
                let mut p = pipeline()?;
                p["spec"]["batch"] = serde_json::json!({"maxWait": "30 seconds"});
                p
            },
            "/spec/batch/maxWait",
        ),
        (
            {
                let mut p = pipeline()?;
                p["spec"]["delivery"] = serde_json::json!("Sometimes");
                p
            },
            "/spec/delivery",
        ),
        (
            {
                let mut p = pipeline()?;
                p["spec"]["scaling"]["minReplicas"] = serde_json::json!(-1);
                p
            },
            "/spec/scaling/minReplicas",
        ),
    ];
    for (doc, path) in cases {
        let errors = schema_errors(&validators, &doc);
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{path}:"))),
            "expected a schema error at {path}, got {errors:#?}"
        );
    }
    Ok(())
}

/// Rules only the API server's CEL evaluation enforces are present in the generated schema.
#[test]
fn generated_crds_carry_the_apply_time_rules() -> anyhow::Result<()> {
    let text = |name: &str| std::fs::read_to_string(repo().join("crds").join(name));
    let topics = text("kafkatopics.weir.dev.yaml")?;
    assert!(topics.contains("self.topicName == oldSelf.topicName"));
    let pipelines = text("eventpipelines.weir.dev.yaml")?;
    assert!(pipelines.contains("self.minReplicas <= self.maxReplicas"));
    assert!(pipelines.contains("(has(self.postgres) ? 1 : 0) + (has(self.mysql) ? 1 : 0)"));
    // CEL rules inside lists are costed per item: the API server refuses them without bounds.
    assert!(pipelines.contains("maxItems: 16"));
    assert!(pipelines.contains("specReplicasPath: .spec.replicas"));
    for crd in ["kafkaconnections", "kafkatopics", "eventpipelines"] {
        let yaml = text(&format!("{crd}.weir.dev.yaml"))?;
        assert!(yaml.contains("status: {}"), "{crd}: no status subresource");
        assert!(yaml.contains("- weir"), "{crd}: not in category weir");
        assert!(
            !yaml.contains("Auto-generated"),
            "{crd}: generator text in kubectl explain"
        );
    }
    Ok(())
}
