//! Self-tests of the harness against the real services it starts. The Kafka tests prove
//! the broker is the real thing (admin API, consumer groups, transactions), not an
//! emulation.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use rdkafka::Message;
use rdkafka::admin::{AdminOptions, ResourceSpecifier};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{BaseRecord, FutureProducer, FutureRecord, Producer, ThreadedProducer};
use weir_testkit::{PostgresServer, RedisServer, TestDatabase, TestKafka, unique_name};

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn postgres_accepts_a_connection_and_a_write() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    sqlx::query("CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL)")
        .execute(&db.pool)
        .await?;
    sqlx::query("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        .execute(&db.pool)
        .await?;
    let (count, v): (i64, String) = sqlx::query_as("SELECT count(*), max(v) FROM t")
        .fetch_one(&db.pool)
        .await?;
    assert_eq!((count, v.as_str()), (2, "two"));
    Ok(())
}

#[tokio::test]
async fn dedicated_postgres_keeps_its_data_across_a_stop_and_start() -> anyhow::Result<()> {
    let mut server = tokio::task::spawn_blocking(PostgresServer::start).await??;
    let db = server.create_database().await?;
    sqlx::query("CREATE TABLE t (id int)")
        .execute(&db.pool)
        .await?;
    sqlx::query("INSERT INTO t VALUES (7)")
        .execute(&db.pool)
        .await?;
    db.pool.close().await;

    server.stop();
    use sqlx::Connection;
    let refused = sqlx::PgConnection::connect(&db.url).await;
    assert!(refused.is_err(), "a stopped server must refuse connections");

    let mut server =
        tokio::task::spawn_blocking(move || server.start_again().map(|()| server)).await??;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let (id,): (i32,) = sqlx::query_as("SELECT id FROM t").fetch_one(&pool).await?;
    assert_eq!(id, 7);
    pool.close().await;
    server.stop();
    Ok(())
}

