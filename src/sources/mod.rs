//! Sources: connectors that read a system of record and hand its
//! transactions to the router.
//!
//! Every connector implements [`Source`]. It is built from its config by
//! [`build`] (a plain `match`: the registry of connectors), then run as a
//! task with a [`SourceContext`]: where to resume, where to send
//! transactions, which position is durable (so it may prune or acknowledge
//! upstream), its status counters and the shutdown signal.
//!
//! Contract for every connector:
//! - A [`SourceTxn`] holds whole source transactions and the position *after*
//!   them; positions of one source strictly increase.
//! - Resuming from a position re-reads nothing before it and loses nothing
//!   after it (at-least-once; the store's apply is idempotent).
//! - Upstream is acknowledged (changelog pruned, slot advanced) only up to
//!   the position received on `durable` (DESIGN.md invariant 3).
//! - Bad input is reported with [`SourceContext::dead_letter`], never a crash.

pub mod debezium;
pub mod debezium_kafka;
pub mod grpc_push;
pub mod jsonl;
pub mod mysql_binlog;
pub mod pg_resync;
pub mod pgoutput;
pub mod postgres_cdc;
pub mod sql_poll;
pub mod sqlite;

use crate::config::{Config, SourceConfig, SourceKind};
use crate::event::{Position, SourceTxn};
use crate::telemetry::DeadLetters;
use async_trait::async_trait;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// Who is at fault and whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The config asks for something the source does not have.
    #[error("source {source_name}: {reason}")]
    Config { source_name: String, reason: String },
    /// The external system failed or is unreachable: retry with backoff.
    #[error("source {source_name}: {operation}: {reason}")]
    External {
        source_name: String,
        operation: String,
        reason: String,
    },
    /// The pipeline behind the source is gone (shutting down).
    #[error("source {source_name}: the router is gone")]
    Closed { source_name: String },
}

impl SourceError {
    pub fn external(source: &str, operation: &str, e: impl std::fmt::Display) -> Self {
        SourceError::External {
            source_name: source.to_string(),
            operation: operation.to_string(),
            reason: e.to_string(),
        }
    }

    /// True when retrying later can help.
    pub fn retryable(&self) -> bool {
        matches!(self, SourceError::External { .. })
    }
}

/// A transaction on its way to the router, with an optional notice for the
/// sender once it is on the bus.
#[derive(Debug)]
pub struct TxnEnvelope {
    pub txn: SourceTxn,
    pub on_routed: Option<oneshot::Sender<()>>,
}

/// Live state of one source, shown by the catalog and metrics.
#[derive(Debug, Default)]
pub struct SourceStatus {
    pub state: Mutex<String>,
    pub last_error: Mutex<String>,
    pub transactions: AtomicU64,
    pub changes: AtomicU64,
    /// Commit time of the last transaction read, microseconds since epoch.
    pub last_commit_micros: AtomicI64,
    /// True while the source is connected and has nothing more to read
    /// right now (see [`set_caught_up`](Self::set_caught_up)).
    caught_up: std::sync::atomic::AtomicBool,
    /// When it last stopped being caught up (a transaction began, or its
    /// connection was lost), microseconds since epoch: everything before
    /// that moment had been read.
    current_until_micros: AtomicI64,
    /// When its supervisor first started it, microseconds since epoch.
    started_micros: AtomicI64,
    /// The position of the last transaction handed to the router (with
    /// changes or not): how far it has read.
    sent: Mutex<Option<Position>>,
    /// Its initial snapshot, or a table's re-read, while one is read.
    pub progress: crate::progress::Progress,
    /// Tables an operator asked to be read again (`fabric resync`), and
    /// those a run left unfinished, for the next run.
    resyncs: Mutex<Vec<String>>,
    /// Wakes the running source when a re-read is asked for.
    pub resync_asked: tokio::sync::Notify,
}

impl SourceStatus {
    /// One more row of an initial snapshot read: counted, and a yield to
    /// the runtime now and then (tokio's budget), so a snapshot decoding
    /// rows that arrive faster than it takes them does not hold a runtime
    /// thread for seconds while reads and the catalog wait.
    pub async fn snapshot_row(&self) {
        self.progress.advance(1);
        tokio::task::consume_budget().await;
    }

    pub fn set_state(&self, s: &str) {
        *self.state.lock() = s.to_string();
    }

    pub fn set_error(&self, e: &str) {
        *self.last_error.lock() = e.to_string();
    }

    /// Asks the source to read `table` (as configured) again while it
    /// streams; the running source is woken.
    pub fn request_resync(&self, table: &str) {
        let mut r = self.resyncs.lock();
        if !r.iter().any(|t| t == table) {
            r.push(table.to_string());
        }
        drop(r);
        self.resync_asked.notify_one();
    }

    /// The tables asked to be read again, taken.
    pub fn take_resyncs(&self) -> Vec<String> {
        std::mem::take(&mut *self.resyncs.lock())
    }

