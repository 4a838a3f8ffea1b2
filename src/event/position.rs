//! Source positions and checkpoints.
//!
//! A position says where a source is in its own log. Positions of one source
//! are totally ordered; checkpoints only move forward.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A position in one source's change stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Position {
    /// A sequence number: a SQLite changelog `seq`, a push client's sequence.
    Seq(u64),
    /// A byte offset in a file: the offset right after the last line read.
    FileOffset(u64),
    /// Chunk `n` of an initial snapshot still in progress. Resuming from it
    /// restarts the snapshot: only the last chunk carries the stream position
    /// that may be resumed from.
    Snapshot(u64),
    /// A PostgreSQL WAL position (the end LSN of a committed transaction).
    Lsn(u64),
    /// A MySQL/MariaDB binlog position: the event after the last one read.
    /// `gtid` is the GTID state at that point when the server has GTIDs.
    Binlog {
        file: String,
        pos: u64,
        gtid: Option<String>,
    },
    /// A polling cursor: the safe cursor, at or below which every row version
    /// has been handed on (integers as is, timestamps as microseconds since
    /// the epoch).
    Cursor(i64),
    /// Offsets in Kafka topics (a `debezium_kafka` source): per
    /// `topic/partition`, the next offset to read. `at` is the partition of
    /// the message this position was made for (empty in a merged position).
    /// Positions compare partition by partition, so two may not compare.
    Kafka {
        next: BTreeMap<String, u64>,
        at: String,
    },
}

impl Position {
    /// True for the position of an initial snapshot still in progress.
    pub fn is_snapshot(&self) -> bool {
        matches!(self, Position::Snapshot(_))
    }

    /// True when changes at this position carry rows as they are now (a
    /// snapshot read, a poll), not a log entry to be replayed in order: such
    /// changes are never skipped as replays of older ones.
    pub fn reads_current_state(&self) -> bool {
        matches!(self, Position::Snapshot(_) | Position::Cursor(_))
    }

    /// True when a change at this position is a replay of something older
    /// than `seen`, the position an entity already reflects from the same
    /// source. For Kafka positions only the message's own partition counts:
    /// two messages of different partitions are not ordered.
    pub fn is_older_than(&self, seen: &Position) -> bool {
        match (self, seen) {
            (Position::Kafka { next, at }, Position::Kafka { next: seen, .. }) => {
                match (next.get(at), seen.get(at)) {
                    (Some(mine), Some(theirs)) => mine < theirs,
                    _ => false,
                }
            }
            _ => self < seen,
        }
    }

    /// The position an entity reflects after a change at `self`, having
    /// reflected `seen` before: `self`, except for Kafka positions, where
    /// each partition keeps the furthest offset of either.
    pub fn merged_with(&self, seen: Option<&Position>) -> Position {
        match (self, seen) {
            (Position::Kafka { next, .. }, Some(Position::Kafka { next: old, .. })) => {
                let mut merged = old.clone();
                for (tp, o) in next {
                    let e = merged.entry(tp.clone()).or_insert(*o);
                    *e = (*e).max(*o);
                }
                Position::Kafka {
                    next: merged,
                    at: String::new(),
                }
            }
            _ => self.clone(),
        }
    }
}

/// Compares two offset maps partition by partition (a missing partition is
/// at offset 0): `Some` only when one is at or past the other everywhere.
fn compare_offsets(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> Option<Ordering> {
    let mut less = false;
    let mut greater = false;
    for tp in a.keys().chain(b.keys()) {
        let (x, y) = (
            a.get(tp).copied().unwrap_or(0),
            b.get(tp).copied().unwrap_or(0),
        );
        less |= x < y;
        greater |= x > y;
    }
    match (less, greater) {
        (false, false) => Some(Ordering::Equal),
        (true, false) => Some(Ordering::Less),
        (false, true) => Some(Ordering::Greater),
        (true, true) => None,
    }
}

impl PartialOrd for Position {
    /// Positions of one kind compare by number. A snapshot in progress comes
    /// before every stream position (it is where a source starts over), so
    /// the lowest of two checkpoints of one source is always found. A
    /// sequence and a file offset (a source whose kind changed) do not compare.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        use Position::*;
        match (self, other) {
            (Seq(a), Seq(b))
            | (FileOffset(a), FileOffset(b))
            | (Snapshot(a), Snapshot(b))
            | (Lsn(a), Lsn(b)) => Some(a.cmp(b)),
            (Cursor(a), Cursor(b)) => Some(a.cmp(b)),
            (Kafka { next: a, .. }, Kafka { next: b, .. }) => compare_offsets(a, b),
            (
                Binlog {
                    file: fa, pos: pa, ..
                },
                Binlog {
                    file: fb, pos: pb, ..
                },
            ) => Some(
                binlog_seq(fa)
                    .cmp(&binlog_seq(fb))
                    .then(fa.cmp(fb))
                    .then(pa.cmp(pb)),
            ),
            (Snapshot(_), _) => Some(Ordering::Less),
            (_, Snapshot(_)) => Some(Ordering::Greater),
            _ => None,
        }
    }
}

