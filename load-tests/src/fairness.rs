//! `load-tests fairness`: how long a call waits behind another function's backlog.
//!
//! For each *layout* the harness starts a fresh nats-server, stub function (every call held
//! `delay`), callback receiver, gateway and worker, queues `backlog` calls for one function
//! as fast as the gateway takes them, then submits one *probe* call every `probe_every` until
//! the backlog is drained (and at least `min_probes`). A call's *wait* is its callback's
//! arrival minus its submission minus the function's `delay`: an upper bound on its queue
//! wait (it includes the gateway, the worker and the callback).
//!
//! | layout | worker | backlog | probes |
//! |---|---|---|---|
//! | `shared` | one shared consumer (arrival order) | `batch` | `interactive` |
//! | `fair` | `--fair-scheduling true` | `batch` | `interactive` |
//! | `fair-namespaces` | `--fair-scheduling true` | `batch.team-a` | `interactive.team-b` |
//! | `priority` | `--fair-scheduling true` | `batch`, `X-Priority: low` | `batch`, `X-Priority: high` |

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::BenchError;
use crate::sut::{Backend, SutOptions, SystemUnderTest};
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

/// One way of running the worker and of addressing the calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Arrival order (the default worker).
    Shared,
    /// Fair scheduling, two functions of one namespace.
    Fair,
    /// Fair scheduling, two functions in two namespaces.
    FairNamespaces,
    /// Fair scheduling, one function: a low-priority backlog and high-priority probes.
    Priority,
}

impl Layout {
    /// Every layout, in report order.
    pub const ALL: [Self; 4] = [
        Self::Shared,
        Self::Fair,
        Self::FairNamespaces,
        Self::Priority,
    ];

    fn fair(self) -> bool {
        self != Self::Shared
    }

    /// The backlog's function and priority, then the probes'.
    fn calls(self) -> [(&'static str, Option<&'static str>); 2] {
        match self {
            Self::Shared | Self::Fair => [("batch", None), ("interactive", None)],
            Self::FairNamespaces => [("batch.team-a", None), ("interactive.team-b", None)],
            Self::Priority => [("batch", Some("low")), ("batch", Some("high"))],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Fair => "fair",
            Self::FairNamespaces => "fair-namespaces",
            Self::Priority => "priority",
        }
    }
}

/// What `load-tests fairness` does.
#[derive(Clone, Debug)]
pub struct FairnessOptions {
    /// Calls queued for the busy function.
    pub backlog: usize,
    /// How long the function holds every call.
    pub delay: Duration,
    /// One probe call this often.
    pub probe_every: Duration,
    /// Probes at least (the backlog may drain sooner).
    pub min_probes: usize,
    /// The worker's `--max-inflight`.
    pub max_inflight: u32,
    /// Where the binaries are.
    pub bin_dir: Option<PathBuf>,
    /// The layouts to run, in order.
    pub layouts: Vec<Layout>,
    /// Hard limit on one layout's run.
    pub time_limit: Duration,
}

impl Default for FairnessOptions {
    fn default() -> Self {
        Self {
            backlog: 10_000,
            delay: Duration::from_millis(50),
            probe_every: Duration::from_secs(1),
            min_probes: 10,
            max_inflight: 50,
            bin_dir: None,
            layouts: Layout::ALL.to_vec(),
            time_limit: Duration::from_secs(900),
        }
    }
}

/// Wait percentiles of a set of calls, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Waits {
    /// Calls measured.
    pub calls: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Longest.
    pub max_ms: f64,
}

impl Waits {
    fn of(mut waits: Vec<Duration>) -> Self {
        waits.sort();
        // The nearest-rank percentile, `per_mille` of the way up.
        let at = |per_mille: usize| -> f64 {
            if waits.is_empty() {
                return 0.0;
            }
            let rank = (waits.len() * per_mille)
                .div_ceil(1000)
                .clamp(1, waits.len());
            waits[rank - 1].as_secs_f64() * 1000.0
        };
        Self {
            calls: waits.len(),
            p50_ms: at(500),
            p99_ms: at(990),
            max_ms: waits.last().map_or(0.0, |w| w.as_secs_f64() * 1000.0),
        }
    }
}

