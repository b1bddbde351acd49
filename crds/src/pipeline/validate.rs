//! `EventPipelineSpec::validate`: every problem the CRD schema cannot catch, each with its
//! field path. The operator reports them in status; the worker refuses to start on them.

use std::collections::BTreeSet;

use super::*;
use crate::problems::{Collector, Problems};
use crate::reference::SecretSource;
use crate::topic::is_valid_topic_name;

impl EventPipelineSpec {
    /// Every problem with this spec, each with its field path.
    pub fn validate(&self) -> Result<(), Problems> {
        let mut out = Vec::new();
        let mut spec = Collector::new("spec", &mut out);
        validate_source(&self.source, &mut spec.at("source"));
        if let Some(filter) = &self.filter {
            check_cel(filter, &mut spec.at("filter"));
        }
        if let Some(transform) = &self.transform {
            let mut at = spec.at("transform");
            for (field, expression) in &transform.set {
                let mut entry = at.key("set", field);
                if field.is_empty() {
                    entry.error("field name must not be empty");
                }
                check_cel(expression, &mut entry);
            }
            for (i, field) in transform.remove.iter().enumerate() {
                if field.is_empty() {
                    at.index("remove", i).error("field name must not be empty");
                }
            }
        }
        if self.source.format == PayloadFormat::Raw {
            self.check_raw(&mut spec);
        }
        validate_sinks(self, &mut spec);
        validate_batch(&self.batch, &mut spec.at("batch"));
        validate_retry(&self.retry, &mut spec.at("retry"));
        if let Some(dead_letter) = &self.dead_letter {
            let mut at = spec.at("deadLetter");
            if !is_valid_topic_name(&dead_letter.topic) {
                at.field_error("topic", topic_name_message(&dead_letter.topic));
            } else if self.source.topics.contains(&dead_letter.topic) {
                at.field_error(
                    "topic",
                    "must differ from every source topic, or failed records would loop",
                );
            }
            if dead_letter.partitions < 1 {
                at.field_error("partitions", "must be at least 1");
            }
        }
        if let Some(idempotency) = &self.idempotency {
            let mut at = spec.at("idempotency");
            check_field_path(&idempotency.key, &mut at.at("key"));
            if check_duration(&idempotency.window, &mut at.at("window"))
                .is_some_and(|w| w < std::time::Duration::from_secs(1))
            {
                at.field_error(
                    "window",
                    "must be at least 1s: applied keys are remembered in whole seconds, e.g. 24h",
                );
            }
        }
        validate_scaling(&self.scaling, &mut spec.at("scaling"));
        if let Some(replicas) = self.replicas
            && replicas < 0
        {
            spec.field_error("replicas", "must not be negative");
        }
        if let Some(replay) = &self.replay {
            validate_replay(replay, &self.source, &mut spec.at("replay"));
        }
        if let Some(worker) = &self.worker
            && !(1..=3600).contains(&worker.termination_grace_period_seconds)
        {
            spec.at("worker").field_error(
                "terminationGracePeriodSeconds",
                "must be between 1 and 3600",
            );
        }
        self.check_capabilities(&mut spec);
        Problems(out).into_result()
    }
}

impl EventPipelineSpec {
    /// With `format: Raw` an event is a string, so whatever reads fields of a JSON object
    /// would find none: refused where it is, instead of writing nulls or deduplicating
    /// nothing.
    fn check_raw(&self, spec: &mut Collector<'_>) {
        const WHY: &str = "with spec.source.format: Raw each event is a string, not a JSON object";
        if let Some(transform) = &self.transform {
            if !transform.set.is_empty() {
                spec.at("transform").field_error(
                    "set",
                    format!("{WHY}, so there are no fields to set: use format: Json"),
                );
            }
            if !transform.remove.is_empty() {
                spec.at("transform").field_error(
                    "remove",
                    format!("{WHY}, so there are no fields to remove: use format: Json"),
                );
            }
        }
        if self.idempotency.is_some() {
            spec.field_error(
                "idempotency",
                format!("{WHY}, so its key field is never found: use format: Json, or remove it"),
            );
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            for kind in sink.kinds() {
                if matches!(kind, "postgres" | "mysql" | "sqlite" | "mongodb") {
                    spec.index("sinks", i).field_error(
                        kind,
                        format!("{WHY}, and the {kind} sink reads its fields: use format: Json, or a redis, http or kafka sink (their expressions read the text as event)"),
                    );
                }
            }
        }
    }
}

