//! Namespaced mode (`operator.watchNamespaces: [one]`) against the real API server and the
//! real Kafka broker: the chart's rendered RBAC (its ClusterRole bound by a RoleBinding in
//! the watched namespace, and the Lease's Role in the release namespace) is applied as
//! rendered, and the operator runs in-process as the chart's ServiceAccount with exactly
//! that. It reconciles a KafkaConnection, a KafkaTopic and an EventPipeline in its
//! namespace; the real authorizer refuses it everywhere else.

use crate::common;
use crate::helm;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use weir_crds::KafkaTopic;
use weir_testkit::{Identity, KubeApiServer, TestKafka, unique_name};

use common::{Operator, connection_yaml, eventually, ready};

const PIPELINE: &str = r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {name: orders}
spec:
  source: {topics: [orders]}
  sinks:
    - postgres:
        urlFrom: {secretKeyRef: {name: orders-db, key: url}}
        table: orders
        mode: Insert
        columns: [{name: id, type: bigint}]
---
apiVersion: v1
kind: Secret
metadata: {name: orders-db}
stringData: {url: "postgres://CHANGE-ME@db:5432/orders"}
"#;

fn is_forbidden<T>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_with_the_namespaced_role_works_in_its_namespace_and_is_refused_elsewhere()
-> anyhow::Result<()> {
    let server = KubeApiServer::shared().await?;
    server.install_crds(&weir_testkit::kube::crd_dir()).await?;
    let admin = server.admin_client()?;
    let release_ns = server.create_namespace("weir-system").await?;
    let watched = server.create_namespace("team-a").await?;
    let other = server.create_namespace("team-b").await?;
    let release = unique_name("ns");

    // The chart's objects as rendered for namespaced mode, applied as Helm would.
    let values = json!({"crds": {"install": false}, "operator": {"watchNamespaces": [watched]}});
    let rendered = helm::render(&release, &release_ns, &values)?;
    assert!(helm::of_kind(&rendered.documents, "ClusterRoleBinding").is_empty());
    let rbac: Vec<Value> = rendered
        .documents
        .iter()
        .filter(|d| {
            d["apiVersion"] == "rbac.authorization.k8s.io/v1" || d["kind"] == "ServiceAccount"
        })
        .cloned()
        .collect();
    helm::apply_all(&admin, &release_ns, &rbac, "helm").await?;

    let identity = Identity::new(format!(
        "system:serviceaccount:{release_ns}:{release}-operator"
    ))
    .in_group("system:serviceaccounts")
    .in_group("system:authenticated");
    let client = server.impersonating_client(&identity)?;

    // The authorizer: the watched namespace yes; another namespace, or all, no.
    let in_watched: Api<KafkaTopic> = Api::namespaced(client.clone(), &watched);
    let in_other: Api<KafkaTopic> = Api::namespaced(client.clone(), &other);
    let everywhere: Api<KafkaTopic> = Api::all(client.clone());
    in_watched.list(&ListParams::default()).await?;
    assert!(is_forbidden(in_other.list(&ListParams::default()).await));
    assert!(is_forbidden(everywhere.list(&ListParams::default()).await));
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &other);
    assert!(
        is_forbidden(secrets.list(&ListParams::default()).await),
        "no Secrets elsewhere"
    );

    // The operator as the chart runs it: watching one namespace, its Lease in its own.
    let kafka = TestKafka::shared()?;
    let mut config = common::config(&format!("{release}-operator"), "op-namespaced");
    config.namespaces = vec![watched.clone()];
    config.lease_namespace = release_ns.clone();
    let operator = Operator::start(client.clone(), config);

    let apply = |ns: String, yaml: String| {
        let admin = admin.clone();
        async move {
            for object in
                weir_testkit::kube::yaml_documents::<kube::api::DynamicObject>(&yaml, "test")?
            {
                weir_testkit::kube::apply(&admin, &ns, &object, "kubectl").await?;
            }
            anyhow::Ok(())
        }
    };
    let topic = |name: &str| {
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {{name: {name}}}\nspec:\n  topicName: {name}\n  partitions: 1\n  deletionPolicy: Retain\n"
        )
    };
    let mine = unique_name("ns-topic");
    let theirs = unique_name("ns-topic");
    apply(watched.clone(), connection_yaml(&kafka)).await?;
    apply(watched.clone(), topic(&mine)).await?;
    apply(watched.clone(), PIPELINE.to_owned()).await?;
    apply(other.clone(), connection_yaml(&kafka)).await?;
    apply(other.clone(), topic(&theirs)).await?;

    let admin_topics: Api<KafkaTopic> = Api::namespaced(admin.clone(), &watched);
    eventually("the watched namespace's KafkaTopic Ready", || {
        let api = admin_topics.clone();
        let name = mine.clone();
        async move {
            let topic = api.get(&name).await?;
            let status = serde_json::to_value(&topic.status)?;
            Ok(ready(Some(&status)).filter(|(s, ..)| s == "True"))
        }
    })
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &watched);
    eventually("the watched namespace's pipeline Deployment", || {
        let api = deployments.clone();
        async move { Ok(api.get_opt("orders-worker").await?.map(|_| ())) }
    })
    .await?;

    // By now the operator has reconciled everything it can see; the other namespace's topic
    // was never touched, and the operator could not write its status if it tried.
    let other_topics: Api<KafkaTopic> = Api::namespaced(admin.clone(), &other);
    let untouched = other_topics.get(&theirs).await?;
    assert!(untouched.status.is_none(), "{:?}", untouched.status);
    assert!(untouched.metadata.finalizers.is_none());
    let status = Patch::Merge(json!({"status": {"observedGeneration": 1}}));
    assert!(is_forbidden(
        in_other
            .patch_status(&theirs, &PatchParams::default(), &status)
            .await
    ));
    operator.stop().await?;
    Ok(())
}
