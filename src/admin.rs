//! The admin HTTP endpoint: `/healthz`, `/metrics` (Prometheus text), and
//! the status page `/status` with its data `/status.json` (see
//! [`crate::status`]).

use crate::app::Fabric;
use crate::status::{Rates, StatusState};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

/// Binds `addr` now and returns the server future.
pub async fn serve(
    fabric: Arc<Fabric>,
    addr: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for admin HTTP on {addr}: {e}"))?;
    let rates = Arc::new(Rates::default());
    let state = Arc::new(StatusState {
        fabric: fabric.clone(),
        rates: rates.clone(),
    });
    let app = Router::new()
        .route("/", get(|| async { Redirect::temporary("/status") }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/status", get(status_page))
        .route("/status.json", get(status_json))
        .with_state(state);
    Ok(async move {
        let sampler = rates.sample(&fabric, stop.clone());
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        let (served, ()) = tokio::join!(server.into_future(), sampler);
        served
    })
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
