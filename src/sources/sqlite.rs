//! The `sqlite` connector: change data capture from a SQLite database file
//! through a changelog table that triggers installed by the connector fill.
//!
//! On start the connector opens the file (it must exist; WAL mode, 5 s busy
//! timeout) and, in one write transaction, creates `_fabric_changelog` and
//! drops and recreates `AFTER INSERT/UPDATE/DELETE` triggers
//! `_fabric_<table>_ins|upd|del` on every configured table. Each trigger
//! appends the old and new row as a `json_object` of every column (blobs as
//! `{"hex": ...}`). `_fabric_*` triggers of tables no longer configured are
//! dropped, so nothing fills the changelog for nobody. Column lists are read
//! at start: schema changes of a captured table take effect at the next start.
//!
//! Invariants:
//! - Positions are changelog `seq`s: `Position::Seq(s)` means every change
//!   up to `s` has been handed on.
//! - Atomicity: SQLite has no transaction ids. Writers are serialized and
//!   `seq`s are assigned in commit order, and a poll reads in one read
//!   transaction, so one poll (one [`SourceTxn`]) holds whole committed
//!   transactions — except that a transaction that wrote more than
//!   `batch_size` rows is seen in two steps.
//! - The changelog is pruned only up to the position received on
//!   `ctx.durable` (and never beyond what was read).
//! - A changelog row that cannot be decoded is dead-lettered and skipped; its
//!   `seq` still advances the position.
//! - Initial snapshot: all rows of all tables and the highest `seq` ever
//!   assigned, read in one read transaction, sent in chunks of `batch_size`
//!   rows. Only the last chunk carries that `seq`; the ones before carry
//!   `Position::Snapshot(n)`, so a crash before the last chunk is durable
//!   resumes from a snapshot position, which restarts the snapshot.
//! - Resume from `seq` n: if changes after n were pruned (the lowest `seq`
//!   present is above n + 1, or the changelog is empty but once went past
//!   n), or the changelog is behind n (the file was replaced; its sequence is
//!   then raised to n so positions never move back), the changes in between
//!   are lost: the connector warns, truncates the tables and snapshots again.
//! - First start without a snapshot (`initial_snapshot = false`): streaming
//!   starts after the highest `seq` ever assigned.
//!
//! Types follow the declared column type, checked in this order: `BOOL`,
//! `TIMESTAMP`/`DATETIME`, `DATE`, `UUID`, `JSON`, `DECIMAL`/`NUMERIC`, then
//! SQLite's affinity rules (see `decode_value`). A value that does not fit
//! its declared type is kept as stored, since SQLite does not enforce types.
//!
//! One source per database file: the changelog and triggers are shared.

use super::{Source, SourceContext, SourceError, now_micros};
use crate::config::{Config, SourceConfig};
use crate::event::value::{parse_date, parse_timestamp};
use crate::event::{Op, Position, Row, RowChange, Value};
use futures::TryStreamExt;
use serde_json::Value as J;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode};
use sqlx::{AssertSqlSafe, Connection, Row as _};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

const CHANGELOG_DDL: &str = "CREATE TABLE IF NOT EXISTS _fabric_changelog(seq INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, op TEXT NOT NULL, old TEXT, new TEXT)";

/// Lowest `seq` present and highest `seq` ever assigned (pruned rows included).
const BOUNDS_SQL: &str = "SELECT (SELECT MIN(seq) FROM _fabric_changelog), \
     MAX(COALESCE((SELECT MAX(seq) FROM _fabric_changelog), 0), \
         COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '_fabric_changelog'), 0))";

/// The `sqlite` connector, built from its config.
pub struct SqliteSource {
    name: String,
    path: PathBuf,
    /// (as configured, bare name in `main`)
    tables: Vec<(String, String)>,
    poll_interval: Duration,
    batch_size: usize,
    initial_snapshot: bool,
}

/// A captured table as found in the file.
struct Table {
    /// The name events carry: exactly as in the source's `tables`.
    configured: String,
    /// The name SQLite knows it by.
    name: String,
    /// (column, declared type), in table order.
    columns: Vec<(String, String)>,
    types: HashMap<String, String>,
}

/// The captured tables, found by their SQLite name (case-insensitive).
struct Catalog {
    tables: Vec<Table>,
    by_name: HashMap<String, usize>,
}

impl Catalog {
    fn get(&self, sqlite_name: &str) -> Option<&Table> {
        self.by_name
            .get(&sqlite_name.to_ascii_lowercase())
            .map(|&i| &self.tables[i])
    }
}

impl SqliteSource {
    pub fn new(cfg: &SourceConfig, config: &Config) -> Result<Self, SourceError> {
        let err = |reason: String| SourceError::Config {
            source_name: cfg.name.clone(),
            reason,
        };
        let path = cfg
            .path
            .as_deref()
            .ok_or_else(|| err("a sqlite source needs a path".into()))?;
        if cfg.tables.is_empty() {
            return Err(err("a sqlite source needs the tables to capture".into()));
        }
        let mut tables = Vec::new();
        for t in &cfg.tables {
            let bare = match t.split_once('.') {
                None => t.as_str(),
                Some((schema, bare)) if schema.eq_ignore_ascii_case("main") => bare,
                Some(_) => {
                    return Err(err(format!(
                        "table {t}: only tables of the main schema can be captured"
                    )));
                }
            };
            tables.push((t.clone(), bare.to_string()));
        }
        Ok(SqliteSource {
            name: cfg.name.clone(),
            path: config.resolve(path),
            tables,
            poll_interval: cfg.poll_interval(),
            batch_size: cfg.batch_size().max(1),
            initial_snapshot: cfg.initial_snapshot.unwrap_or(true),
        })
    }

