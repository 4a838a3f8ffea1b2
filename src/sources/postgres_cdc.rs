//! `postgres_cdc`: change data capture from PostgreSQL by logical decoding
//! with the built-in `pgoutput` plugin over the streaming replication
//! protocol.
//!
//! Start-up checks, each a clear error naming the source and the object:
//! `wal_level` must be `logical`; every configured table must exist and have
//! `REPLICA IDENTITY FULL` (so updates and deletes carry the whole row: the
//! router needs the entity id column of a deleted row, and unchanged TOAST
//! values are filled from the old row). The publication is created, or
//! extended with missing tables, when `create_slot` is on (the default).
//!
//! Initial snapshot and hand-off (no row lost or read stale): the slot is
//! created on a replication session with `SNAPSHOT 'export'`. A second,
//! ordinary session imports that snapshot (`SET TRANSACTION SNAPSHOT` in a
//! `REPEATABLE READ` transaction) and reads every table: exactly the state at
//! the slot's consistent point. Streaming then starts at that point, so every
//! transaction is either in the snapshot or in the stream, never both or
//! neither. Snapshot chunks before the last carry `Position::Snapshot(n)`
//! (a crash before the last is durable starts the snapshot over); the last
//! carries `Position::Lsn(consistent point)`.
//!
//! Streaming: one `SourceTxn` per committed transaction that touched a
//! configured table, positioned at its commit's end LSN. Invariant 3: the
//! slot's confirmed position is advanced (standby status updates) only to
//! positions the fabric reports durable. A keepalive between transactions
//! carries the server's WAL end up to which everything has been decoded and
//! sent: it goes to the router as a transaction without changes, so the
//! source's checkpoint follows the WAL end (an idle slot never holds WAL
//! forever) and reads waiting for a position written by others (tables or
//! databases not captured) are answered (see [`crate::freshness`]).
//!
//! A lost connection or a server restart is a retryable error: the fabric
//! restarts the source with backoff from the last position it routed, and
//! the server re-sends every transaction after it (at-least-once; apply is
//! idempotent).
//!
//! Values arrive as PostgreSQL's text output and are typed by the column's
//! type (see [`super::pgoutput::value`]); domains decode as their base type,
//! enums and string types as text. A column of any other type without a
//! mapping (`interval`, `money`, geometric, range, composite …) is refused
//! at start, naming it, unless the source sets `unmapped_types = "text"`.

use super::pg_resync;
use super::pgoutput::{self, Message, Relation, Relations};
use super::{Source, SourceContext, SourceError};
use crate::config::{Config, SourceConfig};
use crate::event::{Op, Position, Row, RowChange, SourceTxn};
use futures::TryStreamExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row as _};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Session settings that fix the text forms the decoder reads.
const SESSION: [(&str, &str); 4] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "3"),
];

pub struct PostgresCdcSource {
    name: String,
    url: String,
    /// Configured table text -> `schema.table`.
    tables: Vec<(String, String)>,
    slot: String,
    publication: String,
    create: bool,
    initial_snapshot: bool,
    batch_size: usize,
    /// Carry columns of types without a mapping as their text (else refuse them).
    text_for_unmapped: bool,
    /// Domain type -> its base type, so values decode by the base type.
    domains: parking_lot::Mutex<HashMap<u32, u32>>,
}

/// One configured table as the database describes it.
struct TableInfo {
    configured: String,
    qualified: String,
    /// Its columns: names, types (a domain as its base) and type
    /// modifiers, as a relation message describes them.
    columns: Vec<(String, u32, i32)>,
}

