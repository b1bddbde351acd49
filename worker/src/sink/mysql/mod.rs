//! The MySQL sink (MySQL and MariaDB): the SQL table sink over MySQL's protocol. One
//! transaction per shard of a batch (see `sql::write`; per batch with exactly-once); each
//! group of the batch's plan (see `sql::plan`) runs as multi-row statements, each sized to
//! stay under the server's `max_allowed_packet`.
//! Idempotency keys, and with exactly-once the consumed offsets, are written in the same
//! transaction as the rows.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use sqlx::mysql::{MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::{MySql as Driver, MySqlConnection};
use weir_crds::{ColumnType, SqlSink};

use super::SinkError;
use super::redact;
use super::sql::plan::{Action, Group, Row, Step, plan};
use super::sql::values::{convert, parse_bool, parse_int, parse_timestamp, parse_uuid};
use super::sql::{
    Applied, CONNECTIONS, Claim, CommitParts, Committing, Dialect, Fresh, Idempotency, ReplayPlan,
    ReplayStatements, SqlTable, commit_in, replay_in,
};
use crate::commit::CommitError;
use crate::retry::ErrorClass;

/// MySQL's limit on the placeholders of one prepared statement.
const MAX_PARAMS: usize = 65_535;

/// Bytes assumed per bound value besides its own (type and length prefix, null bitmap).
const PER_VALUE: usize = 12;

/// Builds the sink for `url` (`mysql://` or `mariadb://`); the connection is made on first
/// use, so an unreachable database is retried by the engine rather than failing the start.
pub fn build(
    spec: &SqlSink,
    url: &str,
    idempotency: Option<Idempotency>,
) -> Result<SqlTable<MySql>, String> {
    let url = match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_owned(),
    };
    let pool = MySqlPoolOptions::new()
        .max_connections(CONNECTIONS)
        // No ping before each batch: a broken connection fails the statement, which is
        // retried like any outage.
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&url)
        .map_err(|e| format!("invalid MySQL URL: {}", redact(&e.to_string())))?;
    SqlTable::new(
        spec.clone(),
        idempotency,
        MySql {
            pool,
            max_packet: AtomicUsize::new(0),
        },
    )
}

/// MySQL (and MariaDB) as a SQL dialect.
#[derive(Debug)]
pub struct MySql {
    pool: MySqlPool,
    /// The server's `max_allowed_packet`, read on the first write (0 until then).
    max_packet: AtomicUsize,
}

impl MySql {
    /// The most bytes one statement may take: a margin under `max_allowed_packet`.
    async fn statement_budget(&self, conn: &mut MySqlConnection) -> Result<usize, SinkError> {
        let mut max = self.max_packet.load(Ordering::Relaxed);
        if max == 0 {
            let read: u64 = sqlx::query_scalar("SELECT @@max_allowed_packet")
                .fetch_one(&mut *conn)
                .await
                .map_err(classify)?;
            max = usize::try_from(read).unwrap_or(usize::MAX);
            self.max_packet.store(max, Ordering::Relaxed);
        }
        Ok(budget(max))
    }
}

/// Three quarters of `max_allowed_packet`, leaving room for the protocol's own bytes.
fn budget(max_allowed_packet: usize) -> usize {
    (max_allowed_packet / 4 * 3).max(1024)
}

/// A replay in MySQL: DELETE rather than TRUNCATE, which MySQL cannot run inside a
/// transaction (it commits implicitly).
const REPLAY: ReplayStatements = ReplayStatements {
    create: "CREATE TABLE IF NOT EXISTS weir_replays (
        consumer_group VARCHAR(255) NOT NULL,
        sink_table VARCHAR(255) NOT NULL,
        token VARCHAR(255) NOT NULL,
        truncated BOOLEAN NOT NULL,
        applied_at DATETIME(6) NOT NULL,
        PRIMARY KEY (consumer_group, sink_table, token))",
    record: "INSERT IGNORE INTO weir_replays (consumer_group, sink_table, token, truncated, applied_at)
        VALUES (?, ?, ?, ?, UTC_TIMESTAMP(6))",
    empty: "DELETE FROM ",
    forget_keys: "DELETE FROM weir_idempotency WHERE scope = ?",
    forget_offsets: Some(
        "UPDATE weir_offsets SET next_offset = NULL, generation = generation + 1, updated_at = UTC_TIMESTAMP(6)
         WHERE consumer_group = ?",
    ),
};

