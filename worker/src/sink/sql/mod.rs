//! The SQL sinks (PostgreSQL, MySQL, SQLite) are one implementation over a [`Dialect`]: choosing
//! each event's action (mode or projection rules), planning a batch into statements
//! (`plan`), idempotency keys, finding the events a database refuses by splitting the batch
//! until each stands alone, converting values (`values`), and expiring old keys. A dialect
//! only says how its database runs one transaction over planned steps.

pub mod plan;
pub mod values;

use std::pin::Pin;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use weir_crds::{SqlSink, WriteMode};

use std::collections::HashMap;

use self::plan::{Action, Step, rule_action};
use super::{Rejected, Sink, SinkError, WriteInput, Written};
use crate::commit::{BeforeCommit, Commit, CommitError, Offsets, Transaction};
use crate::record::field;
use crate::retry::ErrorClass;
use crate::transform::{Expression, Variables, context_with};

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

    /// The steps without a key and the first step of each key, and how many were left out:
    /// the later events of a key in one batch, skipped as [`Idempotency::fresh`] skips them.
    pub fn first_of_each_key<'a>(&self, steps: Vec<Step<'a>>) -> (Vec<Step<'a>>, usize) {
        let mut seen = std::collections::HashSet::new();
        let before = steps.len();
        let kept: Vec<Step<'a>> = steps
            .into_iter()
            .filter(|step| self.key_of(step.event).is_none_or(|key| seen.insert(key)))
            .collect();
        let left_out = before - kept.len();
        (kept, left_out)
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
    /// What the rules' conditions read.
    variables: Variables,
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
        let variables = rules.iter().fold(Variables::default(), |all, (e, _, _)| {
            all.and(e.variables())
        });
        Ok(Self {
            spec,
            rules,
            variables,
        })
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
                let ctx = context_with(item.record, item.event, self.variables);
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
    /// Events skipped: their idempotency key was already applied, or the stale-write guard
    /// held them back.
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

/// The connections a PostgreSQL or MySQL sink keeps: each batch is written as this many
/// key-disjoint shards at once, so the database works on as many cores.
pub const CONNECTIONS: u32 = 2;

/// How one SQL database runs what the shared code plans.
pub trait Dialect: Send + Sync + std::fmt::Debug + 'static {
    /// Creates Weir's idempotency table when missing.
    fn create_idempotency_table(&self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Forgets the keys of `idempotency`'s scope older than its window.
    fn expire_keys(
        &self,
        idempotency: &Idempotency,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// One transaction: with idempotency, skip the steps whose key was applied within the
    /// window ([`Idempotency::fresh`]) and record the new keys; run the plan of the rest. A
    /// permanent error refuses the whole transaction (the caller splits the steps).
    fn transaction<'s>(
        &'s self,
        spec: &'s SqlSink,
        idempotency: Option<&'s Idempotency>,
        steps: &'s [Step<'s>],
    ) -> impl Future<Output = Result<Applied, SinkError>> + Send + 's;

    fn close(&self) -> impl Future<Output = ()> + Send;

    /// How many transactions of one batch may run at once (key-disjoint shards, see
    /// `write`): the connections the dialect writes on.
    fn connections(&self) -> usize {
        1
    }

    /// Carries out a replay in one transaction: records `(group, table, token)` in Weir's
    /// `weir_replays` table (created when missing); only when this inserted the row (a
    /// concurrent worker's insert of the same row waits for this transaction, then inserts
    /// nothing) does it empty the table when `truncate`, delete the idempotency keys of
    /// `keys` and forget the offsets stored for `offsets` (next offset NULL, generation
    /// raised), then commits. Returns whether it inserted the row.
    fn replay(&self, plan: &ReplayPlan<'_>)
    -> impl Future<Output = Result<bool, SinkError>> + Send;

    /// Whether this database can keep a pipeline's offsets with its rows (exactly-once).
    fn keeps_offsets(&self) -> bool {
        false
    }

    /// Creates Weir's offsets table when missing.
    fn create_offsets_table(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Err(not_kept()) }
    }

    /// Claims `partitions` for `group`: raises each one's fencing generation and returns
    /// it with the stored next offset, in the order given.
    fn claim(
        &self,
        group: &str,
        partitions: &[(String, i32)],
    ) -> impl Future<Output = Result<Vec<Claim>, SinkError>> + Send {
        let _ = (group, partitions);
        async { Err(not_kept()) }
    }

    /// One transaction that applies `steps` as [`Dialect::transaction`] does, isolating
    /// the steps the database refuses with savepoints (never several transactions), hands
    /// every refused event (`refused`, and those the database refused) to `before_commit`,
    /// moves the offsets compare-and-set, and commits. When an offset row does not hold the
    /// claimed generation and offset, nothing is committed: [`CommitError::Fenced`].
    fn transaction_committing<'s>(
        &'s self,
        spec: &'s SqlSink,
        idempotency: Option<&'s Idempotency>,
        steps: &'s [Step<'s>],
        commit: Committing<'s>,
    ) -> impl Future<Output = Result<Applied, CommitError>> + Send + 's {
        let _ = (spec, idempotency, steps, commit);
        async { Err(CommitError::Sink(not_kept())) }
    }
}

