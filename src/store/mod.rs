//! The micro-DB store: every entity's micro-database, in memory.
//!
//! Entities live in one `DashMap` per shard (a shard is a bus partition:
//! the applier of a partition is the only writer of its shard). Readers get an
//! `Arc<Entity>`: a consistent version, never a half-applied change set, and
//! no lock held after the lookup. Every change is also published on a
//! broadcast channel for `WatchEntities`. Beside the current version, each
//! entity keeps its type's `history` earlier versions (in memory only; not
//! in snapshots), for reads of a given version and watches that resume.
//!
//! An entity forgotten on request ([`Store::forget_into`]) leaves memory
//! with its history; when its later changes are blocked, the shard keeps a
//! mark (its key and when it was forgotten) that makes every later change
//! set and fetch of it a no-op ([`Outcome::Blocked`]) until it is
//! unblocked. Marks go into snapshots and the state topic with the shard.
//!
//! The store knows nothing of sources or of the bus: it applies change sets.

pub mod blocked;
pub mod keystore;
pub mod microdb;
pub mod row;
pub mod snapshot;

pub use microdb::{Applied, Entity, EntityV1, Lineage, LineageRows, RowLineage, TableRows};
pub use row::{Pk, StoredRow, ValueRef};

use crate::event::{EntityChangeSet, EntityKey, TruncateTable};
use dashmap::DashMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::broadcast;

/// What happened to an entity, for watchers.
#[derive(Debug, Clone)]
pub struct EntityChange {
    pub key: EntityKey,
    pub version: u64,
    /// The entity after the change; `None` when it was deleted.
    pub entity: Option<Arc<Entity>>,
    pub changed_tables: Vec<Arc<str>>,
    /// The entity was forgotten on request (`entity` is `None`): readers
    /// downstream should erase their copies, not only drop the entity.
    pub forgotten: bool,
    /// The entity before the change, when it was held: the state topic
    /// writes what differs between the two (rows, not the whole entity).
    pub previous: Option<Arc<Entity>>,
    /// What the store keeps of an entity readers no longer see (retired:
    /// deleted at its sources, see [`Entity::gone_micros`]): the state topic
    /// writes it in place of `entity`.
    pub retained: Option<Arc<Entity>>,
    /// Nothing readers see changed (a retired entity's hidden rows changed,
    /// or the store dropped it): only the state topic writes it; watchers
    /// and the entities topic do not get it.
    pub quiet: bool,
}

impl EntityChange {
    /// A change with the entity after it.
    pub fn upsert(entity: Arc<Entity>, changed_tables: Vec<Arc<str>>) -> Self {
        EntityChange {
            key: entity.key.clone(),
            version: entity.version,
            entity: Some(entity),
            changed_tables,
            forgotten: false,
            previous: None,
            retained: None,
            quiet: false,
        }
    }

    /// The entity is gone (deleted at its sources) as of `version`.
    pub fn deleted(key: EntityKey, version: u64, changed_tables: Vec<Arc<str>>) -> Self {
        EntityChange {
            key,
            version,
            entity: None,
            changed_tables,
            forgotten: false,
            previous: None,
            retained: None,
            quiet: false,
        }
    }

    /// The same change, made to `previous`.
    pub fn after(mut self, previous: Option<Arc<Entity>>) -> Self {
        self.previous = previous;
        self
    }

    /// A change readers do not see: the store now keeps `retained` (a
    /// retired entity; `None`: nothing) in place of `previous`.
    pub fn quiet(key: EntityKey, retained: Option<Arc<Entity>>, previous: Arc<Entity>) -> Self {
        EntityChange {
            key,
            version: retained.as_ref().map_or(previous.version, |e| e.version),
            entity: None,
            changed_tables: Vec::new(),
            forgotten: false,
            previous: Some(previous),
            retained,
            quiet: true,
        }
    }

    /// What the store holds of the entity after the change, seen or not:
    /// what the state topic writes.
    pub fn held(&self) -> Option<&Arc<Entity>> {
        self.entity.as_ref().or(self.retained.as_ref())
    }
}

/// Blocked ids of one shard: forgotten entities whose later changes are
/// dropped, with when they were forgotten (microseconds since the epoch).
#[derive(Debug, Default)]
struct Blocked {
    keys: parking_lot::RwLock<HashMap<EntityKey, i64>>,
    /// `keys` is not empty: every apply asks, and almost always there is
    /// nothing blocked, so it pays one atomic load instead of a lock.
    any: std::sync::atomic::AtomicBool,
}

impl Blocked {
    fn contains(&self, key: &EntityKey) -> bool {
        self.any.load(Ordering::Acquire) && self.keys.read().contains_key(key)
    }

