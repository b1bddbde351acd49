//! The SQLite sink: the PostgreSQL sink's modes and rules over a database file, for local
//! and edge use. One transaction per batch; within it, one prepared statement per group
//! of the plan (see `sql::plan`), run once per row: SQLite runs in-process, so a row costs
//! no round trip. Idempotency keys are written in the same transaction as the rows.

use std::str::FromStr as _;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Sqlite, SqliteConnection};
use weir_crds::{ColumnType, SqlSink};

use super::SinkError;
use super::redact;
use super::sql::plan::{Action, Group, Step, plan};
use super::sql::values::{convert, parse_bool, parse_int, parse_uuid};
use super::sql::{
    Applied, Dialect, Fresh, Idempotency, ReplayPlan, ReplayStatements, SqlTable, quote,
    quote_table, replay_in,
};
use crate::retry::ErrorClass;

/// Builds the sink for `url` (`sqlite:///abs/path.db`, `sqlite://rel/path.db` or
/// `sqlite::memory:`); the file is created when missing, on first use.
pub fn build(
    spec: &SqlSink,
    url: &str,
    idempotency: Option<Idempotency>,
) -> Result<SqlTable<Sqlite3>, String> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|e| format!("invalid SQLite URL {url:?}: {}", redact(&e.to_string())))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(5));
    // One connection: SQLite has one writer at a time, and an in-memory database exists
    // only on the connection that made it.
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_lazy_with(options);
    SqlTable::new(spec.clone(), idempotency, Sqlite3 { pool })
}

/// SQLite as a SQL dialect.
#[derive(Debug)]
pub struct Sqlite3 {
    pool: SqlitePool,
}

/// A replay in SQLite: DELETE (SQLite has no TRUNCATE); it keeps no offsets.
const REPLAY: ReplayStatements = ReplayStatements {
    create: "CREATE TABLE IF NOT EXISTS weir_replays (
        consumer_group TEXT NOT NULL,
        sink_table TEXT NOT NULL,
        token TEXT NOT NULL,
        truncated INTEGER NOT NULL,
        applied_at INTEGER NOT NULL,
        PRIMARY KEY (consumer_group, sink_table, token))",
    record: "INSERT INTO weir_replays (consumer_group, sink_table, token, truncated, applied_at)
        VALUES (?1, ?2, ?3, ?4, unixepoch()) ON CONFLICT DO NOTHING",
    empty: "DELETE FROM ",
    forget_keys: "DELETE FROM weir_idempotency WHERE scope = ?1",
    forget_offsets: None,
};