fn not_kept() -> SinkError {
    SinkError::new(
        ErrorClass::Fatal,
        "this database cannot keep offsets with its rows (exactly-once)",
    )
}

/// What a replay does in one SQL sink's database ([`Dialect::replay`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayPlan<'a> {
    /// The pipeline's consumer group: with `table` and `token`, the replay's record.
    pub group: &'a str,
    pub table: &'a str,
    pub token: &'a str,
    /// Empty `table`.
    pub truncate: bool,
    /// The idempotency scope whose keys are deleted.
    pub keys: Option<&'a str>,
    /// The consumer group whose offsets stored with the rows are forgotten.
    pub offsets: Option<&'a str>,
}

/// A partition claimed for writing: the fencing generation raised for this worker and the
/// next offset stored with the rows (`None`: none yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub generation: i64,
    pub next: Option<i64>,
}

/// One partition's offset move: from the `expected` value (what this worker claimed or
/// last committed) under its `generation`, to `next`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetMove {
    pub topic: String,
    pub partition: i32,
    pub next: i64,
    pub generation: i64,
    pub expected: Option<i64>,
}

/// What an exactly-once transaction commits besides the rows.
pub struct Committing<'s> {
    pub group: &'s str,
    pub moves: &'s [OffsetMove],
    /// Events refused before reaching the database (a rule that cannot be evaluated).
    pub refused: &'s [Rejected],
    pub before_commit: &'s dyn BeforeCommit,
}

impl std::fmt::Debug for Committing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committing")
            .field("group", &self.group)
            .field("moves", &self.moves)
            .finish()
    }
}

/// The merged result of applying `steps` in parts: refused events and skips of each part.
pub fn merge(into: &mut Applied, part: Applied) {
    into.rejected.extend(part.rejected);
    into.duplicates += part.duplicates;
}

/// The partitions a worker claimed, by topic and partition.
type Claims = HashMap<(String, i32), Claim>;

/// A table in a SQL database: the sink every SQL kind is.
#[derive(Debug)]
pub struct SqlTable<D> {
    projection: Projection,
    idempotency: Option<Idempotency>,
    dialect: D,
    batches: std::sync::atomic::AtomicU64,
    /// With exactly-once: the consumer group whose offsets are kept with the rows, and the
    /// partitions this worker claimed.
    offsets: Option<(String, std::sync::Mutex<Claims>)>,
    /// The pipeline's consumer group, which names its replays in the database.
    group: String,
}

impl<D: Dialect> SqlTable<D> {
    pub fn new(
        spec: SqlSink,
        idempotency: Option<Idempotency>,
        dialect: D,
    ) -> Result<Self, String> {
        Ok(Self {
            projection: Projection::new(spec)?,
            idempotency,
            dialect,
            batches: std::sync::atomic::AtomicU64::new(0),
            offsets: None,
            group: String::new(),
        })
    }

    /// The table as a sink of the pipeline consuming as `group`.
    pub fn in_group(mut self, group: &str) -> Self {
        group.clone_into(&mut self.group);
        self
    }

    /// Keeps the offsets of `group` with the rows (exactly-once), when the database can.
    pub fn keeping_offsets(mut self, group: &str) -> Self {
        if self.dialect.keeps_offsets() {
            self.offsets = Some((group.to_owned(), std::sync::Mutex::new(HashMap::new())));
        }
        self
    }

