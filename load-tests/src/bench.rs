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
//! With [`BenchOptions::front_mode`] (`--scenario front-mode`) the gateway runs
//! in front mode with the stub function as its upstream, and before the async
//! path two more phases compare the same synchronous POST made straight to the
//! stub (`direct_function`) and through the gateway (`proxied_function`): the
//! cost of the proxied hop, in the same run.
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

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream};
use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::audit::{CallbackAudit, Expectations, audit_callbacks};
pub use crate::error::BenchError;
use crate::sut::{
    Backend, ProcessUsage, SutOptions, SystemUnderTest, ensure_nats_server, find_or_build_bin_dir,
};
use crate::{
    CallbackReceiver, FaultMix, NatsCluster, NatsServer, StubBehavior, StubFunction, Timed,
    open_loop,
};

/// Default number of calls per phase.
pub const DEFAULT_CALLS: usize = 5000;
/// Default number of concurrent client tasks.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Default `--max-inflight` of the worker.
pub const DEFAULT_MAX_INFLIGHT: u32 = 256;
/// Default request body size in bytes.
pub const DEFAULT_BODY_BYTES: usize = 64;
/// Default number of warm-up requests before each measured phase.
pub const DEFAULT_WARMUP: usize = 200;
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

/// The function the calls are addressed to by default.
pub const DEFAULT_FUNCTION: &str = "bench";
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
    /// Open loop at 500 calls/s (about half the sustainable end-to-end
    /// rate on the reference machine, BENCHMARKS.md), 5,000 calls: latency
    /// percentiles.
    LatencyAtRate,
    /// 10,000 calls in flight at once on one worker (`--max-inflight
    /// 10000`), each held 30 s by the function.
    LongRunning,
    /// Closed loop, 5,000 calls, against a function that answers 5 % of
    /// attempts with 429, 5 % with 503, 2 % with 500 and lets 1 % hang (the
    /// worker gives up after 2 s), with a long-tailed time (median 5 ms, p99
    /// 50 ms), while the worker process is SIGKILLed and restarted every 4 s
    /// (JetStream backend): every call must still be called back, and
    /// results are reported by kind.
    Faults,
    /// Three nats-server nodes on loopback with cluster routes, the stream, dead-letter
    /// stream and records bucket with three replicas, the gateway and the worker given the
    /// three URLs; open loop at 300 calls/s, 12,000 calls (40 s). Under that load the
    /// stream's leader (from the stream info) is SIGKILLed and restarted 10 s later, then
    /// the records bucket's leader likewise; afterwards a probe of 100 calls must go
    /// through. Refused calls (503 during the fail-over) are counted, never a lost 202.
    Cluster,
    /// The gateway in front mode (`--upstream-gateway`, the stub function as
    /// the OpenFaaS gateway): closed loop, concurrency 64, 10,000 synchronous
    /// calls straight to the stub and 10,000 through the gateway, then the
    /// async path as usual.
    FrontMode,
    /// Adaptive concurrency: a stub function that takes 3 calls at once and answers `429` to
    /// any more (`--function-capacity 3`, 20 ms each), a worker allowed 50 (`--max-inflight`),
    /// closed loop of 64, 2,000 calls; the worker's limit for the function is read from its
    /// metrics every 250 ms and printed as a table. Every call must succeed within its
    /// retries (a call that ran out of them is a bad result).
    Adaptive,
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
                rate: Some(500.0),
                accept_alone: false,
                ..base
            },
            Self::LongRunning => BenchOptions {
                calls: 10_000,
                concurrency: 256,
                max_inflight: 10_000,
                function_delay: Duration::from_secs(30),
                callback_timeout: Duration::from_secs(180),
                time_limit: Duration::from_secs(600),
                // Every call is a 30 s hold: there is nothing to warm up.
                warmup: 0,
                accept_alone: false,
                ..base
            },
            Self::Faults => BenchOptions {
                calls: 5_000,
                concurrency: 64,
                function_delay: Duration::from_millis(5),
                function_delay_p99: Some(Duration::from_millis(50)),
                faults: FaultMix {
                    too_many_requests: 0.05,
                    unavailable: 0.05,
                    internal_error: 0.02,
                    hang: 0.01,
                },
                worker_args: faults_worker_args(),
                kill_worker_every: Some(Duration::from_secs(4)),
                time_limit: Duration::from_secs(600),
                accept_alone: false,
                ..base
            },
            Self::Cluster => BenchOptions {
                calls: 12_000,
                rate: Some(300.0),
                cluster: Some(ClusterOptions::default()),
                time_limit: Duration::from_secs(900),
                ..base
            },
            Self::FrontMode => BenchOptions {
                calls: 10_000,
                concurrency: 64,
                front_mode: true,
                accept_alone: false,
                ..base
            },
            Self::Adaptive => BenchOptions {
                calls: 2_000,
                concurrency: 64,
                max_inflight: 50,
                function_delay: Duration::from_millis(20),
                function_capacity: Some(3),
                // The limit from the first call on.
                warmup: 0,
                accept_alone: false,
                worker_args: ["--retry-initial-wait=100ms", "--retry-max-wait=1s"]
                    .map(str::to_owned)
                    .to_vec(),
                ..base
            },
        }
    }

    /// Every scenario.
    pub const ALL: [Self; 7] = [
        Self::Throughput,
        Self::LatencyAtRate,
        Self::LongRunning,
        Self::Faults,
        Self::Cluster,
        Self::FrontMode,
        Self::Adaptive,
    ];
}

/// Worker settings of the `faults` scenario: hung attempts are abandoned
/// after 2 s and retries come quickly, so a run takes minutes, not hours.
fn faults_worker_args() -> Vec<String> {
    [
        "--upstream-timeout=2s",
        "--retry-initial-wait=100ms",
        "--retry-max-wait=1s",
        // A killed worker's calls come back after this.
        "--ack-wait=5s",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The JetStream cluster of the `cluster` scenario and the faults it suffers while the
/// measured calls are submitted: the calls stream's leader is SIGKILLed `first_fault_after`
/// the first call, and restarted `down_for` after the kill (not before a new leader is
/// elected); once it caught up and `pause` later, the records bucket's leader is killed and
/// restarted the same way; then `probe_calls` more calls must be accepted and called back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterOptions {
    /// nats-server processes (3).
    pub nodes: usize,
    /// Replicas of the stream, the dead-letter stream and the records bucket
    /// (`--stream-replicas`), and of the JetStream baseline's stream.
    pub replicas: usize,
    /// From the first measured call to the first kill.
    pub first_fault_after: Duration,
    /// How long a killed node stays down (at least until a new leader is elected).
    pub down_for: Duration,
    /// From the first restarted node catching up to the second kill.
    pub pause: Duration,
    /// Calls submitted (closed loop) and called back after the faults.
    pub probe_calls: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            replicas: 3,
            first_fault_after: Duration::from_secs(5),
            down_for: Duration::from_secs(10),
            pause: Duration::from_secs(5),
            probe_calls: 100,
        }
    }
}

