//! Prometheus metrics of the gateway and the workers: the names (documented in the README,
//! "Metrics"), the process-wide recorder, and the bounded `function` label.
//!
//! Labels never carry call ids or other unbounded values: `function` is limited to
//! [`MAX_FUNCTION_LABELS`] functions that *answered* (others are counted as `other`), and a
//! function idle for [`LABEL_IDLE`] gives its slot up to a new one: a caller cannot squat the
//! slots with names of functions that do not exist.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

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
/// Age of the oldest call stored and not yet acknowledged (seconds; 0 when the queue is
/// empty), at scrape time: what an alert on a stuck queue watches.
pub const OLDEST_PENDING_SECONDS: &str = "faas_async_oldest_pending_seconds";
/// Reconnections to NATS.
pub const RECONNECTS: &str = "faas_async_nats_reconnects_total";
/// Calls of a function one worker runs at once at most now (its adaptive limit, within the
/// function's cap and `--max-inflight`), by function.
pub const CONCURRENCY_LIMIT: &str = "faas_async_concurrency_limit";
/// Calls held by a worker waiting for a slot under their function's limit, by function.
pub const CONCURRENCY_WAITING: &str = "faas_async_concurrency_waiting";

/// OpenFaaS Pro's queue-worker series, beside ours, so that its Grafana dashboards and its
/// queue-depth autoscaling rules keep working: labels `queue_name` (the stream) and
/// `function_name` (`name.namespace`, the default namespace written out; bounded as `function`
/// is). Calls stored and not acknowledged, per function, at scrape time.
pub const PRO_PENDING: &str = "queue_worker_pending_messages";
/// Calls that reached a final outcome (OpenFaaS Pro: messages processed).
pub const PRO_PROCESSED: &str = "queue_worker_messages_processed_total";
/// Calls queued by the gateway (OpenFaaS Pro: messages submitted).
pub const PRO_SUBMITTED: &str = "queue_worker_messages_submitted_total";
/// Function invocations running now, per function.
pub const PRO_INFLIGHT: &str = "queue_worker_function_invocation_inflight";
/// Reconnections to NATS.
pub const PRO_RECONNECTS: &str = "queue_worker_nats_reconnect_total";

/// The `queue_name` and default namespace the OpenFaaS Pro series are labelled with.
static PRO_LABELS: OnceLock<(&'static str, String)> = OnceLock::new();

/// Names the queue (the stream) and the default namespace for the OpenFaaS Pro series; once,
/// at start (later calls are ignored).
pub fn set_pro_labels(queue_name: &str, default_namespace: &str) {
    let name: &'static str = Box::leak(queue_name.to_owned().into_boxed_str());
    let _ = PRO_LABELS.set((name, default_namespace.to_ascii_lowercase()));
}

/// The `queue_name` label of the OpenFaaS Pro series.
pub fn pro_queue_name() -> &'static str {
    PRO_LABELS.get().map_or("faas-async", |(name, _)| name)
}

/// The `function_name` label of the OpenFaaS Pro series for a `function` label value: `name`
/// becomes `name.<default namespace>`; `other` stays `other`.
pub fn pro_function_name(label: &str) -> String {
    if label == "other" || label.contains('.') {
        return label.to_owned();
    }
    let namespace = PRO_LABELS
        .get()
        .map_or("openfaas-fn", |(_, ns)| ns.as_str());
    format!("{label}.{namespace}")
}

/// Sets the OpenFaaS Pro pending gauge per function (at scrape time): functions without a
/// label of their own are summed as `other`, and a function no longer pending is set to 0.
pub fn set_pending_per_function(pending: &[(String, u64)]) {
    static SEEN: OnceLock<Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    let mut by_label: HashMap<String, u64> = HashMap::new();
    for (function, n) in pending {
        let label = pro_function_name(&labels().peek(function));
        *by_label.entry(label).or_default() += n;
    }
    let mut seen = SEEN
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    for gone in seen.iter().filter(|l| !by_label.contains_key(*l)) {
        metrics::gauge!(PRO_PENDING, "queue_name" => pro_queue_name(), "function_name" => gone.clone())
            .set(0.0);
    }
    #[allow(clippy::cast_precision_loss, reason = "gauges are f64")]
    for (label, n) in &by_label {
        metrics::gauge!(PRO_PENDING, "queue_name" => pro_queue_name(), "function_name" => label.clone())
            .set(*n as f64);
    }
    seen.extend(by_label.into_keys());
}

/// Distinct `function` label values per process.
pub const MAX_FUNCTION_LABELS: usize = 200;

/// Histogram buckets (seconds): from milliseconds to the hours long jobs take.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 14400.0,
];

