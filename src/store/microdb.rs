//! One entity's micro-database and the pure logic of applying a change set.
//!
//! An [`Entity`] is immutable once published: apply builds the next version
//! from the current one (rows are shared through `Arc`, so the copy costs a
//! pointer per row, not the rows) and the store swaps it in. Readers holding
//! the previous `Arc<Entity>` keep a consistent version.

use super::row::{Pk, StoredRow};
use crate::event::{EntityChangeSet, EntityKey, Op, Position};
use litemap::LiteMap;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

/// Rows of one micro-DB table, by primary key, in key order.
///
/// The maps of a micro-DB are sorted vectors ([`LiteMap`]), not B-trees: a
/// micro-DB holds a handful of tables of a few rows each, where a B-tree
/// spends a node of eleven slots on one row, and a version's copy of a
/// sorted vector is one allocation. Serialized, either is the same map.
pub type TableRows = LiteMap<Pk, StoredRow>;

/// One entity: its tables, version and applied source positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    pub key: EntityKey,
    /// Grows by one per applied change set that changed something.
    pub version: u64,
    /// Micro-DB table name to rows. Tables with no rows are absent. Each
    /// table's rows are shared between versions until a change set touches
    /// that table (copy on write): a new version copies the tables it
    /// changes, not the entity.
    #[serde(deserialize_with = "cautious::tables")]
    pub tables: LiteMap<Arc<str>, Arc<TableRows>>,
    /// Per source, the position of the last change set applied.
    #[serde(deserialize_with = "cautious::map")]
    pub positions: LiteMap<Arc<str>, Position>,
    /// Source commit time of the last applied change, microseconds since epoch.
    pub updated_micros: i64,
    /// Where each row came from, when its type keeps lineage (`lineage =
    /// true`): table to primary key to the change that last wrote the row.
    /// Shared between versions like the tables are.
    #[serde(deserialize_with = "cautious::lineage")]
    pub lineage: Option<Box<Lineage>>,
    /// Retired since then (microseconds since the epoch, when this process
    /// applied it): its root row was deleted (`delete_with_root`), or it has
    /// no row left. A retired entity is not served, listed or counted, and
    /// readers were told it is deleted; it is kept so that its versions go
    /// on where they were if it comes back, and (root deleted) so that a
    /// root inserted again brings back its other rows. The store drops it
    /// after its type's `keep_deleted`.
    pub gone_micros: Option<i64>,
    /// Encoded forms of this version (one per view), made on first read. A
    /// version never changes, so they never go stale; a new version starts
    /// with none.
    #[serde(skip)]
    pub encoded: Encoded,
}

/// Where one row came from: the change that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowLineage {
    /// That change's position in its source (`None`: the row was read
    /// straight from its source by a fetch, which is no position in its log).
    /// Shared by the rows one change wrote.
    pub position: Option<Arc<Position>>,
    /// Its commit time at the source (a fetch: when it read), microseconds
    /// since the epoch.
    pub commit_micros: i64,
    /// When this process applied it, microseconds since the epoch.
    pub applied_micros: i64,
}

/// One table's row lineage, by primary key.
pub type LineageRows = LiteMap<Pk, RowLineage>;
/// An entity's row lineage, by micro-DB table.
pub type Lineage = LiteMap<Arc<str>, Arc<LineageRows>>;

/// An entity as snapshot files of format 1 and the first state-topic
/// format hold it: without lineage.
#[derive(Deserialize)]
pub struct EntityV1 {
    key: EntityKey,
    version: u64,
    #[serde(deserialize_with = "cautious::tables")]
    tables: LiteMap<Arc<str>, Arc<TableRows>>,
    #[serde(deserialize_with = "cautious::map")]
    positions: LiteMap<Arc<str>, Position>,
    updated_micros: i64,
}

impl From<EntityV1> for Entity {
    fn from(e: EntityV1) -> Entity {
        Entity {
            key: e.key,
            version: e.version,
            tables: e.tables,
            positions: e.positions,
            updated_micros: e.updated_micros,
            lineage: None,
            gone_micros: None,
            encoded: Encoded::default(),
        }
    }
}

/// An entity as snapshot files of format 2 and the state topic's whole
/// records of format 2 hold it: lineage, no retirement (a deleted entity
/// left memory then).
#[derive(Deserialize)]
pub struct EntityV2 {
    key: EntityKey,
    version: u64,
    #[serde(deserialize_with = "cautious::tables")]
    tables: LiteMap<Arc<str>, Arc<TableRows>>,
    #[serde(deserialize_with = "cautious::map")]
    positions: LiteMap<Arc<str>, Position>,
    updated_micros: i64,
    #[serde(deserialize_with = "cautious::lineage")]
    lineage: Option<Box<Lineage>>,
}