/// An existing deployment to load instead of starting one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalTarget {
    /// Base URL of its gateway (`http://gateway:8080`).
    pub gateway_url: String,
    /// Where the harness's callback receiver listens.
    pub callback_listen: SocketAddr,
    /// The `X-Callback-Url` sent with every call, as the workers reach the
    /// receiver; `None` derives it from `callback_listen` (which must then
    /// not be an unspecified address such as `0.0.0.0`).
    pub callback_url: Option<String>,
    /// The deployment's NATS server, for the JetStream baselines (which then
    /// create and delete a stream `LOAD_TESTS_BASELINE` there); `None` skips
    /// them.
    pub nats_url: Option<String>,
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
    /// submitted, counted from the last callback (or worker restart) seen;
    /// calls still without one are then reported as lost.
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
    /// Requests sent (and, for calls, called back) before each measured
    /// phase and left out of its figures: connections, caches and the
    /// allocator settle first.
    pub warmup: usize,
    /// Stop sending a phase's requests after this long even if fewer than
    /// `calls` were sent.
    pub duration: Option<Duration>,
    /// The function calls are addressed to.
    pub function: String,
    /// The stub function's time is log-normal with median `function_delay`
    /// and this 99th percentile; `None`: always `function_delay`.
    pub function_delay_p99: Option<Duration>,
    /// The stub function answers this many bytes instead of echoing the body.
    pub response_bytes: Option<usize>,
    /// Faults the stub function injects per attempt.
    pub faults: FaultMix,
    /// Extra arguments for the worker process (`--upstream-timeout=2s`).
    pub worker_args: Vec<String>,
    /// Extra arguments for the gateway process (JetStream backend).
    pub gateway_args: Vec<String>,
    /// Load an existing deployment instead of starting one; the stub
    /// function and the worker settings then do not apply.
    pub external: Option<ExternalTarget>,
    /// SIGKILL the worker process this often while calls are outstanding,
    /// and start it again (JetStream backend only): redelivery must still
    /// bring every call to exactly one final callback. Duplicate callbacks
    /// are then possible by design (a callback sent just before the kill is
    /// sent again after the redelivery) and are reported, not failed.
    pub kill_worker_every: Option<Duration>,
    /// Extra headers on every submitted call (`Authorization` for a gateway
    /// that asks for it, routing headers...). Never printed: they may be
    /// secrets.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Before the end-to-end phase, measure `calls` accepts with nothing consuming (the
    /// worker stopped; the embedded process restarted with the gateway role only), then drain
    /// them: the accept path's own rate, which its ceiling `1/(1/http + 1/publish)` describes.
    /// Only for a closed loop against a system this run started, not on a cluster run.
    pub accept_alone: bool,
    /// Run on a JetStream cluster and kill its leaders under load (the `cluster` scenario);
    /// `None`: one nats-server, no NATS faults.
    pub cluster: Option<ClusterOptions>,
    /// Run the gateway in front mode with the stub function as its upstream, and measure
    /// synchronous calls straight to the stub against the same calls through the gateway
    /// (the `front-mode` scenario; a system this run started only).
    pub front_mode: bool,
    /// The stub function takes this many calls at once and answers `429` to any more; the
    /// worker's concurrency limit for the function is then sampled from its metrics and
    /// reported (the `adaptive` scenario; a system this run started only).
    pub function_capacity: Option<usize>,
    /// Requests per baseline phase; `None`: `calls`.
    pub baseline_calls: Option<usize>,
    /// Sample the processes' resident memory and their stores' sizes this often through
    /// the async path ([`crate::sampling`]); `None`: not sampled. A system this run started
    /// only, and no worker kills (a restarted worker is another process).
    pub sample_every: Option<Duration>,
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
            warmup: DEFAULT_WARMUP,
            duration: None,
            function: DEFAULT_FUNCTION.to_owned(),
            function_delay_p99: None,
            response_bytes: None,
            faults: FaultMix::default(),
            worker_args: Vec::new(),
            gateway_args: Vec::new(),
            external: None,
            kill_worker_every: None,
            headers: Vec::new(),
            accept_alone: true,
            cluster: None,
            front_mode: false,
            function_capacity: None,
            baseline_calls: None,
            sample_every: None,
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
        if self.warmup > MAX_CALLS {
            return fail(format!(
                "warmup must be at most {MAX_CALLS}, not {}",
                self.warmup
            ));
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return fail("duration must be positive".to_owned());
        }
        if self.response_bytes.is_some_and(|n| n > MAX_BODY_BYTES) {
            return fail(format!(
                "response-bytes must be at most {MAX_BODY_BYTES}, not {:?}",
                self.response_bytes
            ));
        }
        if self.function_delay_p99.is_some() && self.function_delay.is_zero() {
            return fail(
                "function-delay-p99 needs a function-delay above 0 (the median)".to_owned(),
            );
        }
        if let Some(p99) = self.function_delay_p99
            && p99 < self.function_delay
        {
            return fail(format!(
                "function-delay-p99 ({p99:?}) must not be below function-delay ({:?}), \
                 which is the median",
                self.function_delay
            ));
        }
        if let Err(problem) = self.faults.validate() {
            return fail(problem);
        }
        // The gateway's own check, so a name it would refuse is refused before anything starts.
        if let Err(e) = queue_core::message::parse_function(&self.function) {
            return fail(format!("function: {e}"));
        }
        if let Some(every) = self.kill_worker_every {
            if self.external.is_some() || self.backend != Backend::JetStream {
                return fail(
                    "kill-worker-every needs the self-contained jetstream backend: the embedded \
                     backend's worker is also its gateway"
                        .to_owned(),
                );
            }
            if every < Duration::from_secs(1) {
                return fail(format!(
                    "kill-worker-every must be at least 1s, not {every:?}"
                ));
            }
        }
        if let Some(cluster) = &self.cluster {
            if self.external.is_some() || self.backend != Backend::JetStream {
                return fail(
                    "the cluster scenario needs the self-contained jetstream backend".to_owned(),
                );
            }
            // Killing a leader needs a quorum that survives it: 3 nodes and 3 replicas at least.
            if !(3..=7).contains(&cluster.nodes)
                || !(3..=cluster.nodes.min(5)).contains(&cluster.replicas)
            {
                return fail(format!(
                    "a cluster to kill leaders in has 3..=7 nodes and 3..=min(nodes, 5) \
                     replicas, not {} nodes and {} replicas",
                    cluster.nodes, cluster.replicas
                ));
            }
            if cluster.probe_calls == 0 || cluster.probe_calls > MAX_CALLS {
                return fail(format!(
                    "probe calls must be 1..={MAX_CALLS}, not {}",
                    cluster.probe_calls
                ));
            }
        }
        if let Some(capacity) = self.function_capacity
            && (capacity == 0 || self.external.is_some())
        {
            return fail(format!(
                "function-capacity needs a system this run starts (the stub function is its \
                 function) and at least 1, not {capacity}"
            ));
        }
        if let Some(n) = self.baseline_calls
            && !(1..=MAX_CALLS).contains(&n)
        {
            return fail(format!("baseline-calls must be 1..={MAX_CALLS}, not {n}"));
        }
        if let Some(every) = self.sample_every {
            if self.external.is_some() || self.kill_worker_every.is_some() {
                return fail(
                    "sample-every needs a system this run starts, without worker kills (a \
                     restarted worker is another process)"
                        .to_owned(),
                );
            }
            // The accept-alone phase stops the worker (restarts the embedded process) and
            // starts it again: another process than the one sampled.
            if self.accept_alone && self.rate.is_none() && self.cluster.is_none() {
                return fail(
                    "sample-every needs --no-accept-alone (or an open loop): the accept-alone \
                     phase restarts the worker, and a restarted worker is another process"
                        .to_owned(),
                );
            }
            if every < crate::sampling::MIN_EVERY {
                return fail(format!(
                    "sample-every must be at least {:?}, not {every:?}",
                    crate::sampling::MIN_EVERY
                ));
            }
        }
        if self.front_mode && (self.external.is_some() || self.cluster.is_some()) {
            return fail(
                "front mode needs a system this run starts (its upstream is the stub function), \
                 on one nats-server"
                    .to_owned(),
            );
        }
        if let Some(external) = &self.external {
            if !(external.gateway_url.starts_with("http://")
                || external.gateway_url.starts_with("https://"))
            {
                return fail(format!(
                    "gateway-url {:?} must start with http:// or https://",
                    external.gateway_url
                ));
            }
            if external.callback_url.is_none() && external.callback_listen.ip().is_unspecified() {
                return fail(format!(
                    "callback-listen {} is an unspecified address the workers cannot call: \
                     give --callback-url too",
                    external.callback_listen
                ));
            }
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0 && rate <= MAX_RATE) {
                return fail(format!(
                    "rate must be above 0 and at most {MAX_RATE}, not {rate}"
                ));
            }
            // The open-loop baseline and the calls, at `rate` each, must fit.
            #[expect(clippy::cast_precision_loss, reason = "calls are at most MAX_CALLS")]
            let schedule =
                (self.baseline_options().measured_calls() + self.measured_calls()) as f64 / rate;
            if schedule >= self.time_limit.as_secs_f64() {
                return fail(format!(
                    "{} calls (and {} in the baseline) at {rate}/s take {schedule:.1} s in the \
                     two open-loop phases, not less than the time-limit of {:?}",
                    self.calls,
                    self.baseline_calls(),
                    self.time_limit
                ));
            }
        }
        Ok(())
    }

    /// Requests per measured phase: `calls`, or fewer when an open loop's
    /// `duration` ends its schedule earlier.
    pub fn measured_calls(&self) -> usize {
        match (self.rate, self.duration) {
            (Some(rate), Some(duration)) => {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "bounded by calls below"
                )]
                let due = (rate * duration.as_secs_f64()).ceil().max(1.0) as usize;
                due.min(self.calls)
            }
            _ => self.calls,
        }
    }

    /// Requests per baseline phase: `baseline_calls`, or `calls`.
    fn baseline_calls(&self) -> usize {
        self.baseline_calls.unwrap_or(self.calls)
    }

    /// The options of a baseline phase: [`BenchOptions::baseline_calls`] requests.
    fn baseline_options(&self) -> Self {
        Self {
            calls: self.baseline_calls(),
            ..self.clone()
        }
    }

    /// The options of a warm-up: `warmup` requests in a closed loop.
    fn warmup_options(&self) -> Self {
        Self {
            calls: self.warmup,
            rate: None,
            duration: None,
            ..self.clone()
        }
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
    /// Failures by kind (`status 503`, `timeout`, `connect`, ...).
    pub errors: BTreeMap<String, u64>,
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
    /// From a call's submit to the start of the function attempt that
    /// produced its result (earlier attempts and retry waits included); only
    /// when the function is the harness's stub, which stamps its answers.
    pub queue_wait_us: Latency,
    /// From the function's answer to the arrival of the callback (the
    /// worker's result handling and the callback POST); stub only, likewise.
    pub callback_time_us: Latency,
    /// Completed calls by result: `200`, or how they failed (`503`,
    /// `503 timeout`, ...); failures are expected only with injected faults.
    pub results: BTreeMap<String, u64>,
}

/// The warm-up before the measured phases.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Warmup {
    /// Warm-up requests per phase.
    pub requests: u64,
    /// Warm-up calls the gateway accepted.
    pub accepted: u64,
    /// Accepted warm-up calls whose callback arrived (all of them, in a
    /// clean run).
    pub completed: u64,
}

/// Accepts measured with nothing consuming ([`BenchOptions::accept_alone`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AcceptAlone {
    /// The accepts.
    pub phase: Phase,
    /// Of the calls it accepted, those called back once consuming resumed (all of them, in
    /// a clean run).
    pub completed: u64,
}

/// The stub function's behaviour, as the report shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StubSummary {
    /// Median time per attempt, in microseconds.
    pub delay_median_us: u64,
    /// 99th percentile time per attempt, in microseconds.
    pub delay_p99_us: u64,
    /// Answer size; `null`: the request body is echoed.
    pub response_bytes: Option<usize>,
    /// Shares of attempts answered 429, 503, 500, or left hanging.
    pub fault_429: f64,
    /// See `fault_429`.
    pub fault_503: f64,
    /// See `fault_429`.
    pub fault_500: f64,
    /// See `fault_429`.
    pub fault_hang: f64,
    /// Requests the stub received during the measured phase: one per
    /// attempt, so more than the calls when the worker retried.
    pub attempts: u64,
}

/// Throughput ratios (0 when a denominator is 0).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ratios {
    /// `accept` rate / `baseline_http` rate.
    pub accept_vs_baseline_http: f64,
    /// `end_to_end` rate / `baseline_http` rate.
    pub end_to_end_vs_baseline_http: f64,
    /// `accept` rate / `baseline_js_publish` rate (`null` when skipped).
    pub accept_vs_baseline_js_publish: Option<f64>,
    /// `end_to_end` rate / `baseline_js_pull_ack` rate (`null` when skipped).
    pub end_to_end_vs_baseline_js_pull_ack: Option<f64>,
    /// The most accepts per second these baselines allow: one HTTP exchange and one publish
    /// per call, `1 / (1/http + 1/publish)` (`null` without the JetStream baselines).
    pub accept_ceiling: Option<f64>,
    /// `accept` rate / [`Ratios::accept_ceiling`].
    pub accept_vs_ceiling: Option<f64>,
    /// `accept_alone` rate / [`Ratios::accept_ceiling`] (`null` when not measured).
    pub accept_alone_vs_ceiling: Option<f64>,
    /// The most completed calls per second these baselines allow: three HTTP exchanges (the
    /// submission, the invocation, the callback), one publish and one pull with ack per
    /// call, `1 / (3/http + 1/publish + 1/pull_ack)`.
    pub end_to_end_ceiling: Option<f64>,
    /// `end_to_end` rate / [`Ratios::end_to_end_ceiling`].
    pub end_to_end_vs_ceiling: Option<f64>,
    /// The embedded backend's own ceiling: `1 / (3/http + 1/embedded publish + 1/embedded
    /// pull_ack)` (`null` unless the backend is embedded).
    pub embedded_end_to_end_ceiling: Option<f64>,
    /// `end_to_end` rate / [`Ratios::embedded_end_to_end_ceiling`].
    pub end_to_end_vs_embedded_ceiling: Option<f64>,
}

