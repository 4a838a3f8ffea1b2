//! Entities read straight from their sources: staleness bounds and
//! sync-on-access entity types.
//!
//! A fetch reads, for one entity, every row each of its tables has in its
//! source right now (one query per table: `WHERE <id_column> = <id>`, or
//! through the `id_via` link table, or the table's own `fetch` query). The
//! result goes onto the bus as a [`FetchedEntity`] in the entity's partition,
//! so the partition's applier stays the only writer of its entities: the
//! fetched tables replace what the entity held, a new version is made only
//! when something differs, watchers and the entities topic see it, and
//! snapshots keep it.
//!
//! One fetch per entity at a time: requests that need the same entity while
//! a fetch of it is running wait for that fetch instead of starting another.
//! The fetch runs in its own task, so a caller that gives up does not leave
//! the others waiting on nothing.
//!
//! - **Staleness bound** (`max_staleness_ms` on a read): an entity is read
//!   from its sources when it is missing, when its partition is not served
//!   here (being rebuilt), or when it may be older than the bound. An entity
//!   of a change-captured type is as old as its sources are behind: 0 while
//!   every source feeding the type is connected and caught up, else the time
//!   since the later of the last transaction it read and the moment it
//!   stopped being caught up (a disconnect): see
//!   [`SourceStatus::staleness`](crate::sources::SourceStatus::staleness).
//!   Memory answers only once its partition has applied what those sources
//!   have read (waited for within what is left of the bound; else the
//!   sources are read). Tables whose sources cannot be read by query keep
//!   what memory has.
//! - **Sync-on-access types** (`sync = "on_access"`): nothing is captured;
//!   an entity is fetched when first read and again when a read finds it
//!   fetched longer ago than `max_age`. Entities not read for `evict_after`
//!   are dropped from memory, and beyond `max_entities` the least recently
//!   read go first.

use crate::app::Fabric;
use crate::bus::Offset;
use crate::config::{Config, EntityConfig};
use crate::event::{BusRecord, EntityKey, FetchedEntity, Value};
use crate::freshness::{MinPosition, Wants};
use crate::sources::sql_poll::{EntityReader, Lookup};
use crate::store::Entity;
use dashmap::DashMap;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tonic::{Code, Status};

/// How long a fetched entity may take to be applied before the fetch says so.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// How one micro-DB table is fetched.
struct TablePlan {
    table: Arc<str>,
    source: Arc<str>,
    from: String,
    lookup: Lookup,
    primary_key: Vec<String>,
}

/// How one entity type is fetched.
struct TypePlan {
    /// The tables whose sources can be read by query.
    tables: Vec<TablePlan>,
    root: Option<Arc<str>>,
    on_access: bool,
    max_age: Duration,
    evict_after: Duration,
    max_entities: usize,
    max_bytes: Option<u64>,
    /// The sources feeding the type, for its staleness.
    sources: Vec<Arc<str>>,
}

/// When an entity was fetched and last read (sync-on-access types).
struct Held {
    /// `None`: held (restored from a snapshot) but never fetched by this process.
    fetched: Option<Instant>,
    /// Milliseconds since the fetcher started.
    read_ms: AtomicU64,
    /// About the memory the entity holds, as last fetched.
    bytes: u64,
}

type Outcome = Result<Option<Arc<Entity>>, (Code, String)>;

/// Fetches entities from their sources; see the module docs.
pub struct Fetcher {
    /// Swapped whole by a live reload ([`Fetcher::replan`]).
    plans: arc_swap::ArcSwap<Plans>,
    flights: Mutex<HashMap<EntityKey, watch::Receiver<Option<Outcome>>>>,
    held: DashMap<EntityKey, Held>,
    started: Instant,
}

