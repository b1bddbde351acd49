//! Reading resources from YAML exactly as users write them for `kubectl apply`, with errors
//! that name the field: a misspelt or unknown field is an error, as under kubectl's strict
//! field validation, never silently dropped. Documents of other API groups in the same file
//! (the Secrets a pipeline reads, a ConfigMap) are skipped: they are Kubernetes' to check.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::problems::{FieldError, Problems};
use crate::{EventPipelineSpec, KafkaConnectionSpec, KafkaTopicSpec};

/// The API version of every Weir resource.
pub const API_VERSION: &str = "weir.dev/v1alpha1";
/// The API group of every Weir resource.
pub const API_GROUP: &str = "weir.dev";

/// The metadata fields Weir reads; the rest of metadata is accepted and ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// One resource document: apiVersion, kind, metadata and spec (status is ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

/// Any Weir resource. Read once per file and short-lived, so the size difference between
/// variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    KafkaConnection(Manifest<KafkaConnectionSpec>),
    KafkaTopic(Manifest<KafkaTopicSpec>),
    EventPipeline(Manifest<EventPipelineSpec>),
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::KafkaConnection(_) => "KafkaConnection",
            Resource::KafkaTopic(_) => "KafkaTopic",
            Resource::EventPipeline(_) => "EventPipeline",
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::KafkaConnection(m) => &m.metadata.name,
            Resource::KafkaTopic(m) => &m.metadata.name,
            Resource::EventPipeline(m) => &m.metadata.name,
        }
    }

    /// Runs the spec's own `validate()`.
    pub fn validate(&self) -> Result<(), Problems> {
        match self {
            Resource::KafkaConnection(m) => m.spec.validate(),
            Resource::KafkaTopic(m) => m.spec.validate(&m.metadata.name),
            Resource::EventPipeline(m) => m.spec.validate(),
        }
    }
}

/// A document that could not be read, with every problem found in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct LoadError {
    /// 1-based position of the document in the file.
    pub document: usize,
    pub problems: Problems,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}: {}", self.document, self.problems)
    }
}

/// `value` with every object's keys in sorted order. serde_json keeps insertion order when
/// any crate of a build enables its `preserve_order` feature (bson does), so YAML written
/// from a value — generated files, the worker's rendered pipeline file and its config
/// hash — would otherwise depend on which packages the build includes.
pub fn sorted_keys(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let sorted: std::collections::BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sorted_keys(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted_keys).collect()),
        other => other,
    }
}

/// Reads every Weir document of a multi-document YAML text. Empty documents and documents of
/// another API group (a Secret, a ConfigMap) are skipped; a document of group `weir.dev`
/// with an unknown kind or version is an error.
pub fn from_yaml(text: &str) -> Result<Vec<Resource>, LoadError> {
    let mut resources = Vec::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let position = i + 1;
        let value = serde_yaml_ng::Value::deserialize(document).map_err(|e| LoadError {
            document: position,
            problems: single("", format!("not valid YAML: {e}")),
        })?;
        if value.is_null() || of_another_group(&value) {
            continue;
        }
        let resource = from_value(value).map_err(|problems| LoadError {
            document: position,
            problems,
        })?;
        resources.push(resource);
    }
    Ok(resources)
}

/// Reads one document that must be of kind `S`'s resource, e.g. the pipeline file a worker
/// runs.
pub fn one_from_yaml(text: &str) -> Result<Resource, LoadError> {
    let mut resources = from_yaml(text)?;
    match resources.len() {
        1 => Ok(resources.remove(0)),
        n => Err(LoadError {
            document: 1,
            problems: single("", format!("expected exactly one resource, found {n}")),
        }),
    }
}

/// Whether a document names an apiVersion outside group `weir.dev` (`v1` is the core
/// group). A document without an apiVersion is not skipped: it is refused as malformed.
fn of_another_group(value: &serde_yaml_ng::Value) -> bool {
    let Some(api_version) = value.get("apiVersion").and_then(|v| v.as_str()) else {
        return false;
    };
    let group = api_version
        .rsplit_once('/')
        .map(|(group, _)| group)
        .unwrap_or_default();
    !api_version.is_empty() && group != API_GROUP
}

