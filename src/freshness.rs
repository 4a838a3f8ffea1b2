//! Read-your-writes: reads that wait until the fabric has applied given
//! source positions.
//!
//! A client that wrote to a source (say a PostgreSQL commit, then
//! `pg_current_wal_lsn()`) passes that position as a read's minimum. The
//! read is answered once the entity's partition has applied *every* change
//! of that source up to that position, whether or not the write touched this
//! entity: the answer then reflects the source as of the client's write or
//! later.
//!
//! How the fabric knows: the router hands a source's transactions to the bus
//! in source order, and publishes the source's routed checkpoint only once
//! the bus has acknowledged every record up to it. At that moment it records
//! a [`Mark`]: the position, and per bus partition the offset after the last
//! record acknowledged there. Every change of the source at or before the
//! position is in partition `p` below `ends[p]`, so once the applier of `p`
//! has applied up to `ends[p]`, the partition reflects the position. A
//! source that has nothing to send still reports how far it has read (a
//! PostgreSQL keepalive's WAL end, a MariaDB group of tables not captured),
//! so a position past the client's own write, made by writes the fabric does
//! not capture, is reached too.
//!
//! Marks are kept per source, a bounded number, the newest replacing the last
//! one when they come close together; a minimum is checked against the
//! oldest mark that reaches it. Using a later mark than needed is safe (its
//! offsets are higher): it can only make a read wait a little longer.

use crate::config::SourceKind;
use crate::event::Position;
use crate::event::position::parse_lsn;
use parking_lot::Mutex;
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Positions a read waits for, per source.
pub type Wants = Vec<(Arc<str>, MinPosition)>;

/// Marks kept per source.
const MAX_MARKS: usize = 64;
/// A mark this close to the previous one replaces it.
const COALESCE: Duration = Duration::from_millis(1);

/// A minimum position a read asks for, for one source.
#[derive(Debug, Clone, PartialEq)]
pub enum MinPosition {
    /// Reached by any position of the source at or after this one.
    At(Position),
    /// MariaDB GTIDs (`@@gtid_binlog_pos`): reached when, for each domain,
    /// the source's GTID state has at least this sequence number.
    Gtid(BTreeMap<u32, u64>),
}

impl fmt::Display for MinPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinPosition::At(p) => p.fmt(f),
            MinPosition::Gtid(g) => {
                f.write_str("gtid:")?;
                for (i, (d, s)) in g.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{d}-*-{s}")?;
                }
                Ok(())
            }
        }
    }
}

/// Parses `0-1-42,1-2-7` (domain-server-sequence, as `@@gtid_binlog_pos`
/// prints it) into the sequence per domain.
fn parse_gtids(s: &str) -> Option<BTreeMap<u32, u64>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut it = part.splitn(3, '-');
        let (d, server, seq) = (it.next()?, it.next()?, it.next()?);
        let (d, _, seq): (u32, u32, u64) =
            (d.parse().ok()?, server.parse().ok()?, seq.parse().ok()?);
        let e = out.entry(d).or_insert(seq);
        *e = (*e).max(seq);
    }
    (!out.is_empty()).then_some(out)
}

