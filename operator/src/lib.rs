//! Weir's operator. Controllers and the lag autoscaler build on the resource types of
//! `weir-crds`; this first version can print the CRDs it serves.

/// The CustomResourceDefinitions as one multi-document YAML stream, ready for
/// `kubectl apply --server-side -f -`.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for (i, crd) in weir_crds::crds().iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_yaml_ng::to_string(crd)?);
    }
    Ok(out)
}