fn validate_source(source: &Source, at: &mut Collector<'_>) {
    if source.topics.is_empty() {
        at.field_error("topics", "list at least one topic to consume");
    }
    let mut seen = BTreeSet::new();
    for (i, topic) in source.topics.iter().enumerate() {
        if !is_valid_topic_name(topic) {
            at.index("topics", i).error(topic_name_message(topic));
        } else if !seen.insert(topic) {
            at.index("topics", i)
                .error(format!("{topic:?} is listed twice"));
        }
    }
    if let Some(group) = &source.consumer_group
        && group.trim().is_empty()
    {
        at.field_error(
            "consumerGroup",
            "must not be empty; omit it for <namespace>.<name>",
        );
    }
}

fn validate_sinks(spec_value: &EventPipelineSpec, spec: &mut Collector<'_>) {
    if spec_value.sinks.is_empty() {
        spec.field_error("sinks", "list at least one sink");
    }
    let mut names = BTreeSet::new();
    for (i, sink) in spec_value.sinks.iter().enumerate() {
        let mut at = spec.index("sinks", i);
        let kinds = sink.kinds();
        match kinds.as_slice() {
            [] => at.error(format!(
                "no sink kind set: set exactly one of {}",
                SINK_KINDS.join(", ")
            )),
            [_] => {}
            many => at.error(format!(
                "{} are all set: set exactly one sink kind per entry (add another entry to `sinks` for another destination)",
                many.join(" and ")
            )),
        }
        if let Some(name) = &sink.name
            && !names.insert(name.clone())
        {
            at.field_error("name", format!("{name:?} is used by another sink"));
        }
        if let Some(pg) = &sink.postgres {
            validate_sql(
                pg,
                &["postgres://", "postgresql://"],
                &mut at.at("postgres"),
            );
        }
        if let Some(my) = &sink.mysql {
            validate_sql(my, &["mysql://", "mariadb://"], &mut at.at("mysql"));
        }
        if let Some(lite) = &sink.sqlite {
            validate_sql(lite, &["sqlite:"], &mut at.at("sqlite"));
        }
        if let Some(redis) = &sink.redis {
            validate_redis(redis, &mut at.at("redis"));
        }
        if let Some(mongo) = &sink.mongodb {
            validate_mongodb(mongo, &mut at.at("mongodb"));
        }
        if let Some(http) = &sink.http {
            validate_http(http, &mut at.at("http"));
        }
        if let Some(kafka) = &sink.kafka {
            let mut at = at.at("kafka");
            if !is_valid_topic_name(&kafka.topic) {
                at.field_error("topic", topic_name_message(&kafka.topic));
            } else if spec_value.source.topics.contains(&kafka.topic)
                && kafka.connection_ref.is_none()
            {
                at.field_error(
                    "topic",
                    "must differ from every source topic, or the pipeline would consume its own output",
                );
            }
            if let Some(key) = &kafka.key {
                check_cel(key, &mut at.at("key"));
            }
            if let Some(value) = &kafka.value {
                check_cel(value, &mut at.at("value"));
            }
            for (name, expression) in &kafka.headers {
                let mut entry = at.key("headers", name);
                if name.is_empty() {
                    entry.error("header name must not be empty");
                }
                check_cel(expression, &mut entry);
            }
        }
    }
}

