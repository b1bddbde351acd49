//! Decoding and transforming a batch on every core the worker may use. Records are
//! sharded by key (records without a key by partition), so a key's records are handled in
//! order by one thread, and every result returns to its record's place in the batch: the
//! sinks see the batch in consumption order, as if it had been transformed on one core.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde_json::Value;
use weir_crds::PayloadFormat;

use crate::record::Record;
use crate::transform::Transformer;

/// A consumed record and what became of its event: `Ok(Some)` to write, `Ok(None)` filtered
/// out, `Err` undecodable or failing its transform (a dead letter, with the reason).
#[derive(Debug)]
pub struct Prepared {
    pub record: Record,
    pub event: Result<Option<Value>, String>,
}

/// How a record that is to be written keeps its event while it waits in a compaction
/// window: in fewer bytes than the decoded event, from which [`Shards::expand`] gets the
/// event back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compact {
    /// The event is the record's value decoded again (neither a transform's `set` nor its
    /// `remove` changed it).
    Payload,
    /// The transformed event, as compact JSON.
    Json(Box<[u8]>),
    /// Nothing reads the event: it is `null`.
    Null,
}

/// What became of a record prepared for a compaction window: [`Prepared`] with the event
/// kept as [`Compact`].
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Write(Compact),
    /// The filter dropped it.
    Filtered,
    /// Undecodable, or its transform failed: a dead letter, with the reason.
    Failed(String),
}

/// What a lane's thread runs: the pipeline's preparation settings are its argument.
type Task = Box<dyn FnOnce(&Settings) + Send>;

/// How the pool's threads prepare a record.
struct Settings {
    transformer: Transformer,
    format: PayloadFormat,
    decode: bool,
}

/// The pool that prepares batches: `threads` long-lived threads, shard `i` always on
/// thread `i`. Fixed threads rather than tokio's blocking pool, which starts threads on
/// demand: each new thread can get an allocator arena of its own that keeps its peak, and
/// a batch's events would be spread over all of them.
#[derive(Clone)]
pub struct Shards {
    lanes: Arc<Lanes>,
}

/// One queue per thread, each with its urgent tasks (a window being written, which the
/// pipeline waits for) served before the others (a window being filled).
struct Lanes(Vec<Arc<Lane>>);