impl Dialect for Sqlite3 {
    async fn create_idempotency_table(&self) -> Result<(), SinkError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS weir_idempotency (
                scope TEXT NOT NULL,
                key TEXT NOT NULL,
                applied_at INTEGER NOT NULL,
                PRIMARY KEY (scope, key))",
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn expire_keys(&self, idempotency: &Idempotency) -> Result<(), SinkError> {
        sqlx::query(
            "DELETE FROM weir_idempotency WHERE scope = ?1 AND applied_at < unixepoch() - ?2",
        )
        .bind(&idempotency.scope)
        .bind(idempotency.window.as_secs() as i64)
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn transaction(
        &self,
        spec: &SqlSink,
        idempotency: Option<&Idempotency>,
        steps: &[Step<'_>],
    ) -> Result<Applied, SinkError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let fresh = match idempotency {
            None => Fresh {
                steps: steps.to_vec(),
                keys: Vec::new(),
                duplicates: 0,
            },
            Some(idempotency) => {
                let keys = idempotency.keys_of(steps);
                let candidates: Vec<&str> = keys.iter().flatten().map(String::as_str).collect();
                let seen: Vec<String> = sqlx::query_scalar(
                    "SELECT key FROM weir_idempotency
                     WHERE scope = ?1 AND key IN (SELECT value FROM json_each(?2))
                       AND applied_at > unixepoch() - ?3",
                )
                .bind(&idempotency.scope)
                .bind(serde_json::Value::from(candidates).to_string())
                .bind(idempotency.window.as_secs() as i64)
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?;
                Idempotency::fresh(steps, keys, seen)
            }
        };
        let plan = plan(spec, &fresh.steps);
        let mut stale = plan.stale;
        for group in &plan.groups {
            stale += execute(&mut tx, spec, group).await?;
        }
        if let (Some(idempotency), false) = (idempotency, fresh.keys.is_empty()) {
            sqlx::query(
                "INSERT INTO weir_idempotency (scope, key, applied_at)
                 SELECT ?1, value, unixepoch() FROM json_each(?2) WHERE true
                 ON CONFLICT (scope, key) DO UPDATE SET applied_at = excluded.applied_at",
            )
            .bind(&idempotency.scope)
            .bind(serde_json::Value::from(fresh.keys).to_string())
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
        }
        tx.commit().await.map_err(classify)?;
        Ok(Applied::new(plan.rejected, fresh.duplicates + stale))
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    /// DELETE: SQLite has no TRUNCATE.
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
}

/// Runs one group's statement once per row; returns how many rows the stale-write guard
/// held back (for an update: or found no row to update).
async fn execute(
    conn: &mut SqliteConnection,
    spec: &SqlSink,
    group: &Group<'_>,
) -> Result<usize, SinkError> {
    let Some(sql) = statement(spec, group) else {
        return Ok(0);
    };
    let guarded = spec.guard.is_some() && matches!(group.action, Action::Upsert | Action::Update);
    let mut stale = 0;
    for row in &group.rows {
        let mut query = sqlx::query::<Sqlite>(sqlx::AssertSqlSafe(sql.clone()));
        for ((name, type_), value) in group.columns.iter().zip(row) {
            let value = value.as_deref();
            query = match type_ {
                ColumnType::Integer | ColumnType::Bigint => query.bind(
                    value
                        .map(|v| convert(name, v, "an integer", parse_int::<i64>))
                        .transpose()?,
                ),
                ColumnType::Boolean => query.bind(
                    value
                        .map(|v| convert(name, v, "a boolean", parse_bool))
                        .transpose()?,
                ),
                ColumnType::Uuid => query.bind(
                    value
                        .map(|v| convert(name, v, "a UUID", parse_uuid))
                        .transpose()?,
                ),
                ColumnType::Text
                | ColumnType::Numeric
                | ColumnType::Timestamptz
                | ColumnType::Jsonb => query.bind(value.map(str::to_owned)),
            };
        }
        let written = query.execute(&mut *conn).await.map_err(classify)?;
        if guarded && written.rows_affected() == 0 {
            stale += 1;
        }
    }
    Ok(stale)
}

/// The SQL of one group for one row, parameters `?1..` in the group's column order;
/// `None` when there is nothing to do (an update of key columns only).
pub fn statement(spec: &SqlSink, group: &Group<'_>) -> Option<String> {
    let table = quote_table(&spec.table);
    let is_key = |name: &str| spec.key_columns.iter().any(|k| k == name);
    let params = |keys: bool| -> Vec<String> {
        group
            .columns
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| is_key(n) == keys)
            .map(|(i, (n, _))| format!("{} = ?{}", quote(n), i + 1))
            .collect()
    };
    // The stale-write guard: the stored row is older than the event's, or has no version.
    // `bound`: the event's version is the statement's parameter, else `excluded`'s.
    let guard = |bound: bool| {
        let column = &spec.guard.as_ref()?.column;
        let i = group.columns.iter().position(|(n, _)| n == column)?;
        let newer = if bound {
            format!("?{}", i + 1)
        } else {
            format!("excluded.{}", quote(column))
        };
        Some(format!(
            "({table}.{0} IS NULL OR {table}.{0} < {newer})",
            quote(column)
        ))
    };
    let names: Vec<String> = group.columns.iter().map(|(n, _)| quote(n)).collect();
    let values: Vec<String> = (1..=group.columns.len()).map(|i| format!("?{i}")).collect();
    let insert = format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        names.join(", "),
        values.join(", ")
    );
    match group.action {
        Action::Insert => Some(insert),
        Action::Upsert => {
            let keys: Vec<String> = spec.key_columns.iter().map(|k| quote(k)).collect();
            let updates: Vec<String> = group
                .columns
                .iter()
                .filter(|(n, _)| !is_key(n))
                .map(|(n, _)| format!("{0} = excluded.{0}", quote(n)))
                .collect();
            Some(if updates.is_empty() {
                format!("{insert} ON CONFLICT ({}) DO NOTHING", keys.join(", "))
            } else {
                let mut sql = format!(
                    "{insert} ON CONFLICT ({}) DO UPDATE SET {}",
                    keys.join(", "),
                    updates.join(", ")
                );
                if let Some(guard) = guard(false) {
                    sql = format!("{sql} WHERE {guard}");
                }
                sql
            })
        }
        Action::Update => {
            let sets = params(false);
            (!sets.is_empty()).then(|| {
                let mut sql = format!(
                    "UPDATE {table} SET {} WHERE {}",
                    sets.join(", "),
                    params(true).join(" AND ")
                );
                if let Some(guard) = guard(true) {
                    sql = format!("{sql} AND {guard}");
                }
                sql
            })
        }
        Action::Delete => Some(format!(
            "DELETE FROM {table} WHERE {}",
            params(true).join(" AND ")
        )),
    }
}