impl MinPosition {
    /// Parses a position as a client has it for a source of `kind`: the
    /// fabric's own rendering (`lsn:0/16B3748`, `binlog:mysql-bin.000003:1234`,
    /// `seq:42`, `kafka:topic/0=17` …, as responses carry them), or what the
    /// source system prints: a PostgreSQL LSN (`0/16B3748`), a MariaDB GTID
    /// position (`0-1-42`, also `gtid:0-1-42`) or binlog `file:pos`.
    pub fn parse(kind: SourceKind, text: &str) -> Result<MinPosition, String> {
        let text = text.trim();
        let expected = match kind {
            SourceKind::PostgresCdc => "an LSN such as 0/16B3748 (pg_current_wal_lsn())",
            SourceKind::MysqlBinlog => {
                "a GTID position such as 0-1-42 (@@gtid_binlog_pos) or a binlog file:pos"
            }
            SourceKind::DebeziumKafka => "kafka:<topic>/<partition>=<offset>,…",
            SourceKind::SqlPoll => "cursor:<n>",
            SourceKind::Jsonl => "offset:<n>",
            SourceKind::Sqlite | SourceKind::GrpcPush => "seq:<n>",
        };
        let bad = || format!("{text:?} is not a position of this source: expected {expected}");
        if text.starts_with("snapshot:") {
            return Err(format!(
                "{text:?} is a position inside an initial snapshot, not one to wait for: expected {expected}"
            ));
        }
        match kind {
            SourceKind::PostgresCdc if !text.contains(':') => {
                return parse_lsn(text)
                    .map(|l| MinPosition::At(Position::Lsn(l)))
                    .ok_or_else(bad);
            }
            SourceKind::MysqlBinlog => {
                if let Some(g) = text.strip_prefix("gtid:") {
                    return parse_gtids(g).map(MinPosition::Gtid).ok_or_else(bad);
                }
                if !text.contains(':') {
                    return parse_gtids(text).map(MinPosition::Gtid).ok_or_else(bad);
                }
                if !text.starts_with("binlog:") {
                    let (file, pos) = text.rsplit_once(':').ok_or_else(bad)?;
                    let pos = pos.parse().map_err(|_| bad())?;
                    return Ok(MinPosition::At(Position::Binlog {
                        file: file.to_string(),
                        pos,
                        gtid: None,
                    }));
                }
            }
            _ => {}
        }
        let p: Position = text.parse().map_err(|_| bad())?;
        let fits = matches!(
            (kind, &p),
            (SourceKind::PostgresCdc, Position::Lsn(_))
                | (SourceKind::MysqlBinlog, Position::Binlog { .. })
                | (SourceKind::DebeziumKafka, Position::Kafka { .. })
                | (SourceKind::SqlPoll, Position::Cursor(_))
                | (SourceKind::Jsonl, Position::FileOffset(_))
                | (SourceKind::Sqlite | SourceKind::GrpcPush, Position::Seq(_))
        );
        if !fits {
            return Err(bad());
        }
        // A GTID state given in the fabric's rendering counts as GTIDs: they
        // order across binlog files and servers, file:pos does not.
        if let Position::Binlog { gtid: Some(g), .. } = &p
            && let Some(g) = parse_gtids(g)
        {
            return Ok(MinPosition::Gtid(g));
        }
        Ok(MinPosition::At(p))
    }

    /// True when a source at `at` has read at least this far.
    pub fn reached_by(&self, at: &Position) -> bool {
        match self {
            MinPosition::At(want) => {
                matches!(want.partial_cmp(at), Some(Ordering::Less | Ordering::Equal))
            }
            MinPosition::Gtid(want) => {
                let Position::Binlog {
                    gtid: Some(have), ..
                } = at
                else {
                    return false;
                };
                let Some(have) = parse_gtids(have) else {
                    return false;
                };
                want.iter()
                    .all(|(d, seq)| have.get(d).is_some_and(|h| h >= seq))
            }
        }
    }
}

/// A source's routed checkpoint, and where its changes up to it end in each
/// bus partition.
#[derive(Debug, Clone)]
struct Mark {
    position: Position,
    /// Per partition, the offset after the last record of the source (or of
    /// any source: the router's acknowledged end) at or before `position`.
    ends: Arc<[u64]>,
    at: Instant,
}

/// How far each source has been routed onto the bus, for reads that wait.
pub struct Frontiers {
    marks: Mutex<HashMap<Arc<str>, VecDeque<Mark>>>,
    changed: Notify,
}

/// What a read with minimum positions still waits for.
#[derive(Debug, Clone, PartialEq)]
pub enum Behind {
    /// The source has not been read (and routed) that far here yet.
    Source {
        source: Arc<str>,
        want: Box<MinPosition>,
        reached: Option<Box<Position>>,
    },
    /// The partition has not applied every record up to the position yet.
    Partition {
        partition: u32,
        applied: u64,
        needs: u64,
    },
}

