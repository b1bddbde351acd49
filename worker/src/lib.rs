//! Weir's consumer engine: consume → filter/transform → batch → sink → commit, with
//! retries, a dead-letter topic, idempotency and clean shutdown.
//!
//! With only the `kafka` feature (no default features), just [`kafka`]: the Kafka client
//! module the operator shares.

#[cfg(feature = "engine")]
pub mod batch;
#[cfg(feature = "engine")]
pub mod commit;
#[cfg(feature = "engine")]
pub mod compaction;
#[cfg(feature = "engine")]
pub mod config;
#[cfg(feature = "engine")]
pub mod dead_letter;
#[cfg(feature = "engine")]
pub mod embedded;
#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod functions;
#[cfg(feature = "engine")]
pub mod input;
pub mod kafka;
#[cfg(feature = "engine")]
pub mod metrics;
#[cfg(feature = "engine")]
pub mod record;
#[cfg(feature = "engine")]
pub mod retry;
#[cfg(feature = "engine")]
pub mod shards;
#[cfg(feature = "engine")]
pub mod sink;
#[cfg(feature = "engine")]
pub mod source;
#[cfg(feature = "engine")]
pub mod transform;
