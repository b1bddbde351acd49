//! The PostgreSQL sink: one transaction per batch, one UNNEST statement per group of rows
//! (see `plan`), idempotency keys written in the same transaction as the rows.

pub mod plan;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};
use weir_crds::{ColumnType, SqlSink, WriteMode};

use self::plan::{Action, Group, Step, plan, rule_action};
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

#[derive(Debug)]
pub struct PostgresSink {
    spec: SqlSink,
    pool: PgPool,
    rules: Vec<(Expression, Action, usize)>,
    idempotency: Option<Idempotency>,
    batches: u64,
}

impl PostgresSink {
    /// Builds the sink; the connection is made on first use, so an unreachable database
    /// is retried by the engine rather than failing the start.
    pub fn new(spec: SqlSink, url: &str, idempotency: Option<Idempotency>) -> Result<Self, String> {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy(url)
            .map_err(|e| format!("invalid PostgreSQL URL: {}", redact(&e.to_string())))?;
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
        Ok(Self {
            spec,
            pool,
            rules,
            idempotency,
            batches: 0,
        })
    }

    /// Creates Weir's own bookkeeping table when idempotency is on.
    pub async fn prepare(&self) -> Result<(), SinkError> {
        if self.idempotency.is_some() {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS weir_idempotency (
                    scope text NOT NULL,
                    key text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (scope, key))",
            )
            .execute(&self.pool)
            .await
            .map_err(classify)?;
        }
        Ok(())
    }

    /// Writes the events; returns those refused permanently (a constraint violation, a
    /// value PostgreSQL cannot cast), found by splitting the batch until each refused
    /// event stands alone, so the rest of the batch still lands.
    pub async fn write(&mut self, input: &[WriteInput<'_>]) -> Result<Vec<Rejected>, SinkError> {
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
        rejected.extend(self.write_steps(&steps).await?);
        self.batches += 1;
        if self.batches.is_multiple_of(100) {
            self.expire_idempotency_keys().await;
        }
        Ok(rejected)
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

    fn write_steps<'s>(
        &'s self,
        steps: &'s [Step<'s>],
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Vec<Rejected>, SinkError>> + Send + 's>> {
        Box::pin(async move {
            if steps.is_empty() {
                return Ok(Vec::new());
            }
            match self.transaction(steps).await {
                Ok(rejected) => Ok(rejected),
                Err(e) if e.class == ErrorClass::Permanent && steps.len() == 1 => {
                    Ok(vec![Rejected {
                        index: steps[0].index,
                        class: ErrorClass::Permanent,
                        reason: e.message,
                    }])
                }
                Err(e) if e.class == ErrorClass::Permanent => {
                    let (left, right) = steps.split_at(steps.len() / 2);
                    let mut rejected = self.write_steps(left).await?;
                    rejected.extend(self.write_steps(right).await?);
                    Ok(rejected)
                }
                Err(e) => Err(e),
            }
        })
    }

    /// One transaction: skip already-applied idempotency keys, run the plan, record the keys.
    /// A plan of one statement without idempotency needs no explicit transaction (a
    /// statement is atomic), which saves two round trips per batch.
    async fn transaction(&self, steps: &[Step<'_>]) -> Result<Vec<Rejected>, SinkError> {
        let Some(idempotency) = &self.idempotency else {
            let plan = plan(&self.spec, steps);
            if plan.groups.len() <= 1 {
                let mut conn = self.pool.acquire().await.map_err(classify)?;
                execute_all(&mut conn, &self.spec, &plan.groups).await?;
            } else {
                let mut tx = self.pool.begin().await.map_err(classify)?;
                execute_all(&mut tx, &self.spec, &plan.groups).await?;
                tx.commit().await.map_err(classify)?;
            }
            return Ok(rejected(plan.rejected));
        };
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let (steps, keys) = fresh(&mut tx, idempotency, steps).await?;
        let plan = plan(&self.spec, &steps);
        execute_all(&mut tx, &self.spec, &plan.groups).await?;
        if !keys.is_empty() {
            sqlx::query(
                "INSERT INTO weir_idempotency (scope, key)
                 SELECT $1, k FROM UNNEST($2::text[]) AS k
                 ON CONFLICT (scope, key) DO UPDATE SET applied_at = now()",
            )
            .bind(&idempotency.scope)
            .bind(&keys)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(rejected(plan.rejected))
    }

    async fn expire_idempotency_keys(&self) {
        if let Some(idempotency) = &self.idempotency {
            let result = sqlx::query(
                "DELETE FROM weir_idempotency WHERE scope = $1 AND applied_at < now() - make_interval(secs => $2)",
            )
            .bind(&idempotency.scope)
            .bind(idempotency.window.as_secs_f64())
            .execute(&self.pool)
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "expiring idempotency keys failed; retried later");
            }
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn rejected(planned: Vec<(usize, String)>) -> Vec<Rejected> {
    planned
        .into_iter()
        .map(|(index, reason)| Rejected {
            index,
            class: ErrorClass::Permanent,
            reason,
        })
        .collect()
}

/// The steps whose idempotency key is new (first occurrence within the batch, not
/// applied within the window), and those keys.
async fn fresh<'a>(
    tx: &mut Transaction<'_, Postgres>,
    idempotency: &Idempotency,
    steps: &[Step<'a>],
) -> Result<(Vec<Step<'a>>, Vec<String>), SinkError> {
    let key_of = |step: &Step<'_>| -> Option<String> {
        match field(step.event, &idempotency.key)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    };
    let candidates: Vec<String> = steps.iter().filter_map(key_of).collect();
    let seen: Vec<(String,)> = sqlx::query_as(
        "SELECT key FROM weir_idempotency
         WHERE scope = $1 AND key = ANY($2) AND applied_at > now() - make_interval(secs => $3)",
    )
    .bind(&idempotency.scope)
    .bind(&candidates)
    .bind(idempotency.window.as_secs_f64())
    .fetch_all(&mut **tx)
    .await
    .map_err(classify)?;
    let mut seen: HashSet<String> = seen.into_iter().map(|(k,)| k).collect();
    let mut fresh = Vec::with_capacity(steps.len());
    let mut keys = Vec::new();
    for step in steps {
        match key_of(step) {
            Some(key) if seen.contains(&key) => {}
            Some(key) => {
                seen.insert(key.clone());
                keys.push(key);
                fresh.push(*step);
            }
            None => fresh.push(*step),
        }
    }
    Ok((fresh, keys))
}

/// Runs a plan's groups in order, one statement each.
async fn execute_all(
    conn: &mut sqlx::PgConnection,
    spec: &SqlSink,
    groups: &[Group],
) -> Result<(), SinkError> {
    for group in groups {
        execute(conn, spec, group).await?;
    }
    Ok(())
}

/// Runs one group as one statement.
async fn execute(
    conn: &mut sqlx::PgConnection,
    spec: &SqlSink,
    group: &Group,
) -> Result<(), SinkError> {
    let Some(sql) = statement(spec, group) else {
        return Ok(());
    };
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for i in 0..group.columns.len() {
        let column: Vec<Option<&str>> = group.rows.iter().map(|row| row[i].as_deref()).collect();
        query = query.bind(column);
    }
    query.execute(conn).await.map_err(classify)?;
    Ok(())
}

/// The SQL of one group; `None` when there is nothing to do (an update of key columns only).
/// Identifiers come from the validated spec and are quoted; values are bound as text arrays
/// and cast by PostgreSQL.
pub fn statement(spec: &SqlSink, group: &Group) -> Option<String> {
    let table = spec
        .table
        .split('.')
        .map(quote)
        .collect::<Vec<_>>()
        .join(".");
    let is_key = |name: &str| spec.key_columns.iter().any(|k| k == name);
    let unnest = {
        let params: Vec<String> = (1..=group.columns.len())
            .map(|i| format!("${i}::text[]"))
            .collect();
        let aliases: Vec<String> = (0..group.columns.len()).map(|i| format!("c{i}")).collect();
        format!("UNNEST({}) AS u({})", params.join(", "), aliases.join(", "))
    };
    let cast = |i: usize, t: ColumnType| format!("u.c{i}::{}", sql_type(t));
    let names = || {
        group
            .columns
            .iter()
            .map(|(n, _)| quote(n))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let casts = || {
        group
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, t))| cast(i, *t))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let key_match = || {
        group
            .columns
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| is_key(n))
            .map(|(i, (n, t))| format!("t.{} = {}", quote(n), cast(i, *t)))
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    let mut sql = String::new();
    match group.action {
        Action::Insert => {
            let _ = write!(
                sql,
                "INSERT INTO {table} ({}) SELECT {} FROM {unnest}",
                names(),
                casts()
            );
        }
        Action::Upsert => {
            let updates: Vec<String> = group
                .columns
                .iter()
                .filter(|(n, _)| !is_key(n))
                .map(|(n, _)| format!("{0} = EXCLUDED.{0}", quote(n)))
                .collect();
            let keys: Vec<String> = spec.key_columns.iter().map(|k| quote(k)).collect();
            let _ = write!(
                sql,
                "INSERT INTO {table} ({}) SELECT {} FROM {unnest} ON CONFLICT ({}) DO ",
                names(),
                casts(),
                keys.join(", ")
            );
            if updates.is_empty() {
                sql.push_str("NOTHING");
            } else {
                let _ = write!(sql, "UPDATE SET {}", updates.join(", "));
            }
        }
        Action::Update => {
            let sets: Vec<String> = group
                .columns
                .iter()
                .enumerate()
                .filter(|(_, (n, _))| !is_key(n))
                .map(|(i, (n, t))| format!("{} = {}", quote(n), cast(i, *t)))
                .collect();
            if sets.is_empty() {
                return None;
            }
            let _ = write!(
                sql,
                "UPDATE {table} AS t SET {} FROM {unnest} WHERE {}",
                sets.join(", "),
                key_match()
            );
        }
        Action::Delete => {
            let _ = write!(
                sql,
                "DELETE FROM {table} AS t USING {unnest} WHERE {}",
                key_match()
            );
        }
    }
    Some(sql)
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn sql_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Text => "text",
        ColumnType::Integer => "integer",
        ColumnType::Bigint => "bigint",
        ColumnType::Numeric => "numeric",
        ColumnType::Boolean => "boolean",
        ColumnType::Timestamptz => "timestamptz",
        ColumnType::Jsonb => "jsonb",
        ColumnType::Uuid => "uuid",
    }
}