/// `1 / Σ (per-call exchanges / rate)`: the rate a call made of these exchanges could reach
/// if nothing else cost anything. `None` if a rate is not positive.
pub fn composite_ceiling(parts: &[(f64, f64)]) -> Option<f64> {
    let mut seconds_per_call = 0.0;
    for &(count, rate) in parts {
        if rate <= 0.0 || !rate.is_finite() {
            return None;
        }
        seconds_per_call += count / rate;
    }
    (seconds_per_call > 0.0).then(|| 1.0 / seconds_per_call)
}

/// One node killed under load in the `cluster` scenario.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterFault {
    /// Whose leader was killed: the stream of calls, or the records bucket's stream.
    pub target: String,
    /// The node killed (its server name).
    pub node: String,
    /// When, in seconds from the first measured call.
    pub killed_at_seconds: f64,
    /// The leader elected in its place.
    pub new_leader: String,
    /// From the kill until stream info named the new leader.
    pub leader_elected_after_seconds: f64,
    /// From the kill until the node was started again.
    pub down_seconds: f64,
    /// From the restart until every replica was current again.
    pub caught_up_after_seconds: f64,
}

/// What the `cluster` scenario adds to the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterReport {
    /// nats-server processes.
    pub nodes: u64,
    /// Replicas of the stream, the dead-letter stream and the records bucket.
    pub replicas: u64,
    /// The kills, in order.
    pub faults: Vec<ClusterFault>,
    /// Calls refused during the run (`503` and transport errors: the `accept` phase's
    /// failures); never called back unless counted in `refused_but_called_back`.
    pub refused: u64,
    /// Refused calls that were called back all the same: the publish reached the stream but
    /// its acknowledgement did not reach the gateway, so the client was told `503` (a retry
    /// with the same `X-Call-Id` would have been recognised as a duplicate). Left out of
    /// `unexpected`.
    pub refused_but_called_back: u64,
    /// The longest time between two accepted calls (`202`) while calls were submitted: what
    /// a client saw of the fail-overs.
    pub longest_accept_gap_seconds: f64,
    /// Callbacks that arrived after the last node was killed (the worker kept working).
    pub callbacks_after_last_kill: u64,
    /// Calls of the probe after the faults, accepted.
    pub probe_accepted: u64,
    /// Probe calls called back.
    pub probe_completed: u64,
}

/// Synchronous calls to the stub function, straight and through the gateway in front mode
/// ([`BenchOptions::front_mode`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FrontModeReport {
    /// POSTs to the stub's `/function/{name}` (answered `200` with the body echoed).
    pub direct: Phase,
    /// The same POSTs to the gateway, which passes them to the stub.
    pub proxied: Phase,
    /// `proxied` rate / `direct` rate.
    pub rate_ratio: f64,
    /// Median latency the proxied hop adds (proxied p50 − direct p50), in microseconds.
    pub added_p50_us: i64,
    /// 99th-percentile latency the proxied hop adds (proxied p99 − direct p99), in microseconds.
    pub added_p99_us: i64,
}

/// What [`run`] measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// Requests per phase.
    pub calls: u64,
    /// Requests per baseline phase (`calls` unless `--baseline-calls` was given).
    pub baseline_calls: u64,
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
    /// Raw JetStream publish with ack; `null` against an external target
    /// without `--nats-url`.
    pub baseline_js_publish: Option<Phase>,
    /// Raw JetStream pull with ack of the published messages (one pull
    /// consumer; no latencies, which stay 0).
    pub baseline_js_pull_ack: Option<Phase>,
    /// Raw publishes into an embedded queue of the harness's own (embedded backend only).
    pub baseline_embedded_publish: Option<Phase>,
    /// Raw pull with ack from it (embedded backend only; no latencies).
    pub baseline_embedded_pull_ack: Option<Phase>,
    /// Gateway accepts with nothing consuming (`null` when not measured).
    pub accept_alone: Option<AcceptAlone>,
    /// Gateway accepts while the worker drains them (the end-to-end phase's submissions).
    pub accept: Phase,
    /// Accepted calls through to their callbacks.
    pub end_to_end: EndToEnd,
    /// Throughput ratios.
    pub ratios: Ratios,
    /// The system under test: the backend started, or `external`.
    pub target: String,
    /// The function the calls went to.
    pub function: String,
    /// What the stub function did (`null` against an external target).
    pub stub: Option<StubSummary>,
    /// The warm-up left out of the figures.
    pub warmup: Warmup,
    /// Whether `--duration` ended a phase before `calls` requests were sent.
    pub cut_by_duration: bool,
    /// How often the worker was killed and restarted during the run.
    pub worker_kills: u64,
    /// Memory and CPU of its processes once ready, before any load.
    pub idle: Vec<ProcessUsage>,
    /// Memory (peak over the run) and CPU of its processes after the run.
    pub after_run: Vec<ProcessUsage>,
    /// CPU seconds of all its processes during the end-to-end phase (from its first
    /// submission to its last callback) per completed call, in microseconds (0 when not measured: an external target, or a
    /// worker killed during the run).
    pub cpu_us_per_call: f64,
    /// Wall time of the whole run, set-up and shutdown included.
    pub total_seconds: f64,
    /// The cluster and its faults (`null` without `--scenario cluster`).
    pub cluster: Option<ClusterReport>,
    /// Direct and proxied synchronous calls (`null` without front mode).
    pub front_mode: Option<FrontModeReport>,
    /// The worker's concurrency limit over the run (`null` without `--function-capacity`).
    pub adaptive: Option<crate::adaptive::AdaptiveReport>,
    /// Resident memory and store sizes through the async path (`null` without
    /// `--sample-every`).
    pub samples: Option<crate::sampling::SamplesReport>,
}

impl Report {
    /// Whether every call (warm-up included) was accepted and completed
    /// with exactly one callback carrying an acceptable result, and nothing
    /// was lost.
    ///
    /// On a cluster whose leaders were killed, refused calls (`503` during a fail-over) and
    /// duplicate callbacks are reported, not failed; the probe after the faults must have
    /// gone through completely.
    pub fn is_clean(&self) -> bool {
        let e2e = &self.end_to_end;
        let cluster_ok = self.cluster.as_ref().is_none_or(|cluster| {
            cluster.probe_accepted > 0 && cluster.probe_completed == cluster.probe_accepted
        });
        (self.accept.failed == 0 || self.cluster.is_some())
            && cluster_ok
            && self
                .accept_alone
                .as_ref()
                .is_none_or(|a| a.phase.failed == 0 && a.completed == a.phase.ok)
            && self.warmup.accepted == self.warmup.requests
            && self.warmup.completed == self.warmup.accepted
            && e2e.lost == 0
            && (e2e.duplicates == 0 || self.worker_kills > 0 || self.cluster.is_some())
            && e2e.unexpected == 0
            && e2e.bad_results == 0
            && e2e.bad_headers == 0
            && self
                .front_mode
                .as_ref()
                .is_none_or(|f| f.direct.failed == 0 && f.proxied.failed == 0)
    }

