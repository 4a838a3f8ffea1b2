//! The gRPC façade: `EntityService`, `CatalogService`, `IngestService`, the
//! standard health service and server reflection (so `grpcurl` and any
//! stock client work without our `.proto` files).

mod catalog;
pub mod encode;
mod entity;
mod forget;
pub mod forward;
pub mod guard;
mod ingest;
pub mod wire;

use crate::app::Fabric;
use crate::proto::catalog_service_server::CatalogServiceServer;
use crate::proto::entity_server::entity_service_server::EntityServiceServer;
use crate::proto::ingest_service_server::IngestServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The fully qualified names of our services, for health.
pub const SERVICES: [&str; 3] = [
    "fabric.v1.EntityService",
    "fabric.v1.CatalogService",
    "fabric.v1.IngestService",
];

/// Binds `addr` now (so a busy port fails start-up) and returns the server future.
pub async fn serve(
    fabric: Arc<Fabric>,
    addr: SocketAddr,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    stop: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = Result<(), tonic::transport::Error>>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for gRPC on {addr}: {e}"))?;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // The builder's `tcp_nodelay` applies only to listeners it binds
    // itself: accepted connections get it here. Without it, a response's
    // frames written one after another wait for the peer's delayed ACK
    // (Nagle): about 40 ms per request for a client that waits for each.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            let conn = conn?;
            conn.set_nodelay(true)?;
            Ok::<_, std::io::Error>(conn)
        },
    );
    // Pushed transactions stream towards the server: HTTP/2's default
    // 64 KiB window would make a pusher wait for window updates.
    let server = &fabric.config().server;
    if !addr.ip().is_loopback() {
        if fabric.config().access.is_none() {
            tracing::warn!(%addr, "gRPC listens beyond loopback with no [access] section: every client may read every entity");
        } else if server.tls.is_none() {
            tracing::warn!(%addr, "gRPC listens beyond loopback without TLS: bearer tokens travel in clear");
        }
    }
    let (max_in, max_out) = (server.max_request_bytes, server.max_response_bytes);
    let peers = Arc::new(forward::Peers::new(&fabric.config())?);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &server.tls {
        builder = builder
            .tls_config(server_tls(&fabric.config(), tls)?)
            .map_err(|e| anyhow::anyhow!("server.tls: {e}"))?;
    }
    // With span export on, a span per call (named by its method, with the
    // OpenTelemetry RPC attributes), continuing the caller's trace when the
    // call carries a W3C `traceparent`; without, none is made.
    if fabric.config().log.otlp.is_some() {
        builder = builder.trace_fn(call_span);
    }
    let router = builder
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_concurrent_streams(server.max_streams_per_connection)
        // A client that vanished without closing its connection (its
        // watches open) is found out and its streams dropped.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .layer(guard::CatchPanicLayer {
            panics: fabric.metrics.grpc_panics.clone(),
        })
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            EntityServiceServer::new(entity::EntityApi::new(fabric.clone(), peers.clone()))
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(max_out),
        )
        .add_service(
            CatalogServiceServer::new(catalog::CatalogApi {
                fabric: fabric.clone(),
                peers,
            })
            .max_decoding_message_size(max_in)
            .max_encoding_message_size(max_out),
        )
        .add_service(
            IngestServiceServer::new(ingest::IngestApi { fabric })
                .max_decoding_message_size(max_in)
                .max_encoding_message_size(max_out),
        );
    Ok(router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }))
}

/// The span of one gRPC call (see [`serve`]).
fn call_span(request: &axum::http::Request<()>) -> tracing::Span {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let path = request.uri().path();
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""));
    let span = tracing::info_span!(
        "grpc",
        otel.name = %path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .extract(&Headers(request.headers()));
    // No parent in the call: the span starts a trace of its own.
    let _ = span.set_parent(parent);
    span
}

/// A call's headers, as OpenTelemetry's propagators read them.
struct Headers<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The server's TLS settings from `[server.tls]`, its files read now.
fn server_tls(
    config: &crate::config::Config,
    tls: &crate::config::TlsConfig,
) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let identity = Identity::from_pem(
        config.read_file("server.tls.cert_file", &tls.cert_file)?,
        config.read_file("server.tls.key_file", &tls.key_file)?,
    );
    let mut out = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        out = out
            .client_ca_root(Certificate::from_pem(
                config.read_file("server.tls.client_ca_file", ca)?,
            ))
            .client_auth_optional(tls.client_cert == crate::config::ClientCertMode::Optional);
    }
    Ok(out)
}

/// Marks every service (and the server as a whole, `""`) serving or not.
pub async fn set_serving(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    for s in SERVICES {
        reporter.set_service_status(s, status).await;
    }
}

/// Records a request's latency when dropped.
struct Timer<'a> {
    fabric: &'a Fabric,
    method: &'static str,
    started: Instant,
}

impl<'a> Timer<'a> {
    fn start(fabric: &'a Fabric, method: &'static str) -> Self {
        Timer {
            fabric,
            method,
            started: Instant::now(),
        }
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.fabric
            .metrics
            .grpc_latency
            .get_or_create(&crate::telemetry::MethodLabel {
                method: self.method,
            })
            .observe(self.started.elapsed().as_secs_f64());
        if matches!(
            self.method,
            "GetEntity" | "BatchGetEntities" | "ListEntities"
        ) {
            self.fabric
                .metrics
                .reads_all
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// One entity type of the config that was running when a call began (a
/// reload may swap the config while the call runs).
pub struct TypeRef {
    config: Arc<crate::config::Config>,
    index: usize,
}

impl std::ops::Deref for TypeRef {
    type Target = crate::config::EntityConfig;
    fn deref(&self) -> &Self::Target {
        &self.config.entities[self.index]
    }
}

/// The entity type config of `name`, or INVALID_ARGUMENT naming the known ones.
fn entity_type(fabric: &Fabric, name: &str) -> Result<TypeRef, Status> {
    let config = fabric.config();
    match config.entities.iter().position(|e| e.name == name) {
        Some(index) => Ok(TypeRef { config, index }),
        None => {
            let known: Vec<&str> = config.entities.iter().map(|e| e.name.as_str()).collect();
            Err(Status::invalid_argument(format!(
                "unknown entity type {} (known: {})",
                guard::shown(name),
                known.join(", ")
            )))
        }
    }
}