/// Classifies a database error by its SQLSTATE class.
pub fn classify(error: sqlx::Error) -> SinkError {
    let class = match &error {
        sqlx::Error::Database(db) => match db.code().as_deref().map(|c| c.get(..2).unwrap_or(c)) {
            // data exception, integrity constraint violation: this record is refused
            Some("22" | "23") => ErrorClass::Permanent,
            // undefined table/column, syntax, privileges: the spec does not fit the schema
            Some("42") => ErrorClass::Fatal,
            // connection exception, operator intervention, insufficient resources
            Some("08" | "57" | "53") => ErrorClass::Unavailable,
            // serialization failure, deadlock
            _ => ErrorClass::Transient,
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
        message: redact(&error.to_string()),
    }
}

/// Removes a password from any URL in a message.
fn redact(message: &str) -> String {
    message
        .split(' ')
        .map(|word| match (word.find("://"), word.find('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let credentials = &word[scheme + 3..at];
                match credentials.split_once(':') {
                    Some((user, _)) => format!("{}{user}:***{}", &word[..scheme + 3], &word[at..]),
                    None => word.to_owned(),
                }
            }
            _ => word.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_crds::Column;

    fn spec() -> SqlSink {
        SqlSink {
            table: "app.todos".into(),
            mode: WriteMode::Upsert,
            key_columns: vec!["id".into()],
            columns: vec![],
            ..SqlSink::default()
        }
    }

    fn group(action: Action, columns: &[(&str, ColumnType)]) -> Group {
        Group {
            action,
            columns: columns.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
            rows: vec![],
            sources: vec![],
        }
    }

    #[test]
    fn upsert_statement_uses_unnest_and_on_conflict() {
        let sql = statement(
            &spec(),
            &group(
                Action::Upsert,
                &[("id", ColumnType::Uuid), ("title", ColumnType::Text)],
            ),
        );
        assert_eq!(
            sql.as_deref(),
            Some(
                "INSERT INTO \"app\".\"todos\" (\"id\", \"title\") SELECT u.c0::uuid, u.c1::text FROM UNNEST($1::text[], $2::text[]) AS u(c0, c1) ON CONFLICT (\"id\") DO UPDATE SET \"title\" = EXCLUDED.\"title\""
            )
        );
    }

    #[test]
    fn update_and_delete_match_on_key_columns() {
        let update = statement(
            &spec(),
            &group(
                Action::Update,
                &[("id", ColumnType::Bigint), ("done", ColumnType::Boolean)],
            ),
        );
        assert_eq!(
            update.as_deref(),
            Some(
                "UPDATE \"app\".\"todos\" AS t SET \"done\" = u.c1::boolean FROM UNNEST($1::text[], $2::text[]) AS u(c0, c1) WHERE t.\"id\" = u.c0::bigint"
            )
        );
        let delete = statement(
            &spec(),
            &group(Action::Delete, &[("id", ColumnType::Bigint)]),
        );
        assert_eq!(
            delete.as_deref(),
            Some(
                "DELETE FROM \"app\".\"todos\" AS t USING UNNEST($1::text[]) AS u(c0) WHERE t.\"id\" = u.c0::bigint"
            )
        );
        assert_eq!(
            statement(
                &spec(),
                &group(Action::Update, &[("id", ColumnType::Bigint)])
            ),
            None
        );
    }

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact("cannot reach postgres://app:s3cret@db:5432/x now"),
            "cannot reach postgres://app:***@db:5432/x now"
        );
        let _ = Column::default();
    }
}
