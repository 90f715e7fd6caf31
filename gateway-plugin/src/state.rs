//! What every handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use queue_core::CallQueue;
use queue_core::egress::EgressPolicy;

use crate::error::ApiError;
use crate::link::body_limit_for;

/// State shared by the handlers.
#[derive(Debug)]
pub struct AppState<Q> {
    /// Where calls are stored.
    pub queue: Arc<Q>,
    /// `Retry-After` for 503 answers.
    pub retry_after: Duration,
    /// `--max-body-bytes`, if set.
    pub configured_max_body: Option<u64>,
    /// `--inline-body-bytes`: a larger body goes to the blob store (when there is one).
    pub inline_body_bytes: u64,
    /// Where bodies above the inline size go (`None`: every body inline, within the queue's
    /// message limit).
    pub blobs: Option<queue_core::blobs::SharedBlobs>,
    /// The configured limit was found above the queue's and lowered (warned once).
    pub warned_max_body: AtomicBool,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The dashboard's live figures.
    pub live: Arc<crate::live::LiveStats>,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: crate::peer::TrustedProxies,
    /// The workers' default namespace (part of a function's canonical identity).
    pub default_namespace: String,
    /// Where callbacks may go.
    pub callback_policy: EgressPolicy,
    /// Who may do what; `None`: no authenticator configured, every route open.
    pub auth: Option<Arc<crate::auth::Authenticator>>,
    /// The audit log.
    pub audit: Arc<crate::audit::log::AuditLog>,
    /// Quotas and rate limits of the async routes (`None`: no limits).
    pub quotas: Option<Arc<crate::quota::Quotas>>,
    /// Caps on the limits a call may set for itself.
    pub call_limits: crate::overrides::CallLimitArgs,
    /// CORS of the async routes and `/async-calls/...` (`None`: no CORS anywhere); the file's
    /// version in force.
    pub cors: Option<Arc<crate::cors::CorsFile>>,
    /// Front mode: the OpenFaaS gateway every request no route matches is passed to (`None`:
    /// those are `404`).
    pub upstream: Option<Arc<crate::upstream::Upstream>>,
}

impl<Q> AppState<Q> {
    /// The callback URL policy at enqueue: `url` back if the policy does not refuse it as
    /// written (an address literal, a denied name or port), else `400` `callback_not_allowed`.
    /// A host name is checked again, address by address, when the worker connects.
    pub fn allowed_callback(&self, url: url::Url) -> Result<url::Url, ApiError> {
        match self.callback_policy.check_url(&url) {
            Ok(()) => Ok(url),
            Err(refusal) => Err(ApiError::bad_request(
                "callback_not_allowed",
                format!("callback URL not allowed: {refusal}"),
            )),
        }
    }
}

impl<Q: CallQueue> AppState<Q> {
    /// Largest body accepted now: the configured limit; without a blob store, lowered to what
    /// the queue's message limit leaves room for.
    /// `None` while the queue's message limit is unknown (JetStream before the first
    /// connection): then nothing can be said about a body's size, and the call is refused
    /// as the queue being unavailable, never as too large.
    pub fn max_body(&self) -> Option<u64> {
        let max_message = self.queue.max_message_bytes();
        if max_message == 0 {
            return None;
        }
        let allowed = body_limit_for(max_message as u64);
        Some(match self.configured_max_body {
            // Bodies above the message limit go to the blob store.
            Some(configured) if self.blobs.is_some() => configured,
            Some(configured) if configured > allowed => {
                if !self.warned_max_body.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        configured,
                        allowed,
                        "--max-body-bytes exceeds what the queue's message limit allows; using the lower limit"
                    );
                }
                allowed
            }
            Some(configured) => configured,
            None => allowed,
        })
    }

    /// Largest body kept inline in the envelope: `--inline-body-bytes`, within what the
    /// queue's message limit leaves room for (0 while that limit is unknown).
    pub fn inline_limit(&self) -> u64 {
        let max_message = self.queue.max_message_bytes() as u64;
        self.inline_body_bytes.min(body_limit_for(max_message))
    }
}
