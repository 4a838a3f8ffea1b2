//! The `sql_poll` connector: query-based change capture from PostgreSQL,
//! MySQL/MariaDB or SQLite tables that carry a column growing with every
//! insert and update (`cursor_column`: an integer, e.g. from a sequence, or a
//! timestamp).
//!
//! How it reads. Each configured table is read with
//! `SELECT <cols> FROM <table> WHERE <cursor> > <low> ORDER BY <cursor> LIMIT <batch_size>`.
//! Every column is cast to text in SQL (hex for binary data; MySQL floats are
//! read natively, since MariaDB prints them with 15 digits) and parsed by the
//! type the catalog gives it (`Int`, `Decimal` exact text, `Float`, `Bool`,
//! `Timestamp` micros UTC, `Date`, `Uuid`, `Json`, `Bytes`, else `Text`);
//! SQLite rows are read as `json_object`s and typed like the `sqlite`
//! connector does. Sessions run in UTC: naive timestamps (`timestamp`,
//! `DATETIME`) are taken as UTC. Timestamp cursors are microseconds since the
//! epoch (SQLite: milliseconds, as `julianday` gives them, times 1000).
//!
//! First start (no resume position, or a snapshot position): every row of
//! every table, in cursor order, one streaming query per table, sent in chunks
//! of `batch_size` rows as `Op::Read`. Every chunk but the last carries
//! `Position::Snapshot(n)`, so a crash in the middle restarts the snapshot;
//! the last one carries the stream position. Then polling starts.
//!
//! Polling emits `Op::Update` with only `after` for rows inserted or updated
//! (a poller cannot tell the two apart; the store upserts by primary key) and
//! `Op::Delete` with `before` for rows whose `soft_delete_column` is set
//! (null, false and 0 mean live; anything else deleted).
//!
//! Out-of-order commits. `cursor > highest seen` loses a row whose
//! transaction took its cursor value before another one committed a higher
//! value but committed after the poll that saw the higher one. The safety
//! window `W` (`safety_window`: a count for integer cursors, default 1000; a
//! duration for timestamps, default 5s) bounds that: **assumption A**: a row
//! version not yet visible to a read has a cursor value above `T - W`
//! (timestamps, `T` the database clock read just before the query) or above
//! `H - W` (integers, `H` the highest cursor value seen up to and including
//! that read: at most `W` values are taken while a transaction is in flight).
//! Each table keeps a *safe* cursor `S`, its invariant: every row version
//! with a cursor value `<= S` has been handed on. A poll is
//! a run of pages starting at `low = S`; when it ends with a short page every
//! visible row above `low` was read, and by A every row not visible had a
//! value above the poll's base `B` (`T0 - W`, `T0` the clock before its first
//! page, or `H - W` with `H` the highest value seen through its first page),
//! so `S := max(S, B)`. A full page ending at value `h` proves only the
//! values below `h` (ties at `h` may continue), so `S := max(S, min(h - 1,
//! B))` and the next page reads from `h - 1`; a full page of one value `h`
//! is followed by an unbounded streaming read of `cursor = h`. Rows re-read
//! inside the window are de-duplicated: per primary key (from the catalog,
//! else the entity config) a 64-bit hash of the row's text and its cursor
//! value is kept while the value is above `S` (only those can be read
//! again), so a row is emitted again only when it changed. PostgreSQL's
//! `pg_snapshot_xmin` is not used: it stalls every poller behind any long or
//! idle-in-transaction session of the cluster, and neither `nextval()` nor
//! `now()` is tied to the transaction id, so it is not sufficient alone.
//!
//! Position. One `Position::Cursor(p)` for the source: `p` is the lowest safe
//! cursor over its tables (never decreasing). Resuming from it sets every
//! table's safe cursor to `p`: nothing committed after it is skipped, rows
//! between a table's own safe cursor and `p` are sent again (idempotent).
//! Tables are polled in lockstep: one page of each per round, all read in
//! one read-only repeatable-read transaction (SQLite: one read transaction),
//! and a round's changes go out as one transaction, stamped after every
//! table was read: a source transaction that wrote several tables arrives
//! whole unless a page is full. The snapshot, too, reads all tables in one
//! such transaction.
//! When a round sends nothing but the position moved, an empty transaction
//! (at most one a second) carries the new position.
//!
//! LIMITS:
//! - Deletes are seen only through `soft_delete_column`; hard deletes never.
//! - Several updates of a row between two polls are seen as one change;
//!   updates carry no `before` image, so an update that moves a row to
//!   another entity leaves it in the old one.
//! - The cursor column must grow on every insert and update, over the whole
//!   table (a sequence or a commit-time clock, not a per-row version), and a
//!   transaction must become visible within the safety window of the cursor
//!   values it writes (for `now()` in PostgreSQL: its start time). Naive
//!   timestamp cursors must be written in UTC (or the window must cover the
//!   offset). Rows whose cursor is NULL, or not a finite timestamp in years
//!   1–9999, are seen by the snapshot only.
//! - All tables of a source share one position: integer cursors of unrelated
//!   sequences, or an idle integer table, hold it back, so a restart re-sends
//!   more (use one source per table for those). After a restart whose
//!   catch-up needs more than one page per table, entities restored from a
//!   snapshot may have seen a position above the one the catch-up carries and
//!   skip it as stale (a richer position, ordered by read time, would fix it).
//! - The de-duplication memory is lost on restart: rows inside the window are
//!   sent again once.
//! - Column lists and types are read at start: schema changes take effect at
//!   the next start.

use super::sqlite::decode_value as decode_sqlite_value;
use super::{Source, SourceContext, SourceError, now_micros};
use crate::config::{Config, SourceConfig};
use crate::event::value::{parse_date, parse_timestamp};
use crate::event::{Op, Position, Row, RowChange, Value};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError, MySqlRow};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteRow};
use sqlx::{AssertSqlSafe, Column as _, ConnectOptions, Row as _, TypeInfo as _};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default safety window of integer cursors: values allocated while a
/// transaction is in flight.
const DEFAULT_COUNT_WINDOW: i64 = 1000;
/// Default safety window of timestamp cursors: how long a transaction may
/// take to commit after taking its cursor value.
const DEFAULT_TIME_WINDOW: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this often, an empty transaction moves the position when idle.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// The lowest safe cursor: nothing is known to be read.
const NOTHING: i64 = i64::MIN;

/// The `sql_poll` connector, built from its config.
pub struct SqlPollSource {
    name: String,
    target: Target,
    tables: Vec<String>,
    cursor_column: String,
    soft_delete_column: Option<String>,
    window: Window,
    poll_interval: Duration,
    batch_size: usize,
    /// Primary keys named by the entity config, by source table.
    config_keys: HashMap<String, Vec<String>>,
}

enum Target {
    Postgres(Box<PgConnectOptions>),
    MySql(Box<MySqlConnectOptions>),
    Sqlite(PathBuf),
}

/// `safety_window` as configured; its unit depends on the cursor type.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Window {
    Default,
    Count(i64),
    Time(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CursorKind {
    Int,
    Timestamp,
}

/// How a column's text is turned into a [`Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Int,
    Decimal,
    Float,
    Bool,
    Timestamp,
    Date,
    Uuid,
    Json,
    Bytes,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Postgres,
    MySql,
    Sqlite,
}

struct Column {
    name: String,
    ty: Ty,
    /// The declared type (SQLite) or type name (others).
    decl: String,
    /// The select expression giving the column as text.
    expr: String,
}

/// A polled table as found in the catalog, with its SQL.
struct Table {
    /// The name events carry: exactly as in the source's `tables`.
    configured: String,
    flavor: Flavor,
    columns: Vec<Column>,
    pk: Vec<usize>,
    soft_delete: Option<usize>,
    kind: CursorKind,
    window: i64,
    /// `SELECT <select> FROM <from>`: the columns' text, then the cursor value.
    select: String,
    from: String,
    /// The cursor expression compared and ordered by.
    order: String,
    /// The placeholder of a bound on `order`.
    placeholder: String,
    /// Bounds are bound as timestamp text (else as integers).
    bind_text: bool,
}

/// Which rows a query reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Filter {
    All,
    NotNull,
    After(i64),
    At(i64),
}

#[derive(Debug, Clone)]
enum Bind {
    Int(i64),
    Text(String),
}

/// One result row: every column as text (NULL as `None`).
type RawRow = Vec<Option<String>>;

enum Conn {
    Postgres(PgConnection),
    MySql(MySqlConnection),
    Sqlite(SqliteConnection),
}

