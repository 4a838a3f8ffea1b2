//! The admin HTTP endpoint: `/healthz`, `/metrics` (Prometheus text), the
//! status page `/status` with its data `/status.json` (see
//! [`crate::status`]), and live config changes: `POST /config/plan` (the
//! body is a config file's text: what it would change, nothing applied)
//! and `POST /config/reload` (the running file read again and applied, or
//! refused; see [`crate::app::reload`]).

use crate::app::Fabric;
use crate::status::{Rates, StatusState};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
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
        .route("/config/plan", post(config_plan))
        .route("/config/reload", post(config_reload))
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
    match crate::app::reload::plan_text(&s.fabric, &named, &body) {
        Ok(plan) => (StatusCode::OK, plan.to_string()),
        Err(e) => (StatusCode::UNPROCESSABLE_ENTITY, e),
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
