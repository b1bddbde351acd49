//! The worker's integration tests, one binary: each module is one capability, run against
//! the real services of weir-testkit. One binary links the dependency tree once instead of
//! once per file; nextest still runs every test in its own
//! process, so `-E 'test(/^exactly_once::/)'` selects one module's tests.

mod common;

mod bulk_import;
mod cli;
mod compaction;
mod crud_topics;
mod exactly_once;
mod faults;
mod handover;
mod http_sink;
mod job_ingest;
mod kafka_security;
mod kafka_sink;
mod mock_broker_faults;
mod mongodb_sink;
mod mysql_sink;
mod outage_logs;
mod pipelines;
mod produce;
mod quickstart;
mod redis_sink;
mod replay;
mod sqlite_sink;
mod stale_write_guard;
mod status_line;
