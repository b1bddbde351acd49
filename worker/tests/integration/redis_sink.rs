//! The Redis sink against a real redis-server: Set (the event, or a value expression with a
//! TTL), Hset and Del; batch order per key; a record whose expression fails or whose command
//! Redis refuses (WRONGTYPE) rejected alone while the rest land; MULTI/EXEC with
//! `transaction`; credentials refused as fatal without the password in the message; Redis
//! stopped (unavailable) and started again (the next write lands); and rediss:// verified
//! against a throwaway CA.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use weir_testkit::RedisServer;
use weir_worker::record::Record;
use weir_worker::retry::ErrorClass;
use weir_worker::sink::redis::RedisSink;
use weir_worker::sink::{Rejected, Sink as _, SinkError, WriteInput};

async fn start() -> anyhow::Result<RedisServer> {
    Ok(tokio::task::spawn_blocking(RedisServer::start).await??)
}

/// A sink built from the spec's YAML (the fields of `redis:` in a pipeline).
fn sink(url: &str, spec: &str) -> anyhow::Result<RedisSink> {
    let spec: weir_crds::RedisSink = serde_yaml_ng::from_str(spec)?;
    RedisSink::new(spec, url).map_err(anyhow::Error::msg)
}

async fn client(url: &str) -> anyhow::Result<MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            topic: "users".into(),
            partition: 0,
            offset: i as i64,
            key: Some(format!("k{i}").into_bytes()),
            payload: None,
            timestamp: None,
            headers: vec![],
        })
        .collect()
}

/// Writes `events` as one batch.
async fn write(sink: &mut RedisSink, events: &[Value]) -> Result<Vec<Rejected>, SinkError> {
    let records = records(events.len());
    let input: Vec<WriteInput<'_>> = events
        .iter()
        .enumerate()
        .map(|(index, event)| WriteInput {
            index,
            record: &records[index],
            event,
        })
        .collect();
    sink.write(&input).await.map(|written| {
        assert_eq!(written.skipped, 0, "Redis writes every record it is given");
        written.rejected
    })
}

/// Writes a batch that must land whole.
async fn write_all(sink: &mut RedisSink, events: &[Value]) -> anyhow::Result<()> {
    let rejected = write(sink, events).await?;
    anyhow::ensure!(rejected.is_empty(), "records were rejected: {rejected:?}");
    Ok(())
}

async fn get(conn: &mut MultiplexedConnection, key: &str) -> anyhow::Result<Option<String>> {
    Ok(redis::cmd("GET").arg(key).query_async(conn).await?)
}

async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> anyhow::Result<i64> {
    Ok(redis::cmd("PTTL").arg(key).query_async(conn).await?)
}

#[tokio::test]
async fn set_writes_the_event_as_json_text_by_default_and_a_string_event_as_it_is()
-> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    let mut sink = sink(&server.url(), "key: '\"user:\" + key'")?;
    sink.prepare().await?;
    write_all(
        &mut sink,
        &[json!({"id": 1, "name": "ann"}), json!("plain text")],
    )
    .await?;
    let stored: Value =
        serde_json::from_str(&get(&mut conn, "user:k0").await?.unwrap_or_default())?;
    assert_eq!(stored, json!({"id": 1, "name": "ann"}));
    assert_eq!(
        get(&mut conn, "user:k1").await?.as_deref(),
        Some("plain text")
    );
    assert_eq!(pttl(&mut conn, "user:k0").await?, -1, "no ttl: no expiry");
    sink.close().await;
    Ok(())
}