/// Reads one parsed document, dispatching on `kind`.
pub fn from_value(value: serde_yaml_ng::Value) -> Result<Resource, Problems> {
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if api_version != API_VERSION {
        return Err(single(
            "apiVersion",
            format!("is {api_version:?}; Weir resources use {API_VERSION:?}"),
        ));
    }
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    match kind.as_str() {
        "KafkaConnection" => typed(value).map(Resource::KafkaConnection),
        "KafkaTopic" => typed(value).map(Resource::KafkaTopic),
        "EventPipeline" => typed(value).map(Resource::EventPipeline),
        other => Err(single(
            "kind",
            format!(
                "{other:?} is not a Weir kind: use KafkaConnection, KafkaTopic or EventPipeline"
            ),
        )),
    }
}

fn typed<S: DeserializeOwned>(value: serde_yaml_ng::Value) -> Result<Manifest<S>, Problems> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| {
        let path = path.to_string();
        // Only the spec is strict; metadata and status carry many fields Weir does not read.
        if path.starts_with("spec.") {
            unknown.push(path);
        }
    };
    let ignored = serde_ignored::Deserializer::new(value, &mut record);
    let manifest: Manifest<S> = serde_path_to_error::deserialize(ignored).map_err(|e| {
        let path = e.path().to_string();
        single(&path, e.into_inner().to_string())
    })?;
    if !unknown.is_empty() {
        return Err(Problems(
            unknown
                .into_iter()
                .map(|path: String| unknown_field(&path))
                .collect(),
        ));
    }
    Ok(manifest)
}

/// serde_ignored writes sequence indexes as `.0`; users read `[0]`.
fn unknown_field(path: &str) -> FieldError {
    let mut pretty = String::new();
    for segment in path.split('.') {
        if !segment.is_empty() && segment.chars().all(|c| c.is_ascii_digit()) {
            pretty.push_str(&format!("[{segment}]"));
        } else {
            if !pretty.is_empty() {
                pretty.push('.');
            }
            pretty.push_str(segment);
        }
    }
    let field = pretty.rsplit('.').next().unwrap_or_default().to_owned();
    // `spec.sinks[N].<field>`: the field is where a sink kind goes.
    let parent_is_sink = pretty.rsplit_once('.').is_some_and(|(parent, _)| {
        parent
            .strip_prefix("spec.sinks[")
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|index| index.parse::<usize>().is_ok())
    });
    let message = if parent_is_sink {
        format!(
            "unknown sink kind {field:?}: use one of {}",
            crate::SINK_KINDS.join(", ")
        )
    } else {
        format!(
            "unknown field {field:?}: check its spelling and `kubectl explain` for the fields this resource has"
        )
    };
    FieldError {
        path: pretty,
        message,
    }
}

fn single(path: &str, message: String) -> Problems {
    let path = if path.is_empty() || path == "." {
        "(document)".to_owned()
    } else {
        path.to_owned()
    };
    Problems(vec![FieldError { path, message }])
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPIC: &str = "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {name: orders}\nspec: {partitions: 3}\n";

    #[test]
    fn documents_of_other_api_groups_are_skipped() -> Result<(), LoadError> {
        let text = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: db}}\nstringData: {{url: x}}\n---\n{TOPIC}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\nspec: {{}}\n"
        );
        let resources = from_yaml(&text)?;
        assert_eq!(resources.len(), 1);
        assert_eq!(resources[0].kind(), "KafkaTopic");
        assert_eq!(resources[0].name(), "orders");
        Ok(())
    }

    #[test]
    fn an_unknown_kind_in_the_weir_group_is_still_refused() {
        let text = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: db}}\n---\n{}",
            TOPIC.replace("KafkaTopic", "EventPipline")
        );
        let Err(error) = from_yaml(&text) else {
            panic!("a misspelt Weir kind was accepted");
        };
        assert_eq!(error.document, 2);
        assert_eq!(error.problems.0[0].path, "kind");
        assert!(
            error.problems.0[0]
                .message
                .contains("\"EventPipline\" is not a Weir kind"),
            "{error}"
        );
    }

    #[test]
    fn a_document_without_an_api_version_is_refused() {
        let Err(error) = from_yaml("kind: KafkaTopic\nmetadata: {name: t}\nspec: {}\n") else {
            panic!("a document without apiVersion was accepted");
        };
        assert_eq!(error.problems.0[0].path, "apiVersion");
    }
}
