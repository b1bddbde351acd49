//! Turning a batch of events into as few SQL statements as possible while keeping the
//! result identical to applying the events one by one, in order.
//!
//! Upsert, Delete and Rules fold the events of each key into at most two operations
//! (`[op]`, `[Delete, Upsert]` or `[Update, Upsert]`), then group the operations of all
//! keys by action and column set: one statement per group. Per-key order is kept because a
//! key's second operation runs in a later round than its first; different keys touch
//! different rows, so their relative order does not matter. Insert keeps every row.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher as _;

use hashbrown::HashTable;

use serde_json::Value;
use weir_crds::{Column, ColumnType, RuleAction, SqlSink, WriteMode};

use crate::record::field;

/// What a rule or mode does to one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Insert,
    Upsert,
    Update,
    Delete,
}

/// One event to plan: its position in the batch and, for Rules, the action chosen and the
/// columns that rule writes.
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub index: usize,
    pub event: &'a Value,
    pub action: Action,
    pub columns: &'a [Column],
}

/// The text value of every column of one row (`None` is SQL NULL), borrowed from the event
/// where it holds the text.
pub type Row<'a> = Vec<Option<Cow<'a, str>>>;

/// One statement: an action over rows that all set the same columns.
#[derive(Debug, PartialEq, Eq)]
pub struct Group<'a> {
    pub action: Action,
    /// Column names and types, key columns first.
    pub columns: Vec<(String, ColumnType)>,
    pub rows: Vec<Row<'a>>,
    /// Batch positions of the events that went into this group.
    pub sources: Vec<usize>,
}

/// The statements for one batch, to run in order, and the events refused while planning.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    pub groups: Vec<Group<'a>>,
    /// (batch position, reason): a key or value that cannot be mapped.
    pub rejected: Vec<(usize, String)>,
    /// Upserts and updates the stale-write guard dropped while folding: an earlier event
    /// of the batch wrote a newer version of the same row.
    pub stale: usize,
}

