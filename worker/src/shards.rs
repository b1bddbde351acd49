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

/// The pool that prepares batches.
#[derive(Clone, Debug)]
pub struct Shards {
    threads: usize,
    format: PayloadFormat,
    transformer: Arc<Transformer>,
}

impl Shards {
    /// `threads`: how many records are prepared at once; see [`default_threads`].
    pub fn new(threads: usize, format: PayloadFormat, transformer: Transformer) -> Self {
        Self {
            threads: threads.max(1),
            format,
            transformer: Arc::new(transformer),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Prepares `records` on up to `threads` blocking threads; the results keep the
    /// records' order.
    pub async fn prepare(&self, records: Vec<Record>) -> Vec<Prepared> {
        let shards = self.threads.min(records.len()).max(1);
        if shards == 1 {
            let this = self.clone();
            return match tokio::task::spawn_blocking(move || this.prepare_in_order(records)).await {
                Ok(prepared) => prepared,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            };
        }
        let total = records.len();
        let handles: Vec<_> = split(records, shards)
            .into_iter()
            .map(|shard| {
                let this = self.clone();
                tokio::task::spawn_blocking(move || {
                    shard
                        .into_iter()
                        .map(|(index, record)| (index, this.prepare_one(record)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut slots: Vec<Option<Prepared>> = (0..total).map(|_| None).collect();
        for handle in handles {
            match handle.await {
                Ok(done) => {
                    for (index, prepared) in done {
                        slots[index] = Some(prepared);
                    }
                }
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        slots.into_iter().flatten().collect()
    }

    fn prepare_in_order(&self, records: Vec<Record>) -> Vec<Prepared> {
        records.into_iter().map(|r| self.prepare_one(r)).collect()
    }

    fn prepare_one(&self, record: Record) -> Prepared {
        let event = record
            .decode(self.format)
            .map_err(|e| format!("decode: {e}"))
            .and_then(|event| {
                self.transformer
                    .apply(&record, event)
                    .map_err(|e| format!("transform: {e}"))
            });
        Prepared { record, event }
    }
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
            Transformer::from_spec(&spec).expect("compiles"),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn results_keep_the_batch_order_on_any_number_of_threads() {
        let records: Vec<Record> = (0..500)
            .map(|i| record(&format!("k{}", i % 37), i))
            .collect();
        let one = shards(1).prepare(records.clone()).await;
        let eight = shards(8).prepare(records.clone()).await;
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

    #[test]
    fn a_key_always_maps_to_the_same_shard() {
        let a = record("user-1", 1);
        let b = record("user-1", 99);
        assert_eq!(shard_of(&a, 8), shard_of(&b, 8));
        assert!(default_threads() >= 1);
    }
}