    fn insert(&self, key: EntityKey, at_micros: i64) -> bool {
        let mut keys = self.keys.write();
        let new = keys.insert(key, at_micros).is_none();
        self.any.store(true, Ordering::Release);
        new
    }

    fn remove(&self, key: &EntityKey) -> bool {
        let mut keys = self.keys.write();
        let was = keys.remove(key).is_some();
        self.any.store(!keys.is_empty(), Ordering::Release);
        was
    }

    fn clear(&self) {
        let mut keys = self.keys.write();
        keys.clear();
        self.any.store(false, Ordering::Release);
    }
}

/// What [`Store::forget_into`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forgot {
    /// The entity was held and is gone now.
    pub was_held: bool,
    /// Its later changes are dropped.
    pub blocked: bool,
}

/// One entity in its shard: the current version and, when its type keeps
/// history, the earlier versions kept (oldest first).
#[derive(Debug)]
struct Slot {
    current: Arc<Entity>,
    // Boxed: 8 bytes in every entity's slot instead of 32, and most
    // entities have no history (their type keeps none, or never changed).
    #[allow(clippy::box_collection)]
    past: Option<Box<std::collections::VecDeque<Arc<Entity>>>>,
}

impl Slot {
    fn new(current: Arc<Entity>) -> Self {
        Slot {
            current,
            past: None,
        }
    }

    /// Makes `next` current; the one it replaces joins the history when
    /// `keep` earlier versions are kept and `next` is a new version.
    fn replace(&mut self, next: Arc<Entity>, keep: usize) {
        let old = std::mem::replace(&mut self.current, next);
        if keep == 0 || old.version == self.current.version {
            return;
        }
        let past = self.past.get_or_insert_with(Default::default);
        past.push_back(old);
        while past.len() > keep {
            past.pop_front();
        }
    }
}

type Shard = DashMap<EntityKey, Slot>;

/// What [`Store::apply`] did with a change set (the entity itself went into
/// the store and, when it changed, to the watchers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Older than what the entity reflects: nothing done.
    Stale,
    /// Nothing changed; the source's position moved.
    Unchanged,
    /// The entity was forgotten and its changes are blocked: nothing done.
    Blocked,
    /// A new version.
    Changed,
    /// The entity is gone.
    Deleted,
}

/// All micro-DBs.
pub struct Store {
    shards: Vec<Shard>,
    /// Entity count per entity type (a reload may add types).
    counts: arc_swap::ArcSwap<HashMap<Arc<str>, Arc<AtomicI64>>>,
    /// Earlier versions kept per entity, per entity type (absent: none); a
    /// handful of types, looked up on every apply: a scan, no hashing.
    history: Vec<(Arc<str>, usize)>,
    changes: broadcast::Sender<Arc<EntityChange>>,
    /// Per shard, the forgotten ids whose changes are blocked.
    blocked: Vec<Blocked>,
    /// Entity types that keep the lineage of their rows (a handful).
    lineage: Vec<Arc<str>>,
    /// How each entity type's deleted entities retire (a reload may change
    /// it); a type not listed retires them with no root and for a day.
    retention: arc_swap::ArcSwap<Vec<(Arc<str>, Retention)>>,
    /// Per shard, the highest version of a retired entity it dropped: a new
    /// entity starts above it (see [`microdb::Rules::floor`]).
    floors: Vec<std::sync::atomic::AtomicU64>,
}

/// How one entity type's deleted entities retire.
#[derive(Debug, Clone)]
pub struct Retention {
    /// The root table, when deleting its row deletes the entity
    /// (`delete_with_root`): the entity's other rows are kept, hidden, and
    /// come back with a root row inserted again.
    pub root: Option<Arc<str>>,
    /// How long a retired entity is kept (its rows, its version) before it
    /// is dropped (`keep_deleted`).
    pub keep: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            root: None,
            keep: std::time::Duration::from_secs(24 * 3600),
        }
    }
}

impl Store {
    /// A store of `shards` shards for the given entity types; watchers may lag
    /// `watch_buffer` changes behind.
    pub fn new(shards: u32, entity_types: &[&str], watch_buffer: usize) -> Self {
        let (changes, _) = broadcast::channel(watch_buffer.max(1));
        Store {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
            counts: arc_swap::ArcSwap::from_pointee(
                entity_types
                    .iter()
                    .map(|t| (Arc::<str>::from(*t), Arc::new(AtomicI64::new(0))))
                    .collect(),
            ),
            history: Vec::new(),
            changes,
            blocked: (0..shards.max(1)).map(|_| Blocked::default()).collect(),
            lineage: Vec::new(),
            retention: Default::default(),
            floors: (0..shards.max(1)).map(|_| Default::default()).collect(),
        }
    }