/// Pending effect on one key's row, with the values each column takes.
#[derive(Clone, Debug)]
enum Op<'a> {
    Upsert(Values<'a>, Vec<usize>),
    Update(Values<'a>, Vec<usize>),
    Delete(Vec<usize>),
}

/// A row's key: the key columns' values.
type Key<'a> = Vec<Option<Cow<'a, str>>>;

/// Builds the plan for `steps` in batch order.
pub fn plan<'a>(sink: &'a SqlSink, steps: &[Step<'a>]) -> Plan<'a> {
    let mut plan = Plan::default();
    if sink.mode == WriteMode::Insert {
        plan_inserts(sink, steps, &mut plan);
        return plan;
    }
    // The key columns' types, for the rows of deletes (which carry only the key).
    let key_types: HashMap<&str, ColumnType> = sink
        .rules
        .iter()
        .flat_map(|rule| rule.columns.iter())
        .chain(sink.columns.iter())
        .filter(|c| sink.key_columns.contains(&c.name))
        .map(|c| (c.name.as_str(), c.type_))
        .collect();
    // Per key, its folded operations, in first-seen key order; `index` finds a key's entry.
    let hasher = std::hash::RandomState::new();
    let mut index: HashTable<usize> = HashTable::with_capacity(steps.len());
    let mut keyed: Vec<(Key<'a>, Vec<Op<'a>>)> = Vec::with_capacity(steps.len());
    for step in steps {
        let values = match row_values(step.event, step.columns) {
            Ok(values) => values,
            Err(reason) => {
                plan.rejected.push((step.index, reason));
                continue;
            }
        };
        let mut key = Vec::with_capacity(sink.key_columns.len());
        let mut missing = None;
        for name in &sink.key_columns {
            match values.get(name.as_str()) {
                Some((_, Some(v))) => key.push(Some(v.clone())),
                _ => missing = Some(name.clone()),
            }
        }
        if let Some(name) = missing {
            let from = step
                .columns
                .iter()
                .find(|c| c.name == name)
                .map(column_path)
                .unwrap_or_else(|| format!("event.{name}"));
            plan.rejected.push((
                step.index,
                format!("key column {name:?} has no value: field {from} is missing or null"),
            ));
            continue;
        }
        let guard = match guard_value(sink, step.action, &values) {
            Ok(guard) => guard,
            Err(reason) => {
                plan.rejected.push((step.index, reason));
                continue;
            }
        };
        let hash = hasher.hash_one(&key);
        let found = index.find(hash, |&i| keyed[i].0 == key).copied();
        // Applied in order, the database would hold this one back: the row was upserted
        // (or, for an update, updated) to a newer version earlier in this batch. An
        // upsert after an update still runs: the update may have found no row.
        if let Some(version) = &guard
            && let Some(last) = found.and_then(|i| keyed[i].1.last())
            && (matches!(last, Op::Upsert(..)) || step.action == Action::Update)
            && last.guard(sink).is_some_and(|newest| version <= &newest)
        {
            plan.stale += 1;
            continue;
        }
        let op = match step.action {
            Action::Upsert | Action::Insert => Op::Upsert(values, vec![step.index]),
            Action::Update => Op::Update(values, vec![step.index]),
            Action::Delete => Op::Delete(vec![step.index]),
        };
        match found {
            Some(i) => fold(&mut keyed[i].1, op),
            None => {
                keyed.push((key, vec![op]));
                index.insert_unique(hash, keyed.len() - 1, |&i| hasher.hash_one(&keyed[i].0));
            }
        }
    }
    drop(index);
    // Round r holds the r-th operation of every key; a round has a few groups at most
    // (one per action and column set), so they are found by a linear scan, starting with
    // the group the previous row went to.
    let mut rounds: [Vec<Group<'a>>; 2] = [Vec::new(), Vec::new()];
    let mut last: [usize; 2] = [0, 0];
    for (key, ops) in keyed {
        for (round, op) in ops.into_iter().enumerate() {
            let (action, mut values, sources) = match op {
                Op::Upsert(values, sources) => (Action::Upsert, values, sources),
                Op::Update(values, sources) => (Action::Update, values, sources),
                Op::Delete(sources) => {
                    let values = sink
                        .key_columns
                        .iter()
                        .zip(&key)
                        .map(|(name, v)| {
                            let type_ = key_types.get(name.as_str()).copied().unwrap_or_default();
                            (name.as_str(), (type_, v.clone()))
                        })
                        .collect();
                    (Action::Delete, values, sources)
                }
            };
            let round = round.min(1);
            let groups = &mut rounds[round];
            let fits = |g: &Group<'_>| {
                g.action == action
                    && g.columns.len() == values.len()
                    && g.columns
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .eq(ordered_names(&sink.key_columns, &values))
            };
            let found = match groups.get(last[round]) {
                Some(g) if fits(g) => Some(last[round]),
                _ => groups.iter().position(fits),
            };
            let index = match found {
                Some(index) => index,
                None => {
                    let columns = ordered_names(&sink.key_columns, &values)
                        .map(|n| {
                            (
                                n.to_owned(),
                                values.get(n).map(|(t, _)| *t).unwrap_or_default(),
                            )
                        })
                        .collect();
                    groups.push(Group {
                        action,
                        columns,
                        rows: Vec::new(),
                        sources: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
            last[round] = index;
            let group = &mut groups[index];
            let row: Row<'a> = group
                .columns
                .iter()
                .map(|(n, _)| values.remove(n.as_str()).and_then(|(_, v)| v))
                .collect();
            group.rows.push(row);
            group.sources.extend(sources);
        }
    }
    for mut groups in rounds {
        // Within a round: deletes, then upserts, then updates (each key appears once).
        groups.sort_by_key(|g| match g.action {
            Action::Delete => 0,
            Action::Insert | Action::Upsert => 1,
            Action::Update => 2,
        });
        plan.groups.extend(groups);
    }
    plan
}

/// A row's column names as a statement lists them: key columns first (in keyColumns
/// order), then the rest in name order.
fn ordered_names<'v>(keys: &'v [String], values: &'v Values<'_>) -> impl Iterator<Item = &'v str> {
    keys.iter()
        .map(String::as_str)
        .filter(|k| values.contains_key(k))
        .chain(
            values
                .keys()
                .copied()
                .filter(|n| !keys.iter().any(|k| k == n)),
        )
}

/// Adds `op` to a key's pending operations, merging where the result is exactly that of
/// applying them in sequence.
fn fold<'a>(ops: &mut Vec<Op<'a>>, op: Op<'a>) {
    let last = ops.pop();
    let merged = match (last, op) {
        (None, op) => vec![op],
        // A delete makes everything before it irrelevant.
        (Some(prev), Op::Delete(mut s)) => {
            let mut sources = sources_of(&std::mem::take(ops));
            sources.extend(sources_of(std::slice::from_ref(&prev)));
            sources.append(&mut s);
            vec![Op::Delete(sources)]
        }
        // Updating a deleted row does nothing.
        (Some(Op::Delete(mut s)), Op::Update(_, mut t)) => {
            s.append(&mut t);
            vec![Op::Delete(s)]
        }
        (Some(Op::Delete(s)), Op::Upsert(v, t)) => vec![Op::Delete(s), Op::Upsert(v, t)],
        // After an upsert the row exists: later writes set their columns on it.
        (Some(Op::Upsert(mut a, mut s)), Op::Upsert(b, mut t) | Op::Update(b, mut t)) => {
            a.extend(b);
            s.append(&mut t);
            vec![Op::Upsert(a, s)]
        }
        (Some(Op::Update(mut a, mut s)), Op::Update(b, mut t)) => {
            a.extend(b);
            s.append(&mut t);
            vec![Op::Update(a, s)]
        }
        // An update of a row that may not exist, then an upsert: both must run.
        (Some(prev @ Op::Update(..)), op @ Op::Upsert(..)) => vec![prev, op],
    };
    ops.extend(merged);
}

impl Op<'_> {
    /// The guard column's value this operation writes, when the sink has a guard.
    fn guard(&self, sink: &SqlSink) -> Option<Version> {
        let column = &sink.guard.as_ref()?.column;
        match self {
            Op::Upsert(values, _) | Op::Update(values, _) => {
                let (type_, text) = values.get(column.as_str())?;
                Version::parse(*type_, text.as_deref()?)
            }
            Op::Delete(_) => None,
        }
    }
}

/// A value of a guard column, ordered as the database orders it.
#[derive(Clone, Debug, PartialEq, PartialOrd)]
pub enum Version {
    Integer(i128),
    Number(f64),
    Time(chrono::DateTime<chrono::Utc>),
}

impl Version {
    /// The version `text` holds for a guard column of `type_`; `None` when it holds none.
    pub fn parse(type_: ColumnType, text: &str) -> Option<Version> {
        match type_ {
            ColumnType::Integer | ColumnType::Bigint => {
                text.trim().parse().ok().map(Version::Integer)
            }
            ColumnType::Numeric => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .map(Version::Number),
            ColumnType::Timestamptz => super::values::parse_timestamp(text).map(Version::Time),
            _ => None,
        }
    }
}

/// The guard column's version for an upsert or update; an error when the sink has a guard
/// and the event carries no usable value for it.
fn guard_value(
    sink: &SqlSink,
    action: Action,
    values: &Values<'_>,
) -> Result<Option<Version>, String> {
    let Some(guard) = &sink.guard else {
        return Ok(None);
    };
    if !matches!(action, Action::Upsert | Action::Update) {
        return Ok(None);
    }
    match values.get(guard.column.as_str()) {
        Some((type_, Some(text))) => Version::parse(*type_, text).map(Some).ok_or_else(|| {
            format!(
                "guard column {:?}: {text:?} is not a {type_:?} version",
                guard.column
            )
        }),
        _ => Err(format!(
            "guard column {:?} has no value: the event's field is missing or null",
            guard.column
        )),
    }
}

fn sources_of(ops: &[Op<'_>]) -> Vec<usize> {
    ops.iter()
        .flat_map(|op| match op {
            Op::Upsert(_, s) | Op::Update(_, s) | Op::Delete(s) => s.clone(),
        })
        .collect()
}

fn plan_inserts<'a>(sink: &'a SqlSink, steps: &[Step<'a>], plan: &mut Plan<'a>) {
    let mut group = Group {
        action: Action::Insert,
        columns: sink
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_))
            .collect(),
        rows: Vec::with_capacity(steps.len()),
        sources: Vec::with_capacity(steps.len()),
    };
    for step in steps {
        match row_values(step.event, &sink.columns) {
            Ok(mut values) => {
                group.rows.push(
                    sink.columns
                        .iter()
                        .map(|c| values.remove(c.name.as_str()).and_then(|(_, v)| v))
                        .collect(),
                );
                group.sources.push(step.index);
            }
            Err(reason) => plan.rejected.push((step.index, reason)),
        }
    }
    if !group.rows.is_empty() {
        plan.groups.push(group);
    }
}

type Values<'a> = BTreeMap<&'a str, (ColumnType, Option<Cow<'a, str>>)>;

/// The text value of each column for one event.
fn row_values<'a>(event: &'a Value, columns: &'a [Column]) -> Result<Values<'a>, String> {
    let mut values = BTreeMap::new();
    for column in columns {
        let text = match column_value(event, column) {
            None | Some(Value::Null) => None,
            Some(value) => Some(to_text(value, column.type_).map_err(|e| {
                format!("column {:?} from {}: {e}", column.name, column_path(column))
            })?),
        };
        values.insert(column.name.as_str(), (column.type_, text));
    }
    Ok(values)
}

/// The event's value for a column: at its `from` path, or by default at `event.<name>`
/// (the name itself as the path, which [`field`] reads without the `event.` prefix).
fn column_value<'a>(event: &'a Value, column: &Column) -> Option<&'a Value> {
    field(event, column.from.as_deref().unwrap_or(&column.name))
}

