//! `EntityService`: reads of micro-DBs.

use super::forward::{self, Route};
use super::{Timer, entity_type, guard};
use crate::access::Action;
use crate::app::Fabric;
use crate::event::EntityKey;
use crate::freshness;
use crate::grpc::wire::{BatchWire, EntityWire};
use crate::proto::entity_change::Operation;
use crate::proto::entity_server::entity_service_server::EntityService;
use crate::proto::{
    BatchGetEntitiesRequest, Entity, EntityChange, ForgetEntityRequest, ForgetEntityResponse,
    GetEntityRequest, ListEntitiesRequest, ListEntitiesResponse, UnblockEntityRequest,
    UnblockEntityResponse, WatchEntitiesRequest,
};
use crate::view::{self, View};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

const MAX_BATCH: usize = 10_000;
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

pub struct EntityApi {
    fabric: Arc<Fabric>,
    peers: Arc<forward::Peers>,
}

impl EntityApi {
    pub fn new(fabric: Arc<Fabric>, peers: Arc<forward::Peers>) -> Self {
        EntityApi { peers, fabric }
    }

    /// How long a read waits for its minimum positions.
    fn wait_until(&self, until: Option<std::time::Instant>) -> std::time::Instant {
        until
            .unwrap_or_else(|| std::time::Instant::now() + self.fabric.config().min_position_wait())
    }