    /// The offset moves of a batch from the partitions' claims; `Fenced` for a partition
    /// this worker has not claimed.
    fn moves(&self, offsets: &Offsets) -> Result<Vec<OffsetMove>, CommitError> {
        let Some((_, claims)) = &self.offsets else {
            return Err(CommitError::Sink(not_kept()));
        };
        let claims = claims
            .lock()
            .map_err(|_| CommitError::Stop("the claims lock is poisoned".into()))?;
        offsets
            .0
            .iter()
            .map(|((topic, partition), next)| {
                let claim = claims.get(&(topic.clone(), *partition)).ok_or_else(|| {
                    CommitError::Fenced(format!(
                        "{topic}/{partition} is not claimed by this worker"
                    ))
                })?;
                Ok(OffsetMove {
                    topic: topic.clone(),
                    partition: *partition,
                    next: *next,
                    generation: claim.generation,
                    expected: claim.next,
                })
            })
            .collect()
    }

    /// Applies `steps` in one transaction.
    async fn transaction(&self, steps: &[Step<'_>]) -> Result<Applied, SinkError> {
        self.dialect
            .transaction(&self.projection.spec, self.idempotency.as_ref(), steps)
            .await
    }
}

impl<D: Dialect> Sink for SqlTable<D> {
    fn prepare(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            if self.idempotency.is_some() {
                self.dialect.create_idempotency_table().await?;
            }
            if self.offsets.is_some() {
                self.dialect.create_offsets_table().await?;
            }
            Ok(())
        })
    }

    /// Forgets the idempotency keys and the stored offsets even without truncation: the
    /// group was reset so that these events are applied again.
    fn replay<'a>(
        &'a self,
        replay: &'a super::Replay,
    ) -> BoxFuture<'a, Result<super::Replayed, SinkError>> {
        Box::pin(async move {
            let plan = ReplayPlan {
                group: &self.group,
                table: &self.projection.spec.table,
                token: &replay.token,
                truncate: replay.truncate,
                keys: self.idempotency.as_ref().map(|i| i.scope.as_str()),
                offsets: self.offsets.as_ref().map(|(group, _)| group.as_str()),
            };
            if !plan.truncate && plan.keys.is_none() && plan.offsets.is_none() {
                return Ok(super::Replayed::Nothing);
            }
            Ok(if self.dialect.replay(&plan).await? {
                super::Replayed::Applied {
                    truncated: if plan.truncate {
                        vec![plan.table.to_owned()]
                    } else {
                        vec![]
                    },
                }
            } else {
                super::Replayed::Already
            })
        })
    }

    fn commit(&self) -> Commit {
        match self.offsets {
            Some(_) => Commit::InSinkTransaction,
            None => Commit::Group,
        }
    }

    fn claim<'a>(
        &'a self,
        partitions: &'a [(String, i32)],
    ) -> BoxFuture<'a, Result<Vec<Option<i64>>, SinkError>> {
        Box::pin(async move {
            let Some((group, claims)) = &self.offsets else {
                return Ok(vec![None; partitions.len()]);
            };
            let claimed = self.dialect.claim(group, partitions).await?;
            if claimed.len() != partitions.len() {
                return Err(SinkError::new(
                    ErrorClass::Transient,
                    format!(
                        "claimed {} of {} partitions",
                        claimed.len(),
                        partitions.len()
                    ),
                ));
            }
            if let Ok(mut claims) = claims.lock() {
                for (partition, claim) in partitions.iter().zip(&claimed) {
                    claims.insert(partition.clone(), *claim);
                }
            }
            Ok(claimed.iter().map(|c| c.next).collect())
        })
    }

    fn write_committing<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
        tx: &'a Transaction<'a>,
    ) -> BoxFuture<'a, Result<Written, CommitError>> {
        Box::pin(async move {
            let Some((group, claims)) = &self.offsets else {
                return Err(CommitError::Sink(not_kept()));
            };
            let moves = self.moves(tx.offsets)?;
            let (steps, mut rejected) = self.projection.steps(input);
            let applied = self
                .dialect
                .transaction_committing(
                    &self.projection.spec,
                    self.idempotency.as_ref(),
                    &steps,
                    Committing {
                        group,
                        moves: &moves,
                        refused: &rejected,
                        before_commit: tx.before_commit,
                    },
                )
                .await?;
            if let Ok(mut claims) = claims.lock() {
                for m in &moves {
                    if let Some(claim) = claims.get_mut(&(m.topic.clone(), m.partition)) {
                        claim.next = Some(m.next);
                    }
                }
            }
            let skipped = input.len() - steps.len() - rejected.len() + applied.duplicates;
            rejected.extend(applied.rejected);
            Ok(Written { rejected, skipped })
        })
    }

    /// Refuses only the events the database refuses (a constraint violation, a value that
    /// does not fit its column), so the rest of the batch still lands.
    fn write<'a>(
        &'a self,
        input: &'a [WriteInput<'a>],
    ) -> BoxFuture<'a, Result<Written, SinkError>> {
        Box::pin(async move {
            let written = write(self, input).await?;
            let batches = 1 + self
                .batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if batches.is_multiple_of(100)
                && let Some(idempotency) = &self.idempotency
                && let Err(e) = self.dialect.expire_keys(idempotency).await
            {
                tracing::warn!(error = %e, "expiring idempotency keys failed; retried later");
            }
            Ok(written)
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.dialect.close())
    }
}