impl SqlPollSource {
    pub fn new(cfg: &SourceConfig, config: &Config) -> Result<Self, SourceError> {
        let err = |reason: String| SourceError::Config {
            source_name: cfg.name.clone(),
            reason,
        };
        let url = cfg
            .url
            .as_deref()
            .ok_or_else(|| err("a sql_poll source needs a url".into()))?;
        if cfg.tables.is_empty() {
            return Err(err("a sql_poll source needs the tables to capture".into()));
        }
        let cursor_column = match cfg.cursor_column.as_deref().map(str::trim) {
            Some(c) if !c.is_empty() => c.to_string(),
            _ => {
                return Err(err(
                    "a sql_poll source needs the column that grows with every change".into(),
                ));
            }
        };
        let bad_url = |e: sqlx::Error| err(format!("bad url: {e}"));
        let target = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)
                .map_err(bad_url)?
                .application_name("entity-fabric sql_poll")
                .options([("TimeZone", "UTC"), ("default_transaction_read_only", "on")])
                .disable_statement_logging();
            Target::Postgres(Box::new(opts))
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let opts = MySqlConnectOptions::from_str(url)
                .map_err(bad_url)?
                .timezone(Some("+00:00".to_string()))
                .disable_statement_logging();
            Target::MySql(Box::new(opts))
        } else if let Some(rest) = url.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() || path == ":memory:" {
                return Err(err(format!("url {url:?} names no database file")));
            }
            Target::Sqlite(config.resolve(std::path::Path::new(path)))
        } else {
            return Err(err(
                "the url must start with postgres://, mysql://, mariadb:// or sqlite:".into(),
            ));
        };
        let window = match cfg.safety_window.as_deref().map(str::trim) {
            None => Window::Default,
            Some(w) => match w.parse::<i64>() {
                Ok(n) if n >= 0 => Window::Count(n),
                Ok(_) => return Err(err("safety_window must not be negative".into())),
                Err(_) => match humantime::parse_duration(w) {
                    Ok(d) => Window::Time(d),
                    Err(_) => {
                        return Err(err(format!(
                            "safety_window {w:?} is neither a count (\"1000\") nor a duration (\"5s\")"
                        )));
                    }
                },
            },
        };
        let mut config_keys = HashMap::new();
        for e in &config.entities {
            for t in e.tables.iter().filter(|t| t.source == cfg.name) {
                if !t.primary_key.is_empty() {
                    config_keys.insert(t.from.clone(), t.primary_key.clone());
                }
            }
        }
        Ok(SqlPollSource {
            name: cfg.name.clone(),
            target,
            tables: cfg.tables.clone(),
            cursor_column,
            soft_delete_column: cfg.soft_delete_column.clone(),
            window,
            poll_interval: cfg.poll_interval(),
            batch_size: cfg.batch_size().max(1),
            config_keys,
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

    async fn connect(&self) -> Result<Conn, SourceError> {
        let connect = async {
            match &self.target {
                Target::Postgres(o) => o.connect().await.map(Conn::Postgres),
                Target::MySql(o) => o.connect().await.map(Conn::MySql),
                Target::Sqlite(path) => {
                    let opts = SqliteConnectOptions::new()
                        .filename(path)
                        .create_if_missing(false)
                        .busy_timeout(Duration::from_secs(5))
                        .disable_statement_logging();
                    opts.connect().await.map(Conn::Sqlite)
                }
            }
        };
        if let Target::Sqlite(path) = &self.target
            && !tokio::fs::try_exists(path).await.unwrap_or(false)
        {
            return Err(self.config_err(format!("database file {} does not exist", path.display())));
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(self.connect_error(e)),
            Err(_) => Err(SourceError::external(
                &self.name,
                "connect",
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            )),
        }
    }

    /// A missing database is the config's fault; anything else may pass.
    fn connect_error(&self, e: sqlx::Error) -> SourceError {
        if let sqlx::Error::Database(db) = &e {
            let pg_missing = db.code().as_deref() == Some("3D000");
            let my_missing = db
                .try_downcast_ref::<MySqlDatabaseError>()
                .is_some_and(|m| m.number() == 1049);
            if pg_missing || my_missing {
                return self.config_err(format!("the database does not exist: {}", db.message()));
            }
        }
        SourceError::external(&self.name, "connect", e)
    }

    /// Reads every table's columns and key, and checks the config against them.
    async fn describe(&self, conn: &mut Conn) -> Result<Vec<Table>, SourceError> {
        let mut tables: Vec<Table> = Vec::new();
        for configured in &self.tables {
            let (from, columns, catalog_pk) = match conn.flavor() {
                Flavor::Postgres => self.describe_pg(conn, configured).await?,
                Flavor::MySql => self.describe_mysql(conn, configured).await?,
                Flavor::Sqlite => self.describe_sqlite(conn, configured).await?,
            };
            let t = self.table(conn.flavor(), configured, from, columns, catalog_pk)?;
            if let Some(first) = tables.first()
                && first.kind != t.kind
            {
                return Err(self.config_err(format!(
                    "cursor column {} is {} in table {} but {} in table {}: one source polls one kind of cursor",
                    self.cursor_column,
                    kind_name(first.kind),
                    first.configured,
                    kind_name(t.kind),
                    t.configured
                )));
            }
            tables.push(t);
        }
        Ok(tables)
    }

    /// Builds a [`Table`] from its catalog entry.
    fn table(
        &self,
        flavor: Flavor,
        configured: &str,
        from: String,
        columns: Vec<Column>,
        catalog_pk: Vec<String>,
    ) -> Result<Table, SourceError> {
        let find = |name: &str| {
            columns.iter().position(|c| c.name == name).or_else(|| {
                let mut it = columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.name.eq_ignore_ascii_case(name));
                match (it.next(), it.next()) {
                    (Some((i, _)), None) => Some(i),
                    _ => None,
                }
            })
        };
        let no_column = |col: &str, role: &str| {
            self.config_err(format!("table {configured} has no column {col} ({role})"))
        };
        let cursor = find(&self.cursor_column)
            .ok_or_else(|| no_column(&self.cursor_column, "cursor_column"))?;
        let soft_delete = match &self.soft_delete_column {
            Some(c) => Some(find(c).ok_or_else(|| no_column(c, "soft_delete_column"))?),
            None => None,
        };
        let c = &columns[cursor];
        let kind = match c.ty {
            Ty::Int => CursorKind::Int,
            Ty::Timestamp => CursorKind::Timestamp,
            _ => {
                return Err(self.config_err(format!(
                    "cursor column {} of table {configured} is {}: it must be an integer or a timestamp",
                    c.name, c.decl
                )));
            }
        };
        let window = self.window_for(kind, configured, &c.name)?;
        let key_names = if catalog_pk.is_empty() {
            match self.config_keys.get(configured) {
                Some(k) => k.clone(),
                None => {
                    return Err(self.config_err(format!(
                        "table {configured} has no primary key: declare one or name it in the entity's primary_key"
                    )));
                }
            }
        } else {
            if let Some(k) = self.config_keys.get(configured)
                && !k.iter().eq(catalog_pk.iter())
            {
                tracing::warn!(table = configured, catalog = ?catalog_pk, config = ?k, "the entity config names another primary key than the catalog; de-duplicating by the catalog's");
            }
            catalog_pk
        };
        let pk = key_names
            .iter()
            .map(|k| find(k).ok_or_else(|| no_column(k, "primary key")))
            .collect::<Result<Vec<usize>, _>>()?;
        let q = quote(flavor, &c.name);
        let (value, order, placeholder, bind_text) = match (flavor, kind) {
            (Flavor::Postgres, CursorKind::Int) => (format!("{q}::text"), q, "$1".into(), false),
            (Flavor::Postgres, CursorKind::Timestamp) => {
                let ph = format!("$1::{}", c.decl);
                (format!("{q}::text"), q, ph, true)
            }
            (Flavor::MySql, CursorKind::Int) => {
                (format!("CAST({q} AS CHAR)"), q, "?".into(), false)
            }
            (Flavor::MySql, CursorKind::Timestamp) => (
                format!("CAST({q} AS CHAR)"),
                q,
                "CAST(? AS DATETIME(6))".into(),
                true,
            ),
            (Flavor::Sqlite, CursorKind::Int) => {
                (format!("CAST({q} AS TEXT)"), q, "?".into(), false)
            }
            (Flavor::Sqlite, CursorKind::Timestamp) => {
                // julianday keeps whole milliseconds: round back to them, exactly.
                let e = format!(
                    "(CAST(round((julianday({q}) - 2440587.5) * 86400000.0) AS INTEGER) * 1000)"
                );
                (format!("CAST({e} AS TEXT)"), e, "?".into(), false)
            }
        };
        let cells = cells_select(flavor, &columns);
        Ok(Table {
            configured: configured.to_string(),
            flavor,
            select: format!("{cells}, {value}"),
            columns,
            pk,
            soft_delete,
            kind,
            window,
            from,
            order,
            placeholder,
            bind_text,
        })
    }

    fn window_for(&self, kind: CursorKind, table: &str, column: &str) -> Result<i64, SourceError> {
        match (kind, self.window) {
            (CursorKind::Int, Window::Default) => Ok(DEFAULT_COUNT_WINDOW),
            (CursorKind::Int, Window::Count(n)) => Ok(n),
            (CursorKind::Timestamp, Window::Default) => Ok(micros(DEFAULT_TIME_WINDOW)),
            (CursorKind::Timestamp, Window::Time(d)) => Ok(micros(d)),
            (CursorKind::Int, Window::Time(_)) => Err(self.config_err(format!(
                "safety_window is a duration but cursor column {column} of table {table} is an integer: give a count of values, e.g. \"1000\""
            ))),
            (CursorKind::Timestamp, Window::Count(_)) => Err(self.config_err(format!(
                "safety_window is a count but cursor column {column} of table {table} is a timestamp: give a duration, e.g. \"5s\""
            ))),
        }
    }

    async fn describe_pg(
        &self,
        conn: &mut Conn,
        configured: &str,
    ) -> Result<(String, Vec<Column>, Vec<String>), SourceError> {
        let ext = self.ext("read the catalog");
        let name = conn
            .fetch_all(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass($1)",
                vec![Bind::Text(configured.into())],
            )
            .await
            .map_err(|e| match &e {
                // A name that does not parse (e.g. too many dots) is the config's fault.
                sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("42")) => {
                    self.config_err(format!("table {configured}: {}", db.message()))
                }
                _ => ext(e),
            })?;
        let Some(from) = name.into_iter().next().and_then(|r| first_text(&r)) else {
            return Err(self.config_err(format!("table {configured} does not exist")));
        };
        let cols = conn
            .fetch_all(
                "SELECT a.attname::text, COALESCE(bt.typname, t.typname)::text, \
                 COALESCE(bt.typcategory, t.typcategory)::text \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                vec![Bind::Text(configured.into())],
            )
            .await
            .map_err(&ext)?;
        let columns = cols
            .iter()
            .map(|r| {
                let (name, typ, cat) = (text_at(r, 0), text_at(r, 1), text_at(r, 2));
                let ty = pg_ty(&typ, &cat);
                let q = quote(Flavor::Postgres, &name);
                let expr = match ty {
                    Ty::Bytes => format!("encode({q}, 'hex')"),
                    Ty::Json if cat == "A" => format!("to_jsonb({q})::text"),
                    _ => format!("{q}::text"),
                };
                Column {
                    name,
                    ty,
                    decl: typ,
                    expr,
                }
            })
            .collect();
        let pk = conn
            .fetch_all(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = to_regclass($1) AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                vec![Bind::Text(configured.into())],
            )
            .await
            .map_err(&ext)?;
        Ok((from, columns, pk.iter().map(|r| text_at(r, 0)).collect()))
    }

    async fn describe_mysql(
        &self,
        conn: &mut Conn,
        configured: &str,
    ) -> Result<(String, Vec<Column>, Vec<String>), SourceError> {
        let ext = self.ext("read the catalog");
        let (schema, name) = match configured.split_once('.') {
            Some((s, n)) => (s.to_string(), n.to_string()),
            None => {
                let db = conn
                    .fetch_all("SELECT CAST(DATABASE() AS CHAR)", vec![])
                    .await
                    .map_err(&ext)?;
                match db.into_iter().next().and_then(|r| first_text(&r)) {
                    Some(db) => (db, configured.to_string()),
                    None => {
                        return Err(self.config_err(format!(
                            "table {configured} needs a database: write it as database.table or put the database in the url"
                        )));
                    }
                }
            }
        };
        let binds = || vec![Bind::Text(schema.clone()), Bind::Text(name.clone())];
        let cols = conn
            .fetch_all(
                "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(COLUMN_TYPE AS CHAR) \
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
                 ORDER BY ORDINAL_POSITION",
                binds(),
            )
            .await
            .map_err(&ext)?;
        if cols.is_empty() {
            return Err(self.config_err(format!("table {configured} does not exist")));
        }
        // MariaDB's JSON is LONGTEXT with a json_valid check; MySQL's has no
        // TABLE_NAME there, and its JSON type says so itself.
        let json_checked: Vec<String> = conn
            .fetch_all(
                "SELECT CAST(CHECK_CLAUSE AS CHAR) FROM information_schema.CHECK_CONSTRAINTS \
                 WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?",
                binds(),
            )
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|r| json_valid_column(&text_at(r, 0)))
            .collect();
        let columns = cols
            .iter()
            .map(|r| {
                let (name, data_type, column_type) = (text_at(r, 0), text_at(r, 1), text_at(r, 2));
                let ty = if json_checked.contains(&name) {
                    Ty::Json
                } else {
                    mysql_ty(&data_type, &column_type)
                };
                let q = quote(Flavor::MySql, &name);
                let expr = match (ty, data_type.to_ascii_lowercase().as_str()) {
                    (Ty::Bytes, _) => format!("HEX({q})"),
                    // Read natively: CAST prints doubles with 15 digits.
                    (Ty::Float, _) => q,
                    (_, "bit") => format!("CAST(CAST({q} AS UNSIGNED) AS CHAR)"),
                    _ => format!("CAST({q} AS CHAR)"),
                };
                Column {
                    name,
                    ty,
                    decl: column_type,
                    expr,
                }
            })
            .collect();
        let pk = conn
            .fetch_all(
                "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.KEY_COLUMN_USAGE \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
                 ORDER BY ORDINAL_POSITION",
                binds(),
            )
            .await
            .map_err(&ext)?;
        let from = format!(
            "{}.{}",
            quote(Flavor::MySql, &schema),
            quote(Flavor::MySql, &name)
        );
        Ok((from, columns, pk.iter().map(|r| text_at(r, 0)).collect()))
    }

    async fn describe_sqlite(
        &self,
        conn: &mut Conn,
        configured: &str,
    ) -> Result<(String, Vec<Column>, Vec<String>), SourceError> {
        let ext = self.ext("read the catalog");
        let bare = match configured.split_once('.') {
            None => configured,
            Some((schema, bare)) if schema.eq_ignore_ascii_case("main") => bare,
            Some(_) => {
                return Err(self.config_err(format!(
                    "table {configured}: only tables of the main schema can be polled"
                )));
            }
        };
        let found = conn
            .fetch_all(
                "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') AND name = ? COLLATE NOCASE",
                vec![Bind::Text(bare.into())],
            )
            .await
            .map_err(&ext)?;
        let Some(name) = found.into_iter().next().and_then(|r| first_text(&r)) else {
            return Err(self.config_err(format!("table {configured} does not exist")));
        };
        let cols = conn
            .fetch_all(
                "SELECT name, type, CAST(pk AS TEXT) FROM pragma_table_info(?, 'main') ORDER BY cid",
                vec![Bind::Text(name.clone())],
            )
            .await
            .map_err(&ext)?;
        let mut pk: Vec<(i64, String)> = Vec::new();
        let columns = cols
            .iter()
            .map(|r| {
                let (col, decl) = (text_at(r, 0), text_at(r, 1));
                if let Ok(n @ 1..) = text_at(r, 2).parse::<i64>() {
                    pk.push((n, col.clone()));
                }
                Column {
                    ty: sqlite_ty(&decl),
                    expr: String::new(),
                    name: col,
                    decl,
                }
            })
            .collect();
        pk.sort();
        let from = format!("main.{}", quote(Flavor::Sqlite, &name));
        Ok((from, columns, pk.into_iter().map(|(_, c)| c).collect()))
    }
}

