//! The `mysql_binlog` connector: change data capture from a MariaDB (or
//! MySQL) server by reading its binary log as a replica does.
//!
//! On start the connector checks the server (`log_bin` on,
//! `binlog_format=ROW`, `binlog_row_image=FULL`; `binlog_row_metadata=FULL`
//! is recommended, else column names come from `information_schema`), reads
//! the columns of every configured table (`db.table`; a missing table is a
//! config error naming it) and probes the replication privilege, so that a
//! missing grant is reported before a long snapshot, not after it.
//!
//! Invariants:
//! - Positions are `Position::Binlog { file, pos, gtid }`: `pos` is the
//!   offset right after the commit event (XID, `COMMIT` query, or the
//!   statement of a standalone group such as a DDL) of the last transaction
//!   handed on, in `file` (followed across ROTATE events); `gtid` is the
//!   server's GTID state (`domain-server-seq`, one per domain) at that point.
//!   Resuming from it re-reads nothing before it and loses nothing after it.
//! - One [`SourceTxn`] per binlog event group: row events are collected from
//!   the group's start (GTID event or `BEGIN`) to its commit event and sent
//!   at once. Groups that touch no configured table are not sent, but their
//!   position is, as an empty transaction, when the stream goes idle or at
//!   most once a second, so the checkpoint keeps up with the server.
//! - Initial snapshot and handoff: one connection runs `START TRANSACTION
//!   WITH CONSISTENT SNAPSHOT`; inside it, MariaDB's `binlog_snapshot_file`
//!   and `binlog_snapshot_position` status variables give the binlog offset
//!   at which exactly the transactions visible to that snapshot end. The
//!   tables are read in that transaction in primary-key order, `batch_size`
//!   rows per query (keyset pagination: no long-running result stream;
//!   tables without a primary key by `LIMIT`/`OFFSET`), and
//!   sent as `Op::Read` in chunks of `batch_size` rows. Every chunk but the
//!   last carries `Position::Snapshot(n)`, so a crash before the last one is
//!   durable restarts the snapshot; the last chunk (sent even when empty)
//!   carries the snapshot's binlog position, and streaming starts there: no
//!   gap, no overlap. MySQL has no such variables: there, only
//!   `initial_snapshot = false` works.
//! - Resume from a binlog position streams from it. A position the server
//!   has purged (error 1236) is a config error: the changes in between are
//!   lost, and the source must start over (rename it or remove its
//!   snapshots); it never re-snapshots silently. A resume position of
//!   another kind (a snapshot in progress) redoes the snapshot, after an
//!   `Op::Truncate` of every table.
//! - First start without a snapshot (`initial_snapshot = false`): streaming
//!   starts at the server's current position, sent at once as an empty
//!   transaction so that a restart does not skip what came after it.
//! - A lost connection (an error, or no event nor heartbeat for
//!   `SILENCE_LIMIT`) is a retryable error: the supervisor restarts the
//!   source from the last routed position (at-least-once).
//! - A row that cannot be decoded is dead-lettered and skipped, as is a
//!   statement-based change (a session with another `binlog_format`) that
//!   names a configured table.
//! - `TRUNCATE [TABLE] t` on a configured table is an `Op::Truncate`.
//! - Nothing is acknowledged upstream: the server purges binlogs on its own
//!   schedule, so `ctx.durable` is not used. Keep binlogs longer than the
//!   longest outage the source must survive.
//! - `caught_up`: never before the stream has reached the binlog position
//!   the server had when the stream connected (`SHOW MASTER STATUS`), or a
//!   heartbeat came (the server sends one a second when it has nothing more
//!   to send); after that, while the stream is idle for `IDLE`, or the last
//!   event was written at most `LIVE` ago. A lost connection clears it
//!   (`SourceStatus::disconnected`).
//!
//! Not handled: XA transactions are emitted at `XA PREPARE` (a rollback after
//! it is not seen); a group is held in memory until its commit event;
//! MariaDB's UUID/INET types come as bytes from the binlog (and as their
//! text from a snapshot); text in charsets
//! other than UTF-8 and latin1 is dead-lettered when read from the binlog.
//!
//! Column types come from each TABLE_MAP event (with the optional metadata of
//! `binlog_row_metadata=FULL`: names, charsets, ENUM/SET values), overlaid by
//! `information_schema` (read at start and whenever a configured table gets
//! a new table map) for what the binlog does not say: MariaDB's JSON is a
//! `LONGTEXT` with a `json_valid` check, and names when the metadata lacks
//! them. See `decode_value` for the mapping onto [`Value`].
//!
//! Each source needs a `server_id` unique among the server's replicas:
//! by default a hash of the source name in `1000..2^31`.

use super::{Source, SourceContext, SourceError, now_micros};
use crate::config::{Config, SourceConfig};
use crate::event::{Op, Position, Row, RowChange, SourceTxn, Value};
use futures::{FutureExt, StreamExt};
use mysql_async::binlog::events::{
    Event, EventData, OptionalMetaExtractor, OptionalMetadataField, RowsEventData, TableMapEvent,
};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::*;
use mysql_async::{BinlogStreamRequest, Conn, Opts, OptsBuilder};
use mysql_common::proto::MySerialize;
use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the server sends a heartbeat on an idle stream.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// No event for this long: the stream is caught up (and the position of
/// groups skipped since the last transaction sent goes out).
const IDLE: Duration = Duration::from_millis(50);
/// No event nor heartbeat for this long: the connection is lost.
const SILENCE_LIMIT: Duration = Duration::from_secs(10);
/// Events at most this old (timestamps are whole seconds) are live.
const LIVE: Duration = Duration::from_secs(2);
/// Most time between two position-only transactions while skipping: how
/// late a read waiting for a GTID of someone else's write (tables not
/// captured) may learn that it was passed (see `crate::freshness`).
const PROGRESS_EVERY: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// MariaDB's GTID event, which starts every event group.
const MARIADB_GTID_EVENT: u8 = 0xa2;
/// Flag of a MariaDB GTID event: the group is one statement, without COMMIT.
const FL_STANDALONE: u8 = 1;
const TABLE_MAP_EVENT: u8 = 0x13;
const FORMAT_DESCRIPTION_EVENT: u8 = 0x0f;
/// WRITE/UPDATE/DELETE_ROWS, v1 and v2.
const ROWS_EVENTS: [u8; 6] = [0x17, 0x18, 0x19, 0x1e, 0x1f, 0x20];
/// Whether the source decodes events of type `ty`: query, rotate, format
/// description, xid, table map, heartbeat (v1, v2), the rows events and
/// MySQL's partial update. The driver's decoding of the others (MySQL's
/// GTID sets, say) trusts lengths in the event and is never asked to run
/// on them.
fn decoded_event(ty: u8) -> bool {
    const QUERY: u8 = 0x02;
    const ROTATE: u8 = 0x04;
    const XID: u8 = 0x10;
    const HEARTBEAT_V1: u8 = 0x1b;
    const HEARTBEAT_V2: u8 = 0x29;
    const PARTIAL_UPDATE_ROWS: u8 = 0x27;
    ROWS_EVENTS.contains(&ty)
        || [
            QUERY,
            ROTATE,
            FORMAT_DESCRIPTION_EVENT,
            XID,
            TABLE_MAP_EVENT,
            HEARTBEAT_V1,
            HEARTBEAT_V2,
            PARTIAL_UPDATE_ROWS,
        ]
        .contains(&ty)
}
/// The `binary` character set (collation id).
const BINARY_CHARSET: u16 = 63;

/// The `mysql_binlog` connector, built from its config.
pub struct MysqlBinlogSource {
    name: String,
    opts: Opts,
    /// `host:port`, for messages (the url may hold a password).
    server: String,
    tables: Vec<TableRef>,
    server_id: u32,
    batch_size: usize,
    initial_snapshot: bool,
}

/// A configured table.
#[derive(Debug, Clone, PartialEq)]
struct TableRef {
    /// The name events carry: exactly as in the source's `tables`.
    configured: String,
    db: String,
    table: String,
}

/// How a column's values are decoded.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Int,
    Float,
    Decimal,
    Text(Charset),
    Bytes,
    Json,
    /// `DATETIME`: wall time, taken as UTC.
    DateTime,
    Timestamp,
    Date,
    Time,
    Year,
    Bit,
    Enum(Arc<[String]>),
    Set(Arc<[String]>),
    /// Types without a mapping (geometry, MariaDB's UUID/INET6 …): bytes.
    Other,
}

/// The character sets text is decoded from; others must be valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Charset {
    Utf8,
    Latin1,
}

/// Where a value was read: the binlog holds some types in another form
/// than query results (SET as a bitmask, text in the column's charset).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Origin {
    Binlog,
    Query,
}

#[derive(Debug, Clone)]
struct ColumnMeta {
    name: String,
    kind: Kind,
}

/// A configured table as `information_schema` describes it.
#[derive(Debug, Clone)]
struct TableMeta {
    configured: String,
    /// The names the server knows it by.
    db: String,
    table: String,
    columns: Vec<ColumnMeta>,
    /// Indexes into `columns` of the primary key, in key order.
    pk: Vec<usize>,
}

/// The configured tables, found by their server names.
struct Catalog {
    tables: Vec<TableMeta>,
    by_name: HashMap<(String, String), usize>,
}

impl Catalog {
    fn index(&self, db: &str, table: &str) -> Option<usize> {
        let exact = self.by_name.get(&(db.to_string(), table.to_string()));
        exact.copied().or_else(|| {
            self.tables
                .iter()
                .position(|t| t.db.eq_ignore_ascii_case(db) && t.table.eq_ignore_ascii_case(table))
        })
    }

    fn get(&self, db: &str, table: &str) -> Option<&TableMeta> {
        self.index(db, table).map(|i| &self.tables[i])
    }

    /// A captured table whose name a statement mentions (a rough test).
    fn mentioned_in(&self, sql: &str) -> Option<&TableMeta> {
        let sql = sql.to_ascii_lowercase();
        self.tables
            .iter()
            .find(|t| sql.contains(&t.table.to_ascii_lowercase()))
    }
}

/// Where streaming starts.
#[derive(Debug, Clone)]
struct Start {
    file: String,
    pos: u64,
    gtid: Option<String>,
}

impl Start {
    fn position(&self) -> Position {
        Position::Binlog {
            file: self.file.clone(),
            pos: self.pos,
            gtid: self.gtid.clone(),
        }
    }
}

/// What the start-up checks learned about the server.
struct ServerInfo {
    mariadb: bool,
    /// Events carry a checksum (`binlog_checksum` is not NONE).
    checksum: bool,
}

