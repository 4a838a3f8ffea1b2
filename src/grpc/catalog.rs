//! `CatalogService`: what the fabric holds and where it comes from.

use crate::app::Fabric;
use crate::proto::catalog_service_server::CatalogService;
use crate::proto::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tonic::{Request, Response, Status};

pub struct CatalogApi {
    pub fabric: Arc<Fabric>,
    /// The other processes (Kafka bus): lineage of an entity held elsewhere
    /// is asked of its holder.
    pub peers: Arc<super::forward::Peers>,
}

#[tonic::async_trait]
impl CatalogService for CatalogApi {
    async fn list_entity_types(
        &self,
        request: Request<ListEntityTypesRequest>,
    ) -> Result<Response<ListEntityTypesResponse>, Status> {
        let f = &self.fabric;
        f.allow(&request, "ListEntityTypes", crate::access::Action::Catalog)?;
        let entity_types = f
            .config()
            .entities
            .iter()
            .map(|e| EntityTypeInfo {
                name: e.name.clone(),
                id_type: e.id_type.as_str().into(),
                root_table: e.root_table().into(),
                description: e.description.clone().unwrap_or_default(),
                owner: e.owner.clone().unwrap_or_default(),
                entity_count: f.store.entity_count(&e.name),
                blocked_count: f.store.blocked_count(&e.name),
                tables: e
                    .tables
                    .iter()
                    .map(|t| TableInfo {
                        name: t.name.clone(),
                        source: t.source.clone(),
                        from: t.from.clone(),
                        id_column: t.id_column.clone().unwrap_or_default(),
                        id_via: t
                            .id_via
                            .as_ref()
                            .map(|v| format!("{}.{}", v.table, v.column))
                            .unwrap_or_default(),
                        primary_key: t.primary_key.clone(),
                    })
                    .collect(),
                views: e
                    .views
                    .iter()
                    .map(|(name, v)| ViewInfo {
                        name: name.clone(),
                        tables: v.tables.clone(),
                        columns: v.columns.clone(),
                        masks: v
                            .mask
                            .iter()
                            .map(|(c, m)| (c.clone(), format!("{m:?}").to_lowercase()))
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListEntityTypesResponse { entity_types }))
    }

    async fn list_sources(
        &self,
        request: Request<ListSourcesRequest>,
    ) -> Result<Response<ListSourcesResponse>, Status> {
        let f = &self.fabric;
        f.allow(&request, "ListSources", crate::access::Action::Catalog)?;
        let routed = f.routed.lock().clone();
        let sources = f
            .sources()
            .iter()
            .map(|s| SourceInfo {
                name: s.name.to_string(),
                kind: s.kind.as_str().into(),
                state: s.status.state.lock().clone(),
                routed_position: routed
                    .get(&s.name)
                    .cloned()
                    .flatten()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                durable_position: s
                    .durable
                    .borrow()
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                transactions: s.status.transactions.load(Ordering::Relaxed),
                changes: s.status.changes.load(Ordering::Relaxed),
                lag_millis: s.status.lag_millis(),
                caught_up: s.status.caught_up(),
                // Whole, for whoever may read the catalog: the reason names
                // users, hosts and tables an operator needs (the status page,
                // a thing of screens and screenshots, cuts quoted spans).
                last_error: s.status.last_error.lock().clone(),
                dead_lettered: f.dead_letters.count(&s.name),
                progress: s.status.progress.report().map(progress),
            })
            .collect();
        Ok(Response::new(ListSourcesResponse { sources }))
    }

    async fn get_lineage(
        &self,
        request: Request<GetLineageRequest>,
    ) -> Result<Response<GetLineageResponse>, Status> {
        const METHOD: &str = "GetLineage";
        let f = &self.fabric;
        let _t = super::Timer::start(f, METHOD);
        let r = request.get_ref();
        let read = crate::access::Action::Read {
            ty: &r.r#type,
            view: "",
        };
        f.allow(&request, METHOD, read)?;
        let (key, _) = super::entity::resolve(f, &r.r#type, &r.id, "")?;
        if !f.store.keeps_lineage(&key.entity_type) {
            return Err(Status::failed_precondition(format!(
                "entity type {:?} does not keep lineage; set `lineage = true` on it",
                &*key.entity_type
            )));
        }
        let peers = &*self.peers;
        let out = super::forward::on_holder(
            f,
            peers,
            &request,
            &key,
            || async {
                let e = f
                    .store
                    .get(&key)
                    .ok_or_else(|| super::entity::not_found(f, &key))?;
                Ok(lineage(f, &e))
            },
            |c, ask| async move {
                peers
                    .catalog_client(c)
                    .get_lineage(ask)
                    .await
                    .map(Response::into_inner)
            },
        )
        .await?;
        Ok(Response::new(out))
    }

    async fn list_partitions(
        &self,
        request: Request<ListPartitionsRequest>,
    ) -> Result<Response<ListPartitionsResponse>, Status> {
        let f = &self.fabric;
        f.allow(&request, "ListPartitions", crate::access::Action::Catalog)?;
        let partitions = f
            .partitions
            .iter()
            .enumerate()
            .map(|(p, st)| PartitionInfo {
                partition: p as u32,
                entity_count: f.store.shard_len(p as u32) as u64,
                applied_offset: st.applied.load(Ordering::Acquire),
                end_offset: f.bus.end_offset(p as u32).0,
                snapshot_offset: st.snapshot.load(Ordering::Acquire),
                owned: st.owned.load(Ordering::Acquire),
                serving: st.serving(),
                progress: st.rebuild.report().map(progress),
            })
            .collect();
        Ok(Response::new(ListPartitionsResponse { partitions }))
    }
}

/// A progress report as the catalog answers it.
pub fn progress(r: crate::progress::Report) -> crate::proto::Progress {
    crate::proto::Progress {
        what: r.what,
        unit: r.unit.into(),
        done: r.done,
        total: r.total,
        per_second: r.per_second,
        seconds_left: r.left.map(|l| l.as_secs()),
        elapsed_ms: r.elapsed.as_millis() as u64,
    }
}

/// The lineage of every row of `e`, table by table, in key order.
fn lineage(f: &crate::app::Fabric, e: &crate::store::Entity) -> GetLineageResponse {
    let config = f.config();
    let cfg = config.entity(&e.key.entity_type);
    let mut rows = Vec::new();
    for (table, kept) in e.tables.iter() {
        let t = cfg.and_then(|c| c.tables.iter().find(|t| *t.name == **table));
        let known = e.lineage.as_ref().and_then(|l| l.get(table));
        for (pk, _) in kept.iter() {
            let l = known.and_then(|k| k.get(pk));
            rows.push(RowLineage {
                table: table.to_string(),
                source: t.map(|t| t.source.clone()).unwrap_or_default(),
                source_table: t.map(|t| t.from.clone()).unwrap_or_default(),
                primary_key: pk
                    .iter()
                    .map(|v| crate::view::value_to_proto(v.as_value_ref()))
                    .collect(),
                position: l
                    .and_then(|l| l.position.as_ref())
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                commit_time_micros: l.map_or(0, |l| l.commit_micros),
                applied_time_micros: l.map_or(0, |l| l.applied_micros),
                fetched: l.is_some_and(|l| l.position.is_none()),
                recorded: l.is_some(),
            });
        }
    }
    GetLineageResponse {
        r#type: e.key.entity_type.to_string(),
        id: e.key.id.to_string(),
        version: e.version,
        rows,
    }
}
