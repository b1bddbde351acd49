//! The build stage of a pipeline ("rendering"): pure functions from an EventPipeline (and its KafkaConnection) and the
//! operator's configuration to the objects that run it. No cluster access here, so every
//! rendered object is unit-tested as it will be applied.
//!
//! Per pipeline `<p>`: ConfigMap `<p>-pipeline` (the file the worker reads), ServiceAccount
//! `<p>-worker`, Deployment `<p>-worker`, Service `<p>-worker-metrics`,
//! PodDisruptionBudget `<p>-worker`, and the dead-letter KafkaTopic `<p>-dead-letter`.
//! All carry the `app.kubernetes.io/*` labels, `weir.dev/pipeline: <p>` and an owner reference to the pipeline, so
//! deleting the pipeline deletes them (the dead-letter KafkaTopic retains its Kafka topic).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretKeySelector as KubeSecretKeySelector, SecurityContext, Service, ServiceAccount,
    ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource as _, ResourceExt as _};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use weir_crds::{
    DeletionPolicy, EventPipeline, KafkaConnection, KafkaTopic, KafkaTopicSpec, SecretKeySelector,
};

use crate::config::OperatorConfig;

/// Where the worker finds its pipeline file.
pub const PIPELINE_DIR: &str = "/etc/weir";
pub const PIPELINE_FILE: &str = "pipeline.yaml";
/// The worker's metrics, health and readiness port.
pub const METRICS_PORT: i32 = 9090;
/// The pod annotation holding the hash of everything a worker reads at start; a change
/// rolls the Deployment.
pub const CONFIG_HASH_ANNOTATION: &str = "weir.dev/config-hash";
/// Longest pipeline name whose derived names (`-worker-metrics`) fit Kubernetes' 63
/// character limit.
pub const MAX_NAME_LEN: usize = 63 - "-worker-metrics".len();
/// The worker's environment variables naming the replay it carries out in the sinks.
pub const REPLAY_TOKEN_ENV: &str = "WEIR_REPLAY_TOKEN";
pub const REPLAY_TRUNCATE_ENV: &str = "WEIR_REPLAY_TRUNCATE";
/// The non-root user the worker runs as.
const WORKER_UID: i64 = 65532;

/// Everything that runs one pipeline.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub config_map: ConfigMap,
    pub service_account: ServiceAccount,
    pub deployment: Deployment,
    pub service: Service,
    pub pod_disruption_budget: PodDisruptionBudget,
    pub dead_letter_topic: Option<KafkaTopic>,
    /// The hash in the pod template's annotation.
    pub config_hash: String,
}

/// Why a pipeline cannot be rendered: a problem of its spec, named by field path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

/// The names of a pipeline's objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub config_map: String,
    pub worker: String,
    pub service: String,
    pub dead_letter_topic: String,
}

impl Names {
    pub fn of(pipeline: &str) -> Self {
        Self {
            config_map: format!("{pipeline}-pipeline"),
            worker: format!("{pipeline}-worker"),
            service: format!("{pipeline}-worker-metrics"),
            dead_letter_topic: format!("{pipeline}-dead-letter"),
        }
    }
}

/// The labels every object of a pipeline carries; the first two select its pods.
pub fn labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "weir-worker".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pipeline.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "worker".to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), "weir".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "weir-operator".to_owned(),
        ),
        (crate::apply::PIPELINE_LABEL.to_owned(), pipeline.to_owned()),
    ])
}

/// The labels that select a pipeline's worker pods.
pub fn selector_labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "weir-worker".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pipeline.to_owned()),
    ])
}

