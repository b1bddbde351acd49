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

/// One shard's records, each with its position in the batch, and where to send them
/// back prepared.
type Job = (
    Vec<(usize, Record)>,
    tokio::sync::oneshot::Sender<Vec<(usize, Prepared)>>,
);

/// The pool that prepares batches: `threads` long-lived threads, shard `i` always on
/// thread `i`. Fixed threads rather than tokio's blocking pool, which starts threads on
/// demand: each new thread can get an allocator arena of its own that keeps its peak, and
/// a batch's events would be spread over all of them.
#[derive(Clone)]
pub struct Shards {
    lanes: Arc<Vec<std::sync::mpsc::Sender<Job>>>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("threads", &self.lanes.len())
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
        let transformer = Arc::new(transformer);
        let lanes = (0..threads.max(1))
            .map(|i| {
                let (lane, jobs) = std::sync::mpsc::channel::<Job>();
                let transformer = transformer.clone();
                std::thread::Builder::new()
                    .name(format!("weir-transform-{i}"))
                    .spawn(move || {
                        for (records, reply) in jobs {
                            let done = records
                                .into_iter()
                                .map(|(index, record)| {
                                    (index, prepare_one(&transformer, format, decode, record))
                                })
                                .collect();
                            // The batch may have been given up (shutdown): nobody waits.
                            let _ = reply.send(done);
                        }
                    })?;
                Ok(lane)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            lanes: Arc::new(lanes),
        })
    }

    pub fn threads(&self) -> usize {
        self.lanes.len()
    }

    /// Prepares `records` on the pool's threads; the results keep the records' order.
    pub async fn prepare(&self, records: Vec<Record>) -> Result<Vec<Prepared>, String> {
        let total = records.len();
        let shards = self.lanes.len().min(total).max(1);
        let mut waiting = Vec::with_capacity(shards);
        for (lane, shard) in self.lanes.iter().zip(split(records, shards)) {
            let (reply, done) = tokio::sync::oneshot::channel();
            lane.send((shard, reply))
                .map_err(|_| "a transform thread has stopped".to_owned())?;
            waiting.push(done);
        }
        let mut slots: Vec<Option<Prepared>> = (0..total).map(|_| None).collect();
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

fn prepare_one(
    transformer: &Transformer,
    format: PayloadFormat,
    decode: bool,
    record: Record,
) -> Prepared {
    let decoded = match (&record.payload, format, decode) {
        (Some(payload), PayloadFormat::Json, false) => {
            serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                .map(|_| Value::Null)
                .map_err(|e| format!("value is not valid JSON: {e}"))
        }
        _ => record.decode(format),
    };
    let event = decoded
        .map_err(|e| format!("decode: {e}"))
        .and_then(|event| {
            transformer
                .apply(&record, event)
                .map_err(|e| format!("transform: {e}"))
        });
    Prepared { record, event }
}

/// The cores this process may use: the CPU quota of its cgroup (a pod's CPU limit) when
/// there is one, else the CPUs it may run on (Rust's `available_parallelism` reads both).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The records of each shard, each with its position in the batch, in batch order.
fn split(records: Vec<Record>, shards: usize) -> Vec<Vec<(usize, Record)>> {
    let mut split: Vec<Vec<(usize, Record)>> = (0..shards)
        .map(|_| Vec::with_capacity(records.len() / shards + 1))
        .collect();
    for (index, record) in records.into_iter().enumerate() {
        split[shard_of(&record, shards)].push((index, record));
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
        let split = split(records, 8);
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

    #[test]
    fn a_key_always_maps_to_the_same_shard() {
        let a = record("user-1", 1);
        let b = record("user-1", 99);
        assert_eq!(shard_of(&a, 8), shard_of(&b, 8));
        assert!(default_threads() >= 1);
    }
}
