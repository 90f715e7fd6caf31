//! Live statistics for the dashboard: the gateway follows the outcomes the workers announce
//! (`CallRecords::outcomes`) and keeps, per function, the last few minutes of them: throughput,
//! error rate, end-to-end percentiles, and the most recent failures.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use queue_core::backend::CallQueue;
use queue_core::records::OutcomeEvent;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// How far back the figures look.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Throughput is measured over this last part of the window.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// Samples kept per function (older ones are dropped first).
const MAX_SAMPLES: usize = 20_000;
/// Functions tracked (bounded like the metrics labels). Only functions that answered (a status
/// other than 404) are taken in, and a function without outcomes in the window is dropped, so
/// names of functions that do not exist cannot squat the slots.
const MAX_FUNCTIONS: usize = 200;
/// Failures listed.
const RECENT_FAILURES: usize = 20;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: u64,
    failed: bool,
    end_to_end: f64,
}

#[derive(Debug, Default)]
struct Window {
    functions: HashMap<String, VecDeque<Sample>>,
    failures: VecDeque<OutcomeEvent>,
}

/// The live figures, fed by [`follow`].
#[derive(Debug, Default)]
pub struct LiveStats(Mutex<Window>);

/// One function's figures over the window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionFigures {
    /// `name` or `name.namespace`.
    pub function: String,
    /// Calls finished in the window.
    pub completed: u64,
    /// Of those, not succeeded (failed, dead-lettered, expired, cancelled).
    pub failed: u64,
    /// `failed / completed`.
    pub error_rate: f64,
    /// Calls finished per second over the last minute.
    pub per_second: f64,
    /// End-to-end percentiles, seconds.
    pub p50_seconds: f64,
    /// 90th percentile.
    pub p90_seconds: f64,
    /// 99th percentile.
    pub p99_seconds: f64,
}

/// What `/system/async/stats` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The window, seconds.
    pub window_seconds: u64,
    /// Per function, by name.
    pub functions: Vec<FunctionFigures>,
    /// Most recent failures, newest first.
    pub recent_failures: Vec<OutcomeEvent>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a short sorted list"
    )]
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn window_start(now: u64) -> u64 {
    now.saturating_sub(u64::try_from(WINDOW.as_nanos()).unwrap_or(0))
}

impl Window {
    /// Forgets samples older than the window, and functions left without any.
    fn drop_idle(&mut self, now: u64) {
        let start = window_start(now);
        self.functions.retain(|_, samples| {
            while samples.front().is_some_and(|s| s.at < start) {
                samples.pop_front();
            }
            !samples.is_empty()
        });
    }
}

impl LiveStats {
    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds one outcome.
    pub fn record(&self, event: OutcomeEvent) {
        let failed = event.outcome != "succeeded";
        let answered = event.status.is_some_and(|s| s != 404);
        if let Some(status) = event.status {
            queue_core::metrics::note_answered(&event.function, status);
        }
        let mut window = self.window();
        if !window.functions.contains_key(&event.function) {
            if !answered {
                return;
            }
            if window.functions.len() >= MAX_FUNCTIONS {
                window.drop_idle(queue_core::unix_nanos_now());
            }
            if window.functions.len() >= MAX_FUNCTIONS {
                return;
            }
        }
        let samples = window.functions.entry(event.function.clone()).or_default();
        samples.push_back(Sample {
            at: event.at,
            failed,
            end_to_end: event.end_to_end_seconds,
        });
        while samples.len() > MAX_SAMPLES {
            samples.pop_front();
        }
        if failed {
            window.failures.push_front(event);
            window.failures.truncate(RECENT_FAILURES);
        }
    }

