//! The state topic, `<prefix>.state`: every micro-DB as it is now, so that a
//! process given a partition restores it from the broker instead of needing
//! the disk of the process that held it before, or the whole history of the
//! changes topic.
//!
//! Partition `p` of the topic mirrors bus partition `p`, compacted, so the
//! topic holds the newest of every key. An entity is several records:
//!
//! - one per row, key `!row/` + the entity's `<type>/<id>`, the table and
//!   the row's primary key (each length-prefixed or self-delimiting, so no
//!   two rows share a key), value the format byte 4 and the row with its
//!   lineage in postcard encoding; a tombstone when the row leaves the
//!   entity;
//! - its header, key `<type>/<id>`, value the format byte 5 and its
//!   version, source positions, commit time, whether it keeps lineage and
//!   when it retired (deleted at its sources, kept hidden: see
//!   `Entity::gone_micros`; format 3, still read, had no retirement); a
//!   tombstone when the entity is forgotten or dropped (its rows'
//!   tombstones go first);
//! - the key `!floor`: the highest version of a retired entity the
//!   partition dropped, as text (a new entity starts above it).
//!
//! A change writes the rows it changed and the header, not the whole
//! micro-DB: the applier diffs each entity's version before the batch with
//! its version after (tables shared between the two versions are skipped
//! without a look), so a change to one row of a 20-row entity writes two
//! records, not 21 rows. Builds before this one wrote the whole entity as
//! one record under the header's key (formats 2 and 1, the latter without
//! lineage); those are still read, and the first write of such an entity
//! writes all its rows, since its header replaces the old record.
//!
//! After each applied batch the applier also writes the key [`OFFSET_KEY`]
//! with the bus offset the partition's state now reflects. Both go before
//! the batch counts as applied (as the entities topic does), through one
//! idempotent producer, in order: so when the newest offset record says
//! `o`, every record of the changes below `o` is on the topic before it,
//! and every record after it belongs to a batch whose writer stopped before
//! finishing it. A reader ignores those: the entities it returns are
//! exactly the state at `o`, never an entity with half a change's rows.
//! The process taking the partition over then writes the keys of that
//! unfinished batch back to their state at `o` (or tombstones them) before
//! it writes anything else, so they cannot count later. (One case is out of
//! reach: Kafka's cleaner may drop a row's record at or below `o` once an
//! unfinished batch wrote the same key, but only after the batch's segment
//! is closed, which takes more writes to the partition, and the next
//! holder's first writes are those repairs.)
//!
//! A forgotten entity is a deletion like any other; when its later changes
//! are blocked, the key `!blocked/<type>/<id>` holds when it was forgotten
//! (decimal microseconds), written with the batch that forgot it and removed
//! (tombstone) when it is unblocked: a process restoring the partition from
//! the topic keeps it blocked.
//!
//! The topic deleted under a running fabric: records the broker refuses
//! for the lost partition are sent again and held until it exists (the
//! applier waits, reads go on). Once it is made again, writes land at
//! offsets this process wrote before: the writer notices, skips that
//! batch's offset record, and the applier writes the whole partition
//! before anything else, so a restore from the new partition is exact. A
//! batch with nothing to write sends a tombstone of [`PROBE_KEY`] first, so
//! that its offset record is never what reveals a new partition.
//!
//! Entity types synced on access are not written: wherever they are served,
//! an entity is fetched from its sources on its first read, and one evicted
//! from memory would leave rows on the topic that no diff removes.
//!
//! Restore of partition `p`: read the partition from its start to its end
//! now; the entities are the state at the last offset record's `o`; the
//! changes topic is replayed from `o` (a record applied twice is applied
//! once). A process prefers its local snapshot when that is newer.

use crate::bus::BusError;
use crate::bus::kafka::{self, Producer, client_config, durable_producer, ensure_topic};
use crate::config::KafkaConfig;
use crate::event::{EntityKey, Position};
use crate::store::{Entity, EntityChange, Pk, RowLineage, StoredRow, TableRows};
use litemap::LiteMap;
use rdkafka::Message;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The key of the per-partition offset record.
pub const OFFSET_KEY: &str = "!offset";
/// The prefix of a blocked id's key.
pub const BLOCKED_PREFIX: &str = "!blocked/";
/// The key of the partition's floor: the highest version of a retired
/// entity it dropped (as text); a new entity starts above it.
const FLOOR_KEY: &[u8] = b"!floor";
/// The prefix of a row's key.
const ROW_PREFIX: &[u8] = b"!row/";
/// Written (a tombstone) by a batch with nothing else to write, before its
/// offset record: see `StateTopic::send`.
const PROBE_KEY: &[u8] = b"!probe";
/// A whole entity in postcard encoding without row lineage (builds before
/// lineage): still read.
const FORMAT_POSTCARD_V1: u8 = 1;
/// A whole entity in postcard encoding (builds before rows had records of
/// their own): still read.
const FORMAT_POSTCARD: u8 = 2;
/// An entity's header.
const FORMAT_HEADER_V3: u8 = 3;
/// An entity's header with when it retired (format 3 had no retirement).
const FORMAT_HEADER: u8 = 5;
/// One row of an entity.
const FORMAT_ROW: u8 = 4;

