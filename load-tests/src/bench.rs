//! The throughput and latency benchmark behind `load-tests bench`.
//!
//! [`run`] starts everything on `127.0.0.1`: a private [`NatsServer`], the
//! system under test as child processes ([`SystemUnderTest`]: the
//! `gateway-plugin` and `queue-worker` binaries, the worker's gateway URL a
//! zero-delay [`StubFunction`]), and a [`CallbackReceiver`] whose callbacks
//! are matched to the accepted call ids ([`audit_callbacks`]: lost,
//! duplicated, unexpected, bad headers). It then measures, one phase after
//! the other:
//!
//! 1. `baseline_http`: POSTs of the same body to a trivial axum handler
//!    answering `202`: what loopback HTTP alone allows.
//! 2. `baseline_js_publish`: closed-loop JetStream publishes, each awaiting
//!    its ack, to a separate file-backed stream of the same server; then
//!    `baseline_js_pull_ack`: one pull consumer drains those messages,
//!    acking each (a rate only).
//! 3. `accept`: POSTs to `/async-function/bench` with an `X-Callback-Url`; a
//!    `202` counts as accepted.
//! 4. `end_to_end`: measured over the same calls as `accept`, from the first
//!    submit until every accepted call's callback arrived (or the callback
//!    timeout passed).
//!
//! # Load models
//!
//! Without [`BenchOptions::rate`] every phase is a *closed loop*:
//! `concurrency` client tasks share one HTTP client (or one NATS connection);
//! a task sends its next request as soon as the previous one was answered,
//! until `calls` requests were sent in total. Latencies run from the actual
//! send.
//!
//! With a rate, `baseline_http` and `accept` (hence `end_to_end`) are an
//! *open loop* ([`open_loop()`]): request `i` is due at `t0 + i / rate`
//! whatever the earlier ones are doing, and every latency (the answer's, and
//! the callback's for `end_to_end`) runs from that **intended** send time, so
//! queueing behind a slow target is not hidden (no coordinated omission).
//! `baseline_js_publish` stays a closed loop of `concurrency` tasks.

use std::collections::HashMap;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use gateway_plugin::GatewayError;
use hdrhistogram::Histogram;
use queue_worker::worker::WorkerError;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::audit::{CallbackAudit, Expectations, audit_callbacks};
use crate::sut::{Backend, ProcessUsage, SutOptions, SystemUnderTest, find_bin_dir};
use crate::{
    CallbackReceiver, HarnessError, NatsServer, StubBehavior, StubFunction, Timed, open_loop,
};

/// Default number of calls per phase.
pub const DEFAULT_CALLS: usize = 5000;
/// Default number of concurrent client tasks.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Default `--max-inflight` of the worker.
pub const DEFAULT_MAX_INFLIGHT: u32 = 256;
/// Default request body size in bytes.
pub const DEFAULT_BODY_BYTES: usize = 64;
/// Default hard limit on the whole run.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(5 * 60);
/// Default wait for outstanding callbacks once every call was submitted.
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Most calls per phase [`run`] accepts.
pub const MAX_CALLS: usize = 1_000_000;
/// Most client tasks [`run`] accepts.
pub const MAX_CONCURRENCY: usize = 4096;
/// Largest body [`run`] accepts.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Highest open-loop rate [`run`] accepts, in requests per second.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Most requests of an open loop in flight at once; a request due while all
/// are busy waits for one, and the wait counts towards its latency. Far
/// above what a healthy target needs (rate × latency), it only bounds the
/// sockets opened while the target stalls.
pub const OPEN_LOOP_MAX_IN_FLIGHT: usize = 4096;

/// The function the accepted calls are addressed to.
const FUNCTION: &str = "bench";
/// Stream and subject of the JetStream baseline, apart from the gateway's.
const BASELINE_STREAM: &str = "LOAD_TESTS_BASELINE";
const BASELINE_SUBJECT: &str = "load-tests-baseline.publish";
/// Longest a single request or publish of a closed loop may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the baseline HTTP server may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the progress line is redrawn, and its bar's width.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
const PROGRESS_WIDTH: usize = 30;
/// How often outstanding callbacks are checked.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Upper bound of the latency histograms (one hour, in microseconds).
const HISTOGRAM_MAX_MICROS: u64 = 3_600_000_000;

/// A named benchmark: a preset of [`BenchOptions`] that explicit options
/// override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Closed loop, 20,000 calls, concurrency 64: the sustainable rate.
    Throughput,
    /// Open loop at 1,000 calls/s (about half the sustainable end-to-end
    /// rate on the reference machine, BENCHMARKS.md), 5,000 calls: latency
    /// percentiles.
    LatencyAtRate,
    /// 10,000 calls in flight at once on one worker (`--max-inflight
    /// 10000`), each held 30 s by the function.
    LongRunning,
}

