//! The worker's own HTTP endpoint (it has no other HTTP server): `GET /metrics` (Prometheus)
//! and `GET /healthz`.

use std::sync::Arc;

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
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                let queue = queue.clone();
                async move { render_metrics(&handle, queue.as_ref()).await }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
