//! What every handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use queue_core::CallQueue;

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
}

impl<Q: CallQueue> AppState<Q> {
    /// Largest body accepted now: the configured limit, lowered to what the queue's message
    /// limit leaves room for.
    pub fn max_body(&self) -> u64 {
        let allowed = body_limit_for(self.queue.max_message_bytes() as u64);
        match self.configured_max_body {
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
        }
    }
}
