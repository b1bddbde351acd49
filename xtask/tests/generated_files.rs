//! The CRD drift check: committed generated files must equal what the Rust types generate.

#[test]
fn committed_generated_files_match_the_rust_types() -> anyhow::Result<()> {
    let root = xtask::repo_root();
    let stale = xtask::stale_files(&root)?;
    assert!(
        stale.is_empty(),
        "these generated files are stale or missing: {stale:?}\nrun `{}` and commit the result",
        xtask::GENERATE_COMMAND
    );
    Ok(())
}

#[test]
fn chart_crds_are_guarded_and_kept_on_uninstall() -> anyhow::Result<()> {
    for (path, content) in xtask::generated_files()? {
        if path.starts_with("charts/weir/templates/crds") {
            assert!(
                content.contains("{{- if .Values.crds.install }}"),
                "{path:?}"
            );
            assert!(
                content.contains("helm.sh/resource-policy: keep"),
                "{path:?}"
            );
        }
    }
    Ok(())
}