/// How often histogram samples are drained into their buckets when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

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
            // A histogram keeps every sample until it is drained: a scrape does, and so must
            // this, or a process nobody scrapes grows by every call's samples (the soak's
            // worker did, ~65 bytes a call, BENCHMARKS.md "Soak").
            let upkept = handle.clone();
            let upkeep = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkept.run_upkeep();
                    }
                });
            if let Err(e) = upkeep {
                tracing::warn!(error = %e, "no metrics upkeep thread: histograms grow until scraped");
            }
            handle
        })
        .clone()
}

/// A function whose label has not been used for this long gives up its slot to a new one
/// when all [`MAX_FUNCTION_LABELS`] are taken.
pub const LABEL_IDLE: Duration = Duration::from_secs(3600);

/// The functions that have a label of their own: admitted when they answered, by last use.
#[derive(Debug, Default)]
pub struct FunctionLabels {
    last_used: HashMap<String, Instant>,
}

impl FunctionLabels {
    /// The label for `name` at `now`: itself if admitted, else `other`.
    pub fn label(&mut self, name: &str, now: Instant) -> String {
        match self.last_used.get_mut(name) {
            Some(at) => {
                *at = now;
                name.to_owned()
            }
            None => "other".to_owned(),
        }
    }

    /// The label for `name` without counting it as a use (a scrape is not a use).
    pub fn peek(&self, name: &str) -> String {
        if self.last_used.contains_key(name) {
            name.to_owned()
        } else {
            "other".to_owned()
        }
    }

    /// `name` answered (an HTTP response that is not 404): it gets a label of its own if a
    /// slot is free or one has been idle for [`LABEL_IDLE`] (the longest idle is evicted).
    /// Names nobody answers for (junk, typos, probes) never take a slot.
    pub fn admit(&mut self, name: &str, now: Instant) {
        if let Some(at) = self.last_used.get_mut(name) {
            *at = now;
            return;
        }
        if self.last_used.len() >= MAX_FUNCTION_LABELS {
            let idlest = self
                .last_used
                .iter()
                .min_by_key(|(_, at)| **at)
                .filter(|(_, at)| now.saturating_duration_since(**at) >= LABEL_IDLE)
                .map(|(name, _)| name.clone());
            match idlest {
                Some(idle) => {
                    self.last_used.remove(&idle);
                }
                None => return,
            }
        }
        self.last_used.insert(name.to_owned(), now);
    }
}

fn labels() -> std::sync::MutexGuard<'static, FunctionLabels> {
    static LABELS: OnceLock<Mutex<FunctionLabels>> = OnceLock::new();
    LABELS
        .get_or_init(|| Mutex::new(FunctionLabels::default()))
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// The `function` label for `name`: itself once the function answered (see
/// [`note_answered`]), else `other`.
pub fn function_label(name: &str) -> String {
    labels().label(name, Instant::now())
}

/// Records that function `name` answered with `status`: a status other than 404 admits it to
/// the labels of this process ([`FunctionLabels::admit`]).
pub fn note_answered(name: &str, status: u16) {
    if status != 404 {
        labels().admit(name, Instant::now());
    }
}

/// Sets the queue gauges (at scrape time): calls pending, of those unacked, dead letters
/// kept, the oldest pending call's age in seconds.
pub fn set_queue_gauges(pending: u64, unacked: u64, dead_letters: u64, oldest_age_seconds: f64) {
    #[allow(clippy::cast_precision_loss, reason = "gauges are f64")]
    {
        metrics::gauge!(PENDING).set(pending as f64);
        metrics::gauge!(UNACKED).set(unacked as f64);
        metrics::gauge!(DEAD_LETTERS_KEPT).set(dead_letters as f64);
        metrics::gauge!(OLDEST_PENDING_SECONDS).set(oldest_age_seconds);
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
    fn only_functions_that_answered_get_labels_and_idle_ones_make_room() {
        let mut labels = FunctionLabels::default();
        let t0 = Instant::now();
        assert_eq!(labels.label("junk", t0), "other", "never answered");
        for i in 0..MAX_FUNCTION_LABELS {
            labels.admit(&format!("f{i}"), t0);
        }
        assert_eq!(labels.label("f0", t0), "f0");
        labels.admit("late", t0 + Duration::from_secs(1));
        assert_eq!(labels.label("late", t0), "other", "full, nobody idle");
        // f0 was used just now; f1 is the idlest after an hour.
        let later = t0 + LABEL_IDLE + Duration::from_secs(1);
        labels.label("f0", later);
        labels.admit("late", later);
        assert_eq!(labels.label("late", later), "late");
        assert_eq!(labels.label("f0", later), "f0");
        assert_eq!(labels.last_used.len(), MAX_FUNCTION_LABELS);
    }
}