    /// Retires deleted entities of the given types by these rules (also on
    /// a live reload).
    pub fn set_retention(&self, rules: impl IntoIterator<Item = (Arc<str>, Retention)>) {
        self.retention.store(Arc::new(rules.into_iter().collect()));
    }

    fn retention_of(&self, entity_type: &str) -> Retention {
        self.retention
            .load()
            .iter()
            .find(|(t, _)| **t == *entity_type)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }

    /// The highest version of a retired entity `shard` dropped.
    pub fn floor(&self, shard: u32) -> u64 {
        self.floors
            .get(shard as usize)
            .map_or(0, |f| f.load(Ordering::Acquire))
    }

    /// Raises `shard`'s floor to `version` (a restore, or a drop).
    pub fn raise_floor(&self, shard: u32, version: u64) {
        if let Some(f) = self.floors.get(shard as usize) {
            f.fetch_max(version, Ordering::AcqRel);
        }
    }

    /// Drops the retired entities of `shard` kept longer than their type's
    /// `keep_deleted` as of `now_micros`, raising the shard's floor to
    /// their versions; the state topic gets a quiet change for each (in
    /// `out`). Call only from the shard's single writer. Returns how many.
    pub fn sweep_into(
        &self,
        shard: u32,
        now_micros: i64,
        out: &mut Vec<Arc<EntityChange>>,
    ) -> usize {
        let Some(s) = self.shards.get(shard as usize) else {
            return 0;
        };
        let mut keeps: HashMap<Arc<str>, i64> = HashMap::new();
        let due: Vec<EntityKey> = s
            .iter()
            .filter(|e| {
                let Some(since) = e.value().current.gone_micros else {
                    return false;
                };
                let keep = *keeps.entry(e.key().entity_type.clone()).or_insert_with(|| {
                    self.retention_of(&e.key().entity_type).keep.as_micros() as i64
                });
                now_micros.saturating_sub(since) >= keep
            })
            .map(|e| e.key().clone())
            .collect();
        for key in &due {
            if let Some((_, slot)) = s.remove(key) {
                self.raise_floor(shard, slot.current.version);
                let change = EntityChange::quiet(key.clone(), None, slot.current);
                out.push(Arc::new(change));
            }
        }
        due.len()
    }

