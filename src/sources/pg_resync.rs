//! Re-reading a captured PostgreSQL table while its changes stream on (an
//! incremental snapshot): how a schema change reaches every row, not only
//! the rows written after it, and what `fabric resync SOURCE TABLE` runs.
//!
//! The table is read in chunks in primary-key order (keyset pages of
//! [`CHUNK_ROWS`]), each in its own short `REPEATABLE READ` transaction, by
//! a task beside the replication stream, which goes on meanwhile. A chunk is
//! handed on *inside* the stream, at a point where it is exact:
//!
//! - Its transaction's snapshot (`txid_current_snapshot()`) says which
//!   transactions the chunk sees. After the read, in the same transaction, a
//!   logical message (`pg_logical_emit_message`) marks the WAL: every
//!   transaction the snapshot sees committed before that mark (its `high`
//!   LSN), and a TRUNCATE waiting for the read's lock commits after it.
//! - The chunk waits until the stream reaches `high` (a commit at or past
//!   it, or a keepalive between transactions; the message itself makes the
//!   server send one). By then the stream has delivered every transaction
//!   the chunk sees, so the chunk's rows are never older than what the
//!   stream delivered before them, except for the rows that transactions the
//!   snapshot does *not* see changed: while the chunk was read or waited,
//!   the stream noted each changed row of the table with its transaction id,
//!   and those rows are left out (the stream's change is newer).
//! - The remaining rows go out as reads (whole rows in the table's shape
//!   now) appended to the transaction that reached `high`, or as a
//!   transaction of their own at a keepalive's WAL end.
//!
//! This is the watermark algorithm of DBLog and Debezium's incremental
//! snapshots, with the snapshot's own transaction list in place of a
//! watermark table: nothing is written to the source but one WAL message per
//! chunk. Rows that do not decode are dead-lettered, as in the initial
//! snapshot. A re-read only writes rows that exist: a row deleted behind the
//! fabric's back (with the table out of the publication) stays. A resync in progress is kept per source across reconnects (it
//! starts that table over); a process restart forgets it, and the first
//! relation message that differs from the catalog asks for it again.

use super::pgoutput;
use super::{SourceError, SourceStatus};
use crate::event::{Row, RowChange, Value};
use futures::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{AssertSqlSafe, Connection, Row as _};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// Rows per chunk.
pub const CHUNK_ROWS: usize = 2_000;

/// Which transactions a snapshot sees (`xmin:xmax:xip,...`).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    running: HashSet<u32>,
}