impl Fetcher {
    /// The fetch plans of every entity type, and a reader per source that
    /// can be read by query (connections open on first use).
    pub fn new(config: &Config) -> Result<Self, String> {
        Ok(Fetcher {
            plans: arc_swap::ArcSwap::from_pointee(Plans::of(config, None)?),
            flights: Mutex::new(HashMap::new()),
            held: DashMap::new(),
            started: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The plans of a new config (a live reload): readers of sources whose
    /// place did not change are kept, with their open connections.
    pub fn replan(&self, config: &Config) -> Result<(), String> {
        let next = Plans::of(config, Some(&self.plans.load()))?;
        self.plans.store(Arc::new(next));
        Ok(())
    }

    /// True when entities of `entity_type` are fetched on access.
    pub fn on_access(&self, entity_type: &str) -> bool {
        self.plans
            .load()
            .types
            .get(entity_type)
            .is_some_and(|t| t.on_access)
    }

    /// Entities restored from snapshots: those of sync-on-access types are
    /// held, never fetched here (their first read fetches them).
    pub fn restored(&self, entity: &Entity) {
        if self.on_access(&entity.key.entity_type) {
            self.held.insert(
                entity.key.clone(),
                Held {
                    fetched: None,
                    read_ms: AtomicU64::new(self.now_ms()),
                    bytes: entity.approx_bytes() as u64,
                },
            );
        }
    }

    /// How old `key`'s entity may be, for a staleness bound: `None` when
    /// unknown (never fetched, a source not caught up that never read).
    /// With it, how far each source of a captured type has read: memory is
    /// that old only once its partition has applied those positions.
    fn staleness(
        &self,
        fabric: &Fabric,
        plan: &TypePlan,
        key: &EntityKey,
    ) -> Option<(Duration, Wants)> {
        if plan.on_access {
            let age = self.held.get(key)?.fetched.map(|t| t.elapsed())?;
            return Some((age, Vec::new()));
        }
        let mut worst = Duration::ZERO;
        let mut read = Vec::with_capacity(plan.sources.len());
        for name in &plan.sources {
            let s = fabric.source(name)?;
            let st = &s.status;
            // Only a source streaming here counts as current (one elsewhere
            // or still snapshotting is judged by what it last read).
            let behind = match st.staleness()? {
                d if d.is_zero() && !matches!(st.state.lock().as_str(), "streaming") => {
                    return None;
                }
                d => d,
            };
            worst = worst.max(behind);
            match st.last_sent() {
                // Still in its initial snapshot: no position a read can
                // wait for yet (unknown, so the sources are read).
                Some(crate::event::Position::Snapshot(_)) => return None,
                Some(at) => read.push((s.name.clone(), MinPosition::At(at))),
                None => {}
            }
        }
        Some((worst, read))
    }

    /// What a read of `key` (of type `cfg`) serves when it must come from
    /// the sources: `Ok(None)` when memory will do (read the store as
    /// usual), `Ok(Some(e))` for the fetched entity, `Err(NOT_FOUND)` when
    /// the sources have no such entity. `bound` is the request's staleness
    /// bound; `serving` whether its partition is served here.
    pub async fn read_through(
        &self,
        fabric: &Arc<Fabric>,
        cfg: &EntityConfig,
        key: &EntityKey,
        bound: Option<Duration>,
        serving: bool,
    ) -> Result<Option<Arc<Entity>>, Status> {
        let plans = self.plans.load_full();
        let Some(plan) = plans.types.get(&cfg.name) else {
            return Ok(None);
        };
        if !plan.on_access && bound.is_none() {
            return Ok(None);
        }
        if plan.tables.is_empty() {
            return Err(Status::failed_precondition(format!(
                "entity type {:?} has no table whose source can be read by query \
                 (postgres_cdc, mysql_binlog, sql_poll, sqlite): it cannot be read with a staleness bound",
                cfg.name
            )));
        }
        // Forgotten on request: its sources may still hold it, and reading
        // it from them would bring it back.
        if fabric.store.is_blocked(key) {
            return Err(Status::not_found(format!(
                "{} {} was forgotten on request (ForgetEntity); it is not read from its sources \
                 until UnblockEntity",
                key.entity_type, key.id
            )));
        }
        if let Some(h) = self.held.get(key) {
            h.read_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        let limit = match (plan.on_access, bound) {
            (true, Some(b)) => b.min(plan.max_age),
            (true, None) => plan.max_age,
            (false, Some(b)) => b,
            (false, None) => return Ok(None),
        };
        let held = serving.then(|| fabric.store.get(key)).flatten();
        let young = match self.staleness(fabric, plan, key) {
            Some((age, read)) if age <= limit => {
                // As young as its sources once memory holds what they read:
                // wait for that within what is left of the bound, and no
                // longer than a read waits for positions
                // (`server.min_position_wait`), else read the sources.
                let within = (limit - age).min(fabric.config().min_position_wait());
                read.is_empty()
                    || held.is_none()
                    || crate::freshness::wait(
                        fabric,
                        &read,
                        key.partition(fabric.bus.partitions()),
                        std::time::Instant::now() + within,
                    )
                    .await
                    .is_ok()
            }
            _ => false,
        };
        if young && held.is_some() {
            return Ok(None);
        }
        // Looked for in the sources within the age, and not there: not there
        // (a sync-on-access id that does not exist costs one query per
        // `max_age`, not one per read).
        if young && plan.on_access && serving {
            return Err(Status::not_found(format!(
                "{} {} not found (not in its sources when last read from them)",
                key.entity_type, key.id
            )));
        }
        match self.refresh(fabric, key.clone()).await {
            Ok(Some(e)) => Ok(Some(e)),
            Ok(None) => Err(Status::not_found(format!(
                "{} {} not found (read from its sources)",
                key.entity_type, key.id
            ))),
            Err((code, msg)) => Err(Status::new(code, msg)),
        }
    }

    /// Fetches `key` from its sources, once however many ask at the same
    /// time, and returns the entity as then held (or built from the fetch
    /// when its partition is not served here).
    async fn refresh(&self, fabric: &Arc<Fabric>, key: EntityKey) -> Outcome {
        let mut rx = {
            let mut flights = self.flights.lock();
            match flights.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key.clone(), rx.clone());
                    let f = fabric.clone();
                    let k = key.clone();
                    tokio::spawn(async move {
                        let out = f.fetcher.fetch_and_apply(&f, &k).await;
                        f.fetcher.flights.lock().remove(&k);
                        let _ = tx.send(Some(out));
                    });
                    rx
                }
            }
        };
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().expect("waited for a result"),
            Err(_) => Err((
                Code::Internal,
                format!("the fetch of {key} ended without an answer"),
            )),
        }
    }