impl From<EntityV2> for Entity {
    fn from(e: EntityV2) -> Entity {
        Entity {
            key: e.key,
            version: e.version,
            tables: e.tables,
            positions: e.positions,
            updated_micros: e.updated_micros,
            lineage: e.lineage,
            gone_micros: None,
            encoded: Encoded::default(),
        }
    }
}

/// Lazily filled encodings of one entity version, one slot per view, made
/// under one set of views (`epoch`: a reload that changes views makes a new
/// one, and encodings made under the old views are never served again).
#[derive(Default)]
pub struct Encoded(arc_swap::ArcSwapOption<EncodedCells>);

pub struct EncodedCells {
    epoch: u64,
    cells: Box<[OnceLock<bytes::Bytes>]>,
}

impl Encoded {
    /// The encoding in `slot` of `slots` under the views of `epoch`, made
    /// by `encode` the first time.
    pub fn get_or_init(
        &self,
        epoch: u64,
        slot: usize,
        slots: usize,
        encode: impl FnOnce() -> bytes::Bytes,
    ) -> bytes::Bytes {
        let current = self.0.load();
        let cells = match &*current {
            Some(c) if c.epoch == epoch => c.clone(),
            _ => {
                let fresh = Arc::new(EncodedCells {
                    epoch,
                    cells: (0..slots).map(|_| OnceLock::new()).collect(),
                });
                // Another reader may have made them first: use theirs.
                let prev = self.0.compare_and_swap(&current, Some(fresh.clone()));
                match &*prev {
                    Some(p) if !std::ptr::eq(&**p, &*fresh) && p.epoch == epoch => p.clone(),
                    _ => fresh,
                }
            }
        };
        match cells.cells.get(slot) {
            Some(cell) => cell.get_or_init(encode).clone(),
            None => encode(),
        }
    }
}

impl Clone for Encoded {
    /// A copy is the start of a new version: it has no encodings yet.
    fn clone(&self) -> Self {
        Encoded::default()
    }
}

impl PartialEq for Encoded {
    /// Encodings are derived state: they never make two entities differ.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoded")
    }
}

/// `rows` to change: the table itself when no other version shares it,
/// else a copy made for this version, with room for one more row when
/// `grows` (so the insert does not copy the table a second time).
fn own(rows: &mut Arc<TableRows>, grows: bool) -> &mut TableRows {
    if Arc::get_mut(rows).is_none() {
        let mut copy = Vec::with_capacity(rows.len() + usize::from(grows));
        copy.extend(rows.iter().map(|(k, r)| (k.clone(), r.clone())));
        *rows = Arc::new(LiteMap::from_sorted_store_unchecked(copy));
    }
    Arc::get_mut(rows).expect("a table no other version holds")
}

/// `current` is gone: every table it had changed (nothing to delete when
/// it did not exist). `retired`: what stays of it, hidden.
fn deleted(
    current: Option<&Entity>,
    mut changed: Vec<Arc<str>>,
    retired: Option<Entity>,
) -> Applied {
    let Some(cur) = current else {
        return Applied::Stale;
    };
    for t in cur.tables.keys() {
        if !changed.contains(t) {
            changed.push(t.clone());
        }
    }
    Applied::Deleted {
        version: cur.version + 1,
        changed_tables: changed,
        retired,
    }
}

/// What applying a change set needs to know besides the set.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules<'a> {
    /// The time of applying, when the type keeps lineage (each row written
    /// records the change that wrote it).
    pub lineage: Option<i64>,
    /// The type's root table, when deleting its row retires the entity
    /// (`delete_with_root`): a retired entity comes back only with it.
    pub root: Option<&'a str>,
    /// A new entity's first version is one above this: the highest version
    /// of a retired entity its shard dropped, so that an entity created
    /// again never goes back to a version readers saw before.
    pub floor: u64,
    /// Now, microseconds since the epoch: when an entity retires.
    pub now_micros: i64,
}

/// What applying a change set did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The set is older than what the entity already reflects: nothing done.
    Stale,
    /// Nothing changed (a replay of what is already there); positions moved.
    Unchanged(Entity),
    /// The entity has a new version.
    Changed {
        entity: Entity,
        changed_tables: Vec<Arc<str>>,
    },
    /// The entity is gone for readers (root row deleted, or no row left).
    Deleted {
        version: u64,
        changed_tables: Vec<Arc<str>>,
        /// What stays of it, retired (hidden; see [`Entity::gone_micros`]);
        /// `None`: nothing stays.
        retired: Option<Entity>,
    },
    /// A retired entity's rows changed: readers see nothing (it is still
    /// retired), the store and the state topic keep the rows.
    Hidden(Entity),
}