/// The selector as a string, for the scale subresource (`status.selector`).
pub fn selector_string(pipeline: &str) -> String {
    selector_labels(pipeline)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders the objects of `pipeline`; `connection` is the KafkaConnection it names (absent
/// when it does not exist yet: the worker then reports not ready until it does).
pub fn render(
    pipeline: &EventPipeline,
    connection: Option<&KafkaConnection>,
    config: &OperatorConfig,
) -> Result<Rendered, RenderError> {
    render_with(pipeline, connection, &[], config)
}

/// Renders as [`render`] does, with the KafkaConnections of other clusters its kafka sinks
/// name in `connectionRef` (their specs join the worker's file, their Secret keys its
/// environment).
pub fn render_with(
    pipeline: &EventPipeline,
    connection: Option<&KafkaConnection>,
    sink_connections: &[&KafkaConnection],
    config: &OperatorConfig,
) -> Result<Rendered, RenderError> {
    let connections: Vec<&KafkaConnection> = connection
        .into_iter()
        .chain(sink_connections.iter().copied())
        .collect();
    let name = pipeline.name_any();
    if name.len() > MAX_NAME_LEN {
        return Err(RenderError::Invalid {
            field: "metadata.name".into(),
            message: format!(
                "{} characters; at most {MAX_NAME_LEN} so the worker's object names fit Kubernetes' 63",
                name.len()
            ),
        });
    }
    let namespace = pipeline.namespace().unwrap_or_else(|| "default".to_owned());
    let names = Names::of(&name);
    let owner = owner_reference(pipeline)?;
    let meta = |object_name: &str| ObjectMeta {
        name: Some(object_name.to_owned()),
        namespace: Some(namespace.clone()),
        labels: Some(labels(&name)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };

    let file = pipeline_file(pipeline, connection, &connections)?;
    let config_map = ConfigMap {
        metadata: meta(&names.config_map),
        data: Some(BTreeMap::from([(PIPELINE_FILE.to_owned(), file.clone())])),
        ..ConfigMap::default()
    };
    let service_account = ServiceAccount {
        metadata: meta(&names.worker),
        // The worker never talks to the Kubernetes API.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };

    let template = pipeline.spec.worker.clone().unwrap_or_default();
    let image = template
        .image
        .clone()
        .unwrap_or_else(|| config.worker_image.clone());
    let env = environment(pipeline, &connections, &namespace);
    let config_hash = hash(&[
        file.as_bytes(),
        image.as_bytes(),
        serde_json::to_string(&env).unwrap_or_default().as_bytes(),
    ]);

    let mut pod_labels = template.pod_labels.clone();
    pod_labels.extend(labels(&name));
    let mut pod_annotations = template.pod_annotations.clone();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.clone());
    pod_annotations.insert("prometheus.io/scrape".to_owned(), "true".to_owned());
    pod_annotations.insert("prometheus.io/port".to_owned(), METRICS_PORT.to_string());

    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    let container = Container {
        name: "worker".to_owned(),
        image: Some(image),
        image_pull_policy: template.image_pull_policy.clone(),
        args: Some(vec![
            "run".to_owned(),
            "--file".to_owned(),
            format!("{PIPELINE_DIR}/{PIPELINE_FILE}"),
        ]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".to_owned()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: Some(resources(template.resources.as_ref())),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "pipeline".to_owned(),
                mount_path: PIPELINE_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let pod = PodSpec {
        service_account_name: Some(names.worker.clone()),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(template.termination_grace_period_seconds),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(WORKER_UID),
            run_as_group: Some(WORKER_UID),
            fs_group: Some(WORKER_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        node_selector: (!template.node_selector.is_empty()).then(|| template.node_selector.clone()),
        tolerations: (!template.tolerations.is_empty()).then(|| {
            template
                .tolerations
                .iter()
                .map(|t| Toleration {
                    key: t.key.clone(),
                    operator: t.operator.clone(),
                    value: t.value.clone(),
                    effect: t.effect.clone(),
                    toleration_seconds: t.toleration_seconds,
                })
                .collect()
        }),
        containers: vec![container],
        volumes: Some(vec![
            Volume {
                name: "pipeline".to_owned(),
                config_map: Some(ConfigMapVolumeSource {
                    name: names.config_map.clone(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            Volume {
                name: "tmp".to_owned(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: Some(Quantity("64Mi".to_owned())),
                    ..EmptyDirVolumeSource::default()
                }),
                ..Volume::default()
            },
        ]),
        ..PodSpec::default()
    };
    let selector = LabelSelector {
        match_labels: Some(selector_labels(&name)),
        ..LabelSelector::default()
    };
    let deployment = Deployment {
        metadata: meta(&names.worker),
        spec: Some(DeploymentSpec {
            // `replicas` is left out on purpose: the autoscaler (or spec.replicas through
            // the scale subresource) owns it, and an apply must not fight it.
            selector: selector.clone(),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    // A new worker joins before an old one leaves: no drop in capacity.
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let service = Service {
        metadata: meta(&names.service),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".to_owned()),
                port: METRICS_PORT,
                target_port: Some(IntOrString::String("metrics".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let pod_disruption_budget = PodDisruptionBudget {
        metadata: meta(&names.worker),
        spec: Some(PodDisruptionBudgetSpec {
            // One worker at a time: a voluntary eviction costs one rebalance, never all.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(selector),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    let dead_letter_topic = pipeline
        .spec
        .dead_letter
        .as_ref()
        .filter(|d| d.create)
        .map(|d| {
            let mut topic = KafkaTopic::new(
                &names.dead_letter_topic,
                KafkaTopicSpec {
                    topic_name: Some(d.topic.clone()),
                    connection_ref: pipeline.spec.connection_ref.clone(),
                    partitions: d.partitions,
                    replication_factor: None,
                    config: BTreeMap::new(),
                    // Dead letters are evidence: never deleted with the pipeline.
                    deletion_policy: DeletionPolicy::Retain,
                },
            );
            topic.metadata = meta(&names.dead_letter_topic);
            topic
        });
    Ok(Rendered {
        config_map,
        service_account,
        deployment,
        service,
        pod_disruption_budget,
        dead_letter_topic,
        config_hash,
    })
}

fn owner_reference(pipeline: &EventPipeline) -> Result<OwnerReference, RenderError> {
    pipeline
        .controller_owner_ref(&())
        .ok_or_else(|| RenderError::Invalid {
            field: "metadata.uid".into(),
            message: "the pipeline has no uid yet (not created by the API server)".into(),
        })
}

/// The worker's file: the EventPipeline and the KafkaConnections it uses (its own, then
/// its kafka sinks'), as YAML. Secrets stay references; their values reach the worker as
/// environment variables. The pipeline names its own connection even when its spec
/// leaves `connectionRef` out: the operator's default may have any name, and the worker
/// knows only its own default ("default").
fn pipeline_file(
    pipeline: &EventPipeline,
    own: Option<&KafkaConnection>,
    connections: &[&KafkaConnection],
) -> Result<String, RenderError> {
    let mut spec = pipeline.spec.clone();
    if spec.connection_ref.is_none() {
        spec.connection_ref = own.map(|c| weir_crds::ConnectionRef { name: c.name_any() });
    }
    let mut documents = vec![serde_json::json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "EventPipeline",
        "metadata": {"name": pipeline.name_any(), "namespace": pipeline.namespace()},
        "spec": spec,
    })];
    let mut named = std::collections::BTreeSet::new();
    for connection in connections {
        if !named.insert(connection.name_any()) {
            continue;
        }
        documents.push(serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1",
            "kind": "KafkaConnection",
            "metadata": {"name": connection.name_any(), "namespace": connection.namespace()},
            "spec": connection.spec,
        }));
    }
    let mut out = String::new();
    for (i, document) in documents.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_yaml_ng::to_string(&weir_crds::load::sorted_keys(document.clone())).map_err(
                |e| RenderError::Invalid {
                    field: "spec".into(),
                    message: format!("cannot be written as YAML: {e}"),
                },
            )?,
        );
    }
    Ok(out)
}

/// The worker's environment: its identity, then every Secret key the pipeline and its
/// connections reference (as `WEIR_SECRET_<NAME>_<KEY>`), then the user's own variables.
fn environment(
    pipeline: &EventPipeline,
    connections: &[&KafkaConnection],
    namespace: &str,
) -> Vec<EnvVar> {
    let literal = |name: &str, value: &str| EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    };
    let mut env = vec![
        literal("WEIR_NAMESPACE", namespace),
        EnvVar {
            name: "WEIR_INSTANCE_ID".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        literal("WEIR_METRICS_ADDR", &format!("0.0.0.0:{METRICS_PORT}")),
        literal("WEIR_LOG_FORMAT", "json"),
    ];
    // Once the group was reset: the first worker to start carries out the replay in the
    // sinks (forgets kept offsets and keys, truncates when asked), later ones skip it.
    if let Some(done) = super::replay::carried_out(pipeline) {
        env.push(literal(REPLAY_TOKEN_ENV, &done.token));
        env.push(literal(
            REPLAY_TRUNCATE_ENV,
            if done.truncated { "true" } else { "false" },
        ));
    }
    let mut selectors = Vec::new();
    if let Ok(spec) = serde_json::to_value(&pipeline.spec) {
        secret_refs(&spec, &mut selectors);
    }
    for connection in connections {
        let spec = &connection.spec;
        if let Some(tls) = &spec.tls {
            selectors.extend(
                [&tls.ca_cert, &tls.client_cert, &tls.client_key]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
        }
        if let Some(sasl) = &spec.sasl {
            selectors.extend(sasl.username_secret_ref.clone());
            selectors.push(sasl.password_secret_ref.clone());
        }
    }
    selectors.sort_by(|a, b| (&a.name, &a.key).cmp(&(&b.name, &b.key)));
    selectors.dedup();
    for selector in selectors {
        env.push(secret_env(&selector.env_name(), &selector));
    }
    for var in pipeline.spec.worker.iter().flat_map(|w| &w.env) {
        env.push(match (&var.value, &var.secret_key_ref) {
            (_, Some(selector)) => secret_env(&var.name, selector),
            (value, None) => literal(&var.name, value.as_deref().unwrap_or_default()),
        });
    }
    env
}

fn secret_env(name: &str, selector: &SecretKeySelector) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(KubeSecretKeySelector {
                name: selector.name.clone(),
                key: selector.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Every `secretKeyRef` in a spec (as JSON), wherever a SecretSource appears.
fn secret_refs(value: &Value, out: &mut Vec<SecretKeySelector>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                if key == "secretKeyRef"
                    && let Ok(selector) = serde_json::from_value::<SecretKeySelector>(inner.clone())
                {
                    out.push(selector);
                } else {
                    secret_refs(inner, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| secret_refs(v, out)),
        _ => {}
    }
}

/// Requests and limits: the spec's, else a small default that fits the worker's measured
/// ~50 MiB at full speed.
fn resources(spec: Option<&weir_crds::Resources>) -> ResourceRequirements {
    let quantities = |m: &BTreeMap<String, String>| -> BTreeMap<String, Quantity> {
        m.iter()
            .map(|(k, v)| (k.clone(), Quantity(v.clone())))
            .collect()
    };
    match spec {
        Some(r) if !r.requests.is_empty() || !r.limits.is_empty() => ResourceRequirements {
            requests: (!r.requests.is_empty()).then(|| quantities(&r.requests)),
            limits: (!r.limits.is_empty()).then(|| quantities(&r.limits)),
            ..ResourceRequirements::default()
        },
        _ => ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("100m".to_owned())),
                ("memory".to_owned(), Quantity("96Mi".to_owned())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("256Mi".to_owned()),
            )])),
            ..ResourceRequirements::default()
        },
    }
}

/// The first 16 hex digits of the SHA-256 of `parts`.
fn hash(parts: &[&[u8]]) -> String {
    let mut digest = Sha256::new();
    for part in parts {
        digest.update((part.len() as u64).to_le_bytes());
        digest.update(part);
    }
    digest
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The KafkaConnection a resource uses: its `connectionRef`, else the operator's default.
pub fn connection_name<'a>(
    reference: Option<&'a weir_crds::ConnectionRef>,
    config: &'a OperatorConfig,
) -> &'a str {
    reference.map_or(config.default_connection.as_str(), |r| r.name.as_str())
}