impl Conn {
    fn flavor(&self) -> Flavor {
        match self {
            Conn::Postgres(_) => Flavor::Postgres,
            Conn::MySql(_) => Flavor::MySql,
            Conn::Sqlite(_) => Flavor::Sqlite,
        }
    }

    /// Streams the rows of one statement, every column as text.
    fn fetch(
        &mut self,
        sql: String,
        binds: Vec<Bind>,
    ) -> BoxStream<'_, Result<RawRow, sqlx::Error>> {
        macro_rules! run {
            ($conn:expr, $cells:expr) => {{
                let mut q = sqlx::query(AssertSqlSafe(sql));
                for b in binds {
                    q = match b {
                        Bind::Int(i) => q.bind(i),
                        Bind::Text(s) => q.bind(s),
                    };
                }
                q.fetch($conn)
                    .map(|r| r.and_then(|row| $cells(&row)))
                    .boxed()
            }};
        }
        match self {
            Conn::Postgres(c) => run!(c, pg_cells),
            Conn::MySql(c) => run!(c, mysql_cells),
            Conn::Sqlite(c) => run!(c, sqlite_cells),
        }
    }

    async fn fetch_all(
        &mut self,
        sql: &'static str,
        binds: Vec<Bind>,
    ) -> Result<Vec<RawRow>, sqlx::Error> {
        self.fetch(sql.to_string(), binds).try_collect().await
    }

    /// Starts a read-only transaction whose reads share one snapshot.
    async fn begin_read(&mut self) -> Result<(), sqlx::Error> {
        let sql = match self {
            Conn::Postgres(_) => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            Conn::MySql(_) => {
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; \
                 START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY"
            }
            Conn::Sqlite(_) => "BEGIN",
        };
        self.execute(sql).await
    }

    async fn end_read(&mut self) -> Result<(), sqlx::Error> {
        self.execute("COMMIT").await
    }

    async fn execute(&mut self, sql: &'static str) -> Result<(), sqlx::Error> {
        match self {
            Conn::Postgres(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Conn::MySql(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            Conn::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
        }
    }

    /// The database's clock, microseconds since the epoch: the `T` of the
    /// safety window, read before the query it covers.
    async fn clock(&mut self) -> Result<i64, sqlx::Error> {
        let sql = match self {
            Conn::Postgres(_) => {
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8::text"
            }
            Conn::MySql(_) => {
                "SELECT CAST(CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED) AS CHAR)"
            }
            Conn::Sqlite(_) => return Ok(now_micros()),
        };
        let rows = self.fetch_all(sql, vec![]).await?;
        rows.first()
            .and_then(first_text)
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| sqlx::Error::Protocol("the database clock is unreadable".into()))
    }
}

fn pg_cells(row: &PgRow) -> Result<RawRow, sqlx::Error> {
    (0..row.len()).map(|i| row.try_get(i)).collect()
}