    fn config_err(&self, reason: String) -> SourceError {
        SourceError::Config {
            source_name: self.name.clone(),
            reason,
        }
    }

    fn ext(&self, operation: &'static str) -> impl Fn(sqlx::Error) -> SourceError + '_ {
        move |e| SourceError::external(&self.name, operation, e)
    }

    async fn open(&self) -> Result<SqliteConnection, SourceError> {
        if !tokio::fs::try_exists(&self.path).await.unwrap_or(false) {
            return Err(self.config_err(format!(
                "database file {} does not exist",
                self.path.display()
            )));
        }
        let opts = SqliteConnectOptions::new()
            .filename(&self.path)
            .create_if_missing(false)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        SqliteConnection::connect_with(&opts)
            .await
            .map_err(self.ext("open the database"))
    }

    /// Creates the changelog and (re)creates the triggers, in one write transaction.
    async fn install(&self, conn: &mut SqliteConnection) -> Result<Catalog, SourceError> {
        let ext = self.ext("install the changelog triggers");
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(&ext)?;
        exec(&mut tx, CHANGELOG_DDL.into()).await.map_err(&ext)?;
        let mut catalog = Catalog {
            tables: Vec::new(),
            by_name: HashMap::new(),
        };
        let mut wanted = Vec::new();
        for (configured, bare) in &self.tables {
            let name: Option<String> = sqlx::query_scalar(
                "SELECT name FROM sqlite_schema WHERE type = 'table' AND name = ?1 COLLATE NOCASE",
            )
            .bind(bare)
            .fetch_optional(&mut *tx)
            .await
            .map_err(&ext)?;
            let Some(name) = name else {
                return Err(self.config_err(format!(
                    "table {configured} does not exist in {}",
                    self.path.display()
                )));
            };
            let columns: Vec<(String, String)> =
                sqlx::query_as("SELECT name, type FROM pragma_table_info(?1, 'main') ORDER BY cid")
                    .bind(&name)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(&ext)?;
            for (suffix, event, code, old, new) in [
                ("ins", "INSERT", "I", None, Some("NEW.")),
                ("upd", "UPDATE", "U", Some("OLD."), Some("NEW.")),
                ("del", "DELETE", "D", Some("OLD."), None),
            ] {
                let trigger = format!("_fabric_{name}_{suffix}");
                let image = |p: Option<&str>| p.map_or("NULL".into(), |p| row_json(p, &columns));
                let drop = format!("DROP TRIGGER IF EXISTS main.{}", ident(&trigger));
                let create = format!(
                    "CREATE TRIGGER main.{} AFTER {event} ON {} BEGIN \
                     INSERT INTO _fabric_changelog(tbl, op, old, new) VALUES ({}, '{code}', {}, {}); END",
                    ident(&trigger),
                    ident(&name),
                    lit(&name),
                    image(old),
                    image(new),
                );
                for sql in [drop, create] {
                    exec(&mut tx, sql).await.map_err(&ext)?;
                }
                wanted.push(trigger.to_ascii_lowercase());
            }
            let key = name.to_ascii_lowercase();
            if !catalog.by_name.contains_key(&key) {
                catalog.by_name.insert(key, catalog.tables.len());
                catalog.tables.push(Table {
                    configured: configured.clone(),
                    name,
                    types: columns.iter().cloned().collect(),
                    columns,
                });
            }
        }
        // Triggers of tables no longer configured would fill the changelog for nobody.
        let existing: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND name LIKE '\\_fabric\\_%' ESCAPE '\\'",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(&ext)?;
        for t in existing {
            if !wanted.contains(&t.to_ascii_lowercase()) {
                let sql = format!("DROP TRIGGER IF EXISTS main.{}", ident(&t));
                exec(&mut tx, sql).await.map_err(&ext)?;
            }
        }
        tx.commit().await.map_err(&ext)?;
        Ok(catalog)
    }

    /// Decides where streaming starts, snapshotting when needed. `None`: shut down.
    async fn start(
        &self,
        conn: &mut SqliteConnection,
        catalog: &Catalog,
        ctx: &SourceContext,
    ) -> Result<Option<u64>, SourceError> {
        let (min, high) = bounds(conn).await.map_err(self.ext("read the changelog"))?;
        match ctx.resume {
            Some(Position::Seq(n)) if high < n => {
                tracing::warn!(
                    resume = n,
                    changelog = high,
                    "the changelog is behind the resume position (database replaced?); snapshotting again"
                );
                self.raise_sequence(conn, n).await?;
                self.snapshot(conn, catalog, ctx, true).await
            }
            Some(Position::Seq(n)) if min.map_or(high > n, |m| m > n + 1) => {
                tracing::warn!(
                    resume = n,
                    lowest = ?min,
                    "changes after the resume position were pruned; snapshotting again"
                );
                self.snapshot(conn, catalog, ctx, true).await
            }
            Some(Position::Seq(n)) => Ok(Some(n)),
            Some(ref other) => {
                tracing::warn!(resume = %other, "the resume position is not a changelog seq; snapshotting again");
                self.snapshot(conn, catalog, ctx, true).await
            }
            None if self.initial_snapshot => {
                self.snapshot(conn, catalog, ctx, ctx.store_may_hold_rows)
                    .await
            }
            None => Ok(Some(high)),
        }
    }

    /// Makes the changelog's next `seq` follow `n`, so positions never move back.
    async fn raise_sequence(&self, conn: &mut SqliteConnection, n: u64) -> Result<(), SourceError> {
        let ext = self.ext("raise the changelog sequence");
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(&ext)?;
        let del = "DELETE FROM sqlite_sequence WHERE name = '_fabric_changelog'";
        exec(&mut tx, del.into()).await.map_err(&ext)?;
        let ins = format!(
            "INSERT INTO sqlite_sequence(name, seq) SELECT '_fabric_changelog', \
             MAX({}, COALESCE((SELECT MAX(seq) FROM _fabric_changelog), 0))",
            n.min(i64::MAX as u64)
        );
        exec(&mut tx, ins).await.map_err(&ext)?;
        tx.commit().await.map_err(&ext)
    }

    /// Sends every row of every table as reads (after truncates when `truncate`).
    async fn snapshot(
        &self,
        conn: &mut SqliteConnection,
        catalog: &Catalog,
        ctx: &SourceContext,
        truncate: bool,
    ) -> Result<Option<u64>, SourceError> {
        ctx.status.set_state("snapshotting");
        let ext = self.ext("read the initial snapshot");
        let mut tx = conn.begin().await.map_err(&ext)?;
        // The first read starts the read transaction: position and rows agree.
        let (_, pos) = bounds(&mut tx).await.map_err(&ext)?;
        let mut chunk: Vec<RowChange> = Vec::new();
        if truncate {
            chunk.extend(
                catalog
                    .tables
                    .iter()
                    .map(|t| RowChange::truncate(&t.configured)),
            );
        }
        let mut rows = 0u64;
        let mut chunks = 0u64;
        let mut count = 0u64;
        for t in &catalog.tables {
            let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT count(*) FROM main.{}",
                ident(&t.name)
            )))
            .fetch_one(&mut *tx)
            .await
            .map_err(&ext)?;
            count += n.max(0) as u64;
        }
        let names: Vec<&str> = catalog.tables.iter().map(|t| t.name.as_str()).collect();
        ctx.status.progress.start(
            format!("initial snapshot of {}", names.join(", ")),
            "rows",
            Some(count),
        );
        for t in &catalog.tables {
            let sql = format!(
                "SELECT {} FROM main.{}",
                row_json("", &t.columns),
                ident(&t.name)
            );
            let mut stream = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql)).fetch(&mut *tx);
            while let Some(text) = stream.try_next().await.map_err(&ext)? {
                match decode_row(&t.types, &text) {
                    Ok(row) => chunk.push(RowChange::read(&t.configured, row)),
                    Err(reason) => ctx.dead_letter(&t.configured, &reason, &text),
                }
                rows += 1;
                ctx.status.snapshot_row().await;
                // Chunks before the last carry a snapshot position: a crash
                // before the last one is durable restarts the snapshot.
                if chunk.len() >= self.batch_size {
                    chunks += 1;
                    let at = Position::Snapshot(chunks);
                    if !ctx
                        .deliver(at, now_micros(), std::mem::take(&mut chunk))
                        .await?
                    {
                        return Ok(None);
                    }
                }
            }
        }
        tx.commit().await.map_err(&ext)?;
        if (!chunk.is_empty() || chunks > 0)
            && !ctx.deliver(Position::Seq(pos), now_micros(), chunk).await?
        {
            return Ok(None);
        }
        ctx.status.progress.finish();
        tracing::info!(rows, position = pos, "initial snapshot read");
        Ok(Some(pos))
    }

    /// Reads and sends one batch after `last`: (new last, rows read); `None`: shut down.
    async fn poll(
        &self,
        conn: &mut SqliteConnection,
        catalog: &Catalog,
        ctx: &SourceContext,
        last: u64,
    ) -> Result<Option<(u64, usize)>, SourceError> {
        let ext = self.ext("poll the changelog");
        let mut tx = conn.begin().await.map_err(&ext)?;
        // CAST: a stray value type in the changelog must not fail the whole poll.
        let rows = sqlx::query(
            "SELECT seq, CAST(tbl AS TEXT), CAST(op AS TEXT), CAST(old AS TEXT), CAST(new AS TEXT) \
             FROM _fabric_changelog WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(i64::try_from(last).unwrap_or(i64::MAX))
        .bind(i64::try_from(self.batch_size).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(&ext)?;
        tx.commit().await.map_err(&ext)?;
        if rows.is_empty() {
            return Ok(Some((last, 0)));
        }
        let mut high = last;
        let mut changes = Vec::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = r.try_get(0).map_err(&ext)?;
            high = u64::try_from(seq).unwrap_or(high);
            let text = |i| r.try_get::<Option<String>, _>(i).ok().flatten();
            let (tbl, op, old, new) = (text(1).unwrap_or_default(), text(2), text(3), text(4));
            match decode_change(catalog, &tbl, op.as_deref(), old.as_deref(), new.as_deref()) {
                Ok(Some(c)) => changes.push(c),
                Ok(None) => tracing::trace!(seq, table = %tbl, "change of a table not captured"),
                Err(reason) => {
                    let raw = serde_json::json!({"seq": seq, "tbl": tbl, "op": op, "old": old, "new": new});
                    let table = catalog
                        .get(&tbl)
                        .map_or(tbl.as_str(), |t| t.configured.as_str());
                    ctx.dead_letter(table, &reason, &raw.to_string());
                }
            }
        }
        tracing::debug!(
            rows = rows.len(),
            changes = changes.len(),
            position = high,
            "changelog batch"
        );
        if !ctx
            .deliver(Position::Seq(high), now_micros(), changes)
            .await?
        {
            return Ok(None);
        }
        Ok(Some((high, rows.len())))
    }
}