    /// Reads every fetchable table of `key`, puts the result on the bus and
    /// waits until it is applied.
    async fn fetch_and_apply(&self, fabric: &Fabric, key: &EntityKey) -> Outcome {
        let plans = self.plans.load_full();
        let plan = plans
            .types
            .get(&*key.entity_type)
            .ok_or((Code::Internal, format!("no fetch plan for {key}")))?;
        let mut tables = Vec::with_capacity(plan.tables.len());
        for t in &plan.tables {
            let reader = plans.readers.get(&*t.source).ok_or((
                Code::Unavailable,
                format!("source {} of {key} was removed by a reload", t.source),
            ))?;
            let rows = reader
                .rows(&t.from, &t.lookup, &key.id)
                .await
                .map_err(|e| {
                    let code = if e.retryable() {
                        Code::Unavailable
                    } else {
                        Code::FailedPrecondition
                    };
                    (
                        code,
                        format!("cannot read {key} from source {}: {e}", t.source),
                    )
                })?;
            fabric
                .metrics
                .source_fetches
                .get_or_create(&crate::telemetry::SourceTableLabel {
                    source: t.source.to_string(),
                    table: t.from.clone(),
                })
                .inc();
            let mut keyed = Vec::with_capacity(rows.len());
            for row in rows {
                let pk: Vec<Value> = t
                    .primary_key
                    .iter()
                    .map(|c| row.get(c).cloned().unwrap_or(Value::Null))
                    .collect();
                keyed.push((pk, row));
            }
            tables.push((t.table.clone(), keyed));
        }
        // A reload may have dropped one of these tables while the queries
        // ran: its rows must not come back behind the reload's truncate
        // (the plans are swapped before the truncates go on the bus).
        let now = self.plans.load();
        if !Arc::ptr_eq(&*now, &plans) {
            let current = now.types.get(&*key.entity_type);
            tables.retain(|(table, _)| {
                current.is_some_and(|p| p.tables.iter().any(|t| t.table == *table))
            });
        }
        drop(now);
        let set = FetchedEntity {
            key: key.clone(),
            tables,
            root: plan.root.clone(),
            fetched_micros: crate::sources::now_micros(),
        };
        let p = key.partition(fabric.bus.partitions());
        let state = &fabric.partitions[p as usize];
        let built = Entity::apply_fetched(None, &set);
        let offsets = fabric
            .bus
            .produce(vec![(p, BusRecord::Fetched(set))])
            .await
            .map_err(|e| (Code::Unavailable, format!("cannot keep {key}: {e}")))?;
        let at = offsets.first().copied().unwrap_or(Offset(0));
        // Counted as fetched only once what was fetched is there to read: a
        // read that finds an entity fetched within its age but not held
        // takes it for absent from the sources.
        let keep = || {
            if plan.on_access {
                let bytes = match &built {
                    crate::store::Applied::Changed { entity, .. } => entity.approx_bytes() as u64,
                    _ => 0,
                };
                self.held.insert(
                    key.clone(),
                    Held {
                        fetched: Some(Instant::now()),
                        read_ms: AtomicU64::new(self.now_ms()),
                        bytes,
                    },
                );
            }
        };
        if !state.serving() {
            // Kept once the partition's applier gets there; served as read.
            keep();
            return Ok(match built {
                crate::store::Applied::Changed { entity, .. } => Some(Arc::new(entity)),
                _ => None,
            });
        }
        let until = Instant::now() + APPLY_WAIT;
        loop {
            let applied = state.advanced.notified();
            tokio::pin!(applied);
            applied.as_mut().enable();
            if state.applied.load(Ordering::Acquire) > at.0 {
                keep();
                return Ok(fabric.store.get(key));
            }
            tokio::select! {
                _ = &mut applied => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tokio::time::sleep_until(until.into()) => {
                    return Err((
                        Code::Unavailable,
                        format!("{key} was read from its sources but not applied within {APPLY_WAIT:?}"),
                    ));
                }
            }
        }
    }

