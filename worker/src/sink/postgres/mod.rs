//! The PostgreSQL sink: the SQL table sink over PostgreSQL. One transaction per shard of a
//! batch (see `sql::write`; per batch with exactly-once), one UNNEST statement per group of
//! rows (see `sql::plan`), idempotency keys written in the same transaction as the rows.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use weir_crds::{ColumnType, SqlSink};

use super::SinkError;
use super::redact;
use super::sql::plan::{Action, Group, Step, plan};
use super::sql::values::{convert, parse_bool, parse_int};
use super::sql::{
    Applied, CONNECTIONS, Claim, CommitParts, Committing, Dialect, Idempotency, ReplayPlan,
    ReplayStatements, SqlTable, commit_in, quote, quote_table, replay_in,
};
use crate::commit::CommitError;
use crate::retry::ErrorClass;

/// Builds the sink; the connection is made on first use, so an unreachable database is
/// retried by the engine rather than failing the start.
pub fn build(
    spec: &SqlSink,
    url: &str,
    idempotency: Option<Idempotency>,
) -> Result<SqlTable<Postgres>, String> {
    let pool = PgPoolOptions::new()
        .max_connections(CONNECTIONS)
        // No ping before each batch: a broken connection fails the statement, which is
        // retried like any outage.
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(url)
        .map_err(|e| format!("invalid PostgreSQL URL: {}", redact(&e.to_string())))?;
    SqlTable::new(spec.clone(), idempotency, Postgres { pool })
}

/// PostgreSQL as a SQL dialect.
#[derive(Debug)]
pub struct Postgres {
    pool: PgPool,
}

/// A replay in PostgreSQL: TRUNCATE, which it runs inside the transaction (undone by a
/// rollback).
const REPLAY: ReplayStatements = ReplayStatements {
    create: "CREATE TABLE IF NOT EXISTS weir_replays (
        consumer_group text NOT NULL,
        sink_table text NOT NULL,
        token text NOT NULL,
        truncated boolean NOT NULL,
        applied_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer_group, sink_table, token))",
    record: "INSERT INTO weir_replays (consumer_group, sink_table, token, truncated)
        VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    empty: "TRUNCATE TABLE ",
    forget_keys: "DELETE FROM weir_idempotency WHERE scope = $1",
    forget_offsets: Some(
        "UPDATE weir_offsets SET next_offset = NULL, generation = generation + 1, updated_at = now()
         WHERE consumer_group = $1",
    ),
};

impl Dialect for Postgres {
    async fn create_idempotency_table(&self) -> Result<(), SinkError> {
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
        Ok(())
    }