impl MysqlBinlogSource {
    pub fn new(cfg: &SourceConfig, _config: &Config) -> Result<Self, SourceError> {
        let err = |reason: String| SourceError::Config {
            source_name: cfg.name.clone(),
            reason,
        };
        let url = cfg
            .url
            .as_deref()
            .ok_or_else(|| err("a mysql_binlog source needs a url".into()))?;
        // mysql_async knows only the mysql:// scheme; the protocol is the same.
        let url = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url.to_string(),
        };
        let opts = Opts::from_url(&url).map_err(|e| err(format!("url: {e}")))?;
        let server = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
        let opts: Opts = OptsBuilder::from_opts(opts)
            .prefer_socket(false)
            .tcp_keepalive(Some(Duration::from_secs(15)))
            // TIMESTAMP values in query results in UTC, as the binlog has them.
            .setup(vec!["SET time_zone = '+00:00'"])
            .into();
        if cfg.tables.is_empty() {
            return Err(err(
                "a mysql_binlog source needs the tables to capture".into()
            ));
        }
        let mut tables = Vec::new();
        for t in &cfg.tables {
            let (db, table) = match t.split_once('.') {
                Some((db, table)) if !db.is_empty() && !table.is_empty() => {
                    (db.to_string(), table.to_string())
                }
                None if !t.is_empty() => match opts.db_name() {
                    Some(db) => (db.to_string(), t.clone()),
                    None => {
                        return Err(err(format!(
                            "table {t}: name it with its database (db.table) or put a database in the url"
                        )));
                    }
                },
                _ => return Err(err(format!("table {t:?} is not a db.table name"))),
            };
            tables.push(TableRef {
                configured: t.clone(),
                db,
                table,
            });
        }
        Ok(MysqlBinlogSource {
            name: cfg.name.clone(),
            opts,
            server,
            tables,
            server_id: cfg
                .server_id
                .unwrap_or_else(|| default_server_id(&cfg.name)),
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

    /// A server error as a source error: missing privileges are config
    /// errors, everything else (credentials included) may pass with time.
    fn classify(&self, operation: &str, e: mysql_async::Error) -> SourceError {
        if let mysql_async::Error::Server(s) = &e
            && matches!(s.code, 1044 | 1142 | 1143 | 1227 | 1370)
        {
            return self.config_err(format!(
                "missing privilege to {operation} on {}: {}; the source's user needs SELECT on its \
                 tables, REPLICATION SLAVE and BINLOG MONITOR (REPLICATION CLIENT on MySQL)",
                self.server, s.message
            ));
        }
        SourceError::external(&self.name, &format!("{operation} on {}", self.server), e)
    }

    /// Errors of registering as a replica: the session is already
    /// authenticated, so an access error is the missing REPLICATION SLAVE.
    fn replication_err(&self, e: mysql_async::Error) -> SourceError {
        if let mysql_async::Error::Server(s) = &e
            && matches!(s.code, 1045 | 1227)
        {
            return self.config_err(format!(
                "missing privilege to read the binlog on {}: {}; the source's user needs \
                 REPLICATION SLAVE (and SELECT on its tables, BINLOG MONITOR)",
                self.server, s.message
            ));
        }
        self.classify("open the binlog stream", e)
    }

    fn ext(&self, operation: &'static str) -> impl Fn(mysql_async::Error) -> SourceError + '_ {
        move |e| self.classify(operation, e)
    }

    async fn connect(&self) -> Result<Conn, SourceError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(self.opts.clone())).await {
            Ok(r) => r.map_err(self.ext("connect")),
            Err(_) => Err(SourceError::external(
                &self.name,
                &format!("connect to {}", self.server),
                format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
            )),
        }
    }

    /// Checks the binlog settings and the server id.
    async fn check_server(&self, conn: &mut Conn) -> Result<ServerInfo, SourceError> {
        let ext = self.ext("read the server settings");
        type Settings = (
            String,
            Option<String>,
            Option<String>,
            Option<String>,
            u64,
            Option<String>,
        );
        let row: Option<Settings> = conn
            .query_first(
                "SELECT VERSION(), CAST(@@log_bin AS CHAR), @@binlog_format, \
                 @@binlog_row_image, @@server_id, @@binlog_checksum",
            )
            .await
            .map_err(&ext)?;
        let (version, log_bin, format, image, their_id, checksum) =
            row.ok_or_else(|| self.config_err("the server returned no settings".into()))?;
        check_binlog_settings(
            log_bin.as_deref().unwrap_or("OFF"),
            format.as_deref().unwrap_or(""),
            image.as_deref().unwrap_or(""),
        )
        .map_err(|r| self.config_err(format!("{} {r}", self.server)))?;
        if their_id == u64::from(self.server_id) {
            return Err(self.config_err(format!(
                "server_id {} is the server's own id; set another server_id for the source",
                self.server_id
            )));
        }
        // Older servers have no such variable: names then come from information_schema.
        let metadata: Option<Option<String>> = conn
            .query_first("SELECT @@binlog_row_metadata")
            .await
            .unwrap_or(None);
        if let Some(m) = metadata
            .flatten()
            .filter(|m| !m.eq_ignore_ascii_case("FULL"))
        {
            tracing::warn!(
                binlog_row_metadata = %m,
                "binlog_row_metadata is not FULL: column names and ENUM/SET values come from information_schema and may not match events written before a schema change"
            );
        }
        Ok(ServerInfo {
            mariadb: version.to_ascii_lowercase().contains("mariadb"),
            checksum: checksum.is_some_and(|c| !c.eq_ignore_ascii_case("NONE")),
        })
    }

    /// Reads every configured table's columns; a missing one is a config error.
    async fn load_catalog(&self, conn: &mut Conn) -> Result<Catalog, SourceError> {
        let mut catalog = Catalog {
            tables: Vec::new(),
            by_name: HashMap::new(),
        };
        for t in &self.tables {
            let meta = self.table_meta(conn, t).await?;
            let key = (meta.db.clone(), meta.table.clone());
            if !catalog.by_name.contains_key(&key) {
                catalog.by_name.insert(key, catalog.tables.len());
                catalog.tables.push(meta);
            }
        }
        Ok(catalog)
    }

    async fn table_meta(&self, conn: &mut Conn, t: &TableRef) -> Result<TableMeta, SourceError> {
        let ext = self.ext("read information_schema");
        type ColRow = (
            String,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<ColRow> = conn
            .exec(
                "SELECT TABLE_SCHEMA, TABLE_NAME, COLUMN_NAME, DATA_TYPE, \
                 CAST(COLUMN_TYPE AS CHAR), CHARACTER_SET_NAME \
                 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
                 ORDER BY ORDINAL_POSITION",
                (&t.db, &t.table),
            )
            .await
            .map_err(&ext)?;
        let Some((db, table, ..)) = rows.first().cloned() else {
            // information_schema hides tables the user may not read: ask the table.
            let probe = format!("SELECT 1 FROM {}.{} LIMIT 0", ident(&t.db), ident(&t.table));
            return Err(match conn.query_drop(probe).await {
                Err(mysql_async::Error::Server(s)) if matches!(s.code, 1146 | 1049) => self
                    .config_err(format!(
                        "table {} does not exist on {}",
                        t.configured, self.server
                    )),
                Err(e) => self.classify(&format!("read table {}", t.configured), e),
                Ok(()) => self.config_err(format!(
                    "table {} has no columns visible to the source's user",
                    t.configured
                )),
            });
        };
        // MariaDB's JSON is LONGTEXT with a json_valid() check; MySQL has no
        // TABLE_NAME here (and a real JSON type), so an error means none.
        let checks: Vec<String> = conn
            .exec(
                "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS \
                 WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?",
                (&db, &table),
            )
            .await
            .unwrap_or_default();
        let json_cols: Vec<String> = checks.iter().filter_map(|c| json_valid_column(c)).collect();
        let pk_cols: Vec<String> = conn
            .exec(
                "SELECT COLUMN_NAME FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND INDEX_NAME = 'PRIMARY' \
                 ORDER BY SEQ_IN_INDEX",
                (&db, &table),
            )
            .await
            .map_err(&ext)?;
        let columns: Vec<ColumnMeta> = rows
            .into_iter()
            .map(|(_, _, name, data_type, column_type, charset)| {
                let json = json_cols.iter().any(|c| c == &name);
                let kind = kind_of_declared(
                    &data_type,
                    column_type.as_deref().unwrap_or(""),
                    charset.as_deref(),
                    json,
                );
                ColumnMeta { name, kind }
            })
            .collect();
        let pk = pk_cols
            .iter()
            .filter_map(|p| columns.iter().position(|c| &c.name == p))
            .collect();
        Ok(TableMeta {
            configured: t.configured.clone(),
            db,
            table,
            columns,
            pk,
        })
    }

    /// The server's current binlog position, and the GTID state there.
    async fn master_status(&self, conn: &mut Conn) -> Result<Start, SourceError> {
        let row: Option<mysql_async::Row> = conn
            .query_first("SHOW MASTER STATUS")
            .await
            .map_err(self.ext("read the binlog position (SHOW MASTER STATUS)"))?;
        let (file, pos) = row
            .and_then(|r| Some((r.get::<String, _>(0)?, r.get::<u64, _>(1)?)))
            .ok_or_else(|| {
                self.config_err(format!(
                    "{} reports no binlog position (SHOW MASTER STATUS is empty): is log_bin on?",
                    self.server
                ))
            })?;
        let gtid = gtid_at(conn, &file, pos).await;
        Ok(Start { file, pos, gtid })
    }

    /// Registers as a replica without reading anything: a missing
    /// REPLICATION SLAVE privilege shows now, not after the snapshot.
    async fn probe_replication(&self, at: &Start) -> Result<(), SourceError> {
        let conn = self.connect().await?;
        let req = BinlogStreamRequest::new(self.server_id)
            .with_filename(at.file.as_bytes())
            .with_pos(at.pos)
            .with_non_blocking();
        let mut stream = conn
            .get_binlog_stream(req)
            .await
            .map_err(|e| self.replication_err(e))?;
        let probe = async {
            while let Some(e) = stream.next().await {
                e.map_err(|e| self.replication_err(e))?;
            }
            Ok::<(), SourceError>(())
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, probe).await {
            Ok(r) => r?,
            Err(_) => tracing::debug!("replication probe did not end; privileges look fine"),
        }
        drop(stream);
        Ok(())
    }

    /// Reads every table in one consistent snapshot and sends it; returns
    /// the binlog position the snapshot is consistent with. `None`: shut down.
    async fn snapshot(
        &self,
        conn: &mut Conn,
        catalog: &Catalog,
        ctx: &SourceContext,
        truncate: bool,
    ) -> Result<Option<Start>, SourceError> {
        ctx.status.set_state("snapshotting");
        let ext = self.ext("read the initial snapshot");
        let Some((file, pos)) = consistent_snapshot(conn, &ext).await? else {
            return Err(self.config_err(format!(
                "{} does not report binlog_snapshot_file/binlog_snapshot_position (MariaDB does): \
                 the initial snapshot cannot be matched to a binlog position; set initial_snapshot = false",
                self.server
            )));
        };
        let start = Start {
            gtid: gtid_at(conn, &file, pos).await,
            file,
            pos,
        };
        // Fails early, before the rows are read.
        self.probe_replication(&start).await?;
        tracing::info!(file = %start.file, pos = start.pos, "initial snapshot started");
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
        // How many rows: InnoDB's estimate (information_schema).
        let mut estimate = Some(0u64);
        for t in &catalog.tables {
            let n: Option<Option<u64>> = conn
                .exec_first(
                    "SELECT TABLE_ROWS FROM information_schema.TABLES \
                     WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                    (t.db.as_str(), t.table.as_str()),
                )
                .await
                .ok()
                .flatten();
            estimate = estimate.zip(n.flatten()).map(|(a, b)| a + b);
        }
        let names: Vec<String> = catalog
            .tables
            .iter()
            .map(|t| format!("{}.{}", t.db, t.table))
            .collect();
        ctx.status.progress.start(
            format!("initial snapshot of {}", names.join(", ")),
            "rows",
            estimate,
        );
        for t in &catalog.tables {
            let cols: Vec<String> = t.columns.iter().map(|c| ident(&c.name)).collect();
            let from = format!("{}.{}", ident(&t.db), ident(&t.table));
            let mut after: Option<Vec<mysql_async::Value>> = None;
            let mut offset = 0usize;
            loop {
                let (sql, params) =
                    page_query(t, &cols, &from, self.batch_size, after.as_deref(), offset);
                let page: Vec<mysql_async::Row> = conn.exec(sql, params).await.map_err(&ext)?;
                let n = page.len();
                offset += n;
                for r in page {
                    let values = r.unwrap();
                    if !t.pk.is_empty() {
                        after = Some(t.pk.iter().map(|&i| values[i].clone()).collect());
                    }
                    match decode_query_row(t, &values) {
                        Ok(row) => chunk.push(RowChange::read(&t.configured, row)),
                        Err(reason) => {
                            ctx.dead_letter(&t.configured, &reason, &format!("{values:?}"))
                        }
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
                if n < self.batch_size {
                    break;
                }
            }
        }
        conn.query_drop("COMMIT").await.map_err(&ext)?;
        // Sent even when empty: the stream's start is then a checkpoint.
        if !ctx.deliver(start.position(), now_micros(), chunk).await? {
            return Ok(None);
        }
        ctx.status.progress.finish();
        tracing::info!(rows, file = %start.file, pos = start.pos, "initial snapshot read");
        Ok(Some(start))
    }

    /// Maps a binlog stream error; `at` is the position being read from.
    fn stream_err(&self, e: mysql_async::Error, at: &Position) -> SourceError {
        if let mysql_async::Error::Server(s) = &e
            && s.code == 1236
        {
            let m = s.message.to_ascii_lowercase();
            if m.contains("same server") || m.contains("server_id") || m.contains("server_uuid") {
                return self.config_err(format!(
                    "another replica of {} uses server_id {}: {}; set a unique server_id for the source",
                    self.server, self.server_id, s.message
                ));
            }
            return self.config_err(format!(
                "binlog position {at} is no longer on {} (purged?): {}; the changes after it are lost, \
                 so the source must start over: rename it or remove its snapshots",
                self.server, s.message
            ));
        }
        self.replication_err(e)
    }

    /// Streams from `start` until shutdown or an error.
    async fn stream(
        &self,
        ctx: &SourceContext,
        catalog: Catalog,
        start: Start,
        server: &ServerInfo,
    ) -> Result<(), SourceError> {
        let ext = self.ext("open the binlog stream");
        let mut conn = self.connect().await?;
        if server.mariadb {
            // GTID events instead of BEGIN queries: positions get their GTIDs.
            conn.query_drop("SET @mariadb_slave_capability = 4")
                .await
                .map_err(&ext)?;
        }
        let period = format!("SET @master_heartbeat_period = {}", HEARTBEAT.as_nanos());
        conn.query_drop(period).await.map_err(&ext)?;
        // Where the server's binlog ends now: the stream must get there
        // before the source counts as caught up.
        let end: Option<mysql_async::Row> = conn
            .query_first("SHOW MASTER STATUS")
            .await
            .map_err(self.ext("read the binlog position (SHOW MASTER STATUS)"))?;
        let end = end
            .and_then(|r| Some((r.get::<String, _>(0)?, r.get::<u64, _>(1)?)))
            .unwrap_or_default();
        let at = start.position();
        let req = BinlogStreamRequest::new(self.server_id)
            .with_filename(start.file.as_bytes())
            .with_pos(start.pos);
        let mut stream = conn
            .get_binlog_stream(req)
            .await
            .map_err(|e| self.stream_err(e, &at))?;
        ctx.status.set_state("streaming");
        tracing::info!(file = %start.file, pos = start.pos, server_id = self.server_id, "streaming the binlog");
        let mut st = StreamState::new(catalog, &start, server.checksum);
        st.reached = binlog_reached(&start.file, start.pos, &end);
        st.server_end = end;
        let mut meta_conn: Option<Conn> = None;
        let mut last_event = Instant::now();
        let mut last_progress = Instant::now();
        let mut resync = Resync::new(ctx.status.clone());
        resync.asked(&ctx.status.take_resyncs());
        loop {
            // A table being re-read: its next chunk, read between two events
            // (docs/sources.md, "Schema changes").
            if resync.wants_chunk() {
                self.read_chunk(ctx, &mut resync).await?;
            }
            if !self.hand_chunk(ctx, &mut st, &mut resync).await? {
                break;
            }
            let next = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = ctx.status.resync_asked.notified() => {
                    resync.asked(&ctx.status.take_resyncs());
                    continue;
                }
                // mysql_common unwraps a short read when a packet is shorter
                // than its event header says: a panic there is an error of
                // this stream (the source reconnects), not a dead task.
                r = tokio::time::timeout(IDLE, AssertUnwindSafe(stream.next()).catch_unwind()) => r,
            };
            let next = match next {
                Ok(Err(panic)) => {
                    let what = crate::grpc::guard::panic_message(&*panic);
                    return Err(SourceError::external(
                        &self.name,
                        &format!("read the binlog on {}", self.server),
                        format!(
                            "the driver failed decoding the event after {} ({what})",
                            st.position()
                        ),
                    ));
                }
                Ok(Ok(r)) => Ok(r),
                Err(e) => Err(e),
            };
            let event = match next {
                Err(_) => {
                    // Idle: caught up, once past the server's end at connect.
                    ctx.status.set_caught_up(st.reached);
                    if !self
                        .progress(ctx, &mut st, &mut last_progress, true)
                        .await?
                    {
                        break;
                    }
                    if last_event.elapsed() >= SILENCE_LIMIT {
                        return Err(SourceError::external(
                            &self.name,
                            &format!("read the binlog on {}", self.server),
                            format!(
                                "no event nor heartbeat for {}s: connection lost",
                                SILENCE_LIMIT.as_secs()
                            ),
                        ));
                    }
                    continue;
                }
                Ok(None) => {
                    return Err(SourceError::external(
                        &self.name,
                        &format!("read the binlog on {}", self.server),
                        "the server ended the stream",
                    ));
                }
                Ok(Some(Err(e))) => return Err(self.stream_err(e, &st.position())),
                Ok(Some(Ok(event))) => event,
            };
            last_event = Instant::now();
            let done = self.handle(ctx, &mut st, &event, &mut meta_conn).await?;
            if !st.altered.is_empty() {
                let altered = std::mem::take(&mut st.altered);
                for t in &altered {
                    tracing::info!(table = %t, "the table's shape changed: its rows are read again while it streams");
                }
                resync.asked(&altered);
            }
            if let Some(mut txn) = done {
                // A chunk due here goes with the group that reached its point.
                resync.merge(ctx, &st, &mut txn);
                if !ctx
                    .deliver(txn.position, txn.commit_micros, txn.changes)
                    .await?
                {
                    break;
                }
                last_progress = Instant::now();
            } else if !self
                .progress(ctx, &mut st, &mut last_progress, false)
                .await?
            {
                break;
            }
        }
        drop(stream);
        if let Some(c) = meta_conn {
            let _ = tokio::time::timeout(Duration::from_secs(1), c.disconnect()).await;
        }
        Ok(())
    }

    /// Sends the position of skipped groups when idle or now and then.
    /// `false` when shutdown came first.
    async fn progress(
        &self,
        ctx: &SourceContext,
        st: &mut StreamState,
        last: &mut Instant,
        idle: bool,
    ) -> Result<bool, SourceError> {
        if st.txn.is_some() || (!idle && last.elapsed() < PROGRESS_EVERY) {
            return Ok(true);
        }
        let Some((position, micros)) = st.unsent.take() else {
            return Ok(true);
        };
        *last = Instant::now();
        ctx.deliver(position, micros, Vec::new()).await
    }

    /// Handles one event; returns a finished transaction with changes.
    async fn handle(
        &self,
        ctx: &SourceContext,
        st: &mut StreamState,
        event: &Event,
        meta_conn: &mut Option<Conn>,
    ) -> Result<Option<SourceTxn>, SourceError> {
        let header = event.header();
        let end = u64::from(header.log_pos());
        let ts = i64::from(header.timestamp()) * 1_000_000;
        if end > 0 {
            st.pos = end;
            if !st.reached {
                st.reached = binlog_reached(&st.file, end, &st.server_end);
            }
        }
        if ts > 0 {
            // Reading what was just written is being caught up, even while
            // the server is busy with tables not captured.
            let live = now_micros() - ts <= LIVE.as_micros() as i64;
            ctx.status.set_caught_up(live && st.reached);
        }
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            match parse_mariadb_gtid(event.data()) {
                Some((domain, seq, flags)) => {
                    st.gtids.set(domain, header.server_id(), seq);
                    st.begin(flags & FL_STANDALONE == 0);
                }
                None => st.begin(false),
            }
            return Ok(None);
        }
        if !decoded_event(header.event_type_raw()) {
            return Ok(None);
        }
        let data = match event.read_data() {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            Err(e) => {
                let ty = header.event_type_raw();
                let raw = format!("{}:{end} event type {ty}", st.file);
                let reason = format!("undecodable binlog event: {e}");
                if ty == TABLE_MAP_EVENT {
                    // Its rows will be dead-lettered as rows without a table map.
                    tracing::trace!(%reason, %raw, "undecodable table map");
                } else if ROWS_EVENTS.contains(&ty) {
                    // The table id leads the body: only captured tables matter.
                    let id = event.data().get(..6).map(|b| {
                        b.iter()
                            .rev()
                            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
                    });
                    let table = id.and_then(|id| st.tables.get(&id)?.table.clone());
                    if let Some(t) = table {
                        ctx.dead_letter(&t.configured, &reason, &raw);
                    }
                }
                return Ok(None);
            }
        };
        match data {
            EventData::RotateEvent(r) => {
                // Before the first format description the reader does not
                // know about checksums, and leaves one on the name.
                let mut name = r.name_raw();
                if !st.fde_seen && st.checksum {
                    name = &name[..name.len().saturating_sub(4)];
                }
                st.file = String::from_utf8_lossy(name).into_owned();
                st.pos = r.position();
                // Groups do not span files and repeat their table maps:
                // forgetting them keeps the map small.
                if end != 0 {
                    st.tables.clear();
                }
                Ok(None)
            }
            EventData::FormatDescriptionEvent(_) => {
                st.fde_seen = true;
                Ok(None)
            }
            EventData::HeartbeatEvent => {
                // Sent only when the server has nothing more to send.
                st.reached = true;
                ctx.status.set_caught_up(true);
                Ok(None)
            }
            EventData::XidEvent(_) => Ok(st.commit(end, ts)),
            EventData::QueryEvent(q) => {
                let sql = q.query();
                let word = first_words(&sql);
                match word.as_str() {
                    "BEGIN" | "XA START" | "XA BEGIN" => {
                        st.begin(true);
                        Ok(None)
                    }
                    // ROLLBACK ends a group whose non-transactional changes stay.
                    "COMMIT" | "ROLLBACK" | "XA PREPARE" | "XA COMMIT" | "XA ROLLBACK" => {
                        Ok(st.commit(end, ts))
                    }
                    "XA END" | "SAVEPOINT" => Ok(None),
                    _ => {
                        if let Some((db, table)) = truncated_table(&sql, &q.schema())
                            && let Some(t) = st.catalog.get(&db, &table)
                        {
                            let change = RowChange::truncate(&t.configured);
                            st.txn.get_or_insert_with(Txn::default).changes.push(change);
                        } else if let Some((db, table)) = altered_table(&sql, &q.schema())
                            && let Some(t) = st.catalog.get(&db, &table)
                        {
                            st.altered.push(t.configured.clone());
                        } else if is_dml(&word)
                            && let Some(t) = st.catalog.mentioned_in(&sql)
                        {
                            // A session with binlog_format=STATEMENT: no rows to decode.
                            let reason = "a statement-based change (a session with binlog_format \
                                          other than ROW?) has no row images";
                            let raw = format!("{}:{end} {sql}", st.file);
                            ctx.dead_letter(&t.configured, reason, &raw);
                        }
                        // A statement outside BEGIN … COMMIT is a group of its own.
                        if st.txn.as_ref().is_none_or(|t| !t.explicit) {
                            return Ok(st.commit(end, ts));
                        }
                        Ok(None)
                    }
                }
            }
            EventData::TableMapEvent(tme) => {
                self.map_table(st, tme, meta_conn).await?;
                Ok(None)
            }
            EventData::RowsEvent(re) => {
                let Some(mapped) = st.tables.get(&re.table_id()) else {
                    // Its table map could not be read: the table is unknown.
                    let raw = format!("{}:{end} table id {}", st.file, re.table_id());
                    ctx.dead_letter("", "rows event without a readable table map", &raw);
                    return Ok(None);
                };
                let Some(table) = mapped.table.clone() else {
                    return Ok(None);
                };
                let (changes, dead) = decode_rows(&table, &mapped.tme, &re);
                for (reason, raw) in dead {
                    ctx.dead_letter(
                        &table.configured,
                        &reason,
                        &format!("{}:{end} {raw}", st.file),
                    );
                }
                st.txn
                    .get_or_insert_with(Txn::default)
                    .changes
                    .extend(changes);
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Records a table map; a configured table gets fresh column info
    /// whenever its map changes.
    async fn map_table(
        &self,
        st: &mut StreamState,
        tme: TableMapEvent<'_>,
        meta_conn: &mut Option<Conn>,
    ) -> Result<(), SourceError> {
        let id = tme.table_id();
        if st.tables.get(&id).is_some_and(|m| m.tme == tme) {
            return Ok(());
        }
        let (db, table) = (
            tme.database_name().into_owned(),
            tme.table_name().into_owned(),
        );
        let mapped = match st.catalog.index(&db, &table) {
            None => Mapped {
                tme: tme.into_owned(),
                table: None,
            },
            Some(i) => {
                if meta_conn.is_none() {
                    *meta_conn = Some(self.connect().await?);
                }
                let conn = meta_conn.as_mut().expect("connected above");
                let old = &st.catalog.tables[i];
                let t = TableRef {
                    configured: old.configured.clone(),
                    db: old.db.clone(),
                    table: old.table.clone(),
                };
                // A dropped table keeps its last known columns.
                match self.table_meta(conn, &t).await {
                    Ok(m) => st.catalog.tables[i] = m,
                    Err(SourceError::Config { reason, .. }) => {
                        tracing::trace!(%reason, "keeping the last known columns");
                    }
                    Err(e) => {
                        *meta_conn = None;
                        return Err(e);
                    }
                }
                let table = stream_table(&tme, &st.catalog.tables[i]);
                Mapped {
                    tme: tme.into_owned(),
                    table: Some(Arc::new(table)),
                }
            }
        };
        st.tables.insert(id, mapped);
        Ok(())
    }
}

/// Starts a `START TRANSACTION WITH CONSISTENT SNAPSHOT` on `conn` and
/// returns the binlog point it holds exactly (MariaDB's
/// `binlog_snapshot_file` / `binlog_snapshot_position`); `None` on a server
/// without them (MySQL).
async fn consistent_snapshot(
    conn: &mut Conn,
    ext: &impl Fn(mysql_async::Error) -> SourceError,
) -> Result<Option<(String, u64)>, SourceError> {
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(ext)?;
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .await
        .map_err(ext)?;
    let status: Vec<(String, String)> = conn
        .query("SHOW SESSION STATUS LIKE 'binlog_snapshot_%'")
        .await
        .map_err(ext)?;
    let var = |n: &str| {
        status
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.clone())
    };
    Ok(var("binlog_snapshot_file")
        .filter(|f| !f.is_empty())
        .zip(var("binlog_snapshot_position").and_then(|p| p.parse::<u64>().ok())))
}

/// Rows per chunk of a table's re-read.
const RESYNC_CHUNK_ROWS: usize = 2_000;

/// Configured tables read again while the binlog streams (after an `ALTER
/// TABLE` of one, or `fabric resync`), so that every row gets the table's
/// shape now. One chunk at a time, read between two events in a `START
/// TRANSACTION WITH CONSISTENT SNAPSHOT` whose `binlog_snapshot_file` /
/// `binlog_snapshot_position` say exactly which groups it holds: those
/// ending at or before that point. The chunk is handed on where the stream
/// reaches the point: after the group ending there, before the first group
/// past it, or on its own between groups. Every group before the point is
/// then delivered before the chunk, and every group after it after, so no
/// change is lost or undone, and nothing else has to be tracked.
struct Resync {
    status: Arc<super::SourceStatus>,
    queue: std::collections::VecDeque<String>,
    active: Option<ResyncTable>,
    pending: Option<ResyncChunk>,
}

struct ResyncTable {
    configured: String,
    /// The primary key of the last row read.
    after: Option<Vec<mysql_async::Value>>,
    rows: u64,
}

struct ResyncChunk {
    rows: Vec<RowChange>,
    /// The binlog point the chunk's snapshot holds exactly.
    at: (String, u64),
    done: bool,
}

impl Resync {
    fn new(status: Arc<super::SourceStatus>) -> Self {
        Resync {
            status,
            queue: Default::default(),
            active: None,
            pending: None,
        }
    }

    /// Tables (as configured) to read again: queued, or started over when
    /// being read now.
    fn asked(&mut self, tables: &[String]) {
        for t in tables {
            match &mut self.active {
                Some(a) if a.configured == *t => {
                    a.after = None;
                    a.rows = 0;
                    self.pending = None;
                    tracing::info!(table = %t, "table re-read starts over");
                }
                _ if !self.queue.contains(t) => self.queue.push_back(t.clone()),
                _ => {}
            }
        }
    }

    fn wants_chunk(&self) -> bool {
        self.pending.is_none() && (self.active.is_some() || !self.queue.is_empty())
    }

    /// Puts a chunk due at the group just read (`txn`, ending at `st`'s
    /// position) into it: after its changes when it ends at the chunk's
    /// point, before them when it ends past it.
    fn merge(&mut self, ctx: &SourceContext, st: &StreamState, txn: &mut SourceTxn) {
        let Some(p) = &self.pending else { return };
        if !binlog_reached(&st.file, st.pos, &p.at) {
            return;
        }
        let p = self.pending.take().expect("pending");
        let n = p.rows.len();
        if st.file == p.at.0 && st.pos == p.at.1 {
            txn.changes.extend(p.rows);
        } else {
            let mut rows = p.rows;
            rows.append(&mut txn.changes);
            txn.changes = rows;
        }
        self.handed(ctx, n, p.done);
    }

    fn handed(&mut self, ctx: &SourceContext, rows: usize, done: bool) {
        ctx.status.progress.advance(rows as u64);
        let Some(a) = self.active.as_mut() else {
            return;
        };
        a.rows += rows as u64;
        if done {
            ctx.status.progress.finish();
            tracing::info!(table = %a.configured, rows = a.rows, "re-read done");
            self.active = None;
        }
    }
}

impl Drop for Resync {
    /// The run ends: a table not done yet is read again (from its start)
    /// by the next run.
    fn drop(&mut self) {
        if let Some(a) = &self.active {
            self.status.request_resync(&a.configured);
        }
        for t in &self.queue {
            self.status.request_resync(t);
        }
    }
}

impl MysqlBinlogSource {
    /// Reads the next chunk of the table being re-read (starting the next
    /// table when none is). A table that cannot be read in chunks (no
    /// primary key; a server without `binlog_snapshot_*`) is given up with
    /// the reason in `last_error`; a lost connection ends the run.
    async fn read_chunk(
        &self,
        ctx: &SourceContext,
        resync: &mut Resync,
    ) -> Result<(), SourceError> {
        if resync.active.is_none() {
            let Some(t) = resync.queue.pop_front() else {
                return Ok(());
            };
            tracing::info!(table = %t, "re-reading table while streaming");
            ctx.status
                .progress
                .start(format!("re-read of {t} while streaming"), "rows", None);
            resync.active = Some(ResyncTable {
                configured: t,
                after: None,
                rows: 0,
            });
        }
        let a = resync.active.as_mut().expect("active");
        let Some(tref) = self.tables.iter().find(|t| t.configured == a.configured) else {
            resync.active = None;
            return Ok(());
        };
        match self.chunk(tref, a.after.as_deref()).await {
            Ok((chunk, last)) => {
                if let Some(last) = last {
                    a.after = Some(last);
                }
                resync.pending = Some(chunk);
                Ok(())
            }
            Err(e @ SourceError::Config { .. }) => {
                tracing::error!(error = %e, "table re-read given up");
                ctx.status.set_error(&e.to_string());
                ctx.status.progress.abandon();
                resync.active = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// One chunk of `t` after the key `after`, in a consistent snapshot,
    /// with the binlog point it holds; and the key of its last row.
    async fn chunk(
        &self,
        t: &TableRef,
        after: Option<&[mysql_async::Value]>,
    ) -> Result<(ResyncChunk, Option<Vec<mysql_async::Value>>), SourceError> {
        let ext = self.ext("re-read a table");
        let mut conn = self.connect().await?;
        let Some((file, pos)) = consistent_snapshot(&mut conn, &ext).await? else {
            return Err(self.config_err(format!(
                "{} does not report binlog_snapshot_file/binlog_snapshot_position (MariaDB does): \
                 table {} cannot be re-read while it streams",
                self.server, t.configured
            )));
        };
        let meta = self.table_meta(&mut conn, t).await?;
        if meta.pk.is_empty() {
            return Err(self.config_err(format!(
                "table {} has no primary key: it cannot be re-read in chunks while it streams",
                t.configured
            )));
        }
        let cols: Vec<String> = meta.columns.iter().map(|c| ident(&c.name)).collect();
        let from = format!("{}.{}", ident(&meta.db), ident(&meta.table));
        let (sql, params) = page_query(&meta, &cols, &from, RESYNC_CHUNK_ROWS, after, 0);
        let page: Vec<mysql_async::Row> = conn.exec(sql, params).await.map_err(&ext)?;
        let _ = conn.query_drop("COMMIT").await;
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
        let done = page.len() < RESYNC_CHUNK_ROWS;
        let mut rows = Vec::with_capacity(page.len());
        let mut last = None;
        for r in page {
            let values = r.unwrap();
            last = Some(meta.pk.iter().map(|&i| values[i].clone()).collect());
            match decode_query_row(&meta, &values) {
                Ok(row) => rows.push(RowChange::read(&meta.configured, row)),
                Err(reason) => {
                    tracing::warn!(table = %meta.configured, %reason, "a row of a re-read does not decode; left as it is")
                }
            }
        }
        Ok((
            ResyncChunk {
                rows,
                at: (file, pos),
                done,
            },
            last,
        ))
    }

    /// Hands on a chunk that is due between two groups (the stream idle at
    /// its point, or past it with only groups of other tables since): with
    /// the position of skipped groups not sent yet, or else the position of
    /// the last group sent (the chunk's rows are then a second transaction
    /// at that position; a position never goes back). `false` when shutdown
    /// came first.
    async fn hand_chunk(
        &self,
        ctx: &SourceContext,
        st: &mut StreamState,
        resync: &mut Resync,
    ) -> Result<bool, SourceError> {
        let Some(p) = &resync.pending else {
            return Ok(true);
        };
        if st.txn.is_some() || !binlog_reached(&st.file, st.pos, &p.at) {
            return Ok(true);
        }
        let p = resync.pending.take().expect("pending");
        let n = p.rows.len();
        let (position, micros) = st
            .unsent
            .take()
            .unwrap_or_else(|| (st.position(), now_micros()));
        if !ctx.deliver(position, micros, p.rows).await? {
            return Ok(false);
        }
        resync.handed(ctx, n, p.done);
        Ok(true)
    }
}

#[async_trait::async_trait]
impl Source for MysqlBinlogSource {
    #[tracing::instrument(skip_all, fields(source = %ctx.name))]
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        ctx.status.set_state("starting");
        let mut conn = self.connect().await?;
        let server = self.check_server(&mut conn).await?;
        let catalog = self.load_catalog(&mut conn).await?;
        let start = match &ctx.resume {
            Some(Position::Binlog { file, pos, gtid }) => {
                let gtid = match gtid {
                    Some(g) => Some(g.clone()),
                    None => gtid_at(&mut conn, file, *pos).await,
                };
                Start {
                    file: file.clone(),
                    pos: *pos,
                    gtid,
                }
            }
            resume if resume.is_some() || self.initial_snapshot => {
                if let Some(other) = resume {
                    tracing::warn!(resume = %other, "the resume position is not a binlog position; snapshotting again");
                }
                let truncate = ctx.snapshot_replaces();
                match self.snapshot(&mut conn, &catalog, &ctx, truncate).await? {
                    Some(s) => s,
                    None => return Ok(()),
                }
            }
            _ => {
                let s = self.master_status(&mut conn).await?;
                self.probe_replication(&s).await?;
                if !ctx.deliver(s.position(), now_micros(), Vec::new()).await? {
                    return Ok(());
                }
                s
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.disconnect()).await;
        self.stream(&ctx, catalog, start, &server).await?;
        ctx.status.set_state("stopped");
        Ok(())
    }
}

/// A table map and, for a configured table, how to decode its rows.
struct Mapped {
    tme: TableMapEvent<'static>,
    table: Option<Arc<StreamTable>>,
}

/// A configured table's columns as one table map describes them.
#[derive(Debug)]
struct StreamTable {
    configured: String,
    /// By column index; `Err` when the column cannot be decoded at all.
    columns: Result<Vec<ColumnMeta>, String>,
}

/// The event group being read.
#[derive(Default)]
struct Txn {
    /// Begun by `BEGIN` (or a non-standalone GTID): ends at its commit event.
    explicit: bool,
    changes: Vec<RowChange>,
}

struct StreamState {
    catalog: Catalog,
    file: String,
    gtids: Gtids,
    tables: HashMap<u64, Mapped>,
    txn: Option<Txn>,
    /// The position (and commit time) of groups read but not sent.
    unsent: Option<(Position, i64)>,
    last: Position,
    checksum: bool,
    fde_seen: bool,
    /// The end of the last event read in `file` (0 before the first).
    pos: u64,
    /// Configured tables an `ALTER TABLE` just changed.
    altered: Vec<String>,
    /// The server's binlog file and position when the stream connected.
    server_end: (String, u64),
    /// The stream has got there (or a heartbeat said it is at the end).
    reached: bool,
}

/// Whether `file`:`pos` is at or past `end` (files in the order of their
/// sequence numbers, as positions compare).
fn binlog_reached(file: &str, pos: u64, end: &(String, u64)) -> bool {
    use crate::event::position::binlog_seq;
    (binlog_seq(file), file, pos) >= (binlog_seq(&end.0), end.0.as_str(), end.1)
}

impl StreamState {
    fn new(catalog: Catalog, start: &Start, checksum: bool) -> Self {
        StreamState {
            catalog,
            file: start.file.clone(),
            gtids: Gtids::parse(start.gtid.as_deref().unwrap_or("")),
            tables: HashMap::new(),
            txn: None,
            unsent: None,
            last: start.position(),
            checksum,
            fde_seen: false,
            server_end: (String::new(), 0),
            pos: start.pos,
            altered: Vec::new(),
            reached: true,
        }
    }

    fn begin(&mut self, explicit: bool) {
        self.txn = Some(Txn {
            explicit,
            changes: Vec::new(),
        });
    }

    fn position(&self) -> Position {
        self.last.clone()
    }

    /// Ends the group at the event ending at `end`; a group with changes is
    /// returned to be sent, one without is remembered as progress.
    fn commit(&mut self, end: u64, micros: i64) -> Option<SourceTxn> {
        let txn = self.txn.take().unwrap_or_default();
        // An artificial event (log_pos 0) is no position to resume from.
        if end == 0 {
            return None;
        }
        self.last = Position::Binlog {
            file: self.file.clone(),
            pos: end,
            gtid: self.gtids.text(),
        };
        if txn.changes.is_empty() {
            self.unsent = Some((self.last.clone(), micros));
            return None;
        }
        self.unsent = None;
        Some(SourceTxn {
            source: Arc::from(""),
            position: self.last.clone(),
            commit_micros: micros,
            changes: txn.changes,
        })
    }
}

/// MariaDB's GTID state: per replication domain, the last server id and
/// sequence number.
#[derive(Debug, Default, PartialEq)]
struct Gtids(BTreeMap<u32, (u32, u64)>);

impl Gtids {
    /// Parses `@@gtid_binlog_pos` text (`0-1-100,1-2-5`); bad parts are skipped.
    fn parse(s: &str) -> Self {
        let mut out = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut it = part.splitn(3, '-');
            let (Some(d), Some(srv), Some(seq)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if let (Ok(d), Ok(srv), Ok(seq)) = (d.parse(), srv.parse(), seq.parse()) {
                out.insert(d, (srv, seq));
            }
        }
        Gtids(out)
    }

    fn set(&mut self, domain: u32, server: u32, seq: u64) {
        self.0.insert(domain, (server, seq));
    }

    fn text(&self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(d, (s, n))| format!("{d}-{s}-{n}"))
            .collect();
        Some(parts.join(","))
    }
}

/// (domain, sequence number, flags) of a MariaDB GTID event's body.
fn parse_mariadb_gtid(body: &[u8]) -> Option<(u32, u64, u8)> {
    let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let flags = *body.get(12)?;
    Some((domain, seq, flags))
}

/// The GTID state at a binlog position (MariaDB's `BINLOG_GTID_POS`); `None`
/// without GTIDs or on MySQL.
async fn gtid_at(conn: &mut Conn, file: &str, pos: u64) -> Option<String> {
    let r: Result<Option<Option<String>>, _> = conn
        .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (file, pos))
        .await;
    r.ok().flatten().flatten().filter(|g| !g.is_empty())
}

/// Checks the variables binlog CDC needs; the reason names the variable,
/// its value and what it must be.
fn check_binlog_settings(log_bin: &str, format: &str, row_image: &str) -> Result<(), String> {
    if !matches!(log_bin.to_ascii_uppercase().as_str(), "1" | "ON" | "TRUE") {
        return Err(format!(
            "has the binary log off (log_bin is {log_bin}): start the server with log_bin and binlog_format=ROW"
        ));
    }
    if !format.eq_ignore_ascii_case("ROW") {
        return Err(format!("has binlog_format {format}: it must be ROW"));
    }
    if !row_image.eq_ignore_ascii_case("FULL") {
        return Err(format!("has binlog_row_image {row_image}: it must be FULL"));
    }
    Ok(())
}

/// A stable default replica id in `1000..2^31`: FNV-1a of the source name.
fn default_server_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    1000 + h % ((1u32 << 31) - 1000)
}

fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// One page of a snapshot read: keyset pagination on the primary key, or
/// (without one) `LIMIT`/`OFFSET` in the snapshot's stable order.
fn page_query(
    t: &TableMeta,
    cols: &[String],
    from: &str,
    limit: usize,
    after: Option<&[mysql_async::Value]>,
    offset: usize,
) -> (String, mysql_async::Params) {
    let select = format!("SELECT {} FROM {from}", cols.join(", "));
    if t.pk.is_empty() {
        let sql = format!("{select} LIMIT {limit} OFFSET {offset}");
        return (sql, mysql_async::Params::Empty);
    }
    let keys: Vec<&String> = t.pk.iter().map(|&i| &cols[i]).collect();
    let order = keys
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let Some(after) = after else {
        let sql = format!("{select} ORDER BY {order} LIMIT {limit}");
        return (sql, mysql_async::Params::Empty);
    };
    // (a, b) > (x, y) spelled out, which the range optimizer handles.
    let mut ors = Vec::new();
    let mut params = Vec::new();
    for i in 0..keys.len() {
        let mut ands = Vec::new();
        for (j, k) in keys.iter().enumerate().take(i) {
            ands.push(format!("{k} = ?"));
            params.push(after[j].clone());
        }
        ands.push(format!("{} > ?", keys[i]));
        params.push(after[i].clone());
        ors.push(format!("({})", ands.join(" AND ")));
    }
    let sql = format!(
        "{select} WHERE {} ORDER BY {order} LIMIT {limit}",
        ors.join(" OR ")
    );
    (sql, mysql_async::Params::Positional(params))
}

/// The column a MariaDB JSON check (`json_valid(`col`)`) is about.
fn json_valid_column(clause: &str) -> Option<String> {
    let inner = clause
        .trim()
        .strip_prefix("json_valid(")?
        .strip_suffix(')')?;
    let name = inner.trim();
    match name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) {
        Some(n) => Some(n.replace("``", "`")),
        None => Some(name.to_string()),
    }
}

/// The kind of a column from `information_schema` (`DATA_TYPE`, `COLUMN_TYPE`).
fn kind_of_declared(data_type: &str, column_type: &str, charset: Option<&str>, json: bool) -> Kind {
    let dt = data_type.to_ascii_lowercase();
    match dt.as_str() {
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" => Kind::Int,
        "float" | "double" | "real" | "double precision" => Kind::Float,
        "decimal" | "numeric" | "fixed" | "dec" => Kind::Decimal,
        "json" => Kind::Json,
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "nchar"
        | "nvarchar" => {
            if json {
                Kind::Json
            } else {
                match charset {
                    Some(c) if c.eq_ignore_ascii_case("binary") => Kind::Bytes,
                    Some(c) if c.to_ascii_lowercase().starts_with("latin1") => {
                        Kind::Text(Charset::Latin1)
                    }
                    _ => Kind::Text(Charset::Utf8),
                }
            }
        }
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
            if json {
                Kind::Json
            } else {
                Kind::Bytes
            }
        }
        "datetime" => Kind::DateTime,
        "timestamp" => Kind::Timestamp,
        "date" => Kind::Date,
        "time" => Kind::Time,
        "year" => Kind::Year,
        "bit" => Kind::Bit,
        "enum" => Kind::Enum(parse_enum_values(column_type).into()),
        "set" => Kind::Set(parse_enum_values(column_type).into()),
        _ => Kind::Other,
    }
}

/// The values of `enum('a','b''c')` or `set(…)`.
fn parse_enum_values(column_type: &str) -> Vec<String> {
    let Some(open) = column_type.find('(') else {
        return Vec::new();
    };
    let body = &column_type[open + 1..];
    let mut out = Vec::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut v = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\'' if chars.peek() == Some(&'\'') => {
                    chars.next();
                    v.push('\'');
                }
                '\'' => break,
                '\\' => {
                    if let Some(n) = chars.next() {
                        v.push(n);
                    }
                }
                c => v.push(c),
            }
        }
        out.push(v);
    }
    out
}

