//! The MongoDB sink: each record becomes one insert, update (upsert or not) or delete
//! statement, an update or delete touching every document its key fields match (with the
//! default `_id`, the one document), except a replacing upsert, which MongoDB applies to
//! one (FerretDB 1.24, the server tested, holds a connection for each single-document
//! update that matched until its command ends, so a command of more such statements than
//! its pool has never finishes there: `multi` updates release theirs at once); a batch's statements are sent in batch order as MongoDB's `insert`, `update`
//! and `delete` commands, each ordered and holding a run of consecutive statements of its
//! kind, so one key's writes apply in order. A statement the server refuses (duplicate
//! key, failed validation) refuses its record alone: the run resumes after it. The
//! connection is made on first use and re-established by the driver.

use std::time::Duration;

use futures::future::BoxFuture;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Database};
use serde_json::Value;
use weir_crds::{MongoMode, MongoSink, MongoUpsert, RuleAction};

use super::{Rejected, Sink, SinkError, WriteInput, Written, redact};
use crate::record::Record;
use crate::retry::ErrorClass;
use crate::transform::{Expression, Variables, context_with};

/// Statements per command; MongoDB accepts up to 100,000.
const STATEMENTS_PER_COMMAND: usize = 1_000;

/// Bytes of statements per command: under the 16 MiB a command document may take.
const BYTES_PER_COMMAND: usize = 8 << 20;

/// Fields computed from the event: field name → expression.
type Fields = Vec<(String, Expression)>;

/// A MongoDB collection.
#[derive(Debug)]
pub struct MongoDbSink {
    spec: MongoSink,
    url: String,
    client: tokio::sync::OnceCell<Client>,
    document: Fields,
    rules: Vec<(Expression, RuleAction, Fields)>,
    variables: Variables,
}

/// What a record does to the collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Insert,
    Upsert,
    Update,
    Delete,
}

/// The command a statement belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Insert,
    Update,
    Delete,
}

/// One record's statement.
#[derive(Debug)]
struct Statement {
    index: usize,
    command: Command,
    /// The statement as the command lists it (a document, or `{q, u, upsert}`, or
    /// `{q, limit}`); a guarded upsert is two update statements (see [`Guarded`]).
    bodies: Vec<Document>,
    guarded: Guarded,
}

/// How the stale-write guard shapes a statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guarded {
    No,
    /// An update whose filter matches only an older version: no match means the stored
    /// version is newer (or there is no such document).
    Update,
    /// An upsert as two updates: the guarded update of an older version, then an upsert
    /// by key with `$setOnInsert`, which inserts the document when none exists and leaves
    /// an existing one (just updated, or newer) as it is. Neither ever fails on a newer
    /// stored version, so the rest of the command runs.
    Upsert,
}

