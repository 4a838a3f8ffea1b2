//! Change events: typed values, rows, source positions and transactions.
//!
//! A source reads its system of record and hands [`SourceTxn`]s to the router.
//! The router turns each transaction into one [`EntityChangeSet`] per entity it
//! touches; that set is the unit the bus carries and the applier applies
//! atomically (one version step per set).

pub mod position;
pub mod value;

pub use position::{Checkpoints, Position};
pub use value::{Row, Value};

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A row read by an initial snapshot; applied as an upsert.
    Read,
    Insert,
    Update,
    Delete,
    /// Every row of the table is gone.
    Truncate,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// One row change read from a source table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowChange {
    /// The source table as the source names it (e.g. `main.customers`).
    pub table: String,
    pub op: Op,
    /// The row before the change: set for deletes (at least its key) and,
    /// when the source has it, for updates.
    pub before: Option<Row>,
    /// The row after the change: set for reads, inserts and updates.
    pub after: Option<Row>,
}

impl RowChange {
    /// A row as read by an initial snapshot.
    pub fn read(table: &str, row: Row) -> Self {
        RowChange {
            table: table.to_string(),
            op: Op::Read,
            before: None,
            after: Some(row),
        }
    }

    /// Every row of `table` is gone.
    pub fn truncate(table: &str) -> Self {
        RowChange {
            table: table.to_string(),
            op: Op::Truncate,
            before: None,
            after: None,
        }
    }

    /// The image that identifies the row: `after` when present, else `before`.
    pub fn image(&self) -> Option<&Row> {
        self.after.as_ref().or(self.before.as_ref())
    }
}

/// One source transaction: everything a source committed atomically, with the
/// position to resume from once it is durable.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceTxn {
    /// The configured source name.
    pub source: Arc<str>,
    /// The position *after* this transaction: resuming from it skips it.
    pub position: Position,
    /// Commit time at the source, microseconds since the Unix epoch.
    pub commit_micros: i64,
    pub changes: Vec<RowChange>,
}

/// The longest entity id, in bytes: the gRPC API refuses a longer one
/// (INVALID_ARGUMENT: ids are Kafka keys and log fields, not payloads), and
/// the router dead-letters a source row that would make one (an entity no
/// call could read or forget).
pub const MAX_ID_BYTES: usize = 1024;

/// The key of one entity: its type and its id in canonical text form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityKey {
    pub entity_type: Arc<str>,
    pub id: Arc<str>,
}

impl EntityKey {
    pub fn new(entity_type: impl Into<Arc<str>>, id: impl Into<Arc<str>>) -> Self {
        EntityKey {
            entity_type: entity_type.into(),
            id: id.into(),
        }
    }

    /// The bus key, `<type>/<id>`.
    pub fn bus_key(&self) -> String {
        format!("{}/{}", self.entity_type, self.id)
    }

    /// The partition of this key among `partitions`, the same for every bus
    /// and for the store's shards: Kafka's default partitioner (murmur2 of the
    /// `<type>/<id>` key), so that other Kafka producers agree with us.
    pub fn partition(&self, partitions: u32) -> u32 {
        // The `<type>/<id>` bytes on the stack when short (every apply and
        // every read asks), instead of a formatted string each time.
        let (t, id) = (self.entity_type.as_bytes(), self.id.as_bytes());
        let len = t.len() + 1 + id.len();
        let mut buf = [0u8; 128];
        if len <= buf.len() {
            buf[..t.len()].copy_from_slice(t);
            buf[t.len()] = b'/';
            buf[t.len() + 1..len].copy_from_slice(id);
            partition_for(&buf[..len], partitions)
        } else {
            partition_for(self.bus_key().as_bytes(), partitions)
        }
    }
}

impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.entity_type, self.id)
    }
}

