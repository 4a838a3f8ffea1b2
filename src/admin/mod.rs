//! The admin HTTP endpoint: `/healthz`, `/metrics` (Prometheus text), the
//! status page `/status` with its data `/status.json` (see
//! [`crate::status`]), and live config changes: `POST /config/plan` (the
//! body is a config file's text: what it would change, nothing applied)
//! and `POST /config/reload` (the running file read again and applied, or
//! refused; see [`crate::app::reload`]), and `POST /sources/resync?source=S&table=T`
//! (a table read again while its source streams, `fabric resync`).
//!
//! `/healthz`, `/metrics`, `/` and the page `/status` (which holds no data
//! itself) are open: probes and scrapers present no credentials, and they
//! show no entity and no config. `/status.json`, the config routes and the
//! resync route are guarded ([`guard`]: host, origin, content type, principal, bounds).
//!
//! HTTP/1.1 only, served here rather than by `axum::serve` so that each
//! request knows its peer address and the client certificate TLS verified,
//! headers and TLS handshakes are timed out, and connections are counted
//! (`server.admin_max_connections`). A connection carries one request (no
//! keep-alive) and lives at most its header time, the request timeout and
//! a few seconds: a client that opens connections and sits on them, or
//! never reads its answer, frees its slots by itself. With `[server.tls]`
//! the endpoint serves the same certificate as gRPC (`server.admin_tls`),
//! verifying a client certificate when one is presented, and requiring one
//! when `client_cert = "required"` (probes then need one too).
//!
//! A config posted to `/config/plan` never reads this process's
//! environment or files, and no answer to it shows a value that a `${...}`
//! reference of the running config took ([`crate::config::Config::from_posted_toml`]).

pub mod client;
mod guard;

use crate::app::Fabric;
use crate::status::{Rates, StatusState};
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a client may take to send a request's headers, or a TLS
/// handshake.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish their request at stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request's connection tells about its client.
#[derive(Clone, Default)]
pub(crate) struct Conn {
    pub peer: Option<SocketAddr>,
    /// The client certificate chain TLS verified, leaf first.
    pub certs: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
}

/// Binds `addr` now and returns the server future.
pub async fn serve(
    fabric: Arc<Fabric>,
    addr: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let config = fabric.config();
    let tls = if config.admin_tls() {
        Some(tokio_rustls::TlsAcceptor::from(server_tls(&config)?))
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin HTTP on {addr}: {e}"))?;
    let rates = Arc::new(Rates::default());
    let state = Arc::new(StatusState {
        fabric: fabric.clone(),
        rates: rates.clone(),
        config_requests: Arc::new(tokio::sync::Semaphore::new(guard::CONFIG_REQUESTS_AT_ONCE)),
    });
    let open = Router::new()
        .route("/", get(|| async { Redirect::temporary("/status") }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_page));
    let guarded = Router::new()
        .route("/status.json", get(status_json))
        .route("/config/plan", post(config_plan))
        .route("/config/reload", post(config_reload))
        .route("/sources/resync", post(source_resync))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ));
    let app = open
        .merge(guarded)
        .layer(DefaultBodyLimit::max(config.server.admin_max_body_bytes))
        .with_state(state);
    if tls.is_none() && config.server.tls.is_some() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "server.admin_tls = false: the admin endpoint listens beyond loopback without TLS; bearer tokens travel in clear");
    }
    let limits = Limits {
        connections: config.server.admin_max_connections,
        lifetime: HEADER_TIMEOUT + config.admin_request_timeout() + Duration::from_secs(5),
    };
    Ok(async move {
        let sampler = rates.sample(&fabric, stop.clone());
        let server = accept(listener, tls, app, limits, stop);
        tokio::join!(server, sampler);
        Ok(())
    })
}

/// Bounds on the admin endpoint's connections.
#[derive(Clone, Copy)]
struct Limits {
    /// Open at once.
    connections: usize,
    /// How long one may live, its request and answer included.
    lifetime: Duration,
}