impl Scenario {
    /// The options of this scenario.
    pub fn options(self) -> BenchOptions {
        let base = BenchOptions::default();
        match self {
            Self::Throughput => BenchOptions {
                calls: 20_000,
                concurrency: 64,
                ..base
            },
            Self::LatencyAtRate => BenchOptions {
                calls: 5_000,
                rate: Some(1000.0),
                ..base
            },
            Self::LongRunning => BenchOptions {
                calls: 10_000,
                concurrency: 256,
                max_inflight: 10_000,
                function_delay: Duration::from_secs(30),
                callback_timeout: Duration::from_secs(180),
                time_limit: Duration::from_secs(600),
                ..base
            },
        }
    }
}

/// How requests are paced; see the [module docs](self#load-models).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadModel {
    /// `concurrency` tasks, each sending when its previous request was
    /// answered; latency from the actual send.
    Closed,
    /// A fixed schedule of `rate` requests per second; latency from the
    /// intended send time.
    Open,
}

/// What [`run`] does; [`BenchOptions::default`] is the CLI's default.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchOptions {
    /// Requests per phase (HTTP baseline, JetStream baseline, accepted calls).
    pub calls: usize,
    /// Concurrent client tasks of each closed loop.
    pub concurrency: usize,
    /// Open-loop rate of `baseline_http` and `accept`, in requests per
    /// second; `None` runs every phase as a closed loop.
    pub rate: Option<f64>,
    /// The worker's `--max-inflight`.
    pub max_inflight: u32,
    /// Size of each request body and published message.
    pub body_bytes: usize,
    /// Hard limit on the whole run, set-up and shutdown included.
    pub time_limit: Duration,
    /// How long to wait for outstanding callbacks once every call was
    /// submitted; calls still without one are reported as lost.
    pub callback_timeout: Duration,
    /// Which system is benchmarked.
    pub backend: Backend,
    /// How long the stub function holds each call.
    pub function_delay: Duration,
    /// Where the `gateway-plugin` and `queue-worker` binaries are; `None`
    /// looks next to the current executable.
    pub bin_dir: Option<PathBuf>,
    /// For the harness's own tests: make the callback receiver lose every n-th and duplicate
    /// every m-th callback it records (`(n, m)`, 0 = off), to check that the report says so.
    pub receiver_fault: Option<(usize, usize)>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            calls: DEFAULT_CALLS,
            concurrency: DEFAULT_CONCURRENCY,
            rate: None,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            body_bytes: DEFAULT_BODY_BYTES,
            time_limit: DEFAULT_TIME_LIMIT,
            callback_timeout: DEFAULT_CALLBACK_TIMEOUT,
            backend: Backend::default(),
            function_delay: Duration::ZERO,
            bin_dir: None,
            receiver_fault: None,
        }
    }
}

impl BenchOptions {
    /// Checks the bounds documented on the `MAX_*` constants.
    pub fn validate(&self) -> Result<(), BenchError> {
        let fail = |message: String| Err(BenchError::Options(message));
        if !(1..=MAX_CALLS).contains(&self.calls) {
            return fail(format!("calls must be 1..={MAX_CALLS}, not {}", self.calls));
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return fail(format!(
                "concurrency must be 1..={MAX_CONCURRENCY}, not {}",
                self.concurrency
            ));
        }
        if !(1..=100_000).contains(&self.max_inflight) {
            return fail(format!(
                "max-inflight must be 1..=100000, not {}",
                self.max_inflight
            ));
        }
        if self.body_bytes > MAX_BODY_BYTES {
            return fail(format!(
                "body-bytes must be at most {MAX_BODY_BYTES}, not {}",
                self.body_bytes
            ));
        }
        if self.time_limit.is_zero() || self.callback_timeout.is_zero() {
            return fail("time-limit and callback-timeout must be positive".to_owned());
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0 && rate <= MAX_RATE) {
                return fail(format!(
                    "rate must be above 0 and at most {MAX_RATE}, not {rate}"
                ));
            }
            // Two open-loop phases of calls / rate each must fit.
            #[expect(clippy::cast_precision_loss, reason = "calls are at most MAX_CALLS")]
            let schedule = 2.0 * self.calls as f64 / rate;
            if schedule >= self.time_limit.as_secs_f64() {
                return fail(format!(
                    "{} calls at {rate}/s take {schedule:.1} s in the two open-loop phases, \
                     not less than the time-limit of {:?}",
                    self.calls, self.time_limit
                ));
            }
        }
        Ok(())
    }

    /// The load model these options select.
    pub fn load_model(&self) -> LoadModel {
        if self.rate.is_some() {
            LoadModel::Open
        } else {
            LoadModel::Closed
        }
    }
}