fn sqlite_cells(row: &SqliteRow) -> Result<RawRow, sqlx::Error> {
    (0..row.len()).map(|i| row.try_get(i)).collect()
}

/// Text columns as text; floats (read natively) in Rust's exact shortest
/// form, FLOAT as f32 so that 0.1 stays 0.1.
fn mysql_cells(row: &MySqlRow) -> Result<RawRow, sqlx::Error> {
    (0..row.len())
        .map(|i| match row.column(i).type_info().name() {
            "FLOAT" => row
                .try_get::<Option<f32>, _>(i)
                .map(|v| v.map(|f| f.to_string())),
            "DOUBLE" => row
                .try_get::<Option<f64>, _>(i)
                .map(|v| v.map(|f| f.to_string())),
            _ => row.try_get(i),
        })
        .collect()
}

fn first_text(r: &RawRow) -> Option<String> {
    r.first().cloned().flatten()
}

fn text_at(r: &RawRow, i: usize) -> String {
    r.get(i).cloned().flatten().unwrap_or_default()
}

fn quote(flavor: Flavor, ident: &str) -> String {
    match flavor {
        Flavor::MySql => format!("`{}`", ident.replace('`', "``")),
        _ => format!("\"{}\"", ident.replace('"', "\"\"")),
    }
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `json_object` of every SQLite column; blobs, which JSON cannot hold,
/// become `{"hex": ...}` (as the `sqlite` connector writes them).
fn row_json(columns: &[Column]) -> String {
    let args: Vec<String> = columns
        .iter()
        .map(|c| {
            let r = quote(Flavor::Sqlite, &c.name);
            format!(
                "{}, CASE WHEN typeof({r}) = 'blob' THEN json_object('hex', hex({r})) ELSE {r} END",
                lit(&c.name)
            )
        })
        .collect();
    format!("json_object({})", args.join(", "))
}

fn kind_name(k: CursorKind) -> &'static str {
    match k {
        CursorKind::Int => "an integer",
        CursorKind::Timestamp => "a timestamp",
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn pg_ty(typname: &str, category: &str) -> Ty {
    match typname {
        "int2" | "int4" | "int8" => Ty::Int,
        "numeric" => Ty::Decimal,
        "float4" | "float8" => Ty::Float,
        "bool" => Ty::Bool,
        "timestamp" | "timestamptz" => Ty::Timestamp,
        "date" => Ty::Date,
        "uuid" => Ty::Uuid,
        "json" | "jsonb" => Ty::Json,
        "bytea" => Ty::Bytes,
        // Arrays are read through to_jsonb.
        _ if category == "A" => Ty::Json,
        _ => Ty::Text,
    }
}

fn mysql_ty(data_type: &str, column_type: &str) -> Ty {
    let column_type = column_type.to_ascii_lowercase();
    match data_type.to_ascii_lowercase().as_str() {
        "tinyint" if column_type.starts_with("tinyint(1)") => Ty::Bool,
        "bool" | "boolean" => Ty::Bool,
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "year" | "bit" => {
            Ty::Int
        }
        "decimal" | "numeric" => Ty::Decimal,
        "float" | "double" | "real" | "double precision" => Ty::Float,
        "datetime" | "timestamp" => Ty::Timestamp,
        "date" => Ty::Date,
        "uuid" => Ty::Uuid,
        "json" => Ty::Json,
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" | "geometry"
        | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
        | "multipolygon" | "geometrycollection" => Ty::Bytes,
        _ => Ty::Text,
    }
}

/// The cursor-relevant type of a SQLite declared type (values are typed by
/// the `sqlite` connector's rules).
fn sqlite_ty(decl: &str) -> Ty {
    let d = decl.to_ascii_uppercase();
    if d.contains("TIMESTAMP") || d.contains("DATETIME") {
        Ty::Timestamp
    } else if d.contains("INT") {
        Ty::Int
    } else {
        Ty::Text
    }
}

/// The column of a MariaDB `json_valid(`col`)` check.
fn json_valid_column(clause: &str) -> Option<String> {
    let inner = clause
        .trim()
        .strip_prefix("json_valid(")?
        .strip_suffix(')')?
        .trim();
    let name = inner.strip_prefix('`')?.strip_suffix('`')?;
    Some(name.replace("``", "`"))
}

/// A column's text as a value of its type; text that does not fit is kept as text.
fn decode_text(ty: Ty, s: &str) -> Value {
    let text = || Value::Text(s.to_string());
    match ty {
        Ty::Int => match s.parse::<i64>() {
            Ok(i) => Value::Int(i),
            // An unsigned BIGINT beyond i64 stays exact.
            Err(_) if is_decimal(s) => Value::Decimal(s.to_string()),
            Err(_) => text(),
        },
        Ty::Decimal if is_decimal(s) => Value::Decimal(s.to_string()),
        Ty::Float => s.parse::<f64>().map_or_else(|_| text(), Value::Float),
        Ty::Bool => match s.to_ascii_lowercase().as_str() {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            n => n
                .parse::<i64>()
                .map_or_else(|_| text(), |n| Value::Bool(n != 0)),
        },
        Ty::Timestamp => parse_db_timestamp(s).map_or_else(text, Value::Timestamp),
        Ty::Date => parse_date(s).map_or_else(text, Value::Date),
        Ty::Uuid => {
            uuid::Uuid::parse_str(s).map_or_else(|_| text(), |u| Value::Uuid(*u.as_bytes()))
        }
        Ty::Json => Value::Json(s.to_string()),
        Ty::Bytes => hex::decode(s).map_or_else(|_| text(), Value::Bytes),
        Ty::Decimal | Ty::Text => text(),
    }
}

fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    digits.bytes().any(|b| b.is_ascii_digit())
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1
}

/// Microseconds since the epoch of a timestamp as the databases print it in
/// a UTC session (`2024-03-01 10:00:00.5+00`, `2024-03-01 10:00:00.500000`).
fn parse_db_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let naive = s
        .strip_suffix("+00")
        .or_else(|| s.strip_suffix("+00:00"))
        .unwrap_or(s);
    parse_timestamp(naive).or_else(|| parse_timestamp(s))
}

/// A timestamp bound as text both databases read (UTC, microseconds);
/// `None` outside years 1–9999.
fn format_bound(micros: i64) -> Option<String> {
    use chrono::Datelike;
    let t = chrono::DateTime::from_timestamp_micros(micros)?;
    (1..=9999)
        .contains(&t.year())
        .then(|| t.naive_utc().format("%Y-%m-%d %H:%M:%S%.6f").to_string())
}

impl Table {
    /// The statement reading `filter`, at most `limit` rows, in cursor order.
    fn query(&self, filter: Filter, limit: Option<usize>) -> Option<(String, Vec<Bind>)> {
        let mut sql = format!("SELECT {} FROM {}", self.select, self.from);
        let mut binds = Vec::new();
        match filter {
            Filter::All => {}
            Filter::NotNull => sql.push_str(&format!(" WHERE {} IS NOT NULL", self.order)),
            Filter::After(v) | Filter::At(v) => {
                let op = if matches!(filter, Filter::At(_)) {
                    "="
                } else {
                    ">"
                };
                binds.push(if self.bind_text {
                    Bind::Text(format_bound(v)?)
                } else {
                    Bind::Int(v)
                });
                sql.push_str(&format!(" WHERE {} {op} {}", self.order, self.placeholder));
            }
        }
        sql.push_str(&format!(" ORDER BY {}", self.order));
        if let Some(n) = limit {
            sql.push_str(&format!(" LIMIT {n}"));
        }
        Some((sql, binds))
    }

    /// The statement of a poll page from `low`.
    fn page(&self, low: i64, limit: usize) -> (String, Vec<Bind>) {
        let filter = if low == NOTHING {
            Filter::NotNull
        } else {
            Filter::After(low)
        };
        // A bound beyond what the database can read: read from the start.
        self.query(filter, Some(limit))
            .or_else(|| self.query(Filter::NotNull, Some(limit)))
            .expect("an unbounded query always builds")
    }

    fn cursor_of(&self, raw: &RawRow) -> Option<i64> {
        let text = raw.last()?.as_deref()?.trim();
        match (self.kind, self.flavor) {
            (CursorKind::Int, _) | (CursorKind::Timestamp, Flavor::Sqlite) => text.parse().ok(),
            (CursorKind::Timestamp, _) => parse_db_timestamp(text),
        }
    }

    fn decode(&self, raw: &RawRow) -> Result<Row, String> {
        if self.flavor != Flavor::Sqlite && raw.len() != self.columns.len() + 1 {
            return Err(format!(
                "{} columns read, {} expected",
                raw.len(),
                self.columns.len() + 1
            ));
        }
        decode_cells(self.flavor, &self.columns, raw)
    }

    fn is_deleted(&self, row: &Row) -> bool {
        let Some(i) = self.soft_delete else {
            return false;
        };
        match row.get(&self.columns[i].name) {
            None | Some(Value::Null) | Some(Value::Bool(false)) | Some(Value::Int(0)) => false,
            Some(_) => true,
        }
    }
}