#[tokio::test]
async fn set_with_a_value_expression_and_ttl_writes_the_value_with_an_expiry() -> anyhow::Result<()>
{
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    let mut sink = sink(
        &server.url(),
        "{key: event.id, value: event.profile, ttl: 1h}",
    )?;
    write_all(
        &mut sink,
        &[
            json!({"id": 7, "profile": "gold"}),
            json!({"id": "u8", "profile": {"tier": 2}}),
        ],
    )
    .await?;
    assert_eq!(get(&mut conn, "7").await?.as_deref(), Some("gold"));
    assert_eq!(
        get(&mut conn, "u8").await?.as_deref(),
        Some(r#"{"tier":2}"#)
    );
    for key in ["7", "u8"] {
        let ttl = pttl(&mut conn, key).await?;
        assert!(ttl > 0 && ttl <= 3_600_000, "PTTL {key} = {ttl}");
    }
    Ok(())
}

#[tokio::test]
async fn hset_writes_the_fields_and_expires_the_hash() -> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    let mut sink = sink(
        &server.url(),
        "{command: Hset, key: '\"user:\" + event.email', ttl: 10m, fields: {name: event.name, age: event.age, tags: event.tags}}",
    )?;
    write_all(
        &mut sink,
        &[json!({"email": "a@x", "name": "ann", "age": 31, "tags": ["a", "b"]})],
    )
    .await?;
    let hash: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg("user:a@x")
        .query_async(&mut conn)
        .await?;
    assert_eq!(
        hash,
        [("age", "31"), ("name", "ann"), ("tags", r#"["a","b"]"#)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    );
    let ttl = pttl(&mut conn, "user:a@x").await?;
    assert!(ttl > 0 && ttl <= 600_000, "PTTL = {ttl}");
    Ok(())
}

#[tokio::test]
async fn del_removes_the_keys() -> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    for key in ["user:1", "user:2", "user:3"] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("x")
            .query_async(&mut conn)
            .await?;
    }
    let mut sink = sink(
        &server.url(),
        "{command: Del, key: '\"user:\" + string(event.id)'}",
    )?;
    write_all(
        &mut sink,
        &[json!({"id": 1}), json!({"id": 3}), json!({"id": 9})],
    )
    .await?;
    assert_eq!(get(&mut conn, "user:1").await?, None);
    assert_eq!(get(&mut conn, "user:2").await?.as_deref(), Some("x"));
    assert_eq!(get(&mut conn, "user:3").await?, None);
    Ok(())
}

#[tokio::test]
async fn writes_to_one_key_in_one_batch_apply_in_batch_order() -> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    for transaction in [false, true] {
        let mut sink = sink(
            &server.url(),
            &format!("{{key: event.k, value: event.v, transaction: {transaction}}}"),
        )?;
        let events: Vec<Value> = (0..200)
            .map(|i| json!({"k": format!("k{}", i % 3), "v": format!("{transaction}-{i}")}))
            .collect();
        write_all(&mut sink, &events).await?;
        // the last event of each key: 197 (k2), 198 (k0), 199 (k1)
        assert_eq!(
            get(&mut conn, "k0").await?,
            Some(format!("{transaction}-198"))
        );
        assert_eq!(
            get(&mut conn, "k1").await?,
            Some(format!("{transaction}-199"))
        );
        assert_eq!(
            get(&mut conn, "k2").await?,
            Some(format!("{transaction}-197"))
        );
    }
    let mut del = sink(&server.url(), "{command: Del, key: event.k}")?;
    write_all(&mut del, &[json!({"k": "k0"})]).await?;
    let mut set = sink(&server.url(), "{key: event.k, value: event.v}")?;
    write_all(&mut set, &[json!({"k": "k0", "v": "after-del"})]).await?;
    assert_eq!(get(&mut conn, "k0").await?.as_deref(), Some("after-del"));
    Ok(())
}

#[tokio::test]
async fn a_record_whose_expression_fails_is_rejected_alone() -> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    let mut sink = sink(&server.url(), "{key: event.id, value: event.name}")?;
    let rejected = write(
        &mut sink,
        &[
            json!({"id": "a", "name": "ann"}),
            json!({"id": "b"}),
            json!({"id": {"nested": true}, "name": "x"}),
            json!({"id": "c", "name": "cy"}),
        ],
    )
    .await?;
    assert_eq!(
        rejected
            .iter()
            .map(|r| (r.index, r.class))
            .collect::<Vec<_>>(),
        vec![(1, ErrorClass::Permanent), (2, ErrorClass::Permanent)]
    );
    assert!(
        rejected[0].reason.contains("event.name"),
        "{}",
        rejected[0].reason
    );
    assert!(
        rejected[1].reason.contains("not a string or a number"),
        "{}",
        rejected[1].reason
    );
    assert_eq!(get(&mut conn, "a").await?.as_deref(), Some("ann"));
    assert_eq!(get(&mut conn, "c").await?.as_deref(), Some("cy"));
    assert_eq!(get(&mut conn, "b").await?, None);
    Ok(())
}

