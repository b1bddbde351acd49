//! `kubectl weir` against the real Kubernetes API server and the real Kafka broker: the
//! library function behind each subcommand, then the binary itself through a kubeconfig
//! written for the test API server. No operator runs here: where a test needs the status
//! the operator writes, it writes it to the status subresource itself.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use common::{Cluster, eventually};
use kube::api::{Api, Patch, PatchParams};
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use weir_crds::{EventPipeline, ReplayTarget};
use weir_operator::plugin::dead_letters::{self, headers};
use weir_operator::plugin::reset::{ResetRequest, ResetTo, TopicSelection};
use weir_operator::plugin::{self, Format, Kafka, PluginError, Target, groups, replay, reset};
use weir_testkit::TestKafka;

/// A namespace with a KafkaConnection `default` to the broker and a pipeline `orders`
/// reading `source` (two partitions) with dead-letter topic `dead`.
struct Fixture {
    cluster: Cluster,
    kafka: TestKafka,
    namespace: String,
    source: String,
    dead: String,
    target: Target,
}

impl Fixture {
    async fn new(prefix: &str) -> anyhow::Result<Fixture> {
        let cluster = Cluster::start().await?;
        let kafka = TestKafka::shared()?;
        let namespace = cluster.namespace(prefix).await?;
        let source = kafka.create_topic(&format!("{prefix}-src"), 2, &[]).await?;
        let dead = kafka.create_topic(&format!("{prefix}-dlq"), 1, &[]).await?;
        cluster
            .apply_yaml(&namespace, &common::connection_yaml(&kafka))
            .await?;
        cluster
            .apply_yaml(&namespace, &pipeline_yaml("orders", &source, &dead, None))
            .await?;
        let target = Target {
            client: cluster.admin.clone(),
            namespace: namespace.clone(),
            kafka_timeout: Duration::from_secs(10),
        };
        Ok(Fixture {
            cluster,
            kafka,
            namespace,
            source,
            dead,
            target,
        })
    }

    fn plugin_kafka(&self) -> anyhow::Result<Kafka> {
        Ok(Kafka::new(self.kafka.config(), Duration::from_secs(10))?)
    }

    fn group(&self) -> String {
        format!("{}.orders", self.namespace)
    }

    fn binary(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-weir"))
            .env("KUBECONFIG", self.cluster.server.kubeconfig())
            .args(["-n", &self.namespace])
            .args(args)
            .output()
            .context("running kubectl-weir")?;
        Ok(output)
    }
}