/// How a table map's column is decoded, with `meta` (by name) filling in
/// what the map does not say.
fn stream_table(tme: &TableMapEvent<'_>, meta: &TableMeta) -> StreamTable {
    StreamTable {
        configured: meta.configured.clone(),
        columns: stream_columns(tme, meta),
    }
}

fn stream_columns(tme: &TableMapEvent<'_>, meta: &TableMeta) -> Result<Vec<ColumnMeta>, String> {
    let n = usize::try_from(tme.columns_count()).map_err(|_| "too many columns".to_string())?;
    let extractor = OptionalMetaExtractor::new(tme.iter_optional_meta())
        .map_err(|e| format!("bad table map metadata: {e}"))?;
    let names: Vec<String> = extractor
        .iter_column_name()
        .map(|c| c.map(|c| c.name().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad column names in the table map: {e}"))?;
    let names = if names.len() == n {
        names
    } else if meta.columns.len() == n {
        meta.columns.iter().map(|c| c.name.clone()).collect()
    } else {
        return Err(format!(
            "the table map has {n} columns without names (binlog_row_metadata is not FULL) \
             and information_schema has {}: column names are unknown",
            meta.columns.len()
        ));
    };
    let mut enums: Vec<Vec<String>> = Vec::new();
    let mut sets: Vec<Vec<String>> = Vec::new();
    for field in tme.iter_optional_meta() {
        match field {
            Ok(OptionalMetadataField::EnumStrValue(v)) => {
                if !plausible_str_values(&serialized(&v)) {
                    return Err("bad enum values in the table map: counts beyond the event".into());
                }
                for e in v.iter_values() {
                    let e = e.map_err(|e| format!("bad enum values in the table map: {e}"))?;
                    enums.push(e.values().iter().map(|x| x.value().into_owned()).collect());
                }
            }
            Ok(OptionalMetadataField::SetStrValue(v)) => {
                if !plausible_str_values(&serialized(&v)) {
                    return Err("bad set values in the table map: counts beyond the event".into());
                }
                for s in v.iter_values() {
                    let s = s.map_err(|e| format!("bad set values in the table map: {e}"))?;
                    sets.push(s.values().iter().map(|x| x.value().into_owned()).collect());
                }
            }
            _ => {}
        }
    }
    let (mut enums, mut sets) = (enums.into_iter(), sets.into_iter());
    let mut charsets = extractor.iter_charset();
    let mut out = Vec::with_capacity(n);
    for (i, name) in names.into_iter().enumerate() {
        let ty = tme
            .get_column_type(i)
            .map_err(|e| format!("column {name}: {e}"))?
            .ok_or_else(|| format!("column {name}: no type in the table map"))?;
        // The driver sizes a DECIMAL's bytes from precision - scale without
        // a check: a scale above the precision would ask for 2^64 bytes and
        // abort the process.
        if ty == ColumnType::MYSQL_TYPE_NEWDECIMAL {
            match tme.get_column_metadata(i) {
                Some(&[p, s, ..]) if s <= p && p <= 65 && s <= 38 => {}
                m => {
                    return Err(format!(
                        "column {name}: DECIMAL metadata {m:?} is no precision and scale"
                    ));
                }
            }
        }
        let declared = meta
            .columns
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.kind);
        let charset = if ty.is_character_type() {
            charsets.next().and_then(Result::ok)
        } else {
            None
        };
        let kind = match ty {
            ColumnType::MYSQL_TYPE_ENUM => {
                let values = enums.next().filter(|v| !v.is_empty());
                match (values, declared) {
                    (Some(v), _) => Kind::Enum(v.into()),
                    (None, Some(Kind::Enum(v))) => Kind::Enum(v.clone()),
                    (None, _) => Kind::Enum(Arc::from([])),
                }
            }
            ColumnType::MYSQL_TYPE_SET => {
                let values = sets.next().filter(|v| !v.is_empty());
                match (values, declared) {
                    (Some(v), _) => Kind::Set(v.into()),
                    (None, Some(Kind::Set(v))) => Kind::Set(v.clone()),
                    (None, _) => Kind::Set(Arc::from([])),
                }
            }
            _ => kind_of_binlog(ty, charset, declared),
        };
        out.push(ColumnMeta { name, kind });
    }
    Ok(out)
}

/// The bytes the driver parses `v` from.
fn serialized(v: &dyn MySerialize) -> Vec<u8> {
    let mut raw = Vec::new();
    v.serialize(&mut raw);
    raw
}

/// True when the ENUM or SET value lists of a table map (per column: a
/// count, then that many length-prefixed strings, all length-encoded
/// integers) ask for no more items or bytes than are there. The driver
/// allocates for a count before it reads the items: a hostile count would
/// abort the process.
fn plausible_str_values(mut b: &[u8]) -> bool {
    fn lenenc(b: &mut &[u8]) -> Option<u64> {
        let (&first, rest) = b.split_first()?;
        let n = match first {
            0..=0xfa => {
                *b = rest;
                return Some(u64::from(first));
            }
            0xfc => 2,
            0xfd => 3,
            0xfe => 8,
            _ => return None,
        };
        if rest.len() < n {
            return None;
        }
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&rest[..n]);
        *b = &rest[n..];
        Some(u64::from_le_bytes(v))
    }
    while !b.is_empty() {
        let Some(count) = lenenc(&mut b) else {
            return false;
        };
        if count > b.len() as u64 {
            return false;
        }
        for _ in 0..count {
            match lenenc(&mut b) {
                Some(n) if n <= b.len() as u64 => b = &b[n as usize..],
                _ => return false,
            }
        }
    }
    true
}