impl Snapshot {
    pub fn parse(s: &str) -> Option<Snapshot> {
        let mut it = s.splitn(3, ':');
        let xmin = it.next()?.parse().ok()?;
        let xmax = it.next()?.parse().ok()?;
        let running = it
            .next()?
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse::<u64>().ok().map(|x| x as u32))
            .collect::<Option<HashSet<u32>>>()?;
        Some(Snapshot {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether a transaction with this (32-bit) id, once committed, is seen
    /// by the snapshot. Ids compare modulo 2^32, as PostgreSQL's do.
    pub fn sees(&self, xid: u32) -> bool {
        let precedes = |a: u32, b: u32| (a.wrapping_sub(b) as i32) < 0;
        if precedes(xid, self.xmin as u32) {
            return true;
        }
        precedes(xid, self.xmax as u32) && !self.running.contains(&xid)
    }
}

/// A chunk read, waiting for the stream to reach `high`.
#[derive(Debug)]
pub struct Chunk {
    pub rows: Vec<Row>,
    /// Rows that did not decode: (reason, the row as read).
    pub dead: Vec<(String, String)>,
    pub pk: Vec<String>,
    pub snapshot: Snapshot,
    pub high: u64,
    /// The primary key (as text) of its last row, to read on after.
    pub last: Option<Vec<String>>,
    /// Fewer rows than asked for: the table is done.
    pub done: bool,
}

/// One table being read again.
struct Active {
    qualified: String,
    configured: String,
    after: Option<Vec<String>>,
    read: Option<JoinHandle<Result<Chunk, SourceError>>>,
    chunk: Option<Chunk>,
    /// Changes of the table by streamed transactions that the last chunk's
    /// snapshot did not see (or since the re-read began): (transaction id,
    /// a truncate?, before, after). Kept until a chunk's snapshot sees the
    /// transaction: one streamed before a chunk's read may still be unseen
    /// by its snapshot (its commit is flushed before other sessions see it).
    touched: Vec<(u32, bool, Option<Row>, Option<Row>)>,
    rows: u64,
}

/// The re-reads of one source's run: one table at a time, the others queued.
pub struct Resyncs {
    source: String,
    /// Where the tables not done yet go back when the run ends.
    status: Arc<SourceStatus>,
    options: PgConnectOptions,
    domains: HashMap<u32, u32>,
    queue: VecDeque<(String, String)>,
    active: Option<Active>,
}

/// What happened to a chunk handed on, for the caller's progress report.
pub struct Handed {
    pub table: String,
    /// The table as configured, for dead letters.
    pub configured: String,
    pub rows: usize,
    pub done: bool,
    /// Rows of the chunk that did not decode: (reason, the row as read).
    pub dead: Vec<(String, String)>,
}

impl Resyncs {
    pub fn new(
        source: &str,
        status: Arc<SourceStatus>,
        options: PgConnectOptions,
        domains: HashMap<u32, u32>,
    ) -> Self {
        Resyncs {
            source: source.to_string(),
            status,
            options,
            domains,
            queue: VecDeque::new(),
            active: None,
        }
    }

    /// Asks for `qualified` (configured as `configured`) to be read again:
    /// queued, or started over when it is being read now.
    pub fn request(&mut self, qualified: &str, configured: &str) {
        if let Some(a) = &mut self.active
            && a.qualified == qualified
        {
            if let Some(r) = a.read.take() {
                r.abort();
            }
            a.chunk = None;
            a.after = None;
            a.rows = 0;
            tracing::info!(source = %self.source, table = qualified, "table re-read starts over");
            return;
        }
        if !self.queue.iter().any(|(q, _)| q == qualified) {
            self.queue
                .push_back((qualified.to_string(), configured.to_string()));
        }
    }

    /// Gives up the table being read (it cannot be), keeping the queue.
    pub fn abandon(&mut self) {
        self.active = None;
    }

    /// Whether a table is being read or waits to be.
    pub fn busy(&self) -> bool {
        self.active.is_some() || !self.queue.is_empty()
    }

    /// The table being read now, if any.
    pub fn table(&self) -> Option<&str> {
        self.active.as_ref().map(|a| a.qualified.as_str())
    }

    /// Starts the next chunk's read when none is in flight or waiting.
    /// Returns the table when a new table's read begins.
    pub fn start(&mut self) -> Option<String> {
        let mut began = None;
        if self.active.is_none() {
            let (qualified, configured) = self.queue.pop_front()?;
            tracing::info!(source = %self.source, table = %qualified, "re-reading table while streaming");
            began = Some(qualified.clone());
            self.active = Some(Active {
                qualified,
                configured,
                after: None,
                read: None,
                chunk: None,
                touched: Vec::new(),
                rows: 0,
            });
        }
        let a = self.active.as_mut().expect("active");
        if a.read.is_none() && a.chunk.is_none() {
            a.read = Some(tokio::spawn(read_chunk(
                self.source.clone(),
                self.options.clone(),
                self.domains.clone(),
                a.qualified.clone(),
                a.after.clone(),
            )));
        }
        began
    }

    /// Waits for the chunk read in flight (forever when there is none).
    pub async fn read_done(&mut self) -> Result<(), SourceError> {
        let Some(a) = self.active.as_mut() else {
            return std::future::pending().await;
        };
        let Some(r) = a.read.as_mut() else {
            return std::future::pending().await;
        };
        let out = r.await;
        a.read = None;
        let chunk = match out {
            Ok(c) => c?,
            Err(e) if e.is_cancelled() => return Ok(()),
            Err(e) => {
                return Err(SourceError::external(
                    &self.source,
                    "re-read a table",
                    format!("the chunk reader failed: {e}"),
                ));
            }
        };
        a.chunk = Some(chunk);
        Ok(())
    }

    /// Notes the changes of a streamed transaction `xid` to the table being
    /// read.
    pub fn note(&mut self, xid: u32, changes: &[RowChange]) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        for c in changes.iter().filter(|c| c.table == a.configured) {
            a.touched.push((
                xid,
                c.op == crate::event::Op::Truncate,
                c.before.clone(),
                c.after.clone(),
            ));
        }
    }

    /// When the stream has reached `at`: the waiting chunk's rows to hand on
    /// there (as reads), leaving out those changed by transactions its
    /// snapshot does not see; `None` when no chunk is due.
    pub fn due(&mut self, at: u64) -> Option<(Vec<RowChange>, Handed)> {
        let a = self.active.as_mut()?;
        if a.chunk.as_ref().is_none_or(|c| at < c.high) {
            return None;
        }
        let chunk = a.chunk.take().expect("a chunk");
        // Rows compare by their key's values as decoded (both sides decode
        // PostgreSQL's text the same way).
        let key = |row: &Row| -> Option<Vec<String>> {
            chunk
                .pk
                .iter()
                .map(|c| row.get(c).map(|v| format!("{v:?}")))
                .collect()
        };
        // What the snapshot saw is in the chunk; what it did not see is
        // newer than the chunk, and kept for the next one.
        a.touched
            .retain(|(xid, _, _, _)| !chunk.snapshot.sees(*xid));
        if a.touched.iter().any(|(_, truncate, _, _)| *truncate) {
            // Emptied after the chunk's snapshot: its rows are gone. The
            // same stretch is read again.
            a.touched.retain(|(_, truncate, _, _)| !*truncate);
            tracing::debug!(source = %self.source, table = %a.qualified, "a chunk overtaken by a truncate is read again");
            return None;
        }
        let newer: HashSet<Vec<String>> = a
            .touched
            .iter()
            .flat_map(|(_, _, b, f)| [b, f])
            .flatten()
            .filter_map(key)
            .collect();
        let changes: Vec<RowChange> = chunk
            .rows
            .into_iter()
            .filter(|r| key(r).is_none_or(|k| !newer.contains(&k)))
            .map(|r| RowChange::read(&a.configured, r))
            .collect();
        tracing::debug!(
            source = %self.source,
            table = %a.qualified,
            rows = changes.len(),
            newer = newer.len(),
            high = chunk.high,
            at,
            "a chunk of the re-read handed on"
        );
        a.rows += changes.len() as u64;
        let handed = Handed {
            table: a.qualified.clone(),
            configured: a.configured.clone(),
            rows: changes.len(),
            done: chunk.done,
            dead: chunk.dead,
        };
        if chunk.done {
            tracing::info!(source = %self.source, table = %a.qualified, rows = a.rows, "table re-read");
            self.active = None;
        } else {
            a.after = chunk.last;
        }
        Some((changes, handed))
    }
}

impl Drop for Resyncs {
    /// The run ends: a table not done yet is read again (from its start)
    /// by the next run.
    fn drop(&mut self) {
        if let Some(a) = self.active.as_mut() {
            if let Some(r) = a.read.take() {
                r.abort();
            }
            self.status.request_resync(&a.configured);
        }
        for (_, configured) in &self.queue {
            self.status.request_resync(configured);
        }
    }
}

/// Reads one chunk of `qualified` after the key `after`, then marks the WAL.
async fn read_chunk(
    source: String,
    options: PgConnectOptions,
    domains: HashMap<u32, u32>,
    qualified: String,
    after: Option<Vec<String>>,
) -> Result<Chunk, SourceError> {
    let ext = |op: &'static str| {
        let source = source.clone();
        move |e: sqlx::Error| SourceError::external(&source, op, e)
    };
    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(ext("connect to re-read a table"))?;
    let rel = super::postgres_cdc::quote_qualified(&qualified);
    let mut tx = conn.begin().await.map_err(ext("re-read a table"))?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .map_err(ext("re-read a table"))?;
    // The mark below commits with this transaction, flushed at once.
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await
        .map_err(ext("re-read a table"))?;
    // The first statement takes the snapshot.
    let snapshot: String = sqlx::query_scalar("SELECT txid_current_snapshot()::text")
        .fetch_one(&mut *tx)
        .await
        .map_err(ext("re-read a table"))?;
    let snapshot = Snapshot::parse(&snapshot).ok_or_else(|| {
        SourceError::external(
            &source,
            "re-read a table",
            format!("bad snapshot {snapshot:?}"),
        )
    })?;
    // The table as it is now: columns (a domain as its base type) and key.
    let columns: Vec<(String, u32, String)> = sqlx::query_as(
        "SELECT a.attname::text, a.atttypid::int8, format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
         ORDER BY a.attnum",
    )
    .bind(&rel)
    .fetch_all(&mut *tx)
    .await
    .map_err(ext("read the columns"))?
    .into_iter()
    .map(|(n, o, t): (String, i64, String)| (n, o as u32, t))
    .collect();
    let pk: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = $1::regclass AND i.indisprimary
         ORDER BY array_position(i.indkey, a.attnum)",
    )
    .bind(&rel)
    .fetch_all(&mut *tx)
    .await
    .map_err(ext("read the primary key"))?;
    if pk.is_empty() {
        return Err(SourceError::Config {
            source_name: source,
            reason: format!(
                "table {qualified} has no primary key: it cannot be re-read in chunks while it streams"
            ),
        });
    }
    let quote = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    // Outputs under names of their own: an output named as a column would
    // make ORDER BY sort by its text.
    let cols = columns
        .iter()
        .map(|(c, _, _)| c)
        .chain(pk.iter())
        .enumerate()
        .map(|(i, c)| format!("t.{}::text AS _c{i}", quote(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let order = pk
        .iter()
        .map(|c| format!("t.{}", quote(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!("SELECT {cols} FROM {rel} AS t");
    if after.is_some() {
        let types: HashMap<&str, &str> = columns
            .iter()
            .map(|(c, _, t)| (c.as_str(), t.as_str()))
            .collect();
        let params = pk
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "${}::text::{}",
                    i + 1,
                    types.get(c.as_str()).unwrap_or(&"text")
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        sql.push_str(&format!(" WHERE ROW({order}) > ROW({params})"));
    }
    sql.push_str(&format!(" ORDER BY {order} LIMIT {CHUNK_ROWS}"));
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for v in after.iter().flatten() {
        q = q.bind(v);
    }
    let mut rows = Vec::new();
    let mut dead = Vec::new();
    let mut last = None;
    {
        let mut stream = q.fetch(&mut *tx);
        while let Some(r) = stream.try_next().await.map_err(ext("re-read a table"))? {
            let mut row = Row::new();
            let mut bad = None;
            for (i, (name, oid, _)) in columns.iter().enumerate() {
                let text: Option<String> = r.try_get(i).map_err(ext("re-read a table"))?;
                let base = domains.get(oid).copied().unwrap_or(*oid);
                let v = match text {
                    None => Value::Null,
                    Some(s) => match pgoutput::value(base, &s) {
                        Ok(v) => v,
                        Err(e) => {
                            bad = Some(format!("{qualified}.{name}: {e}"));
                            break;
                        }
                    },
                };
                row.insert(name.clone(), v);
            }
            let key = (0..pk.len())
                .map(|i| r.try_get::<String, _>(columns.len() + i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ext("re-read a table"))?;
            last = Some(key);
            match bad {
                // As the initial snapshot does: kept aside, the read goes on.
                Some(reason) => dead.push((reason, format!("{row:?}"))),
                None => rows.push(row),
            }
        }
    }
    // Every transaction the snapshot sees committed before this mark. It is
    // written inside the read's transaction, which holds its lock on the
    // table until it commits: a TRUNCATE waiting for it commits after the
    // mark. Its commit (flushed at once) moves the WAL, so an idle server
    // sends a keepalive past it.
    let high: String =
        sqlx::query_scalar("SELECT pg_logical_emit_message(true, 'entity-fabric', 'resync')::text")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                let code = e
                    .as_database_error()
                    .and_then(|d| d.code())
                    .map(|c| c.to_string());
                let reason = format!("pg_logical_emit_message: {e}");
                match code.as_deref() {
                    // A standby (read only) or a user not allowed: asking again
                    // does not help.
                    Some("25006") | Some("42501") => SourceError::Config {
                        source_name: source.clone(),
                        reason: format!(
                            "table {qualified} cannot be re-read while it streams: {reason}"
                        ),
                    },
                    _ => SourceError::external(&source, "mark the WAL after a chunk", reason),
                }
            })?;
    let high = crate::event::position::parse_lsn(&high).unwrap_or(u64::MAX);
    tx.commit().await.map_err(ext("re-read a table"))?;
    let _ = conn.close().await;
    Ok(Chunk {
        done: rows.len() + dead.len() < CHUNK_ROWS,
        dead,
        rows,
        pk,
        snapshot,
        high,
        last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_sees_what_committed_before_it() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        assert!(s.sees(99));
        assert!(s.sees(100));
        assert!(!s.sees(101));
        assert!(s.sees(102));
        assert!(!s.sees(103));
        assert!(s.sees(104));
        assert!(!s.sees(105));
        assert!(!s.sees(200));
        let empty = Snapshot::parse("7:7:").unwrap();
        assert!(empty.sees(6) && !empty.sees(7));
        // Across the 32-bit wrap (an epoch above 0).
        let w = Snapshot::parse(&format!("{}:{}:", (1u64 << 32) + 5, (1u64 << 32) + 9)).unwrap();
        assert!(w.sees(4) && w.sees(8) && !w.sees(9));
        assert!(w.sees(u32::MAX - 3));
        assert_eq!(Snapshot::parse("x"), None);
    }
}
