//! Entity Fabric: one in-memory micro-database per business entity,
//! assembled from many sources by change data capture and served over gRPC.
//!
//! # Layout
//!
//! - [`config`] — the operator's TOML file, loaded and validated at once.
//! - [`event`] — values, rows, positions, source transactions, change sets.
//! - [`sources`] — connectors (`sqlite`, `jsonl`, `grpc_push`) behind one trait.
//! - [`router`] — maps row changes to entity keys (`id_column`, `id_via`).
//! - [`bus`] — the partitioned log between router and appliers (embedded).
//! - [`store`] — the micro-DBs (`DashMap` per partition), snapshot files and their keys.
//! - [`app`] — wiring: restore, tasks, snapshot rounds, acknowledgement, shutdown.
//! - [`grpc`] — `EntityService`, `CatalogService`, `IngestService`, health, reflection.
//! - [`admin`] — `/healthz`, `/metrics`, the status page ([`status`]), config plan and reload; its guard and client.
//! - [`secrets`] — `fabric init-secrets`: a deployment's CA, certificate and tokens, made once.
//! - [`bench`] — `fabric bench`: the fabric against Redis, PostgreSQL, Kafka and Debezium.
//! - [`freshness`] — reads that wait for source positions (read-your-writes).
//! - [`fuzzing`] — the fuzz targets' entry points (`fuzz/`, `scripts/fuzz.sh`).
//! - [`erase`] — forgetting entities on request (right to erasure).
//! - [`fetch`] — entities read straight from their sources (staleness bounds, sync on access).
//! - [`view`] — projections and masks applied on the way out.
//! - [`demo`] — the demo SQLite sources and their mutator.
//! - [`telemetry`] — logging, metric names, dead letters.
//! - [`progress`] — where long work stands (initial snapshots, restores).

pub mod access;
pub mod admin;
pub mod app;
pub mod bench;
pub mod bus;
pub mod config;
pub mod demo;
pub mod erase;
pub mod event;
pub mod fetch;
pub mod freshness;
pub mod fuzzing;
pub mod grpc;
pub mod memory;
pub mod progress;
pub mod publish;
pub mod router;
pub mod secrets;
pub mod sources;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod view;

/// Generated protobuf and gRPC code for `fabric.v1`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("fabric.v1");

    /// The `EntityService` server over pre-encoded entities (see `build.rs`).
    pub mod entity_server {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        include!(concat!(env!("OUT_DIR"), "/entity_server/fabric.v1.rs"));
    }

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/fabric_descriptor.bin"));
}