impl Entity {
    pub fn new(key: EntityKey) -> Self {
        Entity {
            key,
            version: 0,
            tables: LiteMap::new(),
            positions: LiteMap::new(),
            updated_micros: 0,
            lineage: None,
            gone_micros: None,
            encoded: Encoded::default(),
        }
    }

    /// Served to readers: not retired (see [`Entity::gone_micros`]).
    pub fn is_live(&self) -> bool {
        self.gone_micros.is_none()
    }

    /// `table`'s row lineage to change (made when missing).
    fn lineage_of(&mut self, table: &Arc<str>) -> &mut LineageRows {
        let rows = self
            .lineage
            .get_or_insert_with(Default::default)
            .entry(table.clone())
            .or_default();
        if Arc::get_mut(rows).is_none() {
            *rows = Arc::new((**rows).clone());
        }
        Arc::get_mut(rows).expect("a table's lineage no other version holds")
    }

    /// Forgets the lineage of one row, or of a whole table.
    fn drop_lineage(&mut self, table: &Arc<str>, pk: Option<&[crate::event::Value]>) {
        let Some(l) = self.lineage.as_mut() else {
            return;
        };
        match pk {
            None => {
                l.remove(table);
            }
            Some(pk) => {
                if l.get(table).is_some_and(|r| r.contains_key(pk)) {
                    self.lineage_of(table).remove(pk);
                }
            }
        }
    }

    /// About the memory this version holds (its rows, keys and maps; not
    /// what the allocator keeps around them): for memory bounds.
    pub fn approx_bytes(&self) -> usize {
        let rows: usize = self
            .tables
            .values()
            .flat_map(|t| t.iter())
            .map(|(k, r)| std::mem::size_of_val(k) + r.own_bytes())
            .sum();
        let lineage: usize = self.lineage.as_ref().map_or(0, |l| {
            l.values()
                .map(|t| {
                    56 + t.len()
                        * (std::mem::size_of::<(Pk, RowLineage)>()
                            + t.first().map_or(0, |(k, _)| std::mem::size_of_val(k)))
                })
                .sum()
        });
        std::mem::size_of::<Self>()
            + self.tables.len() * (std::mem::size_of::<(Arc<str>, Arc<TableRows>)>() + 40)
            + self.positions.len() * std::mem::size_of::<(Arc<str>, Position)>()
            + rows
            + lineage
    }

    pub fn row_count(&self) -> usize {
        self.tables.values().map(|t| t.len()).sum()
    }

    /// Replaces the fetched tables of `current` with the rows read from the
    /// sources. A table whose rows are the same stays as it is; nothing
    /// changed is [`Applied::Stale`] (no new version). Positions stay: a
    /// fetch is no position in any source's log.
    pub fn apply_fetched(current: Option<&Entity>, set: &crate::event::FetchedEntity) -> Applied {
        Self::apply_fetched_with(current, set, None)
    }

    /// As [`Entity::apply_fetched`]; with `lineage` (the time of applying,
    /// when the type keeps lineage), each row read records that it was
    /// fetched.
    pub fn apply_fetched_with(
        current: Option<&Entity>,
        set: &crate::event::FetchedEntity,
        lineage: Option<i64>,
    ) -> Applied {
        let mut next = current
            .cloned()
            .unwrap_or_else(|| Entity::new(set.key.clone()));
        let mut changed: Vec<Arc<str>> = Vec::new();
        if lineage.is_none() {
            next.lineage = None;
        }
        for (table, rows) in &set.tables {
            let mut fresh: Vec<(Pk, StoredRow)> = rows
                .iter()
                .map(|(pk, row)| (Pk::from(&pk[..]), StoredRow::pack(row)))
                .collect();
            fresh.sort_by(|a, b| a.0.cmp(&b.0));
            fresh.dedup_by(|a, b| a.0 == b.0);
            let fresh: TableRows = LiteMap::from_sorted_store_unchecked(fresh);
            let same = match next.tables.get(table) {
                Some(old) => **old == fresh,
                None => fresh.is_empty(),
            };
            if same {
                continue;
            }
            if let Some(applied_micros) = lineage {
                next.drop_lineage(table, None);
                if !fresh.is_empty() {
                    let rows = next.lineage_of(table);
                    for (pk, _) in fresh.iter() {
                        rows.insert(
                            pk.clone(),
                            RowLineage {
                                position: None,
                                commit_micros: set.fetched_micros,
                                applied_micros,
                            },
                        );
                    }
                }
            }
            if fresh.is_empty() {
                next.tables.remove(table);
            } else {
                next.tables.insert(table.clone(), Arc::new(fresh));
            }
            changed.push(table.clone());
        }
        let version = current.map_or(0, |c| c.version);
        let gone = next.tables.is_empty()
            || set
                .root
                .as_ref()
                .is_some_and(|r| !next.tables.contains_key(r));
        let back = current.is_some_and(|c| !c.is_live());
        if gone {
            // Already retired: it stays as it is.
            return match back {
                true => Applied::Stale,
                false => deleted(current, changed, None),
            };
        }
        if back {
            next.gone_micros = None;
            changed = next.tables.keys().cloned().collect();
        } else if changed.is_empty() {
            return Applied::Stale;
        }
        next.version = version + 1;
        next.updated_micros = set.fetched_micros;
        Applied::Changed {
            entity: next,
            changed_tables: changed,
        }
    }