impl Dialect for MySql {
    async fn create_idempotency_table(&self) -> Result<(), SinkError> {
        // Keys are stored as their SHA-256, so a key of any length fits the primary key.
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS weir_idempotency (
                scope VARCHAR(255) NOT NULL,
                key_hash BINARY(32) NOT NULL,
                applied_at DATETIME(6) NOT NULL,
                PRIMARY KEY (scope, key_hash))",
        )
        .execute(&self.pool)
        .await
        .map_err(classify)?;
        Ok(())
    }

    async fn expire_keys(&self, idempotency: &Idempotency) -> Result<(), SinkError> {
        sqlx::query(
            "DELETE FROM weir_idempotency
             WHERE scope = ? AND applied_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND",
        )
        .bind(&idempotency.scope)
        .bind(window_micros(idempotency))
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
        let budget = self.statement_budget(&mut tx).await?;
        let applied = apply(&mut tx, spec, idempotency, steps, budget).await?;
        tx.commit().await.map_err(classify)?;
        Ok(applied)
    }

    fn connections(&self) -> usize {
        CONNECTIONS as usize
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    /// DELETE rather than TRUNCATE, which MySQL cannot run inside a transaction (it commits
    /// implicitly).
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
                consumer_group VARCHAR(255) NOT NULL,
                topic VARCHAR(255) NOT NULL,
                partition_id INT NOT NULL,
                next_offset BIGINT NULL,
                generation BIGINT NOT NULL,
                updated_at DATETIME(6) NOT NULL,
                PRIMARY KEY (consumer_group, topic, partition_id))",
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
        // One transaction: the rows stay locked from the raise to the read.
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let mut claimed = Vec::with_capacity(partitions.len());
        for (topic, partition) in partitions {
            sqlx::query(
                "INSERT INTO weir_offsets (consumer_group, topic, partition_id, next_offset, generation, updated_at)
                 VALUES (?, ?, ?, NULL, 1, UTC_TIMESTAMP(6))
                 ON DUPLICATE KEY UPDATE generation = generation + 1, updated_at = UTC_TIMESTAMP(6)",
            )
            .bind(group)
            .bind(topic)
            .bind(partition)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            let (next, generation): (Option<i64>, i64) = sqlx::query_as(
                "SELECT next_offset, generation FROM weir_offsets
                 WHERE consumer_group = ? AND topic = ? AND partition_id = ?",
            )
            .bind(group)
            .bind(topic)
            .bind(partition)
            .fetch_one(&mut *tx)
            .await
            .map_err(classify)?;
            claimed.push(Claim { generation, next });
        }
        tx.commit().await.map_err(classify)?;
        Ok(claimed)
    }

    async fn transaction_committing(
        &self,
        spec: &SqlSink,
        idempotency: Option<&Idempotency>,
        steps: &[Step<'_>],
        commit: Committing<'_>,
    ) -> Result<Applied, CommitError> {
        let mut tx = self.pool.begin().await.map_err(classify)?;
        let budget = self.statement_budget(&mut tx).await?;
        let parts = Parts {
            spec,
            idempotency,
            budget,
        };
        commit_in(tx, &parts, steps, commit, classify).await
    }
}

/// MySQL's parts of an exactly-once transaction ([`commit_in`]).
struct Parts<'a> {
    spec: &'a SqlSink,
    idempotency: Option<&'a Idempotency>,
    /// Bytes one statement may take.
    budget: usize,
}