/// `schemes`: the URL prefixes the sink's kind accepts.
fn validate_sql(sink: &SqlSink, schemes: &[&str], at: &mut Collector<'_>) {
    match (&sink.url, &sink.url_from) {
        (Some(url), None) => {
            if !schemes.iter().any(|s| url.starts_with(s)) {
                at.field_error(
                    "url",
                    format!(
                        "must start with {}{}",
                        schemes.join(" or "),
                        not_scheme(url)
                    ),
                );
            } else if has_password(url) {
                at.field_error(
                    "url",
                    "holds a password: move the URL to urlFrom (a Secret, an environment variable or a file) so it never appears in the resource",
                );
            } else if !url.starts_with("sqlite:") {
                // SQLite's URLs are paths and options, parsed by sqlx's own rules.
                parses_as_url(url, &mut at.at("url"));
            }
        }
        (None, Some(from)) => check_secret_source(from, &mut at.at("urlFrom")),
        _ => at.error("set exactly one of url, urlFrom"),
    }
    if !is_sql_table_name(&sink.table) {
        at.field_error(
            "table",
            format!(
                "{:?} is not a table name: use name or schema.name of letters, digits and _",
                sink.table
            ),
        );
    }
    let needs_keys = matches!(
        sink.mode,
        WriteMode::Upsert | WriteMode::Delete | WriteMode::Rules
    );
    if needs_keys && sink.key_columns.is_empty() {
        at.field_error(
            "keyColumns",
            format!("mode {:?} needs the columns that identify a row", sink.mode),
        );
    }
    check_columns(&sink.columns, "columns", at);
    match sink.mode {
        WriteMode::Insert | WriteMode::Upsert => {
            if sink.columns.is_empty() {
                at.field_error(
                    "columns",
                    format!("mode {:?} needs at least one column", sink.mode),
                );
            }
        }
        WriteMode::Delete | WriteMode::Rules => {}
    }
    if matches!(sink.mode, WriteMode::Upsert | WriteMode::Delete) {
        check_keys_are_columns(&sink.key_columns, &sink.columns, "columns", at);
    }
    if sink.mode == WriteMode::Rules {
        if sink.rules.is_empty() {
            at.field_error(
                "rules",
                "mode Rules needs at least one rule (when + action)",
            );
        }
        if !sink.columns.is_empty() {
            at.field_error(
                "columns",
                "with mode Rules, list columns in each rule instead",
            );
        }
    } else if !sink.rules.is_empty() {
        at.field_error("rules", "rules are used only with mode: Rules");
    }
    for (i, rule) in sink.rules.iter().enumerate() {
        let mut rule_at = at.index("rules", i);
        check_cel(&rule.when, &mut rule_at.at("when"));
        check_columns(&rule.columns, "columns", &mut rule_at);
        match rule.action {
            RuleAction::Upsert => {
                check_keys_are_columns(&sink.key_columns, &rule.columns, "columns", &mut rule_at)
            }
            RuleAction::Update => {
                if rule.columns.is_empty() {
                    rule_at.field_error("columns", "Update needs the columns it sets");
                }
                check_keys_are_columns(&sink.key_columns, &rule.columns, "columns", &mut rule_at)
            }
            RuleAction::Delete => {
                check_keys_are_columns(&sink.key_columns, &rule.columns, "columns", &mut rule_at)
            }
        }
    }
    if let Some(guard) = &sink.guard {
        validate_guard(sink, guard, at);
    }
}

/// The guard column must be written by every upsert and update, with an ordered type.
fn validate_guard(sink: &SqlSink, guard: &Guard, at: &mut Collector<'_>) {
    let mut at = at.at("guard");
    if sink.key_columns.contains(&guard.column) {
        at.field_error(
            "column",
            format!("{:?} is a key column: guard on a column that changes with each version, such as version or updated_at", guard.column),
        );
    }
    let check = |columns: &[Column], where_: &str, at: &mut Collector<'_>| {
        match columns
        .iter()
        .find(|c| c.name == guard.column)
    {
        None => at.field_error(
            "column",
            format!("{:?} is not among the columns of {where_}: every upsert and update must write the guard column", guard.column),
        ),
        Some(c) if !matches!(c.type_, ColumnType::Integer | ColumnType::Bigint | ColumnType::Numeric | ColumnType::Timestamptz) => at.field_error(
            "column",
            format!("{:?} has type {:?} in {where_}: the guard column must be integer, bigint, numeric or timestamptz", guard.column, c.type_),
        ),
        Some(_) => {}
    }
    };
    match sink.mode {
        WriteMode::Insert | WriteMode::Delete => at.error(format!(
            "a guard applies to upserts and updates: use mode Upsert or Rules, not {:?}",
            sink.mode
        )),
        WriteMode::Upsert => check(&sink.columns, "columns", &mut at),
        WriteMode::Rules => {
            for (i, rule) in sink.rules.iter().enumerate() {
                if rule.action != RuleAction::Delete {
                    check(&rule.columns, &format!("rules[{i}]"), &mut at);
                }
            }
        }
    }
}

