//! Invalid resources are refused, every problem named by its field path.

use weir_crds::load::{from_yaml, one_from_yaml};
use weir_crds::{FieldError, Resource};

/// The problems a document has, from loading or from `validate()`.
fn problems(yaml: &str) -> Vec<FieldError> {
    match one_from_yaml(yaml) {
        Err(err) => err.problems.0,
        Ok(resource) => resource.validate().err().map(|p| p.0).unwrap_or_default(),
    }
}

fn assert_refused(yaml: &str, path: &str, words: &str) {
    let found = problems(yaml);
    assert!(
        found
            .iter()
            .any(|p| p.path == path && p.message.contains(words)),
        "expected a problem at {path} mentioning {words:?}, got {found:#?}"
    );
}

const PIPELINE: &str = r#"
apiVersion: weir.dev/v1alpha1
kind: EventPipeline
metadata: {name: p}
spec:
  source:
    topics: [orders]
  sinks:
    - postgres:
        urlFrom: {env: DATABASE_URL}
        table: orders
        mode: Upsert
        keyColumns: [id]
        columns:
          - {name: id, type: bigint}
          - {name: total, type: numeric}
"#;

#[test]
fn the_base_pipeline_is_valid() {
    assert_eq!(problems(PIPELINE), vec![]);
}

#[test]
fn topic_with_zero_partitions_is_refused() {
    let yaml = "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {name: t}\nspec:\n  partitions: 0\n";
    assert_refused(yaml, "spec.partitions", "at least 1");
}

#[test]
fn min_replicas_above_max_replicas_is_refused() {
    let yaml = format!("{PIPELINE}  scaling:\n    minReplicas: 5\n    maxReplicas: 2\n");
    assert_refused(&yaml, "spec.scaling.minReplicas", "exceeds maxReplicas 2");
}

#[test]
fn unknown_sink_kind_is_refused() {
    let yaml = PIPELINE.replace("    - postgres:", "    - cassandra: {}\n    - postgres:");
    assert_refused(
        &yaml,
        "spec.sinks[0].cassandra",
        "unknown sink kind \"cassandra\"",
    );
}

#[test]
fn sink_without_a_kind_is_refused() {
    let yaml = PIPELINE.replace("    - postgres:", "    - name: nothing\n    - postgres:");
    assert_refused(&yaml, "spec.sinks[0]", "no sink kind set");
}

#[test]
fn pipeline_without_source_topics_is_refused() {
    let yaml = PIPELINE.replace("topics: [orders]", "topics: []");
    assert_refused(&yaml, "spec.source.topics", "at least one topic");
}

#[test]
fn malformed_duration_is_refused() {
    let yaml = format!("{PIPELINE}  batch:\n    maxWait: 30 seconds\n");
    assert_refused(
        &yaml,
        "spec.batch.maxWait",
        "invalid duration \"30 seconds\"",
    );
}

#[test]
fn misspelt_field_is_refused_not_dropped() {
    let yaml = format!("{PIPELINE}  batch:\n    maxRecord: 10\n");
    assert_refused(&yaml, "spec.batch.maxRecord", "unknown field");
}

#[test]
fn wrong_type_names_the_field() {
    let yaml = format!("{PIPELINE}  batch:\n    maxRecords: many\n");
    assert_refused(&yaml, "spec.batch.maxRecords", "invalid type");
}

#[test]
fn invalid_cel_expression_is_refused_at_validation() {
    let yaml = format!("{PIPELINE}  filter: 'event.type == '\n");
    assert_refused(&yaml, "spec.filter", "invalid CEL expression");
}

#[test]
fn upsert_key_missing_from_columns_is_refused() {
    let yaml = PIPELINE.replace("keyColumns: [id]", "keyColumns: [order_id]");
    assert_refused(
        &yaml,
        "spec.sinks[0].postgres.columns",
        "key column \"order_id\" is missing",
    );
}