impl CommitParts<Driver> for Parts<'_> {
    fn apply<'c>(
        &'c self,
        conn: &'c mut MySqlConnection,
        steps: &'c [Step<'c>],
    ) -> impl Future<Output = Result<Applied, SinkError>> + Send + 'c {
        apply(conn, self.spec, self.idempotency, steps, self.budget)
    }

    /// One statement per partition (MySQL has no UNNEST to join them to).
    async fn move_offsets(
        &self,
        conn: &mut MySqlConnection,
        commit: &Committing<'_>,
    ) -> Result<(), CommitError> {
        for m in commit.moves {
            let moved = sqlx::query(
                "UPDATE weir_offsets SET next_offset = ?, updated_at = UTC_TIMESTAMP(6)
                 WHERE consumer_group = ? AND topic = ? AND partition_id = ?
                   AND generation = ? AND next_offset <=> ?",
            )
            .bind(m.next)
            .bind(commit.group)
            .bind(&m.topic)
            .bind(m.partition)
            .bind(m.generation)
            .bind(m.expected)
            .execute(&mut *conn)
            .await
            .map_err(classify)?
            .rows_affected();
            if moved != 1 {
                return Err(CommitError::Fenced(format!(
                    "{}/{} was claimed by another worker since this one took it",
                    m.topic, m.partition
                )));
            }
        }
        Ok(())
    }
}

/// Applies steps inside a transaction: with idempotency, skips the steps whose key was
/// applied within the window and records the new keys.
async fn apply(
    conn: &mut MySqlConnection,
    spec: &SqlSink,
    idempotency: Option<&Idempotency>,
    steps: &[Step<'_>],
    budget: usize,
) -> Result<Applied, SinkError> {
    let fresh = match idempotency {
        None => Fresh {
            steps: steps.to_vec(),
            keys: Vec::new(),
            duplicates: 0,
        },
        Some(idempotency) => {
            let keys = idempotency.keys_of(steps);
            let seen = seen_keys(&mut *conn, idempotency, &keys).await?;
            Idempotency::fresh(steps, keys, seen)
        }
    };
    let plan = plan(spec, &fresh.steps);
    let mut stale = plan.stale;
    for group in &plan.groups {
        stale += execute(&mut *conn, spec, group, budget).await?;
    }
    if let Some(idempotency) = idempotency {
        record_keys(&mut *conn, idempotency, &fresh.keys).await?;
    }
    Ok(Applied::new(plan.rejected, fresh.duplicates + stale))
}

fn window_micros(idempotency: &Idempotency) -> i64 {
    i64::try_from(idempotency.window.as_micros()).unwrap_or(i64::MAX)
}

fn key_hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Keys per statement when asking about or recording idempotency keys.
const KEYS_PER_STATEMENT: usize = 5_000;

/// The keys among `keys` applied within the window.
async fn seen_keys(
    conn: &mut MySqlConnection,
    idempotency: &Idempotency,
    keys: &[Option<String>],
) -> Result<Vec<String>, SinkError> {
    let by_hash: std::collections::HashMap<Vec<u8>, &str> = keys
        .iter()
        .flatten()
        .map(|k| (key_hash(k), k.as_str()))
        .collect();
    let hashes: Vec<&Vec<u8>> = by_hash.keys().collect();
    let mut seen = Vec::new();
    for chunk in hashes.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "SELECT key_hash FROM weir_idempotency WHERE scope = ? AND key_hash IN ({})
             AND applied_at > UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND",
            placeholders(chunk.len())
        );
        let mut query = sqlx::query_scalar::<Driver, Vec<u8>>(sqlx::AssertSqlSafe(sql))
            .bind(&idempotency.scope);
        for hash in chunk {
            query = query.bind(hash.as_slice());
        }
        let found = query
            .bind(window_micros(idempotency))
            .fetch_all(&mut *conn)
            .await
            .map_err(classify)?;
        seen.extend(
            found
                .iter()
                .filter_map(|h| by_hash.get(h).map(|k| (*k).to_owned())),
        );
    }
    Ok(seen)
}