#[async_trait::async_trait]
impl Source for SqliteSource {
    #[tracing::instrument(skip_all, fields(source = %ctx.name))]
    async fn run(self: Box<Self>, mut ctx: SourceContext) -> Result<(), SourceError> {
        ctx.status.set_state("starting");
        let mut conn = self.open().await?;
        let catalog = self.install(&mut conn).await?;
        tracing::info!(path = %self.path.display(), tables = catalog.tables.len(), "capturing changes");
        let Some(mut last) = self.start(&mut conn, &catalog, &ctx).await? else {
            return Ok(());
        };
        ctx.status.set_state("streaming");
        let mut durable_open = true;
        let mut pruned = 0u64;
        while !ctx.shutdown.is_cancelled() {
            let durable = match &*ctx.durable.borrow_and_update() {
                Some(Position::Seq(d)) => Some((*d).min(last)),
                _ => None,
            };
            if let Some(d) = durable.filter(|d| *d > pruned) {
                // A failed prune is retried with the next batch; the data is safe.
                match prune(&mut conn, d).await {
                    Ok(n) => {
                        tracing::debug!(upto = d, rows = n, "changelog pruned");
                        pruned = d;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot prune the changelog; will retry"),
                }
            }
            let Some((high, n)) = self.poll(&mut conn, &catalog, &ctx, last).await? else {
                break;
            };
            last = high;
            let caught_up = n < self.batch_size;
            ctx.status.set_caught_up(caught_up);
            if !caught_up {
                continue;
            }
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.poll_interval) => {}
                r = ctx.durable.changed(), if durable_open => durable_open = r.is_ok(),
            }
        }
        ctx.status.set_state("stopped");
        Ok(())
    }
}

