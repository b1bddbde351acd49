//! The lag reader against the real broker: a backlog is produced, more records arrive
//! while a consumer drains part of it and commits; between two readings the lag, the
//! arrival rate and the drain rate are what the test counted itself (within 10 %; the
//! counts are exact, so they match to the record). On a topic written in transactions the
//! lag is what a read_committed consumer still receives: no markers, no aborted records,
//! over the plaintext, SASL_SSL (SCRAM) and mutual-TLS listeners alike.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::producer::{BaseRecord, FutureRecord, Producer as _, ThreadedProducer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use weir_crds::StartPosition;
use weir_operator::autoscale::lag;
use weir_operator::kafka::Admin;
use weir_testkit::{TestKafka, unique_name};

async fn produce(kafka: &TestKafka, topic: &str, count: usize) -> anyhow::Result<()> {
    let producer = kafka.producer()?;
    let sends: Vec<_> = (0..count)
        .map(|i| {
            let key = format!("k{i}");
            let value = format!("{{\"n\":{i}}}");
            let producer = producer.clone();
            let topic = topic.to_owned();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Duration::from_secs(10),
                    )
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("{e}"))
            }
        })
        .collect();
    for result in futures::future::join_all(sends).await {
        result?;
    }
    Ok(())
}

/// A reading; on a fresh broker the group coordinator may not be ready for the first one
/// (NotCoordinator), so that is waited for, with a deadline.
async fn read(
    admin: &Admin,
    group: &str,
    topics: &[String],
    start: StartPosition,
) -> anyhow::Result<lag::Reading> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match lag::read(admin, group, topics, start).await {
            Ok(reading) => return Ok(reading),
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("lag not read yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn within_ten_percent(measured: f64, counted: f64) -> bool {
    (measured - counted).abs() <= 0.1 * counted.abs().max(1.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn lag_and_rates_match_the_tests_own_counts() -> anyhow::Result<()> {
    let kafka = TestKafka::shared()?;
    let topic = kafka.create_topic("lag", 3, &[]).await?;
    let group = unique_name("lag-group");
    let topics = vec![topic.clone()];
    let admin = Admin::new(&kafka.config(), Duration::from_secs(10))?;

    // A backlog, and no commit yet: everything counts (Earliest), nothing under Latest.
    let backlog = 3000;
    produce(&kafka, &topic, backlog).await?;
    let first = read(&admin, &group, &topics, StartPosition::Earliest).await?;
    assert_eq!(first.total(), backlog as i64);
    let latest = read(&admin, &group, &topics, StartPosition::Latest).await?;
    assert_eq!(latest.total(), 0);

    // More arrive while a consumer drains part of the backlog and commits.
    let arriving = 1200;
    produce(&kafka, &topic, arriving).await?;
    let consumer = kafka.consumer(&group)?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..3 {
        assignment.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let drained = 1700;
    let mut next: HashMap<i32, i64> = HashMap::new();
    for _ in 0..drained {
        let message = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await??;
        next.insert(message.partition(), message.offset() + 1);
    }
    let mut commit = TopicPartitionList::new();
    for (p, offset) in &next {
        commit.add_partition_offset(&topic, *p, Offset::Offset(*offset))?;
    }
    consumer.commit(&commit, CommitMode::Sync)?;
    let second = read(&admin, &group, &topics, StartPosition::Earliest).await?;

    let rates = lag::rates(&first, &second).ok_or_else(|| anyhow::anyhow!("no rates"))?;
    let expected_lag = (backlog + arriving - drained) as i64;
    assert_eq!(second.total(), expected_lag);
    assert_eq!(second.lag().topics[0].lag, expected_lag);
    let counted_arrival = arriving as f64 / rates.seconds;
    let counted_drain = drained as f64 / rates.seconds;
    assert!(
        within_ten_percent(rates.arrival, counted_arrival),
        "arrival {} vs counted {counted_arrival}",
        rates.arrival
    );
    assert!(
        within_ten_percent(rates.drain(), counted_drain),
        "drain {} vs counted {counted_drain}",
        rates.drain()
    );
    Ok(())
}

/// Consumes `count` records (read_committed, the consumer's default) and commits, per
/// partition, the offset after the last one, as a worker does.
async fn consume_and_commit(
    consumer: &StreamConsumer,
    topic: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut values = Vec::new();
    for _ in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await??;
        next.insert(message.partition(), message.offset() + 1);
        values.push(String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned());
    }
    let mut commit = TopicPartitionList::new();
    for (p, offset) in &next {
        commit.add_partition_offset(topic, *p, Offset::Offset(*offset))?;
    }
    consumer.commit(&commit, CommitMode::Sync)?;
    Ok(values)
}

/// Admins over the broker's secured listeners: SASL_SSL with SCRAM-SHA-512 and the CA,
/// and mutual TLS (the counting Fetch goes over the same settings as the offsets).
fn secured_admins(kafka: &TestKafka) -> anyhow::Result<Vec<(&'static str, Admin)>> {
    let s = kafka.security()?;
    let mut scram = rdkafka::ClientConfig::new();
    scram
        .set("bootstrap.servers", &s.sasl_ssl)
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", &s.scram_user)
        .set("sasl.password", &s.scram_password)
        .set("ssl.ca.pem", &s.ca_pem);
    let mut mtls = rdkafka::ClientConfig::new();
    mtls.set("bootstrap.servers", &s.ssl)
        .set("security.protocol", "SSL")
        .set("ssl.ca.pem", &s.ca_pem)
        .set("ssl.certificate.pem", &s.client_cert_pem)
        .set("ssl.key.pem", &s.client_key_pem);
    Ok(vec![
        ("SASL_SSL", Admin::new(&scram, Duration::from_secs(10))?),
        ("mutual TLS", Admin::new(&mtls, Duration::from_secs(10))?),
    ])
}

/// The offset difference the reader would report without counting records.
fn offset_lag(reading: &lag::Reading) -> i64 {
    reading
        .offsets
        .iter()
        .map(|(p, (c, h))| reading.partition_lag(p, *c, *h))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn transaction_markers_and_aborted_records_are_not_lag() -> anyhow::Result<()> {
    let kafka = TestKafka::shared()?;
    let topic = kafka.create_topic("lag-txn", 2, &[]).await?;
    let group = unique_name("lag-txn-group");
    let topics = vec![topic.clone()];
    let admin = Admin::new(&kafka.config(), Duration::from_secs(10))?;

    // 5 transactions of 20 records over both partitions; the third is aborted. Each
    // transaction leaves a marker on each partition it wrote to.
    let (transactions, per_transaction, aborted) = (5, 20, 2);
    let producer_config = kafka.config();
    let producer_topic = topic.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let timeout = Duration::from_secs(20);
        let producer: ThreadedProducer<_> = producer_config
            .clone()
            .set("transactional.id", unique_name("lag-txn-producer"))
            .create()?;
        producer.init_transactions(timeout)?;
        for t in 0..transactions {
            producer.begin_transaction()?;
            for i in 0..per_transaction {
                let key = format!("k{i}");
                let value = format!("t{t}-{i}");
                producer
                    .send(BaseRecord::to(&producer_topic).key(&key).payload(&value))
                    .map_err(|(e, _)| e)?;
            }
            producer.flush(timeout)?;
            if t == aborted {
                producer.abort_transaction(timeout)?;
            } else {
                producer.commit_transaction(timeout)?;
            }
        }
        Ok(())
    })
    .await??;
    let committed = (transactions - 1) * per_transaction;

    // No commit yet, Earliest: every committed record, from offset 0.
    let first = read(&admin, &group, &topics, StartPosition::Earliest).await?;
    assert_eq!(first.total(), committed as i64);
    let secured = secured_admins(&kafka)?;
    for (listener, admin) in &secured {
        let reading = read(admin, &group, &topics, StartPosition::Earliest).await?;
        assert_eq!(reading.total(), committed as i64, "over {listener}");
        assert_eq!(reading.counted.len(), 2, "over {listener}: {reading:?}");
    }
    assert_eq!(
        offset_lag(&first),
        (transactions * per_transaction + 2 * transactions) as i64,
        "records, aborted records and a marker per transaction and partition"
    );

    // Part-way: what was consumed and committed is gone from the lag, to the record.
    let consumer = kafka.consumer(&group)?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..2 {
        assignment.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let part = 30;
    let mut values = consume_and_commit(&consumer, &topic, part).await?;
    let partway = read(&admin, &group, &topics, StartPosition::Earliest).await?;
    assert_eq!(partway.total(), (committed - part) as i64);
    assert!(offset_lag(&partway) > partway.total(), "{partway:?}");
    assert_eq!(partway.lag().topics[0].lag, (committed - part) as i64);

    // Everything consumed and committed: no lag, though the offsets still differ.
    values.extend(consume_and_commit(&consumer, &topic, committed - part).await?);
    assert!(
        values
            .iter()
            .all(|v| !v.starts_with(&format!("t{aborted}-"))),
        "the consumer received an aborted record"
    );
    let done = read(&admin, &group, &topics, StartPosition::Earliest).await?;
    assert_eq!(done.total(), 0, "{done:?}");
    assert_eq!(done.lags(), vec![0, 0]);
    for (listener, admin) in &secured {
        let reading = read(admin, &group, &topics, StartPosition::Earliest).await?;
        assert_eq!(reading.lags(), vec![0, 0], "over {listener}: {reading:?}");
    }
    assert!(
        offset_lag(&done) >= 2,
        "each partition ends with a commit marker: {done:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn records_retention_removed_are_not_lag_before_the_first_commit() -> anyhow::Result<()> {
    let kafka = TestKafka::shared()?;
    let topic = kafka.create_topic("lag-retained", 2, &[]).await?;
    let group = unique_name("lag-retained-group");
    let topics = vec![topic.clone()];
    let admin = Admin::new(&kafka.config(), Duration::from_secs(10))?;
    // Partition 0 small enough to have its records counted, partition 1 counted by offsets.
    let producer = kafka.producer()?;
    for (partition, count) in [(0, 300), (1, 2000)] {
        let sends: Vec<_> = (0..count)
            .map(|i| {
                let value = format!("{{\"n\":{i}}}");
                let producer = producer.clone();
                let topic = topic.clone();
                async move {
                    producer
                        .send(
                            FutureRecord::<(), _>::to(&topic)
                                .partition(partition)
                                .payload(&value),
                            Duration::from_secs(10),
                        )
                        .await
                        .map_err(|(e, _)| anyhow::anyhow!("{e}"))
                }
            })
            .collect();
        for result in futures::future::join_all(sends).await {
            result?;
        }
    }
    // What retention would have done: the oldest records gone (DeleteRecords).
    let mut before = TopicPartitionList::new();
    before.add_partition_offset(&topic, 0, Offset::Offset(100))?;
    before.add_partition_offset(&topic, 1, Offset::Offset(500))?;
    let deleted = kafka
        .admin()?
        .delete_records(&before, &rdkafka::admin::AdminOptions::new())
        .await?;
    for e in deleted.elements() {
        anyhow::ensure!(e.error().is_ok(), "{e:?}");
    }
    let reading = read(&admin, &group, &topics, StartPosition::Earliest).await?;
    assert_eq!(reading.lags(), vec![200, 1500]);
    assert_eq!(reading.total(), 1700);
    Ok(())
}