    /// A human-readable table of the report, ending with a newline.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let model = match (self.load_model, self.rate) {
            (LoadModel::Open, Some(rate)) => format!(
                "open loop at {rate} req/s for baseline_http/accept/end_to_end \
                 (latency from intended send time), closed loop with concurrency {} \
                 for baseline_js_publish",
                self.concurrency
            ),
            _ => format!("closed loop, concurrency {}", self.concurrency),
        };
        let _ = writeln!(
            out,
            "load-tests bench against {} (function {:?}): {} calls per phase{} after {} warm-up \
             requests, {model}, worker max-inflight {}, body {} B, {} CPUs{}",
            self.target,
            self.function,
            self.calls,
            if self.baseline_calls == self.calls {
                String::new()
            } else {
                format!(" ({} per baseline)", self.baseline_calls)
            },
            self.warmup.requests,
            self.max_inflight,
            self.body_bytes,
            self.cpus,
            if self.cut_by_duration {
                ", phases cut short by --duration"
            } else {
                ""
            }
        );
        if let Some(stub) = &self.stub {
            let _ = writeln!(
                out,
                "stub function: time median {} µs, p99 {} µs; answer {}; faults per attempt: \
                 429 {:.1} %, 503 {:.1} %, 500 {:.1} %, hang {:.1} %; {} attempts for {} calls",
                stub.delay_median_us,
                stub.delay_p99_us,
                stub.response_bytes
                    .map_or_else(|| "echoes the body".to_owned(), |n| format!("{n} B")),
                stub.fault_429 * 100.0,
                stub.fault_503 * 100.0,
                stub.fault_500 * 100.0,
                stub.fault_hang * 100.0,
                stub.attempts,
                self.accept.ok,
            );
        }
        let _ = writeln!(
            out,
            "\n{:<21} {:>8} {:>7} {:>9} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9}",
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
        );
        let e2e = &self.end_to_end;
        let row = |out: &mut String,
                   name: &str,
                   counts: Option<(u64, u64, f64, f64)>,
                   latency: &Latency| {
            let (ok, failed, seconds, rate) = match counts {
                Some((ok, failed, seconds, rate)) => (
                    ok.to_string(),
                    failed.to_string(),
                    format!("{seconds:.3}"),
                    format!("{rate:.1}"),
                ),
                None => Default::default(),
            };
            let _ = writeln!(
                out,
                "{name:<21} {ok:>8} {failed:>7} {seconds:>9} {rate:>11} {:>9} {:>9} {:>9} {:>9} {:>9}",
                latency.p50, latency.p90, latency.p99, latency.p999, latency.max
            );
        };
        let phase_counts = |p: &Phase| Some((p.ok, p.failed, p.seconds, p.rate_per_sec));
        row(
            &mut out,
            "baseline_http",
            phase_counts(&self.baseline_http),
            &self.baseline_http.latency_us,
        );
        for (name, phase) in [
            ("baseline_js_publish", &self.baseline_js_publish),
            ("baseline_js_pull_ack", &self.baseline_js_pull_ack),
        ] {
            match phase {
                Some(phase) => row(&mut out, name, phase_counts(phase), &phase.latency_us),
                None => {
                    let _ = writeln!(out, "{name:<21} {:>8}", "skipped");
                }
            }
        }
        for (name, phase) in [
            ("baseline_emb_publish", &self.baseline_embedded_publish),
            ("baseline_emb_pull_ack", &self.baseline_embedded_pull_ack),
        ] {
            if let Some(phase) = phase {
                row(&mut out, name, phase_counts(phase), &phase.latency_us);
            }
        }
        if let Some(front) = &self.front_mode {
            for (name, phase) in [
                ("direct_function", &front.direct),
                ("proxied_function", &front.proxied),
            ] {
                row(&mut out, name, phase_counts(phase), &phase.latency_us);
            }
        }
        match &self.accept_alone {
            Some(alone) => row(
                &mut out,
                "accept_alone",
                phase_counts(&alone.phase),
                &alone.phase.latency_us,
            ),
            None => {
                let _ = writeln!(out, "{:<21} {:>8}", "accept_alone", "skipped");
            }
        }
        row(
            &mut out,
            "accept",
            phase_counts(&self.accept),
            &self.accept.latency_us,
        );
        row(
            &mut out,
            "end_to_end",
            Some((e2e.completed, e2e.lost, e2e.seconds, e2e.rate_per_sec)),
            &e2e.latency_us,
        );
        for (name, latency, stub_only) in [
            ("  queue_wait", &e2e.queue_wait_us, true),
            ("  function", &e2e.function_time_us, false),
            ("  callback", &e2e.callback_time_us, true),
        ] {
            if stub_only && latency.max == 0 {
                // Only the harness's stub stamps when it was invoked and when it answered.
                let _ = writeln!(
                    out,
                    "{name:<21} not measured: the function is not `load-tests function`"
                );
            } else {
                row(&mut out, name, None, latency);
            }
        }

        let ratio = |r: Option<f64>| r.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.3}"));
        let _ = writeln!(
            out,
            "\nratios: accept/baseline_http {:.3}, end_to_end/baseline_http {:.3}, \
             accept/baseline_js_publish {}, end_to_end/baseline_js_pull_ack {}",
            self.ratios.accept_vs_baseline_http,
            self.ratios.end_to_end_vs_baseline_http,
            ratio(self.ratios.accept_vs_baseline_js_publish),
            ratio(self.ratios.end_to_end_vs_baseline_js_pull_ack),
        );
        let per_sec = |r: Option<f64>| r.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.0}/s"));
        let _ = writeln!(
            out,
            "ceilings from these baselines: accept 1/(1/http + 1/publish) = {}, ratio {} \
             alone, {} while draining; end_to_end 1/(3/http + 1/publish + 1/pull_ack) = {}, \
             ratio {}",
            per_sec(self.ratios.accept_ceiling),
            ratio(self.ratios.accept_alone_vs_ceiling),
            ratio(self.ratios.accept_vs_ceiling),
            per_sec(self.ratios.end_to_end_ceiling),
            ratio(self.ratios.end_to_end_vs_ceiling),
        );
        if let Some(front) = &self.front_mode {
            let _ = writeln!(
                out,
                "front mode: proxied_function/direct_function rate {:.3}; the proxied hop adds \
                 {} µs at p50, {} µs at p99",
                front.rate_ratio, front.added_p50_us, front.added_p99_us,
            );
        }
        if let Some(ceiling) = self.ratios.embedded_end_to_end_ceiling {
            let _ = writeln!(
                out,
                "embedded backend's own ceiling: end_to_end 1/(3/http + 1/emb_publish + \
                 1/emb_pull_ack) = {ceiling:.0}/s, ratio {}",
                ratio(self.ratios.end_to_end_vs_embedded_ceiling),
            );
        }
        let _ = writeln!(
            out,
            "end_to_end: {} of {} accepted calls completed; lost {}, duplicates {}, \
             unexpected {}, bad results {}, bad headers {} \
             (end_to_end \"failed\" column = lost)",
            e2e.completed,
            self.accept.ok,
            e2e.lost,
            e2e.duplicates,
            e2e.unexpected,
            e2e.bad_results,
            e2e.bad_headers
        );
        let by_kind = |counts: &BTreeMap<String, u64>| {
            counts
                .iter()
                .map(|(kind, n)| format!("{kind}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(out, "results by kind: {}", by_kind(&e2e.results));
        if !self.accept.errors.is_empty() {
            let _ = writeln!(
                out,
                "accept errors by kind: {}",
                by_kind(&self.accept.errors)
            );
        }
        let _ = writeln!(
            out,
            "warm-up: {} requests, {} accepted, {} called back",
            self.warmup.requests, self.warmup.accepted, self.warmup.completed
        );
        if let Some(alone) = &self.accept_alone {
            let _ = writeln!(
                out,
                "accept_alone: {} accepted with nothing consuming, {} called back once \
                 consuming resumed (not in the end-to-end figures)",
                alone.phase.ok, alone.completed
            );
        }
        if self.worker_kills > 0 {
            let _ = writeln!(
                out,
                "worker killed (SIGKILL) and restarted {} times during the run; duplicate \
                 callbacks are possible by design then, and reported above (CPU and RSS below \
                 are the last worker process's)",
                self.worker_kills
            );
        }
        if let Some(cluster) = &self.cluster {
            let _ = writeln!(
                out,
                "cluster: {} nodes, {} replicas (stream, dead letters, records bucket); \
                 accepted {}, refused {} (503 during fail-over; {} of them called back all the \
                 same), lost {}, duplicate callbacks {}; longest gap between two 202s {:.2} s; \
                 {} callbacks after the last kill; probe after the faults: {} of {} called back",
                cluster.nodes,
                cluster.replicas,
                self.accept.ok,
                cluster.refused,
                cluster.refused_but_called_back,
                e2e.lost,
                e2e.duplicates,
                cluster.longest_accept_gap_seconds,
                cluster.callbacks_after_last_kill,
                cluster.probe_completed,
                cluster.probe_accepted,
            );
            for fault in &cluster.faults {
                let _ = writeln!(
                    out,
                    "  SIGKILL {} leader {} at {:.1} s: new leader {} after {:.2} s; down {:.1} \
                     s; caught up {:.2} s after the restart",
                    fault.target,
                    fault.node,
                    fault.killed_at_seconds,
                    fault.new_leader,
                    fault.leader_elected_after_seconds,
                    fault.down_seconds,
                    fault.caught_up_after_seconds,
                );
            }
        }
        if let Some(problem) = &e2e.first_problem {
            let _ = writeln!(out, "end_to_end: first callback problem: {problem}");
        }
        if let Some(err) = &self.accept.first_error {
            let _ = writeln!(out, "accept: first failure: {err}");
        }
        for usage in &self.idle {
            let _ = writeln!(out, "idle   {usage}");
        }
        for usage in &self.after_run {
            let _ = writeln!(out, "run    {usage}");
        }
        if self.after_run.is_empty() {
            let _ = writeln!(out, "processes: not measured (external target)");
        } else if self.worker_kills > 0 {
            let _ = writeln!(
                out,
                "CPU per completed call: not measured (killed workers took theirs along)"
            );
        } else {
            let _ = writeln!(
                out,
                "CPU per completed call (gateway + worker, end-to-end phase): {:.1} µs",
                self.cpu_us_per_call
            );
        }
        if let Some(samples) = &self.samples {
            let _ = write!(out, "{samples}");
        }
        if let Some(adaptive) = &self.adaptive {
            out.push_str(&adaptive.to_table());
        }
        let _ = writeln!(out, "total wall time {:.1} s", self.total_seconds);
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
    // Missing binaries fail (or are built) before anything starts.
    let bin_dir = match opts.external {
        None => {
            Some(find_or_build_bin_dir(opts.bin_dir.as_deref(), opts.backend.binaries()).await?)
        }
        Some(_) => None,
    };
    if opts.external.is_none() {
        ensure_nats_server().await?;
    }
    let client = queue_worker::invoke::http_client("load-tests")
        .map_err(|e| BenchError::setup("building the HTTP client", e))?;
    let body = Bytes::from(vec![b'x'; opts.body_bytes]);

    let mut own_nats = match (&opts.external, &opts.cluster) {
        (None, None) => Some(OwnNats::Single(Box::new(NatsServer::start().await?))),
        (None, Some(cluster)) => Some(OwnNats::Cluster(NatsCluster::start(cluster.nodes).await?)),
        (Some(_), _) => None,
    };
    let nats_url = own_nats.as_ref().map(OwnNats::url).or_else(|| {
        opts.external
            .as_ref()
            .and_then(|external| external.nats_url.clone())
    });
    let poster = Poster::new(client.clone(), opts.concurrency.max(1));
    let baseline_opts = opts.baseline_options();
    let baseline_http = measure_baseline_http(&baseline_opts, &poster, &body).await?;
    let (baseline_js_publish, baseline_js_pull_ack) = match &nats_url {
        Some(url) => {
            let (publish, pull_ack) = measure_baseline_js(&baseline_opts, url, &body).await?;
            (Some(publish), Some(pull_ack))
        }
        None => (None, None),
    };
    let (baseline_embedded_publish, baseline_embedded_pull_ack) =
        if opts.backend == Backend::Embedded && opts.external.is_none() {
            let (publish, pull_ack) = measure_baseline_embedded(&baseline_opts, &body).await?;
            (Some(publish), Some(pull_ack))
        } else {
            (None, None)
        };

    let receiver = match &opts.external {
        Some(external) => CallbackReceiver::start_on(external.callback_listen).await?,
        None => CallbackReceiver::start().await?,
    };
    if let Some((drop_every, duplicate_every)) = opts.receiver_fault {
        receiver.set_recording_fault(drop_every, duplicate_every);
    }
    let callback_url = opts
        .external
        .as_ref()
        .and_then(|external| external.callback_url.clone())
        .unwrap_or_else(|| receiver.url());
    let mut front_mode = None;
    let mut adaptive = None;
    let mut samples = None;
    let (path, idle, after_run, stub) = match (&opts.external, bin_dir, &nats_url) {
        (Some(external), _, _) => {
            let target = Target {
                gateway_url: &external.gateway_url,
                callback_url: &callback_url,
                system: None,
                cluster: None,
            };
            let path = measure_async_path(opts, &poster, &body, target, &receiver, None).await?;
            (path, Vec::new(), Vec::new(), None)
        }
        (None, bin_dir, Some(nats_url)) => {
            let function = StubFunction::start(stub_behavior(opts)).await?;
            // Thousands of recorded requests are not worth their memory here.
            function.set_recording(false);
            // Front mode: the stub stands in for the OpenFaaS gateway behind ours (the embedded
            // backend's one process takes the gateway's flags among its own).
            let upstream_arg = opts
                .front_mode
                .then(|| format!("--upstream-gateway={}", function.url()));
            let (mut worker_args, mut front_gateway_args) = (opts.worker_args.clone(), Vec::new());
            match opts.backend {
                Backend::JetStream => front_gateway_args.extend(upstream_arg),
                Backend::Embedded => worker_args.extend(upstream_arg),
            }
            // The worker's metrics, read for its concurrency limit: the worker's own port
            // (JetStream; the last --metrics-listen wins), or the all-in-one's gateway port.
            let worker_metrics = match (opts.function_capacity, opts.backend) {
                (None, _) => None,
                (Some(_), Backend::JetStream) => {
                    let port = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
                        .and_then(|l| l.local_addr())
                        .map_err(|e| BenchError::setup("finding a free port", e))?;
                    worker_args.push(format!("--metrics-listen={port}"));
                    Some(format!("http://{port}/metrics"))
                }
                (Some(_), Backend::Embedded) => Some(String::new()),
            };
            let mut system = SystemUnderTest::start(&SutOptions {
                backend: opts.backend,
                bin_dir,
                max_inflight: opts.max_inflight,
                function_url: function.url(),
                nats_url: nats_url.clone(),
                worker_args,
                gateway_args: opts
                    .cluster
                    .as_ref()
                    .map(|cluster| {
                        vec!["--stream-replicas".to_owned(), cluster.replicas.to_string()]
                    })
                    .unwrap_or_default()
                    .into_iter()
                    .chain(opts.gateway_args.iter().cloned())
                    .chain(front_gateway_args)
                    .collect(),
            })
            .await?;
            let idle = system.usage();
            let gateway_url = system.gateway_url.clone();
            if opts.front_mode {
                let measured =
                    measure_front_mode(opts, &poster, &body, &function.url(), &gateway_url).await;
                match measured {
                    Ok(report) => front_mode = Some(report),
                    Err(e) => {
                        let _ = system.stop().await;
                        return Err(e);
                    }
                }
            }
            let sampler = opts.sample_every.map(|every| {
                crate::sampling::Sampler::start(
                    every,
                    watched(&system, opts.backend, own_nats.as_ref()),
                )
            });
            let target = Target {
                gateway_url: &gateway_url,
                callback_url: &callback_url,
                system: Some(&mut system),
                cluster: own_nats.as_mut().and_then(OwnNats::cluster_mut),
            };
            let measuring =
                measure_async_path(opts, &poster, &body, target, &receiver, Some(&function));
            let result = match (&worker_metrics, opts.function_capacity) {
                (Some(url), Some(capacity)) => {
                    let url = if url.is_empty() {
                        format!("{gateway_url}/metrics")
                    } else {
                        url.clone()
                    };
                    let label = opts.function.to_ascii_lowercase();
                    let (stop, stopped) = tokio::sync::oneshot::channel();
                    let sampling = crate::adaptive::sample(
                        &client, &url, &label, &function, &receiver, stopped,
                    );
                    let measuring = async {
                        let result = measuring.await;
                        let _ = stop.send(());
                        result
                    };
                    let (result, samples) = tokio::join!(measuring, sampling);
                    adaptive = Some(crate::adaptive::AdaptiveReport {
                        function_capacity: capacity,
                        refused_total: function.over_capacity(),
                        samples,
                    });
                    result
                }
                _ => measuring.await,
            };
            if let Some(sampler) = sampler {
                samples = Some(sampler.finish().await);
            }
            let after_run = system.usage();
            // Stop even when the measurement failed; its error comes first.
            let stopped = system.stop().await;
            let path = result?;
            stopped?;
            let attempts = to_u64(function.received()).saturating_sub(path.warmup_attempts);
            (path, idle, after_run, Some(stub_summary(opts, attempts)))
        }
        (None, _, None) => return Err(BenchError::Setup("no NATS server".to_owned())),
    };
    drop(own_nats);
    let AsyncPath {
        warmup,
        accept_alone,
        accept,
        end_to_end,
        worker_kills,
        usage_before,
        usage_after,
        cluster,
        ..
    } = path;
    let cpu = |usages: &[ProcessUsage]| usages.iter().map(|u| u.cpu_seconds).sum::<f64>();
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    // A killed worker's CPU time is gone with it: no per-call figure then.
    let cpu_us_per_call =
        if end_to_end.completed > 0 && !usage_after.is_empty() && worker_kills == 0 {
            (cpu(&usage_after) - cpu(&usage_before)) * 1e6 / end_to_end.completed as f64
        } else {
            0.0
        };

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let accept_ceiling = baseline_js_publish.as_ref().and_then(|publish| {
        composite_ceiling(&[
            (1.0, baseline_http.rate_per_sec),
            (1.0, publish.rate_per_sec),
        ])
    });
    let end_to_end_ceiling = baseline_js_publish
        .as_ref()
        .zip(baseline_js_pull_ack.as_ref())
        .and_then(|(publish, pull)| {
            composite_ceiling(&[
                (3.0, baseline_http.rate_per_sec),
                (1.0, publish.rate_per_sec),
                (1.0, pull.rate_per_sec),
            ])
        });
    let embedded_end_to_end_ceiling = baseline_embedded_publish
        .as_ref()
        .zip(baseline_embedded_pull_ack.as_ref())
        .and_then(|(publish, pull)| {
            composite_ceiling(&[
                (3.0, baseline_http.rate_per_sec),
                (1.0, publish.rate_per_sec),
                (1.0, pull.rate_per_sec),
            ])
        });
    let ratios = Ratios {
        embedded_end_to_end_ceiling,
        end_to_end_vs_embedded_ceiling: embedded_end_to_end_ceiling
            .map(|c| ratio(end_to_end.rate_per_sec, c)),
        accept_ceiling,
        accept_vs_ceiling: accept_ceiling.map(|c| ratio(accept.rate_per_sec, c)),
        accept_alone_vs_ceiling: accept_ceiling
            .zip(accept_alone.as_ref())
            .map(|(c, alone)| ratio(alone.phase.rate_per_sec, c)),
        end_to_end_ceiling,
        end_to_end_vs_ceiling: end_to_end_ceiling.map(|c| ratio(end_to_end.rate_per_sec, c)),
        accept_vs_baseline_http: ratio(accept.rate_per_sec, baseline_http.rate_per_sec),
        end_to_end_vs_baseline_http: ratio(end_to_end.rate_per_sec, baseline_http.rate_per_sec),
        accept_vs_baseline_js_publish: baseline_js_publish
            .as_ref()
            .map(|publish| ratio(accept.rate_per_sec, publish.rate_per_sec)),
        end_to_end_vs_baseline_js_pull_ack: baseline_js_pull_ack
            .as_ref()
            .map(|pull| ratio(end_to_end.rate_per_sec, pull.rate_per_sec)),
    };
    let cut_by_duration =
        accept.sent < to_u64(opts.calls) || baseline_http.sent < to_u64(opts.baseline_calls());
    Ok(Report {
        calls: to_u64(opts.calls),
        baseline_calls: to_u64(opts.baseline_calls()),
        concurrency: to_u64(opts.concurrency),
        load_model: opts.load_model(),
        rate: opts.rate,
        max_inflight: opts.max_inflight,
        body_bytes: to_u64(opts.body_bytes),
        cpus: std::thread::available_parallelism().map_or(0, |n| to_u64(n.get())),
        baseline_http,
        baseline_js_publish,
        baseline_js_pull_ack,
        baseline_embedded_publish,
        baseline_embedded_pull_ack,
        accept_alone,
        accept,
        end_to_end,
        ratios,
        target: match &opts.external {
            Some(_) => "external".to_owned(),
            None => format!("{:?}", opts.backend).to_lowercase(),
        },
        function: opts.function.clone(),
        stub,
        warmup,
        cut_by_duration,
        worker_kills,
        idle,
        after_run,
        cpu_us_per_call,
        total_seconds: started.elapsed().as_secs_f64(),
        cluster,
        front_mode,
        adaptive,
        samples,
    })
}

/// The NATS the harness started: one server, or a cluster.
#[derive(Debug)]
enum OwnNats {
    Single(Box<NatsServer>),
    Cluster(NatsCluster),
}

impl OwnNats {
    /// What `--nats-url` takes: one URL, or every node's, comma-separated.
    fn url(&self) -> String {
        match self {
            Self::Single(server) => server.url(),
            Self::Cluster(cluster) => cluster.urls(),
        }
    }

    fn cluster_mut(&mut self) -> Option<&mut NatsCluster> {
        match self {
            Self::Single(_) => None,
            Self::Cluster(cluster) => Some(cluster),
        }
    }
}

/// What `--sample-every` watches: the system's processes and its state directory, and the
/// nats-server this run started for the JetStream backend (one server; a cluster's nodes are
/// not sampled).
fn watched(
    system: &SystemUnderTest,
    backend: Backend,
    nats: Option<&OwnNats>,
) -> crate::sampling::Watched {
    let mut processes: Vec<(String, u32)> = system
        .measured()
        .iter()
        .filter_map(|p| Some((p.name.to_owned(), p.pid()?)))
        .collect();
    let mut dirs = vec![("state dir".to_owned(), system.state_dir().to_path_buf())];
    // The embedded backend has a nats-server too, for nothing but the JetStream baselines.
    if let (Some(OwnNats::Single(server)), Backend::JetStream) = (nats, backend) {
        processes.extend(server.pid().map(|pid| ("nats-server".to_owned(), pid)));
        dirs.push(("NATS store".to_owned(), server.store_dir().to_path_buf()));
    }
    crate::sampling::Watched { processes, dirs }
}

/// The stub function's behaviour from the options.
fn stub_behavior(opts: &BenchOptions) -> StubBehavior {
    StubBehavior {
        delay: opts.function_delay,
        delay_p99: opts.function_delay_p99,
        response_bytes: opts.response_bytes,
        faults: opts.faults,
        capacity: opts.function_capacity,
        ..StubBehavior::default()
    }
}

fn stub_summary(opts: &BenchOptions, attempts: u64) -> StubSummary {
    StubSummary {
        delay_median_us: micros(opts.function_delay),
        delay_p99_us: micros(opts.function_delay_p99.unwrap_or(opts.function_delay)),
        response_bytes: opts.response_bytes,
        fault_429: opts.faults.too_many_requests,
        fault_503: opts.faults.unavailable,
        fault_500: opts.faults.internal_error,
        fault_hang: opts.faults.hang,
        attempts,
    }
}

/// Phase 1: a trivial axum handler answering `202`.
async fn measure_baseline_http(
    opts: &BenchOptions,
    client: &Poster,
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

    let target = Poster::target(&format!("http://{addr}/"));
    let post_body = || {
        let (client, body, target) = (client.clone(), body.clone(), target.clone());
        move |_| {
            let (client, body, target) = (client.clone(), body.clone(), target.clone());
            async move {
                let headers = [("content-type", "application/octet-stream")];
                let (status, _) = client.post(&target, &headers, &body).await?;
                expect_code(status, StatusCode::ACCEPTED).map(|()| None)
            }
        }
    };
    if opts.warmup > 0 {
        drive(&opts.warmup_options(), "http warm-up", post_body()).await?;
    }
    let result = drive(opts, "http", post_body()).await?;

    let _ = stop.send(());
    match tokio::time::timeout(STOP_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(BenchError::setup("baseline HTTP server", e)),
        Ok(Err(e)) => return Err(BenchError::setup("baseline HTTP server task", e)),
        Err(_) => tracing::warn!("baseline HTTP server did not stop in time"),
    }
    Ok(result.phase)
}

/// Front mode: the same synchronous POST to the stub function, first straight to it, then
/// through the gateway (which passes it to the stub), each after its own warm-up.
async fn measure_front_mode(
    opts: &BenchOptions,
    client: &Poster,
    body: &Bytes,
    function_url: &str,
    gateway_url: &str,
) -> Result<FrontModeReport, BenchError> {
    let mut phases = Vec::with_capacity(2);
    for (label, base) in [("direct", function_url), ("proxied", gateway_url)] {
        let target = Poster::target(&format!("{base}/function/{}", opts.function));
        let post_body = || {
            let (client, body, target) = (client.clone(), body.clone(), target.clone());
            move |_| {
                let (client, body, target) = (client.clone(), body.clone(), target.clone());
                async move {
                    let headers = [("content-type", "application/octet-stream")];
                    let (status, _) = client.post(&target, &headers, &body).await?;
                    expect_code(status, StatusCode::OK).map(|()| None)
                }
            }
        };
        if opts.warmup > 0 {
            drive(&opts.warmup_options(), "function warm-up", post_body()).await?;
        }
        let phase = if label == "direct" {
            "direct function"
        } else {
            "proxied function"
        };
        phases.push(drive(opts, phase, post_body()).await?.phase);
    }
    let (Some(proxied), Some(direct)) = (phases.pop(), phases.pop()) else {
        return Err(BenchError::Setup("front-mode phases missing".to_owned()));
    };
    let added = |proxied: u64, direct: u64| {
        i64::try_from(proxied).unwrap_or(i64::MAX) - i64::try_from(direct).unwrap_or(i64::MAX)
    };
    Ok(FrontModeReport {
        rate_ratio: if direct.rate_per_sec > 0.0 {
            proxied.rate_per_sec / direct.rate_per_sec
        } else {
            0.0
        },
        added_p50_us: added(proxied.latency_us.p50, direct.latency_us.p50),
        added_p99_us: added(proxied.latency_us.p99, direct.latency_us.p99),
        direct,
        proxied,
    })
}

/// Phase 2: JetStream publishes with ack to a separate file-backed stream.
async fn measure_baseline_js(
    opts: &BenchOptions,
    nats_url: &str,
    body: &Bytes,
) -> Result<(Phase, Phase), BenchError> {
    let nats = async_nats::connect(crate::sut::nats_servers(nats_url))
        .await
        .map_err(|e| BenchError::setup("connecting to nats-server", e))?;
    let js = jetstream::new(nats.clone());
    js.create_stream(stream::Config {
        name: BASELINE_STREAM.to_owned(),
        subjects: vec![BASELINE_SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        // On a cluster, as replicated as the calls stream.
        num_replicas: opts.cluster.as_ref().map_or(1, |cluster| cluster.replicas),
        ..Default::default()
    })
    .await
    .map_err(|e| BenchError::setup("creating the baseline stream", e))?;

    let (publisher, body) = (js.clone(), body.clone());
    let deadline = opts.duration.map(|duration| Instant::now() + duration);
    let result = closed_loop(opts.calls, opts.concurrency, deadline, move |_| {
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
                Err(_) => Err(format!("timeout: no ack within {REQUEST_TIMEOUT:?}")),
            }
        }
    })
    .await?;

    // Drain what was stored: fewer than `calls` when --duration cut the loop short.
    let stored = usize::try_from(result.phase.ok).unwrap_or(usize::MAX);
    let pull_ack = measure_pull_ack(&js, stored).await;
    js.delete_stream(BASELINE_STREAM)
        .await
        .map_err(|e| BenchError::setup("deleting the baseline stream", e))?;
    Ok((result.phase, pull_ack?))
}

/// The embedded backend's own baselines: publishes into an embedded queue of its own (a
/// fresh directory, the all-in-one's default cache; each publish waits for its group commit,
/// as the gateway's does), then one puller drains and acks them. Against these the
/// all-in-one's end-to-end ceiling is computed, as JetStream's are for JetStream.
async fn measure_baseline_embedded(
    opts: &BenchOptions,
    body: &Bytes,
) -> Result<(Phase, Phase), BenchError> {
    use futures::StreamExt as _;
    use queue_core::backend::embedded::{EmbeddedOptions, EmbeddedQueue};
    use queue_core::backend::{CallQueue as _, QueueDelivery as _};
    use queue_core::message::{BodyLocation, CallMeta, QueuedCall};

    let dir = tempfile::Builder::new()
        .prefix("load-tests-embedded-baseline-")
        .tempdir()
        .map_err(|e| BenchError::setup("creating the embedded baseline's directory", e))?;
    let queue = EmbeddedQueue::open(EmbeddedOptions {
        sealing: queue_core::sealing::Sealing::off(),
        dir: dir.path().to_path_buf(),
        subject_prefix: "load-tests-baseline".to_owned(),
        ack_wait: Duration::from_secs(60),
        duplicate_window: Duration::from_secs(120),
        max_message_bytes: 1 << 20,
        max_bytes: 0,
        cache_bytes: 32 << 20,
        records_retention: Duration::from_secs(3600),
        max_result_bytes: 1 << 20,
    })
    .map_err(|e| BenchError::setup("opening the embedded baseline queue", e))?;
    let queue = Arc::new(queue);
    let (publisher, body) = (queue.clone(), body.clone());
    let deadline = opts.duration.map(|duration| Instant::now() + duration);
    let result = closed_loop(opts.calls, opts.concurrency, deadline, move |i| {
        let (queue, body) = (publisher.clone(), body.clone());
        async move {
            let call = QueuedCall {
                meta: CallMeta {
                    call_id: format!("baseline-{i}"),
                    function: "baseline".to_owned(),
                    namespace: None,
                    method: "POST".to_owned(),
                    path: String::new(),
                    query: None,
                    headers: Vec::new(),
                    callback_url: None,
                    received_at_unix_nanos: queue_core::unix_nanos_now(),
                    body: BodyLocation::Inline { len: 0 },
                    record_revision: None,
                    overrides: Default::default(),
                    not_before_unix_nanos: None,
                },
                body,
            };
            queue
                .publish(&call)
                .await
                .map(|_| None)
                .map_err(|e| format!("publish: {e}"))
        }
    })
    .await?;

    let stored = result.phase.ok;
    let started = Instant::now();
    let mut acked = 0u64;
    while acked < stored {
        let mut batch = queue
            .pull(256, Duration::from_secs(1))
            .await
            .map_err(|e| BenchError::setup("pulling from the embedded baseline queue", e))?;
        while let Some(delivery) = batch.next().await {
            let delivery = delivery
                .map_err(|e| BenchError::setup("a delivery of the embedded baseline", e))?;
            delivery
                .ack()
                .await
                .map_err(|e| BenchError::setup("acking in the embedded baseline", e))?;
            acked += 1;
        }
        if started.elapsed() > REQUEST_TIMEOUT * 4 {
            return Err(BenchError::Setup(format!(
                "the embedded baseline drained {acked} of {stored} messages in {:?}",
                started.elapsed()
            )));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    queue.flush_before_exit().await;
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let pull_ack = Phase {
        sent: stored,
        ok: acked,
        failed: 0,
        seconds,
        rate_per_sec: if seconds > 0.0 {
            acked as f64 / seconds
        } else {
            0.0
        },
        latency_us: Latency::default(),
        errors: BTreeMap::new(),
        first_error: None,
    };
    Ok((result.phase, pull_ack))
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
    let errors = if failed > 0 {
        BTreeMap::from([("pull".to_owned(), failed)])
    } else {
        BTreeMap::new()
    };
    Ok(Phase {
        sent: ok + failed,
        ok,
        failed,
        first_error,
        errors,
        seconds,
        rate_per_sec: rate_of(ok, seconds),
        latency_us: Latency::default(),
    })
}

/// Where the calls go, and the processes to watch while waiting for them.
#[derive(Debug)]
struct Target<'a> {
    gateway_url: &'a str,
    callback_url: &'a str,
    /// The started system, checked for crashes; `None` for an external target.
    system: Option<&'a mut SystemUnderTest>,
    /// The NATS cluster whose leaders are killed (the `cluster` scenario).
    cluster: Option<&'a mut NatsCluster>,
}

/// What the async-path phases measured.
#[derive(Debug)]
struct AsyncPath {
    warmup: Warmup,
    /// Function attempts before measuring started (the stub counts them).
    warmup_attempts: u64,
    worker_kills: u64,
    accept_alone: Option<AcceptAlone>,
    accept: Phase,
    end_to_end: EndToEnd,
    /// The processes just before the end-to-end phase and just after its last callback.
    usage_before: Vec<ProcessUsage>,
    usage_after: Vec<ProcessUsage>,
    cluster: Option<ClusterReport>,
}

/// What the submissions of a cluster run note beside the loop's own figures.
#[derive(Debug, Default)]
struct SubmitLog {
    /// When each `202` arrived.
    accepted_at: Vec<Instant>,
    /// The call ids that were refused.
    refused: Vec<String>,
}

/// Phases 3 and 4: calls through the gateway, and their callbacks; after
/// the warm-up, whose calls must be called back before measuring starts.
/// On a cluster, its leaders are killed while the measured calls are
/// submitted, and a probe follows ([`cluster_faults`]).
async fn measure_async_path(
    opts: &BenchOptions,
    client: &Poster,
    body: &Bytes,
    mut target: Target<'_>,
    receiver: &CallbackReceiver,
    function: Option<&StubFunction>,
) -> Result<AsyncPath, BenchError> {
    let url = Poster::target(&format!(
        "{}/async-function/{}",
        target.gateway_url, opts.function
    ));
    let callback_url = target.callback_url.to_owned();
    // Headers every call carries, as text (the CLI took them as text).
    let mut fixed_headers: Vec<(String, String)> = Vec::with_capacity(opts.headers.len());
    for (name, value) in &opts.headers {
        let value = value
            .to_str()
            .map_err(|_| BenchError::Options(format!("header {name} is not visible ASCII")))?;
        fixed_headers.push((name.as_str().to_owned(), value.to_owned()));
    }
    let fixed_headers = Arc::new(fixed_headers);
    // A cluster run names its calls (`<phase>-<i>`), so that a refused call that is called
    // back all the same is recognised, and notes when each 202 came.
    let log = opts
        .cluster
        .as_ref()
        .map(|_| Arc::new(Mutex::new(SubmitLog::default())));
    let submit = |phase: &'static str| {
        let (client, url, callback_url, body, headers, log) = (
            client.clone(),
            url.clone(),
            callback_url.clone(),
            body.clone(),
            fixed_headers.clone(),
            log.clone(),
        );
        move |i: usize| {
            let call_id = log.as_ref().map(|_| format!("{phase}-{i}"));
            let (client, url, callback_url, body, headers, log) = (
                client.clone(),
                url.clone(),
                callback_url.clone(),
                body.clone(),
                headers.clone(),
                log.clone(),
            );
            async move {
                let answer = async {
                    let mut sent: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_str()))
                        .collect();
                    if let Some(call_id) = &call_id {
                        sent.push(("x-call-id", call_id.as_str()));
                    }
                    sent.push(("x-callback-url", callback_url.as_str()));
                    sent.push(("content-type", "application/octet-stream"));
                    let (status, answered_id) = client.post(&url, &sent, &body).await?;
                    expect_code(status, StatusCode::ACCEPTED)?;
                    let call_id = answered_id
                        .filter(|id| !id.is_empty())
                        .ok_or("no call id: 202 without a valid X-Call-Id")?;
                    Ok(Some(call_id))
                }
                .await;
                if let Some(log) = &log {
                    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                    match (&answer, call_id) {
                        (Ok(_), _) => log.accepted_at.push(Instant::now()),
                        (Err(_), Some(call_id)) => log.refused.push(call_id),
                        (Err(_), None) => {}
                    }
                }
                answer
            }
        }
    };

    let mut warmup = Warmup {
        requests: to_u64(opts.warmup),
        ..Warmup::default()
    };
    if opts.warmup > 0 {
        let warm = drive(&opts.warmup_options(), "warm-up", submit("warmup")).await?;
        let ids: HashMap<String, Instant> = warm.call_ids.into_iter().collect();
        await_callbacks(&ids, opts.callback_timeout, &mut target, receiver, None).await?;
        let seen = receiver.count_by_call_id();
        warmup.accepted = to_u64(ids.len());
        warmup.completed = to_u64(ids.keys().filter(|id| seen.contains_key(*id)).count());
        // Measure from a clean slate.
        receiver.take_callbacks();
    }
    if let Some(log) = &log {
        *log.lock().unwrap_or_else(PoisonError::into_inner) = SubmitLog::default();
    }

    let accept_alone = match target.system.as_deref_mut() {
        Some(system) if opts.accept_alone && opts.rate.is_none() && opts.cluster.is_none() => {
            system.stop_consuming().await?;
            let alone = drive(opts, "accept alone", submit("alone")).await;
            // Consuming resumes even when the phase failed; its error comes first.
            let resumed = match target.system.as_deref_mut() {
                Some(system) => system.resume_consuming().await,
                None => Ok(()),
            };
            let alone = alone?;
            resumed?;
            let ids: HashMap<String, Instant> = alone.call_ids.into_iter().collect();
            await_callbacks(&ids, opts.callback_timeout, &mut target, receiver, None).await?;
            let seen = receiver.count_by_call_id();
            let completed = to_u64(ids.keys().filter(|id| seen.contains_key(*id)).count());
            receiver.take_callbacks();
            Some(AcceptAlone {
                phase: alone.phase,
                completed,
            })
        }
        _ => None,
    };

    let warmup_attempts = function.map_or(0, |function| to_u64(function.received()));
    let usage_before = target
        .system
        .as_deref()
        .map(SystemUnderTest::usage)
        .unwrap_or_default();
    let load_started = Instant::now();
    let (submitted, faults) = match (target.cluster.as_deref_mut(), &opts.cluster) {
        (Some(cluster), Some(plan)) => {
            let (submitted, faults) = tokio::join!(
                drive(opts, "submit", submit("call")),
                cluster_faults(cluster, plan, load_started)
            );
            (submitted?, Some(faults?))
        }
        _ => (drive(opts, "submit", submit("call")).await?, None),
    };
    let submit_times: HashMap<String, Instant> = submitted.call_ids.into_iter().collect();
    // After the faults: a probe that must go through whole.
    let probe = match (&faults, &opts.cluster) {
        (Some(_), Some(plan)) => {
            let probe_opts = BenchOptions {
                calls: plan.probe_calls,
                concurrency: opts.concurrency.min(8),
                rate: None,
                duration: None,
                ..opts.clone()
            };
            let probe = drive(&probe_opts, "probe", submit("probe")).await?;
            probe.call_ids.into_iter().collect()
        }
        _ => HashMap::new(),
    };
    let mut awaited = submit_times.clone();
    awaited.extend(probe.iter().map(|(id, at)| (id.clone(), *at)));
    let worker_kills = await_callbacks(
        &awaited,
        opts.callback_timeout,
        &mut target,
        receiver,
        opts.kill_worker_every,
    )
    .await?;
    let usage_after = target
        .system
        .as_deref()
        .map(SystemUnderTest::usage)
        .unwrap_or_default();

    // Taken, not cloned: a soak's callbacks are most of the harness's memory.
    let (callbacks, probe_callbacks): (Vec<_>, Vec<_>) =
        receiver.take_callbacks().into_iter().partition(|callback| {
            !callback
                .call_id
                .as_ref()
                .is_some_and(|id| probe.contains_key(id))
        });
    let stub_body;
    let expected_body = match (&opts.external, opts.response_bytes) {
        (Some(_), _) => None,
        (None, Some(n)) => {
            stub_body = vec![b'r'; n];
            Some(stub_body.as_slice())
        }
        (None, None) => Some(&body[..]),
    };
    let audit = audit_callbacks(
        &submit_times,
        &callbacks,
        &Expectations {
            function: &opts.function,
            body: expected_body,
            failures_allowed: opts.external.is_some() || opts.faults.any(),
        },
    );
    let mut end_to_end = end_to_end_figures(&audit, submitted.started)?;
    let cluster = match (faults, &opts.cluster, log) {
        (Some(faults), Some(plan), Some(log)) => {
            let log = std::mem::take(&mut *log.lock().unwrap_or_else(PoisonError::into_inner));
            let refused: std::collections::HashSet<&str> =
                log.refused.iter().map(String::as_str).collect();
            let refused_but_called_back = to_u64(
                callbacks
                    .iter()
                    .filter(|c| c.call_id.as_deref().is_some_and(|id| refused.contains(id)))
                    .count(),
            );
            // Not unexpected: the 503 was an honest "not known to be stored".
            end_to_end.unexpected = end_to_end
                .unexpected
                .saturating_sub(refused_but_called_back);
            let last_kill = faults
                .last()
                .map(|fault| load_started + Duration::from_secs_f64(fault.killed_at_seconds));
            let probe_seen: std::collections::HashSet<&str> = probe_callbacks
                .iter()
                .filter_map(|c| c.call_id.as_deref())
                .collect();
            Some(ClusterReport {
                nodes: to_u64(plan.nodes),
                replicas: to_u64(plan.replicas),
                faults,
                refused: submitted.phase.failed,
                refused_but_called_back,
                longest_accept_gap_seconds: longest_gap(submitted.started, log.accepted_at)
                    .as_secs_f64(),
                callbacks_after_last_kill: to_u64(
                    callbacks
                        .iter()
                        .filter(|c| last_kill.is_some_and(|at| c.received_at > at))
                        .count(),
                ),
                probe_accepted: to_u64(probe.len()),
                probe_completed: to_u64(
                    probe
                        .keys()
                        .filter(|id| probe_seen.contains(id.as_str()))
                        .count(),
                ),
            })
        }
        _ => None,
    };
    Ok(AsyncPath {
        warmup,
        warmup_attempts,
        worker_kills,
        accept_alone,
        accept: submitted.phase,
        end_to_end,
        usage_before,
        usage_after,
        cluster,
    })
}

