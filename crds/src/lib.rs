//! Weir's resource types: `KafkaConnection`, `KafkaTopic` and `EventPipeline`
//! (group `weir.dev`, version `v1alpha1`), their validation and loading from YAML.
//!
//! The spec types need only serde and schemars; the `kube` feature (on by default) adds the
//! `CustomResource` wrappers and CRD generation.

pub mod cel;
pub mod condition;
pub mod connection;
pub mod duration;
pub mod load;
pub mod pipeline;
pub mod problems;
pub mod reference;
pub mod topic;

pub use condition::{Condition, ConditionStatus};
pub use connection::*;
pub use duration::DurationString;
pub use load::{LoadError, Manifest, Resource};
pub use pipeline::*;
pub use problems::{FieldError, Problems};
pub use reference::*;
pub use topic::*;

/// The API group of every Weir resource.
pub const GROUP: &str = "weir.dev";
/// The API version of every Weir resource.
pub const VERSION: &str = "v1alpha1";

/// Every CustomResourceDefinition Weir installs, in a stable order.
#[cfg(feature = "kube")]
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        KafkaConnection::crd(),
        KafkaTopic::crd(),
        EventPipeline::crd(),
    ]
}