    /// Keeps `n` earlier versions of each entity of the given types.
    pub fn with_history<'a>(mut self, types: impl IntoIterator<Item = (&'a str, usize)>) -> Self {
        self.history = types
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(t, n)| (Arc::<str>::from(t), n))
            .collect();
        self
    }

    /// Keeps the lineage of every row of the given types.
    pub fn with_lineage<'a>(mut self, types: impl IntoIterator<Item = &'a str>) -> Self {
        self.lineage = types.into_iter().map(Arc::<str>::from).collect();
        self
    }

    /// Whether `entity_type` keeps row lineage.
    pub fn keeps_lineage(&self, entity_type: &str) -> bool {
        self.lineage.iter().any(|t| **t == *entity_type)
    }

    /// The time of applying, when `key`'s type keeps lineage.
    fn lineage_now(&self, key: &EntityKey) -> Option<i64> {
        if self.lineage.is_empty() || !self.keeps_lineage(&key.entity_type) {
            return None;
        }
        Some(crate::sources::now_micros())
    }

    fn keep(&self, entity_type: &Arc<str>) -> usize {
        self.history
            .iter()
            .find(|(t, _)| Arc::ptr_eq(t, entity_type) || **t == **entity_type)
            .map_or(0, |(_, n)| *n)
    }

    /// Puts `entity` in place as the current version of `key`; true when the
    /// entity was not there before.
    fn put(&self, shard: &Shard, key: &EntityKey, entity: Arc<Entity>) -> bool {
        match shard.entry(key.clone()) {
            dashmap::Entry::Occupied(mut o) => {
                o.get_mut().replace(entity, self.keep(&key.entity_type));
                false
            }
            dashmap::Entry::Vacant(v) => {
                v.insert(Slot::new(entity));
                true
            }
        }
    }

    pub fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }

    fn shard(&self, key: &EntityKey) -> &Shard {
        &self.shards[key.partition(self.shard_count()) as usize]
    }

    /// The current version of an entity.
    pub fn get(&self, key: &EntityKey) -> Option<Arc<Entity>> {
        self.shard(key)
            .get(key)
            .map(|e| e.value().current.clone())
            .filter(|e| e.is_live())
    }

    /// What the store holds of an entity, retired or not (for its writer
    /// and the state topic; readers use [`Store::get`]).
    pub fn held(&self, key: &EntityKey) -> Option<Arc<Entity>> {
        self.shard(key).get(key).map(|e| e.value().current.clone())
    }

    /// Version `version` of an entity, if it is current or kept; else the
    /// versions kept (oldest first, empty when the entity does not exist).
    pub fn get_version(&self, key: &EntityKey, version: u64) -> Result<Arc<Entity>, Vec<u64>> {
        let Some(slot) = self.shard(key).get(key).filter(|s| s.current.is_live()) else {
            return Err(Vec::new());
        };
        if slot.current.version == version {
            return Ok(slot.current.clone());
        }
        let past = slot.past.iter().flat_map(|p| p.iter());
        if let Some(e) = past.clone().find(|e| e.version == version) {
            return Ok(e.clone());
        }
        Err(past
            .map(|e| e.version)
            .chain([slot.current.version])
            .collect())
    }

    /// Every version of an entity kept, the current one last.
    pub fn versions(&self, key: &EntityKey) -> Vec<Arc<Entity>> {
        let slot = self.shard(key).get(key).filter(|s| s.current.is_live());
        slot.map_or_else(Vec::new, |slot| {
            slot.past
                .iter()
                .flat_map(|p| p.iter().cloned())
                .chain([slot.current.clone()])
                .collect()
        })
    }

    /// Subscribes to every change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EntityChange>> {
        self.changes.subscribe()
    }

    fn count(&self, entity_type: &str, delta: i64) {
        if let Some(c) = self.counts.load().get(entity_type) {
            c.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Entities of one type.
    pub fn entity_count(&self, entity_type: &str) -> u64 {
        self.counts
            .load()
            .get(entity_type)
            .map_or(0, |c| c.load(Ordering::Relaxed).max(0) as u64)
    }

    /// Counts entities of `entity_types` too (a reload added them).
    pub fn add_entity_types<'a>(&self, entity_types: impl IntoIterator<Item = &'a str>) {
        let mut counts = (**self.counts.load()).clone();
        for t in entity_types {
            counts
                .entry(Arc::from(t))
                .or_insert_with(|| Arc::new(AtomicI64::new(0)));
        }
        self.counts.store(Arc::new(counts));
    }

    /// Entities in one shard.
    pub fn shard_len(&self, shard: u32) -> usize {
        self.shards.get(shard as usize).map_or(0, |s| s.len())
    }

    /// Applies one change set. Call only from the shard's single writer.
    pub fn apply(&self, set: &EntityChangeSet) -> Outcome {
        self.apply_into(set, &mut Vec::new())
    }

    /// As [`Store::apply`], also pushing the entity change (if any) to `out`.
    pub fn apply_into(&self, set: &EntityChangeSet, out: &mut Vec<Arc<EntityChange>>) -> Outcome {
        // One hash of the key for both lookups (every change applied asks).
        let i = set.key.partition(self.shard_count()) as usize;
        if self.blocked[i].contains(&set.key) {
            return Outcome::Blocked;
        }
        let shard = &self.shards[i];
        let current = shard.get(&set.key).map(|e| e.value().current.clone());
        let retention = self.retention_of(&set.key.entity_type);
        let lineage = self.lineage_now(&set.key);
        let rules = microdb::Rules {
            lineage,
            root: retention.root.as_deref(),
            floor: self.floors[i].load(Ordering::Acquire),
            now_micros: lineage.unwrap_or_else(crate::sources::now_micros),
        };
        let applied = Entity::apply_by(current.as_deref(), set, &rules);
        self.settle(&set.key, current, applied, out)
    }

    /// Applies an entity read straight from its sources (see
    /// [`Entity::apply_fetched`]). Call only from the shard's single writer.
    pub fn apply_fetched_into(
        &self,
        set: &crate::event::FetchedEntity,
        out: &mut Vec<Arc<EntityChange>>,
    ) -> Outcome {
        if self.is_blocked(&set.key) {
            return Outcome::Blocked;
        }
        let shard = self.shard(&set.key);
        let current = shard.get(&set.key).map(|e| e.value().current.clone());
        let applied =
            Entity::apply_fetched_with(current.as_deref(), set, self.lineage_now(&set.key));
        self.settle(&set.key, current, applied, out)
    }

    /// Drops an entity from memory without telling watchers (it did not
    /// change: a sync-on-access entity no longer held). True when it was there.
    pub fn evict(&self, key: &EntityKey) -> bool {
        match self.shard(key).remove(key) {
            Some((_, slot)) => {
                if slot.current.is_live() {
                    self.count(&key.entity_type, -1);
                }
                true
            }
            None => false,
        }
    }

    fn blocked_of(&self, key: &EntityKey) -> &Blocked {
        &self.blocked[key.partition(self.shard_count()) as usize]
    }

    /// The entity was forgotten and its later changes are dropped.
    pub fn is_blocked(&self, key: &EntityKey) -> bool {
        self.blocked_of(key).contains(key)
    }

    /// Forgets an entity: drops it (current version and history) and,
    /// with `block`, marks it so that its later changes are dropped. The
    /// watchers and `out` get a change with `forgotten` set when it was
    /// held. Call only from the shard's single writer.
    pub fn forget_into(
        &self,
        key: &EntityKey,
        block: bool,
        at_micros: i64,
        out: &mut Vec<Arc<EntityChange>>,
    ) -> Forgot {
        let removed = self.shard(key).remove(key);
        if block {
            self.blocked_of(key).insert(key.clone(), at_micros);
        }
        if removed
            .as_ref()
            .is_some_and(|(_, slot)| slot.current.is_live())
        {
            self.count(&key.entity_type, -1);
        }
        // Told even when not held (evicted, never fetched here, or held
        // by no one): the topics may hold it all the same, and downstream
        // copies are erased by this change, not by the entity's absence.
        let (version, tables) = removed.as_ref().map_or((0, Vec::new()), |(_, slot)| {
            (
                slot.current.version + 1,
                slot.current.tables.keys().cloned().collect(),
            )
        });
        let was_held = removed.is_some();
        // Built again later (not blocked, or unblocked), it starts above
        // the version of this delete.
        self.raise_floor(key.partition(self.shard_count()), version);
        let mut change = EntityChange::deleted(key.clone(), version, tables)
            .after(removed.map(|(_, slot)| slot.current));
        change.forgotten = true;
        self.publish(change, out);
        Forgot {
            was_held,
            blocked: block,
        }
    }

    /// Lets later changes build a forgotten entity again; true when it was
    /// blocked.
    pub fn unblock(&self, key: &EntityKey) -> bool {
        self.blocked_of(key).remove(key)
    }

    /// The blocked ids of one shard and when each was forgotten, sorted.
    pub fn blocked_in(&self, shard: u32) -> Vec<(EntityKey, i64)> {
        let Some(b) = self.blocked.get(shard as usize) else {
            return Vec::new();
        };
        let mut out: Vec<(EntityKey, i64)> =
            b.keys.read().iter().map(|(k, t)| (k.clone(), *t)).collect();
        out.sort();
        out
    }

    /// Every blocked id, all shards.
    pub fn blocked_all(&self) -> Vec<(EntityKey, i64)> {
        (0..self.shard_count())
            .flat_map(|s| self.blocked_in(s))
            .collect()
    }

    /// Makes `ids` the blocked ids, all shards (start-up, from the file that
    /// outlives snapshot rounds): marks not in it go, and entities it
    /// blocks leave memory (restored from a snapshot written before their
    /// forget). Returns how many entities left.
    pub fn set_blocked(&self, ids: Vec<(EntityKey, i64)>) -> usize {
        for b in &self.blocked {
            b.clear();
        }
        let mut evicted = 0;
        for (key, at) in ids {
            evicted += usize::from(self.evict(&key));
            self.restore_blocked(key, at);
        }
        evicted
    }

    /// Blocks a restored mark (start-up, or a partition assigned).
    pub fn restore_blocked(&self, key: EntityKey, at_micros: i64) {
        self.blocked_of(&key).insert(key, at_micros);
    }

    /// Blocked ids of one entity type.
    pub fn blocked_count(&self, entity_type: &str) -> u64 {
        self.blocked
            .iter()
            .map(|b| {
                b.keys
                    .read()
                    .keys()
                    .filter(|k| &*k.entity_type == entity_type)
                    .count() as u64
            })
            .sum()
    }

    /// Puts the result of an apply to `previous` in place and tells the
    /// watchers.
    fn settle(
        &self,
        key: &EntityKey,
        previous: Option<Arc<Entity>>,
        applied: Applied,
        out: &mut Vec<Arc<EntityChange>>,
    ) -> Outcome {
        let shard = self.shard(key);
        let was_live = previous.as_ref().is_some_and(|e| e.is_live());
        match applied {
            Applied::Stale => Outcome::Stale,
            Applied::Unchanged(e) => {
                self.put(shard, key, Arc::new(e));
                Outcome::Unchanged
            }
            Applied::Hidden(e) => {
                let e = Arc::new(e);
                self.put(shard, key, e.clone());
                if let Some(previous) = previous {
                    out.push(Arc::new(EntityChange::quiet(
                        key.clone(),
                        Some(e),
                        previous,
                    )));
                }
                Outcome::Unchanged
            }
            Applied::Changed {
                entity,
                changed_tables,
            } => {
                let entity = Arc::new(entity);
                self.put(shard, key, entity.clone());
                if !was_live {
                    self.count(&key.entity_type, 1);
                }
                self.publish(
                    EntityChange::upsert(entity, changed_tables).after(previous),
                    out,
                );
                Outcome::Changed
            }
            Applied::Deleted {
                version,
                changed_tables,
                retired,
            } => {
                let retired = retired.map(Arc::new);
                let held = match &retired {
                    Some(r) => {
                        self.put(shard, key, r.clone());
                        true
                    }
                    None => shard.remove(key).is_some(),
                };
                if held && was_live {
                    self.count(&key.entity_type, -1);
                }
                let mut change =
                    EntityChange::deleted(key.clone(), version, changed_tables).after(previous);
                change.retained = retired;
                self.publish(change, out);
                Outcome::Deleted
            }
        }
    }

    /// Clears one table in every entity of `shard` of the truncated type.
    /// Returns how many entities changed.
    pub fn truncate(&self, shard: u32, t: &TruncateTable) -> usize {
        self.truncate_into(shard, t, &mut Vec::new())
    }

    /// As [`Store::truncate`], also pushing the entity changes to `out`.
    pub fn truncate_into(
        &self,
        shard: u32,
        t: &TruncateTable,
        out: &mut Vec<Arc<EntityChange>>,
    ) -> usize {
        let Some(s) = self.shards.get(shard as usize) else {
            return 0;
        };
        let keys: Vec<EntityKey> = s
            .iter()
            .filter(|e| {
                e.key().entity_type == t.entity_type
                    && e.value().current.tables.contains_key(&t.table)
            })
            .map(|e| e.key().clone())
            .collect();
        let mut n = 0;
        for key in keys {
            let Some(cur) = s.get(&key).map(|e| e.value().current.clone()) else {
                continue;
            };
            let Some(next) = cur.truncated(&t.table, &t.source, &t.position) else {
                continue;
            };
            n += 1;
            if !cur.is_live() {
                // Retired: its hidden rows go, readers see nothing.
                let next = Arc::new(next);
                self.put(s, &key, next.clone());
                out.push(Arc::new(EntityChange::quiet(key, Some(next), cur)));
            } else if next.tables.is_empty() {
                // Its last rows went: retired, as a delete of them would.
                let mut next = next;
                next.gone_micros = Some(crate::sources::now_micros());
                let next = Arc::new(next);
                self.put(s, &key, next.clone());
                self.count(&key.entity_type, -1);
                let mut change = EntityChange::deleted(key, next.version, vec![t.table.clone()])
                    .after(Some(cur));
                change.retained = Some(next);
                self.publish(change, out);
            } else {
                let next = Arc::new(next);
                self.put(s, &key, next.clone());
                self.publish(
                    EntityChange::upsert(next, vec![t.table.clone()]).after(Some(cur)),
                    out,
                );
            }
        }
        n
    }

    fn publish(&self, change: EntityChange, out: &mut Vec<Arc<EntityChange>>) {
        let change = Arc::new(change);
        out.push(change.clone());
        // No receiver is fine: nobody is watching.
        let _ = self.changes.send(change);
    }

    /// Every entity of one shard, for a snapshot (cheap: `Arc` clones).
    pub fn shard_entities(&self, shard: u32) -> Vec<Arc<Entity>> {
        self.shards
            .get(shard as usize)
            .map(|s| s.iter().map(|e| e.value().current.clone()).collect())
            .unwrap_or_default()
    }

    /// Removes every entity (and blocked id) of one shard (its partition
    /// moved to another process); returns how many entities. Watchers are
    /// not told: the entities did not change, this process stopped holding
    /// them.
    pub fn drop_shard(&self, shard: u32) -> usize {
        let Some(s) = self.shards.get(shard as usize) else {
            return 0;
        };
        self.blocked[shard as usize].clear();
        let mut n = 0;
        s.retain(|k, slot| {
            if slot.current.is_live() {
                self.count(&k.entity_type, -1);
            }
            n += 1;
            false
        });
        self.floors[shard as usize].store(0, Ordering::Release);
        n
    }

    /// Puts a restored entity in place (start-up, or a partition assigned);
    /// false when it is blocked (forgotten: restore its shard's blocked ids
    /// first) and was left out.
    pub fn restore(&self, entity: Entity) -> bool {
        if self.is_blocked(&entity.key) {
            return false;
        }
        let key = entity.key.clone();
        let live = entity.is_live();
        let was_live = self
            .shard(&key)
            .insert(key.clone(), Slot::new(Arc::new(entity)))
            .is_some_and(|slot| slot.current.is_live());
        match (was_live, live) {
            (false, true) => self.count(&key.entity_type, 1),
            (true, false) => self.count(&key.entity_type, -1),
            _ => {}
        }
        true
    }

    /// The ids of one entity type, sorted (ints numerically), after `after`,
    /// at most `limit`. Linear in the number of entities: only the page is
    /// sorted, so paging through a million entities does not sort a million
    /// ids per page.
    /// Only shards for which `shards` answers true are listed.
    pub fn list_ids(
        &self,
        entity_type: &str,
        after: Option<&str>,
        limit: usize,
        shards: impl Fn(u32) -> bool,
    ) -> Vec<Arc<str>> {
        let after = after.map(IdOrder::of);
        let mut ids: Vec<(IdOrder, Arc<str>)> = Vec::new();
        for (i, s) in self.shards.iter().enumerate() {
            if !shards(i as u32) {
                continue;
            }
            for e in s.iter() {
                if &*e.key().entity_type != entity_type || !e.value().current.is_live() {
                    continue;
                }
                let id = &e.key().id;
                let k = IdOrder::of(id);
                if after.as_ref().is_none_or(|a| k > *a) {
                    ids.push((k, id.clone()));
                }
            }
        }
        if ids.len() > limit {
            ids.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            ids.truncate(limit);
        }
        ids.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        ids.into_iter().map(|(_, id)| id).collect()
    }

    /// Every entity of every shard, for walks over the whole store.
    /// At start, before anything applies: drops the restored rows of tables
    /// `keep(entity_type, table)` refuses (the config no longer has them,
    /// removed while the fabric was stopped, or by a reload whose truncates
    /// no snapshot holds yet), and the entities left with none. Returns the
    /// entities changed and dropped.
    pub fn drop_unconfigured(&self, keep: impl Fn(&str, &str) -> bool) -> (usize, usize) {
        let (mut changed, mut dropped) = (0, 0);
        for s in &self.shards {
            let keys: Vec<EntityKey> = s.iter().map(|e| e.key().clone()).collect();
            for key in keys {
                let Some(cur) = s.get(&key).map(|e| e.value().current.clone()) else {
                    continue;
                };
                let Some(next) = cur.without_tables(|t| keep(&key.entity_type, t)) else {
                    continue;
                };
                if next.tables.is_empty() {
                    s.remove(&key);
                    if cur.is_live() {
                        self.count(&key.entity_type, -1);
                    }
                    dropped += 1;
                } else {
                    self.put(s, &key, Arc::new(next));
                    changed += 1;
                }
            }
        }
        (changed, dropped)
    }

    pub fn for_each(&self, mut f: impl FnMut(&Arc<Entity>)) {
        for s in &self.shards {
            for e in s.iter() {
                f(&e.value().current);
            }
        }
    }
}