impl fmt::Display for Behind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Behind::Source {
                source,
                want,
                reached,
            } => match reached {
                Some(r) => write!(
                    f,
                    "source {source} has been read up to {r} here, not yet {want}"
                ),
                None => write!(
                    f,
                    "source {source} has not been read here yet (is it running in this \
                     process, past its initial snapshot?); waiting for {want}"
                ),
            },
            Behind::Partition {
                partition,
                applied,
                needs,
            } => write!(
                f,
                "bus partition {partition} has applied up to offset {applied}, \
                 needs {needs} to reflect the positions asked"
            ),
        }
    }
}

impl Default for Frontiers {
    fn default() -> Self {
        Frontiers {
            marks: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        }
    }
}

impl Frontiers {
    /// The router published `checkpoints`; every record it acknowledged so
    /// far in partition `p` is below `ends[p]`.
    pub fn reached<'a>(
        &self,
        checkpoints: impl IntoIterator<Item = (&'a Arc<str>, &'a Option<Position>)>,
        ends: &[u64],
    ) {
        let now = Instant::now();
        let mut moved = false;
        let mut shared: Option<Arc<[u64]>> = None;
        let mut marks = self.marks.lock();
        for (source, position) in checkpoints {
            let Some(position) = position else { continue };
            if position.is_snapshot() {
                continue; // Not a position a client can have.
            }
            let ring = marks.entry(source.clone()).or_default();
            if let Some(last) = ring.back()
                && !matches!(last.position.partial_cmp(position), Some(Ordering::Less))
            {
                continue; // Not news (or not comparable: a source that changed kind).
            }
            let ends = shared.get_or_insert_with(|| ends.into()).clone();
            let ends_dbg = ends.clone();
            match ring.back_mut() {
                // Close to the last one: it moves forward (keeping its time,
                // so a new mark is still started every `COALESCE`).
                Some(last) if now.duration_since(last.at) < COALESCE => {
                    last.position = position.clone();
                    last.ends = ends;
                }
                _ => ring.push_back(Mark {
                    position: position.clone(),
                    ends,
                    at: now,
                }),
            }
            if ring.len() > MAX_MARKS {
                ring.pop_front();
            }
            tracing::trace!(%source, %position, ends = ?ends_dbg, "mark");
            moved = true;
        }
        drop(marks);
        if moved {
            self.changed.notify_waiters();
        }
    }

    /// The offset partition `p` must have applied to reflect `want` of
    /// `source`, or what it still waits for at the source.
    fn target(&self, source: &Arc<str>, want: &MinPosition, p: u32) -> Result<u64, Behind> {
        let marks = self.marks.lock();
        let ring = marks.get(source);
        let found = ring
            .into_iter()
            .flatten()
            .find(|m| want.reached_by(&m.position));
        match found {
            Some(m) => Ok(m.ends.get(p as usize).copied().unwrap_or(0)),
            None => Err(Behind::Source {
                source: source.clone(),
                want: Box::new(want.clone()),
                reached: ring
                    .and_then(|r| r.back())
                    .map(|m| Box::new(m.position.clone())),
            }),
        }
    }

    /// The offset partition `p` must have applied to reflect every
    /// position of `wants`, or the first source not read that far yet.
    /// Resolved once per read: marks keep coming under load, and a target
    /// taken again from the newest would move ahead of the applier forever.
    pub fn target_of(&self, wants: &[(Arc<str>, MinPosition)], p: u32) -> Result<u64, Behind> {
        let mut needs = 0;
        for (source, want) in wants {
            needs = needs.max(self.target(source, want, p)?);
        }
        Ok(needs)
    }

    /// `Ok` when partition `p`, having applied up to `applied`, reflects
    /// every position of `wants`.
    pub fn check(
        &self,
        wants: &[(Arc<str>, MinPosition)],
        p: u32,
        applied: u64,
    ) -> Result<(), Behind> {
        let needs = self.target_of(wants, p)?;
        if applied >= needs {
            Ok(())
        } else {
            Err(Behind::Partition {
                partition: p,
                applied,
                needs,
            })
        }
    }

    /// Resolves when marks were added after it was made (and enabled).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// The minimum positions of a request, checked against the config: each