fn check_columns(columns: &[Column], field: &str, at: &mut Collector<'_>) {
    let mut seen = BTreeSet::new();
    for (i, column) in columns.iter().enumerate() {
        let mut col = at.index(field, i);
        if !is_sql_identifier(&column.name) {
            col.field_error(
                "name",
                format!(
                    "{:?} is not a column name: use letters, digits and _",
                    column.name
                ),
            );
        } else if !seen.insert(column.name.as_str()) {
            col.field_error("name", format!("column {:?} is listed twice", column.name));
        }
        if let Some(from) = &column.from {
            check_field_path(from, &mut col.at("from"));
        }
    }
}

/// Key columns must be filled by the listed columns, or rows cannot be matched.
fn check_keys_are_columns(
    keys: &[String],
    columns: &[Column],
    field: &str,
    at: &mut Collector<'_>,
) {
    for key in keys {
        if !columns.iter().any(|c| &c.name == key) {
            at.field_error(
                field,
                format!("key column {key:?} is missing: add a column named {key:?} so rows can be matched"),
            );
        }
    }
}

fn validate_mongodb(sink: &MongoSink, at: &mut Collector<'_>) {
    match (&sink.url, &sink.url_from) {
        (Some(url), None) => {
            if !url.starts_with("mongodb://") && !url.starts_with("mongodb+srv://") {
                at.field_error("url", "must start with mongodb:// or mongodb+srv://");
            } else if has_password(url) {
                at.field_error(
                    "url",
                    "holds a password: move the URL to urlFrom (a Secret, an environment variable or a file) so it never appears in the resource",
                );
            }
        }
        (None, Some(from)) => check_secret_source(from, &mut at.at("urlFrom")),
        _ => at.error("set exactly one of url, urlFrom"),
    }
    let name_ok = |n: &str| !n.is_empty() && !n.contains(['/', '\\', '.', ' ', '"', '$', '\0']);
    if !name_ok(&sink.database) {
        at.field_error(
            "database",
            "is not a database name: no / \\ . space \" or $",
        );
    }
    if sink.collection.is_empty()
        || sink.collection.contains(['$', '\0'])
        || sink.collection.starts_with("system.")
    {
        at.field_error(
            "collection",
            "is not a collection name: no $, and not system.*",
        );
    }
    for (i, key) in sink.key_fields.iter().enumerate() {
        if key.is_empty() || key.starts_with('$') || key.contains('.') {
            at.index("keyFields", i)
                .error("a key field is a top-level field name: no $ prefix and no dots");
        }
    }
    for (field, expression) in &sink.document {
        check_cel(expression, &mut at.key("document", field));
    }
    match sink.mode {
        MongoMode::Rules if sink.rules.is_empty() => at.field_error(
            "rules",
            "mode Rules needs at least one rule (when + action)",
        ),
        MongoMode::Rules => {}
        _ if !sink.rules.is_empty() => {
            at.field_error("rules", "rules are used only with mode: Rules")
        }
        _ => {}
    }
    for (i, rule) in sink.rules.iter().enumerate() {
        let mut rule_at = at.index("rules", i);
        check_cel(&rule.when, &mut rule_at.at("when"));
        for (field, expression) in &rule.document {
            check_cel(expression, &mut rule_at.key("document", field));
        }
    }
    if let Some(guard) = &sink.guard {
        let mut at = at.at("guard");
        if sink.key_fields != ["_id"] {
            at.error("a guard needs keyFields [_id]: a held-back upsert is told apart by the duplicate _id it would insert");
        }
        if sink.key_fields.contains(&guard.field) {
            at.field_error(
                "field",
                "is a key field: guard on a field that changes with each version, such as version",
            );
        }
        if guard.field.starts_with('$') || guard.field.contains('.') {
            at.field_error(
                "field",
                "is a top-level field name: no $ prefix and no dots",
            );
        }
        if matches!(sink.mode, MongoMode::Insert | MongoMode::Delete) {
            at.error(format!(
                "a guard applies to upserts and updates: use mode Upsert, Update or Rules, not {:?}",
                sink.mode
            ));
        }
    }
}

