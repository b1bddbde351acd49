//! The one way the operator writes a child object: server-side apply under the field
//! manager `weir-operator`, with the `weir.dev/pipeline` label naming the pipeline it
//! belongs to; and the deletion of labelled children an earlier spec made that the current
//! one no longer has (the dead-letter KafkaTopic once `deadLetter` is removed).

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::context::{Context, Error};

/// The label every child of a pipeline carries: the pipeline's name.
pub const PIPELINE_LABEL: &str = "weir.dev/pipeline";

/// Server-side apply of `object` (a child of pipeline `pipeline`) in `namespace`.
pub async fn apply<K>(
    ctx: &Context,
    namespace: &str,
    pipeline: &str,
    object: &K,
) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let mut body = serde_json::to_value(object).map_err(|source| Error::Serialize {
        what: "a child object",
        source,
    })?;
    body["apiVersion"] = json!(K::api_version(&()));
    body["kind"] = json!(K::kind(&()));
    body["metadata"]["labels"][PIPELINE_LABEL] = json!(pipeline);
    ctx.metrics.write();
    Ok(api
        .patch(
            &object.name_any(),
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?)
}

/// Deletes the objects of kind `K` labelled as children of `pipeline` whose names are not
/// in `keep`; returns the names deleted.
pub async fn delete_orphans<K>(
    ctx: &Context,
    namespace: &str,
    pipeline: &str,
    keep: &[String],
) -> Result<Vec<String>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let children = api
        .list_metadata(&ListParams::default().labels(&format!("{PIPELINE_LABEL}={pipeline}")))
        .await?;
    let mut deleted = Vec::new();
    for child in children {
        let name = child.name_any();
        if keep.contains(&name) || child.metadata.deletion_timestamp.is_some() {
            continue;
        }
        ctx.metrics.write();
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => deleted.push(name),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(deleted)
}