#[tokio::test]
async fn a_command_redis_refuses_with_wrongtype_rejects_its_record_alone() -> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    for transaction in [false, true] {
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        let _: () = redis::cmd("SET")
            .arg("user:2")
            .arg("a string")
            .query_async(&mut conn)
            .await?;
        let mut sink = sink(
            &server.url(),
            &format!(
                "{{command: Hset, key: '\"user:\" + string(event.id)', fields: {{name: event.name}}, transaction: {transaction}}}"
            ),
        )?;
        let rejected = write(
            &mut sink,
            &[
                json!({"id": 1, "name": "ann"}),
                json!({"id": 2, "name": "bo"}),
                json!({"id": 3, "name": "cy"}),
            ],
        )
        .await?;
        assert_eq!(rejected.len(), 1, "transaction {transaction}: {rejected:?}");
        assert_eq!(rejected[0].index, 1);
        assert_eq!(rejected[0].class, ErrorClass::Permanent);
        assert!(
            rejected[0].reason.contains("WRONGTYPE"),
            "{}",
            rejected[0].reason
        );
        for (key, name) in [("user:1", "ann"), ("user:3", "cy")] {
            let stored: Option<String> = redis::cmd("HGET")
                .arg(key)
                .arg("name")
                .query_async(&mut conn)
                .await?;
            assert_eq!(stored.as_deref(), Some(name), "transaction {transaction}");
        }
        assert_eq!(get(&mut conn, "user:2").await?.as_deref(), Some("a string"));
    }
    Ok(())
}

/// `calls=` of one command in INFO commandstats.
async fn calls(conn: &mut MultiplexedConnection, command: &str) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let prefix = format!("cmdstat_{command}:calls=");
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(Ok(0), str::parse)?)
}