/// Records `keys` as applied now.
async fn record_keys(
    conn: &mut MySqlConnection,
    idempotency: &Idempotency,
    keys: &[String],
) -> Result<(), SinkError> {
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let rows = vec!["(?, ?, UTC_TIMESTAMP(6))"; chunk.len()].join(", ");
        let sql = format!(
            "INSERT INTO weir_idempotency (scope, key_hash, applied_at) VALUES {rows}
             ON DUPLICATE KEY UPDATE applied_at = VALUES(applied_at)"
        );
        let mut query = sqlx::query::<Driver>(sqlx::AssertSqlSafe(sql));
        for key in chunk {
            query = query.bind(&idempotency.scope).bind(key_hash(key));
        }
        query.execute(&mut *conn).await.map_err(classify)?;
    }
    Ok(())
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// One bound value, converted for its column before it reaches the server.
#[derive(Debug)]
enum Param {
    Int(Option<i64>),
    Bool(Option<bool>),
    Text(Option<String>),
}

impl Param {
    fn size(&self) -> usize {
        PER_VALUE
            + match self {
                Param::Int(_) | Param::Bool(_) => 8,
                Param::Text(t) => t.as_ref().map_or(0, String::len),
            }
    }
}

/// Converts one row's values; a value that does not fit its column refuses the
/// statement (a permanent error: the batch is split until it stands alone).
fn params(columns: &[(String, ColumnType)], row: &Row<'_>) -> Result<Vec<Param>, SinkError> {
    columns
        .iter()
        .zip(row)
        .map(|((name, type_), value)| {
            let value = value.as_deref();
            Ok(match type_ {
                ColumnType::Integer | ColumnType::Bigint => Param::Int(
                    value
                        .map(|v| convert(name, v, "an integer", parse_int::<i64>))
                        .transpose()?,
                ),
                ColumnType::Boolean => Param::Bool(
                    value
                        .map(|v| convert(name, v, "a boolean", parse_bool))
                        .transpose()?,
                ),
                ColumnType::Uuid => Param::Text(
                    value
                        .map(|v| convert(name, v, "a UUID", parse_uuid))
                        .transpose()?,
                ),
                // MySQL's DATETIME and TIMESTAMP take no zone: the instant in UTC (the
                // session's time zone, which the driver sets to +00:00).
                ColumnType::Timestamptz => Param::Text(
                    value
                        .map(|v| {
                            convert(name, v, "an RFC 3339 timestamp", parse_timestamp)
                                .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
                        })
                        .transpose()?,
                ),
                ColumnType::Text | ColumnType::Numeric | ColumnType::Jsonb => {
                    Param::Text(value.map(str::to_owned))
                }
            })
        })
        .collect()
}