#[derive(Default)]
struct Lane {
    queue: std::sync::Mutex<Queue>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct Queue {
    urgent: std::collections::VecDeque<Task>,
    normal: std::collections::VecDeque<Task>,
    closed: bool,
}

impl Lane {
    fn push(&self, task: Task, urgent: bool) -> Result<(), String> {
        let mut queue = self
            .queue
            .lock()
            .map_err(|_| "a transform thread has stopped".to_owned())?;
        if urgent {
            queue.urgent.push_back(task);
        } else {
            queue.normal.push_back(task);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// The next task, urgent ones first; `None` once the pool is dropped.
    fn next(&self) -> Option<Task> {
        let mut queue = self.queue.lock().ok()?;
        loop {
            if let Some(task) = queue
                .urgent
                .pop_front()
                .or_else(|| queue.normal.pop_front())
            {
                return Some(task);
            }
            if queue.closed {
                return None;
            }
            queue = self.ready.wait(queue).ok()?;
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        for lane in &self.0 {
            if let Ok(mut queue) = lane.queue.lock() {
                queue.closed = true;
            }
            lane.ready.notify_all();
        }
    }
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("threads", &self.lanes.0.len())
            .finish()
    }
}

impl Shards {
    /// Starts `threads` threads (at least one); see [`default_threads`]. They stop when the
    /// last clone of the pool is dropped.
    /// `decode`: whether anything reads the decoded event; without, a JSON record is only
    /// checked to be JSON (an invalid one is still a dead letter) and its event is `null`.
    pub fn new(
        threads: usize,
        format: PayloadFormat,
        decode: bool,
        transformer: Transformer,
    ) -> std::io::Result<Self> {
        let settings = Arc::new(Settings {
            transformer,
            format,
            decode,
        });
        let lanes = (0..threads.max(1))
            .map(|i| {
                let lane = Arc::new(Lane::default());
                let settings = settings.clone();
                let serving = lane.clone();
                std::thread::Builder::new()
                    .name(format!("weir-transform-{i}"))
                    .spawn(move || {
                        while let Some(task) = serving.next() {
                            task(&settings);
                        }
                    })?;
                Ok(lane)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            lanes: Arc::new(Lanes(lanes)),
        })
    }

    pub fn threads(&self) -> usize {
        self.lanes.0.len()
    }

    /// Drops `garbage` on a pool thread: freeing a written batch's events (thousands of
    /// small allocations) is then not on the path between one write and the next.
    pub fn discard<T: Send + 'static>(&self, garbage: T) {
        let task: Task = Box::new(move |_| drop(garbage));
        // A stopped pool drops the task, and with it the garbage, here.
        if let Some(lane) = self.lanes.0.last() {
            let _ = lane.push(task, false);
        }
    }

    /// Prepares `records` on the pool's threads; the results keep the records' order.
    pub async fn prepare(&self, records: Vec<Record>) -> Result<Vec<Prepared>, String> {
        self.map(records, |r| r, prepare_one, false).await
    }

    /// Prepares `records` for a compaction window: as [`Shards::prepare`], each event kept
    /// in its compact form.
    pub async fn prepare_compact(
        &self,
        records: Vec<Record>,
    ) -> Result<Vec<(Record, Outcome)>, String> {
        self.map(
            records,
            |r| r,
            |settings, record| {
                let Prepared { record, event } = if settings.transformer.is_identity() {
                    // Nothing is filtered or changed: checked to be decodable now,
                    // decoded when written.
                    prepare_one(
                        &Settings {
                            transformer: Transformer::default(),
                            format: settings.format,
                            decode: false,
                        },
                        record,
                    )
                } else {
                    prepare_one(settings, record)
                };
                let outcome = match event {
                    Ok(Some(event)) => Outcome::Write(compact(settings, event)),
                    Ok(None) => Outcome::Filtered,
                    Err(reason) => Outcome::Failed(reason),
                };
                (record, outcome)
            },
            false,
        )
        .await
    }

    /// The events of records kept in compact form, decoded again, in their order.
    pub async fn expand(&self, items: Vec<(Record, Compact)>) -> Result<Vec<Prepared>, String> {
        self.map(
            items,
            |(record, _)| record,
            |settings, (record, compact)| {
                let event = match compact {
                    Compact::Null => Ok(Value::Null),
                    Compact::Payload => record.decode(settings.format),
                    Compact::Json(json) => serde_json::from_slice(&json)
                        .map_err(|e| format!("value is not valid JSON: {e}")),
                };
                let event = event.map(Some).map_err(|e| format!("decode: {e}"));
                Prepared { record, event }
            },
            true,
        )
        .await
    }

    /// Runs `work` on every item, each on the thread of its record's shard; the results
    /// keep the items' order.
    async fn map<I, O>(
        &self,
        items: Vec<I>,
        record: fn(&I) -> &Record,
        work: fn(&Settings, I) -> O,
        urgent: bool,
    ) -> Result<Vec<O>, String>
    where
        I: Send + 'static,
        O: Send + 'static,
    {
        let total = items.len();
        let shards = self.lanes.0.len().min(total).max(1);
        let mut waiting = Vec::with_capacity(shards);
        for (lane, shard) in self.lanes.0.iter().zip(split(items, shards, record)) {
            let (reply, done) = tokio::sync::oneshot::channel();
            let task: Task = Box::new(move |settings| {
                let done: Vec<(usize, O)> = shard
                    .into_iter()
                    .map(|(index, item)| (index, work(settings, item)))
                    .collect();
                // The batch may have been given up (shutdown): nobody waits.
                let _ = reply.send(done);
            });
            lane.push(task, urgent)?;
            waiting.push(done);
        }
        let mut slots: Vec<Option<O>> = (0..total).map(|_| None).collect();
        for done in waiting {
            let done = done
                .await
                .map_err(|_| "a transform thread stopped while preparing a batch".to_owned())?;
            for (index, prepared) in done {
                slots[index] = Some(prepared);
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

fn prepare_one(settings: &Settings, record: Record) -> Prepared {
    let decoded = match (&record.payload, settings.format, settings.decode) {
        (Some(payload), PayloadFormat::Json, false) => {
            serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .map(|_| Value::Null)
                .map_err(|e| format!("value is not valid JSON: {e}"))
        }
        _ => record.decode(settings.format),
    };
    let event = decoded
        .map_err(|e| format!("decode: {e}"))
        .and_then(|event| {
            settings
                .transformer
                .apply(&record, event)
                .map_err(|e| format!("transform: {e}"))
        });
    Prepared { record, event }
}

/// The smallest form of an event to be written from which it can be had again.
fn compact(settings: &Settings, event: Value) -> Compact {
    if !settings.decode {
        Compact::Null
    } else if !settings.transformer.changes_event() {
        Compact::Payload
    } else {
        match serde_json::to_vec(&event) {
            Ok(json) => Compact::Json(json.into_boxed_slice()),
            // A JSON value always serializes; were it not to, `null` would be written.
            Err(_) => Compact::Null,
        }
    }
}

/// The cores this process may use: the CPU quota of its cgroup (a pod's CPU limit) when
/// there is one, else the CPUs it may run on (Rust's `available_parallelism` reads both).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The items of each shard, each with its position in the batch, in batch order.
fn split<I>(items: Vec<I>, shards: usize, record: fn(&I) -> &Record) -> Vec<Vec<(usize, I)>> {
    let mut split: Vec<Vec<(usize, I)>> = (0..shards)
        .map(|_| Vec::with_capacity(items.len() / shards + 1))
        .collect();
    for (index, item) in items.into_iter().enumerate() {
        split[shard_of(record(&item), shards)].push((index, item));
    }
    split
}

/// The shard of a record: by key, or by partition for records without one.
fn shard_of(record: &Record, shards: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    match &record.key {
        Some(key) => key.hash(&mut hasher),
        None => (&record.topic, record.partition).hash(&mut hasher),
    }
    (hasher.finish() % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, offset: i64) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(format!(r#"{{"key":"{key}","n":{offset}}}"#).into_bytes()),
            timestamp: None,
            headers: vec![],
        }
    }

    fn shards(threads: usize) -> Shards {
        let spec: weir_crds::EventPipelineSpec = serde_json::from_value(serde_json::json!({
            "source": {"topics": ["t"]},
            "filter": "event.n % 5 != 4",
            "transform": {"set": {"doubled": "event.n * 2"}},
            "sinks": [{"sqlite": {"url": "sqlite::memory:", "table": "t", "columns": [{"name": "a", "type": "text"}]}}]
        }))
        .expect("spec");
        Shards::new(
            threads,
            PayloadFormat::Json,
            true,
            Transformer::from_spec(&spec).expect("compiles"),
        )
        .expect("threads start")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn results_keep_the_batch_order_on_any_number_of_threads() {
        let records: Vec<Record> = (0..500)
            .map(|i| record(&format!("k{}", i % 37), i))
            .collect();
        let one = shards(1).prepare(records.clone()).await.expect("prepared");
        let eight = shards(8).prepare(records.clone()).await.expect("prepared");
        assert_eq!(eight.len(), 500);
        for (i, (a, b)) in one.iter().zip(&eight).enumerate() {
            assert_eq!(a.record.offset, i as i64);
            assert_eq!(b.record.offset, i as i64);
            assert_eq!(a.event, b.event);
        }
        let kept = eight
            .iter()
            .filter(|p| matches!(p.event, Ok(Some(_))))
            .count();
        assert_eq!(kept, 400, "{:?}", eight[0].event);
        assert_eq!(
            eight[3].event,
            Ok(Some(serde_json::json!({"key": "k3", "n": 3, "doubled": 6})))
        );
    }

    #[test]
    fn each_keys_records_are_in_one_shard_in_order_and_shards_share_the_work() {
        let records: Vec<Record> = (0..800)
            .map(|i| record(&format!("k{}", i % 97), i))
            .collect();
        let split = split(records, 8, |r| r);
        assert_eq!(split.iter().map(Vec::len).sum::<usize>(), 800);
        assert!(split.iter().all(|shard| shard.len() > 40), "uneven shards");
        let mut shard_of_key = std::collections::HashMap::new();
        for (n, shard) in split.iter().enumerate() {
            assert!(
                shard.windows(2).all(|w| w[0].0 < w[1].0),
                "shard {n} out of order"
            );
            for (_, record) in shard {
                let previous = shard_of_key.insert(record.key.clone(), n);
                assert!(previous.is_none_or(|p| p == n), "a key spans two shards");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_reader_of_the_event_records_are_only_checked_to_be_json() {
        let pool = Shards::new(2, PayloadFormat::Json, false, Transformer::default())
            .expect("threads start");
        let mut bad = record("k", 1);
        bad.payload = Some(b"{not json".to_vec());
        let prepared = pool
            .prepare(vec![record("k", 0), bad])
            .await
            .expect("prepared");
        assert_eq!(prepared[0].event, Ok(Some(Value::Null)));
        assert!(
            matches!(&prepared[1].event, Err(e) if e.contains("not valid JSON")),
            "{:?}",
            prepared[1].event
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compact_events_expand_to_the_events_prepare_gives() {
        let records: Vec<Record> = (0..20).map(|i| record(&format!("k{}", i % 3), i)).collect();
        // With a transform, the transformed event is kept as JSON; without, the value.
        for (pool, kept_as_value) in [
            (shards(2), false),
            (
                Shards::new(2, PayloadFormat::Json, true, Transformer::default())
                    .expect("threads start"),
                true,
            ),
        ] {
            let prepared = pool.prepare(records.clone()).await.expect("prepared");
            let compact = pool
                .prepare_compact(records.clone())
                .await
                .expect("prepared");
            let mut to_write = Vec::new();
            for ((record, outcome), p) in compact.into_iter().zip(&prepared) {
                match (outcome, &p.event) {
                    (Outcome::Filtered, Ok(None)) => {}
                    (Outcome::Write(compact), Ok(Some(_))) => {
                        assert_eq!(matches!(compact, Compact::Payload), kept_as_value);
                        to_write.push((record, compact));
                    }
                    (outcome, event) => panic!("{outcome:?} for {event:?}"),
                }
            }
            let expanded = pool.expand(to_write).await.expect("expanded");
            let written: Vec<&Prepared> = prepared
                .iter()
                .filter(|p| matches!(p.event, Ok(Some(_))))
                .collect();
            assert_eq!(expanded.len(), written.len());
            for (a, b) in expanded.iter().zip(written) {
                assert_eq!(a.record, b.record);
                assert_eq!(a.event, b.event);
            }
        }
    }

    #[test]
    fn a_key_always_maps_to_the_same_shard() {
        let a = record("user-1", 1);
        let b = record("user-1", 99);
        assert_eq!(shard_of(&a, 8), shard_of(&b, 8));
        assert!(default_threads() >= 1);
    }
}