/// A record to write: key, and value (`None`: a tombstone).
type Record = (Vec<u8>, Option<Vec<u8>>);

pub struct StateTopic {
    topic: String,
    client: rdkafka::ClientConfig,
    producer: Producer,
    /// Entity types not written (synced on access).
    skip: HashSet<Arc<str>>,
    /// Entities read in a whole-entity format and not written since.
    legacy: parking_lot::Mutex<HashSet<EntityKey>>,
    /// Per partition, the highest offset this process's writes landed at:
    /// a write landing at or below it finds the partition made again.
    ends: parking_lot::Mutex<HashMap<u32, i64>>,
    /// Per partition, the floor last written (or read).
    floors: parking_lot::Mutex<HashMap<u32, u64>>,
}

/// What a partition of the state topic holds.
#[derive(Debug)]
pub struct Restored {
    /// The bus offset the entities reflect.
    pub offset: u64,
    pub entities: Vec<Entity>,
    /// Forgotten ids whose changes are blocked, and when each was forgotten.
    pub blocked: Vec<(EntityKey, i64)>,
    /// The highest version of a retired entity the partition dropped.
    pub floor: u64,
}

impl StateTopic {
    /// Connects, creating the topic (compacted, `partitions` partitions)
    /// when it is missing. Entities of the `skip` types are never written.
    pub async fn connect(
        k: &KafkaConfig,
        partitions: u32,
        skip: HashSet<Arc<str>>,
    ) -> Result<Self, BusError> {
        let client = client_config(&k.brokers, &k.properties);
        let topic = k.topic("state");
        ensure_topic(
            &client,
            &topic,
            partitions,
            k.replication,
            &[("cleanup.policy", "compact")],
        )
        .await?;
        Ok(StateTopic {
            producer: durable_producer(&client)?,
            topic,
            client,
            skip,
            legacy: Default::default(),
            ends: Default::default(),
            floors: Default::default(),
        })
    }

    /// Writes what `changes` changed in `partition` (each entity from its
    /// version before the first of its changes to its version after the
    /// last), the headers of the `unchanged` entities (as they are now:
    /// applied changes moved their source positions and nothing else), the
    /// blocked ids `marks` set or lift, the partition's `floor` when it
    /// rose, and then the offset the partition reflects; resolves once the
    /// broker has them all. `Ok(false)` when
    /// the partition turns out to have been deleted and made again (its
    /// offsets began anew): it lacks what earlier writes put there, and
    /// [`StateTopic::write_whole`] must follow before anything else.
    pub async fn write(
        &self,
        partition: u32,
        changes: &[Arc<EntityChange>],
        unchanged: &[Arc<Entity>],
        marks: &[super::applier::Mark],
        floor: u64,
        offset: u64,
    ) -> Result<bool, BusError> {
        // Per entity, in the order first changed: its version before the
        // batch and after it.
        let mut order: Vec<&EntityKey> = Vec::new();
        let mut span: HashMap<&EntityKey, (Option<&Entity>, Option<&Entity>)> = HashMap::new();
        for c in changes {
            if self.skip.contains(&c.key.entity_type) {
                continue;
            }
            // What the store holds after it, retired or not.
            let held = c.held().map(|e| &**e);
            span.entry(&c.key)
                .and_modify(|s| s.1 = held)
                .or_insert_with(|| {
                    order.push(&c.key);
                    (c.previous.as_deref(), held)
                });
        }
        for e in unchanged {
            if self.skip.contains(&e.key.entity_type) {
                continue;
            }
            span.entry(&e.key)
                .and_modify(|s| {
                    // Its positions moved after its last change.
                    if s.1.is_some_and(|c| c.version == e.version) {
                        s.1 = Some(e);
                    }
                })
                .or_insert_with(|| {
                    order.push(&e.key);
                    (Some(e), Some(e))
                });
        }
        let mut records = Vec::new();
        {
            let mut legacy = self.legacy.lock();
            for key in order {
                let (previous, current) = span[key];
                // Its old record held its rows; the header replaces it.
                let previous = if legacy.remove(key) { None } else { previous };
                entity_records(key, previous, current, &mut records)?;
            }
        }
        records.extend(marks.iter().map(|(key, at)| blocked_record(key, *at)));
        let rose = {
            let mut floors = self.floors.lock();
            let last = floors.entry(partition).or_default();
            std::mem::replace(last, (*last).max(floor)) < floor
        };
        if rose {
            records.push(floor_record(floor));
        }
        self.send(partition, &records, Some(offset)).await
    }

