//! Self-tests of the harness's Kubernetes API server (kube-apiserver on etcd, built from
//! Go modules): Weir's generated CRDs install, every example is accepted, objects that
//! break the schema or a CEL rule are refused with the message a user sees, and RBAC is
//! enforced by the real authorizer.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use weir_testkit::kube::{apply, crd_dir, yaml_documents};
use weir_testkit::{Identity, KubeApiServer, wait_for};

const FIELD_MANAGER: &str = "weir-test";

#[tokio::test]
async fn every_example_is_accepted_by_the_crds() -> anyhow::Result<()> {
    let server = KubeApiServer::shared().await?;
    let crds = server.install_crds(&crd_dir()).await?;
    for kind in ["eventpipelines", "kafkaconnections", "kafkatopics"] {
        let name = format!("{kind}.weir.dev");
        assert!(crds.contains(&name), "{name} not installed: {crds:?}");
    }
    let namespace = server.create_namespace("examples").await?;
    let client = server.admin_client()?;

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut applied = 0;
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        if path.extension().is_none_or(|ext| ext != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let what = path.display().to_string();
        for object in yaml_documents::<DynamicObject>(&text, &what)? {
            let name = object.metadata.name.clone().unwrap_or_default();
            let stored = apply(&client, &namespace, &object, FIELD_MANAGER)
                .await
                .with_context(|| format!("{what}: the API server refused {name}"))?;
            assert!(
                stored.metadata.uid.is_some(),
                "{what}: {name} was not stored"
            );
            applied += 1;
        }
    }
    assert!(applied >= 10, "only {applied} example objects were found");
    Ok(())
}

#[tokio::test]
async fn objects_breaking_the_schema_or_a_cel_rule_are_refused_with_the_users_message()
-> anyhow::Result<()> {
    let server = KubeApiServer::shared().await?;
    server.install_crds(&crd_dir()).await?;
    let namespace = server.create_namespace("invalid").await?;
    let client = server.admin_client()?;

    // Control: the valid forms of the objects below are accepted.
    for valid in [
        topic("partitions: 3"),
        pipeline("minReplicas: 1", "maxReplicas: 2", ""),
    ] {
        apply(&client, &namespace, &valid, FIELD_MANAGER)
            .await
            .context("a valid object was refused")?;
    }

    // (case, object, the message users see, the HTTP codes it comes with)
    let cases = [
        (
            "structural schema: partitions minimum",
            topic("partitions: 0"),
            "spec.partitions: Invalid value: 0: spec.partitions in body should be greater than or equal to 1",
            &[422][..],
        ),
        (
            "strict field validation: an unknown field",
            topic("partitionCount: 3"),
            ".spec.partitionCount: field not declared in schema",
            // Server-side apply answers an undeclared field with 500, not 400
            // (kubernetes/kubernetes#139253): a client must not retry it as transient.
            &[500, 400][..],
        ),
        (
            "CEL rule: minReplicas <= maxReplicas",
            pipeline("minReplicas: 5", "maxReplicas: 2", ""),
            r#"EventPipeline.weir.dev "orders-cache" is invalid: spec.scaling: Invalid value: minReplicas must not exceed maxReplicas"#,
            &[422][..],
        ),
        (
            "CEL rule: exactly one sink kind",
            pipeline("minReplicas: 1", "maxReplicas: 2", "kafka: {topic: copy}"),
            "spec.sinks[0]: Invalid value: set exactly one sink kind",
            &[422][..],
        ),
    ];
    for (case, object, message, codes) in cases {
        let refused = apply(&client, &namespace, &object, FIELD_MANAGER).await;
        let status = match refused {
            Err(kube::Error::Api(status)) => status,
            Err(other) => anyhow::bail!("{case}: not an API refusal: {other}"),
            Ok(_) => anyhow::bail!("{case}: the API server accepted the object"),
        };
        assert!(
            status.message.contains(message),
            "{case}: expected {message:?} in {:?}",
            status.message
        );
        assert!(codes.contains(&status.code), "{case}: {status:?}");
    }
    Ok(())
}

