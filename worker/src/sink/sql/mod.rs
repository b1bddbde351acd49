//! What the SQL sinks (PostgreSQL, SQLite) share: choosing each event's action (mode or
//! projection rules), planning a batch into statements (`plan`), idempotency keys, and
//! finding the events a database refuses by splitting the batch until each stands alone.
//! Each database only runs one transaction over planned steps.

pub mod plan;

use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;
use weir_crds::{SqlSink, WriteMode};

use self::plan::{Action, Step, rule_action};
use super::{Rejected, SinkError, WriteInput};
use crate::record::field;
use crate::retry::ErrorClass;
use crate::transform::{Expression, context};

/// Idempotency: skip events whose key was applied within the window.
#[derive(Clone, Debug)]
pub struct Idempotency {
    /// Scope of the keys: the pipeline's consumer group.
    pub scope: String,
    /// Field path of the key.
    pub key: String,
    pub window: Duration,
}

impl Idempotency {
    /// The event's idempotency key; `None` when the field is missing or null (such an
    /// event is always applied).
    fn key_of(&self, event: &Value) -> Option<String> {
        match field(event, &self.key)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }

    /// Each step's key, read once per batch: the database is asked about these, then
    /// [`Idempotency::fresh`] picks the steps to apply.
    pub fn keys_of(&self, steps: &[Step<'_>]) -> Vec<Option<String>> {
        steps.iter().map(|step| self.key_of(step.event)).collect()
    }

    /// The steps to apply: those without a key, and the first of each key not in `seen`
    /// (keys applied within the window); the keys to record; how many were skipped.
    /// `keys` is [`Idempotency::keys_of`] of the same steps.
    pub fn fresh<'a>(
        steps: &[Step<'a>],
        keys: Vec<Option<String>>,
        seen: impl IntoIterator<Item = String>,
    ) -> Fresh<'a> {
        let mut seen: std::collections::HashSet<String> = seen.into_iter().collect();
        let mut fresh = Fresh {
            steps: Vec::with_capacity(steps.len()),
            keys: Vec::new(),
            duplicates: 0,
        };
        for (step, key) in steps.iter().zip(keys) {
            match key {
                Some(key) if seen.contains(&key) => fresh.duplicates += 1,
                Some(key) => {
                    seen.insert(key.clone());
                    fresh.keys.push(key);
                    fresh.steps.push(*step);
                }
                None => fresh.steps.push(*step),
            }
        }
        fresh
    }
}

/// What idempotency leaves of a batch.
#[derive(Debug)]
pub struct Fresh<'a> {
    pub steps: Vec<Step<'a>>,
    /// The new keys, recorded with the rows.
    pub keys: Vec<String>,
    /// Steps skipped: their key was applied before.
    pub duplicates: usize,
}

/// A SQL sink's table spec with its projection rules compiled.
#[derive(Debug)]
pub struct Projection {
    pub spec: SqlSink,
    rules: Vec<(Expression, Action, usize)>,
}