    /// Writes every entity and blocked id of a partition, then its offset
    /// (the partition was lost and made again).
    pub async fn write_whole(
        &self,
        partition: u32,
        entities: &[Arc<Entity>],
        blocked: &[(EntityKey, i64)],
        floor: u64,
        offset: u64,
    ) -> Result<(), BusError> {
        let mut records = Vec::new();
        for e in entities {
            if !self.skip.contains(&e.key.entity_type) {
                entity_records(&e.key, None, Some(e), &mut records)?;
            }
        }
        records.extend(
            blocked
                .iter()
                .map(|(key, at)| blocked_record(key, Some(*at))),
        );
        if floor > 0 {
            records.push(floor_record(floor));
        }
        self.floors.lock().insert(partition, floor);
        while !self.send(partition, &records, Some(offset)).await? {}
        Ok(())
    }

    /// Writes `records`, then (once the broker has them) the offset record.
    /// `Ok(false)` when they landed on a partition made again since this
    /// process last wrote it: the offset record is then not written.
    async fn send(
        &self,
        partition: u32,
        records: &[Record],
        offset: Option<u64>,
    ) -> Result<bool, BusError> {
        let before = self.ends.lock().get(&partition).copied();
        // Where the records land tells whether the partition was made again
        // since: with none, a tombstone of a key no reader keeps lands first,
        // so the offset record is never the first thing a new partition gets.
        let probe = [(PROBE_KEY.to_vec(), None)];
        let records = if records.is_empty() && before.is_some() && offset.is_some() {
            &probe[..]
        } else {
            records
        };
        let offset = offset.map(|o| {
            [(
                OFFSET_KEY.as_bytes().to_vec(),
                Some(o.to_string().into_bytes()),
            )]
        });
        for batch in [records].into_iter().chain(offset.as_ref().map(|o| &o[..])) {
            let lowest = self.deliver(partition, batch).await?;
            if before.is_some_and(|b| lowest <= b) {
                // Offsets began anew: written again from nothing.
                self.ends.lock().insert(partition, -1);
                tracing::error!(
                    topic = self.topic,
                    partition,
                    "the state topic's partition was deleted and made again: it is written whole"
                );
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes `records` in order and waits for the broker to have them all;
    /// returns the lowest offset they landed at. Records refused because
    /// the partition is gone (the topic was deleted under the fabric) are
    /// written again, held until it exists.
    async fn deliver(&self, partition: u32, records: &[Record]) -> Result<i64, BusError> {
        let outgoing: Vec<kafka::Outgoing> = records
            .iter()
            .map(|(key, value)| kafka::Outgoing {
                partition,
                key,
                value: value.as_deref(),
                headers: None,
            })
            .collect();
        let failed = kafka::kafka("write an entity's state");
        let mut lowest = i64::MAX;
        for r in kafka::write_in_order(&self.producer, &self.topic, &outgoing).await? {
            let at = r.map_err(&failed)?;
            lowest = lowest.min(at);
            let mut ends = self.ends.lock();
            let end = ends.entry(partition).or_insert(at);
            *end = (*end).max(at);
        }
        Ok(lowest)
    }

    /// Reads partition `p` whole, as of its last offset record; `None`
    /// when it holds none (nothing was ever applied into it).
    pub async fn read(&self, partition: u32) -> Result<Option<Restored>, BusError> {
        Ok(self.fold(partition).await?.restored)
    }

    /// As [`StateTopic::read`], for the process that now holds the
    /// partition: the records of a batch its previous holder did not finish
    /// are first written back to their state at the last offset record.
    pub async fn take_over(&self, partition: u32) -> Result<Option<Restored>, BusError> {
        let folded = self.fold(partition).await?;
        if !folded.unfinished.is_empty() {
            let n = folded.unfinished.len();
            let offset = folded.restored.as_ref().map(|r| r.offset);
            self.send(partition, &folded.unfinished, offset).await?;
            tracing::warn!(
                partition,
                records = n,
                "the state topic ends with a batch its writer did not finish (it stopped while \
                 writing): those records are set back to the state of its last offset record"
            );
        }
        // What the topic holds: a floor only goes up from there.
        self.floors
            .lock()
            .insert(partition, folded.restored.as_ref().map_or(0, |r| r.floor));
        Ok(folded.restored)
    }

    async fn fold(&self, partition: u32) -> Result<Folded, BusError> {
        let client = self.client.clone();
        let topic = self.topic.clone();
        let folded = tokio::task::spawn_blocking(move || {
            let mut fold = Fold::default();
            kafka::read_whole_partition(&client, &topic, partition, |m| {
                fold.record(m.key().unwrap_or_default(), m.payload())
                    .map_err(|reason| BusError::Kafka {
                        operation: format!("read {topic}/{partition}@{}", m.offset()),
                        reason,
                    })
            })?;
            fold.finish().map_err(|reason| BusError::Kafka {
                operation: format!("read {topic}/{partition}"),
                reason,
            })
        })
        .await
        .map_err(|e| BusError::Kafka {
            operation: "read the state topic".into(),
            reason: e.to_string(),
        })??;
        self.legacy.lock().extend(folded.legacy.iter().cloned());
        Ok(folded)
    }
}

/// A blocked id's record: when it was forgotten, or a tombstone (lifted).
fn blocked_record(key: &EntityKey, at: Option<i64>) -> Record {
    (
        format!("{BLOCKED_PREFIX}{key}").into_bytes(),
        at.map(|t| t.to_string().into_bytes()),
    )
}

/// The partition floor's record.
fn floor_record(floor: u64) -> Record {
    (FLOOR_KEY.to_vec(), Some(floor.to_string().into_bytes()))
}

/// An entity's header as written.
#[derive(Serialize)]
struct HeaderRef<'a> {
    version: u64,
    positions: &'a LiteMap<Arc<str>, Position>,
    updated_micros: i64,
    lineage: bool,
    gone_micros: Option<i64>,
}

/// An entity's header as read.
#[derive(Deserialize)]
struct Header {
    version: u64,
    positions: LiteMap<Arc<str>, Position>,
    updated_micros: i64,
    lineage: bool,
    gone_micros: Option<i64>,
}

/// An entity's header in format 3 (no retirement).
#[derive(Deserialize)]
struct HeaderV3 {
    version: u64,
    positions: LiteMap<Arc<str>, Position>,
    updated_micros: i64,
    lineage: bool,
}

fn encode_err(e: postcard::Error) -> BusError {
    BusError::Kafka {
        operation: "encode an entity's state".into(),
        reason: e.to_string(),
    }
}

/// The key of one row: the prefix, then the entity's `<type>/<id>` and the
/// table, each after its length (4 bytes, big-endian), then the primary
/// key in postcard encoding.
fn row_key(entity: &[u8], table: &str, pk: &Pk) -> Result<Vec<u8>, BusError> {
    let mut k = Vec::with_capacity(ROW_PREFIX.len() + 8 + entity.len() + table.len() + 16);
    k.extend_from_slice(ROW_PREFIX);
    k.extend_from_slice(&(entity.len() as u32).to_be_bytes());
    k.extend_from_slice(entity);
    k.extend_from_slice(&(table.len() as u32).to_be_bytes());
    k.extend_from_slice(table.as_bytes());
    postcard::to_extend(pk, k).map_err(encode_err)
}

/// The entity key, table and primary key of a row's key.
fn parse_row_key(k: &[u8]) -> Option<(&[u8], &str, Pk)> {
    let rest = k.strip_prefix(ROW_PREFIX)?;
    let (entity, rest) = length_prefixed(rest)?;
    let (table, rest) = length_prefixed(rest)?;
    let pk = postcard::from_bytes(rest).ok()?;
    Some((entity, std::str::from_utf8(table).ok()?, pk))
}

fn length_prefixed(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = b.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The records that take an entity's state on the topic from `previous`
/// to `current` (`None`: not there): rows that differ, rows gone
/// (tombstones), then the header.
fn entity_records(
    key: &EntityKey,
    previous: Option<&Entity>,
    current: Option<&Entity>,
    out: &mut Vec<Record>,
) -> Result<(), BusError> {
    let bus_key = key.bus_key();
    let none = LiteMap::new();
    let (before, after) = (
        previous.map_or(&none, |e| &e.tables),
        current.map_or(&none, |e| &e.tables),
    );
    let lineage = |e: Option<&Entity>, t: &str| {
        e.and_then(|e| e.lineage.as_ref())
            .and_then(|l| l.get(t))
            .cloned()
    };
    for (table, rows) in after.iter() {
        let was = before.get(table);
        let (lin, lin_was) = (lineage(current, table), lineage(previous, table));
        let same_lineage = match (&lin, &lin_was) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        // Shared between the versions: nothing in it changed.
        if was.is_some_and(|w| Arc::ptr_eq(w, rows)) && same_lineage {
            continue;
        }
        for (pk, row) in rows.iter() {
            let row_lineage = lin.as_ref().and_then(|l| l.get(pk));
            let unchanged = was.and_then(|w| w.get(pk)).is_some_and(|r| r == row)
                && lin_was.as_ref().and_then(|l| l.get(pk)) == row_lineage;
            if !unchanged {
                let mut v = vec![FORMAT_ROW];
                v = postcard::to_extend(&(row, row_lineage), v).map_err(encode_err)?;
                out.push((row_key(bus_key.as_bytes(), table, pk)?, Some(v)));
            }
        }
        if let Some(was) = was {
            gone_rows(&bus_key, table, was, Some(rows), out)?;
        }
    }
    for (table, was) in before.iter() {
        if !after.contains_key(table) {
            gone_rows(&bus_key, table, was, None, out)?;
        }
    }
    let header = match current {
        Some(e) => {
            let h = HeaderRef {
                version: e.version,
                positions: &e.positions,
                updated_micros: e.updated_micros,
                lineage: e.lineage.is_some(),
                gone_micros: e.gone_micros,
            };
            Some(postcard::to_extend(&h, vec![FORMAT_HEADER]).map_err(encode_err)?)
        }
        None => None,
    };
    out.push((bus_key.into_bytes(), header));
    Ok(())
}

/// Tombstones for the rows of `was` not in `now`.
fn gone_rows(
    bus_key: &str,
    table: &str,
    was: &TableRows,
    now: Option<&TableRows>,
    out: &mut Vec<Record>,
) -> Result<(), BusError> {
    for pk in was.keys() {
        if !now.is_some_and(|n| n.contains_key(pk)) {
            out.push((row_key(bus_key.as_bytes(), table, pk)?, None));
        }
    }
    Ok(())
}

/// A partition's records, folded in offset order.
#[derive(Default)]
struct Fold {
    /// The newest value of each key, as of the last offset record.
    committed: HashMap<Vec<u8>, Vec<u8>>,
    /// Records after the last offset record.
    pending: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    offset: Option<u64>,
}

/// What a partition holds, as of its last offset record.
struct Folded {
    restored: Option<Restored>,
    /// Entities in a whole-entity format.
    legacy: Vec<EntityKey>,
    /// The keys of an unfinished batch (after the last offset record), with
    /// their value as of that record.
    unfinished: Vec<Record>,
}

impl Fold {
    fn record(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        if key == OFFSET_KEY.as_bytes() {
            let o = value
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("the state offset is not a number")?;
            self.offset = Some(o);
            for (k, v) in self.pending.drain(..) {
                match v {
                    Some(v) => self.committed.insert(k, v),
                    None => self.committed.remove(&k),
                };
            }
        } else {
            self.pending.push((key.to_vec(), value.map(<[u8]>::to_vec)));
        }
        Ok(())
    }

    fn finish(self) -> Result<Folded, String> {
        let Fold {
            committed,
            pending,
            offset,
        } = self;
        let mut seen = HashSet::new();
        let unfinished = pending
            .into_iter()
            .filter(|(k, _)| seen.insert(k.clone()))
            .map(|(k, _)| {
                let v = committed.get(&k).cloned();
                (k, v)
            })
            .collect();
        let mut headers: HashMap<&[u8], Header> = HashMap::new();
        let mut rows: HashMap<&[u8], Rows> = HashMap::new();
        let mut entities = Vec::new();
        let mut legacy = Vec::new();
        let mut blocked = Vec::new();
        let mut floor = 0;
        for (k, v) in &committed {
            let bad = |what: &str, e: &dyn std::fmt::Display| {
                format!(
                    "{what} {:?} does not decode: {e}",
                    String::from_utf8_lossy(k)
                )
            };
            if k == FLOOR_KEY {
                floor = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| bad("the partition's floor", &"not a number"))?;
            } else if let Some(rest) = k.strip_prefix(BLOCKED_PREFIX.as_bytes()) {
                let at = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(|| bad("a blocked id's time", &"not a number"))?;
                if let Some(key) = entity_key(rest) {
                    blocked.push((key, at));
                }
            } else if k.starts_with(ROW_PREFIX) {
                let (entity, table, pk) =
                    parse_row_key(k).ok_or_else(|| bad("a row's key", &"malformed"))?;
                let (row, lineage) = match v.split_first() {
                    Some((&FORMAT_ROW, rest)) => {
                        postcard::from_bytes::<(StoredRow, Option<RowLineage>)>(rest)
                            .map_err(|e| bad("a row", &e))?
                    }
                    _ => return Err(bad("a row", &"unknown format")),
                };
                rows.entry(entity)
                    .or_default()
                    .entry(Arc::from(table))
                    .or_default()
                    .push((pk, row, lineage));
            } else {
                match v.split_first() {
                    Some((&FORMAT_HEADER, rest)) => {
                        let h = postcard::from_bytes::<Header>(rest)
                            .map_err(|e| bad("an entity's header", &e))?;
                        headers.insert(k, h);
                    }
                    Some((&FORMAT_HEADER_V3, rest)) => {
                        let h = postcard::from_bytes::<HeaderV3>(rest)
                            .map_err(|e| bad("an entity's header", &e))?;
                        let h = Header {
                            version: h.version,
                            positions: h.positions,
                            updated_micros: h.updated_micros,
                            lineage: h.lineage,
                            gone_micros: None,
                        };
                        headers.insert(k, h);
                    }
                    Some((&FORMAT_POSTCARD, rest)) => {
                        let e = postcard::from_bytes::<crate::store::microdb::EntityV2>(rest)
                            .map_err(|e| bad("an entity's state", &e))?;
                        let e: Entity = e.into();
                        legacy.push(e.key.clone());
                        entities.push(e);
                    }
                    Some((&FORMAT_POSTCARD_V1, rest)) => {
                        let e = postcard::from_bytes::<crate::store::EntityV1>(rest)
                            .map_err(|e| bad("an entity's state", &e))?;
                        let e: Entity = e.into();
                        legacy.push(e.key.clone());
                        entities.push(e);
                    }
                    _ => return Err(bad("an entity's state", &"unknown format")),
                }
            }
        }
        for (k, h) in headers {
            let key = entity_key(k).ok_or_else(|| {
                format!("an entity key {:?} has no '/'", String::from_utf8_lossy(k))
            })?;
            let mut tables = LiteMap::new();
            let mut lineage = LiteMap::new();
            for (table, mut rs) in rows.remove(k).unwrap_or_default() {
                rs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                let mut t = TableRows::with_capacity(rs.len());
                let mut l = LiteMap::new();
                for (pk, row, lin) in rs {
                    if let Some(lin) = lin {
                        let _ = l.try_append(pk.clone(), lin);
                    }
                    let _ = t.try_append(pk, row);
                }
                if h.lineage {
                    lineage.insert(table.clone(), Arc::new(l));
                }
                tables.insert(table, Arc::new(t));
            }
            entities.push(Entity {
                key,
                version: h.version,
                tables,
                positions: h.positions,
                updated_micros: h.updated_micros,
                lineage: h.lineage.then(|| Box::new(lineage)),
                gone_micros: h.gone_micros,
                encoded: Default::default(),
            });
        }
        // Rows left have no header: an entity deleted or never finished,
        // whose rows were not all removed. Not an entity.
        Ok(Folded {
            restored: offset.map(|offset| Restored {
                offset,
                entities,
                blocked,
                floor,
            }),
            legacy,
            unfinished,
        })
    }
}

/// One entity's rows as read, by table.
type Rows = HashMap<Arc<str>, Vec<(Pk, StoredRow, Option<RowLineage>)>>;

/// The entity key of `<type>/<id>` bytes.
fn entity_key(k: &[u8]) -> Option<EntityKey> {
    let (ty, id) = std::str::from_utf8(k).ok()?.split_once('/')?;
    Some(EntityKey::new(ty, id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EntityChangeSet, Op, Row, TableChange, Value};
    use crate::store::Applied;

    fn key() -> EntityKey {
        EntityKey::new("customer", "1")
    }

    fn change(table: &str, id: i64, name: Option<&str>) -> TableChange {
        TableChange {
            table: table.into(),
            op: if name.is_some() {
                Op::Update
            } else {
                Op::Delete
            },
            pk: vec![Value::Int(id)],
            row: name.map(|n| {
                let mut r = Row::new();
                r.insert("id".into(), Value::Int(id));
                r.insert("name".into(), Value::Text(n.into()));
                r
            }),
        }
    }

    /// `current` after the changes, at source position `pos`.
    fn apply(
        current: Option<&Entity>,
        pos: u64,
        changes: Vec<TableChange>,
        lineage: bool,
    ) -> Entity {
        let set = EntityChangeSet {
            key: key(),
            source: "crm".into(),
            position: Position::Seq(pos),
            commit_micros: pos as i64,
            changes,
            delete_entity: false,
        };
        match Entity::apply_with(current, &set, lineage.then_some(pos as i64 + 7)) {
            Applied::Changed { entity, .. } => entity,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn records(previous: Option<&Entity>, current: Option<&Entity>) -> Vec<Record> {
        let mut out = Vec::new();
        entity_records(&key(), previous, current, &mut out).unwrap();
        out
    }

    /// Folds batches, each followed by its offset record (offsets 1, 2, …).
    fn fold(batches: &[Vec<Record>]) -> Fold {
        let mut f = Fold::default();
        for (i, b) in batches.iter().enumerate() {
            for (k, v) in b {
                f.record(k, v.as_deref()).unwrap();
            }
            f.record(OFFSET_KEY.as_bytes(), Some((i + 1).to_string().as_bytes()))
                .unwrap();
        }
        f
    }

    fn restored(f: Fold) -> Vec<Entity> {
        f.finish().unwrap().restored.unwrap().entities
    }

    fn assert_same(a: &Entity, b: &Entity) {
        assert_eq!(a.key, b.key);
        assert_eq!(a.version, b.version);
        assert_eq!(a.tables, b.tables);
        assert_eq!(a.positions, b.positions);
        assert_eq!(a.updated_micros, b.updated_micros);
        // A table's lineage may stay, empty, after its last row went.
        let lineage = |e: &Entity| {
            e.lineage.as_ref().map(|l| {
                l.iter()
                    .filter(|(_, rows)| !rows.is_empty())
                    .map(|(t, rows)| (t.clone(), rows.clone()))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(lineage(a), lineage(b));
    }

    #[test]
    fn a_change_writes_the_rows_it_changed_and_the_header() {
        for lineage in [false, true] {
            let v1 = apply(
                None,
                1,
                vec![
                    change("customer", 1, Some("Ann")),
                    change("addresses", 10, Some("Main St")),
                    change("addresses", 11, Some("High St")),
                    change("invoices", 20, Some("i20")),
                ],
                lineage,
            );
            let first = records(None, Some(&v1));
            assert_eq!(first.len(), 5, "four rows and the header");
            // One row changed, one deleted; two tables untouched.
            let v2 = apply(
                Some(&v1),
                2,
                vec![
                    change("addresses", 10, Some("Main Street")),
                    change("addresses", 11, None),
                ],
                lineage,
            );
            let second = records(Some(&v1), Some(&v2));
            assert_eq!(second.len(), 3, "the changed row, a tombstone, the header");
            assert_eq!(second.iter().filter(|(_, v)| v.is_none()).count(), 1);
            // A table emptied, another added.
            let v3 = apply(
                Some(&v2),
                3,
                vec![
                    change("invoices", 20, None),
                    change("payments", 30, Some("p")),
                ],
                lineage,
            );
            let third = records(Some(&v2), Some(&v3));
            assert_eq!(third.len(), 3);
            let got = restored(fold(&[first, second, third]));
            assert_eq!(got.len(), 1);
            assert_same(&got[0], &v3);
            assert_eq!(got[0].lineage.is_some(), lineage);
        }
    }

    #[test]
    fn a_deleted_entity_leaves_no_row_behind() {
        let v1 = apply(
            None,
            1,
            vec![
                change("customer", 1, Some("Ann")),
                change("addresses", 10, Some("a")),
            ],
            false,
        );
        let gone = records(Some(&v1), None);
        assert_eq!(gone.len(), 3);
        assert!(gone.iter().all(|(_, v)| v.is_none()));
        let f = fold(&[records(None, Some(&v1)), gone]);
        assert!(f.committed.is_empty(), "every key is a tombstone");
        assert!(restored(f).is_empty());
    }

    #[test]
    fn an_unfinished_batch_is_not_read_and_is_set_back() {
        let v1 = apply(None, 1, vec![change("addresses", 10, Some("a"))], false);
        let v2 = apply(
            Some(&v1),
            2,
            vec![
                change("addresses", 10, Some("b")),
                change("addresses", 11, Some("c")),
            ],
            false,
        );
        let mut f = fold(&[records(None, Some(&v1))]);
        // The writer stopped after the rows, before the header and offset.
        let batch = records(Some(&v1), Some(&v2));
        for (k, v) in &batch[..2] {
            f.record(k, v.as_deref()).unwrap();
        }
        let folded = f.finish().unwrap();
        let r = folded.restored.unwrap();
        assert_eq!(r.offset, 1);
        assert_same(&r.entities[0], &v1);
        // Set back: row 10 to its value at offset 1, row 11 gone.
        assert_eq!(folded.unfinished.len(), 2);
        let first = records(None, Some(&v1));
        assert_eq!(folded.unfinished[0], first[0]);
        assert_eq!(folded.unfinished[1], (batch[1].0.clone(), None));
    }

    #[test]
    fn a_whole_entity_record_is_read_and_its_next_write_is_whole() {
        let v1 = apply(
            None,
            1,
            vec![
                change("customer", 1, Some("Ann")),
                change("addresses", 10, Some("a")),
            ],
            true,
        );
        let old = postcard::to_extend(&v1, vec![FORMAT_POSTCARD]).unwrap();
        let f = fold(&[vec![(key().bus_key().into_bytes(), Some(old))]]);
        let folded = f.finish().unwrap();
        assert_eq!(folded.legacy, vec![key()]);
        assert_same(&folded.restored.unwrap().entities[0], &v1);
        // The writer then diffs from nothing: every row, and the header
        // that replaces the old record.
        let v2 = apply(Some(&v1), 2, vec![change("addresses", 10, Some("b"))], true);
        let mut f = fold(&[vec![(
            key().bus_key().into_bytes(),
            Some(postcard::to_extend(&v1, vec![FORMAT_POSTCARD]).unwrap()),
        )]]);
        for (k, v) in records(None, Some(&v2)) {
            f.record(&k, v.as_deref()).unwrap();
        }
        f.record(OFFSET_KEY.as_bytes(), Some(b"2")).unwrap();
        let got = restored(f);
        assert_eq!(got.len(), 1);
        assert_same(&got[0], &v2);
    }

    #[test]
    fn a_retired_entity_the_floor_and_old_headers_are_read_back() {
        let v1 = apply(
            None,
            1,
            vec![
                change("customer", 1, Some("Ann")),
                change("addresses", 10, Some("a")),
            ],
            false,
        );
        // Its root row went: the rest is kept, hidden.
        let mut gone = v1.clone();
        gone.tables.remove("customer");
        gone.version = 2;
        gone.gone_micros = Some(42);
        let mut f = fold(&[records(None, Some(&v1)), records(Some(&v1), Some(&gone))]);
        f.record(FLOOR_KEY, Some(b"9")).unwrap();
        f.record(OFFSET_KEY.as_bytes(), Some(b"3")).unwrap();
        let r = f.finish().unwrap().restored.unwrap();
        assert_eq!(r.floor, 9);
        assert_same(&r.entities[0], &gone);
        assert_eq!(r.entities[0].gone_micros, Some(42));
        // A header of format 3 (before retirement) reads as a live entity.
        let mut f = fold(&[records(None, Some(&v1))]);
        let old = postcard::to_extend(
            &(v1.version, &v1.positions, v1.updated_micros, false),
            vec![FORMAT_HEADER_V3],
        )
        .unwrap();
        f.record(key().bus_key().as_bytes(), Some(&old)).unwrap();
        f.record(OFFSET_KEY.as_bytes(), Some(b"2")).unwrap();
        let r = f.finish().unwrap().restored.unwrap();
        assert_eq!(r.floor, 0);
        assert_same(&r.entities[0], &v1);
        assert!(r.entities[0].is_live());
    }

    #[test]
    fn row_keys_are_unambiguous() {
        let pk = Pk::from(vec![Value::Text("x/y".into()), Value::Int(3)]);
        let k = row_key(b"customer/a\0b", "addresses", &pk).unwrap();
        let (entity, table, back) = parse_row_key(&k).unwrap();
        assert_eq!(entity, b"customer/a\0b");
        assert_eq!(table, "addresses");
        assert_eq!(back, pk);
        assert_ne!(
            row_key(b"customer/ab", "c", &pk).unwrap(),
            row_key(b"customer/a", "bc", &pk).unwrap()
        );
        assert!(parse_row_key(&k[..k.len() - 12]).is_none());
    }
}