/// names a configured source and parses as one of its positions.
pub fn parse_request(
    config: &crate::config::Config,
    asked: &[crate::proto::SourcePosition],
) -> Result<Vec<(Arc<str>, MinPosition)>, tonic::Status> {
    asked
        .iter()
        .map(|sp| {
            let source = config
                .sources
                .iter()
                .find(|s| s.name == sp.source)
                .ok_or_else(|| {
                    let known: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
                    tonic::Status::invalid_argument(format!(
                        "min_positions: unknown source {:?} (sources: {})",
                        sp.source,
                        known.join(", ")
                    ))
                })?;
            let want = MinPosition::parse(source.kind, &sp.position).map_err(|e| {
                tonic::Status::invalid_argument(format!(
                    "min_positions: source {}: {e}",
                    source.name
                ))
            })?;
            Ok((Arc::<str>::from(source.name.as_str()), want))
        })
        .collect()
}

/// Waits until partition `p` reflects every position of `wants`, or
/// `until`: then `DEADLINE_EXCEEDED`, saying how far it got.
pub async fn wait(
    fabric: &crate::app::Fabric,
    wants: &[(Arc<str>, MinPosition)],
    p: u32,
    until: std::time::Instant,
) -> Result<(), tonic::Status> {
    use std::sync::atomic::Ordering::Acquire;
    if wants.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    let state = &fabric.partitions[p as usize];
    let mut needs: Option<u64> = None;
    loop {
        // Registered before looking, so a change in between still wakes us.
        let on_mark = fabric.frontiers.changed();
        let on_apply = state.advanced.notified();
        tokio::pin!(on_mark, on_apply);
        on_mark.as_mut().enable();
        on_apply.as_mut().enable();
        let behind = match needs.map_or_else(|| fabric.frontiers.target_of(wants, p), Ok) {
            Err(b) => b,
            Ok(n) => {
                needs = Some(n);
                let applied = state.applied.load(Acquire);
                if applied >= n {
                    tracing::debug!(
                        partition = p,
                        applied,
                        needs = n,
                        waited_us = started.elapsed().as_micros() as u64,
                        "positions reached"
                    );
                    return Ok(());
                }
                Behind::Partition {
                    partition: p,
                    applied,
                    needs: n,
                }
            }
        };
        tokio::select! {
            _ = &mut on_mark, if needs.is_none() => {}
            _ = &mut on_apply, if needs.is_some() => {}
            // Whatever moved without a notice (a partition restored).
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(until.into()) => {
                return Err(tonic::Status::deadline_exceeded(format!(
                    "the positions asked were not applied within {} ms: {behind}",
                    started.elapsed().as_millis()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cps(source: &Arc<str>, p: Position) -> Vec<(Arc<str>, Option<Position>)> {
        vec![(source.clone(), Some(p))]
    }

    #[test]
    fn parses_what_clients_have() {
        use SourceKind::*;
        assert_eq!(
            MinPosition::parse(PostgresCdc, "16/B374D848").unwrap(),
            MinPosition::At(Position::Lsn(0x16_B374_D848))
        );
        assert_eq!(
            MinPosition::parse(PostgresCdc, "lsn:0/5").unwrap(),
            MinPosition::At(Position::Lsn(5))
        );
        assert_eq!(
            MinPosition::parse(MysqlBinlog, "0-1-42,1-2-7").unwrap(),
            MinPosition::Gtid([(0, 42), (1, 7)].into())
        );
        assert_eq!(
            MinPosition::parse(MysqlBinlog, "binlog:mysql-bin.000003:1234:gtid:0-1-9").unwrap(),
            MinPosition::Gtid([(0, 9)].into())
        );
        assert_eq!(
            MinPosition::parse(MysqlBinlog, "mysql-bin.000003:1234").unwrap(),
            MinPosition::At(Position::Binlog {
                file: "mysql-bin.000003".into(),
                pos: 1234,
                gtid: None
            })
        );
        assert_eq!(
            MinPosition::parse(GrpcPush, "seq:9").unwrap(),
            MinPosition::At(Position::Seq(9))
        );
        for (kind, bad) in [
            (PostgresCdc, "seq:4"),
            (PostgresCdc, "zz/1"),
            (MysqlBinlog, "0-x-1"),
            (GrpcPush, "lsn:0/1"),
            (Sqlite, "snapshot:3"),
            (DebeziumKafka, "kafka:t/0"),
        ] {
            let e = MinPosition::parse(kind, bad).unwrap_err();
            assert!(e.contains("expected") || e.contains("snapshot"), "{e}");
        }
    }

    #[test]
    fn gtids_compare_per_domain() {
        let at = |g: &str| Position::Binlog {
            file: "b.000001".into(),
            pos: 4,
            gtid: Some(g.into()),
        };
        let want = MinPosition::parse(SourceKind::MysqlBinlog, "0-1-42").unwrap();
        assert!(want.reached_by(&at("0-1-42")));
        assert!(want.reached_by(&at("0-2-50,1-1-3")));
        assert!(!want.reached_by(&at("0-1-41")));
        assert!(!want.reached_by(&at("1-1-100")));
    }

    #[test]
    fn a_minimum_maps_to_the_first_mark_that_reaches_it() {
        let f = Frontiers::default();
        let s: Arc<str> = "pg".into();
        let want = |l| vec![(s.clone(), MinPosition::At(Position::Lsn(l)))];
        // Nothing read yet: the source is what is waited for.
        assert!(matches!(
            f.check(&want(10), 0, 0),
            Err(Behind::Source { reached: None, .. })
        ));
        f.reached(
            cps(&s, Position::Lsn(10)).iter().map(|(a, b)| (a, b)),
            &[3, 7],
        );
        std::thread::sleep(COALESCE * 2);
        f.reached(
            cps(&s, Position::Lsn(20)).iter().map(|(a, b)| (a, b)),
            &[5, 9],
        );
        // Position 10 needs partition 1 at offset 7, not 9.
        assert_eq!(f.check(&want(10), 1, 7), Ok(()));
        assert_eq!(
            f.check(&want(11), 1, 7),
            Err(Behind::Partition {
                partition: 1,
                applied: 7,
                needs: 9
            })
        );
        assert_eq!(f.check(&want(20), 0, 5), Ok(()));
        let e = f.check(&want(21), 0, 100).unwrap_err();
        assert_eq!(
            e,
            Behind::Source {
                source: s.clone(),
                want: Box::new(MinPosition::At(Position::Lsn(21))),
                reached: Some(Box::new(Position::Lsn(20)))
            }
        );
        assert!(e.to_string().contains("lsn:0/14"), "{e}");
        // An older position than anything kept maps to the oldest mark.
        assert_eq!(f.check(&want(1), 1, 7), Ok(()));
        // Marks never go back.
        f.reached(
            cps(&s, Position::Lsn(15)).iter().map(|(a, b)| (a, b)),
            &[50, 50],
        );
        assert_eq!(f.check(&want(20), 0, 5), Ok(()));
    }

    #[test]
    fn marks_are_bounded() {
        let f = Frontiers::default();
        let s: Arc<str> = "pg".into();
        for l in 1..=(MAX_MARKS as u64 * 3) {
            f.reached(cps(&s, Position::Lsn(l)).iter().map(|(a, b)| (a, b)), &[l]);
        }
        assert!(f.marks.lock()[&s].len() <= MAX_MARKS);
        let want = vec![(
            s.clone(),
            MinPosition::At(Position::Lsn(MAX_MARKS as u64 * 3)),
        )];
        assert_eq!(f.check(&want, 0, MAX_MARKS as u64 * 3), Ok(()));
    }
}