/// Accepts connections until `stop`, then lets open ones finish their
/// request (for at most [`DRAIN_TIMEOUT`]).
async fn accept(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!(error = %e, "admin endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let (app, tls, stop) = (app.clone(), tls.clone(), stop.clone());
        let served = async move {
            let _ = tcp.set_nodelay(true);
            let conn = Conn {
                peer: Some(peer),
                certs: None,
            };
            let Some(tls) = tls else {
                return connection(hyper_util::rt::TokioIo::new(tcp), conn, app, stop).await;
            };
            match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let certs = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| Arc::new(c.to_vec()));
                    let conn = Conn { certs, ..conn };
                    connection(hyper_util::rt::TokioIo::new(stream), conn, app, stop).await
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "admin endpoint: TLS handshake failed")
                }
                Err(_) => tracing::debug!(%peer, "admin endpoint: TLS handshake timed out"),
            }
        };
        connections.spawn(async move {
            let _slot = slot;
            if tokio::time::timeout(limits.lifetime, served).await.is_err() {
                tracing::debug!(%peer, "admin endpoint: connection outlived its bound; closed");
            }
        });
    }
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        connections.abort_all();
    }
}

/// Serves one connection's requests, each told its [`Conn`].
async fn connection<I>(io: I, conn: Conn, app: Router, stop: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(conn.clone());
            let mut app = app.clone();
            async move {
                use tower::Service;
                app.call(request.map(axum::body::Body::new)).await
            }
        });
    let http = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(io, service);
    let mut http = std::pin::pin!(http);
    let served = tokio::select! {
        r = http.as_mut() => r,
        _ = stop.cancelled() => {
            http.as_mut().graceful_shutdown();
            http.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "admin endpoint: connection ended");
    }
}

/// The admin endpoint's TLS: `[server.tls]`'s certificate; a client
/// certificate signed by its `client_ca_file` is verified when presented,
/// and required with `client_cert = "required"` (as gRPC does).
fn server_tls(
    config: &crate::config::Config,
) -> anyhow::Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let tls = config
        .server
        .tls
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("server.admin_tls needs [server.tls]"))?;
    let certs = pem_certs(&config.read_file("server.tls.cert_file", &tls.cert_file)?)
        .map_err(|e| anyhow::anyhow!("server.tls.cert_file: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(&config.read_file("server.tls.key_file", &tls.key_file)?)
            .map_err(|e| anyhow::anyhow!("server.tls.key_file: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = pem_roots(&config.read_file("server.tls.client_ca_file", ca)?)
                .map_err(|e| anyhow::anyhow!("server.tls.client_ca_file: {e}"))?;
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            if tls.client_cert == crate::config::ClientCertMode::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| anyhow::anyhow!("server.tls.client_ca_file: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut out = builder
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("server.tls: {e}"))?;
    out.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(out))
}

/// The certificates of a PEM text, in order (leaf first); none is an error.
pub(crate) fn pem_certs(
    pem: &[u8],
) -> Result<Vec<tonic::transport::CertificateDer<'static>>, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let certs = tonic::transport::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// The CA certificates of a PEM text, as roots to verify against.
pub(crate) fn pem_roots(pem: &[u8]) -> Result<tokio_rustls::rustls::RootCertStore, String> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for c in pem_certs(pem)? {
        roots
            .add(c)
            .map_err(|e| format!("not a CA certificate: {e}"))?;
    }
    Ok(roots)
}

type AdminState = State<Arc<StatusState>>;

async fn status_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        crate::status::PAGE,
    )
}

async fn status_json(State(s): AdminState) -> impl IntoResponse {
    let body = crate::status::document(&s.fabric, &s.rates).to_string();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
}

async fn healthz(State(s): AdminState) -> impl IntoResponse {
    let f = &s.fabric;
    if f.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(s): AdminState) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.fabric.render_metrics(),
    )
}

#[derive(serde::Deserialize)]
struct PlanQuery {
    /// The file the text comes from, to name it in errors.
    file: Option<String>,
}

/// 200 and the plan, or 422 and every problem of the config text.
async fn config_plan(
    State(s): AdminState,
    axum::extract::Query(q): axum::extract::Query<PlanQuery>,
    body: String,
) -> impl IntoResponse {
    let named = std::path::PathBuf::from(q.file.unwrap_or_else(|| "(posted config)".into()));
    let hidden = s.fabric.config().expanded.clone();
    match crate::app::reload::plan_text(&s.fabric, &named, &body) {
        Ok(plan) => (StatusCode::OK, hidden.hide(&plan.to_string())),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, hidden.hide(&e)),
    }
}

