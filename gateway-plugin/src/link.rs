//! The gateway's link to JetStream: the connection, the streams it keeps in place, and the body
//! limit derived from the server's `max_payload`.
//!
//! A background task creates or updates the streams whenever they are not known to be in
//! place: at start, after a publish failed, and after NATS comes back. Requests never wait for it;
//! until it succeeds, `/readyz` says not ready and calls get 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use queue_worker::config::{NatsArgs, StreamArgs};
use queue_worker::message::QueuedCall;
use queue_worker::queue::{self, HEADER_ALLOWANCE, PublishError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Largest body that leaves room below `max_payload` for the envelope's metadata (method, path,
/// request headers) and the NATS headers: a quarter of the payload, at most 64 KiB.
pub fn body_limit_for(max_payload: u64) -> u64 {
    let overhead = (max_payload / 4)
        .min(64 * 1024)
        .max(HEADER_ALLOWANCE as u64);
    max_payload.saturating_sub(overhead)
}

/// NATS's default `max_payload`, used until the server's is known.
const DEFAULT_MAX_PAYLOAD: u64 = 1 << 20;

/// Shared by all requests.
#[derive(Debug)]
pub struct QueueLink {
    client: async_nats::Client,
    js: jetstream::Context,
    nats: NatsArgs,
    stream: StreamArgs,
    configured_max_body: Option<u64>,
    max_body: AtomicU64,
    streams_ready: AtomicBool,
    recheck: Notify,
}

impl QueueLink {
    /// Connects (in the background if NATS is not up yet) and starts keeping the streams in place.
    pub async fn start(
        nats: NatsArgs,
        stream: StreamArgs,
        configured_max_body: Option<u64>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, queue::QueueError> {
        let client = queue::connect(&nats, "gateway-plugin").await?;
        let js = queue::jetstream(client.clone(), &nats);
        let link = Arc::new(Self {
            client,
            js,
            nats,
            stream,
            max_body: AtomicU64::new(
                configured_max_body
                    .unwrap_or(u64::MAX)
                    .min(body_limit_for(DEFAULT_MAX_PAYLOAD)),
            ),
            configured_max_body,
            streams_ready: AtomicBool::new(false),
            recheck: Notify::new(),
        });
        tokio::spawn(link.clone().keep_streams(stop));
        Ok(link)
    }

    /// The NATS client (for flushing at shutdown).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Largest body accepted now.
    pub fn max_body(&self) -> u64 {
        self.max_body.load(Ordering::Relaxed)
    }

    /// Connected and the streams are in place.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && self.streams_ready.load(Ordering::Relaxed)
    }

    /// Connected to NATS right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Publishes a call; `Ok` means JetStream stored it. Returns whether it was a duplicate.
    pub async fn publish(&self, call: &QueuedCall) -> Result<bool, PublishError> {
        if !self.streams_ready.load(Ordering::Relaxed) {
            self.recheck.notify_one();
            return Err(PublishError::NotStored(
                "the stream is not set up yet".into(),
            ));
        }
        let result =
            queue::publish_call(&self.client, &self.js, &self.nats.subject_prefix, call).await;
        if let Err(PublishError::NotStored(_)) = &result {
            // The stream may be gone (a NATS server that lost its store): check it again.
            self.recheck.notify_one();
        }
        result
    }

    async fn keep_streams(self: Arc<Self>, stop: CancellationToken) {
        let mut wait = Duration::from_millis(200);
        loop {
            if stop.is_cancelled() {
                return;
            }
            let ok = if self.is_connected() {
                match self.ensure().await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "cannot set up the streams");
                        false
                    }
                }
            } else {
                false
            };
            let was_ready = self.streams_ready.swap(ok, Ordering::Relaxed);
            if ok && !was_ready {
                tracing::info!(stream = %self.nats.stream, max_body = self.max_body(), "streams ready");
            }
            let sleep = if ok {
                wait = Duration::from_millis(200);
                // Re-check now and then, and whenever a publish failed.
                Duration::from_secs(30)
            } else {
                let w = wait;
                wait = (wait * 2).min(Duration::from_secs(5));
                w
            };
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = self.recheck.notified() => {
                    // Debounce a burst of failed publishes.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                () = stop.cancelled() => return,
            }
        }
    }

    async fn ensure(&self) -> Result<(), queue::QueueError> {
        let max_payload = self.client.server_info().max_payload as u64;
        let allowed = body_limit_for(max_payload);
        let limit = match self.configured_max_body {
            Some(configured) if configured > allowed => {
                tracing::warn!(
                    configured,
                    allowed,
                    max_payload,
                    "--max-body-bytes exceeds what the NATS server's max_payload allows; using the lower limit"
                );
                allowed
            }
            Some(configured) => configured,
            None => allowed,
        };
        self.max_body.store(limit, Ordering::Relaxed);
        let max_payload = usize::try_from(max_payload).unwrap_or(usize::MAX);
        queue::ensure_streams(&self.js, &self.nats, &self.stream, max_payload).await
    }

    /// Checks readiness against the server (for `/readyz`): connected and the stream exists.
    pub async fn check_ready(&self) -> Result<(), String> {
        if !self.is_connected() {
            return Err("not connected to NATS".into());
        }
        if !self.streams_ready.load(Ordering::Relaxed) {
            return Err("streams not set up yet".into());
        }
        match self.js.get_stream(&self.nats.stream).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.recheck.notify_one();
                Err(format!("stream {}: {e}", self.nats.stream))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_limit_leaves_room_for_metadata() {
        assert_eq!(body_limit_for(1 << 20), (1 << 20) - 64 * 1024);
        assert_eq!(body_limit_for(128 * 1024), 96 * 1024);
        assert_eq!(body_limit_for(8 * 1024), 4 * 1024);
        assert_eq!(body_limit_for(0), 0);
    }
}