    /// Applies `set` to `current` (None: the entity does not exist yet).
    ///
    /// Idempotent: a set at or below the entity's position for its source
    /// that carries the same rows changes nothing; a set strictly below it is
    /// skipped, so replaying an older stretch of the log never moves an entity
    /// back in time. Rows read as they are now (snapshot chunks, polls) are
    /// never skipped: a source re-reads its snapshot only when it starts
    /// over, and a poll reads current rows, so they are never older than
    /// what the entity holds from that source.
    pub fn apply(current: Option<&Entity>, set: &EntityChangeSet) -> Applied {
        Self::apply_with(current, set, None)
    }

    /// As [`Entity::apply`]; with `lineage` (the time of applying, when the
    /// type keeps lineage), each row written records the change that wrote
    /// it.
    pub fn apply_with(
        current: Option<&Entity>,
        set: &EntityChangeSet,
        lineage: Option<i64>,
    ) -> Applied {
        Self::apply_by(
            current,
            set,
            &Rules {
                lineage,
                now_micros: lineage.unwrap_or_else(crate::sources::now_micros),
                ..Rules::default()
            },
        )
    }

    /// As [`Entity::apply`], by `rules`. An entity whose root row goes
    /// (`delete_with_root`) or whose last row goes is retired, not dropped:
    /// [`Applied::Deleted`] with what stays. Changes to a retired entity are
    /// [`Applied::Hidden`] until it has rows again and, when it retired by
    /// its root, its root row: then it is back, one version above the one
    /// that retired it, with every table it holds changed.
    pub fn apply_by(current: Option<&Entity>, set: &EntityChangeSet, rules: &Rules) -> Applied {
        let lineage = rules.lineage;
        if let Some(cur) = current
            && let Some(seen) = cur.positions.get(&set.source)
            && !set.position.reads_current_state()
            && set.position.is_older_than(seen)
        {
            return Applied::Stale;
        }
        let mut next = current
            .cloned()
            .unwrap_or_else(|| Entity::new(set.key.clone()));
        let mut changed: Vec<Arc<str>> = Vec::new();
        // One position for every row this set writes (its lineage). A type
        // that no longer keeps lineage drops what it had: it would go stale.
        let position = lineage.map(|_| Arc::new(set.position.clone()));
        if lineage.is_none() {
            next.lineage = None;
        }
        for ch in &set.changes {
            let did = match ch.op {
                Op::Read | Op::Insert | Op::Update => {
                    let Some(row) = &ch.row else { continue };
                    let row = StoredRow::pack(row);
                    let rows = next.tables.entry(ch.table.clone()).or_default();
                    let wrote = match rows.get(&ch.pk[..]) {
                        Some(old) if *old == row => false,
                        old => {
                            let grows = old.is_none();
                            own(rows, grows).insert(Pk::from(&ch.pk[..]), row);
                            true
                        }
                    };
                    if let Some(applied_micros) = lineage
                        && wrote
                    {
                        next.lineage_of(&ch.table).insert(
                            Pk::from(&ch.pk[..]),
                            RowLineage {
                                position: position.clone(),
                                commit_micros: set.commit_micros,
                                applied_micros,
                            },
                        );
                    }
                    wrote
                }
                Op::Delete => {
                    let did = next.tables.get_mut(&ch.table).is_some_and(|rows| {
                        rows.contains_key(&ch.pk[..])
                            && own(rows, false).remove(&ch.pk[..]).is_some()
                    });
                    if next.tables.get(&ch.table).is_some_and(|r| r.is_empty()) {
                        next.tables.remove(&ch.table);
                    }
                    if did {
                        next.drop_lineage(&ch.table, Some(&ch.pk[..]));
                    }
                    did
                }
                Op::Truncate => {
                    next.drop_lineage(&ch.table, None);
                    next.tables.remove(&ch.table).is_some()
                }
            };
            if did && !changed.contains(&ch.table) {
                changed.push(ch.table.clone());
            }
        }
        let position = set.position.merged_with(next.positions.get(&set.source));
        next.positions.insert(set.source.clone(), position);
        let version = current.map_or(rules.floor, |c| c.version);
        let was_live = current.is_some_and(Entity::is_live);
        let retired = next.tables.is_empty()
            || set.delete_entity
            || (current.is_some()
                && !was_live
                && rules.root.is_some_and(|r| !next.tables.contains_key(r)));
        if retired {
            if !was_live {
                // Still retired: kept as it is now, nothing for readers.
                if current.is_none() {
                    return Applied::Stale;
                }
                return if changed.is_empty() {
                    Applied::Unchanged(next)
                } else {
                    Applied::Hidden(next)
                };
            }
            next.version = version + 1;
            next.updated_micros = set.commit_micros;
            next.gone_micros = Some(rules.now_micros);
            return deleted(current, changed, Some(next));
        }
        if current.is_some() && !was_live {
            // Back: readers were told it is deleted, so all of it is new to them.
            next.gone_micros = None;
            changed = next.tables.keys().cloned().collect();
        } else if changed.is_empty() {
            return Applied::Unchanged(next);
        }
        next.version = version + 1;
        next.updated_micros = set.commit_micros;
        Applied::Changed {
            entity: next,
            changed_tables: changed,
        }
    }

