//! The Redis sink's spec: url or urlFrom (exactly one), redis:// or rediss://, no password
//! in `url`, a ttl of at least 1ms and only where it applies.

use weir_crds::load::one_from_yaml;
use weir_crds::{FieldError, RedisSink};

fn problems(yaml: &str) -> Vec<FieldError> {
    match one_from_yaml(yaml) {
        Err(err) => err.problems.0,
        Ok(resource) => resource.validate().err().map(|p| p.0).unwrap_or_default(),
    }
}

/// A pipeline whose one sink is `redis: {<fields>}`.
fn pipeline(fields: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventPipeline\nmetadata: {{name: p}}\nspec:\n  source: {{topics: [users]}}\n  sinks:\n    - redis: {{{fields}}}\n"
    )
}

fn assert_refused(fields: &str, path: &str, words: &str) {
    let found = problems(&pipeline(fields));
    assert!(
        found
            .iter()
            .any(|p| p.path == path && p.message.contains(words)),
        "expected a problem at {path} mentioning {words:?}, got {found:#?}"
    );
}

#[test]
fn a_url_without_a_password_or_a_url_from_is_accepted() {
    for fields in [
        "url: 'redis://cache:6379/0', key: event.id",
        "url: 'rediss://user@cache:6380/1', key: event.id, transaction: true",
        "urlFrom: {env: REDIS_URL}, key: event.id, ttl: 24h",
        "urlFrom: {env: REDIS_URL}, command: Hset, key: event.id, fields: {name: event.name}, ttl: 1ms",
    ] {
        assert_eq!(problems(&pipeline(fields)), vec![], "{fields}");
    }
}

#[test]
fn redis_urls_are_checked_for_their_scheme_and_for_passwords() {
    assert_refused(
        "url: 'redis://:hunter2@cache:6379/0', key: event.id",
        "spec.sinks[0].redis.url",
        "move the URL to urlFrom",
    );
    assert_refused(
        "url: 'rediss://app:hunter2@cache:6380', key: event.id",
        "spec.sinks[0].redis.url",
        "move the URL to urlFrom",
    );
    assert_refused(
        "url: 'http://cache:6379', key: event.id",
        "spec.sinks[0].redis.url",
        "must start with redis:// or rediss://",
    );
    let leaked = problems(&pipeline("url: 'http://app:hunter2@cache', key: event.id"));
    assert!(!leaked.is_empty());
    assert!(
        leaked.iter().all(|p| !p.message.contains("hunter2")),
        "{leaked:#?}"
    );
}

#[test]
fn exactly_one_of_url_and_url_from_is_set() {
    assert_refused(
        "key: event.id",
        "spec.sinks[0].redis",
        "set exactly one of url, urlFrom",
    );
    assert_refused(
        "url: 'redis://cache', urlFrom: {env: REDIS_URL}, key: event.id",
        "spec.sinks[0].redis",
        "set exactly one of url, urlFrom",
    );
}

#[test]
fn ttl_is_at_least_a_millisecond_and_not_for_del() {
    assert_refused(
        "urlFrom: {env: R}, key: event.id, ttl: 500us",
        "spec.sinks[0].redis.ttl",
        "at least 1ms",
    );
    assert_refused(
        "urlFrom: {env: R}, command: Del, key: event.id, ttl: 1h",
        "spec.sinks[0].redis.ttl",
        "not Del",
    );
}

#[test]
fn transaction_defaults_to_false() {
    let sink: RedisSink =
        serde_json::from_str(r#"{"url": "redis://cache", "key": "event.id"}"#).expect("parses");
    assert!(!sink.transaction);
}