/// Classifies a SQLite error by its primary result code.
pub fn classify(error: sqlx::Error) -> SinkError {
    super::sql::classify(error, |code| {
        match code.parse::<i64>().map(|c| c & 0xff) {
            // SQLITE_CONSTRAINT, SQLITE_MISMATCH, SQLITE_TOOBIG, SQLITE_RANGE: this record
            Ok(19 | 20 | 18 | 25) => ErrorClass::Permanent,
            // SQLITE_BUSY, SQLITE_LOCKED: another writer; try again
            Ok(5 | 6) => ErrorClass::Transient,
            // SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN: the disk
            Ok(10 | 13 | 14) => ErrorClass::Unavailable,
            // SQLITE_ERROR (no such table or column), SQLITE_READONLY, SQLITE_CORRUPT, …:
            // the spec does not fit the database
            _ => ErrorClass::Fatal,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_crds::WriteMode;

    fn group(action: Action, columns: &[(&str, ColumnType)]) -> Group<'static> {
        Group {
            action,
            columns: columns.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
            rows: vec![],
            sources: vec![],
        }
    }

    #[test]
    fn statements_bind_columns_by_position() {
        let spec = SqlSink {
            table: "todos".into(),
            mode: WriteMode::Rules,
            key_columns: vec!["id".into()],
            ..SqlSink::default()
        };
        let columns = [("id", ColumnType::Uuid), ("title", ColumnType::Text)];
        assert_eq!(
            statement(&spec, &group(Action::Upsert, &columns)).as_deref(),
            Some(
                "INSERT INTO \"todos\" (\"id\", \"title\") VALUES (?1, ?2) ON CONFLICT (\"id\") DO UPDATE SET \"title\" = excluded.\"title\""
            )
        );
        assert_eq!(
            statement(&spec, &group(Action::Update, &columns)).as_deref(),
            Some("UPDATE \"todos\" SET \"title\" = ?2 WHERE \"id\" = ?1")
        );
        assert_eq!(
            statement(&spec, &group(Action::Delete, &columns[..1])).as_deref(),
            Some("DELETE FROM \"todos\" WHERE \"id\" = ?1")
        );
        assert_eq!(
            statement(&spec, &group(Action::Update, &columns[..1])),
            None
        );
    }
}
