//! Scenarios across components, one binary: the operator, the worker binary and the real
//! services of weir-testkit together. One binary links the dependency tree once instead of
//! once per file; nextest still runs every test in its own process.

// The operator's test fixtures (cluster, identity); each scenario uses a part.
#[allow(dead_code)]
#[path = "../../../operator/tests/integration/common/mod.rs"]
mod common;
mod kubelet;

mod autoscale_processes;
mod examples;
mod install;
mod operator_to_worker;
mod replay;
