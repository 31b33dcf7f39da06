//! The monitoring port: `/metrics`, `/healthz/ready`, `/healthz/live`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use super::Readiness;
use crate::shutdown::Shutdown;

/// Serves `/metrics`, `/healthz/ready` and `/healthz/live` on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    state: Arc<Readiness>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz/ready", get(ready))
        .route("/healthz/live", get(|| async { "ok\n" }))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

async fn metrics(State(s): State<Arc<Readiness>>) -> ([(&'static str, &'static str); 1], String) {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(&s.ca),
    )
}

async fn ready(State(s): State<Arc<Readiness>>) -> (StatusCode, String) {
    match s.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
