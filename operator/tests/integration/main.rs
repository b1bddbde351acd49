//! The operator's integration tests, one binary: each module is one capability, run against
//! the real Kubernetes API server and Kafka broker of weir-testkit. One binary links the
//! dependency tree once instead of once per file; nextest still runs every test in its own
//! process, so `-E 'test(/^topics::/)'` selects one module's tests.

mod common;
mod helm;

mod autoscale;
mod chart;
mod connection_security;
mod connections;
mod deploy;
mod images;
mod lag;
mod leader;
mod mock_api;
mod namespaced;
mod pipelines;
mod plugin;
mod rbac;
mod render;
mod replay;
mod topic_drift;
mod topics;