/// Why [`run`] could not produce a [`Report`]. Lost calls are not an error:
/// they are part of the report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options are out of bounds.
    #[error("invalid options: {0}")]
    Options(String),
    /// The run took longer than [`BenchOptions::time_limit`].
    #[error("bench exceeded its time limit of {0:?}; aborted")]
    TimeLimit(Duration),
    /// A harness component failed.
    #[error(transparent)]
    Harness(#[from] HarnessError),
    /// The gateway failed.
    #[error("gateway: {0}")]
    Gateway(#[from] GatewayError),
    /// The worker failed.
    #[error("worker: {0}")]
    Worker(#[from] WorkerError),
    /// The gateway or worker binary is not where it was looked for.
    #[error(
        "binaries {binaries} not found in {searched}: run `cargo build --release --workspace` \
         (then run target/release/load-tests), or pass --bin-dir"
    )]
    BinariesMissing {
        /// The binaries looked for.
        binaries: String,
        /// The directories searched.
        searched: String,
    },
    /// Anything else in setting up or tearing down: NATS, sockets,
    /// configuration, readiness, a panicked task.
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    pub(crate) fn setup(context: &str, err: impl std::fmt::Display) -> Self {
        Self::Setup(format!("{context}: {err}"))
    }
}

/// Latency percentiles of a phase, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value.
    pub max: u64,
}

/// One closed-loop phase: `baseline_http`, `baseline_js_publish` or `accept`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase {
    /// Requests sent.
    pub sent: u64,
    /// Requests that succeeded (`202`, or an acknowledged publish).
    pub ok: u64,
    /// Requests that failed (other status, transport error, timeout).
    pub failed: u64,
    /// The first failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Wall time from the first request (its intended send time in an open
    /// loop) until the last answer.
    pub seconds: f64,
    /// Successful requests per second.
    pub rate_per_sec: f64,
    /// Latency of successful requests, request start to answer; in an open
    /// loop the start is the intended send time.
    pub latency_us: Latency,
}

/// The end-to-end phase, over the calls accepted in the `accept` phase.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndToEnd {
    /// Accepted calls whose callback arrived.
    pub completed: u64,
    /// Accepted calls without a callback once the callback timeout passed.
    pub lost: u64,
    /// Call ids with more than one callback.
    pub duplicates: u64,
    /// Callbacks for call ids that were never accepted, or without one.
    pub unexpected: u64,
    /// Completed calls whose first callback did not carry
    /// `X-Function-Status: 200` and the echoed body.
    pub bad_results: u64,
    /// Callbacks of accepted calls missing a promised header (`X-Call-Id`,
    /// `X-Function-Status`, `X-Function-Name`, `X-Duration-Seconds`,
    /// `X-Start-Time`) or carrying a malformed one.
    pub bad_headers: u64,
    /// The first callback problem found, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_problem: Option<String>,
    /// Wall time from the first submit until the last first callback.
    pub seconds: f64,
    /// Completed calls per second.
    pub rate_per_sec: f64,
    /// Latency from a call's submit (its intended send time in an open loop)
    /// to the arrival of its first callback.
    pub latency_us: Latency,
    /// The function's own time per completed call, from the callback's
    /// `X-Duration-Seconds`.
    pub function_time_us: Latency,
}

/// Throughput ratios (0 when a denominator is 0).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ratios {
    /// `accept` rate / `baseline_http` rate.
    pub accept_vs_baseline_http: f64,
    /// `end_to_end` rate / `baseline_http` rate.
    pub end_to_end_vs_baseline_http: f64,
    /// `accept` rate / `baseline_js_publish` rate.
    pub accept_vs_baseline_js_publish: f64,
    /// `end_to_end` rate / `baseline_js_pull_ack` rate.
    pub end_to_end_vs_baseline_js_pull_ack: f64,
}

/// What [`run`] measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Requests per phase.
    pub calls: u64,
    /// Concurrent client tasks of the closed loops.
    pub concurrency: u64,
    /// `closed`, or `open` for `baseline_http`, `accept` and `end_to_end`
    /// (`baseline_js_publish` is always closed).
    pub load_model: LoadModel,
    /// The open-loop rate in requests per second; `null` in a closed loop.
    pub rate: Option<f64>,
    /// The worker's `--max-inflight`.
    pub max_inflight: u32,
    /// Request body size.
    pub body_bytes: u64,
    /// CPUs available to this process.
    pub cpus: u64,
    /// Raw loopback HTTP.
    pub baseline_http: Phase,
    /// Raw JetStream publish with ack.
    pub baseline_js_publish: Phase,
    /// Raw JetStream pull with ack of the published messages (one pull
    /// consumer; no latencies, which stay 0).
    pub baseline_js_pull_ack: Phase,
    /// Gateway accepts.
    pub accept: Phase,
    /// Accepted calls through to their callbacks.
    pub end_to_end: EndToEnd,
    /// Throughput ratios.
    pub ratios: Ratios,
    /// The system under test.
    pub backend: Backend,
    /// Memory and CPU of its processes once ready, before any load.
    pub idle: Vec<ProcessUsage>,
    /// Memory (peak over the run) and CPU of its processes after the run.
    pub after_run: Vec<ProcessUsage>,
    /// CPU seconds of all its processes during the run per completed call,
    /// in microseconds.
    pub cpu_us_per_call: f64,
    /// Wall time of the whole run, set-up and shutdown included.
    pub total_seconds: f64,
}

