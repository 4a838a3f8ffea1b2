//! `jsonl`: a file of Debezium change events, one per line, followed as it
//! grows (like `tail -F`).
//!
//! Each line is one message as accepted by [`debezium::decode`]. Consecutive
//! events with the same transaction id form one [`SourceTxn`]; an event
//! without one is a transaction by itself. The table is the event's
//! `schema.table` / `db.table` text, which entity tables name in `from`.
//!
//! Invariants:
//! - The position of a transaction is the byte offset right after its last
//!   line, so resuming from it re-reads nothing before it. Only complete lines
//!   (ending in `\n`) are read; a partial last line waits for the next poll.
//! - A source transaction is never split. One still open at the end of the
//!   file is held until a line of another transaction arrives or a whole
//!   poll interval passes without new data.
//! - Undecodable lines are dead-lettered and skipped; blank lines and
//!   non-row events (tombstones, heartbeats) are skipped. A skipped line
//!   after the last transaction may be read (and dead-lettered) again after
//!   a restart, since no position covers it.
//! - A missing file is waited for. A file shorter than the resume offset, or
//!   whose byte before that offset is not a line end, or that is truncated or
//!   replaced while followed, was rewritten by the operator. Its offsets would
//!   move back, and entities would take its events for replays of old ones,
//!   so the source stops with an error saying so (state `failed`) instead of
//!   guessing. To read a new file from the start, give the source a new name.
//! - The file belongs to the operator: nothing is pruned on acknowledgement.

use super::debezium;
use super::{Source, SourceContext, SourceError, now_micros};
use crate::config::{Config, SourceConfig};
use crate::event::{Position, RowChange, SourceTxn};
use async_trait::async_trait;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::time::Duration;
use tokio::fs::File;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, BufReader};

/// Lines read per wakeup before yielding, so one big file cannot hog a worker.
const MAX_LINES_PER_WAKEUP: usize = 10_000;

/// Longest line accepted; a longer one is dead-lettered (its first bytes
/// kept) and skipped, so one hostile line cannot exhaust memory.
const MAX_LINE_BYTES: usize = 64 << 20;

/// Follows one JSON-lines file of Debezium events.
pub struct JsonlSource {
    path: PathBuf,
    poll: Duration,
    /// Longest line accepted (`MAX_LINE_BYTES`; smaller in tests).
    max_line: usize,
}

impl JsonlSource {
    pub fn new(cfg: &SourceConfig, config: &Config) -> Result<Self, SourceError> {
        let path = cfg.path.as_deref().ok_or_else(|| SourceError::Config {
            source_name: cfg.name.clone(),
            reason: "a jsonl source needs a path".into(),
        })?;
        Ok(JsonlSource {
            path: config.resolve(path),
            poll: cfg.poll_interval(),
            max_line: MAX_LINE_BYTES,
        })
    }
}

/// Why following stopped short of an error.
enum Halt {
    Shutdown,
    Failed(SourceError),
}

impl From<SourceError> for Halt {
    fn from(e: SourceError) -> Self {
        Halt::Failed(e)
    }
}

/// A transaction read but not yet sent.
struct Pending {
    txn_id: Option<String>,
    changes: Vec<RowChange>,
    /// Offset right after its last line.
    end: u64,
    commit_micros: i64,
}

/// The state of following one opened file.
struct Tail {
    reader: BufReader<File>,
    /// Offset right after the last complete line consumed.
    offset: u64,
    /// The bytes of an incomplete last line, completed by a later read.
    partial: Vec<u8>,
    /// Inside a line that was too long: drop bytes up to its end.
    skipping: bool,
    open: Option<Pending>,
    /// `(device, inode)` of the opened file, to notice a replaced file.
    identity: Option<(u64, u64)>,
}

/// What one read pass found.
struct ReadPass {
    new_bytes: bool,
    eof: bool,
}