/// Runs one group as multi-row statements of at most `budget` bytes each; returns how many
/// rows the stale-write guard held back (for an update: or found no row to update).
async fn execute(
    conn: &mut MySqlConnection,
    spec: &SqlSink,
    group: &Group<'_>,
    budget: usize,
) -> Result<usize, SinkError> {
    let guarded = spec.guard.is_some() && matches!(group.action, Action::Upsert | Action::Update);
    let rows = group
        .rows
        .iter()
        .map(|row| params(&group.columns, row))
        .collect::<Result<Vec<_>, _>>()?;
    let row_text = statement(spec, group, 1).map_or(0, |sql| sql.len());
    let mut stale = 0;
    let mut start = 0;
    while start < rows.len() {
        // As many rows as fit the budget and the placeholder limit; at least one.
        let mut end = start;
        let mut bytes = row_text;
        while end < rows.len() {
            let row_bytes: usize = rows[end].iter().map(Param::size).sum::<usize>() + row_text;
            let params = (end - start + 1) * group.columns.len();
            if end > start && (bytes + row_bytes > budget || params > MAX_PARAMS) {
                break;
            }
            bytes += row_bytes;
            end += 1;
        }
        let chunk = &rows[start..end];
        let Some(sql) = statement(spec, group, chunk.len()) else {
            return Ok(0);
        };
        if guarded && group.action == Action::Upsert {
            stale += count_newer(conn, spec, group, chunk).await?;
        }
        let mut query = sqlx::query::<Driver>(sqlx::AssertSqlSafe(sql));
        for row in chunk {
            for param in row {
                query = match param {
                    Param::Int(v) => query.bind(*v),
                    Param::Bool(v) => query.bind(*v),
                    Param::Text(v) => query.bind(v.as_deref()),
                };
            }
        }
        let affected = query.execute(&mut *conn).await.map_err(classify)?;
        if guarded && group.action == Action::Update {
            // The driver asks for matched rows (CLIENT_FOUND_ROWS): the guard's WHERE
            // leaves out the rows it holds back.
            stale += chunk
                .len()
                .saturating_sub(usize::try_from(affected.rows_affected()).unwrap_or(0));
        }
        start = end;
    }
    Ok(stale)
}