fn validate_redis(sink: &RedisSink, at: &mut Collector<'_>) {
    match (&sink.url, &sink.url_from) {
        (Some(url), None) => check_redis_url(url, &mut at.at("url")),
        (None, Some(from)) => check_secret_source(from, &mut at.at("urlFrom")),
        _ => at.error("set exactly one of url, urlFrom"),
    }
    check_cel(&sink.key, &mut at.at("key"));
    if let Some(value) = &sink.value {
        check_cel(value, &mut at.at("value"));
    }
    for (field, expression) in &sink.fields {
        check_cel(expression, &mut at.key("fields", field));
    }
    match sink.command {
        RedisCommand::Hset if sink.fields.is_empty() => {
            at.field_error("fields", "command Hset needs at least one field")
        }
        RedisCommand::Set | RedisCommand::Del if !sink.fields.is_empty() => at.field_error(
            "fields",
            format!(
                "fields are used only with command Hset, not {:?}",
                sink.command
            ),
        ),
        RedisCommand::Hset | RedisCommand::Del if sink.value.is_some() => at.field_error(
            "value",
            format!(
                "value is used only with command Set, not {:?}",
                sink.command
            ),
        ),
        _ => {}
    }
    if let Some(ttl) = &sink.ttl {
        let mut at = at.at("ttl");
        if sink.command == RedisCommand::Del {
            at.error("ttl is used only with commands Set and Hset, not Del");
        }
        if check_duration(ttl, &mut at).is_some_and(|ttl| ttl.as_millis() < 1) {
            at.error("must be at least 1ms");
        }
    }
}

/// A Redis URL written in the resource: redis:// or rediss://, and no password. The messages
/// quote only the scheme, so a misplaced password is never repeated in status or logs.
fn check_redis_url(url: &str, at: &mut Collector<'_>) {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        match url.split_once("://") {
            Some((scheme, _)) => at.error(format!(
                "must start with redis:// or rediss://, not {scheme}://"
            )),
            None => at.error("must start with redis:// or rediss://"),
        }
    }
    if has_password(url) {
        at.error(
            "holds a password: move the URL to urlFrom (a Secret, an environment variable or a file) so it never appears in the resource",
        );
    } else {
        parses_as_url(url, at);
    }
}

/// Whether `url` parses by the WHATWG rules of the `url` crate, with which sqlx and redis
/// read their URLs; if not, says why, without the URL (it may hold a secret).
fn parses_as_url(url: &str, at: &mut Collector<'_>) -> bool {
    match url::Url::parse(url) {
        Ok(_) => true,
        Err(e) => {
            at.error(format!("is not a URL: {e}"));
            false
        }
    }
}

fn validate_http(sink: &HttpSink, at: &mut Collector<'_>) {
    match (&sink.url, &sink.url_from) {
        (Some(url), None) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                at.field_error(
                    "url",
                    format!("must start with http:// or https://{}", not_scheme(url)),
                );
            } else if authority(url).contains('@') {
                at.field_error(
                    "url",
                    "holds credentials, which are not sent: send them in a header from headersFrom (e.g. Authorization), so they never appear in the resource",
                );
            } else if parses_as_url(url, &mut at.at("url")) {
                if authority(url).is_empty() {
                    at.field_error("url", "names no host");
                } else if url.parse::<http::Uri>().is_err() {
                    // The sink's own parser, stricter than the url crate's (no spaces or
                    // raw non-ASCII characters).
                    at.field_error(
                        "url",
                        "is not a URL the HTTP client accepts: percent-encode spaces and non-ASCII characters",
                    );
                }
            }
        }
        (None, Some(from)) => check_secret_source(from, &mut at.at("urlFrom")),
        _ => at.error("set exactly one of url, urlFrom"),
    }
    let mut seen = BTreeSet::new();
    let mut seen_from = BTreeSet::new();
    for (name, value) in &sink.headers {
        let mut entry = at.key("headers", name);
        check_header_name(name, &mut entry);
        if !seen.insert(name.to_ascii_lowercase()) {
            entry.error("is set twice (header names ignore case): keep one");
        }
        if value.chars().any(|c| c.is_control() && c != '\t') {
            entry.error("a header value must not hold control characters such as line breaks");
        }
    }
    for (name, source) in &sink.headers_from {
        let mut entry = at.key("headersFrom", name);
        check_header_name(name, &mut entry);
        check_secret_source(source, &mut entry);
        if !seen_from.insert(name.to_ascii_lowercase()) {
            entry.error("is set twice (header names ignore case): keep one");
        }
        if seen.contains(&name.to_ascii_lowercase()) {
            entry.error("also set in headers: set each header in one of headers, headersFrom");
        }
    }
    if let Some(timeout) = check_duration(&sink.timeout, &mut at.at("timeout"))
        && timeout.is_zero()
    {
        at.field_error("timeout", "must be longer than 0s");
    }
    if sink.mode == HttpMode::PerRecord && sink.encoding == HttpEncoding::Ndjson {
        at.field_error(
            "encoding",
            "Ndjson needs mode Batch: with PerRecord each request's body is one event; remove encoding",
        );
    }
    match (sink.mode, sink.concurrency) {
        (HttpMode::Batch, Some(_)) => at.field_error(
            "concurrency",
            "needs mode PerRecord: with Batch each batch is one request; remove concurrency",
        ),
        (_, Some(n)) if !(1..=256).contains(&n) => {
            at.field_error("concurrency", "must be between 1 and 256")
        }
        _ => {}
    }
}