impl Projection {
    pub fn new(spec: SqlSink) -> Result<Self, String> {
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                Ok((
                    Expression::compile(&rule.when)?,
                    rule_action(rule.action),
                    i,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { spec, rules })
    }

    /// The steps of a batch, and the events refused before reaching the database (a rule
    /// that cannot be evaluated). Events no rule matches are skipped.
    pub fn steps<'a>(&'a self, input: &[WriteInput<'a>]) -> (Vec<Step<'a>>, Vec<Rejected>) {
        let mut rejected = Vec::new();
        let mut steps = Vec::with_capacity(input.len());
        for item in input {
            match self.step(item) {
                Ok(Some(step)) => steps.push(step),
                Ok(None) => {}
                Err(reason) => rejected.push(Rejected {
                    index: item.index,
                    class: ErrorClass::Permanent,
                    reason,
                }),
            }
        }
        (steps, rejected)
    }

    /// The action an event takes, or `None` when no rule matches (skipped).
    fn step<'a>(&'a self, item: &WriteInput<'a>) -> Result<Option<Step<'a>>, String> {
        let (action, columns) = match self.spec.mode {
            WriteMode::Insert => (Action::Insert, self.spec.columns.as_slice()),
            WriteMode::Upsert => (Action::Upsert, self.spec.columns.as_slice()),
            WriteMode::Delete => (Action::Delete, self.spec.columns.as_slice()),
            WriteMode::Rules => {
                let ctx = context(item.record, item.event)?;
                let mut chosen = None;
                for (when, action, i) in &self.rules {
                    if when.eval_bool(&ctx)? {
                        chosen = Some((*action, self.spec.rules[*i].columns.as_slice()));
                        break;
                    }
                }
                match chosen {
                    Some(chosen) => chosen,
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(Step {
            index: item.index,
            event: item.event,
            action,
            columns,
        }))
    }
}

/// What a committed transaction did besides writing rows.
#[derive(Debug, Default)]
pub struct Applied {
    /// Events refused while planning (a value that cannot be mapped).
    pub rejected: Vec<Rejected>,
    /// Events skipped because their idempotency key was already applied.
    pub duplicates: usize,
}

impl Applied {
    /// The planning refusals of `plan`, and `duplicates`.
    pub fn new(planned: Vec<(usize, String)>, duplicates: usize) -> Self {
        let rejected = planned
            .into_iter()
            .map(|(index, reason)| Rejected {
                index,
                class: ErrorClass::Permanent,
                reason,
            })
            .collect();
        Self {
            rejected,
            duplicates,
        }
    }
}

/// A database that applies planned steps in one transaction; a permanent error refuses
/// the whole transaction.
pub trait Transact: Sync {
    /// The table spec and compiled rules.
    fn projection(&self) -> &Projection;

    fn transaction<'s>(
        &'s self,
        steps: &'s [Step<'s>],
    ) -> impl Future<Output = Result<Applied, SinkError>> + Send + 's;
}

/// Writes a batch: chooses each event's action, applies them, and returns the events
/// refused and how many were skipped (matched by no rule, or already applied).
pub async fn write<T: Transact>(
    db: &T,
    input: &[WriteInput<'_>],
) -> Result<(Vec<Rejected>, usize), SinkError> {
    let (steps, mut refused) = db.projection().steps(input);
    let applied = write_bisecting(db, &steps).await?;
    let skipped = input.len() - steps.len() - refused.len() + applied.duplicates;
    refused.extend(applied.rejected);
    Ok((refused, skipped))
}

/// Applies `steps`; when the database refuses the transaction permanently (a constraint
/// violation, a value it cannot convert), splits the steps in halves until each refused
/// event stands alone, so the rest of the batch still lands.
pub fn write_bisecting<'s, T: Transact>(
    db: &'s T,
    steps: &'s [Step<'s>],
) -> Pin<Box<dyn Future<Output = Result<Applied, SinkError>> + Send + 's>> {
    Box::pin(async move {
        if steps.is_empty() {
            return Ok(Applied::default());
        }
        match db.transaction(steps).await {
            Ok(applied) => Ok(applied),
            Err(e) if e.class == ErrorClass::Permanent && steps.len() == 1 => Ok(Applied {
                rejected: vec![Rejected {
                    index: steps[0].index,
                    class: ErrorClass::Permanent,
                    reason: e.message,
                }],
                duplicates: 0,
            }),
            Err(e) if e.class == ErrorClass::Permanent => {
                let (left, right) = steps.split_at(steps.len() / 2);
                let mut applied = write_bisecting(db, left).await?;
                let right = write_bisecting(db, right).await?;
                applied.rejected.extend(right.rejected);
                applied.duplicates += right.duplicates;
                Ok(applied)
            }
            Err(e) => Err(e),
        }
    })
}

/// A table name (`name` or `schema.name`) as a quoted SQL identifier.
pub fn quote_table(table: &str) -> String {
    table.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// A quoted SQL identifier.
pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// Classifies a database error the drivers have in common; `by_code` classifies the
/// database's own error codes.
pub fn classify(error: sqlx::Error, by_code: impl Fn(&str) -> ErrorClass) -> SinkError {
    use sqlx::error::ErrorKind;
    let class = match &error {
        sqlx::Error::Database(db) => match db.kind() {
            ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation => ErrorClass::Permanent,
            _ => db.code().as_deref().map_or(ErrorClass::Transient, by_code),
        },
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => ErrorClass::Unavailable,
        _ => ErrorClass::Transient,
    };
    SinkError {
        class,
        message: super::redact(&error.to_string()),
    }
}
