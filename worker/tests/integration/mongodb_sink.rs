//! The MongoDB sink's modes, tested against FerretDB (the MongoDB wire protocol, see
//! testkit/ferretdb) through the official Rust driver: Insert refuses a duplicate `_id`
//! alone and the rest of the batch lands; Upsert replaces or `$set`s by key; Update and
//! Delete match by key; Rules choose per event; the stale-write guard keeps every document
//! at its newest version when the stream is replayed.

use futures::TryStreamExt as _;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use weir_crds::EventPipelineSpec;
use weir_testkit::FerretDbServer;
use weir_worker::record::Record;
use weir_worker::sink::{Sink, WriteInput};

type BoxedSink = Box<dyn Sink>;

struct TestCollection {
    url: String,
    database: String,
    collection: mongodb::Collection<Document>,
}

async fn collection() -> anyhow::Result<TestCollection> {
    let (url, database) = FerretDbServer::test_database().await?;
    let client = mongodb::Client::with_uri_str(&url).await?;
    let collection = client.database(&database).collection("users");
    Ok(TestCollection {
        url,
        database,
        collection,
    })
}

async fn build(target: &TestCollection, sink: Value) -> anyhow::Result<BoxedSink> {
    let mut sink = sink;
    sink["url"] = json!(target.url);
    sink["database"] = json!(target.database);
    sink["collection"] = json!("users");
    let spec: EventPipelineSpec = serde_json::from_value(json!({
        "source": {"topics": ["t"]},
        "sinks": [{"mongodb": sink}]
    }))?;
    spec.validate()
        .map_err(|problems| anyhow::anyhow!("{problems}"))?;
    let sink = weir_worker::sink::build(&spec, "test-group")
        .map_err(anyhow::Error::msg)?
        .remove(0)
        .sink;
    sink.prepare().await.map_err(anyhow::Error::msg)?;
    Ok(sink)
}

/// Writes `events` as one batch; returns the positions refused and how many were skipped.
async fn write(sink: &BoxedSink, events: &[Value]) -> anyhow::Result<(Vec<usize>, usize)> {
    let records: Vec<Record> = (0..events.len())
        .map(|i| Record {
            topic: "t".into(),
            partition: 0,
            offset: i as i64,
            key: None,
            payload: None,
            timestamp: None,
            headers: vec![],
        })
        .collect();
    let input: Vec<WriteInput<'_>> = events
        .iter()
        .enumerate()
        .map(|(index, event)| WriteInput {
            index,
            record: &records[index],
            event,
        })
        .collect();
    let written = sink.write(&input).await.map_err(anyhow::Error::msg)?;
    Ok((
        written.rejected.into_iter().map(|r| r.index).collect(),
        written.skipped,
    ))
}

/// Every document, sorted by `_id`, as JSON.
async fn documents(target: &TestCollection) -> anyhow::Result<Vec<Value>> {
    let found: Vec<Document> = target
        .collection
        .find(doc! {})
        .sort(doc! {"_id": 1})
        .await?
        .try_collect()
        .await?;
    Ok(found
        .into_iter()
        .map(|d| mongodb::bson::Bson::Document(d).into_relaxed_extjson())
        .collect())
}