/// The longest time between `start` and the first of `times`, or between two of them.
fn longest_gap(start: Instant, mut times: Vec<Instant>) -> Duration {
    times.sort_unstable();
    let mut previous = start;
    let mut longest = Duration::ZERO;
    for at in times {
        longest = longest.max(at.saturating_duration_since(previous));
        previous = previous.max(at);
    }
    longest
}

/// The faults of the `cluster` scenario, from `started` (the first measured call): the
/// calls stream's leader, then the records bucket's leader, each SIGKILLed, a new leader
/// waited for, the node restarted after `down_for` and its catching up waited for.
async fn cluster_faults(
    cluster: &mut NatsCluster,
    plan: &ClusterOptions,
    started: Instant,
) -> Result<Vec<ClusterFault>, BenchError> {
    use clap::Parser as _;
    // The system's own names (the child processes run with these defaults).
    let config = queue_worker::WorkerConfig::try_parse_from(["queue-worker"])
        .map_err(|e| BenchError::setup("worker defaults", e))?;
    let calls_stream = config.nats.stream.clone();
    let records_stream = format!("KV_{}", config.records.records_bucket);
    tokio::time::sleep_until((started + plan.first_fault_after).into()).await;
    let mut faults = Vec::new();
    for (target, stream) in [
        ("calls stream", &calls_stream),
        ("records bucket", &records_stream),
    ] {
        if !faults.is_empty() {
            tokio::time::sleep(plan.pause).await;
        }
        let js = cluster.jetstream().await?;
        cluster.wait_stream_current(&js, stream).await?;
        let leader = cluster.wait_stream_leader(&js, stream, None).await?;
        let node = cluster.index_of(&leader).ok_or_else(|| {
            BenchError::Setup(format!("stream {stream}: leader {leader:?} is not a node"))
        })?;
        drop(js);
        let killed = Instant::now();
        cluster.kill(node).await;
        let js = cluster.jetstream().await?;
        let new_leader = cluster
            .wait_stream_leader(&js, stream, Some(&leader))
            .await?;
        let elected = killed.elapsed();
        tokio::time::sleep_until((killed + plan.down_for).into()).await;
        let down = killed.elapsed();
        let restarted = Instant::now();
        cluster.restart(node).await?;
        let js = cluster.jetstream().await?;
        for stream in [&calls_stream, &records_stream] {
            cluster.wait_stream_current(&js, stream).await?;
        }
        faults.push(ClusterFault {
            target: target.to_owned(),
            node: leader,
            killed_at_seconds: killed.saturating_duration_since(started).as_secs_f64(),
            new_leader,
            leader_elected_after_seconds: elected.as_secs_f64(),
            down_seconds: down.as_secs_f64(),
            caught_up_after_seconds: restarted.elapsed().as_secs_f64(),
        });
    }
    Ok(faults)
}