fn pipeline_yaml(name: &str, source: &str, dead: &str, connection: Option<&str>) -> String {
    let connection =
        connection.map_or_else(String::new, |c| format!("  connectionRef: {{name: {c}}}\n"));
    format!(
        r#"apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {{name: {name}}}
spec:
{connection}  source: {{topics: [{source}]}}
  sinks:
    - postgres:
        urlFrom: {{secretKeyRef: {{name: orders-db, key: url}}}}
        table: orders
        mode: Upsert
        keyColumns: [id]
        columns: [{{name: id, type: bigint}}]
  deadLetter: {{topic: {dead}, create: false}}
"#
    )
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    key: &str,
    value: &str,
    timestamp: Option<i64>,
    headers: OwnedHeaders,
) -> anyhow::Result<()> {
    let mut record = FutureRecord::to(topic)
        .partition(partition)
        .key(key)
        .payload(value)
        .headers(headers);
    if let Some(ts) = timestamp {
        record = record.timestamp(ts);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// A record as the worker dead-letters it (the headers of worker/src/dead_letter.rs), with
/// an application header of its own.
fn dead_letter_headers(source: &str, offset: i64) -> OwnedHeaders {
    let offset = offset.to_string();
    let mut out = OwnedHeaders::new().insert(Header {
        key: "trace-id",
        value: Some("abc"),
    });
    for (key, value) in [
        (headers::ERROR_CLASS, "permanent"),
        (headers::ERROR_MESSAGE, "column \"id\": not a bigint"),
        (headers::ATTEMPTS, "1"),
        (headers::SOURCE_TOPIC, source),
        (headers::SOURCE_PARTITION, "0"),
        (headers::SOURCE_OFFSET, offset.as_str()),
        (headers::FIRST_FAILURE, "2026-12-01T10:00:00.000Z"),
        (headers::SINK, "orders-db"),
    ] {
        out = out.insert(Header {
            key,
            value: Some(value),
        });
    }
    out
}

/// A consumer in `group` on `topic`, polled in the background until dropped.
struct Member {
    task: tokio::task::JoinHandle<()>,
}

impl Member {
    fn join(kafka: &TestKafka, group: &str, topic: &str) -> anyhow::Result<Member> {
        let consumer: StreamConsumer = kafka.consumer(group)?;
        consumer.subscribe(&[topic])?;
        let task = tokio::spawn(async move {
            loop {
                let _ = consumer.recv().await;
            }
        });
        Ok(Member { task })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_live_lag_per_partition_and_what_the_operator_wrote() -> anyhow::Result<()> {
    let f = Fixture::new("plugin-status").await?;
    let producer = f.kafka.producer()?;
    for i in 0..5 {
        produce(
            &producer,
            &f.source,
            0,
            "k",
            &format!("{{\"id\":{i}}}"),
            None,
            OwnedHeaders::new(),
        )
        .await?;
    }
    for i in 0..3 {
        produce(
            &producer,
            &f.source,
            1,
            "k",
            &format!("{{\"id\":{i}}}"),
            None,
            OwnedHeaders::new(),
        )
        .await?;
    }
    // Then an aborted transaction of 2 records on partition 1: 3 offsets (the records and
    // the abort marker) that no read_committed consumer receives.
    let config = f.kafka.config();
    let topic = f.source.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use rdkafka::producer::{BaseRecord, Producer as _, ThreadedProducer};
        let timeout = Duration::from_secs(20);
        let producer: ThreadedProducer<_> = config
            .clone()
            .set(
                "transactional.id",
                weir_testkit::unique_name("plugin-status-txn"),
            )
            .create()?;
        producer.init_transactions(timeout)?;
        producer.begin_transaction()?;
        for i in 0..2 {
            let value = format!("{{\"aborted\":{i}}}");
            producer
                .send(BaseRecord::to(&topic).partition(1).key("k").payload(&value))
                .map_err(|(e, _)| e)?;
        }
        producer.flush(timeout)?;
        producer.abort_transaction(timeout)?;
        Ok(())
    })
    .await??;
    // The group committed 2 on partition 0 and nothing on partition 1.
    let committed = BTreeMap::from([((f.source.clone(), 0), 2)]);
    f.plugin_kafka()?.commit(&f.group(), &committed).await?;
    // The status the operator writes.
    let pipelines: Api<EventPipeline> = Api::namespaced(f.cluster.admin.clone(), &f.namespace);
    pipelines
        .patch_status(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "replicas": 2, "readyReplicas": 1, "desiredReplicas": 3,
                "consumptionRate": 2.0, "arrivalRate": 0.5,
                "lastScaleTime": "2026-12-01T09:00:00Z", "lastScaleReason": "lag 6 over 2 workers",
                "lastReplay": {"token": "t1", "completedAt": "2026-12-01T08:00:00Z", "truncated": true},
                "conditions": [{"type": "Ready", "status": "True", "reason": "Running",
                    "message": "2 workers", "lastTransitionTime": "2026-12-01T09:00:00Z"}],
            }})),
        )
        .await?;

    let status = plugin::status::status(&f.target, "orders").await?;
    let lags: Vec<(i32, Option<i64>, i64, i64)> = status
        .partitions
        .iter()
        .map(|p| (p.partition, p.committed, p.end, p.lag))
        .collect();
    assert_eq!(lags, vec![(0, Some(2), 5, 3), (1, None, 6, 3)]);
    assert_eq!(status.lag, 6);
    assert_eq!(status.consumer_group, f.group());
    assert_eq!(status.replicas, Some(2));
    assert_eq!(status.drain_seconds, Some(3.0));
    assert_eq!(
        status.last_replay.as_ref().map(|r| r.token.as_str()),
        Some("t1")
    );
    let table = plugin::render(&status, Format::Table)?;
    assert!(
        table.contains("2 asked, 1 ready, 3 wanted by the autoscaler"),
        "{table}"
    );
    assert!(table.contains("drains in 3s"), "{table}");
    assert!(
        table.contains("t1 at 2026-12-01T08:00:00Z, sinks truncated"),
        "{table}"
    );
    assert!(table.contains("Ready       True     Running"), "{table}");
    let header = table
        .lines()
        .find(|l| l.starts_with("TOPIC"))
        .context("no table")?;
    assert!(
        header.contains("COMMITTED") && header.contains("LAG"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&plugin::render(&status, Format::Json)?)?;
    assert_eq!(json["partitions"][0]["lag"], 3);
    let yaml: serde_json::Value = serde_yaml_ng::from_str(&plugin::render(&status, Format::Yaml)?)?;
    assert_eq!(yaml["lag"], 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_name_the_object_and_the_fix() -> anyhow::Result<()> {
    let f = Fixture::new("plugin-errors").await?;
    let missing = plugin::status::status(&f.target, "nope").await.unwrap_err();
    assert!(
        matches!(missing, PluginError::PipelineNotFound { .. }),
        "{missing}"
    );
    let text = missing.to_string();
    assert!(
        text.contains(&format!("EventPipeline {}/nope not found", f.namespace)),
        "{text}"
    );

    f.cluster
        .apply_yaml(
            &f.namespace,
            &pipeline_yaml("elsewhere", &f.source, &f.dead, Some("other")),
        )
        .await?;
    let text = plugin::status::status(&f.target, "elsewhere")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains(&format!("KafkaConnection {}/other not found", f.namespace)),
        "{text}"
    );
    assert!(
        text.contains("spec.connectionRef of EventPipeline elsewhere"),
        "{text}"
    );

    let secured = format!(
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {{name: other}}\nspec:\n  bootstrapServers: [\"{}\"]\n  sasl: {{mechanism: SCRAM-SHA-512, username: u, passwordSecretRef: {{name: kafka-pass, key: password}}}}\n",
        f.kafka.bootstrap()
    );
    f.cluster.apply_yaml(&f.namespace, &secured).await?;
    let text = plugin::status::status(&f.target, "elsewhere")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("Secret \"kafka-pass\" does not exist"),
        "{text}"
    );
    assert!(text.contains("spec.sasl.passwordSecretRef"), "{text}");

    // A connection the operator reported unusable is named with its reason.
    let connections: Api<weir_crds::KafkaConnection> =
        Api::namespaced(f.cluster.admin.clone(), &f.namespace);
    connections
        .patch_status(
            "other",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"conditions": [{"type": "Ready", "status": "False",
                "reason": "AuthenticationFailed", "message": "wrong password",
                "lastTransitionTime": "2026-12-01T09:00:00Z"}]}}),
            ),
        )
        .await?;
    let error = plugin::status::status(&f.target, "elsewhere")
        .await
        .unwrap_err();
    assert!(
        matches!(error, PluginError::ConnectionNotReady { .. }),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("AuthenticationFailed: wrong password"),
        "{error}"
    );

    let text = dead_letters::list(&f.target, "nope", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("not found"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn groups_lists_and_describes_a_group_with_its_members() -> anyhow::Result<()> {
    let f = Fixture::new("plugin-groups").await?;
    let kafka = f.plugin_kafka()?;
    let group = format!("{}-readers", f.source);
    let _member = Member::join(&f.kafka, &group, &f.source)?;
    let description = eventually("the member holds both partitions", || async {
        let d = groups::describe(&kafka, &group).await?;
        let held: usize = d.members.iter().map(|m| m.partitions.len()).sum();
        Ok((d.state == "Stable" && held == 2).then_some(d))
    })
    .await?;
    assert_eq!(description.members.len(), 1);
    assert_eq!(
        description.members[0].partitions,
        vec![(f.source.clone(), 0), (f.source.clone(), 1)]
    );
    let table = plugin::render(&description, Format::Table)?;
    assert!(
        table.contains(&format!("Group:    {group} (Stable, 1 member(s)")),
        "{table}"
    );
    assert!(table.contains(&format!("{0}/0,{0}/1", f.source)), "{table}");

    let list = groups::list(&kafka).await?;
    let line = list
        .groups
        .iter()
        .find(|g| g.name == group)
        .context("the group is listed")?;
    assert_eq!((line.state.as_str(), line.members), ("Stable", 1));
    let table = plugin::render(&list, Format::Table)?;
    assert!(table.starts_with("GROUP"), "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_offsets_is_refused_while_the_group_has_members_and_dry_run_shows_the_plan()
-> anyhow::Result<()> {
    let f = Fixture::new("plugin-reset").await?;
    let kafka = f.plugin_kafka()?;
    let producer = f.kafka.producer()?;
    // Partition 0: four records one second apart, from a known time.
    let base = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64 - 60_000;
    for i in 0..4 {
        produce(
            &producer,
            &f.source,
            0,
            "k",
            "{}",
            Some(base + i * 1000),
            OwnedHeaders::new(),
        )
        .await?;
    }
    let group = format!("{}-app", f.source);
    let member = Member::join(&f.kafka, &group, &f.source)?;
    eventually("the group is Stable with a member", || async {
        let g = kafka.groups(Some(&group)).await?;
        Ok(g.first()
            .filter(|g| g.state == "Stable" && !g.members.is_empty())
            .map(|_| ()))
    })
    .await?;
    let request = ResetRequest {
        group: group.clone(),
        topics: vec![TopicSelection {
            topic: f.source.clone(),
            partitions: None,
        }],
        to: ResetTo::Earliest,
        dry_run: true,
    };
    let plan = reset::reset(&kafka, &request).await?;
    assert!(!plan.executed);
    assert_eq!(plan.members, 1);
    let moves: Vec<(i32, i64)> = plan
        .partitions
        .iter()
        .map(|p| (p.partition, p.new))
        .collect();
    assert_eq!(moves, vec![(0, 0), (1, 0)]);
    let table = plugin::render(&plan, Format::Table)?;
    assert!(table.contains("NEW-OFFSET"), "{table}");
    assert!(table.contains("Dry run: nothing committed"), "{table}");
    assert!(table.contains("refused until they stop"), "{table}");

    let refused = reset::reset(
        &kafka,
        &ResetRequest {
            to: ResetTo::Latest,
            dry_run: false,
            ..request.clone()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(refused, PluginError::GroupActive { members: 1, .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("stop them first"), "{refused}");
    assert!(
        f.kafka.committed_offsets(&group, &f.source)?.is_empty(),
        "nothing committed"
    );

    drop(member);
    eventually("the group has no members", || async {
        let g = kafka.groups(Some(&group)).await?;
        Ok(g.first().is_none_or(|g| g.members.is_empty()).then_some(()))
    })
    .await?;
    let committed = |kafka: &TestKafka| -> anyhow::Result<HashMap<i32, i64>> {
        Ok(kafka.committed_offsets(&group, &f.source)?)
    };
    reset::reset(
        &kafka,
        &ResetRequest {
            to: ResetTo::Latest,
            dry_run: false,
            ..request.clone()
        },
    )
    .await?;
    assert_eq!(committed(&f.kafka)?, HashMap::from([(0, 4), (1, 0)]));
    // By time: the first record at or after base + 2.5 s is offset 3; partition 1 has
    // none, so it goes to its end.
    let by_time = reset::reset(
        &kafka,
        &ResetRequest {
            to: ResetTo::Time(base + 2500),
            dry_run: false,
            ..request.clone()
        },
    )
    .await?;
    assert!(by_time.executed);
    assert_eq!(committed(&f.kafka)?, HashMap::from([(0, 3), (1, 0)]));
    // One partition, to an offset.
    reset::reset(
        &kafka,
        &ResetRequest {
            topics: vec![format!("{}:0", f.source).parse()?],
            to: ResetTo::Offset(1),
            dry_run: false,
            ..request.clone()
        },
    )
    .await?;
    assert_eq!(committed(&f.kafka)?, HashMap::from([(0, 1), (1, 0)]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_with_their_headers_and_followed() -> anyhow::Result<()> {
    let f = Fixture::new("plugin-dlq").await?;
    let producer = f.kafka.producer()?;
    for offset in [7, 9] {
        produce(
            &producer,
            &f.dead,
            0,
            "order-1",
            "{\"id\":\"x\"}",
            None,
            dead_letter_headers(&f.source, offset),
        )
        .await?;
    }
    let list = dead_letters::list(&f.target, "orders", None).await?;
    assert_eq!(list.dead_letters.len(), 2);
    let first = &list.dead_letters[0];
    assert_eq!(first.error_class.as_deref(), Some("permanent"));
    assert_eq!(
        first.error_message.as_deref(),
        Some("column \"id\": not a bigint")
    );
    assert_eq!(first.source_offset.as_deref(), Some("7"));
    assert_eq!(first.sink.as_deref(), Some("orders-db"));
    assert_eq!(first.key.as_deref(), Some("order-1"));
    let table = plugin::render(&list, Format::Table)?;
    assert!(table.contains(&format!("{}/0@9", f.source)), "{table}");
    assert!(table.contains("permanent"), "{table}");
    let future = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64 + 3_600_000;
    assert!(
        dead_letters::list(&f.target, "orders", Some(future))
            .await?
            .dead_letters
            .is_empty()
    );

    let (_, follow) = dead_letters::list_and_follow(&f.target, "orders", None).await?;
    produce(
        &producer,
        &f.dead,
        0,
        "order-2",
        "{}",
        None,
        dead_letter_headers(&f.source, 11),
    )
    .await?;
    let next = eventually("the new dead letter is followed", || async {
        Ok(follow.next(Duration::from_millis(200)).await?)
    })
    .await?;
    assert_eq!(next.source_offset.as_deref(), Some("11"));
    Ok(())
}

/// Every committed record on `topic` now (read_committed, from the start until each
/// partition reports its end): payload and headers.
async fn read_all(
    kafka: &TestKafka,
    topic: &str,
) -> anyhow::Result<Vec<(String, Vec<(String, String)>)>> {
    let consumer: StreamConsumer = kafka
        .config()
        .set("group.id", format!("{topic}-reader-{}", fastrand::u64(..)))
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut list = rdkafka::TopicPartitionList::new();
    let mut open = std::collections::BTreeSet::new();
    for p in metadata.topics()[0].partitions() {
        list.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)?;
        open.insert(p.id());
    }
    consumer.assign(&list)?;
    let mut out = Vec::new();
    while !open.is_empty() {
        let m = match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await? {
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                open.remove(&p);
                continue;
            }
            other => other?,
        };
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            headers,
        ));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn redrive_resends_each_dead_letter_once_and_a_second_run_sends_nothing() -> anyhow::Result<()>
{
    let f = Fixture::new("plugin-redrive").await?;
    let producer = f.kafka.producer()?;
    for i in 0..3 {
        produce(
            &producer,
            &f.dead,
            0,
            &format!("k{i}"),
            &format!("{{\"id\":{i}}}"),
            None,
            dead_letter_headers(&f.source, i),
        )
        .await?;
    }
    let first = dead_letters::redrive(&f.target, "orders", None).await?;
    assert_eq!(first.total(), 3);
    assert_eq!(first.sent, BTreeMap::from([(f.source.clone(), 3)]));
    let again = dead_letters::redrive(&f.target, "orders", None).await?;
    assert_eq!(again.total(), 0, "{again:?}");
    assert!(plugin::render(&again, Format::Table)?.starts_with("Nothing to redrive"));
    let records = read_all(&f.kafka, &f.source).await?;
    assert_eq!(records.len(), 3, "sent once each");
    let mut values: Vec<&str> = records.iter().map(|(v, _)| v.as_str()).collect();
    values.sort();
    assert_eq!(values, vec!["{\"id\":0}", "{\"id\":1}", "{\"id\":2}"]);
    let names: Vec<&str> = records[0].1.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        vec!["trace-id", headers::REDRIVEN_FROM],
        "error headers removed"
    );

    // One more dead letter: only it is sent, and through the binary.
    produce(
        &producer,
        &f.dead,
        0,
        "k3",
        "{\"id\":3}",
        None,
        dead_letter_headers(&f.source, 3),
    )
    .await?;
    let output = f.binary(&["redrive", "orders"])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Re-sent 1 dead letter(s)"), "{stdout}");
    let output = f.binary(&["redrive", "orders", "-o", "json"])?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(report["sent"], json!({}));
    assert_eq!(read_all(&f.kafka, &f.source).await?.len(), 4);

    // Two redrives at once: the second fences the first (same transactional id), so each
    // new dead letter still reaches the source topic once, whichever of them sends it.
    for i in 4..9 {
        produce(
            &producer,
            &f.dead,
            0,
            &format!("k{i}"),
            "{}",
            None,
            dead_letter_headers(&f.source, i),
        )
        .await?;
    }
    let (a, b) = tokio::join!(
        dead_letters::redrive(&f.target, "orders", None),
        dead_letters::redrive(&f.target, "orders", None)
    );
    assert!(a.is_ok() || b.is_ok(), "{a:?} {b:?}");
    assert_eq!(read_all(&f.kafka, &f.source).await?.len(), 9, "{a:?} {b:?}");
    assert_eq!(
        dead_letters::redrive(&f.target, "orders", None)
            .await?
            .total(),
        0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_writes_a_new_token_and_replaces_the_previous_replay() -> anyhow::Result<()> {
    let f = Fixture::new("plugin-replay").await?;
    let pipelines: Api<EventPipeline> = Api::namespaced(f.cluster.admin.clone(), &f.namespace);
    let written = replay::replay(
        &f.target,
        "orders",
        "2026-11-23T10:00:00Z".parse()?,
        false,
        Some("r1".into()),
    )
    .await?;
    assert_eq!(written.replay.to, ReplayTarget::Timestamp);
    let spec = pipelines
        .get("orders")
        .await?
        .spec
        .replay
        .context("spec.replay")?;
    assert_eq!(spec.token, "r1");
    assert_eq!(spec.timestamp.as_deref(), Some("2026-11-23T10:00:00.000Z"));

    replay::replay(
        &f.target,
        "orders",
        "earliest".parse()?,
        true,
        Some("r2".into()),
    )
    .await?;
    let spec = pipelines
        .get("orders")
        .await?
        .spec
        .replay
        .context("spec.replay")?;
    assert_eq!(
        (spec.token.as_str(), spec.to, spec.truncate_sinks),
        ("r2", ReplayTarget::Earliest, true)
    );
    assert_eq!(
        spec.timestamp, None,
        "the previous replay's timestamp is gone"
    );

    let same = replay::replay(
        &f.target,
        "orders",
        "latest".parse()?,
        false,
        Some("r2".into()),
    )
    .await
    .unwrap_err();
    assert!(
        same.to_string().contains("already has replay token \"r2\""),
        "{same}"
    );

    let output = f.binary(&[
        "replay",
        "orders",
        "--to",
        &format!("{}:1=5", f.source),
        "-o",
        "yaml",
    ])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_yaml_ng::from_slice(&output.stdout)?;
    assert_eq!(printed["replay"]["to"], "Offsets");
    let spec = pipelines
        .get("orders")
        .await?
        .spec
        .replay
        .context("spec.replay")?;
    assert_eq!(spec.offsets.len(), 1);
    assert_eq!((spec.offsets[0].partition, spec.offsets[0].offset), (1, 5));
    assert!(spec.token.starts_with("replay-"), "{}", spec.token);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_reads_the_kubeconfig_and_prints_tables_json_and_clear_errors()
-> anyhow::Result<()> {
    let f = Fixture::new("plugin-bin").await?;
    let producer = f.kafka.producer()?;
    produce(
        &producer,
        &f.source,
        1,
        "k",
        "{}",
        None,
        OwnedHeaders::new(),
    )
    .await?;
    produce(
        &producer,
        &f.dead,
        0,
        "k",
        "{}",
        None,
        dead_letter_headers(&f.source, 0),
    )
    .await?;

    let output = f.binary(&["status", "orders"])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("Pipeline:        {}/orders", f.namespace)),
        "{stdout}"
    );
    assert!(stdout.contains("Lag:             1 records"), "{stdout}");

    let output = f.binary(&["status", "orders", "-o", "json"])?;
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(status["partitions"][1]["end"], 1);

    let output = f.binary(&["dead-letters", "orders"])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("PARTITION@OFFSET"), "{stdout}");
    assert!(stdout.contains("not a bigint"), "{stdout}");

    let group = format!("{}-bin", f.source);
    let output = f.binary(&[
        "reset-offsets",
        &group,
        "--to",
        "latest",
        "--topic",
        &f.source,
        "--dry-run",
    ])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Dry run: nothing committed"), "{stdout}");
    assert!(f.kafka.committed_offsets(&group, &f.source)?.is_empty());
    let output = f.binary(&[
        "reset-offsets",
        &group,
        "--to",
        "latest",
        "--topic",
        &f.source,
    ])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        f.kafka.committed_offsets(&group, &f.source)?,
        HashMap::from([(0, 0), (1, 1)])
    );

    let output = f.binary(&["groups", "-o", "yaml"])?;
    let list: serde_json::Value = serde_yaml_ng::from_slice(&output.stdout)?;
    assert!(
        list["groups"]
            .as_array()
            .is_some_and(|g| g.iter().any(|g| g["name"] == json!(group))),
        "{list}"
    );
    let output = f.binary(&["groups", "describe", &group])?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("Group:    {group} (Empty, 0 member(s)")),
        "{stdout}"
    );

    let output = f.binary(&["status", "missing"])?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "error: EventPipeline {}/missing not found",
            f.namespace
        )),
        "{stderr}"
    );
    Ok(())
}
