//! KafkaConnection against the real API server and the real broker: Ready with the broker
//! count and cluster id; a connection whose Secret is missing reports it, and creating the
//! Secret is picked up through the Secret watch (well before any periodic retry).

use crate::common;

use std::time::Duration;

use common::{Cluster, Operator, config, connection_yaml, eventually_within, ready};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use weir_crds::KafkaConnection;
use weir_testkit::{TestKafka, unique_name};

async fn ready_of(
    api: &Api<KafkaConnection>,
    name: &str,
) -> anyhow::Result<Option<(String, String, String)>> {
    let status = serde_json::to_value(&api.get(name).await?.status)?;
    Ok(ready(Some(&status)))
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_with_brokers_and_a_new_secret_is_picked_up() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;
    let ns = cluster.namespace("connections").await?;
    let mut settings = config(&unique_name("lease"), "op-a");
    // Long enough that only the Secret watch can explain a prompt reconcile.
    settings.resync = Duration::from_secs(600);
    // A failing probe gives up after this, well inside the window below.
    settings.kafka_timeout = Duration::from_secs(3);
    let operator = Operator::start(cluster.operator_client()?, settings);
    let api: Api<KafkaConnection> = Api::namespaced(cluster.admin.clone(), &ns);

    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    eventually_within(common::DEADLINE, "the connection to be Ready", || async {
        Ok(ready_of(&api, "default").await?.filter(|r| r.0 == "True"))
    })
    .await?;
    let status = api.get("default").await?.status.unwrap_or_default();
    assert_eq!(status.brokers, Some(1));
    assert!(status.cluster_id.is_some_and(|id| !id.is_empty()));

    cluster
        .apply_yaml(
            &ns,
            &format!(
                "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {{name: secured}}\nspec:\n  bootstrapServers: [\"{}\"]\n  sasl:\n    mechanism: PLAIN\n    username: weir\n    passwordSecretRef: {{name: kafka-password, key: password}}\n",
                kafka.bootstrap()
            ),
        )
        .await?;
    let (_, reason, message) = eventually_within(
        common::DEADLINE,
        "the missing Secret to be reported",
        || async {
            Ok(ready_of(&api, "secured")
                .await?
                .filter(|r| r.1 == "SecretNotReady"))
        },
    )
    .await?;
    assert!(
        message.contains("Secret \"kafka-password\" does not exist"),
        "{reason}: {message}"
    );

    let secrets: Api<Secret> = Api::namespaced(cluster.admin.clone(), &ns);
    let mut secret = Secret::default();
    secret.metadata.name = Some("kafka-password".into());
    secret.string_data = Some([("password".to_owned(), "s3cret".to_owned())].into());
    secrets.create(&PostParams::default(), &secret).await?;
    // This listener speaks no SASL, so the connection now fails further on: it is no
    // longer the Secret, it is the SASL handshake. The retry after a failure is 20 s away;
    // the watch answers at once.
    let (_, reason, message) = eventually_within(
        Duration::from_secs(15),
        "the new Secret to be used",
        || async {
            Ok(ready_of(&api, "secured")
                .await?
                .filter(|r| r.1 != "SecretNotReady"))
        },
    )
    .await?;
    assert_eq!(reason, "AuthenticationFailed", "{message}");
    assert!(message.contains("SASL"), "{message}");
    assert!(
        !message.contains("s3cret"),
        "the password leaked into status: {message}"
    );
    operator.stop().await
}