/// How many rows of `chunk` the guard will hold back in an upsert: stored rows whose
/// version is not older than the event's. Run in the upsert's transaction, just before it.
async fn count_newer(
    conn: &mut MySqlConnection,
    spec: &SqlSink,
    group: &Group<'_>,
    chunk: &[Vec<Param>],
) -> Result<usize, SinkError> {
    let Some(column) = spec.guard.as_ref().map(|g| &g.column) else {
        return Ok(0);
    };
    let table = quote_table(&spec.table);
    let sql = format!(
        "SELECT COUNT(*) FROM {table} AS t JOIN ({}) AS u ON {} WHERE t.{g} >= u.{g}",
        derived(&group.columns, chunk.len()),
        key_match(spec, &group.columns),
        g = quote(column),
    );
    let mut query = sqlx::query_scalar::<Driver, i64>(sqlx::AssertSqlSafe(sql));
    for row in chunk {
        for param in row {
            query = match param {
                Param::Int(v) => query.bind(*v),
                Param::Bool(v) => query.bind(*v),
                Param::Text(v) => query.bind(v.as_deref()),
            };
        }
    }
    let count = query.fetch_one(&mut *conn).await.map_err(classify)?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// A derived table of `rows` rows with the group's columns under their own names:
/// `SELECT ? AS a, ? AS b UNION ALL SELECT ?, ?`.
fn derived(columns: &[(String, ColumnType)], rows: usize) -> String {
    let first: Vec<String> = columns
        .iter()
        .map(|(n, _)| format!("? AS {}", quote(n)))
        .collect();
    let other = format!(" UNION ALL SELECT {}", placeholders(columns.len()));
    let mut sql = format!("SELECT {}", first.join(", "));
    for _ in 1..rows {
        sql.push_str(&other);
    }
    sql
}

/// `t.k = u.k AND …` over the key columns present in `columns`.
fn key_match(spec: &SqlSink, columns: &[(String, ColumnType)]) -> String {
    columns
        .iter()
        .filter(|(n, _)| spec.key_columns.contains(n))
        .map(|(n, _)| format!("t.{0} = u.{0}", quote(n)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The SQL of one group over `rows` rows, parameters in the group's column order row
/// after row; `None` when there is nothing to do (an update of key columns only).
/// Identifiers come from the validated spec and are quoted.
pub fn statement(spec: &SqlSink, group: &Group<'_>, rows: usize) -> Option<String> {
    let table = quote_table(&spec.table);
    let is_key = |name: &str| spec.key_columns.iter().any(|k| k == name);
    let guard = spec
        .guard
        .as_ref()
        .map(|g| &g.column)
        .filter(|g| group.columns.iter().any(|(n, _)| n == *g));
    let names: Vec<String> = group.columns.iter().map(|(n, _)| quote(n)).collect();
    let values = {
        let row = format!("({})", placeholders(group.columns.len()));
        vec![row; rows].join(", ")
    };
    let mut sql = String::new();
    match group.action {
        Action::Insert => {
            let _ = write!(
                sql,
                "INSERT INTO {table} ({}) VALUES {values}",
                names.join(", ")
            );
        }
        Action::Upsert => {
            let _ = write!(
                sql,
                "INSERT INTO {table} ({}) VALUES {values} ON DUPLICATE KEY UPDATE ",
                names.join(", ")
            );
            // With a guard, every column keeps its stored value unless the stored version
            // is older; the guard column itself is assigned last, since MySQL assigns
            // left to right and later expressions see the new values.
            let newer = guard.map(|g| format!("{0} IS NULL OR {0} < VALUES({0})", quote(g)));
            let mut updates: Vec<String> = group
                .columns
                .iter()
                .filter(|(n, _)| !is_key(n) && Some(n) != guard)
                .chain(group.columns.iter().filter(|(n, _)| Some(n) == guard))
                .map(|(n, _)| match &newer {
                    Some(newer) => format!("{0} = IF({newer}, VALUES({0}), {0})", quote(n)),
                    None => format!("{0} = VALUES({0})", quote(n)),
                })
                .collect();
            if updates.is_empty() {
                // Nothing but keys: an existing row stays as it is.
                let key = spec
                    .key_columns
                    .first()
                    .map_or_else(String::new, |k| quote(k));
                updates.push(format!("{key} = {key}"));
            }
            sql.push_str(&updates.join(", "));
        }
        Action::Update => {
            let sets: Vec<String> = group
                .columns
                .iter()
                .filter(|(n, _)| !is_key(n))
                .map(|(n, _)| format!("t.{0} = u.{0}", quote(n)))
                .collect();
            if sets.is_empty() {
                return None;
            }
            let _ = write!(
                sql,
                "UPDATE {table} AS t JOIN ({}) AS u ON {} SET {}",
                derived(&group.columns, rows),
                key_match(spec, &group.columns),
                sets.join(", ")
            );
            if let Some(g) = guard {
                let _ = write!(sql, " WHERE (t.{0} IS NULL OR t.{0} < u.{0})", quote(g));
            }
        }
        Action::Delete => {
            let _ = write!(
                sql,
                "DELETE t FROM {table} AS t JOIN ({}) AS u ON {}",
                derived(&group.columns, rows),
                key_match(spec, &group.columns)
            );
        }
    }
    Some(sql)
}

/// A table name (`name` or `database.name`) as a quoted MySQL identifier.
pub fn quote_table(table: &str) -> String {
    table.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// A quoted MySQL identifier.
pub fn quote(identifier: &str) -> String {
    format!("`{}`", identifier.replace('`', "``"))
}

/// Classifies a database error by MySQL's error number.
pub fn classify(error: sqlx::Error) -> SinkError {
    let number = match &error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    };
    super::sql::classify(error, |_| number.map_or(ErrorClass::Transient, by_number))
}

/// The class of a MySQL or MariaDB server error number.
fn by_number(number: u16) -> ErrorClass {
    match number {
        // a value that does not fit its column, bad JSON, a row or statement too large, a
        // constraint: this record is refused
        1048 | 1062 | 1153 | 1264 | 1265 | 1292 | 1364 | 1366 | 1367 | 1406 | 1451 | 1452
        | 1690 | 3140 | 3819 | 4025 => ErrorClass::Permanent,
        // no such database, table or column, bad syntax, permission denied: the spec does
        // not fit the schema
        1044 | 1045 | 1049 | 1054 | 1064 | 1142 | 1143 | 1146 | 1227 => ErrorClass::Fatal,
        // too many connections, shutting down, read-only, connection killed
        1040 | 1053 | 1290 | 1836 | 1927 | 2002 | 2003 | 2006 | 2013 => ErrorClass::Unavailable,
        // deadlock, lock wait timeout, and anything else
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_crds::WriteMode;

    fn spec(guard: Option<&str>) -> SqlSink {
        SqlSink {
            table: "app.users".into(),
            mode: WriteMode::Rules,
            key_columns: vec!["id".into()],
            guard: guard.map(|column| weir_crds::Guard {
                column: column.into(),
            }),
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

    const COLUMNS: [(&str, ColumnType); 3] = [
        ("id", ColumnType::Bigint),
        ("name", ColumnType::Text),
        ("version", ColumnType::Bigint),
    ];

    #[test]
    fn upserts_are_multi_row_on_duplicate_key_update() {
        assert_eq!(
            statement(&spec(None), &group(Action::Upsert, &COLUMNS), 2).as_deref(),
            Some(
                "INSERT INTO `app`.`users` (`id`, `name`, `version`) VALUES (?, ?, ?), (?, ?, ?) ON DUPLICATE KEY UPDATE `name` = VALUES(`name`), `version` = VALUES(`version`)"
            )
        );
        assert_eq!(
            statement(&spec(None), &group(Action::Upsert, &COLUMNS[..1]), 1).as_deref(),
            Some("INSERT INTO `app`.`users` (`id`) VALUES (?) ON DUPLICATE KEY UPDATE `id` = `id`")
        );
    }

    #[test]
    fn guarded_upserts_assign_the_guard_column_last() {
        let columns = [
            ("id", ColumnType::Bigint),
            ("version", ColumnType::Bigint),
            ("name", ColumnType::Text),
        ];
        assert_eq!(
            statement(&spec(Some("version")), &group(Action::Upsert, &columns), 1).as_deref(),
            Some(
                "INSERT INTO `app`.`users` (`id`, `version`, `name`) VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE `name` = IF(`version` IS NULL OR `version` < VALUES(`version`), VALUES(`name`), `name`), `version` = IF(`version` IS NULL OR `version` < VALUES(`version`), VALUES(`version`), `version`)"
            )
        );
    }

    #[test]
    fn updates_and_deletes_join_a_derived_table_of_the_rows() {
        assert_eq!(
            statement(&spec(Some("version")), &group(Action::Update, &COLUMNS), 2).as_deref(),
            Some(
                "UPDATE `app`.`users` AS t JOIN (SELECT ? AS `id`, ? AS `name`, ? AS `version` UNION ALL SELECT ?, ?, ?) AS u ON t.`id` = u.`id` SET t.`name` = u.`name`, t.`version` = u.`version` WHERE (t.`version` IS NULL OR t.`version` < u.`version`)"
            )
        );
        assert_eq!(
            statement(&spec(None), &group(Action::Delete, &COLUMNS[..1]), 2).as_deref(),
            Some(
                "DELETE t FROM `app`.`users` AS t JOIN (SELECT ? AS `id` UNION ALL SELECT ?) AS u ON t.`id` = u.`id`"
            )
        );
        assert_eq!(
            statement(&spec(None), &group(Action::Update, &COLUMNS[..1]), 1),
            None
        );
    }

    #[test]
    fn statements_stay_under_the_packet_budget() {
        assert_eq!(budget(64 << 20), 48 << 20);
        assert_eq!(budget(100), 1024);
    }

    #[test]
    fn server_errors_are_classified_by_number() {
        assert_eq!(by_number(1366), ErrorClass::Permanent);
        assert_eq!(by_number(1146), ErrorClass::Fatal);
        assert_eq!(by_number(1213), ErrorClass::Transient);
        assert_eq!(by_number(2013), ErrorClass::Unavailable);
    }
}