#[tokio::test]
async fn transaction_sends_each_batch_as_one_multi_exec() -> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    let events: Vec<Value> = (0..10).map(|i| json!({"id": i})).collect();

    let mut plain = sink(&server.url(), "key: event.id")?;
    write_all(&mut plain, &events).await?;
    assert_eq!(calls(&mut conn, "exec").await?, 0);

    let mut atomic = sink(&server.url(), "{key: event.id, transaction: true}")?;
    write_all(&mut atomic, &events).await?;
    write_all(&mut atomic, &events).await?;
    assert_eq!(calls(&mut conn, "multi").await?, 2);
    assert_eq!(calls(&mut conn, "exec").await?, 2);
    assert_eq!(calls(&mut conn, "set").await?, 30);
    assert_eq!(get(&mut conn, "9").await?.as_deref(), Some(r#"{"id":9}"#));
    Ok(())
}

#[tokio::test]
async fn a_stopped_redis_is_unavailable_and_the_next_write_after_it_starts_lands()
-> anyhow::Result<()> {
    let mut server = start().await?;
    let url = server.url();
    let mut sink = sink(&url, "{key: event.id}")?;
    write_all(&mut sink, &[json!({"id": "before"})]).await?;

    server.stop();
    let failure = write(&mut sink, &[json!({"id": "during"})])
        .await
        .expect_err("Redis is stopped");
    assert_eq!(failure.class, ErrorClass::Unavailable, "{failure}");
    let failure = sink.prepare().await.expect_err("Redis is stopped");
    assert_eq!(failure.class, ErrorClass::Unavailable, "{failure}");

    let server =
        tokio::task::spawn_blocking(move || server.start_again().map(|()| server)).await??;
    // start_again waited for PING: the very next write must land.
    write_all(&mut sink, &[json!({"id": "after"})]).await?;
    let mut conn = client(&server.url()).await?;
    assert_eq!(
        get(&mut conn, "after").await?.as_deref(),
        Some(r#"{"id":"after"}"#)
    );
    Ok(())
}

#[tokio::test]
async fn a_redis_restart_between_batches_is_not_seen_by_the_next_write() -> anyhow::Result<()> {
    let mut server = start().await?;
    let mut sink = sink(&server.url(), "{key: event.id}")?;
    write_all(&mut sink, &[json!({"id": "before"})]).await?;
    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server.start_again().map(|()| server)
    })
    .await??;
    // The sink's connection died with the old process; it is replaced within this write.
    write_all(&mut sink, &[json!({"id": "after"})]).await?;
    let mut conn = client(&server.url()).await?;
    assert_eq!(
        get(&mut conn, "after").await?.as_deref(),
        Some(r#"{"id":"after"}"#)
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_redis_fails_prepare_as_unavailable_not_construction() -> anyhow::Result<()>
{
    let port = weir_testkit::free_port("redis")?;
    let sink = sink(
        &format!("redis://:s3cret@127.0.0.1:{port}/"),
        "key: event.id",
    )?;
    let failure = sink.prepare().await.expect_err("nothing listens there");
    assert_eq!(failure.class, ErrorClass::Unavailable, "{failure}");
    assert!(!failure.message.contains("s3cret"), "{failure}");
    Ok(())
}

#[tokio::test]
async fn refused_credentials_are_fatal_and_the_password_is_never_in_the_message()
-> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right-pw")
        .query_async(&mut conn)
        .await?;
    let port = server.port();

    let wrong = sink(
        &format!("redis://:wrong-pw@127.0.0.1:{port}/"),
        "key: event.id",
    )?;
    let failure = wrong.prepare().await.expect_err("wrong password");
    assert_eq!(failure.class, ErrorClass::Fatal, "{failure}");
    assert!(!failure.message.contains("wrong-pw"), "{failure}");

    let mut none = sink(&format!("redis://127.0.0.1:{port}/"), "key: event.id")?;
    let failure = none.prepare().await.expect_err("no password");
    assert_eq!(failure.class, ErrorClass::Fatal, "{failure}");
    let failure = write(&mut none, &[json!({"id": 1})])
        .await
        .expect_err("no password");
    assert_eq!(failure.class, ErrorClass::Fatal, "{failure}");

    let mut right = sink(
        &format!("redis://:right-pw@127.0.0.1:{port}/"),
        "key: event.id",
    )?;
    right.prepare().await?;
    write_all(&mut right, &[json!({"id": 1})]).await?;
    assert_eq!(get(&mut conn, "1").await?.as_deref(), Some(r#"{"id":1}"#));
    Ok(())
}

/// A redis-server with a TLS port (and a plain one to check what landed), killed on drop.
struct TlsRedis {
    child: Child,
    plain: u16,
    tls: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway CA and a certificate for 127.0.0.1 it signed, as PEM files in `dir`; returns
/// the CA certificate's path.
fn make_certificates(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "weir test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let server_cert = server.signed_by(&server_key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("server.pem"), server_cert.pem())?;
    std::fs::write(dir.join("server.key"), server_key.serialize_pem())?;
    // A second CA that signed nothing here: trusting only it must fail the handshake.
    let other_key = KeyPair::generate()?;
    let mut other = CertificateParams::new(Vec::<String>::new())?;
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    other
        .distinguished_name
        .push(DnType::CommonName, "another CA");
    std::fs::write(
        dir.join("other-ca.pem"),
        other.self_signed(&other_key)?.pem(),
    )?;
    Ok(dir.join("ca.pem"))
}

async fn start_tls_redis(dir: &Path) -> anyhow::Result<TlsRedis> {
    let plain = weir_testkit::free_port("redis")?;
    let tls = weir_testkit::free_port("redis")?;
    let path = |name: &str| dir.join(name).display().to_string();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &plain.to_string()])
        .args(["--tls-port", &tls.to_string()])
        .args(["--tls-cert-file", &path("server.pem")])
        .args(["--tls-key-file", &path("server.key")])
        .args(["--tls-ca-cert-file", &path("ca.pem")])
        .args(["--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no", "--dir", &path("")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("redis: cannot start redis-server with TLS: {e}"))?;
    let server = TlsRedis { child, plain, tls };
    let url = format!("redis://127.0.0.1:{plain}/");
    weir_testkit::wait_for(
        "redis-server with TLS answering PING",
        Duration::from_secs(20),
        || {
            let url = url.clone();
            async move {
                let mut conn = client(&url).await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            }
        },
    )
    .await?;
    Ok(server)
}

/// The child test's name as the test harness knows it: its path in this test binary.
fn tls_child() -> String {
    let module = module_path!()
        .split_once("::")
        .map_or("", |(_crate, module)| module);
    format!("{module}::rediss_child_run_by_the_tls_test")
}
/// What the child prints once it has checked what it was asked to.
const TLS_CHILD_CHECKED: &str = "rediss child checked:";

/// Runs [`rediss_child_run_by_the_tls_test`] in a new process of this test binary, with
/// SSL_CERT_FILE naming `trusted` (the environment of this process cannot be changed safely).
fn run_tls_child(url: &str, trusted: &Path, expect: &str) -> anyhow::Result<String> {
    let output = Command::new(std::env::current_exe()?)
        .args([
            tls_child().as_str(),
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SSL_CERT_FILE", trusted)
        .env_remove("SSL_CERT_DIR")
        .env("WEIR_TEST_REDISS_URL", url)
        .env("WEIR_TEST_REDISS_EXPECT", expect)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    anyhow::ensure!(
        output.status.success() && text.contains(&format!("{TLS_CHILD_CHECKED} {expect}")),
        "the TLS child ({expect}) failed:\n{text}"
    );
    Ok(text)
}

#[tokio::test]
async fn rediss_writes_over_tls_verified_against_the_trusted_ca() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = make_certificates(dir.path())?;
    let server = start_tls_redis(dir.path()).await?;
    let url = format!("rediss://127.0.0.1:{}/", server.tls);
    let (url_for_child, ca_for_child) = (url.clone(), ca.clone());
    tokio::task::spawn_blocking(move || run_tls_child(&url_for_child, &ca_for_child, "trusted"))
        .await??;
    let mut conn = client(&format!("redis://127.0.0.1:{}/", server.plain)).await?;
    assert_eq!(
        get(&mut conn, "over-tls").await?.as_deref(),
        Some(r#"{"id":"over-tls"}"#)
    );

    let other = dir.path().join("other-ca.pem");
    tokio::task::spawn_blocking(move || run_tls_child(&url, &other, "untrusted")).await??;
    Ok(())
}

/// Run only by [`rediss_writes_over_tls_verified_against_the_trusted_ca`], in a process whose
/// SSL_CERT_FILE it chose; run any other way (`--include-ignored`) it has nothing to check.
#[tokio::test]
#[ignore = "run by rediss_writes_over_tls_verified_against_the_trusted_ca with SSL_CERT_FILE set"]
async fn rediss_child_run_by_the_tls_test() -> anyhow::Result<()> {
    let (Ok(url), Ok(expect)) = (
        std::env::var("WEIR_TEST_REDISS_URL"),
        std::env::var("WEIR_TEST_REDISS_EXPECT"),
    ) else {
        return Ok(());
    };
    let mut sink = sink(&url, "key: event.id")?;
    if expect == "trusted" {
        sink.prepare().await?;
        write_all(&mut sink, &[json!({"id": "over-tls"})]).await?;
    } else {
        let failure = sink.prepare().await.expect_err("an untrusted certificate");
        assert_eq!(failure.class, ErrorClass::Unavailable, "{failure}");
        assert!(failure.message.contains("certificate"), "{failure}");
    }
    eprintln!("{TLS_CHILD_CHECKED} {expect}");
    Ok(())
}

#[tokio::test]
async fn without_a_transform_set_writes_the_records_own_bytes() -> anyhow::Result<()> {
    let server = start().await?;
    let mut conn = client(&server.url()).await?;
    let sink = sink(&server.url(), "key: key")?.with_payload_as_event(true);
    let payload = br#"{ "id": 7,  "name": "as produced" }"#.to_vec();
    let record = Record {
        topic: "users".into(),
        partition: 0,
        offset: 0,
        key: Some(b"u7".to_vec()),
        payload: Some(payload.clone()),
        timestamp: None,
        headers: vec![],
    };
    let event: Value = serde_json::from_slice(&payload)?;
    let input = [WriteInput {
        index: 0,
        record: &record,
        event: &event,
    }];
    let written = sink.write(&input).await?;
    assert!(written.rejected.is_empty(), "{written:?}");
    assert_eq!(
        get(&mut conn, "u7").await?.as_deref(),
        Some(r#"{ "id": 7,  "name": "as produced" }"#)
    );
    Ok(())
}