/// The select list giving a row's cells: each column's text expression,
/// or one `json_object` of them (SQLite).
fn cells_select(flavor: Flavor, columns: &[Column]) -> String {
    match flavor {
        Flavor::Sqlite => row_json(columns),
        _ => columns
            .iter()
            .map(|c| c.expr.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// One row from its cells: the columns' text in order (PostgreSQL, MySQL;
/// cells past the columns are ignored), or one `json_object` (SQLite).
fn decode_cells(flavor: Flavor, columns: &[Column], raw: &[Option<String>]) -> Result<Row, String> {
    if flavor == Flavor::Sqlite {
        let text = raw.first().cloned().flatten().ok_or("the row is null")?;
        let serde_json::Value::Object(obj) =
            serde_json::from_str(&text).map_err(|e| format!("bad row json: {e}"))?
        else {
            return Err("the row is not a json object".into());
        };
        return columns
            .iter()
            .map(|c| {
                let v = obj.get(&c.name).unwrap_or(&serde_json::Value::Null);
                decode_sqlite_value(&c.decl, v)
                    .map(|v| (c.name.clone(), v))
                    .map_err(|e| format!("column {}: {e}", c.name))
            })
            .collect();
    }
    if raw.len() < columns.len() {
        return Err(format!(
            "{} columns read, {} expected",
            raw.len(),
            columns.len()
        ));
    }
    Ok(columns
        .iter()
        .zip(raw)
        .map(|(c, cell)| {
            let v = cell
                .as_deref()
                .map_or(Value::Null, |s| decode_text(c.ty, s));
            (c.name.clone(), v)
        })
        .collect())
}

/// A poll in progress over one table: pages from `low` until a short one.
#[derive(Debug, Clone, PartialEq)]
struct Poll {
    low: i64,
    /// The value below which A proves every row read once the poll completes.
    base: i64,
    first_page: bool,
}

/// What a page tells the poller to do next.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Page {
    /// The poll is complete.
    Short,
    /// More pages follow.
    Full,
    /// A full page of one cursor value: read all of that value, then go on.
    Tie(i64),
}

/// One table's cursor and de-duplication memory.
#[derive(Debug)]
struct TableState {
    kind: CursorKind,
    window: i64,
    /// Every row version with a cursor value up to here was handed on.
    safe: i64,
    /// The highest cursor value seen.
    high: i64,
    poll: Option<Poll>,
    /// Per primary key, the hash of the last row sent and its cursor value.
    seen: BTreeMap<Vec<Value>, (u64, i64)>,
    by_cursor: BTreeSet<(i64, Vec<Value>)>,
}

impl TableState {
    fn new(kind: CursorKind, window: i64, safe: i64) -> Self {
        TableState {
            kind,
            window,
            safe,
            high: NOTHING,
            poll: None,
            seen: BTreeMap::new(),
            by_cursor: BTreeSet::new(),
        }
    }

    /// Starts a poll unless one runs; `clock` is needed for timestamp cursors.
    fn begin(&mut self, clock: Option<i64>) {
        if self.poll.is_some() {
            return;
        }
        let base = match (self.kind, clock) {
            (CursorKind::Timestamp, Some(t)) => t.saturating_sub(self.window),
            // Integers: refined once the first page shows what is visible.
            _ => self.high.saturating_sub(self.window),
        };
        self.poll = Some(Poll {
            low: self.safe,
            base,
            first_page: true,
        });
    }

    fn low(&self) -> i64 {
        self.poll.as_ref().map_or(self.safe, |p| p.low)
    }

    /// Moves the cursors after a page of `rows` rows whose first and last
    /// cursor values are `first` and `last`.
    fn after_page(
        &mut self,
        rows: usize,
        batch: usize,
        first: Option<i64>,
        last: Option<i64>,
    ) -> Page {
        let (kind, window, high) = (self.kind, self.window, self.high);
        let Some(p) = self.poll.as_mut() else {
            return Page::Short;
        };
        if p.first_page && kind == CursorKind::Int {
            // Everything on the first page was visible to it: H >= high.
            p.base = p.base.max(high.saturating_sub(window));
        }
        p.first_page = false;
        let h = match (rows < batch, first, last) {
            (false, Some(f), Some(h)) if f == h => return Page::Tie(h),
            (false, _, Some(h)) => h,
            // Short, or the last value is unreadable (infinity sorts last).
            _ => {
                self.safe = self.safe.max(p.base);
                self.poll = None;
                return Page::Short;
            }
        };
        // Only the values below h are complete: ties at h may go on.
        let below = h.saturating_sub(1);
        self.safe = self.safe.max(below.min(p.base));
        p.low = p.low.max(below);
        Page::Full
    }

    /// After every row of cursor value `h` was read.
    fn after_tie(&mut self, h: i64) {
        if let Some(p) = self.poll.as_mut() {
            self.safe = self.safe.max(h.min(p.base));
            p.low = p.low.max(h);
        }
    }

    /// Whether a row is new or changed; remembers it while it may be re-read.
    fn is_news(&mut self, pk: Vec<Value>, hash: u64, cursor: Option<i64>) -> bool {
        if self.seen.get(&pk).is_some_and(|s| s.0 == hash) {
            return false;
        }
        match cursor {
            Some(c) => {
                if let Some((_, old)) = self.seen.insert(pk.clone(), (hash, c))
                    && old != c
                {
                    self.by_cursor.remove(&(old, pk.clone()));
                }
                self.by_cursor.insert((c, pk));
            }
            // Without a cursor value the row is never read again.
            None => {
                if let Some((_, old)) = self.seen.remove(&pk) {
                    self.by_cursor.remove(&(old, pk));
                }
            }
        }
        true
    }

    /// Forgets rows at or below `upto`: no later read returns them.
    fn prune(&mut self, upto: i64) {
        while let Some((c, _)) = self.by_cursor.first() {
            if *c > upto {
                break;
            }
            let (c, pk) = self.by_cursor.pop_first().expect("first exists");
            if self.seen.get(&pk).is_some_and(|s| s.1 == c) {
                self.seen.remove(&pk);
            }
        }
    }
}

/// The source's position: the lowest safe cursor of its tables.
fn position(states: &[TableState]) -> i64 {
    states.iter().map(|s| s.safe).min().unwrap_or(NOTHING)
}

fn hash_cells(raw: &RawRow) -> u64 {
    let mut h = DefaultHasher::new();
    raw.hash(&mut h);
    h.finish()
}

/// Changes gathered by one round.
struct Batch {
    changes: Vec<RowChange>,
    /// The highest timestamp cursor among them: when they were written.
    commit: Option<i64>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            changes: Vec::new(),
            commit: None,
        }
    }

    fn take(&mut self) -> (Vec<RowChange>, i64) {
        let commit = self.commit.take().unwrap_or_else(now_micros);
        (std::mem::take(&mut self.changes), commit)
    }
}

impl SqlPollSource {
    /// Decodes a read row; `Some((row, deleted))` when it is new or changed.
    fn observe(
        &self,
        t: &Table,
        st: &mut TableState,
        raw: &RawRow,
        ctx: &SourceContext,
    ) -> (Option<i64>, Option<(Row, bool)>) {
        let cursor = t.cursor_of(raw);
        if let Some(c) = cursor {
            st.high = st.high.max(c);
        }
        let row = match t.decode(raw) {
            Ok(row) => row,
            Err(reason) => {
                let text = serde_json::to_string(raw).unwrap_or_default();
                ctx.dead_letter(&t.configured, &reason, &text);
                return (cursor, None);
            }
        };
        let pk: Vec<Value> =
            t.pk.iter()
                .map(|&i| row.get(&t.columns[i].name).cloned().unwrap_or(Value::Null))
                .collect();
        if !st.is_news(pk, hash_cells(raw), cursor) {
            return (cursor, None);
        }
        let deleted = t.is_deleted(&row);
        (cursor, Some((row, deleted)))
    }

    /// Reads every row of every table; `None`: shut down.
    async fn snapshot(
        &self,
        conn: &mut Conn,
        tables: &[Table],
        states: &mut [TableState],
        ctx: &SourceContext,
        again: bool,
    ) -> Result<Option<()>, SourceError> {
        ctx.status.set_state("snapshotting");
        let ext = self.ext("read the initial snapshot");
        let mut batch = Batch::new();
        let (mut rows, mut chunks) = (0u64, 0u64);
        // The clock before the read transaction: its snapshot is not older.
        let now = match tables.iter().any(|t| t.kind == CursorKind::Timestamp) {
            true => Some(conn.clock().await.map_err(&ext)?),
            false => None,
        };
        conn.begin_read().await.map_err(&ext)?;
        // The rows a query returns are not known before it is read.
        let names: Vec<&str> = tables.iter().map(|t| t.configured.as_str()).collect();
        ctx.status.progress.start(
            format!("initial snapshot of {}", names.join(", ")),
            "rows",
            None,
        );
        for (t, st) in tables.iter().zip(states.iter_mut()) {
            let clock = now.filter(|_| t.kind == CursorKind::Timestamp);
            let (sql, binds) = t.query(Filter::All, None).expect("an unbounded query");
            let mut stream = conn.fetch(sql, binds);
            while let Some(raw) = stream.try_next().await.map_err(&ext)? {
                rows += 1;
                ctx.status.snapshot_row().await;
                let (cursor, news) = self.observe(t, st, &raw, ctx);
                let Some((row, deleted)) = news else { continue };
                let (op, before, after) = match deleted {
                    // A first snapshot has nothing to delete; a repeated one may.
                    true if !again => continue,
                    true => (Op::Delete, Some(row), None),
                    false => (Op::Read, None, Some(row)),
                };
                // A full chunk goes out only once another row follows it:
                // the last chunk carries the stream position.
                if batch.changes.len() >= self.batch_size {
                    chunks += 1;
                    let (changes, commit) = batch.take();
                    if !ctx
                        .deliver(Position::Snapshot(chunks), commit, changes)
                        .await?
                    {
                        return Ok(None);
                    }
                    // Only rows the window may read again need remembering.
                    st.prune(snapshot_base(st, clock));
                }
                if t.kind == CursorKind::Timestamp {
                    batch.commit = batch.commit.max(cursor);
                }
                batch.changes.push(RowChange {
                    table: t.configured.clone(),
                    op,
                    before,
                    after,
                });
            }
            drop(stream);
            st.safe = snapshot_base(st, clock);
            st.prune(st.safe);
        }
        conn.end_read().await.map_err(&ext)?;
        let pos = position(states);
        let (changes, commit) = batch.take();
        if (!changes.is_empty() || chunks > 0)
            && !ctx.deliver(Position::Cursor(pos), commit, changes).await?
        {
            return Ok(None);
        }
        ctx.status.progress.finish();
        tracing::info!(rows, position = pos, "initial snapshot read");
        Ok(Some(()))
    }

