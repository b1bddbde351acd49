//! The Helm chart, rendered by Helm's own Go SDK (helm-python-sdk, installed by
//! scripts/install-test-deps.sh): it lints without errors with its default values and with
//! every documented value set; every object it renders deserializes into its k8s-openapi
//! type and is accepted by the real API server under strict field validation; its schema
//! refuses values it does not describe; its RBAC grants exactly `weir_operator::rbac::RULES`
//! in every mode; NOTES.txt says what to apply next.

use crate::helm;

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde_json::{Value, json};

use helm::{Rendered, code_grants, grants, of_kind, render, try_render, typed_check};

fn assert_lints(rendered: &Rendered) {
    let lint = &rendered.lint;
    assert_eq!(lint["errors"], json!([]), "lint: {lint}");
    let severe: Vec<&Value> = lint["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["severity"].as_i64().unwrap_or(0) > 1)
        .collect();
    assert!(severe.is_empty(), "lint warnings or errors: {severe:?}");
}

/// The values of every documented option set away from its default (the namespaces are
/// the API server's).
fn every_option(watched: &str, other: &str) -> Value {
    json!({
        "crds": {"install": true},
        "operator": {
            "image": {"repository": "registry.example.com/weir/operator", "tag": "9.9.9", "pullPolicy": "Always"},
            "imagePullSecrets": [{"name": "regcred"}],
            "replicas": 3,
            "watchNamespaces": [watched],
            "defaultConnection": "main",
            "logFormat": "text",
            "logLevel": "debug",
            "leaseDuration": "20s",
            "resync": "10m",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": 1, "memory": "256Mi"}},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
            "priorityClassName": "platform-critical",
            "podAnnotations": {"example.com/team": "data"},
            "podLabels": {"example.com/cost-center": "42"},
            "serviceAccountAnnotations": {"iam.example.com/role": "weir"},
        },
        "worker": {"image": {"repository": "registry.example.com/weir/worker", "tag": "9.9.9"}},
        "metrics": {
            "port": 9100,
            "service": {"enabled": true},
            "serviceMonitor": {"enabled": true, "interval": "15s", "labels": {"release": "prometheus"}},
            "podMonitor": {"enabled": true, "interval": "15s", "labels": {"release": "prometheus"}},
            "dashboard": {"enabled": true, "labels": {"grafana_dashboard": "weir"}, "namespace": other},
        },
        "defaultConnection": {
            "create": true,
            "namespaces": [watched, other],
            "bootstrapServers": ["kafka-0.kafka:9093", "kafka-1.kafka:9093"],
            "tls": {"caCert": {"name": "kafka-ca", "key": "ca.crt"}},
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "weir", "passwordSecretRef": {"name": "kafka-credentials", "key": "password"}},
            "properties": {"client.rack": "eu-west-1a"},
        },
    })
}

/// Every leaf path of the chart's values.schema.json (generated from values.yaml).
fn schema_leaves() -> anyhow::Result<BTreeSet<String>> {
    fn walk(schema: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        let Some(properties) = schema["properties"].as_object() else {
            out.insert(prefix.to_owned());
            return;
        };
        if schema.get("default").is_some() {
            out.insert(prefix.to_owned());
            return;
        }
        for (key, child) in properties {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            walk(child, &path, out);
        }
    }
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        helm::repo().join("charts/weir/values.schema.json"),
    )?)?;
    let mut out = BTreeSet::new();
    walk(&schema, "", &mut out);
    Ok(out)
}

