//! Prometheus metrics of the gateway and the workers: the names (documented in the README,
//! "Metrics"), the process-wide recorder, and the bounded `function` label.
//!
//! Labels never carry call ids or other unbounded values: `function` is limited to the first
//! [`MAX_FUNCTION_LABELS`] names seen by the process (later ones are counted as `other`).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Calls accepted (`202`), by function.
pub const SUBMITTED: &str = "faas_async_submitted_total";
/// Calls refused by the gateway, by error code (`invalid_path`, `queue_unavailable`, ...).
pub const REFUSED: &str = "faas_async_refused_total";
/// Time from request to `202` (seconds).
pub const ACCEPT_SECONDS: &str = "faas_async_accept_seconds";
/// Calls that reached a final outcome, by function and `outcome` (`succeeded`, `failed`,
/// `dead_lettered`, `expired`, `cancelled`).
pub const PROCESSED: &str = "faas_async_processed_total";
/// Function invocations running now, by function.
pub const IN_FLIGHT: &str = "faas_async_in_flight";
/// Attempts that failed with a retryable error and were scheduled again, by function.
pub const RETRIES: &str = "faas_async_retries_total";
/// Calls dead-lettered, by function and `reason`.
pub const DEAD_LETTERS: &str = "faas_async_dead_letters_total";
/// Calls older than their maximum age before they could run, by function.
pub const EXPIRED: &str = "faas_async_expired_total";
/// Callback deliveries, by function and `outcome` (`delivered`, `failed`).
pub const CALLBACKS: &str = "faas_async_callbacks_total";
/// Time from acceptance to the first attempt's start (seconds), by function.
pub const QUEUE_WAIT_SECONDS: &str = "faas_async_queue_wait_seconds";
/// Function call duration per attempt (seconds), by function.
pub const FUNCTION_SECONDS: &str = "faas_async_function_duration_seconds";
/// Callback delivery duration, retries included (seconds), by function.
pub const CALLBACK_SECONDS: &str = "faas_async_callback_duration_seconds";
/// Time from acceptance to the final outcome (seconds), by function.
pub const END_TO_END_SECONDS: &str = "faas_async_end_to_end_seconds";
/// Calls stored and not yet acknowledged (queue depth), at scrape time.
pub const PENDING: &str = "faas_async_pending_messages";
/// Of those, delivered to a worker and not yet acknowledged, at scrape time.
pub const UNACKED: &str = "faas_async_unacked_messages";
/// Dead letters kept, at scrape time.
pub const DEAD_LETTERS_KEPT: &str = "faas_async_dead_letters_kept";
/// Reconnections to NATS.
pub const RECONNECTS: &str = "faas_async_nats_reconnects_total";

/// Distinct `function` label values per process.
pub const MAX_FUNCTION_LABELS: usize = 200;

/// Histogram buckets (seconds): from milliseconds to the hours long jobs take.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 14400.0,
];

/// Installs the process-wide recorder once and returns the handle that renders it. Gateway and
/// worker in one process share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder.set_buckets(BUCKETS) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "histogram buckets refused; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// The `function` label for `name`: itself for the first [`MAX_FUNCTION_LABELS`] names, then
/// `other`.
pub fn function_label(name: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if seen.contains(name) {
        return name.to_owned();
    }
    if seen.len() < MAX_FUNCTION_LABELS {
        seen.insert(name.to_owned());
        return name.to_owned();
    }
    "other".to_owned()
}

/// Sets the queue gauges (at scrape time).
pub fn set_queue_gauges(pending: u64, unacked: u64, dead_letters: u64) {
    #[allow(clippy::cast_precision_loss, reason = "gauges are f64")]
    {
        metrics::gauge!(PENDING).set(pending as f64);
        metrics::gauge!(UNACKED).set(unacked as f64);
        metrics::gauge!(DEAD_LETTERS_KEPT).set(dead_letters as f64);
    }
}

/// Seconds since `unix_nanos` (0 if in the future).
pub fn seconds_since(unix_nanos: u64) -> f64 {
    Duration::from_nanos(crate::clock::unix_nanos_now().saturating_sub(unix_nanos)).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_labels_are_bounded() {
        for i in 0..MAX_FUNCTION_LABELS + 10 {
            let _ = function_label(&format!("f{i}"));
        }
        assert_eq!(function_label("f0"), "f0");
        assert_eq!(function_label("a-new-one"), "other");
    }
}