/// The kind of a table map column type; `declared` (information_schema)
/// decides what the binlog cannot tell apart.
fn kind_of_binlog(ty: ColumnType, charset: Option<u16>, declared: Option<&Kind>) -> Kind {
    use ColumnType::*;
    let text = |charset: Option<u16>| match (charset, declared) {
        (_, Some(Kind::Json)) => Kind::Json,
        (Some(BINARY_CHARSET), _) => Kind::Bytes,
        (Some(c), _) if is_latin1(c) => Kind::Text(Charset::Latin1),
        (Some(_), _) => Kind::Text(Charset::Utf8),
        // No charset in the metadata: trust the declaration.
        (None, Some(k @ (Kind::Text(_) | Kind::Bytes))) => k.clone(),
        (None, _) => Kind::Text(Charset::Utf8),
    };
    match ty {
        MYSQL_TYPE_TINY | MYSQL_TYPE_SHORT | MYSQL_TYPE_INT24 | MYSQL_TYPE_LONG
        | MYSQL_TYPE_LONGLONG => Kind::Int,
        MYSQL_TYPE_FLOAT | MYSQL_TYPE_DOUBLE => Kind::Float,
        MYSQL_TYPE_DECIMAL | MYSQL_TYPE_NEWDECIMAL => Kind::Decimal,
        MYSQL_TYPE_VARCHAR | MYSQL_TYPE_VAR_STRING | MYSQL_TYPE_STRING => text(charset),
        MYSQL_TYPE_TINY_BLOB | MYSQL_TYPE_MEDIUM_BLOB | MYSQL_TYPE_LONG_BLOB | MYSQL_TYPE_BLOB => {
            text(charset)
        }
        MYSQL_TYPE_JSON => Kind::Json,
        MYSQL_TYPE_DATETIME | MYSQL_TYPE_DATETIME2 => Kind::DateTime,
        MYSQL_TYPE_TIMESTAMP | MYSQL_TYPE_TIMESTAMP2 => Kind::Timestamp,
        MYSQL_TYPE_DATE | MYSQL_TYPE_NEWDATE => Kind::Date,
        MYSQL_TYPE_TIME | MYSQL_TYPE_TIME2 => Kind::Time,
        MYSQL_TYPE_YEAR => Kind::Year,
        MYSQL_TYPE_BIT => Kind::Bit,
        _ => Kind::Other,
    }
}