#[tokio::test]
async fn rbac_forbids_listing_kafka_topics_until_a_role_allows_it() -> anyhow::Result<()> {
    let nobody = Identity::new("nobody");
    let server = KubeApiServer::start(std::slice::from_ref(&nobody)).await?;
    server.install_crds(&crd_dir()).await?;
    let namespace = server.create_namespace("rbac").await?;
    let topics = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("weir.dev", "v1alpha1", "KafkaTopic"),
        "kafkatopics",
    );
    let list_topics = |client: kube::Client| {
        let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &topics);
        async move {
            api.list(&ListParams::default())
                .await
                .map(|l| l.items.len())
        }
    };

    // The admin may; a user without roles may not, by token or by impersonation, through a
    // client built in memory or from a written kubeconfig.
    assert_eq!(list_topics(server.admin_client()?).await?, 0);
    let from_file = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(server.write_kubeconfig("nobody")?)?,
            &KubeConfigOptions::default(),
        )
        .await?,
    )?;
    let clients = [
        ("token", server.client("nobody")?),
        ("impersonation", server.impersonating_client(&nobody)?),
        ("kubeconfig file", from_file),
    ];
    for (how, client) in &clients {
        match list_topics(client.clone()).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 403, "{how}: {status:?}");
                assert!(
                    status
                        .message
                        .contains(r#"User "nobody" cannot list resource "kafkatopics""#),
                    "{how}: {}",
                    status.message
                );
            }
            other => anyhow::bail!("{how}: listing as nobody was not forbidden: {other:?}"),
        }
    }

    // Once a RoleBinding grants it, the same token may list: the refusal came from RBAC.
    let rbac = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: topic-reader}
rules:
  - apiGroups: [weir.dev]
    resources: [kafkatopics]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: nobody-reads-topics}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: topic-reader}
subjects:
  - {apiGroup: rbac.authorization.k8s.io, kind: User, name: nobody}
"#;
    let admin = server.admin_client()?;
    for object in yaml_documents::<DynamicObject>(rbac, "the role")? {
        apply(&admin, &namespace, &object, FIELD_MANAGER).await?;
    }
    let token_client = server.client("nobody")?;
    wait_for("nobody may list topics", Duration::from_secs(30), || {
        let list = list_topics(token_client.clone());
        async move { list.await.ok() }
    })
    .await?;

    // Still nothing beyond the role: creating a topic stays forbidden.
    let topic_api: Api<DynamicObject> = Api::namespaced_with(token_client, &namespace, &topics);
    let created = topic_api
        .patch(
            "orders",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(topic("partitions: 1")),
        )
        .await;
    assert!(
        matches!(&created, Err(kube::Error::Api(status)) if status.code == 403),
        "{created:?}"
    );
    Ok(())
}

/// A KafkaTopic named `orders` whose spec has `spec_line`.
fn topic(spec_line: &str) -> DynamicObject {
    object(&format!(
        "apiVersion: weir.dev/v1alpha1
kind: KafkaTopic
metadata: {{name: orders}}
spec:
  {spec_line}
"
    ))
}

/// An EventPipeline with the given scaling bounds and `extra_sink_kind` added to its one
/// (Redis) sink.
fn pipeline(min: &str, max: &str, extra_sink_kind: &str) -> DynamicObject {
    object(&format!(
        "apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: orders-cache}}
spec:
  source: {{topics: [orders]}}
  sinks:
    - redis:
        urlFrom: {{env: REDIS_URL}}
        key: event.id
      {extra_sink_kind}
  scaling:
    {min}
    {max}
"
    ))
}

fn object(yaml: &str) -> DynamicObject {
    match yaml_documents::<DynamicObject>(yaml, "a test object") {
        Ok(mut objects) if objects.len() == 1 => objects.remove(0),
        other => panic!("test object does not parse: {other:?}\n{yaml}"),
    }
}