#[tokio::test]
async fn insert_refuses_a_duplicate_id_alone_and_the_rest_of_the_batch_lands() -> anyhow::Result<()>
{
    let target = collection().await?;
    let sink = build(&target, json!({"mode": "Insert"})).await?;
    let batch: Vec<Value> = (0..10)
        .map(|i| json!({"_id": if i == 6 { 2 } else { i }, "name": format!("u{i}")}))
        .collect();
    assert_eq!(write(&sink, &batch).await?, (vec![6], 0));
    let ids: Vec<Value> = documents(&target)
        .await?
        .into_iter()
        .map(|d| d["_id"].clone())
        .collect();
    assert_eq!(
        ids,
        (0..10)
            .filter(|i| *i != 6)
            .map(|i| json!(i))
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test]
async fn upsert_replaces_or_sets_by_key_and_delete_removes_by_key() -> anyhow::Result<()> {
    let target = collection().await?;
    let replace = build(
        &target,
        json!({"mode": "Upsert", "document": {"_id": "event.id", "name": "event.name", "tags": "event.tags"}}),
    )
    .await?;
    let (refused, _) = write(
        &replace,
        &[
            json!({"id": 1, "name": "ann", "tags": ["a"]}),
            json!({"id": 2, "name": "bo", "tags": []}),
            json!({"id": 1, "name": "ann-2", "tags": ["b"]}),
            json!({"name": "no id", "tags": []}),
        ],
    )
    .await?;
    assert_eq!(
        refused,
        vec![3],
        "a document without its key is refused alone"
    );
    assert_eq!(
        documents(&target).await?,
        vec![
            json!({"_id": 1, "name": "ann-2", "tags": ["b"]}),
            json!({"_id": 2, "name": "bo", "tags": []}),
        ]
    );
    // Set keeps the fields it does not write.
    let set = build(
        &target,
        json!({"mode": "Upsert", "upsert": "Set", "document": {"_id": "event.id", "name": "event.name"}}),
    )
    .await?;
    write(
        &set,
        &[
            json!({"id": 2, "name": "bo-2"}),
            json!({"id": 3, "name": "cy"}),
        ],
    )
    .await?;
    let update = build(
        &target,
        json!({"mode": "Update", "document": {"_id": "event.id", "name": "event.name"}}),
    )
    .await?;
    let updated = write(
        &update,
        &[
            json!({"id": 3, "name": "cy-2"}),
            json!({"id": 9, "name": "nobody"}),
        ],
    )
    .await?;
    assert_eq!(
        updated,
        (vec![], 0),
        "an update that matches nothing is no refusal"
    );
    let delete = build(
        &target,
        json!({"mode": "Delete", "document": {"_id": "event.id"}}),
    )
    .await?;
    write(&delete, &[json!({"id": 1}), json!({"id": 42})]).await?;
    assert_eq!(
        documents(&target).await?,
        vec![
            json!({"_id": 2, "name": "bo-2", "tags": []}),
            json!({"_id": 3, "name": "cy-2"}),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn rules_apply_each_events_action_in_order() -> anyhow::Result<()> {
    let target = collection().await?;
    let sink = build(
        &target,
        json!({"mode": "Rules", "document": {"_id": "event.id", "name": "event.name"}, "rules": [
            {"when": "event.type == 'Created'", "action": "Upsert"},
            {"when": "event.type == 'Renamed'", "action": "Update"},
            {"when": "event.type == 'Deleted'", "action": "Delete", "document": {"_id": "event.id"}}
        ]}),
    )
    .await?;
    let (refused, skipped) = write(
        &sink,
        &[
            json!({"type": "Created", "id": "a", "name": "a1"}),
            json!({"type": "Renamed", "id": "a", "name": "a2"}),
            json!({"type": "Created", "id": "b", "name": "b1"}),
            json!({"type": "Deleted", "id": "b"}),
            json!({"type": "Created", "id": "b", "name": "b-again"}),
            json!({"type": "Other", "id": "c"}),
        ],
    )
    .await?;
    assert_eq!((refused, skipped), (vec![], 1));
    assert_eq!(
        documents(&target).await?,
        vec![
            json!({"_id": "a", "name": "a2"}),
            json!({"_id": "b", "name": "b-again"}),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn the_guard_keeps_every_document_at_its_newest_version_when_the_stream_is_replayed()
-> anyhow::Result<()> {
    let target = collection().await?;
    let sink = build(
        &target,
        json!({"mode": "Rules", "guard": {"field": "version"},
        "document": {"_id": "event.id", "name": "event.name", "version": "event.version"},
        "rules": [
            {"when": "event.op == 'upsert'", "action": "Upsert"},
            {"when": "event.op == 'update'", "action": "Update"}
        ]}),
    )
    .await?;
    let stream: Vec<Value> = (1..=6)
        .flat_map(|version| {
            (0..10).map(move |id| {
                let op = if version % 2 == 1 { "upsert" } else { "update" };
                json!({"op": op, "id": id, "name": format!("{id}@v{version}"), "version": version})
            })
        })
        .collect();
    assert_eq!(write(&sink, &stream).await?, (vec![], 0));
    let newest: Vec<Value> = (0..10)
        .map(|id| json!({"_id": id, "name": format!("{id}@v6"), "version": 6}))
        .collect();
    assert_eq!(documents(&target).await?, newest);
    let (refused, skipped) = write(&sink, &stream[..30]).await?;
    assert_eq!(refused, Vec::<usize>::new());
    assert_eq!(skipped, 30, "every held-back write is counted as skipped");
    assert_eq!(documents(&target).await?, newest);
    // Out of order within a batch; an event without a version is refused.
    let (refused, skipped) = write(
        &sink,
        &[
            json!({"op": "upsert", "id": 20, "name": "v9", "version": 9}),
            json!({"op": "upsert", "id": 20, "name": "v8", "version": 8}),
            json!({"op": "update", "id": 0, "name": "0@v7", "version": 7}),
            json!({"op": "upsert", "id": 1, "name": "no version"}),
        ],
    )
    .await?;
    assert_eq!((refused, skipped), (vec![3], 1));
    let stored = documents(&target).await?;
    assert_eq!(stored[0], json!({"_id": 0, "name": "0@v7", "version": 7}));
    assert_eq!(stored[1], json!({"_id": 1, "name": "1@v6", "version": 6}));
    assert_eq!(
        stored.last(),
        Some(&json!({"_id": 20, "name": "v9", "version": 9}))
    );
    Ok(())
}
