//! Failures the real API server and broker cannot be made to produce on demand, injected
//! with mocks (and only here): an API server answering 500 in the middle of a pipeline's
//! apply, and one that stops answering (a tower-test handle that asserts each request and
//! answers it, or not: kube-rs's mock-service style); a broker too slow to answer
//! (librdkafka's mock cluster with added latency). The reconcile fails with the cause
//! within its time limit, makes no further request, and is retried by the error policy
//! (at once, and without counting as a failure, when it only lost a write race: a 409).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use serde_json::json;
use tower_test::mock::{self, Handle};
use weir_crds::{EventPipeline, KafkaConnection, KafkaConnectionSpec, KafkaTopic, KafkaTopicSpec};
use weir_operator::config::OperatorConfig;
use weir_operator::context::{Context, Error};
use weir_operator::metrics::Metrics;

type ApiHandle = Handle<Request<Body>, Response<Body>>;

fn context(handle_namespace: &str, bootstrap: &str) -> anyhow::Result<(Arc<Context>, ApiHandle)> {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, handle_namespace.to_owned());
    let (connections, mut writer): (_, Writer<KafkaConnection>) = reflector::store();
    let spec: KafkaConnectionSpec =
        serde_json::from_value(json!({ "bootstrapServers": [bootstrap] }))?;
    let mut connection = KafkaConnection::new("default", spec);
    connection.metadata.namespace = Some(handle_namespace.to_owned());
    writer.apply_watcher_event(&watcher::Event::Apply(connection));
    let (topics, _) = reflector::store::<KafkaTopic>();
    let config = OperatorConfig {
        kafka_timeout: Duration::from_secs(2),
        reconcile_timeout: Duration::from_secs(4),
        ..OperatorConfig::default()
    };
    let ctx = Context::new(
        client,
        config,
        Arc::new(Metrics::default()),
        connections,
        topics,
    );
    Ok((Arc::new(ctx), handle))
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::from(serde_json::to_vec(&body).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The next request that is not an Event, which must arrive within `within`; Events
/// (a failed reconcile publishes a Warning one, in the background) are answered and their
/// bodies collected in `events`.
async fn next_within(
    handle: &mut ApiHandle,
    within: Duration,
    events: &mut Vec<serde_json::Value>,
) -> anyhow::Result<(
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
)> {
    loop {
        let (request, reply) = tokio::time::timeout(within, handle.next_request())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the client went away"))?;
        if !request.uri().path().starts_with("/apis/events.k8s.io/") {
            return Ok((request, reply));
        }
        let body = request.into_body().collect_bytes().await?;
        let body: serde_json::Value = serde_json::from_slice(&body)?;
        reply.send_response(answer(StatusCode::CREATED, body.clone()));
        events.push(body);
    }
}

/// The next request, which must arrive within five seconds.
async fn next(
    handle: &mut ApiHandle,
) -> anyhow::Result<(
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
)> {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the client went away"))
}

#[tokio::test]
async fn a_500_in_the_middle_of_an_apply_fails_the_reconcile_and_stops_there() -> anyhow::Result<()>
{
    let (ctx, mut handle) = context("shop", "127.0.0.1:9")?;
    let mut pipeline: EventPipeline = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "EventPipeline",
        "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1", "generation": 1},
        "spec": {"source": {"topics": ["orders"]},
                 "sinks": [{"postgres": {"url": "postgres://db/app", "table": "orders", "columns": [{"name": "id", "type": "bigint"}]}}]}
    }))?;
    pipeline.status = None;
    let reconcile = tokio::spawn(weir_operator::controllers::pipeline::reconcile(
        Arc::new(pipeline.clone()),
        ctx.clone(),
    ));

    let (request, reply) = next(&mut handle).await?;
    assert_eq!(request.method(), Method::GET);
    assert_eq!(
        request.uri().path(),
        "/apis/apps/v1/namespaces/shop/deployments/orders-worker"
    );
    reply.send_response(answer(StatusCode::NOT_FOUND, json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"
    })));
    let (request, reply) = next(&mut handle).await?;
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(
        request.uri().path(),
        "/api/v1/namespaces/shop/configmaps/orders-pipeline"
    );
    assert!(
        request
            .uri()
            .query()
            .unwrap_or_default()
            .contains("fieldManager=weir-operator")
    );
    reply.send_response(answer(StatusCode::INTERNAL_SERVER_ERROR, json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500,
        "message": "etcdserver: request timed out"
    })));

    let result = tokio::time::timeout(Duration::from_secs(5), reconcile).await??;
    match result {
        Err(Error::Kube(kube::Error::Api(status))) => assert_eq!(status.code, 500),
        other => anyhow::bail!("expected the 500 back, got {other:?}"),
    }
    // Nothing after the failed apply but the Warning Event naming the failure's category:
    // no Deployment applied on a half-written config.
    let mut events = Vec::new();
    assert!(
        next_within(&mut handle, Duration::from_millis(500), &mut events)
            .await
            .is_err(),
        "a request followed the failed apply"
    );
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "Warning", "{events:?}");
    assert_eq!(events[0]["reason"], "KubernetesApiError", "{events:?}");
    let action = weir_operator::controllers::pipeline::error_policy(
        Arc::new(pipeline),
        &Error::Connection("x".into()),
        ctx,
    );
    assert_ne!(
        action,
        kube::runtime::controller::Action::await_change(),
        "a failure must be retried"
    );
    Ok(())
}