impl Report {
    /// Whether every call was accepted and completed with a good result and
    /// no call was lost.
    pub fn is_clean(&self) -> bool {
        let e2e = &self.end_to_end;
        self.accept.failed == 0
            && e2e.lost == 0
            && e2e.duplicates == 0
            && e2e.unexpected == 0
            && e2e.bad_results == 0
            && e2e.bad_headers == 0
    }

    /// A human-readable table of the report, ending with a newline.
    pub fn to_table(&self) -> String {
        let model = match (self.load_model, self.rate) {
            (LoadModel::Open, Some(rate)) => format!(
                "open loop at {rate} req/s for baseline_http/accept/end_to_end \
                 (latency from intended send time), closed loop with concurrency {} \
                 for baseline_js_publish",
                self.concurrency
            ),
            _ => format!("closed loop, concurrency {}", self.concurrency),
        };
        let mut out = format!(
            "load-tests bench: {} calls per phase, {model}, worker max-inflight {}, \
             body {} B, {} CPUs, all on 127.0.0.1\n\n",
            self.calls, self.max_inflight, self.body_bytes, self.cpus
        );
        out.push_str(&format!(
            "{:<21} {:>8} {:>7} {:>9} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "phase",
            "ok",
            "failed",
            "seconds",
            "rate/s",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs"
        ));
        let e2e = &self.end_to_end;
        let rows = [
            ("baseline_http", &self.baseline_http),
            ("baseline_js_publish", &self.baseline_js_publish),
            ("baseline_js_pull_ack", &self.baseline_js_pull_ack),
            ("accept", &self.accept),
        ]
        .map(|(name, phase)| {
            (
                name,
                phase.ok,
                phase.failed,
                phase.seconds,
                phase.rate_per_sec,
                phase.latency_us,
            )
        });
        let last = (
            "end_to_end",
            e2e.completed,
            e2e.lost,
            e2e.seconds,
            e2e.rate_per_sec,
            e2e.latency_us,
        );
        for (name, ok, failed, seconds, rate, latency) in rows.into_iter().chain([last]) {
            out.push_str(&format!(
                "{name:<21} {ok:>8} {failed:>7} {seconds:>9.3} {rate:>11.1} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
                latency.p50, latency.p90, latency.p99, latency.p999, latency.max
            ));
        }
        out.push_str(&format!(
            "\nratios: accept/baseline_http {:.3}, end_to_end/baseline_http {:.3}, \
             accept/baseline_js_publish {:.3}, end_to_end/baseline_js_pull_ack {:.3}\n",
            self.ratios.accept_vs_baseline_http,
            self.ratios.end_to_end_vs_baseline_http,
            self.ratios.accept_vs_baseline_js_publish,
            self.ratios.end_to_end_vs_baseline_js_pull_ack
        ));
        out.push_str(&format!(
            "end_to_end: {} of {} accepted calls completed; lost {}, duplicates {}, \
             unexpected {}, bad results {}, bad headers {} \
             (end_to_end \"failed\" column = lost)\n",
            e2e.completed,
            self.accept.ok,
            e2e.lost,
            e2e.duplicates,
            e2e.unexpected,
            e2e.bad_results,
            e2e.bad_headers
        ));
        let f = e2e.function_time_us;
        out.push_str(&format!(
            "function time (X-Duration-Seconds) µs: p50 {} p90 {} p99 {} p99.9 {} max {}\n",
            f.p50, f.p90, f.p99, f.p999, f.max
        ));
        if let Some(problem) = &e2e.first_problem {
            out.push_str(&format!("end_to_end: first callback problem: {problem}\n"));
        }
        if let Some(err) = &self.accept.first_error {
            out.push_str(&format!("accept: first failure: {err}\n"));
        }
        for usage in &self.idle {
            out.push_str(&format!("idle   {usage}\n"));
        }
        for usage in &self.after_run {
            out.push_str(&format!("run    {usage}\n"));
        }
        out.push_str(&format!(
            "CPU per completed call (gateway + worker): {:.1} µs\n",
            self.cpu_us_per_call
        ));
        out.push_str(&format!("total wall time {:.1} s\n", self.total_seconds));
        out
    }
}

/// Runs the benchmark; see the [module docs](self). Fails if set-up fails or
/// the run exceeds [`BenchOptions::time_limit`] (everything started is then
/// stopped).
pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    opts.validate()?;
    match tokio::time::timeout(opts.time_limit, run_unbounded(opts)).await {
        Ok(result) => result,
        Err(_) => Err(BenchError::TimeLimit(opts.time_limit)),
    }
}

