//! The kafka sink against the real broker: records from expressions, partitioned by key;
//! exactly-once Kafka→Kafka through transactions, proven by SIGKILL at random moments and a
//! zombie worker (SIGSTOP until its partitions moved, then SIGCONT), read back with
//! `isolation.level=read_committed`.

use crate::common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::{
    DEADLINE, committed_total, events, kafka, pipeline, produce, read_topic, start_with_args,
    wait_committed_async, wait_until, wake_zombie,
};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use serde_json::{Value, json};
use weir_testkit::{TestKafka, unique_name};

/// `(key, {"id": id})`, keys `id % 97`: each key's ids increase in produce order.
/// One record read back.
#[derive(Debug)]
struct Out {
    partition: i32,
    key: Option<String>,
    value: Value,
    headers: HashMap<String, String>,
}

/// Every committed record of `topic`, read with `isolation.level=read_committed` until
/// `count` have arrived and every partition is at its end.
fn read_committed(kafka: &TestKafka, topic: &str, count: usize) -> anyhow::Result<Vec<Out>> {
    let consumer: BaseConsumer = kafka
        .config()
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()?;
    consumer.subscribe(&[topic])?;
    let partitions = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))?
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len());
    let mut out = Vec::new();
    let mut at_end = HashSet::new();
    let start = Instant::now();
    while out.len() < count || at_end.len() < partitions {
        anyhow::ensure!(
            start.elapsed() < DEADLINE,
            "read {} of {count} records from {topic} ({} of {partitions} partitions at their end)",
            out.len(),
            at_end.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                at_end.remove(&message.partition());
                let mut headers = HashMap::new();
                if let Some(h) = message.headers() {
                    for header in h.iter() {
                        headers.insert(
                            header.key.to_owned(),
                            String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                out.push(Out {
                    partition: message.partition(),
                    key: message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned()),
                    value: message
                        .payload()
                        .and_then(|p| serde_json::from_slice(p).ok())
                        .unwrap_or(Value::Null),
                    headers,
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    consumer.unsubscribe();
    Ok(out)
}

/// Every input exactly once, each key on one partition with its ids in increasing order.
fn assert_exactly_once_in_key_order(out: &[Out], total: i64) {
    let ids: Vec<i64> = out.iter().filter_map(|o| o.value["id"].as_i64()).collect();
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len() as i64, total, "records in the output");
    assert_eq!(
        distinct.len() as i64,
        total,
        "distinct events in the output"
    );
    let mut by_key: BTreeMap<String, (i32, i64)> = BTreeMap::new();
    for o in out {
        let key = o.key.clone().unwrap_or_default();
        let id = o.value["id"].as_i64().unwrap_or(-1);
        if let Some((partition, last)) = by_key.get(&key) {
            assert_eq!(*partition, o.partition, "key {key} on one partition");
            assert!(id > *last, "key {key}: {id} after {last}");
        }
        by_key.insert(key, (o.partition, id));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_sink_writes_key_value_and_headers_from_expressions_partitioned_by_key()
-> anyhow::Result<()> {
    let kafka = kafka().await?;
    let input = kafka.create_topic("ks-in", 2, &[]).await?;
    let output = kafka.create_topic("ks-out", 3, &[]).await?;
    let doc = pipeline(
        "ks-alo",
        json!({
            "source": {"topics": [&input]},
            "sinks": [{"kafka": {
                "topic": &output,
                "key": "\"user-\" + string(event.id % 5)",
                "value": "{\"id\": event.id, \"copy\": true}",
                "headers": {"x-source-topic": "topic"},
                "compression": "Lz4",
            }}],
            "batch": {"maxRecords": 100, "maxWait": "20ms"},
        }),
    );
    let dir = tempfile::tempdir()?;
    let mut worker = start_with_args(dir.path(), &kafka, &doc, &[], &[])?;
    produce(&kafka, &input, &events(0..500)).await?;
    wait_committed_async(&kafka, "test.ks-alo", &input, 500)
        .await
        .with_context(|| worker.log_text())?;
    let out = tokio::task::spawn_blocking({
        let (kafka, output) = (kafka.clone(), output.clone());
        move || read_committed(&kafka, &output, 500)
    })
    .await??;
    assert_eq!(out.len(), 500);
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    for o in &out {
        let id = o.value["id"].as_i64().context("id")?;
        assert_eq!(o.value["copy"], json!(true));
        assert_eq!(o.key.as_deref(), Some(format!("user-{}", id % 5).as_str()));
        assert_eq!(o.headers.get("x-source-topic"), Some(&input));
        let p = *partition_of
            .entry(o.key.clone().unwrap_or_default())
            .or_insert(o.partition);
        assert_eq!(p, o.partition, "one partition per key");
    }
    worker.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_sink_without_expressions_copies_each_record_as_it_is() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let input = kafka.create_topic("ks-copy-in", 1, &[]).await?;
    let output = kafka.create_topic("ks-copy-out", 1, &[]).await?;
    let doc = pipeline(
        "ks-copy",
        json!({
            "source": {"topics": [&input]},
            "sinks": [{"kafka": {"topic": &output}}],
            "batch": {"maxWait": "20ms"},
        }),
    );
    let dir = tempfile::tempdir()?;
    let mut worker = start_with_args(dir.path(), &kafka, &doc, &[], &[])?;
    produce(&kafka, &input, &events(0..50)).await?;
    let out = tokio::task::spawn_blocking({
        let (kafka, output) = (kafka.clone(), output.clone());
        move || read_committed(&kafka, &output, 50)
    })
    .await??;
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o.value, json!({"id": i}));
        assert_eq!(o.key.as_deref(), Some((i % 97).to_string().as_str()));
    }
    worker.stop()?;
    Ok(())
}

/// `format: Raw`: the kafka sink without a value expression copies each record's bytes,
/// whatever they are (they used to arrive as a JSON string of their lossy text).
#[tokio::test(flavor = "multi_thread")]
async fn raw_records_are_copied_byte_for_byte() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let input = kafka.create_topic("ks-raw-in", 1, &[]).await?;
    let output = kafka.create_topic("ks-raw-out", 1, &[]).await?;
    let doc = pipeline(
        "ks-raw",
        json!({
            "source": {"topics": [&input], "format": "Raw"},
            "sinks": [{"kafka": {"topic": &output}}],
            "batch": {"maxWait": "20ms"},
        }),
    );
    let sent: Vec<(String, Vec<u8>)> = vec![
        ("a".into(), b"plain text, not JSON".to_vec()),
        ("b".into(), b"{ \"id\" : 1 }".to_vec()),
        ("c".into(), vec![0xff, 0x00, 0xfe, b'x']),
    ];
    let dir = tempfile::tempdir()?;
    let mut worker = start_with_args(dir.path(), &kafka, &doc, &[], &[])?;
    produce(&kafka, &input, &sent).await?;
    let count = sent.len();
    let out = tokio::task::spawn_blocking({
        let (kafka, output) = (kafka.clone(), output.clone());
        move || read_topic(&kafka, &output, count)
    })
    .await??;
    let values: Vec<Option<Vec<u8>>> = out.into_iter().map(|(value, _)| value).collect();
    let expected: Vec<Option<Vec<u8>>> = sent.iter().map(|(_, v)| Some(v.clone())).collect();
    assert_eq!(values, expected);
    worker.stop()?;
    Ok(())
}

fn exactly_once_pipeline(name: &str, input: &str, output: &str, batch: Value) -> Value {
    pipeline(
        name,
        json!({
            "source": {"topics": [input]},
            "sinks": [{"kafka": {"topic": output}}],
            "delivery": "ExactlyOnce",
            "batch": batch,
            "retry": {"initialBackoff": "100ms", "maxBackoff": "1s"},
        }),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_exactly_once_sigkill_at_20_random_moments_output_has_every_input_once_in_key_order()
-> anyhow::Result<()> {
    const TOTAL: i64 = 50_000;
    let kafka = kafka().await?;
    let input = kafka.create_topic("eo-k-in", 4, &[]).await?;
    let output = kafka.create_topic("eo-k-out", 4, &[]).await?;
    let doc = exactly_once_pipeline(
        "eo-k-kill",
        &input,
        &output,
        json!({"maxRecords": 500, "maxWait": "20ms"}),
    );
    let dir = tempfile::tempdir()?;
    let producer = {
        let (kafka, input) = (kafka.clone(), input.clone());
        tokio::spawn(async move {
            for chunk in 0..50 {
                produce(&kafka, &input, &events(chunk * 1000..(chunk + 1) * 1000)).await?;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            anyhow::Ok(())
        })
    };
    // The same identity each time, as a restarted pod has: its transactional id fences
    // (and aborts) what the killed one left open.
    let start = || {
        start_with_args(
            dir.path(),
            &kafka,
            &doc,
            &[],
            &["--instance-id", "worker-0"],
        )
    };
    let mut rng = fastrand::Rng::with_seed(47);
    let mut last = 0;
    for kill in 0..20 {
        let mut worker = start()?;
        let (k, t) = (kafka.clone(), input.clone());
        let progressed = tokio::task::spawn_blocking(move || {
            wait_until("progress since the last kill", DEADLINE, || {
                let committed = committed_total(&k, "test.eo-k-kill", &t).unwrap_or(last);
                Ok((committed > last || committed >= TOTAL).then_some(committed))
            })
        })
        .await?
        .with_context(|| format!("kill {kill}: {}", worker.log_text()))?;
        last = progressed;
        // Mid-transaction, between produce and commit, or idle.
        tokio::time::sleep(Duration::from_millis(rng.u64(0..150))).await;
        worker.signal("KILL")?;
        worker.wait(DEADLINE)?;
    }
    producer.await??;
    let mut worker = start()?;
    wait_committed_async(&kafka, "test.eo-k-kill", &input, TOTAL)
        .await
        .with_context(|| worker.log_text())?;
    let out = tokio::task::spawn_blocking({
        let (kafka, output) = (kafka.clone(), output.clone());
        move || read_committed(&kafka, &output, TOTAL as usize)
    })
    .await??;
    assert_exactly_once_in_key_order(&out, TOTAL);
    assert!(worker.is_running(), "{}", worker.log_text());
    worker.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_exactly_once_zombie_is_fenced_and_writes_nothing_visible() -> anyhow::Result<()> {
    const TOTAL: i64 = 500;
    let kafka = kafka().await?;
    let input = kafka.create_topic("eo-kz-in", 2, &[]).await?;
    let output = kafka.create_topic("eo-kz-out", 2, &[]).await?;
    // A long linger keeps the records in the zombie's batch, read but not written.
    let doc = exactly_once_pipeline(
        "eo-k-zombie",
        &input,
        &output,
        json!({"maxRecords": 100000, "maxWait": "6s"}),
    );
    let dir = tempfile::tempdir()?;
    let mut zombie = start_with_args(dir.path(), &kafka, &doc, &[], &["--instance-id", "zombie"])?;
    produce(&kafka, &input, &events(0..TOTAL)).await?;
    let zombie_ref = &zombie;
    wait_until("the first worker reads every event", DEADLINE, || {
        Ok((zombie_ref
            .metric("weir_records_consumed_total")
            .unwrap_or(0)
            >= TOTAL as u64)
            .then_some(()))
    })
    .with_context(|| zombie.log_text())?;
    zombie.signal("STOP")?;

    // The group drops the stopped member after its session timeout and gives every
    // partition to the second worker, which copies the events.
    let mut second = start_with_args(dir.path(), &kafka, &doc, &[], &["--instance-id", "second"])?;
    wait_committed_async(&kafka, "test.eo-k-zombie", &input, TOTAL)
        .await
        .with_context(|| second.log_text())?;

    // The zombie wakes with its batch due: the group refuses its transaction's offsets and
    // the transaction is aborted, or it learns first that it lost its partitions.
    wake_zombie(&mut zombie)?;
    let out = tokio::task::spawn_blocking({
        let (kafka, output) = (kafka.clone(), output.clone());
        move || read_committed(&kafka, &output, TOTAL as usize)
    })
    .await??;
    assert_exactly_once_in_key_order(&out, TOTAL);
    assert!(second.is_running(), "{}", second.log_text());
    second.stop()?;
    Ok(())
}

/// A record over the output topic's `max.message.bytes` (read when the sink starts): it
/// is dead-lettered before it is sent, so neither the other records of its produce request
/// (the broker refuses a request whole) nor, exactly once, the transaction fail with it.
/// Every other record is copied once and the input is consumed to its end.
async fn dead_letters_only_the_record_the_broker_refuses(delivery: &str) -> anyhow::Result<()> {
    const TOTAL: i64 = 30;
    let kafka = kafka().await?;
    let input = kafka.create_topic("k-large-in", 1, &[]).await?;
    let output = kafka
        .create_topic("k-large-out", 1, &[("max.message.bytes", "2000")])
        .await?;
    let dead_letter = kafka.create_topic("k-large-dlq", 1, &[]).await?;
    let mut records = events(0..TOTAL);
    records[7].1 = format!("{{\"id\": 7, \"pad\": \"{}\"}}", "x".repeat(5000)).into_bytes();
    produce(&kafka, &input, &records).await?;
    let group = unique_name("k-large");
    let mut doc = exactly_once_pipeline(
        "k-large",
        &input,
        &output,
        json!({"maxRecords": 1000, "maxWait": "100ms"}),
    );
    doc["spec"]["delivery"] = json!(delivery);
    doc["spec"]["deadLetter"]["topic"] = json!(dead_letter);
    doc["spec"]["source"]["consumerGroup"] = json!(group);
    let dir = tempfile::tempdir()?;
    let mut worker = start_with_args(dir.path(), &kafka, &doc, &[], &[])?;
    wait_committed_async(&kafka, &group, &input, TOTAL)
        .await
        .with_context(|| worker.log_text())?;
    let out = tokio::task::spawn_blocking({
        let (kafka, output) = (kafka.clone(), output.clone());
        move || read_committed(&kafka, &output, TOTAL as usize - 1)
    })
    .await?
    .with_context(|| worker.log_text())?;
    let mut ids: Vec<i64> = out.iter().filter_map(|o| o.value["id"].as_i64()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..TOTAL).filter(|i| *i != 7).collect::<Vec<_>>());
    let dead = tokio::task::spawn_blocking({
        let kafka = kafka.clone();
        move || common::read_topic(&kafka, &dead_letter, 1)
    })
    .await??;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0.as_deref(), Some(&records[7].1[..]));
    assert_eq!(
        dead[0].1.get("weir.error.class").map(String::as_str),
        Some("permanent"),
        "{:?}",
        dead[0].1
    );
    assert!(worker.is_running(), "{}", worker.log_text());
    worker.stop()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_exactly_once_dead_letters_only_the_record_the_broker_refuses() -> anyhow::Result<()>
{
    dead_letters_only_the_record_the_broker_refuses("ExactlyOnce").await
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_at_least_once_dead_letters_only_the_record_the_broker_refuses() -> anyhow::Result<()>
{
    dead_letters_only_the_record_the_broker_refuses("AtLeastOnce").await
}

/// examples/todo-projection.yaml's analytics fan-out as shipped (exactly-once into a
/// topic), on the sample todo events: a read_committed reader sees each event once, in
/// the shape the pipeline's value expression gives, keyed by the user.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_analytics_pipeline_copies_each_todo_event_once() -> anyhow::Result<()> {
    let kafka = kafka().await?;
    let source = kafka.create_topic("todo-events", 3, &[]).await?;
    let output = kafka.create_topic("todo-analytics", 3, &[]).await?;
    let dead_letter = kafka.create_topic("todo-analytics-dlq", 1, &[]).await?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let text = std::fs::read_to_string(format!("{root}/todo-projection.yaml"))?;
    let mut doc = serde_yaml_ng::Deserializer::from_str(&text)
        .map(<Value as serde::Deserialize>::deserialize)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|d| d["kind"] == "EventPipeline" && d["metadata"]["name"] == "todo-analytics")
        .context("todo-analytics missing from the example")?;
    assert_eq!(doc["spec"]["delivery"], json!("ExactlyOnce"));
    doc["metadata"]["namespace"] = json!("test");
    doc["spec"]["source"]["topics"] = json!([source]);
    doc["spec"]["sinks"][0]["kafka"]["topic"] = json!(output);
    doc["spec"]["deadLetter"]["topic"] = json!(dead_letter);

    let lines = std::fs::read_to_string(format!("{root}/data/todo-events.jsonl"))?;
    let mut records = Vec::new();
    let mut parsed = Vec::new();
    for line in lines.lines() {
        let event: Value = serde_json::from_str(line).unwrap_or(Value::Null);
        let user = event["payload"]["userId"].as_str().unwrap_or("").to_owned();
        records.push((user, line.as_bytes().to_vec()));
        parsed.push(event);
    }
    produce(&kafka, &source, &records).await?;
    let dir = tempfile::tempdir()?;
    let worker = start_with_args(dir.path(), &kafka, &doc, &[], &[])?;
    wait_committed_async(&kafka, "test.todo-analytics", &source, records.len() as i64)
        .await
        .with_context(|| worker.log_text())?;

    // Every parsable event once; the sample's unparsable line goes to the dead-letter topic.
    let expected = parsed.iter().filter(|e| !e.is_null()).count();
    let k = kafka.clone();
    let out = tokio::task::spawn_blocking(move || read_committed(&k, &output, expected)).await??;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for record in &out {
        let id = record.value["eventId"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *seen.entry(id).or_default() += 1;
        assert!(record.value.get("type").is_some(), "{:?}", record.value);
        assert!(
            record.key.as_deref().is_some_and(|k| !k.is_empty()),
            "{record:?}"
        );
    }
    // The sample sends one event twice (a producer retry): it is copied twice, as consumed.
    let mut wanted: BTreeMap<String, usize> = BTreeMap::new();
    for event in parsed.iter().filter(|e| !e.is_null()) {
        *wanted
            .entry(event["eventId"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        seen, wanted,
        "each consumed event once in the analytics copy"
    );
    Ok(())
}