/// Writes a batch: chooses each event's action, applies them, and returns the events
/// refused and how many were skipped (matched by no rule, or already applied).
///
/// The steps are split into key-disjoint shards ([`plan::shard`]), one per connection the
/// dialect writes on, applied concurrently, each in its own transaction: a row's events stay
/// in order in one shard, and the write returns (so the batch's offsets move) only when every
/// shard is applied. A shard that fails fails the write, whose retry applies every shard
/// again (upserts and deletes land the same twice; idempotency keys skip what was applied).
async fn write<D: Dialect>(
    table: &SqlTable<D>,
    input: &[WriteInput<'_>],
) -> Result<Written, SinkError> {
    let (steps, mut rejected) = table.projection.steps(input);
    let taken = steps.len();
    // A key's later events in the batch are skipped wherever its first lands, so no two
    // shards record (or wait on) one idempotency key.
    let (steps, repeated) = match &table.idempotency {
        Some(idempotency) => idempotency.first_of_each_key(steps),
        None => (steps, 0),
    };
    let shards = plan::shard(&table.projection.spec, &steps, table.dialect.connections());
    let mut applied = Applied {
        duplicates: repeated,
        ..Applied::default()
    };
    for part in
        futures::future::join_all(shards.iter().map(|part| write_bisecting(table, part))).await
    {
        merge(&mut applied, part?);
    }
    let skipped = input.len() - taken - rejected.len() + applied.duplicates;
    rejected.extend(applied.rejected);
    // In batch order, as the shards' refusals are dead-lettered.
    rejected.sort_by_key(|r| r.index);
    Ok(Written { rejected, skipped })
}

/// Applies `steps`; when the database refuses the transaction permanently (a constraint
/// violation, a value it cannot convert), splits the steps in halves until each refused
/// event stands alone, so the rest of the batch still lands.
fn write_bisecting<'s, D: Dialect>(
    table: &'s SqlTable<D>,
    steps: &'s [Step<'s>],
) -> Pin<Box<dyn Future<Output = Result<Applied, SinkError>> + Send + 's>> {
    Box::pin(async move {
        if steps.is_empty() {
            return Ok(Applied::default());
        }
        match table.transaction(steps).await {
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
                let mut applied = write_bisecting(table, left).await?;
                let right = write_bisecting(table, right).await?;
                applied.rejected.extend(right.rejected);
                applied.duplicates += right.duplicates;
                Ok(applied)
            }
            Err(e) => Err(e),
        }
    })
}

/// A dialect's own parts of an exactly-once transaction, which [`commit_in`] runs.
pub trait CommitParts<DB: sqlx::Database>: Sync {
    /// Applies steps on the transaction's connection, as [`Dialect::transaction`] would; a
    /// permanent error refuses them all (the caller rolls back to a savepoint and splits).
    fn apply<'c>(
        &'c self,
        conn: &'c mut DB::Connection,
        steps: &'c [Step<'c>],
    ) -> impl Future<Output = Result<Applied, SinkError>> + Send + 'c;

    /// Moves every offset of `commit` compare-and-set; [`CommitError::Fenced`] when a row
    /// does not hold the claimed generation and offset.
    fn move_offsets<'c>(
        &'c self,
        conn: &'c mut DB::Connection,
        commit: &'c Committing<'c>,
    ) -> impl Future<Output = Result<(), CommitError>> + Send + 'c;
}

