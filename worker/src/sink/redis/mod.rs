//! The Redis sink: one command per record (SET, HSET with PEXPIRE, DEL), a batch's commands
//! sent as one pipeline in batch order (wrapped in MULTI/EXEC with `transaction`). Every
//! command's reply is read on its own, so a command Redis refuses rejects its record alone.

use std::collections::HashSet;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, Pipeline, RedisError, ServerError};
use serde_json::Value;
use tokio::sync::Mutex;
use weir_crds::RedisCommand;

use futures::future::BoxFuture;

use super::{Rejected, Sink, SinkError, WriteInput, Written, redact};
use crate::record::Record;
use crate::retry::ErrorClass;
use crate::transform::{Expression, Variables, fill};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a batch's replies may take once sent.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct RedisSink {
    command: RedisCommand,
    key: Expression,
    /// With Set: the value; `None` writes the event.
    value: Option<Expression>,
    /// With Hset: field name → expression.
    fields: Vec<(String, Expression)>,
    /// Expiry in milliseconds, for Set and Hset.
    ttl_ms: Option<u64>,
    transaction: bool,
    /// The records' values are the events as they were consumed (no transform): the
    /// default SET value can be the record's own bytes instead of the event re-encoded.
    payload_is_event: bool,
    /// What the key, value and field expressions read, together.
    variables: Variables,
    client: Client,
    /// The open connection, dropped after a connection-level failure and made again on the
    /// next use (so a restarted Redis is found again).
    connection: Mutex<Option<MultiplexedConnection>>,
}

/// The commands one record becomes, in order, each with its name for messages.
#[derive(Debug)]
struct Planned {
    index: usize,
    commands: Vec<(&'static str, Cmd)>,
}

/// The fate of one sent command.
#[derive(Debug)]
enum Reply {
    Done,
    Refused(ServerError),
}

impl From<redis::Value> for Reply {
    fn from(value: redis::Value) -> Self {
        match value {
            redis::Value::ServerError(error) => Reply::Refused(error),
            _ => Reply::Done,
        }
    }
}

impl Sink for RedisSink {
    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(self.ping())
    }

    /// Refuses only the records whose expression fails or whose command Redis refuses
    /// (WRONGTYPE, say); every other record is applied, in batch order.
    fn write<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
    ) -> BoxFuture<'a, Result<Written, SinkError>> {
        Box::pin(async move {
            Ok(Written {
                rejected: self.write_batch(input).await?,
                skipped: 0,
            })
        })
    }

    /// Only when an expression reads it, or a SET writes the event re-encoded.
    fn reads_event(&self) -> bool {
        self.variables.reads_event()
            || (self.command == RedisCommand::Set && self.value.is_none() && !self.payload_is_event)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.connection.lock().await.take();
        })
    }
}

impl RedisSink {
    /// Builds the sink: compiles the expressions and parses the URL. The connection is made
    /// on first use, so an unreachable Redis is retried by the engine rather than failing the
    /// start.
    pub fn new(spec: weir_crds::RedisSink, url: &str) -> Result<Self, String> {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err("the Redis URL must start with redis:// or rediss://".into());
        }
        if url.starts_with("rediss://") {
            // rustls needs a process-wide crypto provider; an already installed one is kept.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = Client::open(url)
            .map_err(|e| format!("invalid Redis URL: {}", redact(&e.to_string())))?;
        let compile = |what: &str, source: &str| {
            Expression::compile(source).map_err(|e| format!("redis.{what}: {e}"))
        };
        let key = compile("key", &spec.key)?;
        let value = match spec.command {
            RedisCommand::Set => spec
                .value
                .as_deref()
                .map(|v| compile("value", v))
                .transpose()?,
            _ => None,
        };
        let fields = match spec.command {
            RedisCommand::Hset => spec
                .fields
                .iter()
                .map(|(name, source)| {
                    Ok((name.clone(), compile(&format!("fields[{name:?}]"), source)?))
                })
                .collect::<Result<Vec<_>, String>>()?,
            _ => Vec::new(),
        };
        if spec.command == RedisCommand::Hset && fields.is_empty() {
            return Err("redis.fields: command Hset needs at least one field".into());
        }
        let ttl_ms = match (&spec.ttl, spec.command) {
            (Some(ttl), RedisCommand::Set | RedisCommand::Hset) => {
                let ttl = ttl.parse().map_err(|e| format!("redis.ttl: {e}"))?;
                match u64::try_from(ttl.as_millis()) {
                    Ok(ms) if ms >= 1 => Some(ms),
                    _ => {
                        return Err(format!(
                            "redis.ttl: {ttl:?} is not between 1ms and 500 million years"
                        ));
                    }
                }
            }
            _ => None,
        };
        let variables = value
            .iter()
            .chain(fields.iter().map(|(_, e)| e))
            .fold(key.variables(), |all, e| all.and(e.variables()));
        Ok(Self {
            command: spec.command,
            key,
            value,
            fields,
            ttl_ms,
            transaction: spec.transaction,
            payload_is_event: false,
            variables,
            client,
            connection: Mutex::new(None),
        })
    }