#[async_trait]
impl Source for JsonlSource {
    #[tracing::instrument(skip_all, fields(source = %ctx.name))]
    async fn run(self: Box<Self>, ctx: SourceContext) -> Result<(), SourceError> {
        let start = match &ctx.resume {
            None => 0,
            Some(Position::FileOffset(n)) => *n,
            Some(other) => {
                return Err(SourceError::Config {
                    source_name: ctx.name.to_string(),
                    reason: format!(
                        "the checkpoint {other} is not a file offset (was this source of another kind?); give the source a new name to read the file from the start"
                    ),
                });
            }
        };
        let result = match self.open_at(&ctx, start).await {
            Ok(tail) => self.follow(&ctx, tail).await,
            Err(h) => Err(h),
        };
        match result {
            Ok(()) | Err(Halt::Shutdown) => Ok(()),
            Err(Halt::Failed(e)) => {
                ctx.status.set_error(&e.to_string());
                Err(e)
            }
        }
    }
}

impl JsonlSource {
    /// The file no longer continues what was read: refuse, do not guess.
    fn rewritten_error(&self, ctx: &SourceContext, what: &str) -> Halt {
        Halt::Failed(SourceError::Config {
            source_name: ctx.name.to_string(),
            reason: format!(
                "{} was rewritten ({what}); its offsets would move back, so it is not read. Give the source a new name to read the new file from the start",
                self.path.display()
            ),
        })
    }

    fn external(&self, ctx: &SourceContext, operation: &str, e: std::io::Error) -> Halt {
        let reason = format!("{}: {e}", self.path.display());
        Halt::Failed(SourceError::external(&ctx.name, operation, reason))
    }

    /// Opens the file (waiting for it to exist) positioned at `start`, or at
    /// 0 when `start` cannot be a line start of this file.
    async fn open_at(&self, ctx: &SourceContext, start: u64) -> Result<Tail, Halt> {
        let mut file = self.open(ctx).await?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| self.external(ctx, "stat file", e))?;
        if start > meta.len() {
            return Err(self.rewritten_error(
                ctx,
                &format!(
                    "it is {} bytes long, shorter than the checkpoint offset {start}",
                    meta.len()
                ),
            ));
        } else if start > 0 {
            // Resume offsets always follow a '\n'; anything else means the
            // file was rewritten.
            let mut byte = [0u8; 1];
            file.seek(SeekFrom::Start(start - 1))
                .await
                .map_err(|e| self.external(ctx, "seek file", e))?;
            file.read_exact(&mut byte)
                .await
                .map_err(|e| self.external(ctx, "read file", e))?;
            if byte[0] != b'\n' {
                return Err(self.rewritten_error(
                    ctx,
                    &format!("the checkpoint offset {start} is not at the start of a line"),
                ));
            }
        }
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| self.external(ctx, "seek file", e))?;
        tracing::info!(path = %self.path.display(), offset = start, "following file");
        Ok(Tail {
            reader: BufReader::new(file),
            offset: start,
            partial: Vec::new(),
            skipping: false,
            open: None,
            identity: identity(&meta),
        })
    }

    /// Opens the file, waiting while it does not exist.
    async fn open(&self, ctx: &SourceContext) -> Result<File, Halt> {
        let mut waiting = false;
        loop {
            match File::open(&self.path).await {
                Ok(f) => return Ok(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !waiting {
                        tracing::info!(path = %self.path.display(), "waiting for file");
                        ctx.status.set_state("waiting for file");
                        ctx.status.set_caught_up(true);
                        waiting = true;
                    }
                    pause(ctx, self.poll).await?;
                }
                Err(e) => return Err(self.external(ctx, "open file", e)),
            }
        }
    }

    /// Reads and sends until shutdown, an error, or the file is truncated or
    /// replaced (then `Ok`).
    async fn follow(&self, ctx: &SourceContext, mut tail: Tail) -> Result<(), Halt> {
        ctx.status.set_state("streaming");
        loop {
            if ctx.shutdown.is_cancelled() {
                return Err(Halt::Shutdown);
            }
            let pass = self.read_pass(ctx, &mut tail).await?;
            if pass.new_bytes {
                ctx.status.set_caught_up(false);
            }
            if !pass.eof {
                tokio::task::yield_now().await;
                continue;
            }
            if !pass.new_bytes {
                // A whole poll interval without new data: the held
                // transaction is complete.
                flush(ctx, &mut tail.open).await?;
            }
            ctx.status.set_caught_up(tail.open.is_none());
            if self.rewritten(&tail).await {
                flush(ctx, &mut tail.open).await?;
                return Err(
                    self.rewritten_error(ctx, "it was truncated or replaced while followed")
                );
            }
            pause(ctx, self.poll).await?;
        }
    }

    /// Reads complete lines until the end of the file or the per-wakeup cap.
    async fn read_pass(&self, ctx: &SourceContext, tail: &mut Tail) -> Result<ReadPass, Halt> {
        let mut new_bytes = false;
        for _ in 0..MAX_LINES_PER_WAKEUP {
            let room = (self.max_line + 1).saturating_sub(tail.partial.len()) as u64;
            let n = (&mut tail.reader)
                .take(room.max(1))
                .read_until(b'\n', &mut tail.partial)
                .await
                .map_err(|e| self.external(ctx, "read file", e))?;
            if tail.skipping && n > 0 {
                tail.offset += tail.partial.len() as u64;
                if tail.partial.last() == Some(&b'\n') {
                    tail.skipping = false;
                }
                tail.partial.clear();
                continue;
            }
            if tail.partial.len() > self.max_line && tail.partial.last() != Some(&b'\n') {
                // Too long: drop what is held and skip to the end of the line.
                let head = String::from_utf8_lossy(&tail.partial[..tail.partial.len().min(1024)])
                    .to_string();
                tail.offset += tail.partial.len() as u64;
                tail.partial.clear();
                tail.skipping = true;
                ctx.dead_letter(
                    "",
                    &format!(
                        "line longer than {} bytes (its first bytes kept)",
                        self.max_line
                    ),
                    &head,
                );
                continue;
            }
            if n == 0 {
                return Ok(ReadPass {
                    new_bytes,
                    eof: true,
                });
            }
            new_bytes = true;
            if tail.partial.last() != Some(&b'\n') {
                // The writer has not finished this line yet.
                return Ok(ReadPass {
                    new_bytes,
                    eof: true,
                });
            }
            let line = std::mem::take(&mut tail.partial);
            tail.offset += line.len() as u64;
            handle_line(ctx, &mut tail.open, &line, tail.offset).await?;
        }
        Ok(ReadPass {
            new_bytes,
            eof: false,
        })
    }

    /// True when the path now names a shorter file than the one read, or
    /// another file. A deleted path is not a change: the data read stands.
    async fn rewritten(&self, tail: &Tail) -> bool {
        let Ok(meta) = tokio::fs::metadata(&self.path).await else {
            return false;
        };
        let read = tail.offset + tail.partial.len() as u64;
        meta.len() < read || identity(&meta) != tail.identity
    }
}

