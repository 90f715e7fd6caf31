//! The gateway's accept loop: HTTP/1.1 connections up to a limit, each with deadlines for its
//! request headers and bodies, so slow or hostile clients (slowloris: headers or a body sent a
//! byte at a time, connections opened and left idle) cannot hold the accept path or the
//! process's file descriptors.
//!
//! - **Header deadline**: a connection must deliver a request's headers within
//!   `header_read_timeout` of the server starting to wait for them (after accept, and after each
//!   response on a kept-alive connection); otherwise it is closed. So an idle kept-alive
//!   connection is closed after that time too.
//! - **Body deadline**: a request's whole body must arrive within `body_read_timeout` of its
//!   headers; otherwise reading it fails (the enqueue route answers `400 unreadable_body`) and
//!   the connection is closed.
//! - **TLS** (optional, `--tls-cert`/`--tls-key`): the handshake must finish within the header
//!   deadline too, so a client that opens a connection and never says hello holds nothing.
//! - **Connection limit**: at most `max_connections` at once; one more is answered `503` and
//!   closed at once (counted in `faas_async_gateway_connections_refused_total`) instead of
//!   waiting in the kernel's backlog behind the ones that hold their slots.

use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Connections refused because `max_connections` were open.
pub const CONNECTIONS_REFUSED: &str = "faas_async_gateway_connections_refused_total";

/// What a client may hold, and for how long. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// A request's headers must arrive within this time (an idle connection is closed then).
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this time after its headers.
    pub body_read_timeout: Duration,
    /// Connections open at once; one more is answered `503` and closed.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

/// What a connection refused at the limit is told before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
retry-after: 1\r\ncontent-type: application/json\r\ncontent-length: 79\r\n\r\n\
{\"error\":\"too_many_connections\",\"message\":\"too many connections; retry later\"}";

/// Accepts and serves connections with `app` until `stop` fires, then stops accepting, lets
/// every connection finish its request in progress (idle ones are closed) and returns when all
/// are closed. The caller bounds that wait.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // pause a little rather than spin, as hyper's own servers do.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(CONNECTIONS_REFUSED).increment(1);
            tracing::debug!(%peer, "connection limit reached; connection refused");
            // Non-blocking: a peer that does not read cannot hold this loop.
            let _ = stream.try_write(REFUSAL);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body_timeout = limits.body_read_timeout;
        let service = app
            .clone()
            .map_request(move |request: http::Request<Incoming>| {
                let mut request = request.map(|body| DeadlineBody::new(body, body_timeout));
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            });
        let service = TowerToHyperService::new(service);
        let http = http.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        let handshake_timeout = limits.header_read_timeout;
        connections.spawn(async move {
            match tls {
                None => serve_one(&http, stream, service, peer, &stop).await,
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                    let stream = tokio::select! {
                        handshake = handshake => match handshake {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake not done in time");
                                return;
                            }
                        },
                        () = stop.cancelled() => return,
                    };
                    serve_one(&http, stream, service, peer, &stop).await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it closes; on `stop`, finishes the request in progress first.
async fn serve_one<I, S>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    peer: SocketAddr,
    stop: &CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Error: Into<axum::BoxError>,
    S::Future: Send + 'static,
{
    let connection = http.serve_connection(TokioIo::new(io), service);
    let mut connection = pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
    }
}

pub use queue_core::tls_server::TlsFileError;

/// The gateway's TLS settings, as its errors name them.
pub const TLS_SETTINGS: queue_core::tls_server::TlsSettingNames =
    queue_core::tls_server::TlsSettingNames {
        cert_flag: "--tls-cert",
        cert_env: "GATEWAY_TLS_CERT",
        key_flag: "--tls-key",
        key_env: "GATEWAY_TLS_KEY",
    };

/// A TLS acceptor from PEM files: the certificate chain (leaf first) and its private key
/// (`queue_core::tls_server::acceptor`, shared with the worker's metrics listener).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TlsAcceptor, TlsFileError> {
    queue_core::tls_server::acceptor(cert, key, TLS_SETTINGS)
}

/// The body of a request took longer than the body deadline to arrive.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimeout(Duration);

/// A request body that fails once its deadline has passed.
#[derive(Debug)]
pub struct DeadlineBody<B> {
    inner: B,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl<B> DeadlineBody<B> {
    /// `inner`, which must be read completely within `timeout` from now.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(BodyTimeout(this.timeout).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
