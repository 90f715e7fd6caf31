//! The worker's status announcements: every `--status-interval` (5 s) a worker tells the
//! gateways what it runs (its consumer group, `--max-inflight`, the calls it holds, fair
//! scheduling on or off) and each function's concurrency limit, cap, calls running and
//! waiting ([`crate::concurrency::Limits::snapshot`]), through
//! [`CallRecords::announce_worker_status`]. The gateway's admin API (`/system/async/workers`)
//! and dashboard read them back.
//!
//! A task of its own, off the path of every call: it reads the limits (a brief lock per
//! function) and sends one small message per interval. A failed announcement is logged at
//! debug and tried again at the next interval; when the worker stops, its status is withdrawn.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use queue_core::backend::status::MAX_STATUS_FUNCTIONS;
use queue_core::backend::{CallRecords, FunctionConcurrency, WorkerStatus};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;

/// What a worker says of itself that does not change while it runs.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its id (see [`WorkerStatus::worker`]).
    pub worker: String,
    /// Its host.
    pub hostname: String,
    /// Its consumer group.
    pub consumer: String,
    /// `--max-inflight`.
    pub max_inflight: u32,
    /// `--fair-scheduling`.
    pub fair_scheduling: bool,
    /// `--adaptive-concurrency`.
    pub adaptive_concurrency: bool,
    /// `--status-interval` (zero: no announcements).
    pub interval: Duration,
}

/// Workers started in this process so far (tests run several): the last part of an id.
static STARTED: AtomicU64 = AtomicU64::new(0);

impl Identity {
    /// The identity of a worker with `config`, adaptive or not.
    pub fn of(config: &WorkerConfig, adaptive_concurrency: bool) -> Self {
        let hostname = hostname();
        let token: String = (hostname.chars())
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(100)
            .collect();
        let worker = format!(
            "{token}-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            worker,
            hostname,
            consumer: config.consumer.clone(),
            max_inflight: config.max_inflight,
            fair_scheduling: config.fair_scheduling,
            adaptive_concurrency,
            interval: config.status_interval,
        }
    }

    /// The status now, from the tracked functions and the calls held.
    pub fn status(
        &self,
        mut functions: Vec<FunctionConcurrency>,
        in_flight: usize,
    ) -> WorkerStatus {
        // The busiest first (running, then waiting, then a lowered limit), by name after that.
        functions.sort_by(|a, b| {
            (b.in_flight, b.waiting, b.limit < b.cap)
                .cmp(&(a.in_flight, a.waiting, a.limit < a.cap))
                .then_with(|| a.function.cmp(&b.function))
        });
        let omitted = functions.len().saturating_sub(MAX_STATUS_FUNCTIONS);
        functions.truncate(MAX_STATUS_FUNCTIONS);
        WorkerStatus {
            worker: self.worker.clone(),
            hostname: self.hostname.clone(),
            consumer: self.consumer.clone(),
            max_inflight: self.max_inflight,
            in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
            fair_scheduling: self.fair_scheduling,
            adaptive_concurrency: self.adaptive_concurrency,
            interval_seconds: self.interval.as_secs_f64(),
            announced_at_unix_nanos: queue_core::unix_nanos_now(),
            functions,
            functions_omitted: u32::try_from(omitted).unwrap_or(u32::MAX),
        }
    }
}

/// The host's name: `/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `unknown`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// How long one announcement (or the withdrawal) may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Announces the status from `read` (the tracked functions, the calls held) every interval
/// until `stop` fires, then withdraws it. Returns at once with a zero interval.
pub async fn announce<Q, F>(queue: Arc<Q>, identity: Identity, read: F, stop: CancellationToken)
where
    Q: CallRecords,
    F: Fn() -> (Vec<FunctionConcurrency>, usize) + Send + 'static,
{
    if identity.interval.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(identity.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = stop.cancelled() => break,
        }
        let (functions, in_flight) = read();
        let status = identity.status(functions, in_flight);
        match tokio::time::timeout(SEND_TIMEOUT, queue.announce_worker_status(&status)).await {
            Ok(Ok(())) => failing = false,
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::info!(error = %e, "worker status not announced; trying again");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "worker status not announced"),
            Err(_) => tracing::debug!("worker status announcement timed out"),
        }
    }
    let withdrawn =
        tokio::time::timeout(SEND_TIMEOUT, queue.withdraw_worker_status(&identity.worker)).await;
    if !matches!(withdrawn, Ok(Ok(()))) {
        tracing::debug!("worker status not withdrawn; it expires");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, limit: u32, in_flight: u32, waiting: u32) -> FunctionConcurrency {
        FunctionConcurrency {
            function: name.into(),
            limit,
            cap: 10,
            in_flight,
            waiting,
        }
    }

    fn identity() -> Identity {
        Identity {
            worker: "h-1-0".into(),
            hostname: "h".into(),
            consumer: "w".into(),
            max_inflight: 10,
            fair_scheduling: false,
            adaptive_concurrency: true,
            interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_busiest_functions_come_first_and_the_list_is_bounded() {
        let status = identity().status(
            vec![
                function("idle", 10, 0, 0),
                function("lowered", 3, 0, 0),
                function("busy", 10, 4, 0),
                function("full", 2, 2, 5),
            ],
            6,
        );
        let names: Vec<_> = status
            .functions
            .iter()
            .map(|f| f.function.as_str())
            .collect();
        assert_eq!(names, ["busy", "full", "lowered", "idle"]);
        assert_eq!((status.in_flight, status.functions_omitted), (6, 0));
        assert!(WorkerStatus::valid_id(&status.worker));

        let many = (0..MAX_STATUS_FUNCTIONS + 5)
            .map(|i| function(&format!("f{i}"), 10, 0, 0))
            .collect();
        let status = identity().status(many, 0);
        assert_eq!(status.functions.len(), MAX_STATUS_FUNCTIONS);
        assert_eq!(status.functions_omitted, 5);
    }

    #[test]
    fn ids_are_keys_and_unique_in_a_process() {
        let config = <WorkerConfig as clap::Parser>::try_parse_from(["queue-worker"]).unwrap();
        let (a, b) = (Identity::of(&config, true), Identity::of(&config, true));
        assert_ne!(a.worker, b.worker);
        assert!(WorkerStatus::valid_id(&a.worker), "{}", a.worker);
        assert_eq!(a.interval, Duration::from_secs(5));
    }
}