/// The sequence number of a binlog file name (`mysql-bin.000042` -> 42), so
/// that rotation past `999999` still orders.
pub fn binlog_seq(file: &str) -> u64 {
    file.rsplit('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Formats an LSN as PostgreSQL does: `16/B374D848`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses PostgreSQL's `16/B374D848`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Seq(s) => write!(f, "seq:{s}"),
            Position::FileOffset(o) => write!(f, "offset:{o}"),
            Position::Snapshot(n) => write!(f, "snapshot:{n}"),
            Position::Lsn(l) => write!(f, "lsn:{}", format_lsn(*l)),
            Position::Binlog { file, pos, gtid } => match gtid {
                Some(g) => write!(f, "binlog:{file}:{pos}:gtid:{g}"),
                None => write!(f, "binlog:{file}:{pos}"),
            },
            Position::Cursor(c) => write!(f, "cursor:{c}"),
            Position::Kafka { next, .. } => {
                f.write_str("kafka:")?;
                for (i, (tp, o)) in next.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{tp}={o}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, n) = s
            .split_once(':')
            .ok_or_else(|| format!("position {s:?} has no kind prefix"))?;
        match kind {
            "lsn" => {
                return parse_lsn(n)
                    .map(Position::Lsn)
                    .ok_or_else(|| format!("position {s:?} has a bad lsn"));
            }
            "binlog" => {
                let (rest, gtid) = match n.split_once(":gtid:") {
                    Some((r, g)) => (r, Some(g.to_string())),
                    None => (n, None),
                };
                let (file, pos) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| format!("position {s:?} is not binlog:<file>:<pos>"))?;
                let pos = pos
                    .parse()
                    .map_err(|_| format!("position {s:?} has a bad binlog offset"))?;
                return Ok(Position::Binlog {
                    file: file.to_string(),
                    pos,
                    gtid,
                });
            }
            "cursor" => {
                return n
                    .parse()
                    .map(Position::Cursor)
                    .map_err(|_| format!("position {s:?} has a bad cursor"));
            }
            "kafka" => {
                let mut next = BTreeMap::new();
                for part in n.split(',').filter(|p| !p.is_empty()) {
                    let (tp, o) = part.rsplit_once('=').ok_or_else(|| {
                        format!("position {s:?} is not kafka:<topic>/<partition>=<offset>,…")
                    })?;
                    let o = o
                        .parse()
                        .map_err(|_| format!("position {s:?} has a bad offset"))?;
                    next.insert(tp.to_string(), o);
                }
                return Ok(Position::Kafka {
                    next,
                    at: String::new(),
                });
            }
            _ => {}
        }
        let n: u64 = n
            .parse()
            .map_err(|_| format!("position {s:?} has a bad number"))?;
        match kind {
            "seq" => Ok(Position::Seq(n)),
            "offset" => Ok(Position::FileOffset(n)),
            "snapshot" => Ok(Position::Snapshot(n)),
            _ => Err(format!("position {s:?} has an unknown kind")),
        }
    }
}

/// The checkpoint of each source: the position it may resume from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoints(pub BTreeMap<String, Position>);

impl Checkpoints {
    /// Moves `source` forward to `pos`. A regression is refused and reported.
    pub fn advance(&mut self, source: &str, pos: Position) -> Result<(), String> {
        match self.0.get(source) {
            Some(old) if pos < *old => Err(format!(
                "checkpoint of source {source} would move back from {old} to {pos}"
            )),
            _ => {
                self.0.insert(source.to_string(), pos);
                Ok(())
            }
        }
    }

    pub fn get(&self, source: &str) -> Option<&Position> {
        self.0.get(source)
    }