async fn exec(conn: &mut SqliteConnection, sql: String) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(sql))
        .execute(conn)
        .await
        .map(drop)
}

async fn bounds(conn: &mut SqliteConnection) -> Result<(Option<u64>, u64), sqlx::Error> {
    let (min, high): (Option<i64>, i64) = sqlx::query_as(BOUNDS_SQL).fetch_one(conn).await?;
    Ok((min.map(|m| m.max(0) as u64), high.max(0) as u64))
}

async fn prune(conn: &mut SqliteConnection, upto: u64) -> Result<u64, sqlx::Error> {
    let r = sqlx::query("DELETE FROM _fabric_changelog WHERE seq <= ?1")
        .bind(i64::try_from(upto).unwrap_or(i64::MAX))
        .execute(conn)
        .await?;
    Ok(r.rows_affected())
}

fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `json_object` of every column read through `prefix` (`NEW.`, `OLD.`, or
/// empty); blobs, which JSON cannot hold, become `{"hex": ...}`.
fn row_json(prefix: &str, columns: &[(String, String)]) -> String {
    let args: Vec<String> = columns
        .iter()
        .map(|(c, _)| {
            let r = format!("{prefix}{}", ident(c));
            format!(
                "{}, CASE WHEN typeof({r}) = 'blob' THEN json_object('hex', hex({r})) ELSE {r} END",
                lit(c)
            )
        })
        .collect();
    format!("json_object({})", args.join(", "))
}

/// One changelog row as a change; `Ok(None)` for a table not captured.
fn decode_change(
    catalog: &Catalog,
    tbl: &str,
    op: Option<&str>,
    old: Option<&str>,
    new: Option<&str>,
) -> Result<Option<RowChange>, String> {
    let Some(t) = catalog.get(tbl) else {
        return Ok(None);
    };
    let image = |name: &str, text: Option<&str>| -> Result<Row, String> {
        let text = text.ok_or_else(|| format!("the {name} image is missing"))?;
        decode_row(&t.types, text).map_err(|e| format!("{name} image: {e}"))
    };
    let (op, before, after) = match op {
        Some("I") => (Op::Insert, None, Some(image("new", new)?)),
        Some("U") => (
            Op::Update,
            Some(image("old", old)?),
            Some(image("new", new)?),
        ),
        Some("D") => (Op::Delete, Some(image("old", old)?), None),
        other => return Err(format!("unknown changelog op {other:?}")),
    };
    Ok(Some(RowChange {
        table: t.configured.clone(),
        op,
        before,
        after,
    }))
}

/// A row written by `row_json`, typed by the columns' declared types.
fn decode_row(types: &HashMap<String, String>, text: &str) -> Result<Row, String> {
    let J::Object(obj) =
        serde_json::from_str::<J>(text).map_err(|e| format!("bad row json: {e}"))?
    else {
        return Err("the row is not a json object".into());
    };
    obj.iter()
        .map(|(col, v)| {
            let decl = types.get(col).map_or("", String::as_str);
            decode_value(decl, v)
                .map(|v| (col.clone(), v))
                .map_err(|e| format!("column {col}: {e}"))
        })
        .collect()
}

/// What a declared column type asks of its stored values.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Bool,
    Timestamp,
    Date,
    Uuid,
    Json,
    /// With the scale of `DECIMAL(p,s)`, if given.
    Decimal(Option<usize>),
    Real,
    /// Anything else: typed by what is stored.
    Stored,
}