/// The order of ids in listings: integers numerically, before any text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum IdOrder {
    Int(i64),
    Text(String),
}

impl IdOrder {
    pub fn of(id: &str) -> Self {
        match id.parse::<i64>() {
            Ok(i) => IdOrder::Int(i),
            Err(_) => IdOrder::Text(id.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EntityChangeSet, Op, Position, TableChange, Value};

    fn add(store: &Store, id: &str) {
        let mut row = crate::event::Row::new();
        row.insert("id".into(), Value::Text(id.into()));
        store.apply(&EntityChangeSet {
            key: EntityKey::new("t", id),
            source: "s".into(),
            position: Position::Seq(1),
            commit_micros: 0,
            changes: vec![TableChange {
                table: "t".into(),
                op: Op::Insert,
                pk: vec![Value::Text(id.into())],
                row: Some(row),
            }],
            delete_entity: false,
        });
    }

    #[test]
    fn a_forgotten_entity_is_gone_and_stays_gone_until_unblocked() {
        let store = Store::new(4, &["t"], 16).with_history([("t", 3)]);
        let mut watch = store.subscribe();
        add(&store, "1");
        add(&store, "2");
        let key = EntityKey::new("t", "1");
        let mut out = Vec::new();
        let f = store.forget_into(&key, true, 77, &mut out);
        assert_eq!(
            f,
            Forgot {
                was_held: true,
                blocked: true
            }
        );
        assert!(store.get(&key).is_none() && store.versions(&key).is_empty());
        assert_eq!(store.entity_count("t"), 1);
        assert!(out[0].forgotten && out[0].entity.is_none());
        let mut seen = Vec::new();
        while let Ok(c) = watch.try_recv() {
            seen.push((c.key.id.to_string(), c.forgotten));
        }
        assert_eq!(seen.last(), Some(&("1".to_string(), true)));
        // Later changes are dropped; other entities are not affected.
        let p = key.partition(4);
        assert_eq!(store.blocked_in(p), vec![(key.clone(), 77)]);
        add(&store, "1");
        assert!(store.get(&key).is_none());
        assert!(store.get(&EntityKey::new("t", "2")).is_some());
        assert_eq!(store.blocked_count("t"), 1);
        // Unblocked: the next change builds it again, above the version
        // of its forget (2).
        assert!(store.unblock(&key));
        add(&store, "1");
        assert_eq!(store.get(&key).map(|e| e.version), Some(3));
        // Forgetting without a block lets the next change rebuild it.
        let f = store.forget_into(&key, false, 78, &mut Vec::new());
        assert!(f.was_held && !f.blocked && !store.is_blocked(&key));
        add(&store, "1");
        assert!(store.get(&key).is_some());
        // Forgetting what is not held still says so (the topics may hold
        // it), and a restored copy of a blocked entity is left out.
        let three = EntityKey::new("t", "3");
        let mut out = Vec::new();
        store.forget_into(&three, true, 80, &mut out);
        assert!(out[0].forgotten && out[0].key == three);
        let mut copy = (*store.get(&EntityKey::new("t", "2")).unwrap()).clone();
        copy.key = three.clone();
        assert!(!store.restore(copy));
        assert!(store.get(&three).is_none());
        // A shard dropped (partition moved away) drops its blocked ids too.
        store.forget_into(&key, true, 79, &mut Vec::new());
        store.drop_shard(p);
        assert!(!store.is_blocked(&key));
    }

    fn delete(store: &Store, id: &str, pos: u64, out: &mut Vec<Arc<EntityChange>>) {
        store.apply_into(
            &EntityChangeSet {
                key: EntityKey::new("t", id),
                source: "s".into(),
                position: Position::Seq(pos),
                commit_micros: 0,
                changes: vec![TableChange {
                    table: "t".into(),
                    op: Op::Delete,
                    pk: vec![Value::Text(id.into())],
                    row: None,
                }],
                delete_entity: true,
            },
            out,
        );
    }

    #[test]
    fn a_deleted_entity_is_kept_hidden_then_dropped_and_its_versions_go_on() {
        let store = Store::new(2, &["t"], 16).with_history([("t", 3)]);
        store.set_retention([(
            Arc::from("t"),
            Retention {
                root: Some("t".into()),
                keep: std::time::Duration::from_secs(10),
            },
        )]);
        let mut watch = store.subscribe();
        add(&store, "1");
        add(&store, "2");
        let key = EntityKey::new("t", "1");
        let p = key.partition(2);
        let mut out = Vec::new();
        delete(&store, "1", 2, &mut out);
        // Gone for readers, listings and counts; held for its writer and
        // the state topic, which got what it keeps.
        assert!(store.get(&key).is_none() && store.versions(&key).is_empty());
        assert_eq!(store.get_version(&key, 1), Err(Vec::new()));
        assert_eq!(store.entity_count("t"), 1);
        assert_eq!(
            store.list_ids("t", None, 10, |_| true),
            vec![Arc::from("2")]
        );
        let held = store.held(&key).unwrap();
        assert_eq!((held.version, held.is_live()), (2, false));
        assert!(out[0].entity.is_none() && !out[0].quiet);
        assert!(
            out[0]
                .retained
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, &held))
        );
        let mut seen = Vec::new();
        while let Ok(c) = watch.try_recv() {
            seen.push((c.key.id.to_string(), c.version, c.entity.is_some()));
        }
        assert_eq!(seen.last(), Some(&("1".to_string(), 2, false)));
        // Not dropped before its time; dropped after, quietly, and the
        // shard's floor holds its version.
        let now = held.gone_micros.unwrap();
        let mut out = Vec::new();
        assert_eq!(store.sweep_into(p, now + 9_000_000, &mut out), 0);
        assert_eq!(store.sweep_into(p, now + 10_000_000, &mut out), 1);
        assert!(out[0].quiet && out[0].held().is_none());
        assert!(store.held(&key).is_none());
        assert!(watch.try_recv().is_err(), "watchers are not told twice");
        assert_eq!(store.floor(p), 2);
        // Created again: above the version of its delete.
        add(&store, "1");
        assert_eq!(store.get(&key).map(|e| e.version), Some(3));
        assert_eq!(store.entity_count("t"), 2);
    }

    #[test]
    fn listing_pages_through_every_id_once_in_order() {
        let store = Store::new(4, &["t"], 16);
        for i in (1..=250).rev() {
            add(&store, &i.to_string());
        }
        add(&store, "zeta");
        add(&store, "alpha");
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.list_ids("t", after.as_deref(), 40, |_| true);
            if page.is_empty() {
                break;
            }
            after = page.last().map(|s| s.to_string());
            all.extend(page.into_iter().map(|s| s.to_string()));
        }
        let mut want: Vec<String> = (1..=250).map(|i| i.to_string()).collect();
        want.push("alpha".into());
        want.push("zeta".into());
        assert_eq!(all, want);
        assert_eq!(store.entity_count("t"), 252);
    }
}