impl MongoDbSink {
    /// Builds the sink: compiles the expressions. The connection is made on first use, so
    /// an unreachable server is retried by the engine rather than failing the start.
    pub fn new(spec: MongoSink, url: &str) -> Result<Self, String> {
        if !(url.starts_with("mongodb://") || url.starts_with("mongodb+srv://")) {
            return Err("the MongoDB URL must start with mongodb:// or mongodb+srv://".into());
        }
        let fields = |at: &str, map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .map(|(name, source)| {
                    Expression::compile(source)
                        .map(|e| (name.clone(), e))
                        .map_err(|e| format!("mongodb.{at}[{name:?}]: {e}"))
                })
                .collect::<Result<Fields, String>>()
        };
        let document = fields("document", &spec.document)?;
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let when = Expression::compile(&rule.when)
                    .map_err(|e| format!("mongodb.rules[{i}].when: {e}"))?;
                Ok((
                    when,
                    rule.action,
                    fields(&format!("rules[{i}].document"), &rule.document)?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let variables = rules
            .iter()
            .flat_map(|(when, _, fields)| {
                std::iter::once(when).chain(fields.iter().map(|(_, e)| e))
            })
            .chain(document.iter().map(|(_, e)| e))
            .fold(Variables::default(), |all, e| all.and(e.variables()));
        Ok(Self {
            spec,
            url: url.to_owned(),
            client: tokio::sync::OnceCell::new(),
            document,
            rules,
            variables,
        })
    }

    async fn database(&self) -> Result<Database, SinkError> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let mut options = ClientOptions::parse(&self.url).await.map_err(classify)?;
                // Fail fast while the server is down: the engine retries with backoff.
                options
                    .server_selection_timeout
                    .get_or_insert(Duration::from_secs(5));
                options
                    .connect_timeout
                    .get_or_insert(Duration::from_secs(5));
                options
                    .app_name
                    .get_or_insert_with(|| "weir-worker".to_owned());
                Client::with_options(options).map_err(classify)
            })
            .await?;
        Ok(client.database(&self.spec.database))
    }

    /// The record's action and the fields its document is computed from, or `None` when
    /// no rule matches (skipped).
    fn action<'s>(
        &'s self,
        record: &Record,
        event: &Value,
    ) -> Result<Option<(Kind, &'s Fields)>, String> {
        let kind = match self.spec.mode {
            MongoMode::Insert => Kind::Insert,
            MongoMode::Upsert => Kind::Upsert,
            MongoMode::Update => Kind::Update,
            MongoMode::Delete => Kind::Delete,
            MongoMode::Rules => {
                let context = context_with(record, event, self.variables);
                for (when, action, fields) in &self.rules {
                    if when.eval_bool(&context)? {
                        let kind = match action {
                            RuleAction::Upsert => Kind::Upsert,
                            RuleAction::Update => Kind::Update,
                            RuleAction::Delete => Kind::Delete,
                        };
                        let fields = if fields.is_empty() {
                            &self.document
                        } else {
                            fields
                        };
                        return Ok(Some((kind, fields)));
                    }
                }
                return Ok(None);
            }
        };
        Ok(Some((kind, &self.document)))
    }

    /// The document a record writes: its fields' expressions, else the event itself.
    fn document(
        &self,
        record: &Record,
        event: &Value,
        fields: &Fields,
    ) -> Result<Document, String> {
        if fields.is_empty() {
            return match bson::Bson::try_from(event.clone()) {
                Ok(Bson::Document(document)) => Ok(document),
                Ok(_) => Err("the event is not a JSON object: set document to build one".into()),
                Err(e) => Err(format!("the event cannot be a BSON document: {e}")),
            };
        }
        let context = context_with(record, event, self.variables);
        let mut document = Document::new();
        for (name, expression) in fields {
            let value = expression.eval(&context)?;
            let value = Bson::try_from(value)
                .map_err(|e| format!("document field {name:?}: not BSON: {e}"))?;
            document.insert(name.clone(), value);
        }
        Ok(document)
    }

    /// The statement of one record, `Ok(None)` when it has nothing to write (no rule
    /// matches, or an update of key fields only).
    fn statement(&self, item: &WriteInput<'_>) -> Result<Option<Statement>, String> {
        let Some((kind, fields)) = self.action(item.record, item.event)? else {
            return Ok(None);
        };
        let document = self.document(item.record, item.event, fields)?;
        if kind == Kind::Insert {
            return Ok(Some(Statement {
                index: item.index,
                command: Command::Insert,
                bodies: vec![document],
                guarded: Guarded::No,
            }));
        }
        let mut filter = Document::new();
        for key in &self.spec.key_fields {
            match document.get(key) {
                None | Some(Bson::Null) => {
                    return Err(format!("key field {key:?} has no value in the document"));
                }
                Some(value) => {
                    filter.insert(key.clone(), value.clone());
                }
            }
        }
        if kind == Kind::Delete {
            return Ok(Some(Statement {
                index: item.index,
                command: Command::Delete,
                bodies: vec![doc! {"q": filter, "limit": 0}],
                guarded: Guarded::No,
            }));
        }
        let by_key = filter.clone();
        if let Some(guard) = &self.spec.guard {
            let version = match document.get(&guard.field) {
                Some(v @ (Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_))) => v.clone(),
                Some(other) => {
                    return Err(format!(
                        "guard field {:?}: {other} is not a number",
                        guard.field
                    ));
                }
                None => {
                    return Err(format!(
                        "guard field {:?} has no value in the document",
                        guard.field
                    ));
                }
            };
            // Matches a stored document that is older, or has no version.
            filter.insert(guard.field.clone(), doc! {"$not": {"$gte": version}});
        }
        let mut rest = document.clone();
        for key in &self.spec.key_fields {
            rest.remove(key);
        }
        let (update, upsert) = match (kind, self.spec.upsert) {
            (Kind::Upsert, MongoUpsert::Replace) => (document, true),
            (Kind::Upsert, MongoUpsert::Set) if rest.is_empty() => {
                (doc! {"$setOnInsert": by_key.clone()}, true)
            }
            (Kind::Upsert, MongoUpsert::Set) => (doc! {"$set": rest.clone()}, true),
            (_, _) if rest.is_empty() => return Ok(None),
            (_, _) => (doc! {"$set": rest.clone()}, false),
        };
        // MongoDB refuses `multi` with a replacement document: a replacing upsert touches
        // the one document it finds.
        let multi = !(kind == Kind::Upsert && self.spec.upsert == MongoUpsert::Replace);
        let (bodies, guarded) = match (self.spec.guard.is_some(), upsert) {
            (false, _) => (
                vec![doc! {"q": filter, "u": update, "upsert": upsert, "multi": multi}],
                Guarded::No,
            ),
            (true, false) => (
                vec![doc! {"q": filter, "u": update, "upsert": false, "multi": multi}],
                Guarded::Update,
            ),
            (true, true) => (
                vec![
                    doc! {"q": filter, "u": update, "upsert": false, "multi": multi},
                    doc! {"q": by_key, "u": {"$setOnInsert": rest}, "upsert": true, "multi": true},
                ],
                Guarded::Upsert,
            ),
        };
        Ok(Some(Statement {
            index: item.index,
            command: Command::Update,
            bodies,
            guarded,
        }))
    }
}