    /// Reads one page of every table; `None`: shut down.
    async fn round(
        &self,
        conn: &mut Conn,
        tables: &[Table],
        states: &mut [TableState],
        ctx: &SourceContext,
        sent: &mut i64,
    ) -> Result<Option<(Batch, bool)>, SourceError> {
        let ext = self.ext("poll");
        let mut batch = Batch::new();
        let mut all_short = true;
        // Clocks first: a poll's base must not be newer than what it reads.
        for (t, st) in tables.iter().zip(states.iter_mut()) {
            if st.poll.is_none() {
                let clock = match t.kind {
                    CursorKind::Timestamp => Some(conn.clock().await.map_err(&ext)?),
                    CursorKind::Int => None,
                };
                st.begin(clock);
            }
        }
        // One snapshot for all tables: a transaction that wrote several
        // tables arrives in one round, unless a page is full.
        conn.begin_read().await.map_err(&ext)?;
        for (i, t) in tables.iter().enumerate() {
            let (sql, binds) = t.page(states[i].low(), self.batch_size);
            let raws: Vec<RawRow> = conn.fetch(sql, binds).try_collect().await.map_err(&ext)?;
            let first = raws.first().and_then(|r| t.cursor_of(r));
            let last = raws.last().and_then(|r| t.cursor_of(r));
            for raw in &raws {
                self.take(t, &mut states[i], raw, ctx, &mut batch);
            }
            match states[i].after_page(raws.len(), self.batch_size, first, last) {
                Page::Short => {}
                Page::Full => all_short = false,
                Page::Tie(h) => {
                    all_short = false;
                    let Some((sql, binds)) = t.query(Filter::At(h), None) else {
                        tracing::warn!(table = %t.configured, cursor = h, "a cursor value outside years 1-9999 fills a page; skipping past it");
                        states[i].after_tie(h);
                        continue;
                    };
                    let mut stream = conn.fetch(sql, binds);
                    while let Some(raw) = stream.try_next().await.map_err(&ext)? {
                        self.take(t, &mut states[i], &raw, ctx, &mut batch);
                        // Many rows of one value: hand them on as they come.
                        if batch.changes.len() >= self.batch_size {
                            let pos = position(states);
                            let (changes, commit) = batch.take();
                            if !ctx.deliver(Position::Cursor(pos), commit, changes).await? {
                                return Ok(None);
                            }
                            *sent = pos;
                        }
                    }
                    drop(stream);
                    states[i].after_tie(h);
                }
            }
        }
        conn.end_read().await.map_err(&ext)?;
        Ok(Some((batch, all_short)))
    }

    /// A polled row as a change, if it is news.
    fn take(
        &self,
        t: &Table,
        st: &mut TableState,
        raw: &RawRow,
        ctx: &SourceContext,
        batch: &mut Batch,
    ) {
        let (cursor, news) = self.observe(t, st, raw, ctx);
        let Some((row, deleted)) = news else { return };
        if t.kind == CursorKind::Timestamp {
            batch.commit = batch.commit.max(cursor);
        }
        let (op, before, after) = if deleted {
            (Op::Delete, Some(row), None)
        } else {
            (Op::Update, None, Some(row))
        };
        batch.changes.push(RowChange {
            table: t.configured.clone(),
            op,
            before,
            after,
        });
    }

    async fn stream(
        &self,
        conn: &mut Conn,
        tables: &[Table],
        states: &mut [TableState],
        ctx: &SourceContext,
    ) -> Result<(), SourceError> {
        ctx.status.set_state("streaming");
        let mut sent = position(states);
        let mut last_send = Instant::now();
        loop {
            let Some((mut batch, all_short)) =
                self.round(conn, tables, states, ctx, &mut sent).await?
            else {
                return Ok(());
            };
            let pos = position(states);
            let heartbeat = pos > sent && last_send.elapsed() >= HEARTBEAT;
            if !batch.changes.is_empty() || heartbeat {
                let (changes, commit) = batch.take();
                tracing::debug!(changes = changes.len(), position = pos, "poll round");
                if !ctx.deliver(Position::Cursor(pos), commit, changes).await? {
                    return Ok(());
                }
                sent = pos;
                last_send = Instant::now();
            }
            for st in states.iter_mut() {
                st.prune(st.safe);
            }
            ctx.status.set_caught_up(all_short);
            if all_short {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.poll_interval) => {}
                }
            }
        }
    }

    async fn run_inner(&self, ctx: &SourceContext) -> Result<(), SourceError> {
        let mut conn = self.connect().await?;
        let tables = self.describe(&mut conn).await?;
        let resume = match &ctx.resume {
            Some(Position::Cursor(c)) => Some(*c),
            Some(Position::Snapshot(_)) | None => None,
            Some(other) => {
                tracing::warn!(resume = %other, "the resume position is not a cursor; snapshotting again");
                None
            }
        };
        let mut states: Vec<TableState> = tables
            .iter()
            .map(|t| TableState::new(t.kind, t.window, resume.unwrap_or(NOTHING)))
            .collect();
        tracing::info!(
            tables = tables.len(),
            cursor = %self.cursor_column,
            window = tables.first().map_or(0, |t| t.window),
            resume = ?resume,
            "polling"
        );
        if resume.is_none() {
            let again = ctx.snapshot_replaces();
            let snap = self.snapshot(&mut conn, &tables, &mut states, ctx, again);
            if snap.await?.is_none() {
                return Ok(());
            }
        }
        self.stream(&mut conn, &tables, &mut states, ctx).await
    }
}

/// The safe cursor after a complete read that began at `clock`.
fn snapshot_base(st: &TableState, clock: Option<i64>) -> i64 {
    match clock {
        Some(t) => t.saturating_sub(st.window),
        None => st.high.saturating_sub(st.window),
    }
}