/// Collation ids of the `latin1` character set.
fn is_latin1(collation: u16) -> bool {
    matches!(collation, 5 | 8 | 15 | 31 | 47 | 48 | 49 | 94)
}

/// Dead letters of undecodable rows: (reason, raw).
pub type Dead = Vec<(String, String)>;

/// The changes of one rows event, and the rows that cannot be decoded
/// (to be dead-lettered).
fn decode_rows(
    table: &StreamTable,
    tme: &TableMapEvent<'_>,
    re: &RowsEventData<'_>,
) -> (Vec<RowChange>, Dead) {
    let op = match re {
        RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => Op::Insert,
        RowsEventData::UpdateRowsEventV1(_)
        | RowsEventData::UpdateRowsEvent(_)
        | RowsEventData::PartialUpdateRowsEvent(_) => Op::Update,
        RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => Op::Delete,
    };
    let mut dead = Dead::new();
    let columns = match &table.columns {
        Ok(c) => c,
        Err(reason) => {
            dead.push((reason.clone(), format!("{:?}", re.rows_data())));
            return (Vec::new(), dead);
        }
    };
    let before_cols: Vec<usize> = re
        .columns_before_image()
        .map(|b| b.iter_ones().collect())
        .unwrap_or_default();
    let after_cols: Vec<usize> = re
        .columns_after_image()
        .map(|b| b.iter_ones().collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    // Every row image takes at least a byte; a hostile event whose rows
    // take none (no columns present) would otherwise never end.
    let most = re.rows_data().len();
    let mut rows = re.rows(tme);
    let mut n = 0;
    loop {
        // The driver's row parsing overflows on some hostile (and, for
        // negative TIME(1..4) with a fraction, some real) values: a panic
        // there (debug builds) is this event's dead letter, not the
        // source's end.
        let Ok(next) = std::panic::catch_unwind(AssertUnwindSafe(|| rows.next())) else {
            dead.push((
                "the driver failed decoding a row of this event".into(),
                format!("{:?}", re.rows_data()),
            ));
            break;
        };
        let Some(r) = next else { break };
        n += 1;
        if n > most.max(1) {
            dead.push((
                format!("a rows event of {most} bytes yields more than {most} rows"),
                format!("{:?}", re.rows_data()),
            ));
            break;
        }
        let (before, after) = match r {
            Ok(images) => images,
            Err(e) => {
                // The rest of the event cannot be found past a bad row.
                dead.push((
                    format!("undecodable rows event: {e}"),
                    format!("{:?}", re.rows_data()),
                ));
                break;
            }
        };
        let image = |row: Option<&BinlogRow>, present: &[usize]| -> Result<Option<Row>, String> {
            row.map(|row| decode_binlog_row(columns, present, row))
                .transpose()
        };
        match (
            image(before.as_ref(), &before_cols),
            image(after.as_ref(), &after_cols),
        ) {
            (Ok(before), Ok(after)) => out.push(RowChange {
                table: table.configured.clone(),
                op,
                before,
                after,
            }),
            (Err(reason), _) | (_, Err(reason)) => {
                dead.push((reason, format!("before {before:?} after {after:?}")))
            }
        }
    }
    (out, dead)
}

/// Decodes a stream of binlog events (a binlog file without its 4-byte
/// magic, or what a server sends) the way the source does, without a
/// server: every table is captured, its columns known from the table map
/// alone. Returns the row changes and the dead letters; hostile bytes end
/// the stream with an error, never a panic. For the binlog fuzz target
/// and for tools reading binlog files.
pub fn decode_events(mut bytes: &[u8]) -> Result<(Vec<RowChange>, Dead), String> {
    use mysql_async::binlog::events::FormatDescriptionEvent;
    use mysql_async::binlog::{BinlogChecksumAlg, BinlogVersion};
    const HEADER: usize = 19;
    let mut fde = FormatDescriptionEvent::new(BinlogVersion::Version4);
    let mut tables: HashMap<u64, (TableMapEvent<'static>, Arc<StreamTable>)> = HashMap::new();
    let (mut out, mut dead) = (Vec::new(), Dead::new());
    while !bytes.is_empty() {
        // The driver unwraps a short read of an event's body: an event is
        // cut out whole first (the source guards the driver's own reads).
        if bytes.len() < HEADER {
            return Err(format!(
                "{} bytes left: a truncated event header",
                bytes.len()
            ));
        }
        let size = u32::from_le_bytes(bytes[9..13].try_into().expect("4 bytes")) as usize;
        if size < HEADER || size > bytes.len() {
            return Err(format!(
                "an event of {size} bytes with {} left",
                bytes.len()
            ));
        }
        // Nor does it check that an event holds the checksum (and, in a
        // format description, the algorithm byte) it cuts off.
        let checksummed = !matches!(
            fde.footer().get_checksum_alg(),
            Ok(None | Some(BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_OFF))
        );
        let is_fde = bytes[4] == FORMAT_DESCRIPTION_EVENT;
        let least = HEADER
            + if is_fde {
                5
            } else if checksummed {
                4
            } else {
                0
            };
        if size < least {
            return Err(format!(
                "an event of {size} bytes, shorter than its checksum"
            ));
        }
        let (one, rest) = bytes.split_at(size);
        bytes = rest;
        let event = Event::read(&fde, one).map_err(|e| format!("undecodable binlog event: {e}"))?;
        if !decoded_event(event.header().event_type_raw()) {
            continue;
        }
        if is_fde {
            let new = event
                .read_event::<FormatDescriptionEvent<'_>>()
                .map_err(|e| format!("undecodable format description: {e}"))?;
            fde = new.into_owned().with_footer(event.footer());
            continue;
        }
        match event.read_data() {
            Ok(Some(EventData::TableMapEvent(tme))) => {
                let meta = TableMeta {
                    configured: format!("{}.{}", tme.database_name(), tme.table_name()),
                    db: tme.database_name().into_owned(),
                    table: tme.table_name().into_owned(),
                    columns: Vec::new(),
                    pk: Vec::new(),
                };
                let table = Arc::new(stream_table(&tme, &meta));
                tables.insert(tme.table_id(), (tme.into_owned(), table));
            }
            Ok(Some(EventData::RowsEvent(re))) => match tables.get(&re.table_id()) {
                Some((tme, table)) => {
                    let (c, d) = decode_rows(table, tme, &re);
                    out.extend(c);
                    dead.extend(d);
                }
                None => dead.push((
                    "rows event without a readable table map".into(),
                    format!("table id {}", re.table_id()),
                )),
            },
            Ok(_) => {}
            Err(e) => dead.push((format!("undecodable binlog event: {e}"), String::new())),
        }
    }
    Ok((out, dead))
}

/// A binlog row image as a [`Row`]; `present` are the column indexes it holds.
fn decode_binlog_row(
    columns: &[ColumnMeta],
    present: &[usize],
    row: &BinlogRow,
) -> Result<Row, String> {
    let mut out = Row::new();
    for (k, &i) in present.iter().enumerate() {
        let col = columns
            .get(i)
            .ok_or_else(|| format!("column {i} is not in the table map"))?;
        let v = row
            .as_ref(k)
            .ok_or_else(|| format!("column {}: missing from the row image", col.name))?;
        let value = match v {
            BinlogValue::Value(v) => decode_value(&col.kind, v, Origin::Binlog),
            BinlogValue::Jsonb(j) => serde_json::Value::try_from(j.clone())
                .map(|j| Value::Json(j.to_string()))
                .map_err(|e| format!("bad binary json: {e}")),
            BinlogValue::JsonDiff(_) => Err(
                "a partial JSON update (binlog_row_value_options=PARTIAL_JSON) has no full value"
                    .into(),
            ),
        };
        out.insert(
            col.name.clone(),
            value.map_err(|e| format!("column {}: {e}", col.name))?,
        );
    }
    Ok(out)
}

/// A snapshot query row (columns in table order) as a [`Row`].
fn decode_query_row(t: &TableMeta, values: &[mysql_async::Value]) -> Result<Row, String> {
    t.columns
        .iter()
        .zip(values)
        .map(|(c, v)| {
            decode_value(&c.kind, v, Origin::Query)
                .map(|v| (c.name.clone(), v))
                .map_err(|e| format!("column {}: {e}", c.name))
        })
        .collect()
}

/// Maps one value onto [`Value`] by its column's kind:
/// - NULL is `Null`; integers `Int` (unsigned above `i64::MAX`: `Decimal` text);
/// - `FLOAT`/`DOUBLE` `Float` (a `FLOAT` through its shortest text, so 0.1
///   stays 0.1); `DECIMAL` `Decimal`, exact text as the server writes it;
/// - `CHAR`/`VARCHAR`/`TEXT` `Text` (latin1 or UTF-8; other charsets must be
///   valid UTF-8); `BINARY`/`VARBINARY`/`BLOB` and unmapped types `Bytes`;
/// - JSON (MySQL's type, MariaDB's `json_valid` LONGTEXT) `Json` text;
/// - `DATETIME` (taken as UTC) and `TIMESTAMP` `Timestamp` microseconds,
///   `DATE` `Date`; zero dates (`0000-00-00`) are `Null`;
/// - `TIME` `Text` (`[-]HH:MM:SS[.ffffff]`, hours may exceed 24); `YEAR` `Int`;
/// - `BIT` `Int` (big-endian; above `i64::MAX` `Decimal`);
/// - `ENUM` `Text` of its value (`""` for the invalid-value 0); `SET` `Text`
///   of its values joined with commas.
fn decode_value(kind: &Kind, v: &mysql_async::Value, origin: Origin) -> Result<Value, String> {
    use mysql_async::Value as M;
    Ok(match (kind, v) {
        (_, M::NULL) => Value::Null,
        (Kind::Int | Kind::Year, M::Int(i)) => Value::Int(*i),
        (Kind::Int | Kind::Year, M::UInt(u)) => unsigned(*u),
        (Kind::Float, M::Float(f)) => Value::Float(f.to_string().parse().unwrap_or(f64::from(*f))),
        (Kind::Float, M::Double(d)) => Value::Float(*d),
        (Kind::Decimal, M::Bytes(b)) => {
            let s = utf8(b)?;
            if !is_decimal(&s) {
                return Err(format!("bad decimal {s:?}"));
            }
            Value::Decimal(s)
        }
        (Kind::Text(cs), M::Bytes(b)) => match (origin, cs) {
            (Origin::Binlog, Charset::Latin1) => {
                Value::Text(b.iter().map(|&c| c as char).collect())
            }
            _ => Value::Text(utf8(b)?),
        },
        (Kind::Bytes | Kind::Other, M::Bytes(b)) => Value::Bytes(b.clone()),
        (Kind::Json, M::Bytes(b)) => Value::Json(utf8(b)?),
        (Kind::DateTime | Kind::Timestamp | Kind::Date, M::Date(0, 0, 0, ..)) => Value::Null,
        (Kind::DateTime | Kind::Timestamp, M::Date(y, mo, d, h, mi, s, us)) => {
            let t = chrono::NaiveDate::from_ymd_opt(i32::from(*y), u32::from(*mo), u32::from(*d))
                .and_then(|d| {
                    d.and_hms_micro_opt(u32::from(*h), u32::from(*mi), u32::from(*s), *us)
                })
                .ok_or_else(|| format!("bad date-time {v:?}"))?;
            Value::Timestamp(t.and_utc().timestamp_micros())
        }
        // The binlog's TIMESTAMP is seconds since the epoch, as text for TIMESTAMP2.
        (Kind::Timestamp, M::Int(0)) => Value::Null,
        (Kind::Timestamp, M::Int(secs)) => Value::Timestamp(secs * 1_000_000),
        (Kind::Timestamp, M::Bytes(b)) => match epoch_micros(&utf8(b)?) {
            Some(0) => Value::Null,
            Some(t) => Value::Timestamp(t),
            None => return Err(format!("bad timestamp {v:?}")),
        },
        (Kind::Date, M::Date(y, mo, d, ..)) => {
            let date =
                chrono::NaiveDate::from_ymd_opt(i32::from(*y), u32::from(*mo), u32::from(*d))
                    .ok_or_else(|| format!("bad date {v:?}"))?;
            let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
            Value::Date(i32::try_from((date - epoch).num_days()).map_err(|e| e.to_string())?)
        }
        (Kind::Time, M::Time(neg, days, h, mi, s, us)) => {
            let hours = u64::from(*days) * 24 + u64::from(*h);
            let sign = if *neg { "-" } else { "" };
            let frac = if *us > 0 {
                format!(".{us:06}")
            } else {
                String::new()
            };
            Value::Text(format!("{sign}{hours:02}:{mi:02}:{s:02}{frac}"))
        }
        // The binlog writes YEAR as text, and 0000 as 1900 (1900 is no YEAR).
        (Kind::Year, M::Bytes(b)) => match utf8(b)?.parse::<i64>() {
            Ok(1900) => Value::Int(0),
            Ok(y) => Value::Int(y),
            Err(_) => return Err(format!("bad year {v:?}")),
        },
        (Kind::Bit, M::Bytes(b)) => {
            if b.len() > 8 {
                return Err(format!("bit value of {} bytes", b.len()));
            }
            unsigned(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
        }
        (Kind::Bit, M::Int(i)) => Value::Int(*i),
        (Kind::Bit, M::UInt(u)) => unsigned(*u),
        (Kind::Enum(values), M::Int(i)) => match usize::try_from(*i) {
            Ok(0) => Value::Text(String::new()),
            Ok(i) if i <= values.len() => Value::Text(values[i - 1].clone()),
            _ => return Err(format!("enum index {i} out of {} values", values.len())),
        },
        (Kind::Enum(_), M::Bytes(b)) => Value::Text(utf8(b)?),
        (Kind::Set(values), M::Bytes(b)) if origin == Origin::Binlog => {
            let bits = b
                .iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
            let mut names = Vec::new();
            for (i, name) in values.iter().enumerate().take(64) {
                if bits & (1 << i) != 0 {
                    names.push(name.as_str());
                }
            }
            if values.len() < 64 && bits >> values.len() != 0 {
                return Err(format!(
                    "set bits {bits:#x} beyond its {} values",
                    values.len()
                ));
            }
            Value::Text(names.join(","))
        }
        (Kind::Set(_), M::Bytes(b)) => Value::Text(utf8(b)?),
        (kind, v) => return Err(format!("unexpected value {v:?} for a {kind:?} column")),
    })
}

fn unsigned(u: u64) -> Value {
    i64::try_from(u).map_or_else(|_| Value::Decimal(u.to_string()), Value::Int)
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "text that is not valid UTF-8".to_string())
}

fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    digits.bytes().any(|b| b.is_ascii_digit())
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1
}

/// `secs[.micros]` as microseconds.
fn epoch_micros(s: &str) -> Option<i64> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    secs.checked_mul(1_000_000)?.checked_add(micros)
}