/// One layout's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayoutReport {
    /// Which layout.
    pub layout: Layout,
    /// From the first backlog call submitted to the last one called back, seconds.
    pub backlog_drained_s: f64,
    /// The backlog's waits.
    pub backlog: Waits,
    /// The probes' waits.
    pub probes: Waits,
    /// Backlog calls called back while the probes ran (the backlog still progresses).
    pub backlog_done_during_probes: usize,
    /// Calls not called back, or called back more than once.
    pub lost: usize,
    /// Duplicate callbacks.
    pub duplicates: usize,
}

/// The whole run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FairnessReport {
    /// Calls in each backlog.
    pub backlog: usize,
    /// The function's time per call, milliseconds.
    pub delay_ms: u64,
    /// The worker's `--max-inflight`.
    pub max_inflight: u32,
    /// Per layout.
    pub layouts: Vec<LayoutReport>,
}

impl FairnessReport {
    /// Every call was called back exactly once.
    pub fn is_clean(&self) -> bool {
        self.layouts
            .iter()
            .all(|l| l.lost == 0 && l.duplicates == 0)
    }

    /// The report as a Markdown table.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "fairness: {} backlog calls of {} ms, --max-inflight {}; wait = callback − submit − {} ms\n\n\
             | layout | backlog drained | backlog wait p50 | probes | probe wait p50 | p99 | max | backlog done while probed | lost | dup |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
            self.backlog, self.delay_ms, self.max_inflight, self.delay_ms
        );
        for l in &self.layouts {
            out.push_str(&format!(
                "| {} | {:.1} s | {:.0} ms | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} | {} |\n",
                l.layout.name(),
                l.backlog_drained_s,
                l.backlog.p50_ms,
                l.probes.calls,
                l.probes.p50_ms,
                l.probes.p99_ms,
                l.probes.max_ms,
                l.backlog_done_during_probes,
                l.lost,
                l.duplicates
            ));
        }
        out
    }
}

/// Runs every layout of `opts`.
pub async fn run(opts: &FairnessOptions) -> Result<FairnessReport, BenchError> {
    crate::sut::ensure_nats_server().await?;
    let mut layouts = Vec::new();
    for &layout in &opts.layouts {
        let report = tokio::time::timeout(opts.time_limit, run_layout(opts, layout))
            .await
            .map_err(|_| {
                BenchError::Setup(format!(
                    "layout {} did not finish within {:?}",
                    layout.name(),
                    opts.time_limit
                ))
            })??;
        eprintln!(
            "fairness: {} done: probe wait p99 {:.0} ms",
            layout.name(),
            report.probes.p99_ms
        );
        layouts.push(report);
    }
    Ok(FairnessReport {
        backlog: opts.backlog,
        delay_ms: u64::try_from(opts.delay.as_millis()).unwrap_or(u64::MAX),
        max_inflight: opts.max_inflight,
        layouts,
    })
}