/// The paths `values` sets, down to the schema's leaves (some leaves hold objects:
/// resources, labels, tls ...).
fn set_paths(values: &Value, prefix: &str, leaves: &BTreeSet<String>, out: &mut BTreeSet<String>) {
    match values.as_object() {
        Some(map) if !leaves.contains(prefix) => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                set_paths(child, &path, leaves, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

#[tokio::test]
async fn the_chart_lints_renders_and_is_accepted_by_the_api_server() -> anyhow::Result<()> {
    let server = weir_testkit::KubeApiServer::shared().await?;
    let namespace = server.create_namespace("weir-system").await?;
    let rendered = render("weir", &namespace, &json!({}))?;
    assert_lints(&rendered);
    let documents = &rendered.documents;

    // Three CRDs, and the operator with its identity, role and metrics Service.
    assert_eq!(of_kind(documents, "CustomResourceDefinition").len(), 3);
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
    ] {
        assert_eq!(of_kind(documents, kind).len(), 1, "{kind}");
    }
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "ConfigMap",
        "KafkaConnection",
    ] {
        assert!(of_kind(documents, kind).is_empty(), "{kind} is optional");
    }
    for document in documents {
        typed_check(document)?;
    }

    let deployment: Deployment =
        serde_json::from_value(of_kind(documents, "Deployment")[0].clone())?;
    let spec = deployment.spec.clone().unwrap_or_default();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap_or_default();
    assert_eq!(pod.service_account_name.as_deref(), Some("weir-operator"));
    let container = &pod.containers[0];
    assert_eq!(container.args.as_deref(), Some(&["run".to_owned()][..]));
    assert!(container.liveness_probe.is_some() && container.readiness_probe.is_some());
    assert!(container.resources.is_some());
    let security = container.security_context.clone().unwrap_or_default();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let env: Vec<String> = container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    for name in [
        "POD_NAME",
        "POD_NAMESPACE",
        "WEIR_WORKER_IMAGE",
        "WEIR_WATCH_NAMESPACES",
        "WEIR_LEASE_NAME",
        "WEIR_METRICS_ADDR",
    ] {
        assert!(
            env.contains(&name.to_owned()),
            "{name} missing from {env:?}"
        );
    }

    // Everything applies to the real API server (CRDs first, as Helm installs them).
    let client = server.admin_client()?;
    helm::apply_all(&client, &namespace, documents, "helm").await?;
    Ok(())
}

#[tokio::test]
async fn every_documented_option_renders_and_is_accepted_by_the_api_server() -> anyhow::Result<()> {
    let server = weir_testkit::KubeApiServer::shared().await?;
    let client = server.admin_client()?;
    let release_ns = server.create_namespace("ops").await?;
    let watched = server.create_namespace("shop").await?;
    let other = server.create_namespace("monitoring").await?;
    let values = every_option(&watched, &other);

    // The values above set every value values.yaml documents.
    let leaves = schema_leaves()?;
    let mut set = BTreeSet::new();
    set_paths(&values, "", &leaves, &mut set);
    let unset: Vec<&String> = leaves.difference(&set).collect();
    assert!(
        unset.is_empty(),
        "every_option() leaves these values unset: {unset:?}"
    );

    let release = weir_testkit::unique_name("all");
    let rendered = render(&release, &release_ns, &values)?;
    assert_lints(&rendered);
    let documents = &rendered.documents;
    for document in documents {
        typed_check(document)?;
    }
    let fullname = format!("{release}-operator");

    let deployment: Deployment =
        serde_json::from_value(of_kind(documents, "Deployment")[0].clone())?;
    let spec = deployment.spec.clone().unwrap_or_default();
    assert_eq!(spec.replicas, Some(3));
    let template = spec.template;
    let labels = template
        .metadata
        .clone()
        .unwrap_or_default()
        .labels
        .unwrap_or_default();
    assert_eq!(
        labels.get("example.com/cost-center").map(String::as_str),
        Some("42")
    );
    let pod = template.spec.unwrap_or_default();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("platform-critical")
    );
    assert_eq!(
        pod.image_pull_secrets.unwrap_or_default()[0].name,
        "regcred"
    );
    assert!(pod.affinity.and_then(|a| a.node_affinity).is_some());
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example.com/weir/operator:9.9.9")
    );
    assert_eq!(container.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(
        container.ports.clone().unwrap_or_default()[0].container_port,
        9100
    );
    let env = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(env("WEIR_WATCH_NAMESPACES"), watched);
    assert_eq!(env("WEIR_DEFAULT_CONNECTION"), "main");
    assert_eq!(
        env("WEIR_WORKER_IMAGE"),
        "registry.example.com/weir/worker:9.9.9"
    );
    assert_eq!(env("WEIR_METRICS_ADDR"), "0.0.0.0:9100");
    assert_eq!(env("WEIR_LEASE_NAME"), fullname);
    assert_eq!(env("WEIR_LEASE_DURATION"), "20s");
    assert_eq!(env("WEIR_RESYNC"), "10m");
    assert_eq!(env("WEIR_LOG_FORMAT"), "text");
    assert_eq!(env("RUST_LOG"), "debug");

    let service_monitor = of_kind(documents, "ServiceMonitor")[0];
    assert_eq!(
        service_monitor["metadata"]["labels"]["release"],
        "prometheus"
    );
    assert_eq!(service_monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(service_monitor["spec"]["endpoints"][0]["interval"], "15s");
    let service = of_kind(documents, "Service")[0];
    assert_eq!(
        service_monitor["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
        "the ServiceMonitor selects the metrics Service"
    );
    assert_eq!(service["spec"]["ports"][0]["port"], 9100);
    let pod_monitor = of_kind(documents, "PodMonitor")[0];
    assert_eq!(
        pod_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        weir_operator::render::labels("p")["app.kubernetes.io/name"].as_str(),
        "the PodMonitor selects the workers' pods"
    );
    assert_eq!(
        pod_monitor["spec"]["namespaceSelector"]["matchNames"],
        json!([watched])
    );
    assert_eq!(
        pod_monitor["spec"]["podMetricsEndpoints"][0]["port"],
        "metrics"
    );
    let dashboard = of_kind(documents, "ConfigMap")[0];
    assert_eq!(dashboard["metadata"]["namespace"], json!(other));
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "weir");
    let json_text = dashboard["data"]["weir.json"].as_str().unwrap_or_default();
    let parsed: Value = serde_json::from_str(json_text)?;
    assert_eq!(parsed["uid"], "weir-overview");
    let connections = of_kind(documents, "KafkaConnection");
    assert_eq!(connections.len(), 2);
    for connection in &connections {
        assert_eq!(connection["metadata"]["name"], "main");
        assert_eq!(connection["spec"]["sasl"]["mechanism"], "SCRAM-SHA-512");
    }

    // prometheus-operator's CRDs are not part of the test server: a minimal stand-in lets
    // the API server store the two objects (their fields are checked above, not by it).
    let mut with_stand_ins = documents.clone();
    for (plural, kind) in [
        ("servicemonitors", "ServiceMonitor"),
        ("podmonitors", "PodMonitor"),
    ] {
        with_stand_ins.push(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com",
                "names": {"kind": kind, "plural": plural, "listKind": format!("{kind}List"), "singular": kind.to_lowercase()},
                "scope": "Namespaced",
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
            },
        }));
    }
    helm::apply_all(&client, &release_ns, &with_stand_ins, "helm").await?;
    Ok(())
}

