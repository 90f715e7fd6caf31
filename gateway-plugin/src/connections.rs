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
//! - **Lingering close**: a connection the gateway closes (after refusing a body it did not
//!   read, `413`, or at shutdown) sends its FIN first, then reads and drops what the client
//!   still sends, until the client closes, for at most `LINGER_TIME` and `LINGER_BYTES`.
//!   Closing a socket with unread data makes the kernel reset the connection, and a client
//!   still writing its body would then lose the answer already sent to it.

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

/// How long a closing connection reads what its client still sends (see the module docs).
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// How much a closing connection reads and drops at most before it closes anyway.
pub const LINGER_BYTES: usize = 16 * 1024 * 1024;

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
    let connection = http.serve_connection(TokioIo::new(Lingering::new(io)), service);
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

/// An IO whose shutdown is a lingering close: its FIN is sent, then what the peer still sends
/// is read and dropped until it closes, for at most [`LINGER_TIME`] and [`LINGER_BYTES`].
#[derive(Debug)]
struct Lingering<I> {
    io: I,
    closing: Option<Closing>,
}

#[derive(Debug)]
struct Closing {
    fin_sent: bool,
    left: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<I> Lingering<I> {
    fn new(io: I) -> Self {
        Self { io, closing: None }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Lingering<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for Lingering<I>
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let closing = this.closing.get_or_insert_with(|| Closing {
            fin_sent: false,
            left: LINGER_BYTES,
            deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
        });
        if !closing.fin_sent {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            closing.fin_sent = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            if closing.left == 0 || closing.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let room = closing.left.min(scratch.len());
            let mut buf = tokio::io::ReadBuf::new(&mut scratch[..room]);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                // The peer closed or reset: nothing is left to protect.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => closing.left -= buf.filled().len(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Paused time: the deadline never passes while the two sides take turns.
    #[tokio::test(start_paused = true)]
    async fn a_lingering_close_sends_its_fin_and_drains_until_the_peer_closes() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut io = Lingering::new(ours);
        io.write_all(b"answer").await.unwrap();
        let shutdown = tokio::spawn(async move { io.shutdown().await });
        // The peer sees the answer, then the end of the stream (our FIN)...
        let mut seen = Vec::new();
        theirs.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, b"answer");
        // ...and may still write: more than one buffer of it is read and dropped.
        theirs.write_all(&[7u8; 1000]).await.unwrap();
        assert!(!shutdown.is_finished(), "the close waits for the peer");
        drop(theirs);
        shutdown.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_close_ends_at_its_deadline_when_the_peer_keeps_the_connection() {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut io = Lingering::new(ours);
        let started = tokio::time::Instant::now();
        io.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER_TIME);
        drop(theirs);
    }
}
