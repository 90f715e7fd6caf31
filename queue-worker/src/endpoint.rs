//! The worker's own HTTP endpoint (it has no other HTTP server): `GET /metrics` (Prometheus),
//! `GET /healthz` (the process answers) and `GET /readyz` (it can take calls: connected to the
//! queue, whose stream exists; 503 with the reason otherwise).
//!
//! Plain HTTP, or HTTPS only with `--metrics-tls-cert`/`--metrics-tls-key`: each handshake runs
//! in its own task, bounded in time and in number, so a client that connects and never says
//! hello holds neither the accept loop nor a task for long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use queue_core::backend::{CallQueue, render_metrics};
use queue_core::tls_server::TlsAcceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// A TLS handshake must be done within this time, or the connection is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; a connection beyond them is closed at once.
const MAX_HANDSHAKES: usize = 64;

/// Serves the endpoint on `listener` until `stop` fires: HTTPS only with `tls`, else HTTP.
pub async fn serve<Q: CallQueue>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
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
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
        Some(acceptor) => {
            let listener = TlsListener {
                tcp: listener,
                acceptor,
                handshakes: JoinSet::new(),
            };
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    }
}

/// TCP connections turned into TLS streams, for `axum::serve`. Handshakes run in their own
/// tasks (dropped with the listener); `accept` hands out the ones that completed.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    /// Runs the handshake of a new connection in a task of its own, within
    /// [`HANDSHAKE_TIMEOUT`]; beyond [`MAX_HANDSHAKES`] in progress, closes it at once.
    fn start_handshake(&mut self, stream: TcpStream, peer: SocketAddr) {
        if self.handshakes.len() >= MAX_HANDSHAKES {
            tracing::debug!(%peer, "metrics endpoint: too many TLS handshakes in progress; connection closed");
            return;
        }
        let acceptor = self.acceptor.clone();
        self.handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => Some((stream, peer)),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "metrics endpoint: TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "metrics endpoint: TLS handshake not done in time");
                    None
                }
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Both arms are cancel-safe: a dropped `accept` loses no connection, and the
            // handshakes go on in their tasks.
            tokio::select! {
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, peer)) => self.start_handshake(stream, peer),
                    Err(e) => {
                        // Out of file descriptors, or a connection reset before it was
                        // accepted: pause a little rather than spin.
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
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