    async fn expire_keys(&self, idempotency: &Idempotency) -> Result<(), SinkError> {
        sqlx::query(
            "DELETE FROM weir_idempotency WHERE scope = $1 AND applied_at < now() - make_interval(secs => $2)",
        )
        .bind(&idempotency.scope)
        .bind(idempotency.window.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    /// A plan of one statement without idempotency needs no explicit transaction (a
    /// statement is atomic), which saves two round trips per batch.
    async fn transaction(
        &self,
        spec: &SqlSink,
        idempotency: Option<&Idempotency>,
        steps: &[Step<'_>],
    ) -> Result<Applied, SinkError> {
        let Some(idempotency) = idempotency else {
            let plan = plan(spec, steps);
            let stale = if plan.groups.len() <= 1 {
                let mut conn = self.pool.acquire().await.map_err(classify)?;
                execute_all(&mut conn, spec, &plan.groups).await?
            } else {
                let mut tx = self.pool.begin().await.map_err(classify)?;
                let stale = execute_all(&mut tx, spec, &plan.groups).await?;
                tx.commit().await.map_err(classify)?;
                stale
            };
            return Ok(Applied::new(plan.rejected, plan.stale + stale));
        };
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let applied = apply(&mut tx, spec, Some(idempotency), steps).await?;
        tx.commit().await.map_err(classify)?;
        Ok(applied)
    }

    fn connections(&self) -> usize {
        CONNECTIONS as usize
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    /// TRUNCATE, which PostgreSQL runs inside the transaction (undone by a rollback).
    async fn replay(&self, plan: &ReplayPlan<'_>) -> Result<bool, SinkError> {
        replay_in(
            &self.pool,
            &REPLAY,
            &quote_table(plan.table),
            plan,
            classify,
        )
        .await
    }

    fn keeps_offsets(&self) -> bool {
        true
    }

    async fn create_offsets_table(&self) -> Result<(), SinkError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS weir_offsets (
                consumer_group text NOT NULL,
                topic text NOT NULL,
                partition integer NOT NULL,
                next_offset bigint,
                generation bigint NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (consumer_group, topic, partition))",
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn claim(
        &self,
        group: &str,
        partitions: &[(String, i32)],
    ) -> Result<Vec<Claim>, SinkError> {
        let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        // A previous owner's transaction still open on a row makes this wait for it: it
        // either commits under its generation (before this claim) or not at all.
        let rows: Vec<(String, i32, Option<i64>, i64)> = sqlx::query_as(
            "INSERT INTO weir_offsets AS o (consumer_group, topic, partition, next_offset, generation)
             SELECT $1, u.t, u.p, NULL, 1 FROM UNNEST($2::text[], $3::integer[]) AS u(t, p)
             ON CONFLICT (consumer_group, topic, partition)
             DO UPDATE SET generation = o.generation + 1, updated_at = now()
             RETURNING topic, partition, next_offset, generation",
        )
        .bind(group)
        .bind(&topics)
        .bind(&numbers)
        .fetch_all(&self.pool)
        .await
        .map_err(classify)?;
        let claimed: HashMap<(String, i32), Claim> = rows
            .into_iter()
            .map(|(t, p, next, generation)| ((t, p), Claim { generation, next }))
            .collect();
        Ok(partitions
            .iter()
            .filter_map(|p| claimed.get(p).copied())
            .collect())
    }

    async fn transaction_committing(
        &self,
        spec: &SqlSink,
        idempotency: Option<&Idempotency>,
        steps: &[Step<'_>],
        commit: Committing<'_>,
    ) -> Result<Applied, CommitError> {
        let tx = self.pool.begin().await.map_err(classify)?;
        commit_in(tx, &Parts { spec, idempotency }, steps, commit, classify).await
    }
}

/// PostgreSQL's parts of an exactly-once transaction ([`commit_in`]).
struct Parts<'a> {
    spec: &'a SqlSink,
    idempotency: Option<&'a Idempotency>,
}

impl CommitParts<sqlx::Postgres> for Parts<'_> {
    fn apply<'c>(
        &'c self,
        conn: &'c mut sqlx::PgConnection,
        steps: &'c [Step<'c>],
    ) -> impl Future<Output = Result<Applied, SinkError>> + Send + 'c {
        apply(conn, self.spec, self.idempotency, steps)
    }

    /// One statement for every partition of the batch.
    async fn move_offsets(
        &self,
        conn: &mut sqlx::PgConnection,
        commit: &Committing<'_>,
    ) -> Result<(), CommitError> {
        let topics: Vec<&str> = commit.moves.iter().map(|m| m.topic.as_str()).collect();
        let numbers: Vec<i32> = commit.moves.iter().map(|m| m.partition).collect();
        let next: Vec<i64> = commit.moves.iter().map(|m| m.next).collect();
        let generations: Vec<i64> = commit.moves.iter().map(|m| m.generation).collect();
        let expected: Vec<Option<i64>> = commit.moves.iter().map(|m| m.expected).collect();
        let moved = sqlx::query(
            "UPDATE weir_offsets AS o SET next_offset = u.n, updated_at = now()
             FROM UNNEST($2::text[], $3::integer[], $4::bigint[], $5::bigint[], $6::bigint[]) AS u(t, p, n, g, e)
             WHERE o.consumer_group = $1 AND o.topic = u.t AND o.partition = u.p
               AND o.generation = u.g AND o.next_offset IS NOT DISTINCT FROM u.e",
        )
        .bind(commit.group)
        .bind(&topics)
        .bind(&numbers)
        .bind(&next)
        .bind(&generations)
        .bind(&expected)
        .execute(conn)
        .await
        .map_err(classify)?
        .rows_affected();
        if moved != commit.moves.len() as u64 {
            return Err(CommitError::Fenced(format!(
                "{} of the batch's {} partitions were claimed by another worker since this one took them",
                commit.moves.len() as u64 - moved,
                commit.moves.len()
            )));
        }
        Ok(())
    }
}