/// Decodes one line (with its `\n`) ending at `end` and adds its change to
/// the open transaction, sending what it completes.
async fn handle_line(
    ctx: &SourceContext,
    open: &mut Option<Pending>,
    line: &[u8],
    end: u64,
) -> Result<(), Halt> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let event = match debezium::decode(body) {
        Ok(ev) => ev,
        Err(e) => {
            let table = debezium::peek_table(body).unwrap_or_default();
            ctx.dead_letter(&table, &e.to_string(), &String::from_utf8_lossy(body));
            return Ok(());
        }
    };
    let Some(change) = event.change else {
        return Ok(());
    };
    if let Some(p) = open.as_mut()
        && p.txn_id.is_some()
        && p.txn_id == event.txn_id
    {
        p.changes.push(change);
        p.end = end;
        if event.commit_micros != 0 {
            p.commit_micros = event.commit_micros;
        }
        return Ok(());
    }
    flush(ctx, open).await?;
    let standalone = event.txn_id.is_none();
    *open = Some(Pending {
        txn_id: event.txn_id,
        changes: vec![change],
        end,
        commit_micros: event.commit_micros,
    });
    if standalone {
        // Nothing can continue a transaction without an id.
        flush(ctx, open).await?;
    }
    Ok(())
}

/// Sends the open transaction, if any.
async fn flush(ctx: &SourceContext, open: &mut Option<Pending>) -> Result<(), Halt> {
    let Some(p) = open.take() else {
        return Ok(());
    };
    let txn = SourceTxn {
        source: ctx.name.clone(),
        position: Position::FileOffset(p.end),
        commit_micros: if p.commit_micros == 0 {
            now_micros()
        } else {
            p.commit_micros
        },
        changes: p.changes,
    };
    tokio::select! {
        r = ctx.send(txn) => Ok(r?),
        _ = ctx.shutdown.cancelled() => Err(Halt::Shutdown),
    }
}

