//! Reading the pipeline file a worker runs: the EventPipeline resource exactly as a user
//! applies it to Kubernetes.

use std::path::{Path, PathBuf};

use weir_crds::{EventPipelineSpec, Manifest, Problems, Resource};

/// Why a pipeline file cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Load {
        path: PathBuf,
        source: weir_crds::LoadError,
    },
    #[error("{path}: is a {kind}, but the worker runs an EventPipeline")]
    WrongKind { path: PathBuf, kind: &'static str },
    #[error("{path}: EventPipeline {name:?} is invalid, {problems}")]
    Invalid {
        path: PathBuf,
        name: String,
        problems: Problems,
    },
}

/// Reads and validates the EventPipeline in `path`.
pub fn load_pipeline(path: &Path) -> Result<Manifest<EventPipelineSpec>, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.to_owned(),
        source,
    })?;
    let resource = weir_crds::load::one_from_yaml(&text).map_err(|source| SpecError::Load {
        path: path.to_owned(),
        source,
    })?;
    let Resource::EventPipeline(manifest) = resource else {
        return Err(SpecError::WrongKind {
            path: path.to_owned(),
            kind: resource.kind(),
        });
    };
    manifest
        .spec
        .validate()
        .map_err(|problems| SpecError::Invalid {
            path: path.to_owned(),
            name: manifest.metadata.name.clone(),
            problems,
        })?;
    Ok(manifest)
}
