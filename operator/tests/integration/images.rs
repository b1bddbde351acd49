//! The container images, checked without a container engine (none runs here): each
//! Dockerfile builds the binary its entrypoint runs, runs it as the numeric non-root user the
//! chart and the operator's rendered worker Deployment ask for, exposes the ports the code
//! listens on, and `ldd` of the binary lists only libraries the runtime image ships or the
//! Dockerfile copies in. `ldd` runs on the debug binaries the test build made (a release
//! build of both takes too long here): their dynamic link line is the release one.

use crate::helm;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::json;
use weir_operator::config::OperatorConfig;
use weir_operator::render::METRICS_PORT;

/// What a test needs from a Dockerfile's final stage.
#[derive(Debug, Default)]
struct Dockerfile {
    text: String,
    runtime: String,
    user: String,
    exposed: Vec<u16>,
    entrypoint: Vec<String>,
    labels: BTreeSet<String>,
}

fn dockerfile(name: &str) -> anyhow::Result<Dockerfile> {
    let text = std::fs::read_to_string(helm::repo().join(format!("docker/{name}.Dockerfile")))?;
    // Continuation lines joined, comments dropped.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let mut file = Dockerfile {
        text: text.clone(),
        ..Dockerfile::default()
    };
    for line in joined.lines() {
        let Some((instruction, rest)) = line.trim().split_once(' ') else {
            continue;
        };
        let rest = rest.trim();
        match instruction {
            "FROM" => {
                // A new stage: only the last one's settings count.
                file.runtime = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                file.user.clear();
                file.exposed.clear();
                file.entrypoint.clear();
                file.labels.clear();
            }
            "USER" => rest.clone_into(&mut file.user),
            "EXPOSE" => {
                for port in rest.split_whitespace() {
                    file.exposed.push(port.trim_end_matches("/tcp").parse()?);
                }
            }
            "ENTRYPOINT" => file.entrypoint = serde_json::from_str(rest)?,
            "LABEL" => {
                for pair in rest.split_whitespace() {
                    if let Some((key, _)) = pair.split_once('=') {
                        file.labels.insert(key.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(file)
}

/// The libraries a runtime image ships (gcr.io/distroless/cc-debian12: glibc, libgcc_s,
/// libstdc++, libgomp and OpenSSL 3 of the distroless base).
fn provided_by(image: &str) -> anyhow::Result<BTreeSet<&'static str>> {
    anyhow::ensure!(
        image.starts_with("gcr.io/distroless/cc-debian12"),
        "the test knows the libraries of distroless cc-debian12, not of {image}"
    );
    Ok(BTreeSet::from([
        "linux-vdso.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
        "libc.so.6",
        "libm.so.6",
        "libdl.so.2",
        "libpthread.so.0",
        "librt.so.1",
        "libgcc_s.so.1",
        "libstdc++.so.6",
        "libgomp.so.1",
        "libssl.so.3",
        "libcrypto.so.3",
    ]))
}

fn common_checks(file: &Dockerfile, binary: &str) -> anyhow::Result<()> {
    assert!(
        file.text.contains(&format!(
            "cargo build --release --locked -p {binary} --bin {binary}"
        )),
        "{binary}: the build stage builds another binary"
    );
    assert_eq!(
        file.entrypoint,
        vec![format!("/usr/local/bin/{binary}")],
        "{binary}: the entrypoint runs the binary (exec form, no shell)"
    );
    assert!(
        file.text
            .contains(&format!("/out/rootfs/usr/local/bin/{binary}")),
        "{binary}: the binary is copied to the entrypoint's path"
    );
    let (uid, gid) = file.user.split_once(':').context("USER uid:gid")?;
    let uid: i64 = uid.parse().context("a numeric USER")?;
    let _: i64 = gid.parse().context("a numeric group")?;
    assert_ne!(uid, 0, "{binary}: non-root");
    for label in ["title", "description", "source", "licenses", "version"] {
        assert!(
            file.labels
                .contains(&format!("org.opencontainers.image.{label}")),
            "{binary}: OCI label {label} missing"
        );
    }
    assert!(
        file.runtime.starts_with("gcr.io/distroless/"),
        "{binary}: a runtime image without a shell"
    );
    Ok(())
}

fn uid(file: &Dockerfile) -> i64 {
    file.user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or(-1)
}

#[test]
fn the_operator_image_matches_the_code_and_the_chart() -> anyhow::Result<()> {
    let file = dockerfile("operator")?;
    common_checks(&file, "weir-operator")?;
    let port = OperatorConfig::default().metrics_addr.port();
    assert_eq!(file.exposed, vec![port]);

    let rendered = helm::render("weir", "weir-system", &json!({}))?;
    let deployment: Deployment =
        serde_json::from_value(helm::of_kind(&rendered.documents, "Deployment")[0].clone())?;
    let pod = deployment
        .spec
        .unwrap_or_default()
        .template
        .spec
        .unwrap_or_default();
    assert_eq!(
        pod.security_context.and_then(|s| s.run_as_user),
        Some(uid(&file))
    );
    let container = &pod.containers[0];
    assert!(
        container.command.is_none(),
        "the chart keeps the image's entrypoint"
    );
    assert_eq!(
        container.ports.clone().unwrap_or_default()[0].container_port,
        i32::from(port)
    );
    assert!(
        container
            .image
            .as_deref()
            .unwrap_or_default()
            .starts_with("ghcr.io/weir-dev/weir-operator:"),
        "{:?}",
        container.image
    );
    // The worker image the chart hands the operator is the one the code defaults to.
    let worker_image = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "WEIR_WORKER_IMAGE")
        .and_then(|e| e.value.clone())
        .unwrap_or_default();
    assert_eq!(worker_image, OperatorConfig::default().worker_image);
    Ok(())
}

#[test]
fn the_worker_image_matches_the_deployment_the_operator_renders() -> anyhow::Result<()> {
    let file = dockerfile("worker")?;
    common_checks(&file, "weir-worker")?;
    assert_eq!(file.exposed, vec![u16::try_from(METRICS_PORT)?]);

    let yaml = "apiVersion: weir.dev/v1alpha1\nkind: EventPipeline\nmetadata: {name: orders, namespace: shop, uid: 0b7d5c8e-0000-4000-8000-000000000001}\nspec:\n  source: {topics: [orders]}\n  sinks:\n    - postgres:\n        urlFrom: {env: DATABASE_URL}\n        table: orders\n        mode: Insert\n        columns: [{name: id, type: bigint}]\n";
    let pipeline: weir_crds::EventPipeline = serde_yaml_ng::from_str(yaml)?;
    let rendered = weir_operator::render::render(&pipeline, None, &OperatorConfig::default())?;
    let pod = rendered
        .deployment
        .spec
        .unwrap_or_default()
        .template
        .spec
        .unwrap_or_default();
    let security = pod.security_context.unwrap_or_default();
    assert_eq!(security.run_as_user, Some(uid(&file)));
    assert_eq!(security.run_as_non_root, Some(true));
    let container = &pod.containers[0];
    assert!(
        container.command.is_none(),
        "the operator keeps the image's entrypoint"
    );
    assert_eq!(container.args.clone().unwrap_or_default()[0], "run");
    assert_eq!(
        container.ports.clone().unwrap_or_default()[0].container_port,
        METRICS_PORT
    );
    assert_eq!(
        container
            .security_context
            .clone()
            .unwrap_or_default()
            .read_only_root_filesystem,
        Some(true)
    );
    assert!(
        container
            .image
            .as_deref()
            .unwrap_or_default()
            .starts_with("ghcr.io/weir-dev/weir-worker:"),
        "{:?}",
        container.image
    );
    Ok(())
}

/// The debug binaries of this build (scripts/test.sh builds every binary before the tests).
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let operator = PathBuf::from(env!("CARGO_BIN_EXE_weir-operator"));
    let path = operator.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p weir-worker`)",
        path.display()
    );
    Ok(path)
}

/// Libraries `ldd` lists for `path`, by file name.
fn linked(path: &PathBuf) -> anyhow::Result<BTreeSet<String>> {
    let output = Command::new("ldd")
        .arg(path)
        .output()
        .context("running ldd")?;
    anyhow::ensure!(output.status.success(), "ldd {}", path.display());
    Ok(String::from_utf8(output.stdout)?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|lib| lib.rsplit('/').next().unwrap_or(lib).to_owned())
        .collect())
}

#[test]
fn each_binary_links_only_what_its_runtime_image_provides() -> anyhow::Result<()> {
    let mut seen = BTreeMap::new();
    for (image, name) in [("operator", "weir-operator"), ("worker", "weir-worker")] {
        let file = dockerfile(image)?;
        let mut available: BTreeSet<String> = provided_by(&file.runtime)?
            .into_iter()
            .map(str::to_owned)
            .collect();
        // Libraries the Dockerfile copies into the runtime image from the build stage.
        for line in file
            .text
            .lines()
            .filter(|l| l.contains("/out/rootfs$libdir/"))
        {
            for word in line.split(['/', '"', ' ']) {
                if word.starts_with("lib") && word.contains(".so.") {
                    available.insert(word.to_owned());
                }
            }
        }
        let libraries = linked(&binary(name)?)?;
        let missing: Vec<&String> = libraries.difference(&available).collect();
        assert!(
            missing.is_empty(),
            "{name} links {missing:?}, which {} does not ship and docker/{image}.Dockerfile does not copy",
            file.runtime
        );
        seen.insert(name, libraries);
    }
    assert!(seen.values().all(|l| l.contains("libc.so.6")), "{seen:?}");
    Ok(())
}
