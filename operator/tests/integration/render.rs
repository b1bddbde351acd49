//! Rendering each example pipeline, without a cluster: a snapshot of every object (in
//! operator/tests/integration/snapshots; review a change with `cargo insta review`), and the
//! properties every object must have: it round-trips through its k8s-openapi type, carries
//! an owner reference to the pipeline and the app.kubernetes.io labels, and the worker runs
//! non-root, read-only, without privilege escalation, with requests and limits.

use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use weir_crds::load::Resource as Loaded;
use weir_crds::{EventPipeline, KafkaConnection};
use weir_operator::config::OperatorConfig;
use weir_operator::render::{CONFIG_HASH_ANNOTATION, render};

fn examples() -> anyhow::Result<Vec<(String, EventPipeline)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let file = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        for resource in weir_crds::load::from_yaml(&std::fs::read_to_string(path)?)? {
            if let Loaded::EventPipeline(manifest) = resource {
                let mut pipeline = EventPipeline::new(&manifest.metadata.name, manifest.spec);
                pipeline.metadata.namespace = Some("shop".into());
                pipeline.metadata.uid = Some("0b7d5c8e-0000-4000-8000-000000000001".into());
                out.push((format!("{file}.{}", manifest.metadata.name), pipeline));
            }
        }
    }
    Ok(out)
}

fn connection() -> anyhow::Result<KafkaConnection> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/connection.yaml");
    for resource in weir_crds::load::from_yaml(&std::fs::read_to_string(path)?)? {
        if let Loaded::KafkaConnection(manifest) = resource {
            let mut connection = KafkaConnection::new(&manifest.metadata.name, manifest.spec);
            connection.metadata.namespace = Some("shop".into());
            return Ok(connection);
        }
    }
    anyhow::bail!("examples/connection.yaml has no KafkaConnection")
}

fn config() -> OperatorConfig {
    OperatorConfig {
        worker_image: "ghcr.io/weir-dev/weir-worker:0.1.0".into(),
        ..OperatorConfig::default()
    }
}

/// Serializes and reads back through the k8s-openapi type: what the API server will get.
fn round_trip<K: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    object: &K,
) -> anyhow::Result<serde_json::Value> {
    let value = serde_json::to_value(object)?;
    let back: K = serde_json::from_value(value.clone())?;
    assert_eq!(&back, object);
    Ok(value)
}

fn assert_owned_and_labelled<K: Resource>(object: &K, pipeline: &str) {
    let meta = object.meta();
    let owners = meta.owner_references.clone().unwrap_or_default();
    assert!(
        owners
            .iter()
            .any(|o| o.kind == "EventPipeline" && o.name == pipeline && o.controller == Some(true)),
        "{:?} has no controller owner reference to {pipeline}",
        meta.name
    );
    let labels = meta.labels.clone().unwrap_or_default();
    for key in [
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/part-of",
    ] {
        assert!(
            labels.contains_key(key),
            "{:?} lacks label {key}",
            meta.name
        );
    }
    assert_eq!(
        labels.get("app.kubernetes.io/instance").map(String::as_str),
        Some(pipeline)
    );
}