#[async_trait::async_trait]
impl Source for SqlPollSource {
    #[tracing::instrument(skip_all, fields(source = %ctx.name))]
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        ctx.status.set_state("starting");
        // Shutdown also ends a query that hangs.
        let r = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => Ok(()),
            r = self.run_inner(&ctx) => r,
        };
        if r.is_ok() {
            ctx.status.set_state("stopped");
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SourceTxn;
    use crate::sources::{SourceStatus, TxnEnvelope};
    use crate::telemetry::{DeadLetters, Metrics};
    use std::path::Path;
    use std::sync::Arc;
    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;

    #[test]
    fn text_is_typed_by_the_catalog_type() {
        let ts = parse_timestamp("2024-03-01 10:00:00.5").unwrap();
        let u = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        let t = |s: &str| Value::Text(s.into());
        let cases = [
            (Ty::Int, "-7", Value::Int(-7)),
            (
                Ty::Int,
                "18446744073709551615",
                Value::Decimal("18446744073709551615".into()),
            ),
            (Ty::Decimal, "12.50", Value::Decimal("12.50".into())),
            (Ty::Decimal, "NaN", t("NaN")),
            (Ty::Float, "0.30000000000000004", Value::Float(0.1 + 0.2)),
            (Ty::Bool, "t", Value::Bool(true)),
            (Ty::Bool, "false", Value::Bool(false)),
            (Ty::Bool, "0", Value::Bool(false)),
            (
                Ty::Timestamp,
                "2024-03-01 10:00:00.5+00",
                Value::Timestamp(ts),
            ),
            (
                Ty::Timestamp,
                "2024-03-01 10:00:00.500000",
                Value::Timestamp(ts),
            ),
            (Ty::Timestamp, "infinity", t("infinity")),
            (Ty::Date, "1970-01-11", Value::Date(10)),
            (Ty::Date, "0000-00-00", t("0000-00-00")),
            (
                Ty::Uuid,
                u,
                Value::Uuid(*uuid::Uuid::parse_str(u).unwrap().as_bytes()),
            ),
            (Ty::Json, "[1, 2]", Value::Json("[1, 2]".into())),
            (Ty::Bytes, "00FF", Value::Bytes(vec![0, 255])),
            (Ty::Bytes, "0", t("0")),
            (Ty::Text, "x", t("x")),
        ];
        for (ty, s, want) in cases {
            assert_eq!(decode_text(ty, s), want, "{ty:?} {s}");
        }
    }

    #[test]
    fn catalog_types_and_bounds() {
        assert_eq!(pg_ty("timestamptz", "D"), Ty::Timestamp);
        assert_eq!(pg_ty("_int4", "A"), Ty::Json);
        assert_eq!(pg_ty("citext", "S"), Ty::Text);
        assert_eq!(mysql_ty("tinyint", "tinyint(1)"), Ty::Bool);
        assert_eq!(mysql_ty("tinyint", "tinyint(4)"), Ty::Int);
        assert_eq!(mysql_ty("longblob", "longblob"), Ty::Bytes);
        assert_eq!(sqlite_ty("DATETIME"), Ty::Timestamp);
        assert_eq!(sqlite_ty("BIGINT"), Ty::Int);
        assert_eq!(
            json_valid_column("json_valid(`a``b`)").as_deref(),
            Some("a`b")
        );
        assert_eq!(json_valid_column("`x` > 0"), None);
        let micros = parse_timestamp("2024-03-01 10:00:00.000001").unwrap();
        assert_eq!(
            format_bound(micros).as_deref(),
            Some("2024-03-01 10:00:00.000001")
        );
        assert_eq!(format_bound(NOTHING), None);
    }

    #[test]
    fn a_late_commit_below_the_highest_value_is_read_again() {
        // Integer cursor, window 10: ids 1..=20 seen, then 15 commits late.
        let mut st = TableState::new(CursorKind::Int, 10, NOTHING);
        st.begin(None);
        st.high = 20;
        assert_eq!(st.after_page(19, 100, Some(1), Some(20)), Page::Short);
        assert_eq!(st.safe, 10);
        // The next poll reads from 10: a late 15 is above it.
        st.begin(None);
        assert_eq!(st.low(), 10);
        // A full page ending at 30 proves only what is below 30 (and the base).
        st.high = 30;
        assert_eq!(st.after_page(5, 5, Some(11), Some(30)), Page::Full);
        assert_eq!((st.safe, st.low()), (20, 29));
        assert_eq!(st.after_page(5, 5, Some(31), Some(31)), Page::Tie(31));
        st.after_tie(31);
        assert_eq!((st.safe, st.low()), (20, 31));
        assert_eq!(st.after_page(0, 5, None, None), Page::Short);
        assert_eq!(st.safe, 20);
        // Timestamps: the clock, not the data, bounds what is safe.
        let mut st = TableState::new(CursorKind::Timestamp, 5_000_000, 7);
        st.begin(Some(100_000_000));
        assert_eq!(st.low(), 7);
        assert_eq!(st.after_page(0, 5, None, None), Page::Short);
        assert_eq!(st.safe, 95_000_000);
        // Safe cursors never move back.
        st.begin(Some(1));
        st.after_page(0, 5, None, None);
        assert_eq!(st.safe, 95_000_000);
    }

    #[test]
    fn rows_are_sent_again_only_when_changed_and_forgotten_below_safe() {
        let mut st = TableState::new(CursorKind::Int, 10, NOTHING);
        let k = |i| vec![Value::Int(i)];
        assert!(st.is_news(k(1), 11, Some(5)));
        assert!(!st.is_news(k(1), 11, Some(5)));
        assert!(st.is_news(k(1), 12, Some(8)));
        assert!(st.is_news(k(2), 13, Some(9)));
        st.prune(8);
        assert_eq!(st.seen.len(), 1);
        assert_eq!(st.by_cursor.len(), 1);
        assert!(st.is_news(k(1), 12, Some(8)));
    }

    struct Harness {
        rx: mpsc::Receiver<TxnEnvelope>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), SourceError>>,
        status: Arc<SourceStatus>,
        _durable: watch::Sender<Option<Position>>,
    }

    impl Harness {
        async fn next(&mut self) -> SourceTxn {
            let wait = tokio::time::timeout(Duration::from_secs(5), self.rx.recv());
            wait.await
                .expect("a transaction within 5s")
                .expect("running")
                .txn
        }

        /// Changes until `n` of them arrived, with the last position.
        async fn changes(&mut self, n: usize) -> (Vec<RowChange>, Position) {
            let mut out = Vec::new();
            let mut pos = Position::Snapshot(0);
            let deadline = Instant::now() + Duration::from_secs(5);
            while out.len() < n {
                assert!(
                    Instant::now() < deadline,
                    "{n} changes within 5s, got {out:?}"
                );
                let t = self.next().await;
                pos = t.position;
                out.extend(t.changes);
            }
            (out, pos)
        }

        async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.unwrap().unwrap();
        }
    }

    fn source(db: &Path, extra: &str) -> Result<SqlPollSource, SourceError> {
        let text = format!(
            "name = \"crm\"\nkind = \"sql_poll\"\nurl = \"sqlite:{}\"\npoll_interval = \"10ms\"\n{extra}\n",
            db.display()
        );
        let cfg: SourceConfig = toml::from_str(&text).unwrap();
        let config = Config::from_toml(&db.with_file_name("fabric.toml"), "").unwrap();
        SqlPollSource::new(&cfg, &config)
    }

    fn start(db: &Path, extra: &str, resume: Option<Position>) -> Harness {
        let (tx, rx) = mpsc::channel(64);
        let (durable, durable_rx) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let dlq = db.with_file_name("dlq.jsonl");
        let dead = Arc::new(DeadLetters::new(&dlq, 10, Arc::new(Metrics::new())));
        let status = Arc::new(SourceStatus::default());
        let ctx = SourceContext::new(
            "crm".into(),
            resume,
            tx,
            durable_rx,
            status.clone(),
            dead,
            shutdown.clone(),
        );
        let task = tokio::spawn(Box::new(source(db, extra).unwrap()).run(ctx));
        Harness {
            rx,
            shutdown,
            task,
            status,
            _durable: durable,
        }
    }

    async fn db(path: &Path, schema: &str) -> SqliteConnection {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true);
        let mut conn = opts.connect().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(schema.to_string()))
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    async fn run_sql(conn: &mut SqliteConnection, sql: &str) {
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(conn)
            .await
            .unwrap();
    }

    fn id(c: &RowChange) -> i64 {
        match c.image().unwrap()["id"] {
            Value::Int(i) => i,
            ref other => panic!("id {other:?}"),
        }
    }

    #[tokio::test]
    async fn sqlite_snapshot_then_changes_and_soft_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let mut conn = db(
            &path,
            "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, price DECIMAL(10,2), \
             photo BLOB, gone BOOLEAN NOT NULL DEFAULT 0, rev INTEGER NOT NULL); \
             INSERT INTO items VALUES (1, 'a', '1.50', x'00ff', 0, 1), (2, 'b', NULL, NULL, 0, 2), \
             (3, 'c', NULL, NULL, 1, 3);",
        )
        .await;
        let extra = "tables = [\"items\"]\ncursor_column = \"rev\"\nsoft_delete_column = \"gone\"\n\
                     batch_size = 1\nsafety_window = \"2\"";
        let mut h = start(&path, extra, None);
        // The soft-deleted row 3 is not part of a first snapshot.
        let first = h.next().await;
        assert_eq!(first.position, Position::Snapshot(1));
        assert_eq!(first.changes[0].op, Op::Read);
        let row = first.changes[0].after.as_ref().unwrap();
        assert_eq!(row["price"], Value::Decimal("1.50".into()));
        assert_eq!(row["photo"], Value::Bytes(vec![0, 255]));
        let last = h.next().await;
        assert_eq!(
            (id(&last.changes[0]), last.position),
            (2, Position::Cursor(1))
        );
        run_sql(
            &mut conn,
            "INSERT INTO items VALUES (4, 'd', NULL, NULL, 0, 4); \
             UPDATE items SET name = 'A', rev = 5 WHERE id = 1; \
             UPDATE items SET gone = 1, rev = 6 WHERE id = 2;",
        )
        .await;
        let (changes, _) = h.changes(3).await;
        let got: Vec<(i64, Op)> = changes.iter().map(|c| (id(c), c.op)).collect();
        assert_eq!(got, vec![(4, Op::Update), (1, Op::Update), (2, Op::Delete)]);
        assert_eq!(
            changes[2].before.as_ref().unwrap()["gone"],
            Value::Bool(true)
        );
        // Rows inside the window are read again but not sent again.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while let Ok(env) = h.rx.try_recv() {
            assert!(env.txn.changes.is_empty(), "{:?}", env.txn);
        }
        assert_eq!(*h.status.state.lock(), "streaming");
        h.stop().await;
    }

    #[tokio::test]
    async fn sqlite_timestamp_cursor_resumes_from_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let mut conn = db(
            &path,
            "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, at TIMESTAMP); \
             INSERT INTO notes VALUES (1, 'x', '2020-01-01 00:00:00.250');",
        )
        .await;
        let extra = "tables = [\"main.notes\"]\ncursor_column = \"at\"\nsafety_window = \"1s\"";
        let mut h = start(&path, extra, None);
        let (changes, pos) = h.changes(1).await;
        assert_eq!(
            changes[0].after.as_ref().unwrap()["at"],
            Value::Timestamp(parse_timestamp("2020-01-01 00:00:00.25").unwrap())
        );
        // The position trails the clock, not the data.
        assert!(pos > Position::Cursor(parse_timestamp("2021-01-01 00:00:00").unwrap()));
        run_sql(
            &mut conn,
            "INSERT INTO notes VALUES (2, 'y', strftime('%Y-%m-%d %H:%M:%f', 'now'));",
        )
        .await;
        let (changes, _) = h.changes(1).await;
        assert_eq!(changes.iter().map(id).collect::<Vec<_>>(), vec![2]);
        h.stop().await;
        // Resuming after 2020 skips row 1 and reads row 2 again.
        let at = parse_timestamp("2021-01-01 00:00:00").unwrap();
        let mut h = start(&path, extra, Some(Position::Cursor(at)));
        let (changes, pos) = h.changes(1).await;
        assert_eq!(changes.iter().map(id).collect::<Vec<_>>(), vec![2]);
        assert!(pos >= Position::Cursor(at), "{pos}");
        h.stop().await;
    }

    #[tokio::test]
    async fn sqlite_config_errors_name_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crm.db");
        let run = |extra: &'static str| {
            let path = path.clone();
            async move {
                let h = start(&path, extra, None);
                h.task.await.unwrap().unwrap_err()
            }
        };
        let e = run("tables = [\"items\"]\ncursor_column = \"rev\"").await;
        assert!(
            !e.retryable() && e.to_string().contains("does not exist"),
            "{e}"
        );
        let _conn = db(
            &path,
            "CREATE TABLE items(id INTEGER PRIMARY KEY, rev INTEGER, name TEXT);",
        )
        .await;
        for (extra, want) in [
            (
                "tables = [\"items\", \"orders\"]\ncursor_column = \"rev\"",
                "table orders does not exist",
            ),
            (
                "tables = [\"items\"]\ncursor_column = \"version\"",
                "table items has no column version (cursor_column)",
            ),
            (
                "tables = [\"items\"]\ncursor_column = \"name\"",
                "must be an integer or a timestamp",
            ),
            (
                "tables = [\"items\"]\ncursor_column = \"rev\"\nsafety_window = \"5s\"",
                "safety_window is a duration",
            ),
        ] {
            let e = run(extra).await;
            assert!(!e.retryable() && e.to_string().contains(want), "{e}");
        }
        assert!(
            source(
                &path,
                "tables = [\"items\"]\ncursor_column = \"rev\"\nsafety_window = \"soon\""
            )
            .is_err()
        );
    }
}