impl Sink for MongoDbSink {
    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let database = self.database().await?;
            database
                .run_command(doc! {"ping": 1})
                .await
                .map_err(classify)?;
            Ok(())
        })
    }

    fn write<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
    ) -> BoxFuture<'a, Result<Written, SinkError>> {
        Box::pin(async move {
            let mut written = Written::default();
            let mut statements = Vec::with_capacity(input.len());
            for item in input {
                match self.statement(item) {
                    Ok(Some(statement)) => statements.push(statement),
                    Ok(None) => written.skipped += 1,
                    Err(reason) => written.rejected.push(Rejected {
                        index: item.index,
                        class: ErrorClass::Permanent,
                        reason,
                    }),
                }
            }
            if statements.is_empty() {
                return Ok(written);
            }
            let database = self.database().await?;
            let mut start = 0;
            while start < statements.len() {
                let end = run_end(&statements, start);
                let outcome = self
                    .run(&database, &statements[start..end], &mut written)
                    .await?;
                start += outcome;
            }
            written.rejected.sort_by_key(|r| r.index);
            Ok(written)
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The end of the run of statements from `start` that one command takes: same command,
/// at most [`STATEMENTS_PER_COMMAND`] and about [`BYTES_PER_COMMAND`].
fn run_end(statements: &[Statement], start: usize) -> usize {
    let command = statements[start].command;
    let mut bytes = 0;
    let mut end = start;
    while end < statements.len()
        && statements[end].command == command
        && end - start < STATEMENTS_PER_COMMAND
    {
        let size: usize = statements[end]
            .bodies
            .iter()
            .map(|b| b.to_vec().map_or(0, |b| b.len()))
            .sum();
        if end > start && bytes + size > BYTES_PER_COMMAND {
            break;
        }
        bytes += size;
        end += 1;
    }
    end
}

impl MongoDbSink {
    /// Sends `run` as one ordered command; returns how many statements it settled (all of
    /// them, or those up to and including the first refused one: the caller resumes after
    /// it). Refusals and held-back writes are added to `written`.
    async fn run(
        &self,
        database: &Database,
        run: &[Statement],
        written: &mut Written,
    ) -> Result<usize, SinkError> {
        let collection = self.spec.collection.as_str();
        let bodies: Vec<Document> = run.iter().flat_map(|s| s.bodies.iter().cloned()).collect();
        let command = match run[0].command {
            Command::Insert => doc! {"insert": collection, "documents": bodies, "ordered": true},
            Command::Update => doc! {"update": collection, "updates": bodies, "ordered": true},
            Command::Delete => doc! {"delete": collection, "deletes": bodies, "ordered": true},
        };
        let reply = database.run_command(command).await.map_err(classify)?;
        if let Ok(concern) = reply.get_document("writeConcernError") {
            return Err(SinkError::new(
                ErrorClass::Transient,
                format!("write concern not satisfied: {concern}"),
            ));
        }
        let matched = reply.get("n").and_then(Bson::as_i64_lossy).unwrap_or(0);
        let first_error = reply
            .get_array("writeErrors")
            .ok()
            .and_then(|errors| errors.first())
            .and_then(Bson::as_document);
        // The statement a body belongs to: (statement position, bodies before it).
        let owner = |body: usize| {
            let mut before = 0;
            for (i, statement) in run.iter().enumerate() {
                if body < before + statement.bodies.len() {
                    return (i, before);
                }
                before += statement.bodies.len();
            }
            (run.len().saturating_sub(1), before)
        };
        let (settled, applied) = match first_error {
            None => (run.len(), run.len()),
            Some(error) => {
                let body = error
                    .get("index")
                    .and_then(Bson::as_i64_lossy)
                    .and_then(|i| usize::try_from(i).ok())
                    .unwrap_or(0);
                let (at, _) = owner(body);
                let code = error.get("code").and_then(Bson::as_i64_lossy).unwrap_or(0);
                let message = error.get_str("errmsg").unwrap_or("refused");
                match by_code(code) {
                    ErrorClass::Permanent => written.rejected.push(Rejected {
                        index: run[at].index,
                        class: ErrorClass::Permanent,
                        reason: format!("MongoDB refused the document ({code}): {message}"),
                    }),
                    class => {
                        return Err(SinkError::new(
                            class,
                            format!("MongoDB write failed ({code}): {message}"),
                        ));
                    }
                }
                (at + 1, at)
            }
        };
        if run[0].command == Command::Update {
            // `n` counts each update that matched and each upsert (matched or inserted);
            // `upserted` lists the inserts. A guarded upsert's second statement always
            // counts once, so its guarded first statement counts only when it wrote; the
            // guarded statements that wrote nothing were held back.
            let done = &run[..applied];
            let pairs = done.iter().filter(|s| s.guarded == Guarded::Upsert).count();
            let updates = done.iter().filter(|s| s.guarded == Guarded::Update).count();
            if pairs + updates > 0 {
                let plain = done.iter().filter(|s| s.guarded == Guarded::No).count();
                let upserted = reply.get_array("upserted").map_or(0, Vec::len);
                let matched = usize::try_from(matched).unwrap_or(0);
                // Writes: guarded updates that matched + pairs that updated or inserted.
                let wrote = matched.saturating_sub(pairs + plain) + upserted;
                written.skipped += (pairs + updates).saturating_sub(wrote);
            }
        }
        Ok(settled)
    }
}

trait LossyInt {
    fn as_i64_lossy(&self) -> Option<i64>;
}

impl LossyInt for Bson {
    fn as_i64_lossy(&self) -> Option<i64> {
        match self {
            Bson::Int32(i) => Some(i64::from(*i)),
            Bson::Int64(i) => Some(*i),
            Bson::Double(d) => Some(*d as i64),
            _ => None,
        }
    }
}

/// Classifies a driver error.
fn classify(error: mongodb::error::Error) -> SinkError {
    use mongodb::error::ErrorKind;
    let class = match error.kind.as_ref() {
        ErrorKind::Io(_)
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Shutdown => ErrorClass::Unavailable,
        ErrorKind::Authentication { .. }
        | ErrorKind::InvalidArgument { .. }
        | ErrorKind::InvalidTlsConfig { .. } => ErrorClass::Fatal,
        ErrorKind::Command(command) => by_code(i64::from(command.code)),
        _ => ErrorClass::Transient,
    };
    SinkError::new(class, redact(&error.to_string()))
}

/// The class of a MongoDB server error code.
fn by_code(code: i64) -> ErrorClass {
    match code {
        // duplicate key, failed validation, bad or too large a document: this record
        2 | 9 | 14 | 28 | 52 | 55 | 56 | 57 | 66 | 121 | 10334 | 11000 | 11001 | 17419 | 17420 => {
            ErrorClass::Permanent
        }
        // not authorised, bad namespace, unsupported command: the spec does not fit
        13 | 18 | 59 | 73 | 115 => ErrorClass::Fatal,
        // unreachable, shutting down, not primary
        6 | 7 | 89 | 91 | 189 | 9001 | 10107 | 11600 | 11602 | 13435 => ErrorClass::Unavailable,
        // write conflict, time limit, and anything else
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_error_codes_are_classified() {
        assert_eq!(by_code(11000), ErrorClass::Permanent);
        assert_eq!(by_code(121), ErrorClass::Permanent);
        assert_eq!(by_code(13), ErrorClass::Fatal);
        assert_eq!(by_code(10107), ErrorClass::Unavailable);
        assert_eq!(by_code(112), ErrorClass::Transient);
    }
}