    /// The figures now.
    pub fn snapshot(&self) -> Snapshot {
        let now = queue_core::unix_nanos_now();
        let rate_start = now.saturating_sub(u64::try_from(RATE_WINDOW.as_nanos()).unwrap_or(0));
        let mut window = self.window();
        window.drop_idle(now);
        let mut functions = Vec::new();
        for (function, samples) in &window.functions {
            let completed = samples.len() as u64;
            let failed = samples.iter().filter(|s| s.failed).count() as u64;
            let recent = samples.iter().filter(|s| s.at >= rate_start).count();
            let mut latencies: Vec<f64> = samples.iter().map(|s| s.end_to_end).collect();
            latencies.sort_by(f64::total_cmp);
            #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            functions.push(FunctionFigures {
                function: function.clone(),
                completed,
                failed,
                error_rate: if completed == 0 {
                    0.0
                } else {
                    failed as f64 / completed as f64
                },
                per_second: recent as f64 / RATE_WINDOW.as_secs_f64(),
                p50_seconds: percentile(&latencies, 0.50),
                p90_seconds: percentile(&latencies, 0.90),
                p99_seconds: percentile(&latencies, 0.99),
            });
        }
        functions.sort_by(|a, b| a.function.cmp(&b.function));
        Snapshot {
            window_seconds: WINDOW.as_secs(),
            functions,
            recent_failures: window.failures.iter().cloned().collect(),
        }
    }
}

/// Feeds `stats` from the queue's outcome announcements until `stop` fires.
pub async fn follow<Q: CallQueue>(queue: Arc<Q>, stats: Arc<LiveStats>, stop: CancellationToken) {
    let mut wait = Duration::from_millis(250);
    while !stop.is_cancelled() {
        let mut outcomes = match queue.outcomes().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot follow outcomes yet");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
                wait = (wait * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        wait = Duration::from_millis(250);
        loop {
            tokio::select! {
                next = outcomes.next() => match next {
                    Some(event) => stats.record(event),
                    None => break,
                },
                () = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(function: &str, outcome: &str, e2e: f64) -> OutcomeEvent {
        OutcomeEvent {
            call_id: "c".into(),
            function: function.into(),
            outcome: outcome.into(),
            at: queue_core::unix_nanos_now(),
            end_to_end_seconds: e2e,
            status: Some(200),
            reason: None,
        }
    }

    #[test]
    fn figures_per_function() {
        let stats = LiveStats::default();
        for i in 1..=100 {
            stats.record(event("a", "succeeded", f64::from(i) / 100.0));
        }
        stats.record(event("b", "failed", 2.0));
        stats.record(event("b", "succeeded", 1.0));
        let snapshot = stats.snapshot();
        let a = &snapshot.functions[0];
        assert_eq!((a.function.as_str(), a.completed, a.failed), ("a", 100, 0));
        assert!((a.p50_seconds - 0.5).abs() < 1e-9);
        assert!((a.p99_seconds - 0.99).abs() < 1e-9);
        let b = &snapshot.functions[1];
        assert!((b.error_rate - 0.5).abs() < 1e-9);
        assert_eq!(snapshot.recent_failures.len(), 1);
        assert_eq!(snapshot.recent_failures[0].function, "b");
    }

    #[test]
    fn only_functions_that_answered_take_slots_and_idle_ones_leave() {
        let stats = LiveStats::default();
        for i in 0..MAX_FUNCTIONS + 50 {
            let mut junk = event(&format!("junk-{i}"), "failed", 0.1);
            junk.status = Some(404);
            stats.record(junk);
            let mut unreachable = event(&format!("gone-{i}"), "dead_lettered", 0.1);
            unreachable.status = None;
            stats.record(unreachable);
        }
        stats.record(event("real", "succeeded", 0.1));
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.functions.len(), 1, "{:?}", snapshot.functions);
        assert_eq!(snapshot.functions[0].function, "real");

        let full = LiveStats::default();
        let old = queue_core::unix_nanos_now() - 2 * u64::try_from(WINDOW.as_nanos()).unwrap();
        for i in 0..MAX_FUNCTIONS {
            let mut e = event(&format!("f{i}"), "succeeded", 0.1);
            e.at = old;
            full.record(e);
        }
        full.record(event("new", "succeeded", 0.1));
        let snapshot = full.snapshot();
        assert_eq!(snapshot.functions.len(), 1, "idle functions made room");
        assert_eq!(snapshot.functions[0].function, "new");
    }
}