/// The body of every exactly-once SQL transaction, in `tx`: the steps applied in savepoints,
/// a part the database refuses rolled back and split in halves until each refused step
/// stands alone (never a second transaction); every refused event (`commit.refused`, and
/// those the database refused) handed to `commit.before_commit`; the offsets moved; commit.
pub async fn commit_in<DB, C>(
    mut tx: sqlx::Transaction<'_, DB>,
    parts: &C,
    steps: &[Step<'_>],
    commit: Committing<'_>,
    classify: fn(sqlx::Error) -> SinkError,
) -> Result<Applied, CommitError>
where
    DB: sqlx::Database,
    C: CommitParts<DB>,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let mut applied = Applied::default();
    // Parts of the steps to try, the next on top.
    let mut todo = vec![(0, steps.len())];
    while let Some((from, to)) = todo.pop() {
        if from == to {
            continue;
        }
        sqlx::query("SAVEPOINT weir_part")
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        match parts.apply(&mut tx, &steps[from..to]).await {
            Ok(part) => {
                sqlx::query("RELEASE SAVEPOINT weir_part")
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                merge(&mut applied, part);
            }
            Err(e) if e.class == ErrorClass::Permanent => {
                sqlx::query("ROLLBACK TO SAVEPOINT weir_part")
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
                if to - from == 1 {
                    applied.rejected.push(Rejected {
                        index: steps[from].index,
                        class: ErrorClass::Permanent,
                        reason: e.message,
                    });
                } else {
                    let middle = from + (to - from) / 2;
                    todo.push((middle, to));
                    todo.push((from, middle));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let refused: Vec<Rejected> = commit
        .refused
        .iter()
        .chain(&applied.rejected)
        .cloned()
        .collect();
    commit.before_commit.dead_letter(&refused).await?;
    // Dropping the transaction on an error rolls it back.
    parts.move_offsets(&mut tx, &commit).await?;
    tx.commit().await.map_err(classify)?;
    Ok(applied)
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

/// The statements one database carries out a replay with ([`replay_in`]).
#[derive(Debug)]
pub struct ReplayStatements {
    /// Creates `weir_replays` when missing.
    pub create: &'static str,
    /// Inserts `(group, table, token, truncated)` into `weir_replays`; inserts nothing when
    /// the row is there.
    pub record: &'static str,
    /// Empties a table, followed by its quoted name (`TRUNCATE TABLE `, `DELETE FROM `).
    pub empty: &'static str,
    /// Deletes one idempotency scope's keys.
    pub forget_keys: &'static str,
    /// Forgets the offsets a consumer group keeps with the rows (`None`: none are kept).
    pub forget_offsets: Option<&'static str>,
}

/// How many rows a statement changed, whichever driver ran it.
pub trait RowsAffected {
    fn rows_affected(&self) -> u64;
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows_affected(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::mysql::MySqlQueryResult {
    fn rows_affected(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows_affected(&self) -> u64 {
        self.rows_affected()
    }
}

/// [`Dialect::replay`] for a database whose statements are `sql`: one transaction that
/// records the replay and, only when it inserted the record, carries it out.
pub async fn replay_in<DB>(
    pool: &sqlx::Pool<DB>,
    sql: &ReplayStatements,
    quoted_table: &str,
    plan: &ReplayPlan<'_>,
    classify: fn(sqlx::Error) -> SinkError,
) -> Result<bool, SinkError>
where
    DB: sqlx::Database,
    DB::QueryResult: RowsAffected,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> bool: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(sql.create)
        .execute(pool)
        .await
        .map_err(classify)?;
    let mut tx = pool.begin().await.map_err(classify)?;
    let inserted = sqlx::query(sql.record)
        .bind(plan.group)
        .bind(plan.table)
        .bind(plan.token)
        .bind(plan.truncate)
        .execute(&mut *tx)
        .await
        .map_err(classify)?
        .rows_affected()
        == 1;
    if !inserted {
        return Ok(false);
    }
    if plan.truncate {
        sqlx::query(sqlx::AssertSqlSafe(format!("{}{quoted_table}", sql.empty)))
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
    }
    if let Some(scope) = plan.keys {
        sqlx::query(sql.forget_keys)
            .bind(scope)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
    }
    if let (Some(group), Some(forget)) = (plan.offsets, sql.forget_offsets) {
        sqlx::query(forget)
            .bind(group)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
    }
    tx.commit().await.map_err(classify)?;
    Ok(true)
}