#[test]
fn values_the_schema_does_not_describe_are_refused() -> anyhow::Result<()> {
    let cases = [
        (
            json!({"operator": {"replicas": "two"}}),
            "/operator/replicas",
        ),
        (json!({"operator": {"replica": 2}}), "replica"),
        (
            json!({"operator": {"logFormat": "xml"}}),
            "/operator/logFormat",
        ),
        (
            json!({"operator": {"watchNamespaces": ["Not_A_Namespace"]}}),
            "/operator/watchNamespaces/0",
        ),
        (
            json!({"operator": {"leaseDuration": "fifteen seconds"}}),
            "/operator/leaseDuration",
        ),
        (
            json!({"operator": {"image": {"pullPolicy": "Sometimes"}}}),
            "/operator/image/pullPolicy",
        ),
        (json!({"metrics": {"port": 70000}}), "/metrics/port"),
        (
            json!({"metrics": {"serviceMonitor": {"enabled": "yes"}}}),
            "/metrics/serviceMonitor/enabled",
        ),
        (
            json!({"defaultConnection": {"create": true}}),
            "/defaultConnection/bootstrapServers",
        ),
        (
            json!({"defaultConnection": {"create": true, "bootstrapServers": ["k:9092"], "tls": {"caCertificate": {}}}}),
            "caCertificate",
        ),
        (
            json!({"defaultConnection": {"create": true, "bootstrapServers": ["k:9092"], "sasl": {"mechanism": "GSSAPI"}}}),
            "/defaultConnection/sasl/mechanism",
        ),
        (json!({"crds": {"install": "true"}}), "/crds/install"),
    ];
    for (values, field) in cases {
        match try_render("weir", "weir-system", &values)? {
            Ok(_) => panic!("the schema accepted {values}"),
            Err(refusal) => assert!(refusal.contains(field), "{values}: {refusal}"),
        }
    }
    Ok(())
}

fn cluster_role(rendered: &Rendered) -> anyhow::Result<ClusterRole> {
    let roles = of_kind(&rendered.documents, "ClusterRole");
    assert_eq!(roles.len(), 1);
    Ok(serde_json::from_value(roles[0].clone())?)
}

