//! Benchmark: 1,000 KafkaTopics created in the real API server and reconciled against the
//! real broker by the real `weir-operator` binary (its own process, with the chart's
//! ClusterRole). Prints topics/s until every one is Ready, the operator's idle and peak
//! RSS, and, measured in the same run, the floor: the same number of topics created
//! straight through Kafka's admin API with no Kubernetes in between.
//!
//! `cargo bench -p weir-operator --bench topics` (WEIR_BENCH_TOPICS=200 for a quick run).

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]

#[allow(dead_code)]
#[path = "../tests/integration/common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use common::{Cluster, OPERATOR_USER, connection_yaml, ready};
use futures::StreamExt as _;
use kube::api::{Api, ListParams, PostParams};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use weir_crds::{KafkaTopic, KafkaTopicSpec};
use weir_testkit::{Identity, TestKafka, free_port, unique_name};

/// Requests in flight at once, for the operator's input and for the floor alike.
const CONCURRENCY: usize = 32;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// Resident and peak resident memory of a process, in MiB.
fn memory(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn metric(port: u16, name: &str) -> Option<f64> {
    let text = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        Some(text)
    })
    .await
    .ok()??;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
}

async fn run() -> anyhow::Result<()> {
    let count: usize = std::env::var("WEIR_BENCH_TOPICS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let cluster = Cluster::start().await?;
    let kafka = TestKafka::shared()?;

    // The floor: the admin API alone, one topic per request, CONCURRENCY in flight.
    let admin: Arc<AdminClient<DefaultClientContext>> = Arc::new(kafka.admin()?);
    let prefix = unique_name("floor");
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..count)
        .map(|i| {
            let admin = admin.clone();
            let name = format!("{prefix}-{i}");
            async move {
                let topic = NewTopic::new(&name, 1, TopicReplication::Fixed(1));
                for result in admin.create_topics([&topic], &AdminOptions::new()).await? {
                    result.map_err(|(_, code)| anyhow::anyhow!("{code}"))?;
                }
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let floor = started.elapsed();

    let ns = cluster.namespace("bench").await?;
    cluster.apply_yaml(&ns, &connection_yaml(&kafka)).await?;
    let kubeconfig = cluster.server.write_impersonating_kubeconfig(
        &Identity::new(OPERATOR_USER)
            .in_group("system:serviceaccounts")
            .in_group("system:authenticated"),
    )?;
    let port = free_port("weir-operator")?;
    let operator = Process(
        Command::new(env!("CARGO_BIN_EXE_weir-operator"))
            .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
            .args([
                "--lease-namespace",
                "default",
                "--lease-name",
                &unique_name("bench"),
            ])
            .args(["--log-format", "text", "--identity", "bench"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start weir-operator")?,
    );
    let pid = operator.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, "weir_operator_leader").await != Some(1.0) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the operator did not lead within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Idle: leading, caches synced, the connection reconciled, nothing else to do.
    while metric(
        port,
        "weir_operator_reconciles_total{kind=\"KafkaConnection\"}",
    )
    .await
    .unwrap_or(0.0)
        < 1.0
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the connection was not reconciled within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_rss, _) = memory(pid).context("cannot read the operator's memory")?;

    let api: Api<KafkaTopic> = Api::namespaced(cluster.admin.clone(), &ns);
    let topic_prefix = unique_name("op");
    let started = Instant::now();
    let creating = {
        let api = api.clone();
        let topic_prefix = topic_prefix.clone();
        tokio::spawn(async move {
            let results: Vec<Result<KafkaTopic, kube::Error>> = futures::stream::iter(0..count)
                .map(|i| {
                    let api = api.clone();
                    let mut spec: KafkaTopicSpec = serde_json::from_value(serde_json::json!({}))
                        .unwrap_or_else(|_| unreachable!("an empty spec is valid"));
                    spec.topic_name = Some(format!("{topic_prefix}-{i}"));
                    async move {
                        api.create(
                            &PostParams::default(),
                            &KafkaTopic::new(&format!("t-{i}"), spec),
                        )
                        .await
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            results.into_iter().filter(Result::is_err).count()
        })
    };
    let mut peak = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut last_report = Instant::now();
    let ready_count = loop {
        if let Some((rss, hwm)) = memory(pid) {
            peak = peak.max(rss).max(hwm);
        }
        let topics = api.list(&ListParams::default()).await?;
        let ready_count = topics
            .items
            .iter()
            .filter(|t| {
                let status = serde_json::to_value(&t.status).unwrap_or_default();
                ready(Some(&status)).is_some_and(|r| r.0 == "True")
            })
            .count();
        if ready_count >= count {
            break ready_count;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {ready_count} of {count} topics Ready after 30 min"
        );
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "  {ready_count}/{count} Ready after {:.0} s",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let elapsed = started.elapsed();
    let failed_creates = creating.await?;
    if let Some((_, hwm)) = memory(pid) {
        peak = peak.max(hwm);
    }

    println!("KafkaTopics reconciled by weir-operator (real API server, real broker, one machine)");
    println!("  topics                 {ready_count} (create requests refused: {failed_creates})");
    println!(
        "  all Ready after        {:.1} s  = {:.1} topics/s",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    println!("  operator RSS idle      {idle_rss:.1} MiB  (target < 40 MiB)");
    println!("  operator RSS peak      {peak:.1} MiB");
    println!(
        "  floor, admin API only  {:.1} s  = {:.1} topics/s  ({count} CreateTopics, {CONCURRENCY} in flight, no Kubernetes)",
        floor.as_secs_f64(),
        count as f64 / floor.as_secs_f64()
    );
    println!(
        "  published figure for another operator: 1,000 topics in about 13 minutes (1.3 topics/s)"
    );
    drop(operator);
    Ok(())
}
