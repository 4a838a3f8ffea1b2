//! `EntityService`: reads of micro-DBs.

use super::forward::{self, Route};
use super::{Timer, entity_type};
use crate::app::Fabric;
use crate::event::EntityKey;
use crate::grpc::wire::{BatchWire, EntityWire};
use crate::proto::entity_change::Operation;
use crate::proto::entity_server::entity_service_server::EntityService;
use crate::proto::{
    BatchGetEntitiesRequest, Entity, EntityChange, GetEntityRequest, ListEntitiesRequest,
    ListEntitiesResponse, WatchEntitiesRequest,
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
    peers: forward::Peers,
}

impl EntityApi {
    pub fn new(fabric: Arc<Fabric>) -> Self {
        EntityApi {
            fabric,
            peers: forward::Peers::default(),
        }
    }

    /// The encoded entity through `view`, from the version's cache.
    fn encode(&self, e: &crate::store::Entity, view: Option<&View>) -> bytes::Bytes {
        let views = self
            .fabric
            .views
            .get(&*e.key.entity_type)
            .map_or(0, |v| v.len());
        view::encoded(e, view, views, self.fabric.config.server.cache_encoded)
    }
}

/// A forwarded read's failure that may pass once a partition has moved:
/// the holder refused (it stopped holding it), or could not be reached (it
/// died and its lease has not run out: a transport error, `Unknown`).
fn retryable(s: &Status) -> bool {
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
pub(super) fn resolve<'a>(
    fabric: &'a Fabric,
    ty: &str,
    id: &str,
    view: &str,
) -> Result<(EntityKey, Option<&'a View>), Status> {
    let cfg = entity_type(fabric, ty)?;
    let key = key_of(cfg, id)?;
    let view = resolve_view(fabric, ty, view)?;
    Ok((key, view))
}

/// The key of `id` in canonical form, or INVALID_ARGUMENT naming it.
fn key_of(cfg: &crate::config::EntityConfig, id: &str) -> Result<EntityKey, Status> {
    let canonical = cfg.id_type.canonical(id).ok_or_else(|| {
        Status::invalid_argument(format!(
            "id {id:?} is not a valid {} id for entity type {:?}",
            cfg.id_type.as_str(),
            cfg.name
        ))
    })?;
    Ok(EntityKey::new(cfg.name.as_str(), canonical))
}