#[tokio::test]
async fn redis_answers_and_stores_a_value() -> anyhow::Result<()> {
    let server = tokio::task::spawn_blocking(RedisServer::start).await??;
    let client = redis::Client::open(server.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pong: String = redis::cmd("PING").query_async(&mut conn).await?;
    assert_eq!(pong, "PONG");
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await?;
    let value: String = redis::cmd("GET").arg("k").query_async(&mut conn).await?;
    assert_eq!(value, "v");
    Ok(())
}

#[tokio::test]
async fn kafka_topic_is_created_with_configs_and_read_back() -> anyhow::Result<()> {
    let kafka = shared_kafka().await?;
    let topic = kafka
        .create_topic(
            "configs",
            3,
            &[("retention.ms", "3600000"), ("cleanup.policy", "compact")],
        )
        .await?;
    let admin = kafka.admin()?;
    let described = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(&topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    let resource = described
        .into_iter()
        .next()
        .context("no describe result")?
        .map_err(|e| anyhow::anyhow!("describe_configs: {e}"))?;
    let value = |name: &str| {
        resource
            .get(name)
            .and_then(|entry| entry.value.clone())
            .unwrap_or_default()
    };
    assert_eq!(value("retention.ms"), "3600000");
    assert_eq!(value("cleanup.policy"), "compact");
    // A config the topic did not set comes back as the broker default, marked as such.
    let segment = resource
        .get("segment.bytes")
        .context("segment.bytes missing")?;
    assert!(
        segment.is_default,
        "segment.bytes should be the broker default"
    );
    Ok(())
}

#[tokio::test]
async fn kafka_consumed_record_commits_and_admin_api_reads_the_offset_back() -> anyhow::Result<()> {
    let kafka = shared_kafka().await?;
    let topic = kafka.create_topic("commit", 1, &[]).await?;
    let group = unique_name("group");

    let producer: FutureProducer = kafka.producer()?;
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload("hello"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;

    let consumer: StreamConsumer = kafka.consumer(&group)?;
    consumer.subscribe(&[&topic])?;
    let message = tokio::time::timeout(DEADLINE, consumer.stream().next())
        .await
        .context("no record within the deadline")?
        .context("stream ended")??;
    assert_eq!(message.payload(), Some(&b"hello"[..]));
    consumer.commit_message(&message, CommitMode::Sync)?;

    let committed = kafka.committed_offsets(&group, &topic)?;
    assert_eq!(committed.get(&0), Some(&1), "{committed:?}");
    // librdkafka cannot destroy a consumer while one of its messages is alive.
    drop(message);
    consumer.unsubscribe();
    drop(consumer);

    // The same offset through Kafka's own admin client (a client not written here).
    let kafka_for_tool = kafka.clone();
    let group_for_tool = group.clone();
    let described = tokio::task::spawn_blocking(move || {
        kafka_for_tool.kafka_tool(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &["--describe", "--group", &group_for_tool],
        )
    })
    .await??;
    let row = described
        .lines()
        .find(|line| line.contains(&topic))
        .with_context(|| format!("no row for {topic} in:\n{described}"))?;
    let columns: Vec<&str> = row.split_whitespace().collect();
    // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG ...
    assert_eq!(
        &columns[1..6],
        &[topic.as_str(), "0", "1", "1", "0"],
        "{row}"
    );
    Ok(())
}

#[tokio::test]
async fn kafka_aborted_transaction_is_invisible_to_read_committed() -> anyhow::Result<()> {
    let kafka = shared_kafka().await?;
    let topic = kafka.create_topic("txn", 1, &[]).await?;

    let bootstrap = kafka.bootstrap().to_owned();
    let topic_for_producer = topic.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let producer: ThreadedProducer<_> = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("transactional.id", unique_name("txn-producer"))
            .create()?;
        producer.init_transactions(DEADLINE)?;
        producer.begin_transaction()?;
        producer
            .send(
                BaseRecord::to(&topic_for_producer)
                    .key("a")
                    .payload("aborted"),
            )
            .map_err(|(e, _)| e)?;
        producer.flush(DEADLINE)?;
        producer.abort_transaction(DEADLINE)?;
        producer.begin_transaction()?;
        producer
            .send(
                BaseRecord::to(&topic_for_producer)
                    .key("c")
                    .payload("committed"),
            )
            .map_err(|(e, _)| e)?;
        producer.commit_transaction(DEADLINE)?;
        Ok(())
    })
    .await??;

    let committed = read_all(&kafka, &topic, "read_committed").await?;
    assert_eq!(committed, vec!["committed".to_owned()]);
    // The aborted record was really written: a read_uncommitted reader sees it.
    let uncommitted = read_all(&kafka, &topic, "read_uncommitted").await?;
    assert_eq!(
        uncommitted,
        vec!["aborted".to_owned(), "committed".to_owned()]
    );
    Ok(())
}

#[tokio::test]
async fn mock_cluster_serves_produce_and_consume_for_fault_injection() -> anyhow::Result<()> {
    // librdkafka's in-process mock cluster: used only where a fault must be injected.
    let cluster = weir_testkit::kafka::mock_cluster(1)?;
    let bootstrap = cluster.bootstrap_servers();
    cluster.create_topic("mocked", 1, 1)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    producer
        .send(
            FutureRecord::to("mocked").key("k").payload("v"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "mock-group")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&["mocked"])?;
    let message = tokio::time::timeout(DEADLINE, consumer.stream().next())
        .await
        .context("no record within the deadline")?
        .context("stream ended")??;
    assert_eq!(message.payload(), Some(&b"v"[..]));
    Ok(())
}

async fn shared_kafka() -> anyhow::Result<TestKafka> {
    Ok(tokio::task::spawn_blocking(TestKafka::shared).await??)
}

/// Every value in partition 0 of `topic` up to its end, as a reader at `isolation` sees it.
async fn read_all(kafka: &TestKafka, topic: &str, isolation: &str) -> anyhow::Result<Vec<String>> {
    let consumer: BaseConsumer = kafka
        .config()
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .set("enable.partition.eof", "true")
        .create()?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        consumer.subscribe(&[&topic])?;
        let mut values = Vec::new();
        let deadline = std::time::Instant::now() + DEADLINE;
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => values.push(
                    String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                ),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Ok(values),
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
        }
        anyhow::bail!("partition end not reached within {DEADLINE:?}; read {values:?}")
    })
    .await?
}

/// Servers' ports come from below the kernel's ephemeral range, which outgoing
/// connections draw their local ports from, so none of them can take a port between
/// `free_port` and the server binding it.
#[test]
fn free_ports_lie_below_the_ephemeral_range_and_can_be_bound() -> anyhow::Result<()> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let ephemeral: u16 = range
        .split_whitespace()
        .next()
        .context("an empty ip_local_port_range")?
        .parse()?;
    for _ in 0..50 {
        let port = weir_testkit::free_port("test")?;
        assert!(
            (10_000..ephemeral).contains(&port),
            "port {port} is not in 10000..{ephemeral}"
        );
        std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding port {port}"))?;
    }
    Ok(())
}