/// An HTTP header name (a token, RFC 9110), not one the sink sets itself.
fn check_header_name(name: &str, at: &mut Collector<'_>) {
    let token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        at.error(format!("{name:?} is not a valid HTTP header name"));
    } else if [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "idempotency-key",
    ]
    .contains(&name.to_ascii_lowercase().as_str())
    {
        at.error(format!(
            "{name} is set by the sink itself (Idempotency-Key from spec.idempotency): remove it"
        ));
    }
}

fn validate_batch(batch: &Batch, at: &mut Collector<'_>) {
    if batch.max_records < 1 {
        at.field_error("maxRecords", "must be at least 1");
    }
    if batch.max_bytes < 1 {
        at.field_error("maxBytes", "must be at least 1");
    }
    check_duration(&batch.max_wait, &mut at.at("maxWait"));
}

fn validate_retry(retry: &Retry, at: &mut Collector<'_>) {
    if retry.attempts < 1 {
        at.field_error("attempts", "must be at least 1 (1 means no retries)");
    }
    let initial = check_duration(&retry.initial_backoff, &mut at.at("initialBackoff"));
    let max = check_duration(&retry.max_backoff, &mut at.at("maxBackoff"));
    if let (Some(initial), Some(max)) = (initial, max)
        && initial > max
    {
        at.field_error(
            "initialBackoff",
            format!(
                "{} is longer than maxBackoff {}",
                retry.initial_backoff, retry.max_backoff
            ),
        );
    }
    if !(1.0..=10.0).contains(&retry.multiplier) {
        at.field_error("multiplier", "must be between 1 and 10");
    }
    if !(0.0..=1.0).contains(&retry.jitter) {
        at.field_error("jitter", "must be between 0 and 1");
    }
}

fn validate_scaling(scaling: &Scaling, at: &mut Collector<'_>) {
    if scaling.min_replicas < 0 {
        at.field_error("minReplicas", "must not be negative");
    }
    if scaling.max_replicas < 1 {
        at.field_error("maxReplicas", "must be at least 1");
    }
    if scaling.min_replicas > scaling.max_replicas {
        at.field_error(
            "minReplicas",
            format!(
                "{} exceeds maxReplicas {}: raise maxReplicas or lower minReplicas",
                scaling.min_replicas, scaling.max_replicas
            ),
        );
    }
    if scaling.target_lag_per_replica < 1 {
        at.field_error("targetLagPerReplica", "must be at least 1");
    }
    if scaling.activation_lag < 0 {
        at.field_error("activationLag", "must not be negative");
    }
    if let Some(catch_up) = &scaling.target_catch_up_time
        && check_duration(catch_up, &mut at.at("targetCatchUpTime")).is_some_and(|d| d.is_zero())
    {
        at.field_error(
            "targetCatchUpTime",
            "must be longer than 0s: it is the time the autoscaler gives the workers to clear the lag, e.g. 60s",
        );
    }
    check_duration(&scaling.cooldown, &mut at.at("cooldown"));
}