async fn run_unbounded(opts: &BenchOptions) -> Result<Report, BenchError> {
    let started = Instant::now();
    // Missing binaries fail before anything starts.
    let bin_dir = find_bin_dir(opts.bin_dir.as_deref(), opts.backend.binaries())?;
    let client = queue_worker::invoke::http_client("load-tests")
        .map_err(|e| BenchError::setup("building the HTTP client", e))?;
    let body = Bytes::from(vec![b'x'; opts.body_bytes]);

    let nats = NatsServer::start().await?;
    let baseline_http = measure_baseline_http(opts, &client, &body).await?;
    let (baseline_js_publish, baseline_js_pull_ack) =
        measure_baseline_js(opts, &nats.url(), &body).await?;

    let function = StubFunction::start(StubBehavior {
        delay: opts.function_delay,
        ..StubBehavior::default()
    })
    .await?;
    // Thousands of recorded requests are not worth their memory here.
    function.set_recording(false);
    let receiver = CallbackReceiver::start().await?;
    if let Some((drop_every, duplicate_every)) = opts.receiver_fault {
        receiver.set_recording_fault(drop_every, duplicate_every);
    }
    let mut system = SystemUnderTest::start(&SutOptions {
        backend: opts.backend,
        bin_dir: Some(bin_dir),
        max_inflight: opts.max_inflight,
        function_url: function.url(),
        nats_url: nats.url(),
    })
    .await?;
    let idle = system.usage();
    let result = measure_async_path(opts, &client, &body, &mut system, &receiver).await;
    let after_run = system.usage();
    // Stop even when the measurement failed; its error comes first.
    let stopped = system.stop().await;
    let (accept, end_to_end) = result?;
    stopped?;
    drop(nats);
    let cpu = |usages: &[ProcessUsage]| usages.iter().map(|u| u.cpu_seconds).sum::<f64>();
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let cpu_us_per_call = if end_to_end.completed > 0 {
        (cpu(&after_run) - cpu(&idle)) * 1e6 / end_to_end.completed as f64
    } else {
        0.0
    };

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ratios = Ratios {
        accept_vs_baseline_http: ratio(accept.rate_per_sec, baseline_http.rate_per_sec),
        end_to_end_vs_baseline_http: ratio(end_to_end.rate_per_sec, baseline_http.rate_per_sec),
        accept_vs_baseline_js_publish: ratio(accept.rate_per_sec, baseline_js_publish.rate_per_sec),
        end_to_end_vs_baseline_js_pull_ack: ratio(
            end_to_end.rate_per_sec,
            baseline_js_pull_ack.rate_per_sec,
        ),
    };
    Ok(Report {
        calls: to_u64(opts.calls),
        concurrency: to_u64(opts.concurrency),
        load_model: opts.load_model(),
        rate: opts.rate,
        max_inflight: opts.max_inflight,
        body_bytes: to_u64(opts.body_bytes),
        cpus: std::thread::available_parallelism().map_or(0, |n| to_u64(n.get())),
        baseline_http,
        baseline_js_publish,
        baseline_js_pull_ack,
        accept,
        end_to_end,
        ratios,
        backend: opts.backend,
        idle,
        after_run,
        cpu_us_per_call,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Phase 1: a trivial axum handler answering `202`.
async fn measure_baseline_http(
    opts: &BenchOptions,
    client: &reqwest::Client,
    body: &Bytes,
) -> Result<Phase, BenchError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| BenchError::setup("binding the baseline HTTP server", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| BenchError::setup("reading the baseline HTTP address", e))?;
    let router = Router::new().route("/", post(|_body: Bytes| async { StatusCode::ACCEPTED }));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });

    let url = format!("http://{addr}/");
    let (client, body) = (client.clone(), body.clone());
    let result = drive(opts, "http", move |_| {
        let request = client
            .post(url.as_str())
            .body(body.clone())
            .timeout(REQUEST_TIMEOUT)
            .send();
        async move {
            let response = request.await.map_err(|e| e.to_string())?;
            expect_status(&response, StatusCode::ACCEPTED).map(|()| None)
        }
    })
    .await?;

    let _ = stop.send(());
    match tokio::time::timeout(STOP_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(BenchError::setup("baseline HTTP server", e)),
        Ok(Err(e)) => return Err(BenchError::setup("baseline HTTP server task", e)),
        Err(_) => tracing::warn!("baseline HTTP server did not stop in time"),
    }
    Ok(result.phase)
}