#[test]
fn every_example_pipeline_renders_secure_owned_objects() -> anyhow::Result<()> {
    let connection = connection()?;
    let examples = examples()?;
    assert!(examples.len() >= 5, "{} example pipelines", examples.len());
    for (label, pipeline) in &examples {
        let name = pipeline.metadata.name.clone().unwrap_or_default();
        let rendered = render(pipeline, Some(&connection), &config())?;
        let snapshot = serde_json::json!({
            "configMap": round_trip::<ConfigMap>(&rendered.config_map)?,
            "serviceAccount": round_trip::<ServiceAccount>(&rendered.service_account)?,
            "deployment": round_trip::<Deployment>(&rendered.deployment)?,
            "service": round_trip::<Service>(&rendered.service)?,
            "podDisruptionBudget": round_trip::<PodDisruptionBudget>(&rendered.pod_disruption_budget)?,
            "deadLetterTopic": rendered.dead_letter_topic.as_ref().map(serde_json::to_value).transpose()?,
        });
        // Sorted: serde_json keeps insertion order when any crate of the build enables its
        // preserve_order feature, so unsorted snapshots would depend on the build.
        insta::with_settings!({sort_maps => true}, {
            insta::assert_yaml_snapshot!(label.clone(), snapshot);
        });

        assert_owned_and_labelled(&rendered.config_map, &name);
        assert_owned_and_labelled(&rendered.service_account, &name);
        assert_owned_and_labelled(&rendered.deployment, &name);
        assert_owned_and_labelled(&rendered.service, &name);
        assert_owned_and_labelled(&rendered.pod_disruption_budget, &name);
        if let Some(topic) = &rendered.dead_letter_topic {
            assert_owned_and_labelled(topic, &name);
        }

        let spec = rendered.deployment.spec.clone().unwrap_or_default();
        assert_eq!(
            spec.replicas, None,
            "{label}: the apply must not own replicas"
        );
        let template = spec.template;
        let annotations = template
            .metadata
            .and_then(|m| m.annotations)
            .unwrap_or_default();
        assert_eq!(
            annotations.get(CONFIG_HASH_ANNOTATION),
            Some(&rendered.config_hash)
        );
        let pod = template.spec.unwrap_or_default();
        let pod_security = pod.security_context.unwrap_or_default();
        assert_eq!(pod_security.run_as_non_root, Some(true), "{label}");
        let expected_grace = pipeline
            .spec
            .worker
            .as_ref()
            .map_or(30, |w| w.termination_grace_period_seconds);
        assert_eq!(pod.termination_grace_period_seconds, Some(expected_grace));
        let worker = &pod.containers[0];
        let security = worker.security_context.clone().unwrap_or_default();
        assert_eq!(security.allow_privilege_escalation, Some(false), "{label}");
        assert_eq!(security.read_only_root_filesystem, Some(true), "{label}");
        assert_eq!(security.run_as_non_root, Some(true), "{label}");
        let resources = worker.resources.clone().unwrap_or_default();
        assert!(
            resources.requests.is_some() && resources.limits.is_some(),
            "{label}: requests and limits"
        );
        let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        };
        assert_eq!(
            probe_path(&worker.liveness_probe).as_deref(),
            Some("/healthz")
        );
        assert_eq!(
            probe_path(&worker.readiness_probe).as_deref(),
            Some("/readyz")
        );
        // Every Secret the pipeline references reaches the worker as WEIR_SECRET_* from the
        // Secret, never as a literal.
        for var in worker
            .env
            .iter()
            .flatten()
            .filter(|v| v.name.starts_with("WEIR_SECRET_"))
        {
            assert!(
                var.value.is_none()
                    && var
                        .value_from
                        .as_ref()
                        .and_then(|f| f.secret_key_ref.as_ref())
                        .is_some(),
                "{label}: {var:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_spec_change_changes_the_config_hash_and_nothing_else_does() -> anyhow::Result<()> {
    let connection = connection()?;
    let (_, pipeline) = examples()?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no example"))?;
    let first = render(&pipeline, Some(&connection), &config())?;
    let again = render(&pipeline, Some(&connection), &config())?;
    assert_eq!(
        first.config_hash, again.config_hash,
        "rendering is deterministic"
    );
    let mut changed = pipeline.clone();
    changed.spec.batch.max_records += 1;
    let rolled = render(&changed, Some(&connection), &config())?;
    assert_ne!(first.config_hash, rolled.config_hash);
    Ok(())
}

#[test]
fn a_name_too_long_for_its_objects_is_refused_with_the_field() -> anyhow::Result<()> {
    let (_, mut pipeline) = examples()?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no example"))?;
    pipeline.metadata.name = Some("p".repeat(60));
    let error = render(&pipeline, None, &config())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.starts_with("metadata.name: 60 characters; at most 48"),
        "{error}"
    );
    Ok(())
}

/// The worker's environment of `pipeline`'s Deployment, as name → literal value.
fn worker_env(
    pipeline: &EventPipeline,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let rendered = render(pipeline, None, &config())?;
    let container = rendered
        .deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().next())
        .ok_or_else(|| anyhow::anyhow!("no container"))?;
    Ok(container
        .env
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| Some((v.name, v.value?)))
        .collect())
}

