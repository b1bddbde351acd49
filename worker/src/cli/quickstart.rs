//! `weir-worker quickstart`: the real engine moving the sample todo events into a table,
//! with nothing installed. It starts the embedded development broker (in memory, local use
//! only), loads `examples/data/todo-events.jsonl`, runs the `todo-projection` pipeline of
//! `examples/todo-projection.yaml` with its PostgreSQL sink swapped for a SQLite file, then
//! prints the projected table, the per-stage counts and the dead-lettered records.
//!
//! The SQLite file outlives the run, with the pipeline's idempotency keys: a second run
//! loads the same events into a fresh broker and the table does not change.

#![allow(
    clippy::print_stdout,
    reason = "the projected table and counts are the command's output"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::Row as _;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};
use tokio::sync::watch;
use weir_crds::load::Resource;
use weir_crds::{ColumnType, EventPipelineSpec, Manifest, SecretSource};
use weir_worker::config::WorkerConfig;
use weir_worker::embedded::EmbeddedBroker;
use weir_worker::engine::Engine;
use weir_worker::input::InputFormat;
use weir_worker::metrics::Metrics;

use super::produce::{self, Input, Load, OnBadLine};

const PIPELINE_FILE: &str = include_str!("../../../examples/todo-projection.yaml");
const PIPELINE: &str = "todo-projection";
const EVENTS: &[u8] = include_bytes!("../../../examples/data/todo-events.jsonl");
/// The sample stream is keyed by user, as the example's topic is.
const EVENT_KEY: &str = "payload.userId";
/// How long the run may take before the quickstart reports it stuck.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs the quickstart; `database` is the SQLite file (created when missing).
pub async fn run(database: &Path) -> anyhow::Result<()> {
    let database = absolute(database)?;
    let (pipeline, partitions) = pipeline(&database)?;
    let spec = &pipeline.spec;
    let topic = spec
        .source
        .topics
        .first()
        .context("the example pipeline reads no topic")?
        .clone();
    let dead_letter = spec
        .dead_letter
        .as_ref()
        .context("the example pipeline has no dead-letter topic")?
        .topic
        .clone();
    println!("Weir quickstart: {PIPELINE} into {}", database.display());
    println!(
        "  broker: embedded, in memory (librdkafka's mock cluster: for local use only, never production)"
    );

    let broker = EmbeddedBroker::start().context("cannot start the embedded broker")?;
    let bootstrap = broker.bootstrap_servers();
    broker.create_topic(&topic, partitions)?;
    broker.create_topic(&dead_letter, 1)?;
    create_table(&database, spec).await?;

    let bar = progress_bar();
    let producer = produce::producer(&bootstrap)?;
    let load = Load {
        input: Input::Embedded {
            name: "examples/data/todo-events.jsonl",
            bytes: EVENTS,
        },
        format: InputFormat::JsonLines,
        key: Some(EVENT_KEY.to_owned()),
        rate: 0,
        on_bad_line: OnBadLine::Fail,
    };
    let loaded = produce::load(&producer, &topic, &load, &bar).await?;
    drop(producer);

    let metrics = Metrics::new(PIPELINE);
    let (stop, shutdown) = watch::channel(false);
    let config = WorkerConfig {
        name: PIPELINE.to_owned(),
        namespace: "quickstart".to_owned(),
        spec: pipeline.spec.clone(),
        kafka: ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .clone(),
        connection: "the embedded broker".to_owned(),
        sink_connections: Default::default(),
        instance_id: None,
        transform_threads: weir_worker::shards::default_threads(),
        replay: None,
    };
    let engine = Engine::new(config, metrics.clone(), shutdown)?;
    let running = tokio::spawn(engine.run());
    let bar = progress_bar();
    bar.set_length(loaded.produced);
    bar.set_style(ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
    )?);
    bar.set_prefix(format!("running {PIPELINE}"));
    // The engine writes what it has read when asked to stop, so once every loaded event
    // is consumed, stopping it lands them all and commits.
    watch_until_consumed(&metrics, loaded.produced, &bar).await?;
    let _ = stop.send(true);
    running
        .await
        .context("the pipeline task failed")?
        .context("the pipeline stopped with an error")?;
    bar.finish();

    print_table(&database, &spec_table(spec)?).await?;
    let get = |c: &std::sync::atomic::AtomicU64| Metrics::get(c);
    println!("\nPer stage:");
    println!(
        "  loaded        {:>5}  events into topic {topic}",
        loaded.produced
    );
    println!("  consumed      {:>5}", get(&metrics.consumed));
    println!("  filtered out  {:>5}", get(&metrics.filtered));
    println!(
        "  skipped       {:>5}  (already applied: idempotency key seen before, or no rule matched)",
        get(&metrics.skipped)
    );
    println!(
        "  written       {:>5}  (acknowledged by the sink, skipped ones included)",
        get(&metrics.written)
    );
    println!(
        "  dead-lettered {:>5}  to topic {dead_letter}",
        get(&metrics.dead_lettered)
    );
    print_dead_letters(&bootstrap, &dead_letter, get(&metrics.dead_lettered))?;
    println!(
        "\nDone. The table is in {0}; run again and it stays the same (idempotency).\nInspect it: sqlite3 {0} 'SELECT * FROM {1}'",
        database.display(),
        spec_table(spec)?
    );
    drop(broker);
    Ok(())
}