fn column_path(column: &Column) -> String {
    column
        .from
        .clone()
        .unwrap_or_else(|| format!("event.{}", column.name))
}

/// The SQL text form of a JSON value for a column type; PostgreSQL casts it.
fn to_text(value: &Value, type_: ColumnType) -> Result<Cow<'_, str>, String> {
    match (value, type_) {
        (value, ColumnType::Jsonb) => Ok(Cow::Owned(value.to_string())),
        (Value::String(s), _) => Ok(Cow::Borrowed(s)),
        (
            Value::Number(n),
            ColumnType::Text | ColumnType::Integer | ColumnType::Bigint | ColumnType::Numeric,
        ) => Ok(Cow::Owned(n.to_string())),
        (Value::Bool(b), ColumnType::Boolean | ColumnType::Text) => {
            Ok(Cow::Borrowed(if *b { "true" } else { "false" }))
        }
        (other, type_) => Err(format!(
            "a JSON {} does not fit a {type_:?} column",
            match other {
                Value::Object(_) => "object",
                Value::Array(_) => "array",
                Value::Bool(_) => "boolean",
                Value::Number(_) => "number",
                _ => "value",
            }
        )),
    }
}

/// Splits `steps` into at most `shards` key-disjoint parts, each in batch order: every step
/// of one row key (the key columns' values, read as [`plan`] reads them) goes to the same
/// part, so parts can be applied concurrently with the result of applying the steps in
/// order. Without key columns there is one part: which of two inserts a unique index
/// refuses must stay the later one.
pub fn shard<'a>(sink: &SqlSink, steps: &[Step<'a>], shards: usize) -> Vec<Vec<Step<'a>>> {
    let shards = shards.clamp(1, steps.len().max(1));
    if shards == 1 || sink.key_columns.is_empty() {
        return vec![steps.to_vec()];
    }
    let mut parts: Vec<Vec<Step<'a>>> = (0..shards)
        .map(|_| Vec::with_capacity(steps.len() / shards + 1))
        .collect();
    for step in steps {
        parts[(key_hash(sink, step) % shards as u64) as usize].push(*step);
    }
    parts.retain(|p| !p.is_empty());
    parts
}

