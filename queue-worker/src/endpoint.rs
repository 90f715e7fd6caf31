//! The worker's own HTTP endpoint (it has no other HTTP server): `GET /metrics` (Prometheus),
//! `GET /healthz` (the process answers) and `GET /readyz` (it can take calls: connected to the
//! queue, whose stream exists; 503 with the reason otherwise).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use queue_core::backend::{CallQueue, render_metrics};
use tokio_util::sync::CancellationToken;

/// Serves the endpoint on `listener` until `stop` fires.
pub async fn serve<Q: CallQueue>(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    queue: Arc<Q>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let ready = queue.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                let queue = queue.clone();
                async move { render_metrics(&handle, queue.as_ref()).await }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let queue = ready.clone();
                async move { readiness(queue.as_ref()).await }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn readiness<Q: CallQueue>(queue: &Q) -> Response {
    match queue.check_ready().await {
        Ok(()) => axum::Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "not_ready", "reason": reason})),
        )
            .into_response(),
    }
}