/// Applies steps on a connection inside a transaction: with idempotency, skips the steps
/// whose key was applied within the window and records the new keys.
async fn apply(
    conn: &mut sqlx::PgConnection,
    spec: &SqlSink,
    idempotency: Option<&Idempotency>,
    steps: &[Step<'_>],
) -> Result<Applied, SinkError> {
    let Some(idempotency) = idempotency else {
        let plan = plan(spec, steps);
        let stale = execute_all(conn, spec, &plan.groups).await?;
        return Ok(Applied::new(plan.rejected, plan.stale + stale));
    };
    let keys = idempotency.keys_of(steps);
    let candidates: Vec<&str> = keys.iter().flatten().map(String::as_str).collect();
    let seen: Vec<String> = sqlx::query_scalar(
        "SELECT key FROM weir_idempotency
         WHERE scope = $1 AND key = ANY($2) AND applied_at > now() - make_interval(secs => $3)",
    )
    .bind(&idempotency.scope)
    .bind(&candidates)
    .bind(idempotency.window.as_secs_f64())
    .fetch_all(&mut *conn)
    .await
    .map_err(classify)?;
    let fresh = Idempotency::fresh(steps, keys, seen);
    let plan = plan(spec, &fresh.steps);
    let stale = execute_all(conn, spec, &plan.groups).await?;
    if !fresh.keys.is_empty() {
        sqlx::query(
            "INSERT INTO weir_idempotency (scope, key)
             SELECT $1, k FROM UNNEST($2::text[]) AS k
             ON CONFLICT (scope, key) DO UPDATE SET applied_at = now()",
        )
        .bind(&idempotency.scope)
        .bind(&fresh.keys)
        .execute(&mut *conn)
        .await
        .map_err(classify)?;
    }
    Ok(Applied::new(
        plan.rejected,
        fresh.duplicates + plan.stale + stale,
    ))
}

/// Runs a plan's groups in order, one statement each; returns how many rows the
/// stale-write guard held back (see [`guarded`]).
async fn execute_all(
    conn: &mut sqlx::PgConnection,
    spec: &SqlSink,
    groups: &[Group<'_>],
) -> Result<usize, SinkError> {
    let mut stale = 0;
    for group in groups {
        let affected = execute(conn, spec, group).await?;
        if guarded(spec, group) {
            stale += group.rows.len().saturating_sub(affected as usize);
        }
    }
    Ok(stale)
}

/// Whether a group's statement carries the stale-write guard: every row it does not
/// write was held back (or, for an update, had no row to update).
pub fn guarded(spec: &SqlSink, group: &Group<'_>) -> bool {
    spec.guard.is_some() && matches!(group.action, Action::Upsert | Action::Update)
}

/// Runs one group as one statement; returns the rows it wrote.
async fn execute(
    conn: &mut sqlx::PgConnection,
    spec: &SqlSink,
    group: &Group<'_>,
) -> Result<u64, SinkError> {
    let Some(sql) = statement(spec, group) else {
        return Ok(0);
    };
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (i, (name, type_)) in group.columns.iter().enumerate() {
        let texts = group.rows.iter().map(|row| row[i].as_deref());
        query = match binary_type(*type_) {
            // Integers and booleans travel in binary: PostgreSQL parses nothing.
            Some("bigint[]") => query.bind(parse_all(name, texts, "an integer", parse_int::<i64>)?),
            Some("integer[]") => {
                query.bind(parse_all(name, texts, "an integer", parse_int::<i32>)?)
            }
            Some(_) => query.bind(parse_all(name, texts, "a boolean", parse_bool)?),
            None => query.bind(texts.collect::<Vec<Option<&str>>>()),
        };
    }
    Ok(query.execute(conn).await.map_err(classify)?.rows_affected())
}

/// The array type a column is bound as when it is not text: the types whose binary form
/// is cheaper for PostgreSQL than parsing text.
fn binary_type(t: ColumnType) -> Option<&'static str> {
    match t {
        ColumnType::Bigint => Some("bigint[]"),
        ColumnType::Integer => Some("integer[]"),
        ColumnType::Boolean => Some("boolean[]"),
        _ => None,
    }
}

/// Converts a column's text values; one that does not convert fails the statement as
/// PostgreSQL would (a permanent error: the batch is split until it stands alone).
fn parse_all<'a, T>(
    column: &str,
    values: impl Iterator<Item = Option<&'a str>>,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<Option<T>>, SinkError> {
    values
        .map(|value| {
            value
                .map(|text| convert(column, text, what, &parse))
                .transpose()
        })
        .collect()
}

