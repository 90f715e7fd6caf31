//! `gateway-plugin`: the OpenFaaS-compatible `/async-function/` endpoint. It validates a call,
//! publishes it to JetStream in the envelope `queue-worker` defines, and answers `202 Accepted`
//! with `X-Call-Id` only after JetStream acknowledged the publish.
//!
//! # Layout
//! - [`routes`]: the router (the one place every route is declared) and the enqueue handler.
//! - [`link`]: the JetStream connection, stream upkeep and the body limit from `max_payload`.
//! - [`error`]: JSON error answers.
//! - [`config`]: settings (flags and environment variables; OpenFaaS's NATS variables).

pub mod config;
pub mod error;
pub mod link;
pub mod routes;

use std::future::Future;
use std::sync::Arc;

pub use config::GatewayConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// NATS could not be set up.
    #[error(transparent)]
    Queue(#[from] queue_worker::queue::QueueError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Serve(#[from] std::io::Error),
}

/// Serves on `listener` until `shutdown` completes, then lets requests in progress finish
/// (up to the grace period) and flushes the NATS connection.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let stop = CancellationToken::new();
    let link = link::QueueLink::start(
        config.nats.clone(),
        config.stream.clone(),
        config.max_body_bytes,
        stop.clone(),
    )
    .await?;
    let state = Arc::new(routes::AppState {
        link: link.clone(),
        retry_after: config.retry_after,
    });
    let app = routes::router(state);
    tracing::info!(listen = %listener.local_addr()?, nats = %config.nats.nats_url, "gateway-plugin listening");

    let drain_started = CancellationToken::new();
    let serve = {
        let drain_started = drain_started.clone();
        axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown.await;
            drain_started.cancel();
        })
    };
    let serve = tokio::spawn(async move { serve.await });
    drain_started.cancelled().await;
    // Wait for the server to drain, but not forever.
    let result = match tokio::time::timeout(config.shutdown_grace, serve).await {
        Ok(Ok(r)) => r.map_err(GatewayError::from),
        Ok(Err(join)) => Err(GatewayError::Serve(std::io::Error::other(join))),
        Err(_) => {
            tracing::warn!("grace period over with requests still in progress; stopping");
            Ok(())
        }
    };
    stop.cancel();
    queue_worker::queue::flush_before_exit(link.client()).await;
    tracing::info!("gateway-plugin stopped");
    result
}
