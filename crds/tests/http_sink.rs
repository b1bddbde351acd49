//! The HTTP sink's spec: url or urlFrom (exactly one), http:// or https:// without a
//! password, header names and values an HTTP request can carry, encoding and concurrency only
//! with the mode they apply to, a timeout above zero.

use weir_crds::FieldError;
use weir_crds::load::one_from_yaml;

fn problems(yaml: &str) -> Vec<FieldError> {
    match one_from_yaml(yaml) {
        Err(err) => err.problems.0,
        Ok(resource) => resource.validate().err().map(|p| p.0).unwrap_or_default(),
    }
}

/// A pipeline whose one sink is `http: {<fields>}`.
fn pipeline(fields: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: EventPipeline\nmetadata: {{name: p}}\nspec:\n  source: {{topics: [todo-events]}}\n  sinks:\n    - http: {{{fields}}}\n"
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
fn batch_and_per_record_sinks_are_accepted() {
    for fields in [
        "url: 'https://notify.example/v1/events'",
        "url: 'http://notify:8080/hook', method: Put, encoding: Ndjson, timeout: 2s",
        "urlFrom: {env: HOOK_URL}, mode: PerRecord, concurrency: 32, headers: {X-Source: weir}",
        "url: 'https://n.example', headersFrom: {Authorization: {secretKeyRef: {name: notify, key: token}}}",
    ] {
        assert_eq!(problems(&pipeline(fields)), vec![], "{fields}");
    }
}

#[test]
fn urls_are_checked_for_their_scheme_and_for_passwords() {
    assert_refused(
        "url: 'ftp://notify.example'",
        "spec.sinks[0].http.url",
        "must start with http:// or https://",
    );
    let leaked = problems(&pipeline("url: 'https://app:hunter2@notify.example'"));
    assert!(
        leaked
            .iter()
            .any(|p| p.path == "spec.sinks[0].http.url" && p.message.contains("headersFrom")),
        "{leaked:#?}"
    );
    assert!(
        !leaked.iter().any(|p| p.message.contains("hunter2")),
        "the password is quoted: {leaked:#?}"
    );
}

#[test]
fn headers_must_be_valid_and_not_the_ones_the_sink_sets() {
    assert_refused(
        "url: 'http://n', headers: {'Bad Name': x}",
        "spec.sinks[0].http.headers[\"Bad Name\"]",
        "not a valid HTTP header name",
    );
    assert_refused(
        "url: 'http://n', headers: {X-A: \"one\\r\\nX-B: two\"}",
        "spec.sinks[0].http.headers[\"X-A\"]",
        "control characters",
    );
    assert_refused(
        "url: 'http://n', headers: {Idempotency-Key: k}",
        "spec.sinks[0].http.headers[\"Idempotency-Key\"]",
        "set by the sink itself",
    );
    assert_refused(
        "url: 'http://n', headers: {Authorization: x}, headersFrom: {authorization: {env: T}}",
        "spec.sinks[0].http.headersFrom[\"authorization\"]",
        "also set in headers",
    );
}

#[test]
fn encoding_and_concurrency_only_with_the_mode_they_apply_to() {
    assert_refused(
        "url: 'http://n', mode: PerRecord, encoding: Ndjson",
        "spec.sinks[0].http.encoding",
        "needs mode Batch",
    );
    assert_refused(
        "url: 'http://n', concurrency: 4",
        "spec.sinks[0].http.concurrency",
        "needs mode PerRecord",
    );
    assert_refused(
        "url: 'http://n', timeout: 0s",
        "spec.sinks[0].http.timeout",
        "longer than 0s",
    );
}