fn kind_of(decl: &str) -> Kind {
    let d = decl.to_ascii_uppercase();
    let has = |s: &str| d.contains(s);
    if has("BOOL") {
        Kind::Bool
    } else if has("TIMESTAMP") || has("DATETIME") {
        Kind::Timestamp
    } else if has("DATE") {
        Kind::Date
    } else if has("UUID") {
        Kind::Uuid
    } else if has("JSON") {
        Kind::Json
    } else if has("DECIMAL") || has("NUMERIC") {
        let scale = d
            .split_once('(')
            .and_then(|(_, r)| r.split_once(')'))
            .and_then(|(args, _)| args.split_once(','))
            .and_then(|(_, s)| s.trim().parse().ok());
        Kind::Decimal(scale)
    } else if !has("INT") && (has("REAL") || has("FLOA") || has("DOUB")) {
        // SQLite's affinity rules: INT wins over REAL.
        Kind::Real
    } else {
        Kind::Stored
    }
}

/// Maps a stored value (as `json_object` wrote it) to a [`Value`] by the
/// column's declared type (case-insensitive substrings, first match wins):
/// - null is `Null`; `{"hex": h}` (a blob) is `Bytes`, or `Uuid` when 16
///   bytes in a `UUID` column;
/// - `BOOL`: a number is `Bool(n != 0)`, text `1/0/true/false/t/f/yes/no`;
/// - `TIMESTAMP`/`DATETIME`: text through `parse_timestamp`;
/// - `DATE`: text through `parse_date`; `UUID`: text through `Uuid::parse_str`;
/// - `JSON`: text that parses as JSON, or a number, is `Json`;
/// - `DECIMAL`/`NUMERIC`: decimal text as stored; a number (NUMERIC affinity
///   stores `'12.50'` as 12.5) as text with the declared scale of `(p,s)`
///   when that loses nothing (`12.50`), else its shortest form;
/// - `REAL`/`FLOA`/`DOUB` without `INT`: a number is `Float`;
/// - anything else, and values that do not fit the above (SQLite does not
///   enforce types): by the stored type, integer `Int`, real `Float`, text
///   `Text`. Only malformed JSON (another object, an array) fails.
pub(crate) fn decode_value(decl: &str, v: &J) -> Result<Value, String> {
    let kind = kind_of(decl);
    Ok(match (kind, v) {
        (_, J::Null) => Value::Null,
        (_, J::Object(o)) => {
            let hex = match (o.len(), o.get("hex")) {
                (1, Some(J::String(h))) => h,
                _ => return Err("unexpected json object".into()),
            };
            let bytes = decode_hex(hex).ok_or("bad hex in blob")?;
            match <[u8; 16]>::try_from(bytes.as_slice()) {
                Ok(u) if kind == Kind::Uuid => Value::Uuid(u),
                _ => Value::Bytes(bytes),
            }
        }
        (_, J::Array(_)) => return Err("unexpected json array".into()),
        (Kind::Bool, J::Number(n)) => Value::Bool(n.as_f64() != Some(0.0)),
        (Kind::Bool, J::String(s)) => match s.to_ascii_lowercase().as_str() {
            "1" | "true" | "t" | "yes" | "y" => Value::Bool(true),
            "0" | "false" | "f" | "no" | "n" => Value::Bool(false),
            _ => Value::Text(s.clone()),
        },
        (Kind::Timestamp, J::String(s)) => {
            parse_timestamp(s).map_or_else(|| Value::Text(s.clone()), Value::Timestamp)
        }
        (Kind::Date, J::String(s)) => {
            parse_date(s).map_or_else(|| Value::Text(s.clone()), Value::Date)
        }
        (Kind::Uuid, J::String(s)) => uuid::Uuid::parse_str(s)
            .map_or_else(|_| Value::Text(s.clone()), |u| Value::Uuid(*u.as_bytes())),
        (Kind::Json, J::String(s)) if serde_json::from_str::<J>(s).is_ok() => {
            Value::Json(s.clone())
        }
        (Kind::Json, J::Number(n)) => Value::Json(n.to_string()),
        (Kind::Decimal(_), J::String(s)) if is_decimal(s) => Value::Decimal(s.clone()),
        (Kind::Decimal(scale), J::Number(n)) => Value::Decimal(decimal_text(n, scale)),
        (Kind::Real, J::Number(n)) => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        (_, other) => Value::from_json(other),
    })
}

fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    digits.bytes().any(|b| b.is_ascii_digit())
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1
}