/// A hash of a step's key: of each key column's SQL text (what [`row_values`] makes of it),
/// so keys equal to the plan hash equally. A missing key hashes as such (the plan refuses it).
fn key_hash(sink: &SqlSink, step: &Step<'_>) -> u64 {
    use std::fmt::Write as _;
    use std::hash::Hasher as _;
    /// Feeds formatted text to the hasher without building a string.
    struct Text<'h>(&'h mut std::hash::DefaultHasher);
    impl std::fmt::Write for Text<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    let mut hasher = std::hash::DefaultHasher::new();
    for name in &sink.key_columns {
        let column = step.columns.iter().find(|c| &c.name == name);
        let value = column.and_then(|c| column_value(step.event, c));
        match (value, column.map(|c| c.type_)) {
            (None | Some(Value::Null), _) | (_, None) => hasher.write_u8(0),
            (Some(Value::String(s)), Some(t)) if t != ColumnType::Jsonb => {
                hasher.write(s.as_bytes())
            }
            (Some(Value::Number(n)), Some(t)) if t != ColumnType::Jsonb => {
                let _ = write!(Text(&mut hasher), "{n}");
            }
            (Some(value), Some(_)) => {
                let _ = write!(Text(&mut hasher), "{value}");
            }
        }
        hasher.write_u8(0xff);
    }
    hasher.finish()
}

