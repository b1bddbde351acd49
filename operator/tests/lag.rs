//! The lag reader against the real broker: a backlog is produced, more records arrive
//! while a consumer drains part of it and commits; between two readings the lag, the
//! arrival rate and the drain rate are what the test counted itself (within 10 %; the
//! counts are exact, so they match to the record).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::producer::FutureRecord;
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