    /// Removes every row of `table` (a source TRUNCATE); true if any was there.
    /// This entity without the tables `keep` refuses (its config no longer
    /// has them), as a new version; `None` when it keeps every table.
    pub fn without_tables(&self, keep: impl Fn(&str) -> bool) -> Option<Entity> {
        let gone: Vec<Arc<str>> = self.tables.keys().filter(|t| !keep(t)).cloned().collect();
        if gone.is_empty() {
            return None;
        }
        let mut next = self.clone();
        for t in &gone {
            next.tables.remove(t);
            next.drop_lineage(t, None);
        }
        next.version += 1;
        Some(next)
    }

    pub fn truncated(&self, table: &str, source: &Arc<str>, position: &Position) -> Option<Entity> {
        if !self.tables.contains_key(table) {
            return None;
        }
        let mut next = self.clone();
        next.tables.remove(table);
        let table: Arc<str> = table.into();
        next.drop_lineage(&table, None);
        next.version += 1;
        let position = position.merged_with(next.positions.get(source));
        next.positions.insert(source.clone(), position);
        Some(next)
    }
}

/// Maps read back from snapshots without trusting their lengths:
/// litemap's own `Deserialize` reserves room for the length a map says it
/// has, so a hostile snapshot (checksum and all) could ask for 2^60
/// entries and abort the process. These grow with the entries actually
/// read (found by the snapshot fuzz target, `fuzz/regressions/snapshot/`).
mod cautious {
    use super::{Arc, LiteMap, TableRows};
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use std::marker::PhantomData;

    struct Cautious<K, V>(PhantomData<(K, V)>);

    impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Visitor<'de> for Cautious<K, V> {
        type Value = LiteMap<K, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
            let mut out = LiteMap::new();
            while let Some((k, v)) = a.next_entry()? {
                // Written sorted: appended in O(1); anything else inserted.
                if let Some((k, v)) = out.try_append(k, v) {
                    out.insert(k, v);
                }
            }
            Ok(out)
        }
    }

    pub fn map<'de, D, K, V>(d: D) -> Result<LiteMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        d.deserialize_map(Cautious(PhantomData))
    }

    /// A table's rows, behind their `Arc`.
    struct Rows(TableRows);

    impl<'de> Deserialize<'de> for Rows {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            map(d).map(Rows)
        }
    }

    pub fn tables<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<LiteMap<Arc<str>, Arc<TableRows>>, D::Error> {
        let tables: LiteMap<Arc<str>, Rows> = map(d)?;
        Ok(tables
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v.0)))
            .collect())
    }

    /// A table's row lineage, behind its `Arc`.
    struct LineageRows(super::LineageRows);

    impl<'de> Deserialize<'de> for LineageRows {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            map(d).map(LineageRows)
        }
    }

    /// Every table's row lineage, when there is any.
    struct Tables(super::Lineage);

    impl<'de> Deserialize<'de> for Tables {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let t: LiteMap<Arc<str>, LineageRows> = map(d)?;
            Ok(Tables(
                t.into_iter().map(|(k, v)| (k, Arc::new(v.0))).collect(),
            ))
        }
    }

    /// Read back, the rows one change wrote share its position again (it
    /// is written once per row).
    pub fn lineage<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Box<super::Lineage>>, D::Error> {
        let l: Option<Tables> = Deserialize::deserialize(d)?;
        Ok(l.map(|mut t| {
            let mut seen: Vec<Arc<super::Position>> = Vec::new();
            for (_, rows) in t.0.iter_mut() {
                let rows = Arc::make_mut(rows);
                for (_, r) in rows.iter_mut() {
                    let Some(p) = &r.position else { continue };
                    match seen.iter().find(|s| ***s == **p) {
                        Some(s) => r.position = Some(s.clone()),
                        None => seen.push(p.clone()),
                    }
                }
            }
            Box::new(t.0)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Row, TableChange, Value};

    fn row(id: i64, name: &str) -> Row {
        let mut r = Row::new();
        r.insert("id".into(), Value::Int(id));
        r.insert("name".into(), Value::Text(name.into()));
        r
    }

    fn set(pos: u64, changes: Vec<TableChange>) -> EntityChangeSet {
        EntityChangeSet {
            key: EntityKey::new("customer", "1"),
            source: "crm".into(),
            position: Position::Seq(pos),
            commit_micros: pos as i64,
            changes,
            delete_entity: false,
        }
    }

    fn upsert(table: &str, id: i64, name: &str) -> TableChange {
        TableChange {
            table: table.into(),
            op: Op::Update,
            pk: vec![Value::Int(id)],
            row: Some(row(id, name)),
        }
    }

    fn changed(a: Applied) -> Entity {
        match a {
            Applied::Changed { entity, .. } => entity,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn lineage_of(e: &Entity, table: &str, id: i64) -> Option<RowLineage> {
        e.lineage
            .as_ref()?
            .get(table)?
            .get(&[Value::Int(id)][..])
            .cloned()
    }

    #[test]
    fn lineage_records_the_change_that_last_wrote_each_row() {
        let e1 = changed(Entity::apply_with(
            None,
            &set(1, vec![upsert("orders", 1, "a"), upsert("orders", 2, "b")]),
            Some(100),
        ));
        let l = lineage_of(&e1, "orders", 1).unwrap();
        assert_eq!(l.position.as_deref(), Some(&Position::Seq(1)));
        assert_eq!((l.commit_micros, l.applied_micros), (1, 100));
        // Row 2 rewritten, row 1 sent again unchanged: only 2 moves on.
        let e2 = changed(Entity::apply_with(
            Some(&e1),
            &set(2, vec![upsert("orders", 1, "a"), upsert("orders", 2, "c")]),
            Some(200),
        ));
        assert_eq!(
            lineage_of(&e2, "orders", 1).unwrap().position.as_deref(),
            Some(&Position::Seq(1))
        );
        assert_eq!(lineage_of(&e2, "orders", 2).unwrap().applied_micros, 200);
        // The earlier version is as it was (lineage is copied on write).
        assert_eq!(lineage_of(&e1, "orders", 2).unwrap().applied_micros, 100);
        // A deleted row's lineage goes with it.
        let del = TableChange {
            table: "orders".into(),
            op: Op::Delete,
            pk: vec![Value::Int(2)],
            row: None,
        };
        let e3 = changed(Entity::apply_with(Some(&e2), &set(3, vec![del]), Some(300)));
        assert!(lineage_of(&e3, "orders", 2).is_none());
        // Kept through serialization; an entity of format 1 reads without.
        let bytes = postcard::to_stdvec(&e3).unwrap();
        let back: Entity = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, e3);
        // Rows one change wrote share its position again once read back.
        let both = changed(Entity::apply_with(
            None,
            &set(4, vec![upsert("orders", 1, "a"), upsert("orders", 2, "b")]),
            Some(400),
        ));
        let back: Entity = postcard::from_bytes(&postcard::to_stdvec(&both).unwrap()).unwrap();
        let rows = back.lineage.as_ref().unwrap().get("orders").unwrap();
        let ps: Vec<_> = rows.values().map(|r| r.position.clone().unwrap()).collect();
        assert!(Arc::ptr_eq(&ps[0], &ps[1]));
        // Lineage turned off for the type: what it had goes.
        let off = changed(Entity::apply(
            Some(&both),
            &set(5, vec![upsert("orders", 1, "z")]),
        ));
        assert!(off.lineage.is_none());
        let mut plain = e3.clone();
        plain.lineage = None;
        let v1 = postcard::to_stdvec(&plain).unwrap();
        // Format 1 had no lineage field: the bytes without its `None` tag.
        let back: Entity = postcard::from_bytes::<EntityV1>(&v1[..v1.len() - 1])
            .unwrap()
            .into();
        assert_eq!(back, plain);
        // Without lineage kept, none is made.
        let e = changed(Entity::apply(None, &set(1, vec![upsert("orders", 1, "a")])));
        assert!(e.lineage.is_none());
    }

    #[test]
    fn one_set_is_one_version() {
        let e = changed(Entity::apply(
            None,
            &set(
                1,
                vec![upsert("customer", 1, "a"), upsert("orders", 7, "x")],
            ),
        ));
        assert_eq!(e.version, 1);
        assert_eq!(e.row_count(), 2);
        let e2 = changed(Entity::apply(
            Some(&e),
            &set(2, vec![upsert("orders", 8, "y")]),
        ));
        assert_eq!(e2.version, 2);
        assert_eq!(e2.row_count(), 3);
    }

    #[test]
    fn a_new_version_shares_the_tables_it_does_not_change() {
        let e1 = changed(Entity::apply(
            None,
            &set(
                1,
                vec![upsert("customer", 1, "a"), upsert("orders", 7, "x")],
            ),
        ));
        let e2 = changed(Entity::apply(
            Some(&e1),
            &set(2, vec![upsert("orders", 8, "y")]),
        ));
        assert!(Arc::ptr_eq(
            e1.tables.get("customer").unwrap(),
            e2.tables.get("customer").unwrap()
        ));
        assert!(!Arc::ptr_eq(
            e1.tables.get("orders").unwrap(),
            e2.tables.get("orders").unwrap()
        ));
        // The old version is as it was.
        assert_eq!(e1.tables.get("orders").unwrap().len(), 1);
        assert_eq!(e2.tables.get("orders").unwrap().len(), 2);
        let keys: Vec<_> = e2
            .tables
            .get("orders")
            .unwrap()
            .keys()
            .map(|k| k.to_vec())
            .collect();
        assert_eq!(keys, vec![vec![Value::Int(7)], vec![Value::Int(8)]]);
    }

    #[test]
    fn replay_is_idempotent() {
        let s1 = set(1, vec![upsert("customer", 1, "a")]);
        let s2 = set(2, vec![upsert("customer", 1, "b")]);
        let e1 = changed(Entity::apply(None, &s1));
        let e2 = changed(Entity::apply(Some(&e1), &s2));
        // Replaying an older set does not move the row back.
        assert_eq!(Entity::apply(Some(&e2), &s1), Applied::Stale);
        // Replaying the same set changes nothing, not even the version.
        match Entity::apply(Some(&e2), &s2) {
            Applied::Unchanged(e) => assert_eq!(e.version, 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_snapshot_read_again_is_applied_over_stream_positions() {
        let e1 = changed(Entity::apply(
            None,
            &set(9, vec![upsert("customer", 1, "a")]),
        ));
        let mut again = set(0, vec![upsert("customer", 1, "b")]);
        again.position = Position::Snapshot(1);
        let e2 = changed(Entity::apply(Some(&e1), &again));
        assert_eq!(e2.version, 2);
    }

    #[test]
    fn a_new_version_has_no_encodings_of_the_old_one() {
        let e1 = changed(Entity::apply(
            None,
            &set(1, vec![upsert("customer", 1, "a")]),
        ));
        assert_eq!(&e1.encoded.get_or_init(0, 0, 2, || "v1".into())[..], b"v1");
        assert_eq!(
            &e1.encoded.get_or_init(0, 0, 2, || "again".into())[..],
            b"v1"
        );
        let e2 = changed(Entity::apply(
            Some(&e1),
            &set(2, vec![upsert("customer", 1, "b")]),
        ));
        assert_eq!(&e2.encoded.get_or_init(0, 0, 2, || "v2".into())[..], b"v2");
        assert_eq!(
            &e2.encoded.get_or_init(0, 5, 2, || "out".into())[..],
            b"out"
        );
        // Views changed (a reload): what was made under the old ones is not served.
        assert_eq!(
            &e2.encoded.get_or_init(1, 0, 2, || "new".into())[..],
            b"new"
        );
        assert_eq!(
            &e2.encoded.get_or_init(1, 0, 2, || "again".into())[..],
            b"new"
        );
    }

    #[test]
    fn root_delete_deletes_entity() {
        let e = changed(Entity::apply(
            None,
            &set(1, vec![upsert("customer", 1, "a")]),
        ));
        let mut del = set(2, vec![]);
        del.delete_entity = true;
        assert!(matches!(
            Entity::apply(Some(&e), &del),
            Applied::Deleted { version: 2, .. }
        ));
    }

    #[test]
    fn deleting_last_row_deletes_entity() {
        let e = changed(Entity::apply(None, &set(1, vec![upsert("orders", 1, "a")])));
        let d = set(
            2,
            vec![TableChange {
                table: "orders".into(),
                op: Op::Delete,
                pk: vec![Value::Int(1)],
                row: None,
            }],
        );
        assert!(matches!(
            Entity::apply(Some(&e), &d),
            Applied::Deleted { .. }
        ));
    }

    fn delete(table: &str, id: i64) -> TableChange {
        TableChange {
            table: table.into(),
            op: Op::Delete,
            pk: vec![Value::Int(id)],
            row: None,
        }
    }

    fn retired(a: Applied) -> (u64, Entity) {
        match a {
            Applied::Deleted {
                version,
                retired: Some(e),
                ..
            } => (version, e),
            other => panic!("expected a retirement, got {other:?}"),
        }
    }

    #[test]
    fn a_root_deleted_and_inserted_again_brings_back_every_row_one_version_on() {
        let rules = Rules {
            root: Some("customer"),
            now_micros: 77,
            ..Rules::default()
        };
        let e = changed(Entity::apply_by(
            None,
            &set(
                1,
                vec![
                    upsert("customer", 1, "a"),
                    upsert("orders", 7, "x"),
                    upsert("orders", 8, "y"),
                ],
            ),
            &rules,
        ));
        let mut del = set(2, vec![delete("customer", 1)]);
        del.delete_entity = true;
        let (version, gone) = retired(Entity::apply_by(Some(&e), &del, &rules));
        assert_eq!((version, gone.version), (2, 2));
        assert_eq!(gone.gone_micros, Some(77));
        assert!(!gone.is_live());
        // Its other rows stay, hidden; they still change with their sources.
        assert_eq!(gone.row_count(), 2);
        let hidden = match Entity::apply_by(Some(&gone), &set(3, vec![delete("orders", 8)]), &rules)
        {
            Applied::Hidden(h) => h,
            other => panic!("expected a hidden change, got {other:?}"),
        };
        assert_eq!((hidden.version, hidden.row_count()), (2, 1));
        // A row that is not the root does not bring it back.
        let still = Entity::apply_by(
            Some(&hidden),
            &set(4, vec![upsert("orders", 9, "z")]),
            &rules,
        );
        let Applied::Hidden(still) = still else {
            panic!("expected a hidden change, got {still:?}")
        };
        // The root does, with every table changed, one version above.
        let back = Entity::apply_by(
            Some(&still),
            &set(5, vec![upsert("customer", 1, "b")]),
            &rules,
        );
        let Applied::Changed {
            entity,
            mut changed_tables,
        } = back
        else {
            panic!("expected it back, got {back:?}")
        };
        changed_tables.sort();
        assert_eq!(
            changed_tables,
            vec![Arc::from("customer"), Arc::from("orders")]
        );
        assert_eq!(entity.version, 3);
        assert!(entity.is_live());
        assert_eq!(entity.row_count(), 3);
    }

    #[test]
    fn an_entity_with_no_row_left_comes_back_above_its_last_version() {
        let rules = Rules {
            now_micros: 5,
            ..Rules::default()
        };
        let e = changed(Entity::apply_by(
            None,
            &set(1, vec![upsert("orders", 1, "a")]),
            &rules,
        ));
        let (_, gone) = retired(Entity::apply_by(
            Some(&e),
            &set(2, vec![delete("orders", 1)]),
            &rules,
        ));
        assert_eq!((gone.version, gone.row_count()), (2, 0));
        // A replay of the first set is older than what it reflects.
        assert_eq!(
            Entity::apply_by(Some(&gone), &set(1, vec![upsert("orders", 1, "a")]), &rules),
            Applied::Stale
        );
        let back = changed(Entity::apply_by(
            Some(&gone),
            &set(3, vec![upsert("orders", 2, "b")]),
            &rules,
        ));
        assert_eq!(back.version, 3);
        // Dropped from memory, a shard's floor keeps a new one above it.
        let floor = Rules {
            floor: gone.version,
            ..rules
        };
        let new = changed(Entity::apply_by(
            None,
            &set(4, vec![upsert("orders", 3, "c")]),
            &floor,
        ));
        assert_eq!(new.version, 3);
    }
}