#[tokio::test]
async fn an_api_server_that_stops_answering_times_the_reconcile_out() -> anyhow::Result<()> {
    let (ctx, mut handle) = context("shop", "127.0.0.1:9")?;
    let pipeline: EventPipeline = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "EventPipeline",
        "metadata": {"name": "orders", "namespace": "shop", "uid": "u-3", "generation": 1},
        "spec": {"source": {"topics": ["orders"]},
                 "sinks": [{"postgres": {"url": "postgres://db/app", "table": "orders", "columns": [{"name": "id", "type": "bigint"}]}}]}
    }))?;
    let reconcile = tokio::spawn(weir_operator::controllers::pipeline::reconcile(
        Arc::new(pipeline),
        ctx,
    ));
    // The first request is taken and never answered.
    let (request, _never_answered) = next(&mut handle).await?;
    assert_eq!(
        request.uri().path(),
        "/apis/apps/v1/namespaces/shop/deployments/orders-worker"
    );
    let result = tokio::time::timeout(Duration::from_secs(10), reconcile).await??;
    match result {
        Err(e @ Error::Timeout(_)) => {
            assert!(e.to_string().contains("did not finish within 4s"), "{e}")
        }
        other => anyhow::bail!("expected a timeout, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_too_slow_to_answer_times_the_reconcile_out_and_says_so() -> anyhow::Result<()> {
    let cluster = rdkafka::mocking::MockCluster::new(1)?;
    cluster.broker_round_trip_time(1, Duration::from_secs(30))?;
    let (ctx, mut handle) = context("shop", &cluster.bootstrap_servers())?;
    let topic: KafkaTopic = {
        let mut t = KafkaTopic::new(
            "orders",
            KafkaTopicSpec {
                partitions: 3,
                ..serde_json::from_value(json!({}))?
            },
        );
        t.metadata.namespace = Some("shop".into());
        t.metadata.uid = Some("u-2".into());
        t.metadata.generation = Some(1);
        t.metadata.resource_version = Some("7".into());
        t
    };
    let reconcile = tokio::spawn(weir_operator::controllers::topic::reconcile(
        Arc::new(topic),
        ctx,
    ));
    // The failure is written to status: Ready=False with the timeout in words; the wait is
    // shorter than the broker's 30 s, so only the reconcile's own timeout can answer it.
    let mut events = Vec::new();
    let (request, reply) = next_within(&mut handle, Duration::from_secs(20), &mut events).await?;
    assert_eq!(request.method(), Method::PATCH);
    assert_eq!(
        request.uri().path(),
        "/apis/weir.dev/v1alpha1/namespaces/shop/kafkatopics/orders/status"
    );
    let body = request.into_body().collect_bytes().await?;
    let body: serde_json::Value = serde_json::from_slice(&body)?;
    let conditions = body["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ready = conditions
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap_or_default();
    assert_eq!(ready["status"], "False", "{body}");
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no answer from the broker within 2s"),
        "{body}"
    );
    reply.send_response(answer(
        StatusCode::OK,
        json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "KafkaTopic",
            "metadata": {"name": "orders", "namespace": "shop"}, "spec": {"partitions": 3}
        }),
    ));
    let result = tokio::time::timeout(Duration::from_secs(5), reconcile).await??;
    assert!(matches!(result, Err(Error::Kafka(_))), "{result:?}");
    assert_eq!(
        ready["reason"], "KafkaUnreachable",
        "the failure's category is the reason"
    );
    // The Warning Event, with the category as its reason.
    let _ = next_within(&mut handle, Duration::from_millis(500), &mut events).await;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "Warning" && e["reason"] == "KafkaUnreachable"),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_lost_write_race_is_retried_at_once_and_is_not_counted_as_a_failure() -> anyhow::Result<()>
{
    let (ctx, _handle) = context("shop", "127.0.0.1:9")?;
    let topic = Arc::new({
        let mut t = KafkaTopic::new("orders", serde_json::from_value(json!({}))?);
        t.metadata.namespace = Some("shop".into());
        t
    });
    let conflict: kube::core::Status = serde_json::from_value(json!({
        "status": "Failure", "reason": "Conflict", "code": 409,
        "message": "the object has been modified; please apply your changes to the latest version"
    }))?;
    let conflict = Error::Kube(kube::Error::Api(Box::new(conflict)));
    let failure = Error::Connection("the broker is down".into());
    use kube::runtime::controller::Action;
    assert_eq!(
        weir_operator::controllers::topic::error_policy(topic.clone(), &conflict, ctx.clone()),
        Action::requeue(Duration::from_millis(200))
    );
    // The conflict did not count: the first real failure waits the first backoff step
    // (5 s ± 20 % jitter), the second the next (10 s ± 20 %).
    // Jittered waits are whole milliseconds.
    let within = |action: &Action, low: u64, high: u64| {
        (low..=high).any(|ms| *action == Action::requeue(Duration::from_millis(ms)))
    };
    let first =
        weir_operator::controllers::topic::error_policy(topic.clone(), &failure, ctx.clone());
    assert!(within(&first, 4_000, 6_000), "{first:?}");
    let second = weir_operator::controllers::topic::error_policy(topic, &failure, ctx);
    assert!(within(&second, 8_000, 12_000), "{second:?}");
    Ok(())
}