#[test]
fn the_rbac_of_every_mode_grants_exactly_what_the_code_uses() -> anyhow::Result<()> {
    let everything = code_grants(|_| true);
    assert!(
        !everything.iter().any(|(group, resource, verb)| verb == "*"
            || (verb == "delete"
                && (group.as_str(), resource.as_str()) != ("weir.dev", "kafkatopics"))),
        "no wildcard grants, and delete only for the KafkaTopics a pipeline no longer has"
    );
    // Cluster mode: every namespace, and several named namespaces (the operator then
    // watches all and skips the rest, so it needs the cluster-wide grant).
    for watched in [json!([]), json!(["shop", "billing"])] {
        let rendered = render(
            "weir",
            "weir-system",
            &json!({"operator": {"watchNamespaces": watched}}),
        )?;
        let role = cluster_role(&rendered)?;
        assert_eq!(
            grants(&role.rules.unwrap_or_default()),
            everything,
            "{watched}"
        );
        let bindings = of_kind(&rendered.documents, "ClusterRoleBinding");
        assert_eq!(bindings.len(), 1);
        let binding: ClusterRoleBinding = serde_json::from_value(bindings[0].clone())?;
        assert_eq!(binding.role_ref.name, "weir-operator");
        let subject = &binding.subjects.unwrap_or_default()[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("weir-operator", Some("weir-system"))
        );
        assert!(of_kind(&rendered.documents, "RoleBinding").is_empty());
        assert!(of_kind(&rendered.documents, "Role").is_empty());
    }
    // Namespaced mode: the same rules, bound in the watched namespace only; the Lease's
    // rule in the release namespace.
    let rendered = render(
        "weir",
        "weir-system",
        &json!({"operator": {"watchNamespaces": ["shop"]}}),
    )?;
    let role = cluster_role(&rendered)?;
    assert_eq!(grants(&role.rules.unwrap_or_default()), everything);
    assert!(
        of_kind(&rendered.documents, "ClusterRoleBinding").is_empty(),
        "nothing cluster-wide"
    );
    let bindings: Vec<RoleBinding> = of_kind(&rendered.documents, "RoleBinding")
        .into_iter()
        .map(|b| serde_json::from_value(b.clone()))
        .collect::<Result<_, _>>()?;
    let in_shop: Vec<&RoleBinding> = bindings
        .iter()
        .filter(|b| b.metadata.namespace.as_deref() == Some("shop"))
        .collect();
    assert_eq!(in_shop.len(), 1);
    assert_eq!(
        (
            in_shop[0].role_ref.kind.as_str(),
            in_shop[0].role_ref.name.as_str()
        ),
        ("ClusterRole", "weir-operator")
    );
    let roles = of_kind(&rendered.documents, "Role");
    assert_eq!(roles.len(), 1);
    let lease_role: Role = serde_json::from_value(roles[0].clone())?;
    assert_eq!(
        lease_role.metadata.namespace.as_deref(),
        Some("weir-system")
    );
    assert_eq!(
        grants(&lease_role.rules.unwrap_or_default()),
        code_grants(|group| group == "coordination.k8s.io")
    );
    let lease_binding = bindings
        .iter()
        .find(|b| b.metadata.namespace.as_deref() == Some("weir-system"))
        .ok_or_else(|| anyhow::anyhow!("no RoleBinding for the Lease"))?;
    assert_eq!(lease_binding.role_ref.kind, "Role");
    assert_eq!(bindings.len(), 2);
    Ok(())
}

#[test]
fn values_switch_crds_off_and_set_the_watched_namespaces() -> anyhow::Result<()> {
    let values = json!({
        "crds": {"install": false},
        "operator": {"watchNamespaces": ["shop", "billing"], "replicas": 3},
    });
    let rendered = render("prod", "ops", &values)?;
    let documents = &rendered.documents;
    assert!(of_kind(documents, "CustomResourceDefinition").is_empty());
    let deployment: Deployment =
        serde_json::from_value(of_kind(documents, "Deployment")[0].clone())?;
    assert_eq!(deployment.metadata.name.as_deref(), Some("prod-operator"));
    assert_eq!(deployment.metadata.namespace.as_deref(), Some("ops"));
    let spec = deployment.spec.unwrap_or_default();
    assert_eq!(spec.replicas, Some(3));
    let env = spec.template.spec.unwrap_or_default().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let watched = env
        .iter()
        .find(|e| e.name == "WEIR_WATCH_NAMESPACES")
        .and_then(|e| e.value.clone());
    assert_eq!(watched.as_deref(), Some("shop,billing"));
    Ok(())
}

#[test]
fn the_notes_say_what_to_apply_next_and_where_status_and_metrics_are() -> anyhow::Result<()> {
    let notes = render("weir", "weir-system", &json!({}))?.notes;
    for expected in [
        "kubectl -n weir-system rollout status deployment/weir-operator",
        "kubectl apply -n <namespace> -f examples/connection.yaml",
        "kubectl apply -n <namespace> -f examples/todo-projection.yaml",
        "kubectl get kafkaconnections,kafkatopics,eventpipelines",
        "port-forward deployment/weir-operator 8080",
        "reconciling every namespace",
    ] {
        assert!(
            notes.contains(expected),
            "NOTES.txt lacks {expected:?}:\n{notes}"
        );
    }
    let values = json!({"operator": {"watchNamespaces": ["shop"]}, "defaultConnection": {"create": true, "bootstrapServers": ["k:9092"]}});
    let notes = render("weir", "weir-system", &values)?.notes;
    assert!(notes.contains("reconciling namespace shop only"), "{notes}");
    assert!(notes.contains("The chart created it"), "{notes}");
    Ok(())
}