/// The first keyword(s) of a statement, upper-case, after comments:
/// `BEGIN`, `COMMIT`, `XA PREPARE` …
fn first_words(sql: &str) -> String {
    let s = skip_comments(sql);
    let mut words = s
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or("").to_ascii_uppercase();
    if first == "XA" {
        let second = words.next().unwrap_or("").to_ascii_uppercase();
        return format!("XA {second}");
    }
    first
}

fn is_dml(word: &str) -> bool {
    matches!(word, "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "LOAD")
}

fn skip_comments(sql: &str) -> &str {
    let mut s = sql.trim_start();
    loop {
        if let Some(rest) = s.strip_prefix("/*") {
            match rest.find("*/") {
                Some(end) => s = rest[end + 2..].trim_start(),
                None => return "",
            }
        } else if let Some(rest) = s.strip_prefix("-- ").or_else(|| s.strip_prefix('#')) {
            s = rest.split_once('\n').map_or("", |x| x.1).trim_start();
        } else {
            return s;
        }
    }
}

/// `(db, table)` of a `TRUNCATE [TABLE] [db.]t` statement; `default_db` is
/// the statement's current database.
fn truncated_table(sql: &str, default_db: &str) -> Option<(String, String)> {
    let s = skip_comments(sql);
    let (word, rest) = s.split_at_checked(8)?;
    if !word.eq_ignore_ascii_case("truncate") || !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let mut rest = rest.trim_start();
    if let Some((w, r)) = rest.split_at_checked(5)
        && w.eq_ignore_ascii_case("table")
        && r.starts_with(char::is_whitespace)
    {
        rest = r.trim_start();
    }
    let (first, rest) = identifier(rest)?;
    let rest = rest.trim_start();
    match rest.strip_prefix('.') {
        Some(r) => {
            let (second, _) = identifier(r.trim_start())?;
            Some((first, second))
        }
        None if !default_db.is_empty() => Some((default_db.to_string(), first)),
        None => None,
    }
}

/// The table an `ALTER [ONLINE] [IGNORE] TABLE [IF EXISTS] [db.]table …`
/// statement changes.
fn altered_table(sql: &str, default_db: &str) -> Option<(String, String)> {
    let mut rest = skip_comments(sql);
    let word = |rest: &mut &str, w: &str| -> bool {
        match rest.split_at_checked(w.len()) {
            Some((head, tail))
                if head.eq_ignore_ascii_case(w) && tail.starts_with(char::is_whitespace) =>
            {
                *rest = tail.trim_start();
                true
            }
            _ => false,
        }
    };
    if !word(&mut rest, "alter") {
        return None;
    }
    word(&mut rest, "online");
    word(&mut rest, "ignore");
    if !word(&mut rest, "table") {
        return None;
    }
    if word(&mut rest, "if") && !word(&mut rest, "exists") {
        return None;
    }
    let (first, rest) = identifier(rest)?;
    match rest.trim_start().strip_prefix('.') {
        Some(r) => {
            let (second, _) = identifier(r.trim_start())?;
            Some((first, second))
        }
        None if !default_db.is_empty() => Some((default_db.to_string(), first)),
        None => None,
    }
}

/// A bare or back-quoted identifier at the start of `s`, and the rest.
fn identifier(s: &str) -> Option<(String, &str)> {
    if let Some(body) = s.strip_prefix('`') {
        let mut name = String::new();
        let mut chars = body.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '`' {
                if chars.peek().map(|x| x.1) == Some('`') {
                    chars.next();
                    name.push('`');
                } else {
                    return Some((name, &body[i + 1..]));
                }
            } else {
                name.push(c);
            }
        }
        return None;
    }
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(s.len());
    (end > 0).then(|| (s[..end].to_string(), &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mysql_async::Value as M;

    fn source(toml_tables: &str, extra: &str) -> Result<MysqlBinlogSource, SourceError> {
        let text = format!(
            "name = \"shop\"\nkind = \"mysql_binlog\"\nurl = \"mysql://u:secret@db.example:3307/shop\"\n\
             tables = {toml_tables}\n{extra}"
        );
        let cfg: SourceConfig = toml::from_str(&text).unwrap();
        let config: Config = toml::from_str("").unwrap();
        MysqlBinlogSource::new(&cfg, &config)
    }

    #[test]
    fn config_names_tables_and_derives_a_server_id() {
        let s = source("[\"billing.invoices\", \"orders\"]", "").unwrap();
        assert_eq!(s.server, "db.example:3307");
        assert_eq!(
            s.tables[1],
            TableRef {
                configured: "orders".into(),
                db: "shop".into(),
                table: "orders".into()
            }
        );
        assert_eq!(s.tables[0].db, "billing");
        assert_eq!(s.server_id, default_server_id("shop"));
        assert!((1000..1 << 31).contains(&s.server_id));
        assert_ne!(default_server_id("a"), default_server_id("b"));
        assert!(s.initial_snapshot);
        let s = source("[\"a.b\"]", "server_id = 77\ninitial_snapshot = false").unwrap();
        assert_eq!((s.server_id, s.initial_snapshot), (77, false));
        let e = source("[\".b\"]", "").err().unwrap();
        assert!(e.to_string().contains("not a db.table name"), "{e}");
    }

    #[test]
    fn binlog_settings_are_checked() {
        assert!(check_binlog_settings("ON", "ROW", "FULL").is_ok());
        assert!(check_binlog_settings("1", "row", "full").is_ok());
        let e = check_binlog_settings("OFF", "ROW", "FULL").unwrap_err();
        assert!(e.contains("log_bin is OFF"), "{e}");
        let e = check_binlog_settings("ON", "STATEMENT", "FULL").unwrap_err();
        assert_eq!(e, "has binlog_format STATEMENT: it must be ROW");
        let e = check_binlog_settings("ON", "MIXED", "FULL").unwrap_err();
        assert!(e.contains("binlog_format MIXED"), "{e}");
        let e = check_binlog_settings("ON", "ROW", "MINIMAL").unwrap_err();
        assert_eq!(e, "has binlog_row_image MINIMAL: it must be FULL");
    }

    #[test]
    fn gtid_state_round_trips() {
        let mut g = Gtids::parse("0-1-100, 2-5-7,bad");
        assert_eq!(g.text().as_deref(), Some("0-1-100,2-5-7"));
        g.set(0, 3, 101);
        g.set(1, 1, 1);
        assert_eq!(g.text().as_deref(), Some("0-3-101,1-1-1,2-5-7"));
        assert_eq!(Gtids::parse("").text(), None);
        let mut body = 42u64.to_le_bytes().to_vec();
        body.extend(3u32.to_le_bytes());
        body.push(FL_STANDALONE);
        assert_eq!(parse_mariadb_gtid(&body), Some((3, 42, 1)));
        assert_eq!(parse_mariadb_gtid(&body[..5]), None);
    }

    #[test]
    fn statements_are_recognized() {
        assert_eq!(first_words("BEGIN"), "BEGIN");
        assert_eq!(first_words("/* x */ commit;"), "COMMIT");
        assert_eq!(first_words("XA PREPARE 'x'"), "XA PREPARE");
        let t = |s: &str| truncated_table(s, "shop");
        assert_eq!(
            t("TRUNCATE TABLE invoices"),
            Some(("shop".into(), "invoices".into()))
        );
        assert_eq!(
            t("truncate `billing`.`in``v`"),
            Some(("billing".into(), "in`v".into()))
        );
        assert_eq!(
            t("/* c */ Truncate table billing . x;"),
            Some(("billing".into(), "x".into()))
        );
        assert_eq!(t("TRUNCATE tablex"), Some(("shop".into(), "tablex".into())));
        assert_eq!(t("truncated"), None);
        assert_eq!(t("INSERT INTO t VALUES (1)"), None);
        assert_eq!(truncated_table("TRUNCATE t", ""), None);
        let a = |s: &str| altered_table(s, "shop");
        assert_eq!(
            a("ALTER TABLE items ADD COLUMN note text"),
            Some(("shop".into(), "items".into()))
        );
        assert_eq!(
            a("/* c */ alter online ignore table if exists `billing`.`in``v` drop x"),
            Some(("billing".into(), "in`v".into()))
        );
        assert_eq!(
            a("ALTER TABLE billing . x RENAME COLUMN a TO b"),
            Some(("billing".into(), "x".into()))
        );
        assert_eq!(a("ALTER DATABASE shop CHARACTER SET utf8mb4"), None);
        assert_eq!(a("ALTER TABLE IF x"), None);
        assert_eq!(a("ALTERED TABLE t"), None);
        assert_eq!(altered_table("ALTER TABLE t ADD c int", ""), None);
    }

    #[test]
    fn declared_types_and_json_checks() {
        assert_eq!(
            json_valid_column("json_valid(`doc`)").as_deref(),
            Some("doc")
        );
        assert_eq!(json_valid_column("`a` > 0"), None);
        assert_eq!(
            parse_enum_values("enum('a','b''c','d,e')"),
            vec!["a", "b'c", "d,e"]
        );
        assert_eq!(
            kind_of_declared("longtext", "longtext", Some("utf8mb4"), true),
            Kind::Json
        );
        assert_eq!(
            kind_of_declared("varchar", "varchar(5)", Some("latin1"), false),
            Kind::Text(Charset::Latin1)
        );
        assert_eq!(
            kind_of_declared("varbinary", "varbinary(5)", None, false),
            Kind::Bytes
        );
        assert_eq!(
            kind_of_declared("bigint", "bigint(20) unsigned", None, false),
            Kind::Int
        );
        assert_eq!(
            kind_of_declared("geometry", "geometry", None, false),
            Kind::Other
        );
    }

    #[test]
    fn values_decode_by_kind() {
        let b = |s: &str| M::Bytes(s.as_bytes().to_vec());
        let bin = |k: &Kind, v: &M| decode_value(k, v, Origin::Binlog).unwrap();
        let q = |k: &Kind, v: &M| decode_value(k, v, Origin::Query).unwrap();
        assert_eq!(bin(&Kind::Int, &M::Int(-5)), Value::Int(-5));
        assert_eq!(
            bin(&Kind::Int, &M::UInt(u64::MAX)),
            Value::Decimal(u64::MAX.to_string())
        );
        assert_eq!(bin(&Kind::Int, &M::UInt(7)), Value::Int(7));
        assert_eq!(bin(&Kind::Float, &M::Float(0.1)), Value::Float(0.1));
        assert_eq!(
            bin(&Kind::Decimal, &b("-12.50")),
            Value::Decimal("-12.50".into())
        );
        assert!(decode_value(&Kind::Decimal, &b("1e5"), Origin::Binlog).is_err());
        assert_eq!(
            bin(&Kind::Text(Charset::Latin1), &M::Bytes(vec![b'a', 0xe9])),
            Value::Text("aé".into())
        );
        assert!(
            decode_value(
                &Kind::Text(Charset::Utf8),
                &M::Bytes(vec![0xff]),
                Origin::Binlog
            )
            .is_err()
        );
        assert_eq!(
            bin(&Kind::Json, &b("{\"a\":1}")),
            Value::Json("{\"a\":1}".into())
        );
        let ts = chrono::DateTime::parse_from_rfc3339("2024-03-01T10:00:00.250Z")
            .unwrap()
            .timestamp_micros();
        assert_eq!(
            bin(&Kind::DateTime, &M::Date(2024, 3, 1, 10, 0, 0, 250_000)),
            Value::Timestamp(ts)
        );
        assert_eq!(
            bin(&Kind::Timestamp, &b(&format!("{}.250000", ts / 1_000_000))),
            Value::Timestamp(ts)
        );
        assert_eq!(bin(&Kind::Timestamp, &b("0")), Value::Null);
        assert_eq!(
            bin(&Kind::DateTime, &M::Date(0, 0, 0, 0, 0, 0, 0)),
            Value::Null
        );
        assert_eq!(
            bin(&Kind::Date, &M::Date(1970, 1, 11, 0, 0, 0, 0)),
            Value::Date(10)
        );
        assert_eq!(
            bin(&Kind::Time, &M::Time(true, 1, 2, 3, 4, 5)),
            Value::Text("-26:03:04.000005".into())
        );
        assert_eq!(bin(&Kind::Year, &b("2024")), Value::Int(2024));
        assert_eq!(bin(&Kind::Year, &b("1900")), Value::Int(0));
        assert_eq!(q(&Kind::Year, &M::Int(2024)), Value::Int(2024));
        assert_eq!(bin(&Kind::Bit, &M::Bytes(vec![1, 2])), Value::Int(258));
        let e = Kind::Enum(Arc::from(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(bin(&e, &M::Int(2)), Value::Text("b".into()));
        assert_eq!(bin(&e, &M::Int(0)), Value::Text("".into()));
        assert!(decode_value(&e, &M::Int(3), Origin::Binlog).is_err());
        assert_eq!(q(&e, &b("a")), Value::Text("a".into()));
        let s = Kind::Set(Arc::from(vec![
            "x".to_string(),
            "y".to_string(),
            "z".to_string(),
        ]));
        assert_eq!(bin(&s, &M::Bytes(vec![0b101])), Value::Text("x,z".into()));
        assert_eq!(q(&s, &b("x,z")), Value::Text("x,z".into()));
        assert!(decode_value(&s, &M::Bytes(vec![0b1000]), Origin::Binlog).is_err());
        assert_eq!(
            bin(&Kind::Bytes, &M::Bytes(vec![0, 255])),
            Value::Bytes(vec![0, 255])
        );
        assert_eq!(bin(&Kind::Text(Charset::Utf8), &M::NULL), Value::Null);
        assert!(decode_value(&Kind::Int, &b("x"), Origin::Binlog).is_err());
    }

    #[test]
    fn snapshot_pages_use_the_primary_key() {
        let t = TableMeta {
            configured: "a.t".into(),
            db: "a".into(),
            table: "t".into(),
            columns: ["k1", "k2", "v"]
                .iter()
                .map(|n| ColumnMeta {
                    name: n.to_string(),
                    kind: Kind::Int,
                })
                .collect(),
            pk: vec![0, 1],
        };
        let cols: Vec<String> = t.columns.iter().map(|c| ident(&c.name)).collect();
        let (sql, _) = page_query(&t, &cols, "`a`.`t`", 10, None, 0);
        assert_eq!(
            sql,
            "SELECT `k1`, `k2`, `v` FROM `a`.`t` ORDER BY `k1`, `k2` LIMIT 10"
        );
        let after = [M::Int(1), M::Int(2)];
        let (sql, params) = page_query(&t, &cols, "`a`.`t`", 10, Some(&after), 10);
        assert_eq!(
            sql,
            "SELECT `k1`, `k2`, `v` FROM `a`.`t` WHERE (`k1` > ?) OR (`k1` = ? AND `k2` > ?) \
             ORDER BY `k1`, `k2` LIMIT 10"
        );
        assert_eq!(
            params,
            mysql_async::Params::Positional(vec![M::Int(1), M::Int(1), M::Int(2)])
        );
        let no_pk = TableMeta { pk: vec![], ..t };
        let (sql, _) = page_query(&no_pk, &cols, "`a`.`t`", 10, None, 20);
        assert!(sql.ends_with("LIMIT 10 OFFSET 20"), "{sql}");
    }
}