#[test]
fn dead_letter_topic_equal_to_source_is_refused() {
    let yaml = format!("{PIPELINE}  deadLetter:\n    topic: orders\n");
    assert_refused(&yaml, "spec.deadLetter.topic", "would loop");
}

#[test]
fn every_problem_is_reported_not_just_the_first() {
    let yaml = PIPELINE
        .replace("topics: [orders]", "topics: []")
        .replace("table: orders", "table: \"bad table\"")
        + "  retry:\n    initialBackoff: 1m\n    maxBackoff: 1s\n";
    let found = problems(&yaml);
    let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "spec.source.topics",
        "spec.sinks[0].postgres.table",
        "spec.retry.initialBackoff",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {paths:?}"
        );
    }
}

#[test]
fn secrets_are_refused_as_inline_connection_properties() {
    let yaml = "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {name: c}\nspec:\n  bootstrapServers: [k:9092]\n  properties:\n    sasl.password: hunter2\n";
    assert_refused(
        yaml,
        "spec.properties[\"sasl.password\"]",
        "passwordSecretRef",
    );
    // The refusal names the field, never the value.
    assert!(
        problems(yaml)
            .iter()
            .all(|p| !p.to_string().contains("hunter2"))
    );
}

#[test]
fn topic_config_values_are_checked() {
    let yaml = "apiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {name: t}\nspec:\n  config:\n    retention.ms: 7d\n    cleanup.policy: compacted\n";
    assert_refused(yaml, "spec.config[\"retention.ms\"]", "must be an integer");
    assert_refused(yaml, "spec.config[\"cleanup.policy\"]", "compact");
}

#[test]
fn unknown_kind_and_api_version_are_refused() {
    let other_kind =
        "apiVersion: weir.dev/v1alpha1\nkind: KafkaUser\nmetadata: {name: u}\nspec: {}\n";
    assert_refused(other_kind, "kind", "not a Weir kind");
    let other_version = PIPELINE.replace("weir.dev/v1alpha1", "weir.dev/v1");
    assert_refused(&other_version, "apiVersion", "weir.dev/v1alpha1");
}

#[test]
fn defaults_match_the_product_spec() {
    let Ok(Resource::EventPipeline(pipeline)) = one_from_yaml(PIPELINE) else {
        panic!("the base pipeline must load");
    };
    let spec = &pipeline.spec;
    assert_eq!(spec.batch.max_records, 1000);
    assert_eq!(spec.batch.max_bytes, 4 * 1024 * 1024);
    assert_eq!(
        spec.batch.max_wait.parse(),
        Ok(std::time::Duration::from_millis(100))
    );
    assert_eq!(
        spec.retry.initial_backoff.parse(),
        Ok(std::time::Duration::from_millis(200))
    );
    assert_eq!(spec.consumer_group("shop", "p"), "shop.p");
    assert_eq!(spec.delivery, weir_crds::Delivery::AtLeastOnce);
}

#[test]
fn multi_document_files_report_the_failing_document() {
    let yaml = format!(
        "{PIPELINE}---\napiVersion: weir.dev/v1alpha1\nkind: KafkaTopic\nmetadata: {{name: t}}\nspec:\n  partitions: lots\n"
    );
    let err = from_yaml(&yaml).expect_err("the second document is invalid");
    assert_eq!(err.document, 2);
    assert!(err.problems.contains_path("spec.partitions"), "{err}");
}