/// Phase 2: JetStream publishes with ack to a separate file-backed stream.
async fn measure_baseline_js(
    opts: &BenchOptions,
    nats_url: &str,
    body: &Bytes,
) -> Result<(Phase, Phase), BenchError> {
    let nats = async_nats::connect(nats_url)
        .await
        .map_err(|e| BenchError::setup("connecting to nats-server", e))?;
    let js = jetstream::new(nats.clone());
    js.create_stream(stream::Config {
        name: BASELINE_STREAM.to_owned(),
        subjects: vec![BASELINE_SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| BenchError::setup("creating the baseline stream", e))?;

    let (publisher, body) = (js.clone(), body.clone());
    let result = closed_loop(opts.calls, opts.concurrency, move |_| {
        let (js, body) = (publisher.clone(), body.clone());
        async move {
            let publish = async {
                js.publish(BASELINE_SUBJECT, body)
                    .await
                    .map_err(|e| format!("publish: {e}"))?
                    .await
                    .map_err(|e| format!("ack: {e}"))
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, publish).await {
                Ok(ack) => ack.map(|_| None),
                Err(_) => Err(format!("no ack within {REQUEST_TIMEOUT:?}")),
            }
        }
    })
    .await?;

    let pull_ack = measure_pull_ack(&js, opts.calls).await;
    js.delete_stream(BASELINE_STREAM)
        .await
        .map_err(|e| BenchError::setup("deleting the baseline stream", e))?;
    Ok((result.phase, pull_ack?))
}

/// Phase 2b: one pull consumer drains the messages just published, acking
/// each; a rate, without per-message latencies.
async fn measure_pull_ack(js: &jetstream::Context, calls: usize) -> Result<Phase, BenchError> {
    use futures::StreamExt as _;
    let stream = js
        .get_stream(BASELINE_STREAM)
        .await
        .map_err(|e| BenchError::setup("looking up the baseline stream", e))?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("load-tests-baseline".to_owned()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .map_err(|e| BenchError::setup("creating the baseline consumer", e))?;
    let started = Instant::now();
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| BenchError::setup("pulling from the baseline stream", e))?;
    let (mut ok, mut failed, mut first_error) = (0_u64, 0_u64, None);
    while ok + failed < to_u64(calls) {
        let next = tokio::time::timeout(REQUEST_TIMEOUT, messages.next()).await;
        let message = match next {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => {
                failed += 1;
                first_error.get_or_insert(format!("pull: {e}"));
                continue;
            }
            Ok(None) | Err(_) => {
                first_error.get_or_insert(format!("no message within {REQUEST_TIMEOUT:?}"));
                break;
            }
        };
        match message.ack().await {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(format!("ack: {e}"));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Phase {
        sent: ok + failed,
        ok,
        failed,
        first_error,
        seconds,
        rate_per_sec: rate_of(ok, seconds),
        latency_us: Latency::default(),
    })
}

/// Phases 3 and 4: calls through the gateway, and their callbacks.
async fn measure_async_path(
    opts: &BenchOptions,
    client: &reqwest::Client,
    body: &Bytes,
    system: &mut SystemUnderTest,
    receiver: &CallbackReceiver,
) -> Result<(Phase, EndToEnd), BenchError> {
    let url = format!("{}/async-function/{FUNCTION}", system.gateway_url);
    let callback_url = receiver.url();
    let (client, payload) = (client.clone(), body.clone());
    let submitted = drive(opts, "submit", move |_| {
        let request = client
            .post(url.as_str())
            .header("x-callback-url", callback_url.as_str())
            .header("content-type", "application/octet-stream")
            .body(payload.clone())
            .timeout(REQUEST_TIMEOUT)
            .send();
        async move {
            let response = request.await.map_err(|e| e.to_string())?;
            expect_status(&response, StatusCode::ACCEPTED)?;
            let call_id = response
                .headers()
                .get("x-call-id")
                .and_then(|id| id.to_str().ok())
                .ok_or("202 without a valid X-Call-Id")?;
            Ok(Some(call_id.to_owned()))
        }
    })
    .await?;

    // Wait for the callbacks of every accepted call, or the timeout.
    let submit_times: HashMap<String, Instant> = submitted.call_ids.into_iter().collect();
    let deadline = Instant::now() + opts.callback_timeout;
    let progress = Progress::start("callbacks", submit_times.len(), receiver.counter());
    loop {
        system.check_running()?;
        if receiver.count() >= submit_times.len() {
            let seen = receiver.count_by_call_id();
            if submit_times.keys().all(|id| seen.contains_key(id)) {
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    drop(progress);

    let callbacks = receiver.callbacks();
    let audit = audit_callbacks(
        &submit_times,
        &callbacks,
        &Expectations {
            function: FUNCTION,
            body: Some(body),
        },
    );
    let end_to_end = end_to_end_figures(&audit, submitted.started)?;
    Ok((submitted.phase, end_to_end))
}

/// The `end_to_end` figures of an audit, for calls submitted from `started`.
pub fn end_to_end_figures(audit: &CallbackAudit, started: Instant) -> Result<EndToEnd, BenchError> {
    let mut latencies = Vec::with_capacity(audit.arrivals.len());
    let mut function_times = Vec::with_capacity(audit.arrivals.len());
    let mut last_arrival = started;
    for arrival in &audit.arrivals {
        latencies.push(micros(
            arrival.arrived.saturating_duration_since(arrival.submitted),
        ));
        if let Some(time) = arrival.function_time {
            function_times.push(micros(time));
        }
        last_arrival = last_arrival.max(arrival.arrived);
    }
    let seconds = last_arrival
        .saturating_duration_since(started)
        .as_secs_f64();
    Ok(EndToEnd {
        completed: audit.completed,
        lost: audit.lost,
        duplicates: audit.duplicated_calls,
        unexpected: audit.unexpected,
        bad_results: audit.bad_results,
        bad_headers: audit.bad_headers,
        first_problem: audit.first_problem.clone(),
        seconds,
        rate_per_sec: rate_of(audit.completed, seconds),
        latency_us: percentiles(&latencies)?,
        function_time_us: percentiles(&function_times)?,
    })
}

/// What a closed or open loop measured.
#[derive(Debug)]
struct LoopResult {
    phase: Phase,
    /// When the first request started (was due, in an open loop).
    started: Instant,
    /// Call ids returned by successful operations, with their start times
    /// (intended send times, in an open loop).
    call_ids: Vec<(String, Instant)>,
}

/// Runs `op` `opts.calls` times in the load model of `opts`.
async fn drive<F, Fut>(
    opts: &BenchOptions,
    phase: &'static str,
    op: F,
) -> Result<LoopResult, BenchError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<String>, String>> + Send + 'static,
{
    let done = Arc::new(AtomicUsize::new(0));
    let _progress = Progress::start(phase, opts.calls, {
        let done = Arc::clone(&done);
        move || done.load(Ordering::Relaxed)
    });
    let op = move |i| {
        let (request, done) = (op(i), Arc::clone(&done));
        async move {
            let result = request.await;
            done.fetch_add(1, Ordering::Relaxed);
            result
        }
    };
    match opts.rate {
        Some(rate) => open_loop_phase(opts.calls, rate, op).await,
        None => closed_loop(opts.calls, opts.concurrency, op).await,
    }
}

/// A progress line on stderr, redrawn every [`PROGRESS_INTERVAL`] while it
/// lives, only when stderr is a terminal.
#[derive(Debug)]
struct Progress {
    task: Option<JoinHandle<()>>,
}

impl Progress {
    fn start(phase: &'static str, total: usize, done: impl Fn() -> usize + Send + 'static) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { task: None };
        }
        let task = tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(PROGRESS_INTERVAL).await;
                let done = done().min(total);
                let filled = (done * PROGRESS_WIDTH).checked_div(total).unwrap_or(0);
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r{phase:<12} [{}{}] {done}/{total} {:.0}s ",
                    "#".repeat(filled),
                    " ".repeat(PROGRESS_WIDTH - filled),
                    started.elapsed().as_secs_f64()
                );
                let _ = err.flush();
            }
        });
        Self { task: Some(task) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Clear the line for what follows.
            let _ = write!(std::io::stderr().lock(), "\r{:80}\r", "");
        }
    }
}