/// Kafka's default partitioner: `toPositive(murmur2(key)) % partitions`.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    debug_assert!(partitions > 0);
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's murmur2 (seed 0x9747b28c), as in `org.apache.kafka.common.utils.Utils`.
fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= (rest[2] as u32) << 16;
    }
    if rest.len() >= 2 {
        h ^= (rest[1] as u32) << 8;
    }
    if !rest.is_empty() {
        h ^= rest[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// A change to one micro-DB table, resolved by the router.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableChange {
    /// The micro-DB table name (the entity type's `tables[].name`).
    pub table: Arc<str>,
    pub op: Op,
    /// The primary key of the row, in the table's key column order.
    /// Empty for truncate.
    pub pk: Vec<Value>,
    /// The full row after the change (reads, inserts, updates).
    pub row: Option<Row>,
}

/// The part of one source transaction that touches one entity: the unit the
/// bus carries and the applier applies atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityChangeSet {
    pub key: EntityKey,
    /// The source whose transaction this is.
    pub source: Arc<str>,
    /// That transaction's position (see [`SourceTxn::position`]).
    pub position: Position,
    pub commit_micros: i64,
    pub changes: Vec<TableChange>,
    /// True when the entity's root row was deleted and the entity type deletes
    /// entities with their root.
    pub delete_entity: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }

    #[test]
    fn partition_is_stable_and_in_range() {
        let k = EntityKey::new("customer", "42");
        let p = k.partition(8);
        assert!(p < 8);
        assert_eq!(p, EntityKey::new("customer", "42").partition(8));
    }

    #[test]
    fn partition_is_that_of_the_bus_key_for_short_and_long_ids() {
        for id in [
            "7".to_string(),
            "x".repeat(118),
            "y".repeat(119),
            "z".repeat(500),
        ] {
            let k = EntityKey::new("customer", id);
            for n in [1, 8, 13] {
                assert_eq!(k.partition(n), partition_for(k.bus_key().as_bytes(), n));
            }
        }
    }
}

/// A source TRUNCATE of a table that feeds `table` of `entity_type`: every
/// partition receives it and clears that table in each of its entities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruncateTable {
    pub entity_type: Arc<str>,
    pub table: Arc<str>,
    pub source: Arc<str>,
    pub position: Position,
    pub commit_micros: i64,
}

/// Rows of one table as fetched: primary key (in key order) and row.
pub type FetchedRows = Vec<(Vec<Value>, Row)>;

/// One entity's rows as read straight from its sources (a fetch): each
/// listed micro-DB table is replaced by exactly these rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchedEntity {
    pub key: EntityKey,
    /// Per micro-DB table read, every row the source holds for the entity
    /// now: primary key (in the table's key order) and row.
    pub tables: Vec<(Arc<str>, FetchedRows)>,
    /// The type's root table when the entity goes with its root row
    /// (`delete_with_root`): without a root row there is no entity.
    pub root: Option<Arc<str>>,
    /// When the rows were read, microseconds since the Unix epoch.
    pub fetched_micros: i64,
}

/// An erasure request for one entity (`ForgetEntity`, `UnblockEntity`),
/// keyed by it: it travels through the entity's partition like its
/// changes, so everything before it is applied and then erased, and
/// whatever comes after it finds the entity forgotten, on every replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Erasure {
    pub key: EntityKey,
    pub action: EraseAction,
    /// When it was asked, microseconds since the Unix epoch.
    pub at_micros: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EraseAction {
    /// Remove the entity; with `block`, drop every later change of it.
    Forget { block: bool },
    /// Let later changes build a forgotten entity again.
    Unblock,
}

/// What the bus carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BusRecord {
    /// Changes to one entity, keyed by it.
    Changes(EntityChangeSet),
    /// A table truncation, sent to every partition.
    Truncate(TruncateTable),
    /// An entity read straight from its sources, keyed by it.
    Fetched(FetchedEntity),
    /// An entity forgotten or unblocked on request, keyed by it.
    Erase(Erasure),
    /// A record on the bus this fabric could not read (written by something
    /// else, or by an incompatible version). Never written: made by the Kafka
    /// consumer in its place after it went to the dead-letter output, so the
    /// applier's offsets stay dense.
    #[serde(skip)]
    Unreadable,
}
