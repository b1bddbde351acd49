//! Weir's consumer engine: consume → filter/transform → batch → sink → commit, with
//! retries, a dead-letter topic, idempotency and clean shutdown.

pub mod batch;
pub mod config;
pub mod dead_letter;
pub mod embedded;
pub mod engine;
pub mod functions;
pub mod input;
pub mod metrics;
pub mod record;
pub mod retry;
pub mod shards;
pub mod sink;
pub mod source;
pub mod transform;