/// Submits one call; its id and when it was sent.
async fn submit(
    client: &reqwest::Client,
    gateway: &str,
    callback: &str,
    (function, priority): (&str, Option<&str>),
) -> Result<(String, Instant), BenchError> {
    let sent = Instant::now();
    let mut request = client
        .post(format!("{gateway}/async-function/{function}"))
        .header("x-callback-url", callback)
        .body("x");
    if let Some(priority) = priority {
        request = request.header("x-priority", priority);
    }
    let response = request
        .send()
        .await
        .map_err(|e| BenchError::setup("submitting a call", e))?;
    if response.status() != reqwest::StatusCode::ACCEPTED {
        return Err(BenchError::Setup(format!(
            "the gateway answered {} to a call of {function}",
            response.status()
        )));
    }
    let id = response
        .headers()
        .get("x-call-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| BenchError::Setup("a 202 without X-Call-Id".into()))?;
    Ok((id, sent))
}

async fn run_layout(opts: &FairnessOptions, layout: Layout) -> Result<LayoutReport, BenchError> {
    let nats = NatsServer::start().await?;
    let function = StubFunction::start(StubBehavior {
        delay: opts.delay,
        ..StubBehavior::default()
    })
    .await?;
    function.set_recording(false);
    let receiver = CallbackReceiver::start().await?;
    let system = SystemUnderTest::start(&SutOptions {
        backend: Backend::JetStream,
        bin_dir: opts.bin_dir.clone(),
        max_inflight: opts.max_inflight,
        function_url: function.url(),
        nats_url: nats.url(),
        worker_args: vec![format!("--fair-scheduling={}", layout.fair())],
        gateway_args: Vec::new(),
    })
    .await?;
    let result = measure(opts, layout, &system.gateway_url, &receiver).await;
    let stopped = system.stop().await;
    let report = result?;
    stopped?;
    Ok(report)
}

async fn measure(
    opts: &FairnessOptions,
    layout: Layout,
    gateway: &str,
    receiver: &CallbackReceiver,
) -> Result<LayoutReport, BenchError> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .map_err(|e| BenchError::setup("building the HTTP client", e))?;
    let callback = receiver.url();
    let [backlog_call, probe_call] = layout.calls();
    // The backlog, as fast as the gateway takes it (32 at a time).
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (client, gateway, callback, next) = (
            client.clone(),
            gateway.to_owned(),
            callback.clone(),
            next.clone(),
        );
        let total = opts.backlog;
        tasks.spawn(async move {
            let mut sent = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                sent.push(submit(&client, &gateway, &callback, backlog_call).await?);
            }
            Ok::<_, BenchError>(sent)
        });
    }
    let mut backlog: HashMap<String, Instant> = HashMap::with_capacity(opts.backlog);
    while let Some(done) = tasks.join_next().await {
        let sent =
            done.map_err(|e| BenchError::Setup(format!("a submitting task failed: {e}")))??;
        backlog.extend(sent);
    }
    let arrived = |ids: &HashMap<String, Instant>| -> usize {
        let seen = receiver.count_by_call_id();
        ids.keys().filter(|id| seen.contains_key(*id)).count()
    };
    // Probes, one every `probe_every`, while the backlog drains.
    let done_before_probes = arrived(&backlog);
    let mut probes: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(opts.probe_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if probes.len() >= opts.min_probes && arrived(&backlog) == backlog.len() {
            break;
        }
        let (id, sent) = submit(&client, gateway, &callback, probe_call).await?;
        probes.insert(id, sent);
    }
    let done_while_probed = arrived(&backlog).saturating_sub(done_before_probes);
    // The last probes' callbacks.
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrived(&probes) < probes.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let callbacks = receiver.callbacks();
    let mut first: HashMap<&str, Instant> = HashMap::new();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for c in &callbacks {
        if let Some(id) = c.call_id.as_deref() {
            first.entry(id).or_insert(c.received_at);
            *counts.entry(id).or_default() += 1;
        }
    }
    let waits = |ids: &HashMap<String, Instant>| -> Vec<Duration> {
        ids.iter()
            .filter_map(|(id, sent)| {
                first.get(id.as_str()).map(|at| {
                    at.saturating_duration_since(*sent)
                        .saturating_sub(opts.delay)
                })
            })
            .collect()
    };
    let last_backlog = backlog
        .keys()
        .filter_map(|id| first.get(id.as_str()))
        .max()
        .copied()
        .unwrap_or(started);
    let expected = backlog.len() + probes.len();
    let lost = backlog
        .keys()
        .chain(probes.keys())
        .filter(|id| !counts.contains_key(id.as_str()))
        .count();
    let duplicates = counts.values().map(|n| n.saturating_sub(1)).sum();
    debug_assert!(lost <= expected);
    Ok(LayoutReport {
        layout,
        backlog_drained_s: last_backlog
            .saturating_duration_since(started)
            .as_secs_f64(),
        backlog: Waits::of(waits(&backlog)),
        probes: Waits::of(waits(&probes)),
        backlog_done_during_probes: done_while_probed,
        lost,
        duplicates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_few_waits() {
        let w = Waits::of((1..=100).map(Duration::from_millis).collect());
        assert_eq!(w.calls, 100);
        assert!((w.p50_ms - 50.0).abs() < 1e-9, "{w:?}");
        assert!((w.p99_ms - 99.0).abs() < 1e-9, "{w:?}");
        assert!((w.max_ms - 100.0).abs() < 1e-9, "{w:?}");
        assert_eq!(Waits::of(Vec::new()), Waits::default());
    }
}