/// Sleeps `d` unless shutdown comes first.
async fn pause(ctx: &SourceContext, d: Duration) -> Result<(), Halt> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = ctx.shutdown.cancelled() => Err(Halt::Shutdown),
    }
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn identity(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, Value};
    use crate::sources::{SourceStatus, TxnEnvelope};
    use crate::telemetry::{DeadLetters, Metrics};
    use std::io::Write;
    use std::path::Path;
    use std::sync::Arc;
    use tokio::sync::{mpsc, watch};
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;

    const POLL: Duration = Duration::from_millis(20);

    /// One Debezium insert into `public.customers`, as a line.
    fn event(id: i64, txn: Option<&str>) -> String {
        let txn = match txn {
            Some(t) => serde_json::json!({"id": t, "total_order": 1, "data_collection_order": 1}),
            None => serde_json::Value::Null,
        };
        let msg = serde_json::json!({
            "before": null,
            "after": {"id": id, "name": format!("c{id}")},
            "source": {"connector": "postgresql", "db": "shop", "schema": "public", "table": "customers", "ts_ms": 1_700_000_000_000i64 + id},
            "op": "c",
            "ts_ms": 1_700_000_000_500i64,
            "transaction": txn,
        });
        format!("{msg}\n")
    }

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn ids(txn: &SourceTxn) -> Vec<i64> {
        txn.changes
            .iter()
            .map(|c| match c.after.as_ref().and_then(|r| r.get("id")) {
                Some(Value::Int(i)) => *i,
                other => panic!("unexpected id {other:?}"),
            })
            .collect()
    }

    struct Harness {
        rx: mpsc::Receiver<TxnEnvelope>,
        status: Arc<SourceStatus>,
        dead: Arc<DeadLetters>,
        stop: CancellationToken,
        task: JoinHandle<Result<(), SourceError>>,
        _durable: watch::Sender<Option<Position>>,
    }

    impl Harness {
        fn start(dir: &Path, path: &Path, resume: Option<Position>) -> Harness {
            Self::start_with(dir, path, resume, MAX_LINE_BYTES)
        }

        fn start_with(
            dir: &Path,
            path: &Path,
            resume: Option<Position>,
            max_line: usize,
        ) -> Harness {
            let (tx, rx) = mpsc::channel(64);
            let (durable_tx, durable_rx) = watch::channel(None);
            let status = Arc::new(SourceStatus::default());
            let dead = Arc::new(DeadLetters::new(
                &dir.join("dlq.jsonl"),
                10,
                Arc::new(Metrics::new()),
            ));
            let stop = CancellationToken::new();
            let ctx = SourceContext::new(
                Arc::from("events"),
                resume,
                tx,
                durable_rx,
                status.clone(),
                dead.clone(),
                stop.clone(),
            );
            let source = Box::new(JsonlSource {
                path: path.to_path_buf(),
                poll: POLL,
                max_line,
            });
            let task = tokio::spawn(source.run(ctx));
            Harness {
                rx,
                status,
                dead,
                stop,
                task,
                _durable: durable_tx,
            }
        }

        async fn next(&mut self) -> SourceTxn {
            tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                .await
                .expect("a transaction in time")
                .expect("source running")
                .txn
        }

        async fn nothing_for(&mut self, d: Duration) {
            if let Ok(Some(env)) = tokio::time::timeout(d, self.rx.recv()).await {
                panic!("unexpected transaction {:?}", env.txn);
            }
        }

        /// Waits for the source to fail; returns its error, which must not be retryable.
        async fn failure(self) -> String {
            let r = tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("fails in time")
                .unwrap();
            let e = r.expect_err("the source should fail");
            assert!(!e.retryable(), "{e}");
            e.to_string()
        }

        async fn stop(self) {
            self.stop.cancel();
            let r = tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("stops in time")
                .unwrap();
            assert!(r.is_ok(), "{r:?}");
        }
    }

    #[tokio::test]
    async fn follows_appended_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let first = event(1, None);
        append(&path, &first);
        let mut h = Harness::start(dir.path(), &path, None);
        let t = h.next().await;
        assert_eq!(ids(&t), vec![1]);
        assert_eq!(t.position, Position::FileOffset(first.len() as u64));
        assert_eq!(t.commit_micros, 1_700_000_000_001_000);
        assert_eq!(t.changes[0].table, "public.customers");
        assert_eq!(t.changes[0].op, Op::Insert);

        let second = event(2, None);
        append(&path, &second);
        let t = h.next().await;
        assert_eq!(ids(&t), vec![2]);
        assert_eq!(
            t.position,
            Position::FileOffset((first.len() + second.len()) as u64)
        );
        tokio::time::sleep(POLL * 3).await;
        assert!(h.status.caught_up());
        assert_eq!(*h.status.state.lock(), "streaming");
        h.stop().await;
    }

    #[tokio::test]
    async fn groups_consecutive_events_of_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let lines = [
            event(1, Some("t1")),
            event(2, Some("t1")),
            event(3, None),
            event(4, Some("t2")),
            event(5, Some("t2")),
        ];
        append(&path, &lines.concat());
        let mut h = Harness::start(dir.path(), &path, None);
        let t = h.next().await;
        assert_eq!(ids(&t), vec![1, 2]);
        let after_two = (lines[0].len() + lines[1].len()) as u64;
        assert_eq!(t.position, Position::FileOffset(after_two));
        let t = h.next().await;
        assert_eq!(ids(&t), vec![3]);
        // Open at the end of the file: sent once a poll passes without data.
        let t = h.next().await;
        assert_eq!(ids(&t), vec![4, 5]);
        let total: usize = lines.iter().map(String::len).sum();
        assert_eq!(t.position, Position::FileOffset(total as u64));
        h.stop().await;
    }

    #[tokio::test]
    async fn a_transaction_open_at_the_end_continues_on_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        append(&path, &event(1, Some("t1")));
        // A long poll, so the held transaction is still open when it grows.
        let (tx, mut rx) = mpsc::channel(8);
        let (_dtx, drx) = watch::channel(None);
        let stop = CancellationToken::new();
        let ctx = SourceContext::new(
            Arc::from("events"),
            None,
            tx,
            drx,
            Arc::new(SourceStatus::default()),
            Arc::new(DeadLetters::new(
                &dir.path().join("dlq.jsonl"),
                10,
                Arc::new(Metrics::new()),
            )),
            stop.clone(),
        );
        let source = Box::new(JsonlSource {
            path: path.clone(),
            poll: Duration::from_millis(400),
            max_line: MAX_LINE_BYTES,
        });
        let task = tokio::spawn(source.run(ctx));
        tokio::time::sleep(Duration::from_millis(100)).await;
        append(&path, &event(2, Some("t1")));
        append(&path, &event(3, Some("t2")));
        let t = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
            .txn;
        assert_eq!(ids(&t), vec![1, 2]);
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn resume_skips_lines_before_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let lines = [event(1, None), event(2, None), event(3, None)];
        append(&path, &lines.concat());
        let resume = Position::FileOffset(lines[0].len() as u64);
        let mut h = Harness::start(dir.path(), &path, Some(resume));
        assert_eq!(ids(&h.next().await), vec![2]);
        assert_eq!(ids(&h.next().await), vec![3]);
        h.nothing_for(POLL * 5).await;
        h.stop().await;
    }

    #[tokio::test]
    async fn resume_beyond_the_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        append(&path, &event(1, None));
        let h = Harness::start(dir.path(), &path, Some(Position::FileOffset(10_000)));
        let e = h.failure().await;
        assert!(
            e.contains("shorter than the checkpoint offset 10000"),
            "{e}"
        );
        assert!(!e.contains("retry"), "{e}");
    }

    #[tokio::test]
    async fn resume_inside_a_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        append(&path, &format!("{}{}", event(1, None), event(2, None)));
        let h = Harness::start(dir.path(), &path, Some(Position::FileOffset(5)));
        let e = h.failure().await;
        assert!(e.contains("not at the start of a line"), "{e}");
    }

    #[tokio::test]
    async fn a_partial_last_line_waits_for_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let first = event(1, None);
        let second = event(2, None);
        let (head, rest) = second.split_at(20);
        append(&path, &format!("{first}{head}"));
        let mut h = Harness::start(dir.path(), &path, None);
        assert_eq!(ids(&h.next().await), vec![1]);
        h.nothing_for(POLL * 5).await;
        append(&path, rest);
        let t = h.next().await;
        assert_eq!(ids(&t), vec![2]);
        assert_eq!(
            t.position,
            Position::FileOffset((first.len() + second.len()) as u64)
        );
        assert_eq!(h.dead.count("events"), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn bad_lines_are_dead_lettered_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let bad = "{this is not json\n";
        let text = format!("{}\n{bad}{}", event(1, None), event(2, None));
        append(&path, &text);
        let mut h = Harness::start(dir.path(), &path, None);
        assert_eq!(ids(&h.next().await), vec![1]);
        let t = h.next().await;
        assert_eq!(ids(&t), vec![2]);
        assert_eq!(t.position, Position::FileOffset(text.len() as u64));
        assert_eq!(h.dead.count("events"), 1);
        let dl = h.dead.recent();
        assert_eq!(dl[0].raw, "{this is not json");
        assert!(
            dl[0].reason.starts_with("not valid json"),
            "{}",
            dl[0].reason
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn an_overlong_line_is_dead_lettered_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let long = format!("{{\"pad\": \"{}\"}}\n", "x".repeat(5000));
        append(
            &path,
            &format!("{}{long}{}", event(1, None), event(2, None)),
        );
        let mut h = Harness::start_with(dir.path(), &path, None, 1000);
        assert_eq!(ids(&h.next().await), vec![1]);
        let t = h.next().await;
        assert_eq!(ids(&t), vec![2]);
        let end = std::fs::metadata(&path).unwrap().len();
        assert_eq!(t.position, Position::FileOffset(end));
        assert_eq!(h.dead.count("events"), 1);
        let recent = h.dead.recent();
        assert!(
            recent[0].reason.contains("line longer than 1000 bytes"),
            "{:?}",
            recent[0]
        );
        h.stop().await;
    }

    #[tokio::test]
    async fn tombstones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        append(&path, &format!("null\n{}", event(1, None)));
        let mut h = Harness::start(dir.path(), &path, None);
        assert_eq!(ids(&h.next().await), vec![1]);
        assert_eq!(h.dead.count("events"), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn waits_for_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("later.jsonl");
        let mut h = Harness::start(dir.path(), &path, None);
        let waiting = async {
            while *h.status.state.lock() != "waiting for file" {
                tokio::time::sleep(POLL).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("waiting for the file");
        append(&path, &event(1, None));
        assert_eq!(ids(&h.next().await), vec![1]);
        assert_eq!(*h.status.state.lock(), "streaming");
        h.stop().await;
    }

    #[tokio::test]
    async fn a_file_truncated_while_followed_stops_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        append(&path, &format!("{}{}", event(1, None), event(2, None)));
        let mut h = Harness::start(dir.path(), &path, None);
        assert_eq!(ids(&h.next().await), vec![1]);
        assert_eq!(ids(&h.next().await), vec![2]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let e = h.failure().await;
        assert!(e.contains("truncated or replaced while followed"), "{e}");
    }

    #[test]
    fn new_needs_a_path_and_resolves_it() {
        let config = Config::from_toml(
            Path::new("/etc/fabric/fabric.toml"),
            "[[sources]]\nname = \"events\"\nkind = \"jsonl\"\npath = \"events.jsonl\"\n",
        );
        let config = config.expect("a valid config");
        let cfg = &config.sources[0];
        let s = JsonlSource::new(cfg, &config).unwrap();
        assert_eq!(s.path, Path::new("/etc/fabric/events.jsonl"));
        let mut no_path = cfg.clone();
        no_path.path = None;
        assert!(JsonlSource::new(&no_path, &config).is_err());
    }
}