/// A number stored in a decimal column (NUMERIC affinity turns `'12.50'`
/// into 12.5) as decimal text, with the declared scale when that loses nothing.
fn decimal_text(n: &serde_json::Number, scale: Option<usize>) -> String {
    if let Some(i) = n.as_i64() {
        return match scale {
            Some(s) if s > 0 => format!("{i}.{}", "0".repeat(s)),
            _ => i.to_string(),
        };
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if let Some(s) = scale {
        let t = format!("{f:.s$}");
        if t.parse::<f64>() == Ok(f) {
            return t;
        }
    }
    format!("{f}")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SourceTxn;
    use crate::sources::{SourceStatus, TxnEnvelope};
    use crate::telemetry::{DeadLetters, Metrics};
    use serde_json::json;
    use std::path::Path;
    use std::sync::Arc;
    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;

    #[test]
    fn declared_types_pick_the_value_type() {
        let ts = parse_timestamp("2024-03-01 10:00:00").unwrap();
        let u = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        let ub = Value::Uuid(*uuid::Uuid::parse_str(u).unwrap().as_bytes());
        let t = |s: &str| Value::Text(s.into());
        let dec = |s: &str| Value::Decimal(s.into());
        let cases = [
            ("INTEGER", json!(7), Value::Int(7)),
            ("BIGINT", json!("x"), t("x")),
            ("REAL", json!(2), Value::Float(2.0)),
            ("DOUBLE PRECISION", json!(2.5), Value::Float(2.5)),
            ("VARCHAR(20)", json!("a"), t("a")),
            ("TEXT", json!(null), Value::Null),
            ("DECIMAL(12,2)", json!("123.45"), dec("123.45")),
            ("DECIMAL(12,2)", json!(12.5), dec("12.50")),
            ("DECIMAL(12,2)", json!(100), dec("100.00")),
            ("DECIMAL(12,2)", json!(1.125), dec("1.125")),
            ("NUMERIC", json!(12.5), dec("12.5")),
            ("NUMERIC", json!("n/a"), t("n/a")),
            ("BOOLEAN", json!(1), Value::Bool(true)),
            ("BOOL", json!(0), Value::Bool(false)),
            ("BOOLEAN", json!("false"), Value::Bool(false)),
            (
                "TIMESTAMP",
                json!("2024-03-01 10:00:00"),
                Value::Timestamp(ts),
            ),
            (
                "DATETIME",
                json!("2024-03-01T10:00:00Z"),
                Value::Timestamp(ts),
            ),
            ("TIMESTAMP", json!("soon"), t("soon")),
            ("DATE", json!("1970-01-11"), Value::Date(10)),
            ("UUID", json!(u), ub.clone()),
            (
                "UUID",
                json!({"hex": "67E5504410B1426F9247BB680E5FE0C8"}),
                ub,
            ),
            ("JSON", json!("{\"a\":1}"), Value::Json("{\"a\":1}".into())),
            ("JSON", json!("not json"), t("not json")),
            ("BLOB", json!({"hex": "00FF"}), Value::Bytes(vec![0, 255])),
            ("", json!({"hex": ""}), Value::Bytes(vec![])),
            ("", json!(3.5), Value::Float(3.5)),
        ];
        for (decl, v, want) in cases {
            assert_eq!(decode_value(decl, &v).unwrap(), want, "{decl} {v}");
        }
        for (decl, v) in [
            ("BLOB", json!({"hex": "0"})),
            ("TEXT", json!({"a": 1})),
            ("", json!([1])),
        ] {
            assert!(decode_value(decl, &v).is_err(), "{decl} {v}");
        }
        assert_eq!(kind_of("decimal(12, 2)"), Kind::Decimal(Some(2)));
        assert_eq!(kind_of("NUMERIC(10)"), Kind::Decimal(None));
        assert_eq!(kind_of("FLOATINT"), Kind::Stored);
    }

    struct Harness {
        rx: mpsc::Receiver<TxnEnvelope>,
        durable: watch::Sender<Option<Position>>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), SourceError>>,
        dead: Arc<DeadLetters>,
        status: Arc<SourceStatus>,
    }

    impl Harness {
        async fn next(&mut self) -> SourceTxn {
            let wait = tokio::time::timeout(Duration::from_secs(5), self.rx.recv());
            wait.await
                .expect("a transaction within 5s")
                .expect("running")
                .txn
        }

        /// Transactions until `n` changes have arrived, and those changes.
        async fn changes(&mut self, n: usize) -> (Vec<SourceTxn>, Vec<RowChange>) {
            let mut txns = Vec::new();
            while txns
                .iter()
                .map(|t: &SourceTxn| t.changes.len())
                .sum::<usize>()
                < n
            {
                txns.push(self.next().await);
            }
            let all = txns.iter().flat_map(|t| t.changes.clone()).collect();
            (txns, all)
        }

        /// Waits until the triggers are in and the snapshot is done.
        async fn streaming(&self) {
            for _ in 0..1000 {
                if *self.status.state.lock() == "streaming" {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("the source is not streaming after 5s");
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.unwrap().unwrap();
        }
    }

    fn source(db: &Path, tables: &[&str], batch: usize) -> Result<SqliteSource, SourceError> {
        let toml = format!(
            "[[sources]]\nname = \"crm\"\nkind = \"sqlite\"\npath = {:?}\ntables = {tables:?}\n\
             poll_interval = \"10ms\"\nbatch_size = {batch}\n",
            db.display().to_string()
        );
        let config = Config::from_toml(&db.with_file_name("fabric.toml"), &toml).unwrap();
        SqliteSource::new(&config.sources[0], &config)
    }

    fn start(db: &Path, tables: &[&str], batch: usize, resume: Option<Position>) -> Harness {
        start_with(db, tables, batch, resume, false)
    }

    fn start_with(
        db: &Path,
        tables: &[&str],
        batch: usize,
        resume: Option<Position>,
        store_may_hold_rows: bool,
    ) -> Harness {
        let (tx, rx) = mpsc::channel(64);
        let (durable, durable_rx) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let dlq = db.with_file_name("dlq.jsonl");
        let dead = Arc::new(DeadLetters::new(&dlq, 10, Arc::new(Metrics::new())));
        let status = Arc::new(SourceStatus::default());
        let name = "crm".into();
        let ctx = SourceContext::new(
            name,
            resume,
            tx,
            durable_rx,
            status.clone(),
            dead.clone(),
            shutdown.clone(),
        );
        let ctx = SourceContext {
            store_may_hold_rows,
            ..ctx
        };
        let task = tokio::spawn(Box::new(source(db, tables, batch).unwrap()).run(ctx));
        Harness {
            rx,
            durable,
            shutdown,
            task,
            dead,
            status,
        }
    }

    const SCHEMA: &str = "CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, \
        balance DECIMAL(10,2), active BOOLEAN, created_at TIMESTAMP, photo BLOB, ratio REAL); \
        CREATE TABLE notes(body TEXT);";

    async fn db(path: &Path) -> SqliteConnection {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        let mut conn = SqliteConnection::connect_with(&opts.busy_timeout(Duration::from_secs(5)))
            .await
            .unwrap();
        sqlx::raw_sql(SCHEMA).execute(&mut conn).await.unwrap();
        conn
    }

    async fn run_sql(conn: &mut SqliteConnection, sql: &'static str) {
        sqlx::raw_sql(sql).execute(conn).await.unwrap();
    }

    fn change(op: Op, table: &str, before: Option<&Row>, after: Option<&Row>) -> RowChange {
        let (before, after) = (before.cloned(), after.cloned());
        RowChange {
            table: table.into(),
            op,
            before,
            after,
        }
    }

    #[tokio::test]
    async fn captures_inserts_updates_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let mut conn = db(&path).await;
        let mut h = start(&path, &["customers", "main.notes"], 100, None);
        h.streaming().await;
        run_sql(
            &mut conn,
            "BEGIN; INSERT INTO customers VALUES (1, 'Ada', '12.50', 1, '2024-03-01 10:00:00', \
             x'00ff', 0.5); INSERT INTO notes VALUES ('hi'); COMMIT; \
             UPDATE customers SET name = 'Ada L', active = 0 WHERE id = 1; \
             DELETE FROM customers WHERE id = 1;",
        )
        .await;
        let (txns, changes) = h.changes(4).await;
        assert_eq!(txns.last().unwrap().position, Position::Seq(4));
        let ts = Value::Timestamp(parse_timestamp("2024-03-01 10:00:00").unwrap());
        let mut ada: Row = [
            ("id", Value::Int(1)),
            ("name", Value::Text("Ada".into())),
            ("balance", Value::Decimal("12.50".into())),
            ("active", Value::Bool(true)),
            ("created_at", ts),
            ("photo", Value::Bytes(vec![0, 255])),
            ("ratio", Value::Float(0.5)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let note: Row = [("body".to_string(), Value::Text("hi".into()))].into();
        assert_eq!(
            changes[0],
            change(Op::Insert, "customers", None, Some(&ada))
        );
        assert_eq!(
            changes[1],
            change(Op::Insert, "main.notes", None, Some(&note))
        );
        let old = ada.clone();
        ada.insert("name".into(), Value::Text("Ada L".into()));
        ada.insert("active".into(), Value::Bool(false));
        assert_eq!(
            changes[2],
            change(Op::Update, "customers", Some(&old), Some(&ada))
        );
        assert_eq!(
            changes[3],
            change(Op::Delete, "customers", Some(&ada), None)
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn snapshot_reads_existing_rows_then_streams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let mut conn = db(&path).await;
        let sql = "INSERT INTO customers(id, name) VALUES (1,'a'),(2,'b'),(3,'c'),(4,'d'),(5,'e')";
        run_sql(&mut conn, sql).await;
        let mut h = start(&path, &["customers"], 2, None);
        let (txns, changes) = h.changes(5).await;
        // Chunks before the last carry snapshot positions, so a crash in the
        // middle restarts the snapshot; the last one the stream position.
        let positions: Vec<Position> = txns.iter().map(|t| t.position.clone()).collect();
        assert_eq!(
            positions,
            vec![
                Position::Snapshot(1),
                Position::Snapshot(2),
                Position::Seq(0)
            ]
        );
        assert!(
            changes
                .iter()
                .all(|c| c.op == Op::Read && c.after.is_some())
        );
        run_sql(&mut conn, "INSERT INTO customers(id, name) VALUES (6, 'f')").await;
        let t = h.next().await;
        assert_eq!(
            (t.position, t.changes[0].op),
            (Position::Seq(1), Op::Insert)
        );
        h.stop().await;
    }

    /// No checkpoint, but the store was restored from snapshots (a source
    /// that had not routed anything when they were written): the snapshot
    /// clears the source's tables first, or rows deleted since would stay.
    #[tokio::test]
    async fn snapshot_into_a_restored_store_clears_the_tables_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let mut conn = db(&path).await;
        run_sql(&mut conn, "INSERT INTO customers(id, name) VALUES (1,'a')").await;
        let mut h = start_with(&path, &["customers"], 100, None, true);
        let t = h.next().await;
        let ops: Vec<Op> = t.changes.iter().map(|c| c.op).collect();
        assert_eq!(ops, vec![Op::Truncate, Op::Read]);
        h.stop().await;
        let mut h = start_with(&path, &["customers"], 100, None, false);
        let t = h.next().await;
        let ops: Vec<Op> = t.changes.iter().map(|c| c.op).collect();
        assert_eq!(ops, vec![Op::Read]);
        h.stop().await;
    }

    #[tokio::test]
    async fn prunes_only_what_is_durable_and_dead_letters_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let mut conn = db(&path).await;
        let mut h = start(&path, &["customers"], 100, None);
        h.streaming().await;
        run_sql(
            &mut conn,
            "INSERT INTO customers(id, name) VALUES (1, 'x'), (2, 'y'), (3, 'z'); \
             INSERT INTO _fabric_changelog(tbl, op, new) VALUES ('customers', 'I', 'not json');",
        )
        .await;
        while h.next().await.position != Position::Seq(4) {}
        assert_eq!(h.dead.count("crm"), 1);
        h.durable.send(Some(Position::Seq(2))).unwrap();
        let min_sql = "SELECT MIN(seq) FROM _fabric_changelog";
        for _ in 0..500 {
            let min: i64 = sqlx::query_scalar(min_sql)
                .fetch_one(&mut conn)
                .await
                .unwrap();
            if min == 3 {
                return h.stop().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the changelog was not pruned up to seq 2");
    }

    #[tokio::test]
    async fn resume_streams_after_the_position_and_resnapshots_after_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let mut conn = db(&path).await;
        let h = start(&path, &["customers"], 100, None);
        h.streaming().await;
        h.stop().await;
        run_sql(
            &mut conn,
            "INSERT INTO customers(id, name) VALUES (1, 'x'), (2, 'y'), (3, 'z')",
        )
        .await;
        // No gap: only seq 3 is new.
        let mut h = start(&path, &["customers"], 100, Some(Position::Seq(2)));
        let t = h.next().await;
        assert_eq!((t.position, t.changes.len()), (Position::Seq(3), 1));
        h.stop().await;
        // Seqs 2 and 3 pruned beyond the resume position 1: lost, snapshot again.
        run_sql(&mut conn, "DELETE FROM _fabric_changelog").await;
        let mut h = start(&path, &["customers"], 100, Some(Position::Seq(1)));
        let t = h.next().await;
        assert_eq!(
            (t.position, t.changes[0].op),
            (Position::Seq(3), Op::Truncate)
        );
        assert_eq!(t.changes.iter().filter(|c| c.op == Op::Read).count(), 3);
        h.stop().await;
        // A replaced database (changelog behind the position) never moves positions back.
        let mut h = start(&path, &["customers"], 100, Some(Position::Seq(50)));
        assert_eq!(h.next().await.position, Position::Seq(50));
        run_sql(&mut conn, "INSERT INTO customers(id, name) VALUES (9, 'x')").await;
        assert_eq!(h.next().await.position, Position::Seq(51));
        h.stop().await;
    }

    #[tokio::test]
    async fn missing_file_or_table_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let e = start(&path, &["customers"], 100, None)
            .task
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            !e.retryable() && e.to_string().contains("crm.db does not exist"),
            "{e}"
        );
        let _conn = db(&path).await;
        let h = start(&path, &["customers", "orders"], 100, None);
        let e = h.task.await.unwrap().unwrap_err();
        assert!(
            !e.retryable() && e.to_string().contains("table orders does not exist"),
            "{e}"
        );
        assert!(source(&path, &["other.customers"], 100).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_the_demo_while_it_mutates() {
        let dir = tempfile::tempdir().unwrap();
        crate::demo::ensure(dir.path(), 100).await.unwrap();
        let path = dir.path().join(crate::demo::BILLING_DB);
        let mut h = start(&path, &["invoices", "payments"], 1000, None);
        let stop = CancellationToken::new();
        let (d, s) = (dir.path().to_path_buf(), stop.clone());
        let mutator = tokio::spawn(async move { crate::demo::mutate(&d, 300.0, s).await });
        let mut seen = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while tokio::time::Instant::now() < deadline {
            for c in h.next().await.changes {
                let row = c.image().unwrap();
                assert!(
                    matches!(row["amount"], Value::Decimal(ref a) if a.len() - a.find('.').unwrap() == 3),
                    "{row:?}"
                );
                assert!(
                    matches!(
                        row.get("issued_on").or(row.get("paid_at")),
                        Some(Value::Date(_) | Value::Timestamp(_))
                    ),
                    "{row:?}"
                );
                seen.insert((c.table, c.op.as_str()));
            }
        }
        stop.cancel();
        assert!(mutator.await.unwrap().unwrap() > 50);
        assert_eq!(h.dead.count("crm"), 0);
        assert!(seen.len() >= 5, "{seen:?}");
        h.stop().await;
    }
}