#[test]
fn sql_sink_urls_are_checked_for_their_kind_and_for_passwords() {
    let with_url =
        |url: &str| PIPELINE.replace("urlFrom: {env: DATABASE_URL}", &format!("url: {url}"));
    assert_eq!(
        problems(&with_url("postgres://db.internal:5432/app")),
        vec![]
    );
    assert_refused(
        &with_url("postgres://app:hunter2@db.internal:5432/app"),
        "spec.sinks[0].postgres.url",
        "move the URL to urlFrom",
    );
    assert_refused(
        &with_url("mysql://db/app"),
        "spec.sinks[0].postgres.url",
        "must start with postgres:// or postgresql://",
    );
    let sqlite = with_url("sqlite:///data/orders.db").replace("- postgres:", "- sqlite:");
    assert_eq!(problems(&sqlite), vec![]);
    assert_refused(
        &sqlite.replace("sqlite:///data", "/data"),
        "spec.sinks[0].sqlite.url",
        "must start with sqlite:",
    );
    let both = PIPELINE.replace(
        "urlFrom: {env: DATABASE_URL}",
        "urlFrom: {env: DATABASE_URL}\n        url: postgres://db/app",
    );
    assert_refused(
        &both,
        "spec.sinks[0].postgres",
        "set exactly one of url, urlFrom",
    );
}

#[test]
fn a_zero_catch_up_time_is_refused() {
    let yaml = format!("{PIPELINE}  scaling:\n    targetCatchUpTime: 0s\n");
    assert_refused(&yaml, "spec.scaling.targetCatchUpTime", "longer than 0s");
}

#[test]
fn an_idempotency_window_under_a_second_is_refused() {
    let yaml = format!("{PIPELINE}  idempotency:\n    key: event.id\n    window: 500ms\n");
    assert_refused(&yaml, "spec.idempotency.window", "at least 1s");
}

#[test]
fn a_replay_timestamp_that_is_no_time_is_refused() {
    // Shaped like RFC 3339, but month 13 and hour 25 exist on no calendar.
    let yaml = format!(
        "{PIPELINE}  replay:\n    token: t1\n    to: Timestamp\n    timestamp: \"2026-13-45T25:61:61Z\"\n"
    );
    assert_refused(&yaml, "spec.replay.timestamp", "not an RFC 3339 time");
    let valid = format!(
        "{PIPELINE}  replay:\n    token: t1\n    to: Timestamp\n    timestamp: \"2026-11-23T10:00:00+01:00\"\n"
    );
    assert_eq!(problems(&valid), vec![]);
}

#[test]
fn replay_fields_another_target_would_ignore_are_refused() {
    let yaml = format!(
        "{PIPELINE}  replay:\n    token: t1\n    to: Earliest\n    timestamp: \"2026-11-23T10:00:00Z\"\n    offsets: [{{topic: orders, partition: 0, offset: 5}}]\n"
    );
    assert_refused(&yaml, "spec.replay.timestamp", "only with to: Timestamp");
    assert_refused(&yaml, "spec.replay.offsets", "only with to: Offsets");
}

#[test]
fn replay_offsets_outside_the_source_or_twice_are_refused() {
    let yaml = format!(
        "{PIPELINE}  replay:\n    token: t1\n    to: Offsets\n    offsets:\n      - {{topic: orders, partition: 0, offset: 5}}\n      - {{topic: payments, partition: 0, offset: 5}}\n      - {{topic: orders, partition: 0, offset: 9}}\n"
    );
    assert_refused(
        &yaml,
        "spec.replay.offsets[1].topic",
        "not one of spec.source.topics",
    );
    assert_refused(&yaml, "spec.replay.offsets[2]", "listed twice");
    assert_eq!(problems(&yaml).len(), 2, "{:#?}", problems(&yaml));
}

#[test]
fn properties_weir_sets_itself_are_refused_with_what_decides_them() {
    let yaml = "apiVersion: weir.dev/v1alpha1\nkind: KafkaConnection\nmetadata: {name: c}\nspec:\n  bootstrapServers: [k:9092]\n  properties:\n    client.rack: eu-west-1a\n    group.id: mine\n    acks: \"1\"\n";
    assert_refused(
        yaml,
        "spec.properties[\"group.id\"]",
        "spec.source.consumerGroup",
    );
    assert_refused(yaml, "spec.properties[\"acks\"]", "acks=all");
    let alias = yaml.replace("acks: \"1\"", "request.required.acks: \"0\"");
    assert_refused(
        &alias,
        "spec.properties[\"request.required.acks\"]",
        "acks=all",
    );
    let compressed = yaml.replace("acks: \"1\"", "compression.type: zstd");
    assert_eq!(
        problems(&compressed).len(),
        1,
        "compression.type applies to dead letters"
    );
    assert_eq!(
        problems(yaml).len(),
        2,
        "client.rack is the client's own: {:#?}",
        problems(yaml)
    );
}