#[test]
fn the_replay_token_reaches_the_workers_only_once_the_group_was_reset() -> anyhow::Result<()> {
    let (_, mut pipeline) = examples()?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no example"))?;
    pipeline.spec.replay = Some(weir_crds::Replay {
        token: "rebuild-2".into(),
        to: weir_crds::ReplayTarget::Earliest,
        timestamp: None,
        offsets: vec![],
        truncate_sinks: true,
    });
    let done = |token: &str, error: Option<&str>| weir_crds::EventPipelineStatus {
        last_replay: Some(weir_crds::ReplayStatus {
            token: token.into(),
            completed_at: "2026-12-01T12:00:00Z".into(),
            truncated: error.is_none(),
            error: error.map(str::to_owned),
        }),
        ..Default::default()
    };
    // Pending (an older token recorded): not yet.
    pipeline.status = Some(done("rebuild-1", None));
    let env = worker_env(&pipeline)?;
    assert!(!env.contains_key("WEIR_REPLAY_TOKEN"), "{env:?}");
    // Failed: the group was not reset, nothing to carry out.
    pipeline.status = Some(done("rebuild-2", Some("cannot reset")));
    let env = worker_env(&pipeline)?;
    assert!(!env.contains_key("WEIR_REPLAY_TOKEN"), "{env:?}");
    // Reset: the token and the truncation, and they stay for every later start.
    pipeline.status = Some(done("rebuild-2", None));
    let env = worker_env(&pipeline)?;
    assert_eq!(
        env.get("WEIR_REPLAY_TOKEN").map(String::as_str),
        Some("rebuild-2")
    );
    assert_eq!(
        env.get("WEIR_REPLAY_TRUNCATE").map(String::as_str),
        Some("true")
    );
    Ok(())
}

/// A kafka sink naming another cluster's KafkaConnection: its spec joins the worker's file
/// after the pipeline's own, and its Secret keys the worker's environment.
#[test]
fn a_kafka_sinks_own_connection_reaches_the_worker() -> anyhow::Result<()> {
    let (_, mut pipeline) = examples()?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no example"))?;
    pipeline.spec.sinks = vec![serde_json::from_value(serde_json::json!(
        {"kafka": {"topic": "copies", "connectionRef": {"name": "analytics"}}}
    ))?];
    let mut analytics = KafkaConnection::new(
        "analytics",
        serde_json::from_value(serde_json::json!({
            "bootstrapServers": ["analytics-kafka:9093"],
            "tls": {},
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "copier",
                     "passwordSecretRef": {"name": "analytics-user", "key": "password"}},
        }))?,
    );
    analytics.metadata.namespace = Some("shop".into());
    let own = connection()?;
    let rendered =
        weir_operator::render::render_with(&pipeline, Some(&own), &[&analytics], &config())?;
    let file = rendered
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.values().next())
        .ok_or_else(|| anyhow::anyhow!("no pipeline file"))?;
    let names: Vec<String> = weir_crds::load::from_yaml(file)?
        .into_iter()
        .filter_map(|r| match r {
            Loaded::KafkaConnection(c) => Some(c.metadata.name),
            _ => None,
        })
        .collect();
    assert_eq!(
        names,
        vec![
            own.metadata.name.clone().unwrap_or_default(),
            "analytics".into()
        ]
    );
    let env = rendered
        .deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.into_iter().next())
        .and_then(|c| c.env)
        .unwrap_or_default();
    let password = env
        .iter()
        .find(|v| v.name == "WEIR_SECRET_ANALYTICS_USER_PASSWORD")
        .and_then(|v| v.value_from.as_ref())
        .and_then(|f| f.secret_key_ref.as_ref())
        .ok_or_else(|| anyhow::anyhow!("no variable for the sink's password: {env:?}"))?;
    assert_eq!(
        (password.name.as_str(), password.key.as_str()),
        ("analytics-user", "password")
    );
    Ok(())
}

/// A pipeline without `connectionRef` uses the operator's default connection, whatever its
/// name: the worker's file names it, so the worker (whose own default is "default") finds
/// the connection the file holds.
#[test]
fn the_operators_default_connection_is_named_in_the_workers_file() -> anyhow::Result<()> {
    let (_, mut pipeline) = examples()?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no example"))?;
    pipeline.spec.connection_ref = None;
    let mut shared = connection()?;
    shared.metadata.name = Some("shared-kafka".into());
    let config = OperatorConfig {
        default_connection: "shared-kafka".into(),
        ..config()
    };
    let rendered = render(&pipeline, Some(&shared), &config)?;
    let file = rendered
        .config_map
        .data
        .as_ref()
        .and_then(|d| d.values().next())
        .ok_or_else(|| anyhow::anyhow!("no pipeline file"))?;
    let mut named = None;
    let mut connections = Vec::new();
    for resource in weir_crds::load::from_yaml(file)? {
        match resource {
            Loaded::EventPipeline(p) => named = p.spec.connection_ref.map(|r| r.name),
            Loaded::KafkaConnection(c) => connections.push(c.metadata.name),
            _ => {}
        }
    }
    assert_eq!(named.as_deref(), Some("shared-kafka"));
    assert_eq!(connections, vec!["shared-kafka".to_owned()]);
    Ok(())
}