/// The action a rule chooses, as a plan action.
pub fn rule_action(action: RuleAction) -> Action {
    match action {
        RuleAction::Upsert => Action::Upsert,
        RuleAction::Update => Action::Update,
        RuleAction::Delete => Action::Delete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(name: &str, from: &str, type_: ColumnType) -> Column {
        Column {
            name: name.into(),
            from: Some(from.into()),
            type_,
        }
    }

    fn sink(mode: WriteMode) -> SqlSink {
        SqlSink {
            table: "todos".into(),
            mode,
            key_columns: vec!["id".into()],
            columns: vec![
                col("id", "event.id", ColumnType::Bigint),
                col("title", "event.title", ColumnType::Text),
            ],
            ..SqlSink::default()
        }
    }

    fn steps<'a>(sink: &'a SqlSink, events: &'a [(Action, Value)]) -> Vec<Step<'a>> {
        events
            .iter()
            .enumerate()
            .map(|(index, (action, event))| Step {
                index,
                event,
                action: *action,
                columns: &sink.columns,
            })
            .collect()
    }

    fn summary<'a>(plan: &Plan<'a>) -> Vec<(Action, Vec<Row<'a>>)> {
        plan.groups
            .iter()
            .map(|g| (g.action, g.rows.clone()))
            .collect()
    }

    fn row(values: &[Option<&'static str>]) -> Row<'static> {
        values.iter().map(|v| v.map(Cow::Borrowed)).collect()
    }

    #[test]
    fn upserts_of_one_key_fold_into_the_last_values() {
        let s = sink(WriteMode::Upsert);
        let events = [
            (Action::Upsert, json!({"id": 1, "title": "a"})),
            (Action::Upsert, json!({"id": 2, "title": "b"})),
            (Action::Upsert, json!({"id": 1, "title": "c"})),
        ];
        let plan = plan(&s, &steps(&s, &events));
        assert_eq!(
            summary(&plan),
            vec![(
                Action::Upsert,
                vec![row(&[Some("1"), Some("c")]), row(&[Some("2"), Some("b")])]
            )]
        );
        assert_eq!(plan.groups[0].sources, vec![0, 2, 1]);
    }

    #[test]
    fn delete_then_create_keeps_both_in_order() {
        let s = sink(WriteMode::Rules);
        let events = [
            (Action::Upsert, json!({"id": 1, "title": "a"})),
            (Action::Delete, json!({"id": 1})),
            (Action::Upsert, json!({"id": 1, "title": "again"})),
        ];
        let plan = plan(&s, &steps(&s, &events));
        assert_eq!(
            summary(&plan),
            vec![
                (Action::Delete, vec![row(&[Some("1")])]),
                (Action::Upsert, vec![row(&[Some("1"), Some("again")])]),
            ]
        );
    }

    #[test]
    fn update_after_delete_is_dropped_and_update_after_upsert_merges() {
        let s = sink(WriteMode::Rules);
        let title_only = [
            col("id", "event.id", ColumnType::Bigint),
            col("title", "event.title", ColumnType::Text),
        ];
        let events = [
            json!({"id": 1, "title": "a"}),
            json!({"id": 1}),
            json!({"id": 1, "title": "late"}),
            json!({"id": 2, "title": "b"}),
            json!({"id": 2, "title": "b2"}),
        ];
        let actions = [
            Action::Upsert,
            Action::Delete,
            Action::Update,
            Action::Upsert,
            Action::Update,
        ];
        let steps: Vec<Step<'_>> = events
            .iter()
            .zip(actions)
            .enumerate()
            .map(|(index, (event, action))| Step {
                index,
                event,
                action,
                columns: &title_only,
            })
            .collect();
        let plan = plan(&s, &steps);
        assert_eq!(
            summary(&plan),
            vec![
                (Action::Delete, vec![row(&[Some("1")])]),
                (Action::Upsert, vec![row(&[Some("2"), Some("b2")])]),
            ]
        );
    }

    #[test]
    fn update_before_upsert_runs_both() {
        let s = sink(WriteMode::Rules);
        let events = [
            (Action::Update, json!({"id": 1, "title": "maybe"})),
            (Action::Upsert, json!({"id": 1, "title": "sure"})),
        ];
        let plan = plan(&s, &steps(&s, &events));
        assert_eq!(
            summary(&plan),
            vec![
                (Action::Update, vec![row(&[Some("1"), Some("maybe")])]),
                (Action::Upsert, vec![row(&[Some("1"), Some("sure")])]),
            ]
        );
    }

    #[test]
    fn missing_key_and_misfit_values_are_rejected_with_reasons() {
        let s = sink(WriteMode::Upsert);
        let events = [
            (Action::Upsert, json!({"title": "no id"})),
            (Action::Upsert, json!({"id": {"nested": 1}, "title": "x"})),
            (Action::Upsert, json!({"id": 3, "title": "ok"})),
        ];
        let plan = plan(&s, &steps(&s, &events));
        assert_eq!(plan.rejected.len(), 2);
        assert!(
            plan.rejected[0]
                .1
                .contains("key column \"id\" has no value"),
            "{:?}",
            plan.rejected
        );
        assert!(
            plan.rejected[1].1.contains("object does not fit"),
            "{:?}",
            plan.rejected
        );
        assert_eq!(
            summary(&plan),
            vec![(Action::Upsert, vec![row(&[Some("3"), Some("ok")])])]
        );
    }

    #[test]
    fn inserts_keep_every_row() {
        let s = sink(WriteMode::Insert);
        let events = [
            (Action::Insert, json!({"id": 1, "title": "a"})),
            (Action::Insert, json!({"id": 1, "title": "a"})),
        ];
        let plan = plan(&s, &steps(&s, &events));
        assert_eq!(plan.groups[0].rows.len(), 2);
    }

    #[test]
    fn shards_are_key_disjoint_and_keep_batch_order() {
        let s = sink(WriteMode::Upsert);
        // Key 5 as a number and as a string is one row (both are the text "5").
        let events: Vec<(Action, Value)> = (0..200)
            .map(|i| match i % 50 {
                0 => (Action::Upsert, json!({"id": "5", "title": i.to_string()})),
                _ => (
                    Action::Upsert,
                    json!({"id": i % 40, "title": i.to_string()}),
                ),
            })
            .collect();
        let steps = steps(&s, &events);
        let parts = shard(&s, &steps, 2);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), steps.len());
        let key = |step: &Step<'_>| match &step.event["id"] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        for part in &parts {
            assert!(
                part.windows(2).all(|w| w[0].index < w[1].index),
                "batch order kept"
            );
        }
        let keys = |part: &[Step<'_>]| {
            part.iter()
                .map(key)
                .collect::<std::collections::HashSet<_>>()
        };
        assert!(
            keys(&parts[0]).is_disjoint(&keys(&parts[1])),
            "no key in both shards"
        );
        // Without key columns, one part in batch order.
        let mut no_keys = sink(WriteMode::Insert);
        no_keys.key_columns.clear();
        assert_eq!(shard(&no_keys, &steps, 2).len(), 1);
        assert_eq!(shard(&s, &steps, 1).len(), 1);
    }
}