#[test]
fn raw_events_with_what_reads_json_fields_are_refused() {
    let yaml = format!(
        "{PIPELINE}  idempotency:\n    key: event.id\n  transform:\n    set:\n      seen: \"true\"\n"
    )
    .replace("    topics: [orders]\n", "    topics: [orders]\n    format: Raw\n");
    assert_refused(&yaml, "spec.sinks[0].postgres", "each event is a string");
    assert_refused(&yaml, "spec.idempotency", "never found");
    assert_refused(&yaml, "spec.transform.set", "no fields to set");
    let copy = "apiVersion: weir.dev/v1alpha1\nkind: EventPipeline\nmetadata: {name: p}\nspec:\n  source:\n    topics: [logs]\n    format: Raw\n  sinks:\n    - kafka: {topic: logs-copy}\n";
    assert_eq!(problems(copy), vec![]);
}

#[test]
fn http_urls_the_sink_cannot_send_to_and_headers_set_twice_are_refused() {
    let http = |url: &str, headers: &str| {
        format!(
            "apiVersion: weir.dev/v1alpha1\nkind: EventPipeline\nmetadata: {{name: p}}\nspec:\n  source:\n    topics: [orders]\n  sinks:\n    - http:\n        url: {url:?}\n        headers: {headers}\n"
        )
    };
    assert_refused(
        &http("https://hooks@example.com/in", "{}"),
        "spec.sinks[0].http.url",
        "holds credentials",
    );
    assert_refused(
        &http("https:///in", "{}"),
        "spec.sinks[0].http.url",
        "names no host",
    );
    assert_refused(
        &http("https://example.com/in", "{X-Team: a, x-team: b}"),
        "spec.sinks[0].http.headers[\"x-team\"]",
        "set twice",
    );
    let secret_headers = http("https://example.com/in", "{}").replace(
        "        headers: {}\n",
        "        headersFrom:\n          Authorization: {env: A}\n          authorization: {env: B}\n",
    );
    assert_refused(
        &secret_headers,
        "spec.sinks[0].http.headersFrom[\"authorization\"]",
        "set twice",
    );
    // The url crate would take the space; the HTTP client the sink uses would not.
    assert_refused(
        &http("https://example.com/a b", "{}"),
        "spec.sinks[0].http.url",
        "percent-encode",
    );
    // A scheme typed in capitals is refused without quoting the password after it.
    let shouted = http("HTTPS://hook:hunter2@example.com/in", "{}");
    assert_refused(&shouted, "spec.sinks[0].http.url", "not HTTPS://");
    assert!(
        problems(&shouted)
            .iter()
            .all(|p| !p.message.contains("hunter2"))
    );
    assert_eq!(
        problems(&http("https://example.com:8443/in?x=1", "{X-Team: a}")),
        vec![]
    );
}

#[test]
fn sink_urls_that_do_not_parse_are_refused_without_their_text() {
    let yaml = PIPELINE.replace(
        "urlFrom: {env: DATABASE_URL}",
        "url: \"postgres://db.example:54x32/app\"",
    );
    assert_refused(
        &yaml,
        "spec.sinks[0].postgres.url",
        "is not a URL: invalid port number",
    );
    let redis = "apiVersion: weir.dev/v1alpha1\nkind: EventPipeline\nmetadata: {name: p}\nspec:\n  source:\n    topics: [orders]\n  sinks:\n    - redis: {url: \"redis://cache:abc\", key: event.id}\n";
    assert_refused(redis, "spec.sinks[0].redis.url", "is not a URL");
    assert!(
        problems(redis)
            .iter()
            .all(|p| !p.message.contains("cache:abc"))
    );
}