/// Runs `op(i)` for `i` in `0..calls` on an [`open_loop()`] schedule of
/// `rate` per second; latencies run from the intended send times.
async fn open_loop_phase<F, Fut>(calls: usize, rate: f64, op: F) -> Result<LoopResult, BenchError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<String>, String>> + Send + 'static,
{
    let called = tokio::time::Instant::now();
    let timed = open_loop(calls, rate, OPEN_LOOP_MAX_IN_FLIGHT, op)
        .await
        .map_err(|e| BenchError::setup("open-loop request task", e))?;
    let started = timed.first().map_or(called, |t| t.intended);
    let finished = timed.iter().map(Timed::completed).max().unwrap_or(started);
    let mut total = TaskTally {
        latencies: Vec::with_capacity(timed.len()),
        ..TaskTally::default()
    };
    for Timed {
        intended,
        latency,
        output,
        ..
    } in timed
    {
        match output {
            Ok(call_id) => {
                total.ok += 1;
                total.latencies.push(micros(latency));
                if let Some(call_id) = call_id {
                    total.call_ids.push((call_id, intended.into_std()));
                }
            }
            Err(err) => {
                total.failed += 1;
                total.first_error.get_or_insert(err);
            }
        }
    }
    let seconds = finished.saturating_duration_since(started).as_secs_f64();
    total.into_result(started.into_std(), seconds)
}

/// What one client task of a closed loop gathered.
#[derive(Debug, Default)]
struct TaskTally {
    ok: u64,
    failed: u64,
    first_error: Option<String>,
    latencies: Vec<u64>,
    call_ids: Vec<(String, Instant)>,
}

