//! The operator against the harness's real Kubernetes API server and real Kafka broker.
//! It runs in-process with its own identity, bound to exactly the chart's ClusterRole, so
//! the real authorizer proves the role is enough.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use weir_operator::config::OperatorConfig;
use weir_operator::metrics::Metrics;
use weir_testkit::kube::{apply, crd_dir};
use weir_testkit::{Identity, KubeApiServer, TestKafka};

pub const DEADLINE: Duration = Duration::from_secs(60);

/// The user the operator runs as (a ServiceAccount, as in the chart).
pub const OPERATOR_USER: &str = "system:serviceaccount:weir-system:weir-operator";

/// The API server with Weir's CRDs and the chart's ClusterRole bound to the operator's user.
pub struct Cluster {
    pub server: &'static KubeApiServer,
    pub admin: Client,
}

impl Cluster {
    pub async fn start() -> anyhow::Result<Cluster> {
        let server = KubeApiServer::shared().await?;
        server.install_crds(&crd_dir()).await?;
        let admin = server.admin_client()?;
        install_chart_role(&admin).await?;
        Ok(Cluster { server, admin })
    }

    /// A client acting as the operator's ServiceAccount (RBAC as the chart grants it).
    pub fn operator_client(&self) -> anyhow::Result<Client> {
        Ok(self.server.impersonating_client(
            &Identity::new(OPERATOR_USER)
                .in_group("system:serviceaccounts")
                .in_group("system:authenticated"),
        )?)
    }

    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        Ok(self.server.create_namespace(prefix).await?)
    }

    /// Applies YAML documents (as a user would with kubectl apply --server-side).
    pub async fn apply_yaml(&self, namespace: &str, yaml: &str) -> anyhow::Result<()> {
        for object in weir_testkit::kube::yaml_documents::<DynamicObject>(yaml, "test yaml")? {
            let name = object.name_any();
            apply(&self.admin, namespace, &object, "kubectl")
                .await
                .with_context(|| format!("applying {name}"))?;
        }
        Ok(())
    }
}

/// The chart's ClusterRole (its rules, as the template has them) bound to the operator user.
async fn install_chart_role(admin: &Client) -> anyhow::Result<()> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weir/templates/clusterrole.yaml");
    let rules = chart_rules(&std::fs::read_to_string(&path)?)?;
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let params = PatchParams::apply("weir-test").force();
    roles
        .patch(
            "weir-operator",
            &params,
            &Patch::Apply(ClusterRole {
                metadata: kube::api::ObjectMeta {
                    name: Some("weir-operator".into()),
                    ..Default::default()
                },
                rules: Some(rules),
                ..Default::default()
            }),
        )
        .await?;
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    bindings
        .patch(
            "weir-operator",
            &params,
            &Patch::Apply(ClusterRoleBinding {
                metadata: kube::api::ObjectMeta {
                    name: Some("weir-operator".into()),
                    ..Default::default()
                },
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name: "weir-operator".into(),
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: "weir-operator".into(),
                    namespace: Some("weir-system".into()),
                    ..Default::default()
                }]),
            }),
        )
        .await?;
    Ok(())
}

/// The `rules:` of the chart's ClusterRole template: the lines after `rules:`, which hold
/// no template expressions.
pub fn chart_rules(template: &str) -> anyhow::Result<Vec<PolicyRule>> {
    let rules = template
        .split_once("\nrules:\n")
        .map(|(_, rules)| rules)
        .context("the ClusterRole template has no rules")?;
    anyhow::ensure!(
        !rules.contains("{{"),
        "the rules must hold no template expressions"
    );
    Ok(serde_yaml_ng::from_str(rules)?)
}

/// The operator running in this process; stopped when dropped.
pub struct Operator {
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), weir_operator::LostLease>>>,
}

impl Operator {
    pub fn start(client: Client, config: OperatorConfig) -> Operator {
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(weir_operator::run(
            client,
            config,
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Operator {
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the controllers and releases the Lease.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The operator's configuration for a test: its own Lease, a short resync.
pub fn config(lease: &str, identity: &str) -> OperatorConfig {
    OperatorConfig {
        identity: identity.to_owned(),
        lease_namespace: "default".to_owned(),
        lease_name: lease.to_owned(),
        lease_duration: Duration::from_secs(6),
        resync: Duration::from_secs(2),
        kafka_timeout: Duration::from_secs(10),
        worker_image: "weir-worker:test".to_owned(),
        ..OperatorConfig::default()
    }
}

/// A KafkaConnection named `default` to the harness's broker.
pub fn connection_yaml(kafka: &TestKafka) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {{name: default}}\nspec:\n  bootstrapServers: [\"{}\"]\n",
        kafka.bootstrap()
    )
}

/// Waits until `check` returns a value, polling the API server.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    eventually_within(DEADLINE, what, check).await
}

/// [`eventually`] with a deadline of its own.
pub async fn eventually_within<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = std::time::Instant::now();
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        anyhow::ensure!(
            start.elapsed() < deadline,
            "{what} not reached within {deadline:?} (last error: {last})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Ready condition of a resource's status (status, reason, message), if any.
pub fn ready(status: Option<&serde_json::Value>) -> Option<(String, String, String)> {
    let conditions = status?.get("conditions")?.as_array()?;
    let ready = conditions.iter().find(|c| c["type"] == json!("Ready"))?;
    Some((
        ready["status"].as_str()?.to_owned(),
        ready["reason"].as_str()?.to_owned(),
        ready["message"].as_str().unwrap_or_default().to_owned(),
    ))
}