/// The example's pipeline with its sink writing to `database`, and the partitions of its
/// source topic.
fn pipeline(database: &Path) -> anyhow::Result<(Manifest<EventPipelineSpec>, i32)> {
    let resources = weir_crds::load::from_yaml(PIPELINE_FILE)
        .context("examples/todo-projection.yaml does not load")?;
    let mut partitions = 1;
    let mut found = None;
    for resource in resources {
        match resource {
            Resource::EventPipeline(p) if p.metadata.name == PIPELINE => found = Some(p),
            Resource::KafkaTopic(t) => partitions = t.spec.partitions,
            _ => {}
        }
    }
    let mut pipeline = found.context("examples/todo-projection.yaml has no todo-projection")?;
    for sink in &mut pipeline.spec.sinks {
        if let Some(mut table) = sink.postgres.take() {
            table.url_from = None::<SecretSource>;
            table.url = Some(format!("sqlite://{}", database.display()));
            sink.sqlite = Some(table);
        }
    }
    // SQLite keeps no offsets with its rows: at-least-once, and the idempotency keys make a
    // redelivered event change nothing.
    pipeline.spec.delivery = weir_crds::Delivery::AtLeastOnce;
    if let Err(problems) = pipeline.spec.validate() {
        bail!("the quickstart pipeline is invalid: {problems}");
    }
    Ok((pipeline, partitions))
}

fn spec_table(spec: &EventPipelineSpec) -> anyhow::Result<String> {
    spec.sinks
        .iter()
        .find_map(|s| s.sqlite.as_ref().map(|t| t.table.clone()))
        .context("the quickstart pipeline has no SQLite sink")
}

/// Creates the projection's table from the columns its rules write, keyed on its key
/// columns (what a migration would do before the pipeline runs).
async fn create_table(database: &Path, spec: &EventPipelineSpec) -> anyhow::Result<()> {
    let sink = spec
        .sinks
        .iter()
        .find_map(|s| s.sqlite.as_ref())
        .context("the quickstart pipeline has no SQLite sink")?;
    let mut columns: Vec<(String, ColumnType)> = Vec::new();
    for column in sink
        .rules
        .iter()
        .flat_map(|r| &r.columns)
        .chain(&sink.columns)
    {
        if !columns.iter().any(|(n, _)| *n == column.name) {
            columns.push((column.name.clone(), column.type_));
        }
    }
    let definitions: Vec<String> = columns
        .iter()
        .map(|(name, type_)| {
            let sql_type = match type_ {
                ColumnType::Integer | ColumnType::Bigint | ColumnType::Boolean => "INTEGER",
                ColumnType::Numeric => "NUMERIC",
                _ => "TEXT",
            };
            format!("{name} {sql_type}")
        })
        .collect();
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))",
        sink.table,
        definitions.join(", "),
        sink.key_columns.join(", ")
    );
    let pool = open(database).await?;
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .execute(&pool)
        .await
        .context("cannot create the quickstart table")?;
    pool.close().await;
    Ok(())
}

async fn open(database: &Path) -> anyhow::Result<SqlitePool> {
    SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(database)
            .create_if_missing(true),
    )
    .await
    .with_context(|| format!("cannot open {}", database.display()))
}

/// Waits until the engine has consumed `total` events, showing its progress.
async fn watch_until_consumed(
    metrics: &Arc<Metrics>,
    total: u64,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let consumed = Metrics::get(&metrics.consumed);
        bar.set_position(consumed.min(total));
        bar.set_message(format!(
            "written {}, dead-lettered {}",
            Metrics::get(&metrics.written),
            Metrics::get(&metrics.dead_lettered)
        ));
        if consumed >= total {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the pipeline consumed {consumed} of {total} events in {} s; run with RUST_LOG=info to see why",
                DEADLINE.as_secs()
            );
        }
        tick.tick().await;
    }
}

/// Prints the table as aligned text, ordered by its first column.
async fn print_table(database: &Path, table: &str) -> anyhow::Result<()> {
    let pool = open(database).await?;
    let names: Vec<String> =
        sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info({table})")))
            .fetch_all(&pool)
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>("name"))
            .collect::<Result<_, _>>()?;
    let select: Vec<String> = names
        .iter()
        .map(|n| format!("COALESCE(CAST({n} AS TEXT), '')"))
        .collect();
    let order = names
        .iter()
        .position(|n| n == "created_at")
        .map_or(1, |i| i + 1);
    let rows: Vec<Vec<String>> = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {} FROM {table} ORDER BY {order}, 1",
        select.join(", ")
    )))
    .fetch_all(&pool)
    .await?
    .iter()
    .map(|row| {
        (0..names.len())
            .map(|i| row.try_get::<String, _>(i))
            .collect()
    })
    .collect::<Result<_, _>>()?;
    pool.close().await;
    let widths: Vec<usize> = (0..names.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([names[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_owned()
    };
    println!("\nTable {table} ({} rows):", rows.len());
    println!("{}", line(&names));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for row in &rows {
        println!("{}", line(row));
    }
    Ok(())
}

/// Reads the dead-letter topic and prints each record with the error headers.
fn print_dead_letters(bootstrap: &str, topic: &str, expected: u64) -> anyhow::Result<()> {
    if expected == 0 {
        return Ok(());
    }
    println!("\nDead-lettered records (topic {topic}):");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "weir-quickstart-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    while seen < expected && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        seen += 1;
        let mut headers = Vec::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                if let Some(value) = header.value {
                    headers.push(format!("{}={}", header.key, String::from_utf8_lossy(value)));
                }
            }
        }
        let payload = message
            .payload()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        println!("  {payload}");
        for header in headers {
            println!("    {header}");
        }
    }
    if seen < expected {
        bail!("read {seen} of {expected} dead-lettered records from {topic}");
    }
    Ok(())
}

fn progress_bar() -> ProgressBar {
    ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}