    /// `key` was forgotten: what this process remembers of fetching it goes
    /// too, so a read after a forget that allows a rebuild reads its sources
    /// again instead of taking it for absent from them.
    pub fn forgotten(&self, key: &EntityKey) {
        self.held.remove(key);
    }

    /// Drops sync-on-access entities not read for their type's
    /// `evict_after`, then the least recently read beyond `max_entities`
    /// and `max_bytes`. Returns how many were dropped.
    pub fn evict(&self, fabric: &Fabric) -> usize {
        let now = self.now_ms();
        let mut dropped = 0;
        let plans = self.plans.load_full();
        for (name, plan) in plans.types.iter().filter(|(_, p)| p.on_access) {
            let idle_ms = plan.evict_after.as_millis() as u64;
            let mut keep: Vec<(u64, u64, EntityKey)> = Vec::new();
            let mut old: Vec<EntityKey> = Vec::new();
            let mut bytes = 0u64;
            for h in self.held.iter().filter(|h| *h.key().entity_type == **name) {
                let read = h.read_ms.load(Ordering::Relaxed);
                if now.saturating_sub(read) >= idle_ms {
                    old.push(h.key().clone());
                } else {
                    bytes += h.bytes;
                    keep.push((read, h.bytes, h.key().clone()));
                }
            }
            let over_bytes = plan.max_bytes.is_some_and(|m| bytes > m);
            if keep.len() > plan.max_entities || over_bytes {
                // Least recently read first.
                keep.sort_unstable_by_key(|(read, _, _)| *read);
                let mut n = keep.len().saturating_sub(plan.max_entities);
                if let Some(max) = plan.max_bytes {
                    let mut left = bytes;
                    for (_, b, _) in &keep[..n] {
                        left -= b;
                    }
                    while left > max && n < keep.len() {
                        left -= keep[n].1;
                        n += 1;
                    }
                }
                old.extend(keep.drain(..n).map(|(_, _, k)| k));
            }
            let label = crate::telemetry::TypeLabel {
                entity_type: name.clone(),
            };
            for key in old {
                self.held.remove(&key);
                if fabric.store.evict(&key) {
                    dropped += 1;
                    fabric.metrics.evicted.get_or_create(&label).inc();
                }
            }
        }
        dropped
    }
}