    /// How far it has read: the position of the last transaction handed on.
    pub fn last_sent(&self) -> Option<Position> {
        self.sent.lock().clone()
    }

    /// Whether the source is connected and has read everything its system
    /// had when it last looked.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// Says whether the source has read everything there is. Only a
    /// connected source may say yes, and only once its system says so (each
    /// connector documents its test); going from yes to no notes the moment,
    /// from which its lag then grows.
    pub fn set_caught_up(&self, yes: bool) {
        if self.caught_up.swap(yes, Ordering::AcqRel) && !yes {
            self.current_until_micros
                .fetch_max(now_micros(), Ordering::AcqRel);
        }
    }

    /// The source's connection is gone (its run ended): not caught up from
    /// now until a new run says so again.
    pub fn disconnected(&self) {
        self.set_caught_up(false);
    }

    /// Its supervisor starts it (the first time counts).
    pub fn started(&self) {
        let _ = self.started_micros.compare_exchange(
            0,
            now_micros(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// How far behind its system the fabric may be for this source: zero
    /// when caught up, else the time since the later of the last commit
    /// read and the moment it stopped being caught up (a disconnect, or a
    /// transaction that began). `None` when unknown: it never read a
    /// transaction and was never caught up.
    pub fn staleness(&self) -> Option<std::time::Duration> {
        if self.caught_up() {
            return Some(std::time::Duration::ZERO);
        }
        let known = self
            .last_commit_micros
            .load(Ordering::Acquire)
            .max(self.current_until_micros.load(Ordering::Acquire));
        (known > 0).then(|| std::time::Duration::from_micros((now_micros() - known).max(0) as u64))
    }

    /// Its lag, as shown (ListSources, the status page, /metrics):
    /// [`staleness`](Self::staleness), or, when that is unknown, the time
    /// since the source was first started (0 if never).
    pub fn lag_millis(&self) -> i64 {
        match self.staleness() {
            Some(d) => d.as_millis() as i64,
            None => {
                let started = self.started_micros.load(Ordering::Acquire);
                if started == 0 {
                    0
                } else {
                    ((now_micros() - started) / 1000).max(0)
                }
            }
        }
    }
}

/// What a running source gets.
pub struct SourceContext {
    pub name: Arc<str>,
    /// Where to resume; `None` on a first start (take the initial snapshot).
    pub resume: Option<Position>,
    out: mpsc::Sender<TxnEnvelope>,
    /// The highest position whose effects are durable: safe to acknowledge upstream.
    pub durable: watch::Receiver<Option<Position>>,
    pub status: Arc<SourceStatus>,
    pub dead_letters: Arc<DeadLetters>,
    pub shutdown: CancellationToken,
    /// The store may hold rows of this source (restored from snapshots, or
    /// replayed from a Kafka changes topic). A source that starts over (no
    /// checkpoint) into such a store must clear its tables before its
    /// snapshot: rows deleted at the source since would otherwise stay, since
    /// a snapshot reads only what exists.
    pub store_may_hold_rows: bool,
}

impl SourceContext {
    pub fn new(
        name: Arc<str>,
        resume: Option<Position>,
        out: mpsc::Sender<TxnEnvelope>,
        durable: watch::Receiver<Option<Position>>,
        status: Arc<SourceStatus>,
        dead_letters: Arc<DeadLetters>,
        shutdown: CancellationToken,
    ) -> Self {
        SourceContext {
            name,
            resume,
            out,
            durable,
            status,
            dead_letters,
            shutdown,
            store_may_hold_rows: false,
        }
    }

    /// Whether a snapshot taken now must clear this source's tables first:
    /// when it starts over from a checkpoint that cannot be resumed, or when
    /// it has no checkpoint but the restored store may hold its rows.
    pub fn snapshot_replaces(&self) -> bool {
        self.resume.is_some() || self.store_may_hold_rows
    }

    /// Hands one transaction to the router; waits when the pipeline is full.
    pub async fn send(&self, txn: SourceTxn) -> Result<(), SourceError> {
        self.send_inner(txn, None).await
    }

    /// Builds and hands on one transaction unless shutdown comes first;
    /// `Ok(false)` when it did (the caller stops).
    pub async fn deliver(
        &self,
        position: Position,
        commit_micros: i64,
        changes: Vec<crate::event::RowChange>,
    ) -> Result<bool, SourceError> {
        let txn = SourceTxn {
            source: self.name.clone(),
            position,
            commit_micros,
            changes,
        };
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Ok(false),
            r = self.send(txn) => r.map(|()| true),
        }
    }

    /// As [`send`](Self::send), and returns a receiver told once the
    /// transaction is on the bus.
    pub async fn send_acked(&self, txn: SourceTxn) -> Result<oneshot::Receiver<()>, SourceError> {
        let (tx, rx) = oneshot::channel();
        self.send_inner(txn, Some(tx)).await?;
        Ok(rx)
    }

    async fn send_inner(
        &self,
        txn: SourceTxn,
        on_routed: Option<oneshot::Sender<()>>,
    ) -> Result<(), SourceError> {
        debug_assert_eq!(txn.source, self.name);
        // One without changes only says how far the source has read.
        if !txn.changes.is_empty() {
            self.status.transactions.fetch_add(1, Ordering::Relaxed);
            self.status
                .changes
                .fetch_add(txn.changes.len() as u64, Ordering::Relaxed);
            self.status
                .last_commit_micros
                .store(txn.commit_micros, Ordering::Relaxed);
        }
        let position = txn.position.clone();
        self.out
            .send(TxnEnvelope { txn, on_routed })
            .await
            .map_err(|_| SourceError::Closed {
                source_name: self.name.to_string(),
            })?;
        *self.status.sent.lock() = Some(position);
        Ok(())
    }

    /// Records input that cannot be decoded: counted, kept, never fatal.
    pub fn dead_letter(&self, table: &str, reason: &str, raw: &str) {
        self.dead_letters.record(&self.name, table, reason, raw);
    }
}

/// A connector.
#[async_trait]
pub trait Source: Send {
    /// Reads until `ctx.shutdown` fires or a fatal error. Retryable errors
    /// returned here make the caller restart the source with backoff from
    /// the last routed position.
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError>;
}

/// Whether this build has a connector for `kind`.
pub fn available(kind: SourceKind) -> bool {
    matches!(
        kind,
        SourceKind::Sqlite
            | SourceKind::Jsonl
            | SourceKind::GrpcPush
            | SourceKind::PostgresCdc
            | SourceKind::MysqlBinlog
            | SourceKind::SqlPoll
            | SourceKind::DebeziumKafka
    )
}

/// The registry of connectors.
pub fn build(
    cfg: &SourceConfig,
    config: &Config,
    push: &grpc_push::PushRegistry,
) -> Result<Box<dyn Source>, SourceError> {
    match cfg.kind {
        SourceKind::Sqlite => Ok(Box::new(sqlite::SqliteSource::new(cfg, config)?)),
        SourceKind::Jsonl => Ok(Box::new(jsonl::JsonlSource::new(cfg, config)?)),
        SourceKind::GrpcPush => Ok(Box::new(push.register(&cfg.name))),
        SourceKind::PostgresCdc => Ok(Box::new(postgres_cdc::PostgresCdcSource::new(cfg, config)?)),
        SourceKind::MysqlBinlog => Ok(Box::new(mysql_binlog::MysqlBinlogSource::new(cfg, config)?)),
        SourceKind::SqlPoll => Ok(Box::new(sql_poll::SqlPollSource::new(cfg, config)?)),
        SourceKind::DebeziumKafka => Ok(Box::new(debezium_kafka::DebeziumKafkaSource::new(
            cfg, config,
        )?)),
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// What a source kind cannot see, for `fabric check` and the docs.
pub fn limits(kind: SourceKind) -> Option<&'static str> {
    match kind {
        SourceKind::Sqlite => Some(
            "sqlite has no transaction ids: one poll batch of whole committed transactions is applied atomically; a transaction larger than batch_size may be seen in two steps",
        ),
        SourceKind::Jsonl => Some(
            "jsonl groups consecutive events with the same Debezium transaction id; events without one are their own transaction",
        ),
        SourceKind::SqlPoll => Some(
            "sql_poll sees only rows whose cursor column grows: deletes are seen only through soft_delete_column, and several updates between two polls are seen as one",
        ),
        SourceKind::DebeziumKafka => Some(
            "debezium_kafka applies each row change as its own transaction (Debezium spreads a database transaction over one topic per table), and reads the partitions the topics have at start",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Lag is 0 while caught up; it counts from the moment the source
    /// stopped being caught up, or from a later commit read; it is unknown
    /// (None) before either.
    #[test]
    fn lag_counts_from_the_disconnect_or_a_later_commit() {
        let s = SourceStatus::default();
        assert_eq!(s.staleness(), None);
        assert_eq!(s.lag_millis(), 0);
        s.started();
        s.set_caught_up(true);
        assert_eq!(s.staleness(), Some(Duration::ZERO));
        // An old commit read before, then the connection lost now: the lag
        // counts from the disconnect, not from the old commit.
        s.last_commit_micros
            .store(now_micros() - 3_600_000_000, Ordering::Release);
        s.disconnected();
        assert!(!s.caught_up());
        let lag = s.staleness().unwrap();
        assert!(lag < Duration::from_secs(60), "{lag:?}");
        std::thread::sleep(Duration::from_millis(20));
        assert!(s.staleness().unwrap() >= lag + Duration::from_millis(20));
        // Not caught up and never was: from its last commit.
        let t = SourceStatus::default();
        t.last_commit_micros
            .store(now_micros() - 5_000_000, Ordering::Release);
        assert!(t.staleness().unwrap() >= Duration::from_secs(5));
    }
}