/// The SQL of one group; `None` when there is nothing to do (an update of key columns only).
/// Identifiers come from the validated spec and are quoted; integers and booleans are bound
/// as typed arrays, other values as text arrays cast by PostgreSQL.
pub fn statement(spec: &SqlSink, group: &Group<'_>) -> Option<String> {
    let table = quote_table(&spec.table);
    let is_key = |name: &str| spec.key_columns.iter().any(|k| k == name);
    let unnest = {
        let params: Vec<String> = group
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, t))| format!("${}::{}", i + 1, binary_type(*t).unwrap_or("text[]")))
            .collect();
        let aliases: Vec<String> = (0..group.columns.len()).map(|i| format!("c{i}")).collect();
        format!("UNNEST({}) AS u({})", params.join(", "), aliases.join(", "))
    };
    let cast = |i: usize, t: ColumnType| match binary_type(t) {
        Some(_) => format!("u.c{i}"),
        None => format!("u.c{i}::{}", sql_type(t)),
    };
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
    // The stale-write guard: the stored row is older than the event's, or has no version.
    let guard = |newer: &dyn Fn(usize, ColumnType) -> String| {
        let column = &spec.guard.as_ref()?.column;
        let (i, (_, t)) = group
            .columns
            .iter()
            .enumerate()
            .find(|(_, (n, _))| n == column)?;
        Some(format!(
            "(t.{0} IS NULL OR t.{0} < {1})",
            quote(column),
            newer(i, *t)
        ))
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
                "INSERT INTO {table} AS t ({}) SELECT {} FROM {unnest} ON CONFLICT ({}) DO ",
                names(),
                casts(),
                keys.join(", ")
            );
            if updates.is_empty() {
                sql.push_str("NOTHING");
            } else {
                let _ = write!(sql, "UPDATE SET {}", updates.join(", "));
                if let Some(guard) = guard(&|_, _| {
                    format!(
                        "EXCLUDED.{}",
                        quote(spec.guard.as_ref().map_or("", |g| &g.column))
                    )
                }) {
                    let _ = write!(sql, " WHERE {guard}");
                }
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
            if let Some(guard) = guard(&|i, t| cast(i, t)) {
                let _ = write!(sql, " AND {guard}");
            }
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
    super::sql::classify(error, |code| match code.get(..2).unwrap_or(code) {
        // data exception, integrity constraint violation: this record is refused
        "22" | "23" => ErrorClass::Permanent,
        // undefined table/column, syntax, privileges: the spec does not fit the schema
        "42" => ErrorClass::Fatal,
        // connection exception, operator intervention, insufficient resources
        "08" | "57" | "53" => ErrorClass::Unavailable,
        // serialization failure, deadlock
        _ => ErrorClass::Transient,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_crds::WriteMode;

    fn spec() -> SqlSink {
        SqlSink {
            table: "app.todos".into(),
            mode: WriteMode::Upsert,
            key_columns: vec!["id".into()],
            columns: vec![],
            ..SqlSink::default()
        }
    }

    fn group(action: Action, columns: &[(&str, ColumnType)]) -> Group<'static> {
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
                "INSERT INTO \"app\".\"todos\" AS t (\"id\", \"title\") SELECT u.c0::uuid, u.c1::text FROM UNNEST($1::text[], $2::text[]) AS u(c0, c1) ON CONFLICT (\"id\") DO UPDATE SET \"title\" = EXCLUDED.\"title\""
            )
        );
    }

    #[test]
    fn guarded_upserts_and_updates_write_only_newer_versions() {
        let spec = SqlSink {
            guard: Some(weir_crds::Guard {
                column: "version".into(),
            }),
            ..spec()
        };
        let columns = [("id", ColumnType::Bigint), ("version", ColumnType::Bigint)];
        assert_eq!(
            statement(&spec, &group(Action::Upsert, &columns)).as_deref(),
            Some(
                "INSERT INTO \"app\".\"todos\" AS t (\"id\", \"version\") SELECT u.c0, u.c1 FROM UNNEST($1::bigint[], $2::bigint[]) AS u(c0, c1) ON CONFLICT (\"id\") DO UPDATE SET \"version\" = EXCLUDED.\"version\" WHERE (t.\"version\" IS NULL OR t.\"version\" < EXCLUDED.\"version\")"
            )
        );
        assert_eq!(
            statement(&spec, &group(Action::Update, &columns)).as_deref(),
            Some(
                "UPDATE \"app\".\"todos\" AS t SET \"version\" = u.c1 FROM UNNEST($1::bigint[], $2::bigint[]) AS u(c0, c1) WHERE t.\"id\" = u.c0 AND (t.\"version\" IS NULL OR t.\"version\" < u.c1)"
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
                "UPDATE \"app\".\"todos\" AS t SET \"done\" = u.c1 FROM UNNEST($1::bigint[], $2::boolean[]) AS u(c0, c1) WHERE t.\"id\" = u.c0"
            )
        );
        let delete = statement(
            &spec(),
            &group(Action::Delete, &[("id", ColumnType::Bigint)]),
        );
        assert_eq!(
            delete.as_deref(),
            Some(
                "DELETE FROM \"app\".\"todos\" AS t USING UNNEST($1::bigint[]) AS u(c0) WHERE t.\"id\" = u.c0"
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
}