fn resolve_view<'a>(fabric: &'a Fabric, ty: &str, view: &str) -> Result<Option<&'a View>, Status> {
    if view.is_empty() {
        return Ok(None);
    }
    let views = fabric.views.get(ty);
    views.and_then(|v| v.get(view)).map(Some).ok_or_else(|| {
        let mut known: Vec<&str> = views
            .map(|v| v.keys().map(|k| k.as_str()).collect())
            .unwrap_or_default();
        known.sort();
        Status::invalid_argument(format!(
            "entity type {ty:?} has no view {view:?} (views: {})",
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
        let until = forward::deadline(&request);
        let hop = forward::forwarded(&request);
        let r = request.get_ref();
        let (key, view) = resolve(&self.fabric, &r.r#type, &r.id, &r.view)?;
        let p = key.partition(self.fabric.bus.partitions());
        loop {
            let refused = match forward::route(&self.fabric, p) {
                Route::Local => {
                    return match self.fabric.store.get(&key) {
                        Some(e) => Ok(Response::new(EntityWire(self.encode(&e, view)))),
                        None => Err(Status::not_found(format!(
                            "{} {} not found",
                            key.entity_type, key.id
                        ))),
                    };
                }
                Route::Remote(addr) if !hop => {
                    let mut c = self.peers.client(&addr)?;
                    match c.get_entity(forward::outgoing(r.clone(), until)).await {
                        Ok(e) => {
                            let bytes = prost::Message::encode_to_vec(&e.into_inner());
                            return Ok(Response::new(EntityWire(bytes.into())));
                        }
                        Err(s) if retryable(&s) => s,
                        Err(s) => return Err(s),
                    }
                }
                Route::Remote(_) | Route::Moving => {
                    serving(&self.fabric, &key).expect_err("not served here")
                }
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
            .map(|id| key_of(cfg, id))
            .collect::<Result<Vec<_>, _>>()?;
        let partitions = self.fabric.bus.partitions();
        // Fast path: every id served here.
        if keys
            .iter()
            .all(|k| self.fabric.partitions[k.partition(partitions) as usize].serving())
        {
            let mut out = BatchWire::default();
            for (id, key) in r.ids.iter().zip(&keys) {
                match self.fabric.store.get(key) {
                    Some(e) => out.entities.push(self.encode(&e, view)),
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
                        found[i] = self.fabric.store.get(key).map(|e| self.encode(&e, view));
                    }
                    Route::Remote(addr) if !hop => remote.entry(addr).or_default().push(i),
                    Route::Remote(_) | Route::Moving => {
                        refused = serving(&self.fabric, key).err();
                        left.push(i);
                    }
                }
            }
            for (addr, idx) in remote {
                let mut c = self.peers.client(&addr)?;
                let ask = BatchGetEntitiesRequest {
                    r#type: r.r#type.clone(),
                    ids: idx.iter().map(|i| r.ids[*i].clone()).collect(),
                    view: r.view.clone(),
                };
                match c.batch_get_entities(forward::outgoing(ask, until)).await {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        let mut by_id: std::collections::HashMap<String, Entity> = resp
                            .entities
                            .into_iter()
                            .map(|e| (e.id.clone(), e))
                            .collect();
                        for i in idx {
                            found[i] = by_id
                                .remove(keys[i].id.as_ref())
                                .map(|e| prost::Message::encode_to_vec(&e).into());
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
        let r = request.get_ref();
        let cfg = entity_type(&self.fabric, &r.r#type)?;
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        // Only what this process serves (on Kafka: the partitions it owns).
        let ids = self.fabric.store.list_ids(&cfg.name, after, size + 1, |p| {
            self.fabric.partitions[p as usize].serving()
        });
        let more = ids.len() > size;
        let ids: Vec<String> = ids.into_iter().take(size).map(|s| s.to_string()).collect();
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
        let r = request.into_inner();
        let cfg = entity_type(&self.fabric, &r.r#type)?;
        let key = if r.id.is_empty() {
            None
        } else {
            let key = resolve(&self.fabric, &r.r#type, &r.id, "")?.0;
            serving(&self.fabric, &key)?;
            Some(key)
        };
        resolve_view(&self.fabric, &r.r#type, &r.view)?;
        let fabric = self.fabric.clone();
        let ty: Arc<str> = cfg.name.as_str().into();
        // Subscribe before reading the current state, so nothing falls between.
        let mut rx = fabric.store.subscribe();
        let stream = async_stream(move |tx| async move {
            let view = fabric.views.get(&*ty).and_then(|v| v.get(&r.view));
            let mut last_sent = 0u64;
            if let Some(k) = &key
                && let Some(e) = fabric.store.get(k)
                && e.version >= r.from_version
            {
                last_sent = e.version;
                if tx.send(Ok(upsert(&e, view, Vec::new()))).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    _ = fabric.streams_stop.cancelled() => return,
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
                if key.is_some() && change.version <= last_sent {
                    continue;
                }
                // A deleted entity that comes back starts again at version 1.
                last_sent = if change.entity.is_some() {
                    change.version
                } else {
                    0
                };
                let tables: Vec<String> = change
                    .changed_tables
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
                let msg = match &change.entity {
                    Some(e) => upsert(e, view, tables),
                    None => EntityChange {
                        operation: Operation::Delete as i32,
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
        });
        Ok(Response::new(Box::pin(stream)))
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
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<EntityChange, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<EntityChange, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