/// Waits until every call of `submitted` was called back, or `timeout`
/// passed since the last callback or worker restart; kills and restarts the
/// worker every `kill_every` meanwhile. Returns the number of kills.
async fn await_callbacks(
    submitted: &HashMap<String, Instant>,
    timeout: Duration,
    target: &mut Target<'_>,
    receiver: &CallbackReceiver,
    kill_every: Option<Duration>,
) -> Result<u64, BenchError> {
    let mut deadline = Instant::now() + timeout;
    let mut next_kill = kill_every.map(|every| Instant::now() + every);
    let mut kills = 0;
    let mut last_count = receiver.count();
    let _progress = Progress::start("callbacks", submitted.len(), receiver.counter());
    loop {
        if let Some(system) = target.system.as_deref_mut() {
            if let (Some(at), Some(every)) = (next_kill, kill_every)
                && Instant::now() >= at
            {
                system.kill_and_restart_worker().await?;
                kills += 1;
                next_kill = Some(Instant::now() + every);
                deadline = deadline.max(Instant::now() + timeout);
            }
            system.check_running()?;
        }
        let count = receiver.count();
        if count >= submitted.len() {
            let seen = receiver.count_by_call_id();
            if submitted.keys().all(|id| seen.contains_key(id)) {
                return Ok(kills);
            }
        }
        if count > last_count {
            // Progress: the timeout counts from the last callback.
            last_count = count;
            deadline = deadline.max(Instant::now() + timeout);
        }
        if Instant::now() >= deadline {
            return Ok(kills);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The `end_to_end` figures of an audit, for calls submitted from `started`.
pub fn end_to_end_figures(audit: &CallbackAudit, started: Instant) -> Result<EndToEnd, BenchError> {
    // The stub stamps Unix times; place the harness's instants on that clock.
    let (now, now_unix) = (Instant::now(), unix_nanos());
    let unix_of =
        |instant: Instant| now_unix.saturating_sub(nanos(now.saturating_duration_since(instant)));
    let mut latencies = Vec::with_capacity(audit.arrivals.len());
    let mut function_times = Vec::with_capacity(audit.arrivals.len());
    let mut queue_waits = Vec::with_capacity(audit.arrivals.len());
    let mut callback_times = Vec::with_capacity(audit.arrivals.len());
    let mut last_arrival = started;
    for arrival in &audit.arrivals {
        latencies.push(micros(
            arrival.arrived.saturating_duration_since(arrival.submitted),
        ));
        if let Some(time) = arrival.function_time {
            function_times.push(micros(time));
        }
        if let Some(invoked) = arrival.invoked_at {
            queue_waits.push(invoked.saturating_sub(unix_of(arrival.submitted)) / 1000);
        }
        if let Some(answered) = arrival.answered_at {
            callback_times.push(unix_of(arrival.arrived).saturating_sub(answered) / 1000);
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
        queue_wait_us: percentiles(&queue_waits)?,
        callback_time_us: percentiles(&callback_times)?,
        results: audit.results.clone(),
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
    let _progress = Progress::start(phase, opts.measured_calls(), {
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
        Some(rate) => open_loop_phase(opts.measured_calls(), rate, op).await,
        None => {
            let deadline = opts.duration.map(|duration| Instant::now() + duration);
            closed_loop(opts.calls, opts.concurrency, deadline, op).await
        }
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
            Err(err) => total.fail(err),
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
    errors: BTreeMap<String, u64>,
    latencies: Vec<u64>,
    call_ids: Vec<(String, Instant)>,
}

impl TaskTally {
    /// Counts a failure, by its kind: the text before the first `": "`.
    fn fail(&mut self, err: String) {
        self.failed += 1;
        let kind = err.split(": ").next().unwrap_or_default();
        *self.errors.entry(kind.to_owned()).or_insert(0) += 1;
        self.first_error.get_or_insert(err);
    }

    /// The phase's figures, `seconds` after `started`.
    fn into_result(self, started: Instant, seconds: f64) -> Result<LoopResult, BenchError> {
        Ok(LoopResult {
            phase: Phase {
                sent: self.ok + self.failed,
                ok: self.ok,
                failed: self.failed,
                first_error: self.first_error,
                errors: self.errors,
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
/// its next operation when the previous one finished, none after `deadline`.
/// `op` returns an optional call id on success, a description on failure
/// (`"kind: detail"`).
async fn closed_loop<F, Fut>(
    calls: usize,
    concurrency: usize,
    deadline: Option<Instant>,
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
                if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                    break;
                }
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
                    Err(err) => tally.fail(err),
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
        for (kind, n) in tally.errors {
            *total.errors.entry(kind).or_insert(0) += n;
        }
        total.latencies.extend(tally.latencies);
        total.call_ids.extend(tally.call_ids);
    }
    let seconds = started.elapsed().as_secs_f64();
    total.into_result(started, seconds)
}

/// The harness's HTTP client for the raw-HTTP baseline and for the submissions (the same for
/// both): the worker's small HTTP/1.1 client for plain `http` URLs, so that the baseline is not
/// limited by a heavier client than `wrk` (BENCHMARKS.md), reqwest for anything else.
#[derive(Clone)]
struct Poster {
    http1: Arc<queue_worker::http1::Http1Client>,
    general: reqwest::Client,
}

/// Where a [`Poster`] posts, taken apart once per phase.
#[derive(Clone)]
enum PostTarget {
    Plain(Arc<queue_worker::invoke::PlainTarget>),
    General(Arc<str>),
}

impl Poster {
    fn new(general: reqwest::Client, connections: usize) -> Self {
        Self {
            http1: Arc::new(queue_worker::http1::Http1Client::new(
                connections,
                Duration::from_secs(60),
                Duration::from_secs(10),
            )),
            general,
        }
    }

    fn target(url: &str) -> PostTarget {
        match queue_worker::invoke::PlainTarget::parse(url) {
            Some(plain) => PostTarget::Plain(Arc::new(plain)),
            None => PostTarget::General(url.into()),
        }
    }

    /// POSTs `body` with `headers`; the status and the `X-Call-Id` of the answer, or
    /// `"kind: detail"` (`timeout`, `connect`, `transport`).
    async fn post(
        &self,
        target: &PostTarget,
        headers: &[(&str, &str)],
        body: &Bytes,
    ) -> Result<(u16, Option<String>), String> {
        match target {
            PostTarget::Plain(plain) => {
                let request = queue_worker::http1::Request {
                    method: "POST",
                    origin: &plain.origin,
                    host_header: &plain.host_header,
                    target: &plain.path_and_query,
                    headers,
                    body,
                };
                let response =
                    tokio::time::timeout(REQUEST_TIMEOUT, self.http1.send(&request, 1 << 20))
                        .await
                        .map_err(|_| format!("timeout: no answer within {REQUEST_TIMEOUT:?}"))?
                        .map_err(|e| match e {
                            queue_worker::http1::Http1Error::Connect => format!("connect: {e}"),
                            e => format!("transport: {e}"),
                        })?;
                let call_id = response
                    .headers
                    .iter()
                    .find(|(name, _)| name == "x-call-id")
                    .map(|(_, value)| value.clone());
                Ok((response.status, call_id))
            }
            PostTarget::General(url) => {
                let mut request = self.general.post(&**url);
                for (name, value) in headers {
                    request = request.header(*name, *value);
                }
                let response = request
                    .body(body.clone())
                    .timeout(REQUEST_TIMEOUT)
                    .send()
                    .await
                    .map_err(request_error)?;
                let call_id = response
                    .headers()
                    .get("x-call-id")
                    .and_then(|id| id.to_str().ok())
                    .map(str::to_owned);
                Ok((response.status().as_u16(), call_id))
            }
        }
    }
}

/// `Err` naming the status unless it is `expected`.
fn expect_code(status: u16, expected: StatusCode) -> Result<(), String> {
    if status == expected.as_u16() {
        Ok(())
    } else {
        Err(format!("status {status}: expected {expected}"))
    }
}

/// A failed request as `"kind: detail"` (`timeout`, `connect`, `transport`).
#[expect(clippy::needless_pass_by_value, reason = "the shape `map_err` calls")]
fn request_error(err: reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timeout"
    } else if err.is_connect() {
        "connect"
    } else {
        "transport"
    };
    format!("{kind}: {err}")
}

/// Now as Unix time in nanoseconds.
fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, nanos)
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
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
    fn the_composite_ceiling_adds_the_time_of_each_exchange() {
        // The issue's figures: 64,000 HTTP exchanges/s, 97,000 publishes/s, 75,000 pull+acks/s.
        let e2e = composite_ceiling(&[(3.0, 64_000.0), (1.0, 97_000.0), (1.0, 75_000.0)]).unwrap();
        assert!((e2e - 14_181.0).abs() < 1.0, "{e2e}");
        let accept = composite_ceiling(&[(1.0, 64_000.0), (1.0, 97_000.0)]).unwrap();
        assert!((accept - 38_559.0).abs() < 1.0, "{accept}");
        // A baseline that measured nothing gives no ceiling rather than a wrong one.
        assert_eq!(composite_ceiling(&[(1.0, 0.0), (1.0, 97_000.0)]), None);
        assert_eq!(composite_ceiling(&[]), None);
    }

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
            BenchOptions {
                front_mode: true,
                cluster: Some(ClusterOptions::default()),
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
        for scenario in Scenario::ALL {
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
        assert!(Scenario::FrontMode.options().front_mode);
        assert!(!BenchOptions::default().front_mode);
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