    /// The entity as a read with staleness bound `bound` (or of a
    /// sync-on-access type) serves it, its partition served here; `None`
    /// when it exists neither here nor in its sources.
    async fn read_through(
        &self,
        cfg: &crate::config::EntityConfig,
        key: &EntityKey,
        bound: Option<std::time::Duration>,
    ) -> Result<Option<Arc<crate::store::Entity>>, Status> {
        match self
            .fabric
            .fetcher
            .read_through(&self.fabric, cfg, key, bound, true)
            .await
        {
            Ok(Some(e)) => Ok(Some(e)),
            Ok(None) => Ok(self.fabric.store.get(key)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// The current version of `key`, or the kept `version` of it.
    fn read_local(
        &self,
        key: &EntityKey,
        version: u64,
    ) -> Result<Arc<crate::store::Entity>, Status> {
        if version == 0 {
            return self
                .fabric
                .store
                .get(key)
                .ok_or_else(|| not_found(&self.fabric, key));
        }
        self.fabric.store.get_version(key, version).map_err(|kept| {
            if kept.is_empty() {
                return not_found(&self.fabric, key);
            }
            let kept: Vec<String> = kept.iter().map(u64::to_string).collect();
            Status::not_found(format!(
                "version {version} of {} {} is not kept (versions kept: {}; the entity type \
                 keeps `history` earlier versions)",
                key.entity_type,
                key.id,
                kept.join(", ")
            ))
        })
    }

    /// The encoded entity through `view`, from the version's cache.
    fn encode(&self, e: &crate::store::Entity, view: Option<&View>) -> bytes::Bytes {
        let all = self.fabric.views();
        let views = all.count(&e.key.entity_type);
        view::encoded(
            e,
            view,
            views,
            all.epoch,
            self.fabric.config().server.cache_encoded,
        )
    }
}

/// NOT_FOUND for `key`, saying so when it was forgotten on request.
pub(super) fn not_found(fabric: &Fabric, key: &EntityKey) -> Status {
    if fabric.store.is_blocked(key) {
        return Status::not_found(format!(
            "{} {} was forgotten on request (ForgetEntity); its changes are dropped until \
             UnblockEntity",
            key.entity_type, key.id
        ));
    }
    Status::not_found(format!("{} {} not found", key.entity_type, key.id))
}

/// A forwarded read's failure that may pass once a partition has moved:
/// the holder refused (it stopped holding it), or could not be reached (it
/// died and its lease has not run out: a transport error, `Unknown`).
pub(super) fn retryable(s: &Status) -> bool {
    use tonic::Code::*;
    matches!(
        s.code(),
        Unavailable | DeadlineExceeded | Unknown | Cancelled | Aborted
    )
}

/// UNAVAILABLE unless this process serves the entity's partition: on
/// Kafka, another process may own it, or it is being rebuilt here after
/// the group assigned it (an old version is never served as current).
pub(super) fn serving(fabric: &Fabric, key: &EntityKey) -> Result<(), Status> {
    let p = key.partition(fabric.bus.partitions());
    let st = &fabric.partitions[p as usize];
    if st.serving() {
        return Ok(());
    }
    use std::sync::atomic::Ordering::Acquire;
    let msg = if st.owned.load(Acquire) {
        format!(
            "{key} is in bus partition {p}, which this process is rebuilding \
             (applied {} of {}); retry shortly",
            st.applied.load(Acquire),
            st.ready_at.load(Acquire)
        )
    } else {
        format!(
            "{key} is in bus partition {p}, which another process of the group owns \
             (or is taking over); ask it, or retry"
        )
    };
    let mut status = Status::unavailable(msg);
    status.metadata_mut().insert(
        "retry-after-ms",
        tonic::metadata::MetadataValue::from_static("500"),
    );
    Err(status)
}

/// Checks type, id and view of a request.
pub(super) fn resolve(
    fabric: &Fabric,
    ty: &str,
    id: &str,
    view: &str,
) -> Result<(EntityKey, Option<Arc<View>>), Status> {
    let cfg = entity_type(fabric, ty)?;
    let key = key_of(&cfg, id)?;
    let view = resolve_view(fabric, ty, view)?;
    Ok((key, view))
}

/// The key of `id` in canonical form, or INVALID_ARGUMENT naming it.
fn key_of(cfg: &crate::config::EntityConfig, id: &str) -> Result<EntityKey, Status> {
    super::guard::check_id_len(id)?;
    let canonical = cfg.id_type.canonical(id).ok_or_else(|| {
        Status::invalid_argument(format!(
            "id {} is not a valid {} id for entity type {:?}",
            super::guard::shown(id),
            cfg.id_type.as_str(),
            cfg.name
        ))
    })?;
    Ok(EntityKey::new(cfg.name.as_str(), canonical))
}

fn resolve_view(fabric: &Fabric, ty: &str, view: &str) -> Result<Option<Arc<View>>, Status> {
    if view.is_empty() {
        return Ok(None);
    }
    let all = fabric.views();
    let views = all.of(ty);
    views
        .and_then(|v| v.get(view))
        .cloned()
        .map(Some)
        .ok_or_else(|| {
            let mut known: Vec<&str> = views
                .map(|v| v.keys().map(|k| k.as_str()).collect())
                .unwrap_or_default();
            known.sort();
            Status::invalid_argument(format!(
                "entity type {ty:?} has no view {} (views: {})",
                super::guard::shown(view),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<EntityChange, Status>> + Send>>;

#[tonic::async_trait]
impl EntityService for EntityApi {
    async fn get_entity(
        &self,
        request: Request<GetEntityRequest>,
    ) -> Result<Response<EntityWire>, Status> {
        let _t = Timer::start(&self.fabric, "GetEntity");
        let r = request.get_ref();
        let read = Action::Read {
            ty: &r.r#type,
            view: &r.view,
        };
        self.fabric.allow(&request, "GetEntity", read)?;
        let auth = forward::credentials(&request);
        let until = forward::deadline(&request);
        let hop = forward::forwarded(&request);
        let r = request.get_ref();
        let (key, view) = resolve(&self.fabric, &r.r#type, &r.id, &r.view)?;
        let cfg = entity_type(&self.fabric, &r.r#type)?;
        let wants = freshness::parse_request(&self.fabric.config(), &r.min_positions)?;
        let bound = r.max_staleness_ms.map(std::time::Duration::from_millis);
        let through =
            r.version == 0 && (bound.is_some() || self.fabric.fetcher.on_access(&cfg.name));
        let p = key.partition(self.fabric.bus.partitions());
        loop {
            let refused = match forward::route(&self.fabric, p) {
                Route::Local => {
                    freshness::wait(&self.fabric, &wants, p, self.wait_until(until)).await?;
                    if through
                        && let Some(e) = self
                            .fabric
                            .fetcher
                            .read_through(&self.fabric, &cfg, &key, bound, true)
                            .await?
                    {
                        return Ok(Response::new(EntityWire(self.encode(&e, view.as_deref()))));
                    }
                    return self
                        .read_local(&key, r.version)
                        .map(|e| Response::new(EntityWire(self.encode(&e, view.as_deref()))));
                }
                // Being rebuilt here: what the sources hold now is fresher
                // than waiting, when the request allows reading them.
                Route::Moving
                    if through
                        && self.fabric.rebuilt_from_state()
                        && self.fabric.partitions[p as usize]
                            .owned
                            .load(std::sync::atomic::Ordering::Acquire) =>
                {
                    return match self
                        .fabric
                        .fetcher
                        .read_through(&self.fabric, &cfg, &key, bound, false)
                        .await?
                    {
                        Some(e) => Ok(Response::new(EntityWire(self.encode(&e, view.as_deref())))),
                        None => Err(not_found(&self.fabric, &key)),
                    };
                }
                Route::Remote(addr) if !hop => {
                    let mut c = self.peers.client(&addr)?;
                    let ask = forward::outgoing(r.clone(), until, &auth);
                    match c.get_entity(ask).await {
                        Ok(e) => {
                            let bytes = prost::Message::encode_to_vec(&e.into_inner());
                            return Ok(Response::new(EntityWire(bytes.into())));
                        }
                        Err(s) if retryable(&s) => s,
                        Err(s) => return Err(s),
                    }
                }
                Route::Remote(_) | Route::Moving => match serving(&self.fabric, &key) {
                    Ok(()) => continue, // It became served meanwhile.
                    Err(s) => s,
                },
            };
            if !forward::pause(until).await {
                return Err(refused);
            }
        }
    }

    async fn batch_get_entities(
        &self,
        request: Request<BatchGetEntitiesRequest>,
    ) -> Result<Response<BatchWire>, Status> {
        let _t = Timer::start(&self.fabric, "BatchGetEntities");
        let r = request.get_ref();
        let read = Action::Read {
            ty: &r.r#type,
            view: &r.view,
        };
        self.fabric.allow(&request, "BatchGetEntities", read)?;
        let auth = &forward::credentials(&request);
        let until = forward::deadline(&request);
        let hop = forward::forwarded(&request);
        let r = request.get_ref();
        if r.ids.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} ids asked, at most {MAX_BATCH} per batch",
                r.ids.len()
            )));
        }
        let cfg = entity_type(&self.fabric, &r.r#type)?;
        let view = resolve_view(&self.fabric, &r.r#type, &r.view)?;
        let keys = r
            .ids
            .iter()
            .map(|id| key_of(&cfg, id))
            .collect::<Result<Vec<_>, _>>()?;
        let wants = freshness::parse_request(&self.fabric.config(), &r.min_positions)?;
        let bound = r.max_staleness_ms.map(std::time::Duration::from_millis);
        let through = bound.is_some() || self.fabric.fetcher.on_access(&cfg.name);
        let partitions = self.fabric.bus.partitions();
        // Partitions already known to reflect the positions asked.
        let mut waited = vec![wants.is_empty(); partitions as usize];
        // Fast path: every id served here.
        if keys
            .iter()
            .all(|k| self.fabric.partitions[k.partition(partitions) as usize].serving())
        {
            if !wants.is_empty() {
                for key in &keys {
                    let p = key.partition(partitions);
                    if !waited[p as usize] {
                        freshness::wait(&self.fabric, &wants, p, self.wait_until(until)).await?;
                        waited[p as usize] = true;
                    }
                }
            }
            let mut out = BatchWire::default();
            if through {
                let reads = keys.iter().map(|k| self.read_through(&cfg, k, bound));
                let found = futures::future::join_all(reads).await;
                for (id, f) in r.ids.iter().zip(found) {
                    match f? {
                        Some(e) => out.entities.push(self.encode(&e, view.as_deref())),
                        None => out.missing_ids.push(id.clone()),
                    }
                }
                return Ok(Response::new(out));
            }
            for (id, key) in r.ids.iter().zip(&keys) {
                match self.fabric.store.get(key) {
                    Some(e) => out.entities.push(self.encode(&e, view.as_deref())),
                    None => out.missing_ids.push(id.clone()),
                }
            }
            return Ok(Response::new(out));
        }
        // Otherwise per id: here, forwarded to its holder (one request per
        // holder), or waited for; answered in the order asked.
        let mut found: Vec<Option<bytes::Bytes>> = vec![None; keys.len()];
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        loop {
            let mut remote: std::collections::HashMap<String, Vec<usize>> = Default::default();
            let mut refused = None;
            let mut left = Vec::new();
            for i in pending {
                let key = &keys[i];
                match forward::route(&self.fabric, key.partition(partitions)) {
                    Route::Local => {
                        let p = key.partition(partitions);
                        if !waited[p as usize] {
                            freshness::wait(&self.fabric, &wants, p, self.wait_until(until))
                                .await?;
                            waited[p as usize] = true;
                        }
                        let e = if through {
                            self.read_through(&cfg, key, bound).await?
                        } else {
                            self.fabric.store.get(key)
                        };
                        found[i] = e.map(|e| self.encode(&e, view.as_deref()));
                    }
                    Route::Remote(addr) if !hop => remote.entry(addr).or_default().push(i),
                    Route::Remote(_) | Route::Moving => {
                        refused = serving(&self.fabric, key).err();
                        left.push(i);
                    }
                }
            }
            // Every holder asked at once.
            let mut asks = Vec::with_capacity(remote.len());
            for (addr, idx) in remote {
                let mut c = self.peers.client(&addr)?;
                let ask = BatchGetEntitiesRequest {
                    r#type: r.r#type.clone(),
                    ids: idx.iter().map(|i| r.ids[*i].clone()).collect(),
                    view: r.view.clone(),
                    min_positions: r.min_positions.clone(),
                    max_staleness_ms: r.max_staleness_ms,
                };
                asks.push(async move {
                    let answer = c
                        .batch_get_entities(forward::outgoing(ask, until, auth))
                        .await;
                    (idx, answer)
                });
            }
            for (idx, answer) in futures::future::join_all(asks).await {
                match answer {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        let by_id: std::collections::HashMap<String, bytes::Bytes> = resp
                            .entities
                            .into_iter()
                            .map(|e| (e.id.clone(), prost::Message::encode_to_vec(&e).into()))
                            .collect();
                        for i in idx {
                            // An id asked twice is answered twice.
                            found[i] = by_id.get(keys[i].id.as_ref()).cloned();
                        }
                    }
                    Err(s) if retryable(&s) => {
                        refused = Some(s);
                        left.extend(idx);
                    }
                    Err(s) => return Err(s),
                }
            }
            if left.is_empty() {
                break;
            }
            if !forward::pause(until).await {
                return Err(refused.unwrap_or_else(|| Status::unavailable("partitions moving")));
            }
            pending = left;
        }
        let mut out = BatchWire::default();
        for (i, f) in found.into_iter().enumerate() {
            match f {
                Some(b) => out.entities.push(b),
                None => out.missing_ids.push(r.ids[i].clone()),
            }
        }
        Ok(Response::new(out))
    }

    async fn list_entities(
        &self,
        request: Request<ListEntitiesRequest>,
    ) -> Result<Response<ListEntitiesResponse>, Status> {
        let _t = Timer::start(&self.fabric, "ListEntities");
        let list = Action::List {
            ty: &request.get_ref().r#type,
        };
        self.fabric.allow(&request, "ListEntities", list)?;
        let auth = forward::credentials(&request);
        let cluster = !forward::forwarded(&request) && self.fabric.members.get().is_some();
        let until = forward::deadline(&request);
        let r = request.get_ref();
        let cfg = entity_type(&self.fabric, &r.r#type)?;
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        // What this process serves (on Kafka: the partitions it holds) …
        let mut ids: Vec<String> = self
            .fabric
            .store
            .list_ids(&cfg.name, after, size + 1, |p| {
                self.fabric.partitions[p as usize].serving()
            })
            .into_iter()
            .map(|s| s.to_string())
            .collect();
        let mut more = false;
        // … merged with the same page of every other process.
        if cluster {
            let others: Vec<String> = self.fabric.members.get().map_or(Vec::new(), |m| {
                m.borrow()
                    .live
                    .values()
                    .filter(|m| m.member != self.fabric.member_id)
                    .map(|m| m.grpc.clone())
                    .collect()
            });
            for addr in others {
                let mut c = self.peers.client(&addr)?;
                let ask = ListEntitiesRequest {
                    r#type: r.r#type.clone(),
                    page_size: size as u32,
                    page_token: r.page_token.clone(),
                };
                let page = c
                    .list_entities(forward::outgoing(ask, until, &auth))
                    .await
                    .map_err(|s| {
                        Status::unavailable(format!(
                            "cannot list the entities another process holds ({addr}): {}; retry",
                            s.message()
                        ))
                    })?
                    .into_inner();
                more |= !page.next_page_token.is_empty();
                ids.extend(page.ids);
            }
            ids.sort_by_cached_key(|id| crate::store::IdOrder::of(id));
            ids.dedup();
        }
        more |= ids.len() > size;
        ids.truncate(size);
        Ok(Response::new(ListEntitiesResponse {
            next_page_token: if more {
                ids.last().cloned().unwrap_or_default()
            } else {
                String::new()
            },
            ids,
        }))
    }

    type WatchEntitiesStream = WatchStream;

    async fn watch_entities(
        &self,
        request: Request<WatchEntitiesRequest>,
    ) -> Result<Response<Self::WatchEntitiesStream>, Status> {
        let r = request.get_ref();
        let read = Action::Read {
            ty: &r.r#type,
            view: &r.view,
        };
        self.fabric.allow(&request, "WatchEntities", read)?;
        let auth = forward::credentials(&request);
        // On Kafka with several processes, a watch opened here (not one
        // forwarded by another process) covers every process: the changes
        // served here, merged with those each other process serves.
        let cluster = !forward::forwarded(&request) && self.fabric.members.get().is_some();
        let r = request.into_inner();
        let cfg = entity_type(&self.fabric, &r.r#type)?;
        let key = if r.id.is_empty() {
            None
        } else {
            let key = resolve(&self.fabric, &r.r#type, &r.id, "")?.0;
            if !cluster {
                serving(&self.fabric, &key)?;
            }
            Some(key)
        };
        resolve_view(&self.fabric, &r.r#type, &r.view)?;
        let slot = guard::WatchSlot::take(
            &self.fabric.metrics.grpc_watchers,
            self.fabric.config().server.max_watchers,
        )?;
        let fabric = self.fabric.clone();
        let peers = self.peers.clone();
        let ty: Arc<str> = cfg.name.as_str().into();
        // Subscribe before reading the current state, so nothing falls between.
        let rx = fabric.store.subscribe();
        let panics = self.fabric.metrics.grpc_panics.clone();
        let stream = async_stream(panics, move |tx| async move {
            let (itx, mut irx) = tokio::sync::mpsc::channel(64);
            spawn_reporting(
                local_changes(
                    fabric.clone(),
                    ty.clone(),
                    key.clone(),
                    r.view.clone(),
                    rx,
                    itx.clone(),
                ),
                itx.clone(),
                fabric.metrics.grpc_panics.clone(),
            );
            if cluster {
                let all = WatchEntitiesRequest {
                    id: String::new(),
                    from_version: 0,
                    ..r.clone()
                };
                let (opened, wait) = tokio::sync::oneshot::channel();
                tokio::spawn(peer_changes(
                    fabric.clone(),
                    peers.clone(),
                    all,
                    key.clone(),
                    itx.clone(),
                    opened,
                    auth.clone(),
                ));
                // The other processes' watches are subscribed before the
                // current state is read, so nothing falls between.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), wait).await;
            }
            drop(itx);
            // Versions below `from_version` are not wanted, live ones neither.
            let mut last_sent = r.from_version.saturating_sub(1);
            if let Some(k) = &key {
                for change in kept_versions(&fabric, &peers, k, &r, &auth).await {
                    let v = change.entity.as_ref().map_or(0, |e| e.version);
                    if v <= last_sent {
                        continue;
                    }
                    last_sent = v;
                    if tx.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                let item = tokio::select! {
                    item = irx.recv() => item,
                    // The client left: the feeding tasks end with this one.
                    _ = tx.closed() => return,
                };
                let Some(item) = item else { return };
                if let (Some(_), Ok(change)) = (&key, &item) {
                    let version = change.entity.as_ref().map_or(0, |e| e.version);
                    let deleted = change.operation == Operation::Delete as i32
                        || change.operation == Operation::Forget as i32;
                    if version <= last_sent && !deleted {
                        continue;
                    }
                    // A deleted entity that comes back starts again at version 1.
                    last_sent = if deleted { 0 } else { version };
                }
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(guard::Slotted {
            inner: Box::pin(stream),
            slot,
        })))
    }

    async fn forget_entity(
        &self,
        request: Request<ForgetEntityRequest>,
    ) -> Result<Response<ForgetEntityResponse>, Status> {
        super::forget::forget(&self.fabric, &self.peers, request).await
    }

    async fn unblock_entity(
        &self,
        request: Request<UnblockEntityRequest>,
    ) -> Result<Response<UnblockEntityResponse>, Status> {
        super::forget::unblock(&self.fabric, &self.peers, request).await
    }
}

/// What a watch of `key` sends first, oldest first: with `from_version`,
/// every version kept from it on (the oldest kept when it is older than
/// that); without, the current version. From here, or from the process
/// that holds the entity.
async fn kept_versions(
    fabric: &Fabric,
    peers: &forward::Peers,
    key: &crate::event::EntityKey,
    r: &WatchEntitiesRequest,
    auth: &forward::Credentials,
) -> Vec<EntityChange> {
    let view = fabric.views().get(&key.entity_type, &r.view);
    // A reload removed the view since the request was checked: nothing, not
    // the whole entity (the live part of the watch ends with the reason).
    if view.is_none() && !r.view.is_empty() {
        return Vec::new();
    }
    let view = view.as_deref();
    match forward::route(fabric, key.partition(fabric.bus.partitions())) {
        Route::Local if r.from_version == 0 => fabric
            .store
            .get(key)
            .map(|e| upsert(&e, view, Vec::new()))
            .into_iter()
            .collect(),
        Route::Local => fabric
            .store
            .versions(key)
            .iter()
            .filter(|e| e.version >= r.from_version)
            .map(|e| upsert(e, view, Vec::new()))
            .collect(),
        Route::Remote(addr) => {
            let Ok(mut c) = peers.client(&addr) else {
                return Vec::new();
            };
            let ask = |version| GetEntityRequest {
                r#type: r.r#type.clone(),
                id: key.id.to_string(),
                view: r.view.clone(),
                version,
                ..Default::default()
            };
            let Ok(current) = c.get_entity(forward::outgoing(ask(0), None, auth)).await else {
                return Vec::new();
            };
            let current = current.into_inner();
            let mut out = Vec::new();
            // The kept ones below the current version, asked one by one
            // (those no longer kept answer NOT_FOUND and are skipped).
            if r.from_version > 0 {
                let lowest = r
                    .from_version
                    .max(current.version.saturating_sub(MAX_KEPT_ASKED));
                for v in lowest..current.version {
                    if let Ok(e) = c.get_entity(forward::outgoing(ask(v), None, auth)).await {
                        out.push(EntityChange {
                            operation: Operation::Upsert as i32,
                            entity: Some(e.into_inner()),
                            changed_tables: Vec::new(),
                        });
                    }
                }
            }
            out.push(EntityChange {
                operation: Operation::Upsert as i32,
                entity: Some(current),
                changed_tables: Vec::new(),
            });
            out
        }
        Route::Moving => Vec::new(),
    }
}

/// Versions asked of another process for a watch that resumes: no type
/// keeps more.
const MAX_KEPT_ASKED: u64 = crate::config::MAX_HISTORY as u64;

/// The changes applied here to entities of type `ty` (or to `key`) while
/// their partition is served here.
async fn local_changes(
    fabric: Arc<Fabric>,
    ty: Arc<str>,
    key: Option<crate::event::EntityKey>,
    view_name: String,
    mut rx: tokio::sync::broadcast::Receiver<Arc<crate::store::EntityChange>>,
    tx: tokio::sync::mpsc::Sender<Result<EntityChange, Status>>,
) {
    let mut all = fabric.views();
    let mut view = all.get(&ty, &view_name);
    // Removed by a reload since the request was checked: the watch ends
    // before its first message, never falling back to the whole entity.
    let mut removed = !view_name.is_empty() && view.is_none();
    loop {
        if removed {
            let _ = tx
                .send(Err(Status::aborted(format!(
                    "a config reload removed view {view_name:?} of {ty}; watch again"
                ))))
                .await;
            return;
        }
        let next = tokio::select! {
            _ = fabric.streams_stop.cancelled() => return,
            _ = tx.closed() => return,
            c = rx.recv() => c,
        };
        let change = match next {
            Ok(c) => c,
            Err(RecvError::Closed) => return,
            Err(RecvError::Lagged(n)) => {
                let _ = tx
                    .send(Err(Status::resource_exhausted(format!(
                        "this watcher fell {n} changes behind (server.watch_buffer); reconnect to resume"
                    ))))
                    .await;
                return;
            }
        };
        if change.key.entity_type != ty || key.as_ref().is_some_and(|k| *k != change.key) {
            continue;
        }
        // A partition being rebuilt replays old versions: not news.
        let p = change.key.partition(fabric.bus.partitions());
        if !fabric.partitions[p as usize].serving() {
            continue;
        }
        // A reload changed the views: the next messages use the new one,
        // and a watch of a view or type the reload removed ends.
        let now = fabric.views();
        if now.epoch != all.epoch {
            all = now;
            view = all.get(&ty, &view_name);
            if fabric.config().entity(&ty).is_none() {
                let _ = tx
                    .send(Err(Status::aborted(format!(
                        "a config reload removed entity type {ty:?}; watch again"
                    ))))
                    .await;
                return;
            }
            removed = !view_name.is_empty() && view.is_none();
            if removed {
                continue;
            }
        }
        let tables: Vec<String> = change
            .changed_tables
            .iter()
            .map(|t| t.to_string())
            .collect();
        let msg = match &change.entity {
            Some(e) => upsert(e, view.as_deref(), tables),
            None => EntityChange {
                operation: if change.forgotten {
                    Operation::Forget
                } else {
                    Operation::Delete
                } as i32,
                entity: Some(Entity {
                    r#type: change.key.entity_type.to_string(),
                    id: change.key.id.to_string(),
                    version: change.version,
                    ..Default::default()
                }),
                changed_tables: tables,
            },
        };
        if tx.send(Ok(msg)).await.is_err() {
            return;
        }
    }
}

/// The changes every other live process serves, through a forwarded watch
/// of the whole type on each (re-opened as processes come and go), those of
/// `key` only when one is given.
async fn peer_changes(
    fabric: Arc<Fabric>,
    peers: Arc<forward::Peers>,
    all: WatchEntitiesRequest,
    key: Option<crate::event::EntityKey>,
    tx: tokio::sync::mpsc::Sender<Result<EntityChange, Status>>,
    opened: tokio::sync::oneshot::Sender<()>,
    auth: forward::Credentials,
) {
    let Some(members) = fabric.members.get() else {
        return;
    };
    let mut opened = Some(opened);
    let mut members = members.clone();
    let mut open: std::collections::HashMap<String, tokio::task::JoinHandle<()>> =
        Default::default();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let live: Vec<(String, String)> = members
            .borrow_and_update()
            .live
            .values()
            .filter(|m| m.member != fabric.member_id)
            .map(|m| (m.member.clone(), m.grpc.clone()))
            .collect();
        open.retain(|m, h| !h.is_finished() && live.iter().any(|(l, _)| l == m));
        for (member, addr) in live {
            if open.contains_key(&member) {
                continue;
            }
            let Ok(mut c) = peers.client(&addr) else {
                continue;
            };
            // Subscribed on the other side once its response arrives.
            let opening = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                c.watch_entities(forward::outgoing_stream(all.clone(), &auth)),
            )
            .await;
            let Ok(Ok(stream)) = opening else {
                continue; // Unreachable (dying?): tried again next round.
            };
            let (key, tx) = (key.clone(), tx.clone());
            open.insert(
                member,
                tokio::spawn(async move {
                    let mut stream = stream.into_inner();
                    loop {
                        let change = match stream.message().await {
                            Ok(Some(c)) => c,
                            Ok(None) => return,
                            // Its lag ends this watch as a local lag would:
                            // changes were lost.
                            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                                let _ = tx.send(Err(s)).await;
                                return;
                            }
                            Err(_) => return, // Gone; re-opened if still live.
                        };
                        let wanted = key
                            .as_ref()
                            .is_none_or(|k| change.entity.as_ref().is_some_and(|e| *e.id == *k.id));
                        if wanted && tx.send(Ok(change)).await.is_err() {
                            return;
                        }
                    }
                }),
            );
        }
        if let Some(o) = opened.take() {
            let _ = o.send(());
        }
        tokio::select! {
            _ = tx.closed() => break,
            _ = fabric.streams_stop.cancelled() => break,
            _ = members.changed() => {}
            _ = tick.tick() => {}
        }
    }
    for (_, h) in open {
        h.abort();
    }
}

fn upsert(e: &crate::store::Entity, view: Option<&View>, tables: Vec<String>) -> EntityChange {
    EntityChange {
        operation: Operation::Upsert as i32,
        entity: Some(view::to_proto(e, view)),
        changed_tables: tables,
    }
}

/// A stream fed by a task through a small channel; the task ends when the
/// client goes away.
fn async_stream<F, Fut>(
    panics: prometheus_client::metrics::counter::Counter,
    f: F,
) -> impl Stream<Item = Result<EntityChange, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<EntityChange, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    spawn_reporting(f(tx.clone()), tx, panics);
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Runs a task feeding a stream; if it panics, the stream ends with
/// INTERNAL (and a log line) rather than as if it were complete.
fn spawn_reporting<Fut>(
    task: Fut,
    tx: tokio::sync::mpsc::Sender<Result<EntityChange, Status>>,
    panics: prometheus_client::metrics::counter::Counter,
) where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let task = tokio::spawn(task);
    tokio::spawn(async move {
        if let Err(e) = task.await
            && e.is_panic()
        {
            panics.inc();
            let p = e.into_panic();
            tracing::error!(
                panic = guard::panic_message(&*p),
                "a WatchEntities stream's task panicked; the stream ends with INTERNAL"
            );
            let _ = tx
                .send(Err(Status::internal(
                    "internal error in this stream; the server logged it",
                )))
                .await;
        }
    });
}