    /// Declares that every record's value is its event as consumed (no transform: JSON, or
    /// Raw bytes), so `Set` without a value expression writes the record's bytes as they are.
    pub fn with_payload_as_event(mut self, payload_is_event: bool) -> Self {
        self.payload_is_event = payload_is_event;
        self
    }

    /// Connects and checks that Redis answers PING (and accepts the credentials).
    async fn ping(&self) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors().cmd("PING");
        let values = self.send(&pipe).await?;
        match values.into_iter().next().map(Reply::from) {
            Some(Reply::Done) => Ok(()),
            Some(Reply::Refused(error)) => Err(SinkError {
                class: match class_of(error.code()) {
                    ErrorClass::Permanent => ErrorClass::Fatal,
                    class => class,
                },
                message: format!("Redis refused PING: {}", describe(&error)),
            }),
            None => Err(SinkError {
                class: ErrorClass::Unavailable,
                message: "Redis gave no reply to PING".into(),
            }),
        }
    }

    /// Writes the records; returns those refused permanently (an expression that fails, a key
    /// that is not a string or number, a command Redis refuses such as WRONGTYPE), so the
    /// rest of the batch still lands.
    async fn write_batch(&self, input: &[WriteInput<'_>]) -> Result<Vec<Rejected>, SinkError> {
        let mut rejected = Vec::new();
        let mut planned = Vec::with_capacity(input.len());
        // One context for the batch, its variables replaced record by record.
        let mut context = cel::Context::with_env(crate::functions::env());
        for item in input {
            fill(&mut context, item.record, item.event, self.variables);
            match self.commands(&context, item.record, item.event) {
                Ok(commands) => planned.push(Planned {
                    index: item.index,
                    commands,
                }),
                Err(reason) => rejected.push(Rejected {
                    index: item.index,
                    class: ErrorClass::Permanent,
                    reason,
                }),
            }
        }
        // A transaction Redis aborts because some commands were refused when queued applies
        // nothing: those records are rejected and the rest sent again. Each round removes at
        // least one record, so this ends.
        while !planned.is_empty() {
            let (pipe, owners) = self.pipeline(&mut planned);
            let values = self.send(&pipe).await?;
            let outcome = if self.transaction {
                transaction_outcome(values, owners.len())
            } else {
                Ok(Outcome::Replies(
                    values.into_iter().map(Reply::from).collect(),
                ))
            };
            let judged = outcome.and_then(|outcome| match outcome {
                Outcome::Replies(replies) => {
                    judge(&replies, &owners, &planned).map(|refused| (refused, false))
                }
                Outcome::Aborted(queued) => {
                    judge(&queued, &owners, &planned).map(|refused| (refused, true))
                }
            });
            let (refused, aborted) = match judged {
                Ok(judged) => judged,
                Err(failure) => {
                    if failure.class == ErrorClass::Unavailable {
                        // a replica after a failover, say: the next write connects anew
                        self.connection.lock().await.take();
                    }
                    return Err(failure);
                }
            };
            match aborted {
                false => {
                    rejected.extend(refused);
                    break;
                }
                true => {
                    if refused.is_empty() {
                        return Err(SinkError {
                            class: ErrorClass::Transient,
                            message: "Redis aborted the batch's transaction without saying why"
                                .into(),
                        });
                    }
                    let refused_indexes: HashSet<usize> = refused.iter().map(|r| r.index).collect();
                    planned.retain(|p| !refused_indexes.contains(&p.index));
                    rejected.extend(refused);
                }
            }
        }
        rejected.sort_by_key(|r| r.index);
        Ok(rejected)
    }

    /// The commands for one record, or why it cannot be written.
    fn commands(
        &self,
        context: &cel::Context<'_, '_>,
        record: &Record,
        event: &Value,
    ) -> Result<Vec<(&'static str, Cmd)>, String> {
        let key = key_text(self.key.eval(context)?)
            .map_err(|e| format!("key {:?}: {e}", self.key.source()))?;
        let mut commands = Vec::with_capacity(2);
        match self.command {
            RedisCommand::Set => {
                let mut set = redis::cmd("SET");
                set.arg(&key);
                match (&self.value, &record.payload) {
                    (Some(expression), _) => set.arg(encode(&expression.eval(context)?)),
                    (None, Some(payload)) if self.payload_is_event => set.arg(payload.as_slice()),
                    (None, _) => set.arg(encode(event)),
                };
                if let Some(ms) = self.ttl_ms {
                    set.arg("PX").arg(ms);
                }
                commands.push(("SET", set));
            }
            RedisCommand::Hset => {
                let mut hset = redis::cmd("HSET");
                hset.arg(&key);
                for (field, expression) in &self.fields {
                    hset.arg(field).arg(encode(&expression.eval(context)?));
                }
                commands.push(("HSET", hset));
                if let Some(ms) = self.ttl_ms {
                    let mut expire = redis::cmd("PEXPIRE");
                    expire.arg(&key).arg(ms);
                    commands.push(("PEXPIRE", expire));
                }
            }
            RedisCommand::Del => {
                let mut del = redis::cmd("DEL");
                del.arg(&key);
                commands.push(("DEL", del));
            }
        }
        Ok(commands)
    }

    /// One pipeline of every planned command in order, and for each command the position in
    /// `planned` of the record it belongs to and the command's name. MULTI and EXEC are sent
    /// as commands of their own, so that every reply, the queueing ones included, is read here.
    fn pipeline(&self, planned: &mut [Planned]) -> (Pipeline, Vec<(usize, &'static str)>) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut owners = Vec::with_capacity(planned.len());
        if self.transaction {
            pipe.cmd("MULTI");
        }
        for (position, record) in planned.iter_mut().enumerate() {
            // Only an aborted transaction sends a record again; otherwise its commands move.
            if self.transaction {
                for (name, command) in &record.commands {
                    pipe.add_command(command.clone());
                    owners.push((position, *name));
                }
            } else {
                for (name, command) in std::mem::take(&mut record.commands) {
                    pipe.add_command(command);
                    owners.push((position, name));
                }
            }
        }
        if self.transaction {
            pipe.cmd("EXEC");
        }
        (pipe, owners)
    }

    /// Sends a pipeline and reads one reply per command. A cached connection found broken
    /// (Redis restarted since the last batch) is replaced and the pipeline sent once more:
    /// every command this sink sends may be applied twice.
    async fn send(&self, pipe: &Pipeline) -> Result<Vec<redis::Value>, SinkError> {
        let mut fresh = false;
        loop {
            let cached = self.connection.lock().await.clone();
            let mut connection = match cached {
                Some(connection) => connection,
                None => {
                    fresh = true;
                    self.connect()
                        .await
                        .map_err(|e| self.failure("connecting to Redis", &e))?
                }
            };
            match pipe.query_async::<Vec<redis::Value>>(&mut connection).await {
                Ok(values) => return Ok(values),
                Err(error) => {
                    self.connection.lock().await.take();
                    if fresh || !error.is_connection_dropped() {
                        return Err(self.failure("writing to Redis", &error));
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *self.connection.lock().await = Some(connection.clone());
        Ok(connection)
    }

    fn failure(&self, doing: &str, error: &RedisError) -> SinkError {
        SinkError {
            class: classify(error),
            message: redact(&format!("{doing}: {error}")),
        }
    }
}

/// The replies of a batch, or the queueing replies of an aborted transaction.
#[derive(Debug)]
enum Outcome {
    Replies(Vec<Reply>),
    Aborted(Vec<Reply>),
}

/// Reads MULTI's reply, one QUEUED per command, and EXEC's reply: an array of the commands'
/// own replies, or EXECABORT when a command was refused while queueing (then nothing was
/// applied, and the queueing replies say which).
fn transaction_outcome(values: Vec<redis::Value>, commands: usize) -> Result<Outcome, SinkError> {
    let short = || SinkError {
        class: ErrorClass::Unavailable,
        message: "Redis gave fewer replies than the batch's transaction has commands".into(),
    };
    let mut values = values.into_iter();
    if let Some(Reply::Refused(error)) = values.next().map(Reply::from) {
        return Err(batch_failure("MULTI", &error));
    }
    let queued: Vec<Reply> = values.by_ref().take(commands).map(Reply::from).collect();
    match values.next() {
        Some(redis::Value::Array(items)) if items.len() == commands => Ok(Outcome::Replies(
            items.into_iter().map(Reply::from).collect(),
        )),
        Some(redis::Value::ServerError(error)) if error.code() == "EXECABORT" => {
            Ok(Outcome::Aborted(queued))
        }
        Some(redis::Value::ServerError(error)) => Err(batch_failure("EXEC", &error)),
        Some(redis::Value::Nil) => Err(SinkError {
            class: ErrorClass::Transient,
            message: "Redis discarded the batch's transaction".into(),
        }),
        _ => Err(short()),
    }
}

/// Which planned records the replies refuse (for those records alone), or the failure of the
/// whole batch when a reply says nothing can be written now.
fn judge(
    replies: &[Reply],
    owners: &[(usize, &'static str)],
    planned: &[Planned],
) -> Result<Vec<Rejected>, SinkError> {
    let mut rejected: Vec<Rejected> = Vec::new();
    let mut worst: Option<SinkError> = None;
    for (reply, &(owner, command)) in replies.iter().zip(owners) {
        let Reply::Refused(error) = reply else {
            continue;
        };
        match class_of(error.code()) {
            ErrorClass::Permanent => {
                let index = planned[owner].index;
                // a record's commands are adjacent: refuse it once
                if rejected.last().is_none_or(|r| r.index != index) {
                    rejected.push(Rejected {
                        index,
                        class: ErrorClass::Permanent,
                        reason: format!("Redis refused {command}: {}", describe(error)),
                    });
                }
            }
            class => {
                if worst
                    .as_ref()
                    .is_none_or(|w| severity(class) > severity(w.class))
                {
                    worst = Some(batch_failure(command, error));
                }
            }
        }
    }
    match worst {
        Some(failure) => Err(failure),
        None => Ok(rejected),
    }
}

fn batch_failure(command: &str, error: &ServerError) -> SinkError {
    SinkError {
        class: match class_of(error.code()) {
            ErrorClass::Permanent => ErrorClass::Fatal,
            class => class,
        },
        message: format!("Redis refused {command}: {}", describe(error)),
    }
}

/// `CODE detail`, as Redis wrote it.
fn describe(error: &ServerError) -> String {
    match error.details() {
        Some(detail) => format!("{} {detail}", error.code()),
        None => error.code().to_owned(),
    }
}

/// What a command Redis refused with this error code means. `Permanent` is for the record
/// alone; the other classes fail the whole write.
fn class_of(code: &str) -> ErrorClass {
    match code {
        // Loading a dump, a script running, a cluster resharding: passes by itself.
        "LOADING" | "BUSY" | "TRYAGAIN" | "CLUSTERDOWN" | "MASTERDOWN" => ErrorClass::Transient,
        // Redis refuses every write until memory is freed, persistence works again, this is
        // a primary again or enough replicas are back: retrying without limit and reporting
        // not-ready beats dead-lettering every record meanwhile.
        "OOM" | "MISCONF" | "READONLY" | "NOREPLICAS" => ErrorClass::Unavailable,
        // Credentials, permissions, or a cluster this standalone client cannot follow: nothing
        // succeeds until the configuration changes.
        "NOAUTH" | "WRONGPASS" | "NOPERM" | "MOVED" | "ASK" | "CROSSSLOT" => ErrorClass::Fatal,
        // WRONGTYPE, or ERR about this command's arguments: this command alone.
        _ => ErrorClass::Permanent,
    }
}

/// A failure of the connection or of a whole request.
fn classify(error: &RedisError) -> ErrorClass {
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        return ErrorClass::Unavailable;
    }
    match error.kind() {
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig => ErrorClass::Fatal,
        ErrorKind::Parse => ErrorClass::Unavailable,
        ErrorKind::Server(_) | ErrorKind::Extension => {
            if error
                .detail()
                .is_some_and(|d| d.contains("max number of clients"))
            {
                return ErrorClass::Unavailable;
            }
            match error.code().map(class_of) {
                // a refusal while connecting (such as SELECT of a database that does not
                // exist) fails every write alike
                Some(ErrorClass::Permanent) | None => ErrorClass::Fatal,
                Some(class) => class,
            }
        }
        _ => ErrorClass::Transient,
    }
}

fn severity(class: ErrorClass) -> u8 {
    match class {
        ErrorClass::Permanent => 0,
        ErrorClass::Transient => 1,
        ErrorClass::Unavailable => 2,
        ErrorClass::Fatal => 3,
    }
}

/// A value as Redis stores it: a string as it is, anything else as JSON text.
fn encode(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A key: a non-empty string, or a number written in decimal.
fn key_text(value: Value) -> Result<String, String> {
    match value {
        Value::String(text) if !text.is_empty() => Ok(text),
        Value::String(_) => Err("gave an empty string".into()),
        Value::Number(number) => Ok(number.to_string()),
        other => Err(format!("gave {other}, not a string or a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A reply as Redis sends it on the wire.
    fn wire(resp: &str) -> redis::Value {
        redis::parse_redis_value(resp.as_bytes()).expect("test reply parses")
    }

    fn planned(indexes: &[usize]) -> Vec<Planned> {
        indexes
            .iter()
            .map(|&index| Planned {
                index,
                commands: vec![("HSET", redis::cmd("HSET"))],
            })
            .collect()
    }

    fn owners(n: usize) -> Vec<(usize, &'static str)> {
        (0..n).map(|i| (i, "HSET")).collect()
    }

    #[test]
    fn strings_are_written_as_they_are_and_other_values_as_json_text() {
        assert_eq!(encode(&json!("plain text")), "plain text");
        assert_eq!(encode(&json!(42)), "42");
        assert_eq!(encode(&json!(1.5)), "1.5");
        assert_eq!(encode(&json!(true)), "true");
        assert_eq!(encode(&json!(null)), "null");
        assert_eq!(encode(&json!({"a": [1, "x"]})), r#"{"a":[1,"x"]}"#);
    }

    #[test]
    fn keys_are_non_empty_strings_or_numbers() {
        assert_eq!(key_text(json!("user:1")), Ok("user:1".into()));
        assert_eq!(key_text(json!(7)), Ok("7".into()));
        assert!(key_text(json!("")).is_err());
        assert!(key_text(json!(null)).is_err());
        assert!(key_text(json!({"id": 1})).is_err());
        assert!(key_text(json!(["a"])).is_err());
    }

    #[test]
    fn refusals_are_for_the_record_or_for_the_whole_write_by_code() {
        for code in ["WRONGTYPE", "ERR", "SOMEMODULEERR"] {
            assert_eq!(class_of(code), ErrorClass::Permanent, "{code}");
        }
        for code in ["LOADING", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN"] {
            assert_eq!(class_of(code), ErrorClass::Transient, "{code}");
        }
        for code in ["OOM", "MISCONF", "READONLY", "NOREPLICAS"] {
            assert_eq!(class_of(code), ErrorClass::Unavailable, "{code}");
        }
        for code in ["NOAUTH", "WRONGPASS", "NOPERM", "MOVED"] {
            assert_eq!(class_of(code), ErrorClass::Fatal, "{code}");
        }
    }

    #[test]
    fn connection_failures_are_unavailable_and_credentials_fatal() {
        let io = |kind| RedisError::from(std::io::Error::from(kind));
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::TimedOut,
        ] {
            assert_eq!(classify(&io(kind)), ErrorClass::Unavailable, "{kind:?}");
        }
        let auth = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert_eq!(classify(&auth), ErrorClass::Fatal);
        let wrongpass = redis::make_extension_error(
            "WRONGPASS".into(),
            Some("invalid username-password pair".into()),
        );
        assert_eq!(classify(&wrongpass), ErrorClass::Fatal);
        let loading = redis::make_extension_error("LOADING".into(), None);
        assert_eq!(classify(&loading), ErrorClass::Transient);
        let full = RedisError::from((
            ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "refused",
            "max number of clients reached".to_owned(),
        ));
        assert_eq!(classify(&full), ErrorClass::Unavailable);
    }

    #[test]
    fn a_refused_command_rejects_its_record_alone() {
        let replies: Vec<Reply> = [
            wire("+OK\r\n"),
            wire("-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
            wire(":1\r\n"),
        ]
        .into_iter()
        .map(Reply::from)
        .collect();
        let rejected = judge(&replies, &owners(3), &planned(&[4, 5, 6])).expect("no batch failure");
        assert_eq!(
            rejected,
            vec![Rejected {
                index: 5,
                class: ErrorClass::Permanent,
                reason: "Redis refused HSET: WRONGTYPE Operation against a key holding the wrong kind of value".into(),
            }]
        );
    }

    #[test]
    fn a_refusal_that_holds_for_every_write_fails_the_batch_with_the_worst_class() {
        let replies: Vec<Reply> = [
            wire("-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"),
            wire("-LOADING Redis is loading the dataset in memory\r\n"),
            wire("-OOM command not allowed when used memory > 'maxmemory'.\r\n"),
        ]
        .into_iter()
        .map(Reply::from)
        .collect();
        let failure = judge(&replies, &owners(3), &planned(&[0, 1, 2])).expect_err("batch fails");
        assert_eq!(failure.class, ErrorClass::Unavailable);
        assert!(failure.message.contains("OOM"), "{}", failure.message);
    }

    #[test]
    fn a_transaction_gives_the_commands_replies_from_exec() {
        let values = vec![
            wire("+OK\r\n"),
            wire("+QUEUED\r\n"),
            wire("+QUEUED\r\n"),
            wire("*2\r\n+OK\r\n-WRONGTYPE Operation against a key\r\n"),
        ];
        let Ok(Outcome::Replies(replies)) = transaction_outcome(values, 2) else {
            panic!("EXEC's array is the outcome");
        };
        assert!(matches!(replies[0], Reply::Done));
        assert!(matches!(&replies[1], Reply::Refused(e) if e.code() == "WRONGTYPE"));
    }

    #[test]
    fn an_aborted_transaction_names_the_commands_refused_while_queueing() {
        let values = vec![
            wire("+OK\r\n"),
            wire("+QUEUED\r\n"),
            wire("-ERR wrong number of arguments for 'hset' command\r\n"),
            wire("-EXECABORT Transaction discarded because of previous errors.\r\n"),
        ];
        let Ok(Outcome::Aborted(queued)) = transaction_outcome(values, 2) else {
            panic!("EXECABORT aborts");
        };
        let rejected = judge(&queued, &owners(2), &planned(&[0, 1])).expect("per record");
        assert_eq!(
            rejected.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![1]
        );

        let refused_multi = vec![wire("-NOAUTH Authentication required.\r\n")];
        let failure = transaction_outcome(refused_multi, 1).expect_err("MULTI refused");
        assert_eq!(failure.class, ErrorClass::Fatal);
    }

    fn spec(yaml: &str) -> weir_crds::RedisSink {
        serde_yaml_ng::from_str(yaml).expect("test spec parses")
    }

    #[test]
    fn construction_refuses_other_schemes_and_never_repeats_a_password() {
        let sink = spec("key: event.id");
        let err = RedisSink::new(sink.clone(), "http://u:s3cret@host").expect_err("scheme");
        assert!(err.contains("redis://"), "{err}");
        assert!(!err.contains("s3cret"));
        let err =
            RedisSink::new(sink.clone(), "redis://u:s3cret@host:notaport/").expect_err("bad port");
        assert!(!err.contains("s3cret"), "{err}");
        assert!(
            RedisSink::new(sink, "redis://127.0.0.1:1/").is_ok(),
            "connects lazily"
        );
    }

    #[test]
    fn construction_compiles_expressions_and_checks_the_ttl() {
        let err = RedisSink::new(spec("key: 'event.id +'"), "redis://h/").expect_err("cel");
        assert!(err.starts_with("redis.key:"), "{err}");
        let err = RedisSink::new(spec("{key: event.id, command: Hset}"), "redis://h/")
            .expect_err("no fields");
        assert!(err.contains("fields"), "{err}");
        let err = RedisSink::new(spec("{key: event.id, ttl: 100us}"), "redis://h/")
            .expect_err("ttl below 1ms");
        assert!(err.contains("ttl"), "{err}");
        let sink = RedisSink::new(spec("{key: event.id, ttl: 1h30m}"), "rediss://h/")
            .expect("rediss parses");
        assert_eq!(sink.ttl_ms, Some(5_400_000));
    }
}