    /// The position safe for every set in `all`: per source the lowest one;
    /// a source missing from any set, or whose positions do not compare, is
    /// missing from the result (it starts over).
    pub fn lowest<'a>(all: impl IntoIterator<Item = &'a Checkpoints>) -> Checkpoints {
        let mut iter = all.into_iter();
        let Some(first) = iter.next() else {
            return Checkpoints::default();
        };
        let mut out = first.clone();
        for cp in iter {
            out.0.retain(|source, pos| match cp.0.get(source) {
                // Offset maps meet partition by partition; a partition one of
                // them has not read is dropped (read from its beginning).
                Some(Position::Kafka { next: other, .. })
                    if matches!(pos, Position::Kafka { .. }) =>
                {
                    if let Position::Kafka { next, at } = pos {
                        next.retain(|tp, o| match other.get(tp) {
                            Some(x) => {
                                *o = (*o).min(*x);
                                true
                            }
                            None => false,
                        });
                        at.clear();
                    }
                    true
                }
                Some(other) => match other.partial_cmp(pos) {
                    Some(Ordering::Less) => {
                        *pos = other.clone();
                        true
                    }
                    Some(_) => true,
                    None => false,
                },
                None => false,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(pairs: &[(&str, u64)], at: &str) -> Position {
        Position::Kafka {
            next: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            at: at.into(),
        }
    }

    #[test]
    fn kafka_positions_compare_by_own_partition_and_merge() {
        // An entity saw t/0 up to 6 and t/1 up to 5.
        let seen = kafka(&[("t/0", 6), ("t/1", 5)], "");
        // A replay of t/0 offset 4, read after t/1 went further elsewhere.
        let replay = kafka(&[("t/0", 5), ("t/1", 9)], "t/0");
        assert!(replay.is_older_than(&seen));
        assert_eq!(replay.partial_cmp(&seen), None);
        // A new message of t/1.
        let new = kafka(&[("t/0", 3), ("t/1", 6)], "t/1");
        assert!(!new.is_older_than(&seen));
        assert_eq!(
            new.merged_with(Some(&seen)),
            kafka(&[("t/0", 6), ("t/1", 6)], "")
        );
        let text = seen.to_string();
        assert_eq!(text, "kafka:t/0=6,t/1=5");
        assert_eq!(text.parse::<Position>().unwrap(), seen);
        // Checkpoints that do not compare meet partition by partition.
        let mut a = Checkpoints::default();
        a.advance("k", kafka(&[("t/0", 6), ("t/1", 2)], "t/0"))
            .unwrap();
        let mut b = Checkpoints::default();
        b.advance("k", kafka(&[("t/0", 3), ("t/1", 5), ("t/2", 9)], "t/1"))
            .unwrap();
        // t/2 is read from its beginning: one of them had not read it.
        assert_eq!(
            Checkpoints::lowest([&a, &b]).get("k"),
            Some(&kafka(&[("t/0", 3), ("t/1", 2)], ""))
        );
        assert_eq!(
            Checkpoints::lowest([&b, &a]).get("k"),
            Some(&kafka(&[("t/0", 3), ("t/1", 2)], ""))
        );
    }

    #[test]
    fn checkpoints_refuse_regression() {
        let mut c = Checkpoints::default();
        c.advance("a", Position::Seq(5)).unwrap();
        c.advance("a", Position::Seq(7)).unwrap();
        assert!(c.advance("a", Position::Seq(6)).is_err());
        assert_eq!(c.get("a"), Some(&Position::Seq(7)));
    }

    #[test]
    fn lowest_takes_minimum_and_drops_missing() {
        let mut a = Checkpoints::default();
        a.advance("s", Position::Seq(10)).unwrap();
        a.advance("t", Position::Seq(3)).unwrap();
        let mut b = Checkpoints::default();
        b.advance("s", Position::Seq(4)).unwrap();
        let low = Checkpoints::lowest([&a, &b]);
        assert_eq!(low.get("s"), Some(&Position::Seq(4)));
        assert_eq!(low.get("t"), None);
    }

    #[test]
    fn a_snapshot_in_progress_is_lower_than_any_stream_position() {
        let mut a = Checkpoints::default();
        a.advance("s", Position::Seq(500)).unwrap();
        let mut b = Checkpoints::default();
        b.advance("s", Position::Snapshot(3)).unwrap();
        assert_eq!(
            Checkpoints::lowest([&a, &b]).get("s"),
            Some(&Position::Snapshot(3))
        );
        assert_eq!(
            Checkpoints::lowest([&b, &a]).get("s"),
            Some(&Position::Snapshot(3))
        );
        let mut c = Checkpoints::default();
        c.advance("s", Position::FileOffset(1)).unwrap();
        assert_eq!(Checkpoints::lowest([&a, &c]).get("s"), None);
    }

    #[test]
    fn lsns_and_binlog_positions_order() {
        assert_eq!(Position::Lsn(5).to_string(), "lsn:0/5");
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        let b = |f: &str, p| Position::Binlog {
            file: f.into(),
            pos: p,
            gtid: None,
        };
        assert!(b("bin.000002", 4) > b("bin.000001", 900));
        assert!(b("bin.1000000", 4) > b("bin.999999", 900));
        assert!(b("bin.000002", 5) > b("bin.000002", 4));
        assert!(Position::Snapshot(9) < b("bin.000001", 0));
    }

    #[test]
    fn position_round_trips_text() {
        for p in [
            Position::Seq(9),
            Position::FileOffset(123),
            Position::Snapshot(2),
        ] {
            assert_eq!(p.to_string().parse::<Position>().unwrap(), p);
        }
    }
}
