//! `CatalogService`: what the fabric holds and where it comes from.

use crate::app::Fabric;
use crate::proto::catalog_service_server::CatalogService;
use crate::proto::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tonic::{Request, Response, Status};

pub struct CatalogApi {
    pub fabric: Arc<Fabric>,
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
            .config
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
            .sources
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
                last_error: s.status.last_error.lock().clone(),
                dead_lettered: f.dead_letters.count(&s.name),
                progress: s.status.progress.report().map(progress),
            })
            .collect();
        Ok(Response::new(ListSourcesResponse { sources }))
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