fn validate_replay(replay: &Replay, source: &Source, at: &mut Collector<'_>) {
    if replay.token.trim().is_empty() {
        at.field_error("token", "must not be empty");
    }
    match (&replay.to, &replay.timestamp) {
        (ReplayTarget::Timestamp, None) => {
            at.field_error("timestamp", "to: Timestamp needs a timestamp (RFC 3339)")
        }
        (ReplayTarget::Timestamp, Some(ts)) if ts.parse::<jiff::Timestamp>().is_err() => at
            .field_error(
                "timestamp",
                format!("{ts:?} is not an RFC 3339 time, e.g. \"2026-11-23T10:00:00Z\""),
            ),
        (to, Some(_)) if *to != ReplayTarget::Timestamp => at.field_error(
            "timestamp",
            format!("is used only with to: Timestamp, and to is {to:?}: remove it"),
        ),
        _ => {}
    }
    if replay.to == ReplayTarget::Offsets {
        if replay.offsets.is_empty() {
            at.field_error("offsets", "to: Offsets needs at least one partition offset");
        }
        let mut seen = BTreeSet::new();
        for (i, offset) in replay.offsets.iter().enumerate() {
            let mut entry = at.index("offsets", i);
            if !source.topics.contains(&offset.topic) {
                entry.field_error(
                    "topic",
                    format!(
                        "{:?} is not one of spec.source.topics ({}): the pipeline's group reads only those (a replay that already ran can be removed from the spec)",
                        offset.topic,
                        source.topics.join(", ")
                    ),
                );
            }
            if !seen.insert((&offset.topic, offset.partition)) {
                entry.error(format!(
                    "partition {} of {:?} is listed twice: keep one offset per partition",
                    offset.partition, offset.topic
                ));
            }
        }
    } else if !replay.offsets.is_empty() {
        at.field_error(
            "offsets",
            format!(
                "are used only with to: Offsets, and to is {:?}: remove them",
                replay.to
            ),
        );
    }
}

fn check_secret_source(source: &SecretSource, at: &mut Collector<'_>) {
    if source.alternatives_set() != 1 {
        at.error("set exactly one of secretKeyRef, env, file");
    }
}

fn check_duration(
    duration: &crate::DurationString,
    at: &mut Collector<'_>,
) -> Option<std::time::Duration> {
    match duration.parse() {
        Ok(value) => Some(value),
        Err(message) => {
            at.error(message);
            None
        }
    }
}

/// Compiles a CEL expression; a syntax error is reported with the expression's field path.
fn check_cel(expression: &str, at: &mut Collector<'_>) {
    if expression.trim().is_empty() {
        at.error("expression must not be empty");
        return;
    }
    if let Err(err) = crate::cel::check(expression) {
        at.error(format!("invalid CEL expression {expression:?}: {err}"));
    }
}

/// A dotted JSON field path, e.g. `event.payload.title` or `title`.
fn check_field_path(path: &str, at: &mut Collector<'_>) {
    let valid = !path.is_empty()
        && path.split('.').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
    if !valid {
        at.error(format!(
            "{path:?} is not a field path: use dot-separated names, e.g. \"event.payload.id\""
        ));
    }
}

fn is_sql_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// `, not <scheme>://` for a message, or nothing: only the scheme of a URL is ever quoted,
/// since the rest may hold a password.
fn not_scheme(url: &str) -> String {
    url.split_once("://")
        .filter(|(scheme, _)| {
            scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        })
        .map(|(scheme, _)| format!(", not {scheme}://"))
        .unwrap_or_default()
}

/// A URL's authority, `user:password@host:port`: what follows `://` up to the path, query
/// or fragment (empty without `://`).
fn authority(url: &str) -> &str {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?', '#']).next())
        .unwrap_or_default()
}

/// Whether a URL carries `user:password@`.
fn has_password(url: &str) -> bool {
    authority(url)
        .rsplit_once('@')
        .is_some_and(|(credentials, _)| credentials.contains(':'))
}

fn is_sql_table_name(name: &str) -> bool {
    match name.split_once('.') {
        Some((schema, table)) => is_sql_identifier(schema) && is_sql_identifier(table),
        None => is_sql_identifier(name),
    }
}

fn topic_name_message(topic: &str) -> String {
    format!("{topic:?} is not a legal Kafka topic name: use 1-249 of a-z A-Z 0-9 . _ -")
}