/// How the rows of one entity are found in a source table.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// `WHERE <column> = <id>`.
    Column(String),
    /// Through a link table of the same database: `WHERE <column> IN
    /// (SELECT <link_key> FROM <link_table> WHERE <link_id> = <id>)`.
    Via {
        column: String,
        link_table: String,
        link_key: String,
        link_id: String,
    },
    /// The operator's own query returning the table's columns, with one
    /// placeholder for the id (`$1` PostgreSQL, `?` MySQL and SQLite) bound
    /// as text.
    Sql(String),
}

/// A table as read for fetches: its columns and their text expressions.
struct Described {
    flavor: Flavor,
    columns: Vec<Column>,
    /// The select list of the columns' text (one `json_object` on SQLite).
    select: String,
    /// The table, quoted.
    from: String,
}

/// Reads the rows one entity has in a source's tables right now: the
/// fetches of `crate::fetch` (staleness bounds, sync-on-access types), typed
/// as polled rows are. Connections are opened when first needed, at most
/// `max_connections` at once, and kept for the next fetch.
pub struct EntityReader {
    source: SqlPollSource,
    free: parking_lot::Mutex<Vec<Conn>>,
    permits: tokio::sync::Semaphore,
    described: tokio::sync::Mutex<HashMap<String, Arc<Described>>>,
}

impl EntityReader {
    /// A reader of the database at `url` (`postgres://`, `mysql://`,
    /// `mariadb://` or `sqlite:<path>`) for source `name`.
    pub fn new(
        name: &str,
        url: &str,
        config: &Config,
        max_connections: usize,
    ) -> Result<Self, SourceError> {
        let cfg = SourceConfig {
            name: name.to_string(),
            kind: crate::config::SourceKind::SqlPoll,
            path: None,
            url: Some(url.to_string()),
            // Placeholders: a reader polls nothing.
            tables: vec![String::new()],
            poll_interval: None,
            batch_size: None,
            initial_snapshot: None,
            slot: None,
            publication: None,
            create_slot: None,
            unmapped_types: None,
            server_id: None,
            cursor_column: Some("-".into()),
            soft_delete_column: None,
            topics: Vec::new(),
            brokers: None,
            group_id: None,
            safety_window: None,
            reconnect_first: None,
            reconnect_max: None,
        };
        let mut source = SqlPollSource::new(&cfg, config)?;
        source.tables.clear();
        Ok(EntityReader {
            source,
            free: parking_lot::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(max_connections.max(1)),
            described: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Every row of `table` belonging to entity `id`, as it is now.
    pub async fn rows(
        &self,
        table: &str,
        lookup: &Lookup,
        id: &str,
    ) -> Result<Vec<Row>, SourceError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| SourceError::Closed {
                source_name: self.source.name.clone(),
            })?;
        let pooled = self.free.lock().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self.source.connect().await?,
        };
        let result = self.read(&mut conn, table, lookup, id).await;
        match &result {
            // A broken connection is not kept.
            Err(SourceError::External { .. }) => {}
            _ => self.free.lock().push(conn),
        }
        result
    }

    async fn describe(&self, conn: &mut Conn, table: &str) -> Result<Arc<Described>, SourceError> {
        let mut described = self.described.lock().await;
        if let Some(d) = described.get(table) {
            return Ok(d.clone());
        }
        let flavor = conn.flavor();
        let (from, columns, _) = match flavor {
            Flavor::Postgres => self.source.describe_pg(conn, table).await?,
            Flavor::MySql => self.source.describe_mysql(conn, table).await?,
            Flavor::Sqlite => self.source.describe_sqlite(conn, table).await?,
        };
        let select = cells_select(flavor, &columns);
        let d = Arc::new(Described {
            flavor,
            columns,
            select,
            from,
        });
        described.insert(table.to_string(), d.clone());
        Ok(d)
    }

    async fn read(
        &self,
        conn: &mut Conn,
        table: &str,
        lookup: &Lookup,
        id: &str,
    ) -> Result<Vec<Row>, SourceError> {
        let d = self.describe(conn, table).await?;
        let sql = fetch_sql(&d, lookup).map_err(|e| self.source.config_err(e))?;
        let raw: Vec<RawRow> = conn
            .fetch(sql, vec![Bind::Text(id.to_string())])
            .try_collect()
            .await
            .map_err(|e| match &e {
                // The query itself is wrong (a bad `fetch`, a missing column).
                sqlx::Error::Database(db)
                    if db.code().is_some_and(|c| c.starts_with("42"))
                        || db
                            .try_downcast_ref::<MySqlDatabaseError>()
                            .is_some_and(|m| matches!(m.number(), 1054 | 1064 | 1146)) =>
                {
                    self.source
                        .config_err(format!("fetch of table {table}: {}", db.message()))
                }
                _ => SourceError::external(&self.source.name, "fetch an entity", e),
            })?;
        raw.iter()
            .map(|r| decode_cells(d.flavor, &d.columns, r))
            .collect::<Result<Vec<Row>, String>>()
            .map_err(|e| {
                SourceError::external(&self.source.name, &format!("read table {table}"), e)
            })
    }
}

/// The statement of one fetch, with its id placeholder.
fn fetch_sql(d: &Described, lookup: &Lookup) -> Result<String, String> {
    let q = |c: &str| quote(d.flavor, c);
    let column = |name: &str| {
        d.columns
            .iter()
            .find(|c| c.name == name || c.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("table {} has no column {name}", d.from))
    };
    // The id is bound as text: cast to the column's type where the database
    // would not compare them (PostgreSQL).
    let id_of = |c: &Column| match d.flavor {
        Flavor::Postgres => format!("$1::{}", c.decl),
        Flavor::MySql | Flavor::Sqlite => "?".to_string(),
    };
    Ok(match lookup {
        Lookup::Column(name) => {
            let c = column(name)?;
            format!(
                "SELECT {} FROM {} WHERE {} = {}",
                d.select,
                d.from,
                q(&c.name),
                id_of(c)
            )
        }
        Lookup::Via {
            column: col,
            link_table,
            link_key,
            link_id,
        } => {
            let c = column(col)?;
            // The link's id column is of the entity id's type, as this
            // table's own id columns are; cast to text on both sides so no
            // catalog of the link table is needed.
            let (l_id, ph) = match d.flavor {
                Flavor::Postgres => (format!("{}::text", q(link_id)), "$1".to_string()),
                Flavor::MySql => (format!("CAST({} AS CHAR)", q(link_id)), "?".to_string()),
                Flavor::Sqlite => (format!("CAST({} AS TEXT)", q(link_id)), "?".to_string()),
            };
            let link_from = match d.flavor {
                Flavor::Postgres => link_table.clone(),
                _ => link_table.split('.').map(&q).collect::<Vec<_>>().join("."),
            };
            format!(
                "SELECT {} FROM {} WHERE {} IN (SELECT {} FROM {link_from} WHERE {l_id} = {ph})",
                d.select,
                d.from,
                q(&c.name),
                q(link_key)
            )
        }
        Lookup::Sql(sql) => format!("SELECT {} FROM ({sql}) AS fetched", d.select),
    })
}