impl PostgresCdcSource {
    pub fn new(cfg: &SourceConfig, _config: &Config) -> Result<Self, SourceError> {
        let url = cfg.url.clone().ok_or_else(|| SourceError::Config {
            source_name: cfg.name.clone(),
            reason: "a postgres_cdc source needs a url".into(),
        })?;
        let default_name = format!(
            "fabric_{}",
            cfg.name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                })
                .collect::<String>()
        );
        Ok(PostgresCdcSource {
            name: cfg.name.clone(),
            url,
            tables: cfg
                .tables
                .iter()
                .map(|t| {
                    let q = if t.contains('.') {
                        t.clone()
                    } else {
                        format!("public.{t}")
                    };
                    (t.clone(), q)
                })
                .collect(),
            slot: cfg.slot.clone().unwrap_or_else(|| default_name.clone()),
            publication: cfg.publication.clone().unwrap_or(default_name),
            create: cfg.create_slot.unwrap_or(true),
            initial_snapshot: cfg.initial_snapshot.unwrap_or(true),
            batch_size: cfg.batch_size(),
            text_for_unmapped: cfg.unmapped_types.as_deref() == Some("text"),
            domains: parking_lot::Mutex::new(HashMap::new()),
        })
    }

    fn config_err(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Config {
            source_name: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn ext(&self, op: &'static str) -> impl Fn(sqlx::Error) -> SourceError + '_ {
        move |e| SourceError::external(&self.name, op, e)
    }

    fn options(&self) -> Result<PgConnectOptions, SourceError> {
        Ok(PgConnectOptions::from_str(&self.url)
            .map_err(|e| self.config_err(format!("bad url: {e}")))?
            .options(SESSION))
    }

    async fn connect(&self) -> Result<PgConnection, SourceError> {
        PgConnection::connect_with(&self.options()?)
            .await
            .map_err(self.ext("connect"))
    }

    fn replication_config(&self, start: u64, ack: u64) -> Result<ReplicationConfig, SourceError> {
        let u = url::Url::parse(&self.url).map_err(|e| self.config_err(format!("bad url: {e}")))?;
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let options = SESSION
            .iter()
            .map(|(k, v)| format!("-c {k}={}", v.replace(' ', "\\ ")))
            .collect::<Vec<_>>()
            .join(" ");
        let cfg = ReplicationConfig::new(
            u.host_str().unwrap_or("localhost"),
            decode(u.username()),
            decode(u.password().unwrap_or("")),
            decode(u.path().trim_start_matches('/')),
            self.slot.clone(),
            self.publication.as_str(),
        )
        .with_port(u.port().unwrap_or(5432))
        .with_start_lsn(Lsn(start))
        .with_ack_lsn(Lsn(ack))
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1))
        .with_options(options)
        .with_application_name(format!("entity-fabric {}", self.name));
        Ok(cfg)
    }

    /// Checks the server and the tables; creates or extends the publication.
    async fn prepare(&self, conn: &mut PgConnection) -> Result<Vec<TableInfo>, SourceError> {
        let wal: String = sqlx::query_scalar("SHOW wal_level")
            .fetch_one(&mut *conn)
            .await
            .map_err(self.ext("read wal_level"))?;
        if wal != "logical" {
            return Err(self.config_err(format!(
                "the server has wal_level={wal}; logical decoding needs wal_level=logical (set it in postgresql.conf and restart the server)"
            )));
        }
        let mut infos = Vec::new();
        for (configured, qualified) in &self.tables {
            let (schema, table) = qualified.split_once('.').expect("qualified");
            let ident: Option<String> = sqlx::query_scalar(
                "SELECT c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            )
            .bind(schema)
            .bind(table)
            .fetch_optional(&mut *conn)
            .await
            .map_err(self.ext("read the catalog"))?;
            let Some(ident) = ident else {
                return Err(self.config_err(format!(
                    "table {qualified} does not exist (or is not a table) in the database"
                )));
            };
            if ident != "f" {
                let now = match ident.as_str() {
                    "d" => "DEFAULT",
                    "n" => "NOTHING",
                    "i" => "USING INDEX",
                    _ => "not FULL",
                };
                return Err(self.config_err(format!(
                    "table {qualified} has REPLICA IDENTITY {now}; run ALTER TABLE {qualified} REPLICA IDENTITY FULL so that updates and deletes carry the whole row"
                )));
            }
            // Per column: its type, the type values decode as (a domain's
            // base type), whether that is an enum or a string type, and the
            // type's SQL name for messages.
            let rows = sqlx::query(
                "SELECT a.attname::text, a.atttypid::int8,
                        CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END::int8,
                        COALESCE(b.typtype, t.typtype)::text, COALESCE(b.typcategory, t.typcategory)::text,
                        format_type(a.atttypid, a.atttypmod), a.atttypmod::int4
                 FROM pg_attribute a
                 JOIN pg_type t ON t.oid = a.atttypid
                 LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
                 WHERE a.attrelid = ($1 || '.' || $2)::regclass AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attgenerated = ''
                 ORDER BY a.attnum",
            )
            .bind(format!("\"{}\"", schema.replace('"', "\"\"")))
            .bind(format!("\"{}\"", table.replace('"', "\"\"")))
            .fetch_all(&mut *conn)
            .await
            .map_err(self.ext("read the columns"))?;
            let mut columns = Vec::with_capacity(rows.len());
            for r in rows {
                let name: String = r.get(0);
                let oid = r.get::<i64, _>(1) as u32;
                let base = r.get::<i64, _>(2) as u32;
                let typtype: String = r.get(3);
                let category: String = r.get(4);
                let sql_type: String = r.get(5);
                if base != oid {
                    self.domains.lock().insert(oid, base);
                }
                if !self.text_for_unmapped && !pgoutput::maps(base, &typtype, &category) {
                    return Err(self.config_err(format!(
                        "column {qualified}.{name} has type {sql_type}, which the fabric does not map to a value type; set unmapped_types = \"text\" on the source to carry such columns as their text"
                    )));
                }
                columns.push((name, base, r.get::<i32, _>(6)));
            }
            infos.push(TableInfo {
                configured: configured.clone(),
                qualified: qualified.clone(),
                columns,
            });
        }
        self.ensure_publication(conn).await?;
        Ok(infos)
    }

    async fn ensure_publication(&self, conn: &mut PgConnection) -> Result<(), SourceError> {
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
                .bind(&self.publication)
                .fetch_one(&mut *conn)
                .await
                .map_err(self.ext("read publications"))?;
        let quoted: Vec<String> = self
            .tables
            .iter()
            .map(|(_, q)| quote_qualified(q))
            .collect();
        if !exists {
            if !self.create {
                return Err(self.config_err(format!(
                    "publication {} does not exist and create_slot = false",
                    self.publication
                )));
            }
            let sql = format!(
                "CREATE PUBLICATION \"{}\" FOR TABLE {}",
                self.publication,
                quoted.join(", ")
            );
            sqlx::query(AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
                .map_err(|e| {
                    self.config_err(format!(
                        "cannot create publication {}: {e}",
                        self.publication
                    ))
                })?;
            return Ok(());
        }
        let have: Vec<String> = sqlx::query_scalar(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
        )
        .bind(&self.publication)
        .fetch_all(&mut *conn)
        .await
        .map_err(self.ext("read the publication"))?;
        let missing: Vec<&(String, String)> = self
            .tables
            .iter()
            .filter(|(_, q)| !have.contains(q))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if !self.create {
            return Err(self.config_err(format!(
                "publication {} lacks {}",
                self.publication,
                missing
                    .iter()
                    .map(|(_, q)| q.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let sql = format!(
            "ALTER PUBLICATION \"{}\" ADD TABLE {}",
            self.publication,
            missing
                .iter()
                .map(|(_, q)| quote_qualified(q))
                .collect::<Vec<_>>()
                .join(", ")
        );
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(|e| {
                self.config_err(format!(
                    "cannot extend publication {}: {e}",
                    self.publication
                ))
            })?;
        Ok(())
    }

    async fn slot_confirmed(&self, conn: &mut PgConnection) -> Result<Option<u64>, SourceError> {
        let row: Option<Option<String>> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(&self.slot)
        .fetch_optional(&mut *conn)
        .await
        .map_err(self.ext("read the slot"))?;
        Ok(row.map(|l| {
            l.and_then(|l| crate::event::position::parse_lsn(&l))
                .unwrap_or(0)
        }))
    }

    /// Where the server's WAL ends now (replayed, on a standby): what the
    /// stream must reach before the source counts as caught up.
    async fn server_wal_end(&self, conn: &mut PgConnection) -> Result<u64, SourceError> {
        let lsn: Option<String> = sqlx::query_scalar(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_flush_lsn() END)::text",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(self.ext("read the server's WAL end"))?;
        Ok(lsn
            .as_deref()
            .and_then(crate::event::position::parse_lsn)
            .unwrap_or(0))
    }

    /// Creates the slot with an exported snapshot, reads every table in it,
    /// sends the rows, and returns the slot's consistent point.
    async fn snapshot(
        &self,
        conn: &mut PgConnection,
        tables: &[TableInfo],
        ctx: &SourceContext,
        truncate_first: bool,
    ) -> Result<Option<u64>, SourceError> {
        if !self.create {
            return Err(self.config_err(
                "an initial snapshot needs create_slot = true (the slot is created with an exported snapshot)",
            ));
        }
        ctx.status.set_state("snapshotting");
        if self.slot_confirmed(conn).await?.is_some() {
            // Starting over: the old slot's position means nothing now.
            sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.slot)
                .execute(&mut *conn)
                .await
                .map_err(self.ext("drop the old slot"))?;
        }
        let mut repl = ReplicationClient::connect_gated(self.replication_config(0, 0)?)
            .await
            .map_err(|e| SourceError::external(&self.name, "open a replication session", e))?;
        let rows = repl
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT \"{}\" LOGICAL pgoutput (SNAPSHOT 'export')",
                self.slot
            ))
            .await
            .map_err(|e| SourceError::external(&self.name, "create the replication slot", e))?;
        let field = |i: usize| -> Option<String> {
            rows.first()
                .and_then(|r| r.get(i).cloned().flatten())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        let consistent = field(1)
            .and_then(|l| crate::event::position::parse_lsn(&l))
            .ok_or_else(|| {
                self.config_err("the server did not return the slot's consistent point")
            })?;
        let snapshot_name =
            field(2).ok_or_else(|| self.config_err("the server did not export a snapshot"))?;

        // How many rows, estimated without reading them: the statistics'
        // live rows, else the planner's (unknown for a table never analysed
        // or counted: then no total is shown). Never fatal; asked before the
        // snapshot's transaction, which an error would abort.
        let mut estimate = Some(0u64);
        for t in tables {
            let n: Option<i64> = sqlx::query_scalar::<_, Option<i64>>(
                "SELECT COALESCE(NULLIF(s.n_live_tup, 0), \
                 CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint END) \
                 FROM pg_class c LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid \
                 WHERE c.oid = $1::regclass",
            )
            .bind(quote_qualified(&t.qualified))
            .fetch_optional(&mut *conn)
            .await
            .ok()
            .flatten()
            .flatten();
            estimate = estimate
                .zip(n.filter(|n| *n >= 0))
                .map(|(a, b)| a + b as u64);
        }
        let ext = self.ext("read the initial snapshot");
        let mut tx = conn.begin().await.map_err(&ext)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(&ext)?;
        sqlx::query(AssertSqlSafe(format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            snapshot_name.replace('\'', "''")
        )))
        .execute(&mut *tx)
        .await
        .map_err(&ext)?;
        let mut chunk: Vec<RowChange> = Vec::new();
        if truncate_first {
            chunk.extend(tables.iter().map(|t| RowChange::truncate(&t.configured)));
        }
        let mut chunks = 0u64;
        let mut total = 0u64;
        let names: Vec<&str> = tables.iter().map(|t| t.qualified.as_str()).collect();
        ctx.status.progress.start(
            format!("initial snapshot of {}", names.join(", ")),
            "rows",
            estimate,
        );
        for t in tables {
            let cols = t
                .columns
                .iter()
                .map(|(c, _, _)| format!("\"{}\"::text", c.replace('"', "\"\"")))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!("SELECT {cols} FROM {}", quote_qualified(&t.qualified));
            let mut stream = sqlx::query(AssertSqlSafe(sql)).fetch(&mut *tx);
            while let Some(r) = stream.try_next().await.map_err(&ext)? {
                let mut row = Row::new();
                let mut bad = None;
                for (i, (name, oid, _)) in t.columns.iter().enumerate() {
                    let text: Option<String> = r.try_get(i).map_err(&ext)?;
                    let v = match text {
                        None => crate::event::Value::Null,
                        Some(s) => match pgoutput::value(*oid, &s) {
                            Ok(v) => v,
                            Err(e) => {
                                bad = Some(format!("{}.{name}: {e}", t.qualified));
                                break;
                            }
                        },
                    };
                    row.insert(name.clone(), v);
                }
                if let Some(reason) = bad {
                    ctx.dead_letter(&t.configured, &reason, &format!("{row:?}"));
                    continue;
                }
                chunk.push(RowChange::read(&t.configured, row));
                total += 1;
                ctx.status.snapshot_row().await;
                if chunk.len() >= self.batch_size {
                    chunks += 1;
                    if !ctx
                        .deliver(
                            Position::Snapshot(chunks),
                            super::now_micros(),
                            std::mem::take(&mut chunk),
                        )
                        .await?
                    {
                        return Ok(None);
                    }
                }
            }
        }
        tx.commit().await.map_err(&ext)?;
        drop(repl);
        if !ctx
            .deliver(Position::Lsn(consistent), super::now_micros(), chunk)
            .await?
        {
            return Ok(None);
        }
        ctx.status.progress.finish();
        tracing::info!(rows = total, lsn = %crate::event::position::format_lsn(consistent), "initial snapshot read");
        Ok(Some(consistent))
    }

    /// Streams from `start` until shutdown or an error.
    async fn stream(
        &self,
        mut ctx: SourceContext,
        tables: &[TableInfo],
        start: u64,
        confirmed: u64,
        server_end: u64,
    ) -> Result<(), SourceError> {
        let by_name: HashMap<&str, &str> = tables
            .iter()
            .map(|t| (t.qualified.as_str(), t.configured.as_str()))
            .collect();
        let mut client =
            ReplicationClient::connect(self.replication_config(start, confirmed.min(start))?)
                .await
                .map_err(|e| SourceError::external(&self.name, "start replication", e))?;
        ctx.status.set_state("streaming");
        tracing::info!(slot = %self.slot, start = %crate::event::position::format_lsn(start), "streaming");
        let mut relations = Relations::new();
        // The open transaction's changes and id.
        let mut open: Option<(Vec<RowChange>, u32)> = None;
        // Each captured table's shape as last seen (the catalog at start,
        // then relation messages): a change of it re-reads the table.
        let mut shapes: HashMap<String, Vec<(String, u32, i32)>> = tables
            .iter()
            .map(|t| (t.qualified.clone(), t.columns.clone()))
            .collect();
        let mut resyncs = pg_resync::Resyncs::new(
            &self.name,
            ctx.status.clone(),
            self.options()?,
            self.domains.lock().clone(),
        );
        let configured_of = |table: &str| -> Option<(String, String)> {
            tables
                .iter()
                .find(|t| t.configured == table || t.qualified == table)
                .map(|t| (t.qualified.clone(), t.configured.clone()))
        };
        let mut last_sent = start;
        let mut durable = confirmed;
        // Caught up only once the stream has reached the WAL end the server
        // had when this run connected (a keepalive between transactions at
        // or past it, or a commit past it); from then on, whenever a
        // keepalive comes between transactions (the server sends one when it
        // has nothing more to send), until the next transaction begins.
        let mut reached = server_end <= start;
        // Nothing was there to read when it connected: caught up now (an
        // idle server may send no keepalive for a long while).
        ctx.status.set_caught_up(reached);
        let asked = |resyncs: &mut pg_resync::Resyncs| {
            for t in ctx.status.take_resyncs() {
                match configured_of(&t) {
                    Some((q, c)) => resyncs.request(&q, &c),
                    None => {
                        tracing::warn!(table = %t, "a re-read was asked of a table this source does not capture")
                    }
                }
            }
        };
        asked(&mut resyncs);
        loop {
            if resyncs.busy()
                && let Some(table) = resyncs.start()
            {
                let estimate: Option<f32> =
                    sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = $1::regclass")
                        .bind(quote_qualified(&table))
                        .fetch_optional(&mut self.connect().await?)
                        .await
                        .ok()
                        .flatten();
                ctx.status.progress.start(
                    format!("re-read of {table} while streaming"),
                    "rows",
                    estimate.filter(|n| *n >= 0.0).map(|n| n as u64),
                );
            }
            let event = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => {
                    client.stop();
                    return Ok(());
                }
                _ = ctx.status.resync_asked.notified() => {
                    asked(&mut resyncs);
                    continue;
                }
                r = resyncs.read_done() => {
                    match r {
                        Ok(()) => {}
                        Err(e @ SourceError::Config { .. }) => {
                            tracing::error!(error = %e, "table re-read given up");
                            ctx.status.set_error(&e.to_string());
                            ctx.status.progress.abandon();
                            resyncs.abandon();
                        }
                        Err(e) => return Err(e),
                    }
                    continue;
                }
                changed = ctx.durable.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if let Some(Position::Lsn(d)) = ctx.durable.borrow_and_update().clone() {
                        durable = durable.max(d);
                        client.update_applied_lsn(Lsn(durable));
                    }
                    continue;
                }
                e = client.recv() => e.map_err(|e| SourceError::external(&self.name, "read the replication stream", e))?,
            };
            let Some(event) = event else {
                return Err(SourceError::external(
                    &self.name,
                    "read the replication stream",
                    "the server closed the stream",
                ));
            };
            match event {
                ReplicationEvent::Begin { xid, .. } => {
                    ctx.status.set_caught_up(false);
                    open = Some((Vec::new(), xid));
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let msg = match pgoutput::decode(&data) {
                        Ok(m) => m,
                        Err(e) => {
                            ctx.dead_letter(
                                "",
                                &format!("undecodable pgoutput message: {e}"),
                                &hex::encode(&data),
                            );
                            continue;
                        }
                    };
                    if let Message::Relation(r) = &msg {
                        self.shape_seen(r, &mut shapes, &by_name, &mut resyncs);
                    }
                    self.on_message(
                        &ctx,
                        msg,
                        &mut relations,
                        &by_name,
                        open.as_mut().map(|o| &mut o.0),
                    );
                }
                ReplicationEvent::Commit {
                    end_lsn,
                    commit_time_micros,
                    ..
                } => {
                    let Some((mut changes, xid)) = open.take() else {
                        continue;
                    };
                    let end = end_lsn.0;
                    reached |= end >= server_end;
                    resyncs.note(xid, &changes);
                    let resent = end <= last_sent && end <= start;
                    if !resent && let Some((rows, handed)) = resyncs.due(end) {
                        changes.extend(rows);
                        report(&ctx, handed);
                    }
                    if changes.is_empty() || resent {
                        continue;
                    }
                    let txn = SourceTxn {
                        source: ctx.name.clone(),
                        position: Position::Lsn(end),
                        commit_micros: commit_time_micros + PG_EPOCH_MICROS,
                        changes,
                    };
                    tokio::select! {
                        biased;
                        _ = ctx.shutdown.cancelled() => { client.stop(); return Ok(()); }
                        r = ctx.send(txn) => r?,
                    }
                    last_sent = end;
                }
                ReplicationEvent::KeepAlive { wal_end, .. } if open.is_none() => {
                    reached |= wal_end.0 >= server_end;
                    ctx.status.set_caught_up(reached);
                    // Every transaction committed before the server's WAL end
                    // has been sent: say so, so that a read waiting for a
                    // position past our last change (written by others, in
                    // tables or databases not captured) is answered.
                    if wal_end.0 > last_sent {
                        // A chunk of a table's re-read goes with it when due.
                        let rows = match resyncs.due(wal_end.0) {
                            Some((rows, handed)) => {
                                report(&ctx, handed);
                                rows
                            }
                            None => Vec::new(),
                        };
                        if !ctx
                            .deliver(Position::Lsn(wal_end.0), super::now_micros(), rows)
                            .await?
                        {
                            client.stop();
                            return Ok(());
                        }
                        last_sent = wal_end.0;
                    }
                    // Idle and everything sent is durable: let the slot move
                    // to the server's WAL end so it holds no WAL.
                    if durable >= last_sent && wal_end.0 > durable {
                        durable = wal_end.0;
                        client.update_applied_lsn(Lsn(durable));
                    }
                }
                _ => {}
            }
        }
    }

    /// A relation message: when a captured table's shape (names, types,
    /// type modifiers) differs from what was seen before, its rows not
    /// written since still have the old one: the table is read again.
    fn shape_seen(
        &self,
        r: &Relation,
        shapes: &mut HashMap<String, Vec<(String, u32, i32)>>,
        by_name: &HashMap<&str, &str>,
        resyncs: &mut pg_resync::Resyncs,
    ) {
        let qualified = r.qualified();
        let Some(configured) = by_name.get(qualified.as_str()) else {
            return;
        };
        let domains = self.domains.lock();
        let shape: Vec<(String, u32, i32)> = r
            .columns
            .iter()
            .map(|c| {
                let base = domains.get(&c.type_oid).copied().unwrap_or(c.type_oid);
                (c.name.clone(), base, c.type_modifier)
            })
            .collect();
        drop(domains);
        let before = shapes.insert(qualified.clone(), shape.clone());
        if before.is_some_and(|b| b != shape) {
            tracing::info!(table = %qualified, "the table's shape changed: its rows are read again while it streams");
            resyncs.request(&qualified, configured);
        }
    }

    fn on_message(
        &self,
        ctx: &SourceContext,
        msg: Message,
        relations: &mut Relations,
        by_name: &HashMap<&str, &str>,
        txn: Option<&mut Vec<RowChange>>,
    ) {
        if let Message::Relation(mut r) = msg {
            let domains = self.domains.lock();
            for c in &mut r.columns {
                if let Some(base) = domains.get(&c.type_oid) {
                    c.type_oid = *base;
                }
            }
            relations.insert(r.id, r);
            return;
        }
        let Some(txn) = txn else { return };
        let table_of = |id: u32| -> Option<(&Relation, String)> {
            let rel = relations.get(&id)?;
            let configured = by_name.get(rel.qualified().as_str())?;
            Some((rel, configured.to_string()))
        };
        let mut push = |table: String, op, before: Option<Row>, after: Option<Row>| {
            txn.push(RowChange {
                table,
                op,
                before,
                after,
            });
        };
        let result: Result<(), (String, String)> = (|| {
            match msg {
                Message::Insert { relation, new } => {
                    let Some((rel, t)) = table_of(relation) else {
                        return Ok(());
                    };
                    let after = pgoutput::row(rel, &new, None).map_err(|e| (t.clone(), e))?;
                    push(t, Op::Insert, None, Some(after));
                }
                Message::Update { relation, old, new } => {
                    let Some((rel, t)) = table_of(relation) else {
                        return Ok(());
                    };
                    let before = match &old {
                        Some(o) => Some(pgoutput::row(rel, o, None).map_err(|e| (t.clone(), e))?),
                        None => None,
                    };
                    let after =
                        pgoutput::row(rel, &new, before.as_ref()).map_err(|e| (t.clone(), e))?;
                    push(t, Op::Update, before, Some(after));
                }
                Message::Delete { relation, old } => {
                    let Some((rel, t)) = table_of(relation) else {
                        return Ok(());
                    };
                    let before = pgoutput::row(rel, &old, None).map_err(|e| (t.clone(), e))?;
                    push(t, Op::Delete, Some(before), None);
                }
                Message::Truncate { relations: ids } => {
                    for id in ids {
                        if let Some((_, t)) = table_of(id) {
                            push(t, Op::Truncate, None, None);
                        }
                    }
                }
                _ => {}
            }
            Ok(())
        })();
        if let Err((table, reason)) = result {
            ctx.dead_letter(&table, &reason, "");
        }
    }
}

#[async_trait::async_trait]
impl Source for PostgresCdcSource {
    #[tracing::instrument(skip_all, fields(source = %ctx.name))]
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let mut conn = self.connect().await?;
        let tables = self.prepare(&mut conn).await?;
        let start = match &ctx.resume {
            Some(Position::Lsn(l)) => {
                if self.slot_confirmed(&mut conn).await?.is_none() {
                    return Err(self.config_err(format!(
                        "replication slot {} is gone, so the changes after {} cannot be read; give the source a new name (or remove its snapshots) to start over",
                        self.slot,
                        crate::event::position::format_lsn(*l)
                    )));
                }
                *l
            }
            other => {
                if self.initial_snapshot || other.is_some() {
                    let truncate = ctx.snapshot_replaces();
                    match self.snapshot(&mut conn, &tables, &ctx, truncate).await? {
                        Some(l) => l,
                        None => return Ok(()),
                    }
                } else {
                    match self.slot_confirmed(&mut conn).await? {
                        Some(l) => l,
                        None => {
                            if !self.create {
                                return Err(self.config_err(format!(
                                    "replication slot {} does not exist and create_slot = false",
                                    self.slot
                                )));
                            }
                            sqlx::query(
                                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                            )
                            .bind(&self.slot)
                            .execute(&mut conn)
                            .await
                            .map_err(self.ext("create the replication slot"))?;
                            self.slot_confirmed(&mut conn).await?.unwrap_or(0)
                        }
                    }
                }
            }
        };
        let confirmed = self.slot_confirmed(&mut conn).await?.unwrap_or(start);
        let server_end = self.server_wal_end(&mut conn).await?;
        drop(conn);
        self.stream(ctx, &tables, start, confirmed, server_end)
            .await
    }
}

/// A chunk of a table's re-read was handed on: its progress.
fn report(ctx: &SourceContext, handed: pg_resync::Handed) {
    for (reason, raw) in &handed.dead {
        ctx.dead_letter(&handed.configured, reason, raw);
    }
    ctx.status
        .progress
        .advance((handed.rows + handed.dead.len()) as u64);
    if handed.done {
        ctx.status.progress.finish();
        tracing::info!(table = %handed.table, "re-read done");
    }
}

pub(crate) fn quote_qualified(q: &str) -> String {
    q.split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}