/// Every entity type's fetch plan, and a reader per source that can be
/// read by query (connections open on first use).
struct Plans {
    types: HashMap<String, TypePlan>,
    readers: HashMap<String, Arc<EntityReader>>,
    /// Where each reader reads, to keep a reader a reload did not move.
    urls: HashMap<String, String>,
}

impl Plans {
    fn of(config: &Config, previous: Option<&Plans>) -> Result<Plans, String> {
        let mut readers = HashMap::new();
        let mut urls = HashMap::new();
        for s in config
            .sources
            .iter()
            .filter(|s| crate::config::can_fetch(s.kind))
        {
            let url = match (&s.url, &s.path) {
                (Some(u), _) => u.clone(),
                (None, Some(p)) => format!("sqlite:{}", config.resolve(p).display()),
                (None, None) => continue,
            };
            let kept = previous.and_then(|p| {
                (p.urls.get(&s.name) == Some(&url))
                    .then(|| p.readers.get(&s.name).cloned())
                    .flatten()
            });
            let reader = match kept {
                Some(r) => r,
                None => Arc::new(
                    EntityReader::new(&s.name, &url, config, config.server.fetch_connections)
                        .map_err(|e| e.to_string())?,
                ),
            };
            readers.insert(s.name.clone(), reader);
            urls.insert(s.name.clone(), url);
        }
        let types = config
            .entities
            .iter()
            .map(|e| (e.name.clone(), plan(e, &readers)))
            .collect();
        Ok(Plans {
            types,
            readers,
            urls,
        })
    }
}

/// The fetch plan of one entity type.
fn plan(e: &EntityConfig, readers: &HashMap<String, Arc<EntityReader>>) -> TypePlan {
    let mut tables = Vec::new();
    for t in &e.tables {
        if !readers.contains_key(&t.source) {
            continue;
        }
        let lookup = match (&t.fetch, &t.id_column, &t.id_via) {
            (Some(sql), _, _) => Lookup::Sql(sql.clone()),
            (None, Some(c), _) => Lookup::Column(c.clone()),
            (None, None, Some(via)) => {
                let Some(link) = e.table(&via.table) else {
                    continue;
                };
                let (Some(link_id), Some(link_key)) = (&link.id_column, link.primary_key.first())
                else {
                    continue;
                };
                if link.source != t.source {
                    // Not derivable (the config refuses it for on-access
                    // types); a staleness read keeps what memory has.
                    continue;
                }
                Lookup::Via {
                    column: via.column.clone(),
                    link_table: link.from.clone(),
                    link_key: link_key.clone(),
                    link_id: link_id.clone(),
                }
            }
            (None, None, None) => continue,
        };
        tables.push(TablePlan {
            table: t.name.as_str().into(),
            source: t.source.as_str().into(),
            from: t.from.clone(),
            lookup,
            primary_key: t.primary_key.clone(),
        });
    }
    let mut sources: Vec<Arc<str>> = e.tables.iter().map(|t| t.source.as_str().into()).collect();
    sources.sort();
    sources.dedup();
    TypePlan {
        tables,
        root: e.delete_with_root.then(|| e.root_table().into()),
        on_access: e.on_access(),
        max_age: e.max_age(),
        evict_after: e.evict_after(),
        max_entities: e.max_entities(),
        max_bytes: e.max_bytes,
        sources,
    }
}

/// Evicts now and then, until `stop`.
pub async fn evict_loop(fabric: Arc<Fabric>, stop: tokio_util::sync::CancellationToken) {
    if !fabric.config().entities.iter().any(|e| e.on_access()) {
        return;
    }
    let every = fabric
        .config()
        .entities
        .iter()
        .filter(|e| e.on_access())
        .map(|e| e.evict_after() / 10)
        .min()
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(100), Duration::from_secs(10));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let n = fabric.fetcher.evict(&fabric);
        if n > 0 {
            tracing::debug!(evicted = n, "sync-on-access entities dropped from memory");
        }
    }
}