/// 200 and what changed, or 409 and why the running config stays.
async fn config_reload(State(s): AdminState) -> impl IntoResponse {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if s.fabric.reloads.send(Some(tx)).is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the fabric is stopping\n".to_string(),
        );
    }
    match rx.await {
        Ok(a) if a.applied => (StatusCode::OK, a.text),
        Ok(a) => (StatusCode::CONFLICT, a.text),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the fabric is stopping\n".to_string(),
        ),
    }
}

#[derive(serde::Deserialize)]
struct ResyncQuery {
    source: String,
    table: String,
}

/// 202 once a source was asked to read a table again while it streams
/// (`fabric resync`); 404 for an unknown source or table, 400 for a kind
/// that cannot, 409 when the source runs on another process.
async fn source_resync(
    State(s): AdminState,
    axum::extract::Query(q): axum::extract::Query<ResyncQuery>,
) -> impl IntoResponse {
    let config = s.fabric.config();
    let Some(cfg) = config.sources.iter().find(|c| c.name == q.source) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no source named {:?}\n", q.source),
        );
    };
    if !matches!(
        cfg.kind,
        crate::config::SourceKind::PostgresCdc | crate::config::SourceKind::MysqlBinlog
    ) {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "source {} is {}: only postgres_cdc and mysql_binlog sources re-read a table while they stream \
                 (docs/sources.md, \"Schema changes\")\n",
                cfg.name,
                cfg.kind.as_str()
            ),
        );
    }
    let qualified = |t: &str| {
        if t.contains('.') || cfg.kind != crate::config::SourceKind::PostgresCdc {
            t.to_string()
        } else {
            format!("public.{t}")
        }
    };
    let Some(table) = cfg
        .tables
        .iter()
        .find(|t| **t == q.table || qualified(t) == qualified(&q.table))
    else {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "source {} does not capture {:?} (its tables: {})\n",
                cfg.name,
                q.table,
                cfg.tables.join(", ")
            ),
        );
    };
    let Some(runtime) = s.fabric.source(&cfg.name) else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the source is not running yet\n".to_string(),
        );
    };
    if runtime.status.state.lock().as_str() == "elsewhere" {
        return (
            StatusCode::CONFLICT,
            format!(
                "source {} runs on another process: ask that one\n",
                cfg.name
            ),
        );
    }
    runtime.status.request_resync(table);
    tracing::info!(target: "fabric::audit", source = %cfg.name, table = %table, "table re-read asked");
    (
        StatusCode::ACCEPTED,
        format!(
            "source {} reads {table} again while it streams; progress on the status page and in ListSources\n",
            cfg.name
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_rustls::rustls;

    /// Whether the admin endpoint's TLS accepts a client presenting
    /// `identity` (a PEM certificate and key) or none, by a handshake in
    /// memory; the server's certificate and CA come from `fabric init-secrets`.
    async fn accepts(client_cert: &str, identity: bool) -> bool {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        crate::secrets::init(dir.path(), &["localhost".to_string()]).unwrap();
        let text = format!(
            "[server.tls]\ncert_file = \"server.pem\"\nkey_file = \"server.key\"\n\
             client_ca_file = \"ca.pem\"\nclient_cert = \"{client_cert}\"\n"
        );
        let config =
            crate::config::Config::from_toml(&dir.path().join("fabric.toml"), &text).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(&config).unwrap());
        let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pem_roots(&read("ca.pem")).unwrap());
        // The server's certificate serves as a client's too (it is made
        // for both, as replicas present it to each other).
        let client = if identity {
            builder
                .with_client_auth_cert(
                    pem_certs(&read("server.pem")).unwrap(),
                    PrivateKeyDer::from_pem_slice(&read("server.key")).unwrap(),
                )
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let client_side = tokio::spawn(async move { connector.connect(name, a).await });
        let accepted = acceptor.accept(b).await.is_ok();
        client_side.abort();
        accepted
    }

    #[tokio::test]
    async fn client_certificates_are_required_only_when_the_config_says_so() {
        assert!(!accepts("required", false).await);
        assert!(accepts("required", true).await);
        assert!(accepts("optional", false).await);
        assert!(accepts("optional", true).await);
    }
}