impl TaskTally {
    /// The phase's figures, `seconds` after `started`.
    fn into_result(self, started: Instant, seconds: f64) -> Result<LoopResult, BenchError> {
        Ok(LoopResult {
            phase: Phase {
                sent: self.ok + self.failed,
                ok: self.ok,
                failed: self.failed,
                first_error: self.first_error,
                seconds,
                rate_per_sec: rate_of(self.ok, seconds),
                latency_us: percentiles(&self.latencies)?,
            },
            started,
            call_ids: self.call_ids,
        })
    }
}

/// Runs `op(i)` for `i` in `0..calls` on `concurrency` tasks, each starting
/// its next operation when the previous one finished. `op` returns an
/// optional call id on success, a description on failure.
async fn closed_loop<F, Fut>(
    calls: usize,
    concurrency: usize,
    op: F,
) -> Result<LoopResult, BenchError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<String>, String>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let per_task = calls.div_ceil(concurrency.max(1));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.min(calls) {
        let (op, next) = (Arc::clone(&op), Arc::clone(&next));
        tasks.spawn(async move {
            let mut tally = TaskTally {
                latencies: Vec::with_capacity(per_task),
                ..TaskTally::default()
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= calls {
                    break;
                }
                let start = Instant::now();
                match op(i).await {
                    Ok(call_id) => {
                        tally.latencies.push(micros(start.elapsed()));
                        tally.ok += 1;
                        if let Some(call_id) = call_id {
                            tally.call_ids.push((call_id, start));
                        }
                    }
                    Err(err) => {
                        tally.failed += 1;
                        tally.first_error.get_or_insert(err);
                    }
                }
            }
            tally
        });
    }
    let mut total = TaskTally::default();
    while let Some(tally) = tasks.join_next().await {
        let tally = tally.map_err(|e| BenchError::setup("client task", e))?;
        total.ok += tally.ok;
        total.failed += tally.failed;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
        total.latencies.extend(tally.latencies);
        total.call_ids.extend(tally.call_ids);
    }
    let seconds = started.elapsed().as_secs_f64();
    total.into_result(started, seconds)
}

fn expect_status(response: &reqwest::Response, expected: StatusCode) -> Result<(), String> {
    if response.status() == expected {
        Ok(())
    } else {
        Err(format!(
            "answered {}, expected {expected}",
            response.status()
        ))
    }
}

fn percentiles(micros: &[u64]) -> Result<Latency, BenchError> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, HISTOGRAM_MAX_MICROS, 3)
        .map_err(|e| BenchError::setup("creating a histogram", e))?;
    for &value in micros {
        histogram.saturating_record(value);
    }
    if histogram.is_empty() {
        return Ok(Latency::default());
    }
    Ok(Latency {
        p50: histogram.value_at_quantile(0.50),
        p90: histogram.value_at_quantile(0.90),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        max: histogram.max(),
    })
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counts far below 2^52 in practice"
)]
fn rate_of(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_bounded() {
        assert!(BenchOptions::default().validate().is_ok());
        for bad in [
            BenchOptions {
                calls: 0,
                ..BenchOptions::default()
            },
            BenchOptions {
                concurrency: MAX_CONCURRENCY + 1,
                ..BenchOptions::default()
            },
            BenchOptions {
                body_bytes: MAX_BODY_BYTES + 1,
                ..BenchOptions::default()
            },
            BenchOptions {
                time_limit: Duration::ZERO,
                ..BenchOptions::default()
            },
            BenchOptions {
                rate: Some(0.0),
                ..BenchOptions::default()
            },
            BenchOptions {
                rate: Some(f64::NAN),
                ..BenchOptions::default()
            },
            BenchOptions {
                rate: Some(MAX_RATE * 2.0),
                ..BenchOptions::default()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(BenchError::Options(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_scenario_is_valid_and_long_running_holds_10000_on_one_worker() {
        for scenario in [
            Scenario::Throughput,
            Scenario::LatencyAtRate,
            Scenario::LongRunning,
        ] {
            let opts = scenario.options();
            assert!(opts.validate().is_ok(), "{scenario:?}: {opts:?}");
        }
        let long = Scenario::LongRunning.options();
        assert_eq!(long.max_inflight, 10_000);
        assert_eq!(long.calls, 10_000);
        assert_eq!(long.function_delay, Duration::from_secs(30));
        assert!(long.callback_timeout > long.function_delay);
        assert_eq!(
            Scenario::LatencyAtRate.options().load_model(),
            LoadModel::Open
        );
    }

    #[test]
    fn percentiles_of_nothing_are_zero() {
        assert!(matches!(percentiles(&[]), Ok(Latency { max: 0, .. })));
        let latency = percentiles(&[10, 20, 30, 1000]).ok();
        assert!(
            latency.is_some_and(|l| l.p50 == 20 && l.max == 1000),
            "{latency:?}"
        );
    }
}
