//! Real HTTP servers on `127.0.0.1` standing in for the peers of the async
//! path: [`StubFunction`] (an OpenFaaS function or gateway) and
//! [`CallbackReceiver`] (the `X-Callback-Url` target).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::HarnessError;

/// How often the `wait_for_*` helpers re-check their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long [`CallbackReceiver::start_again`] keeps trying to re-bind.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between re-bind attempts.
const REBIND_INTERVAL: Duration = Duration::from_millis(50);
/// How long a graceful shutdown may wait for open connections.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// The header carrying the call id.
const CALL_ID_HEADER: &str = "x-call-id";

/// How a [`StubFunction`] answers; changeable at runtime with
/// [`StubFunction::set_behavior`].
#[derive(Clone, Debug)]
pub struct StubBehavior {
    /// How long each request is held before it is answered.
    pub delay: Duration,
    /// The response status code (an invalid code yields 500).
    pub status: u16,
    /// Extra response headers (invalid names or values are skipped).
    pub response_headers: Vec<(String, String)>,
    /// Whether the response body is the request body (else it is empty).
    pub echo_body: bool,
    /// The first `fail_first` attempts of a call (counted by `X-Call-Id`) fail; 0 = none.
    pub fail_first: u32,
    /// Status of a failing attempt.
    pub fail_status: u16,
    /// Headers of a failing attempt (e.g. `Retry-After`).
    pub fail_headers: Vec<(String, String)>,
    /// Share of calls (chosen by a hash of the call id, so the same calls every time) whose
    /// first attempts fail; 1.0 = every call.
    pub fail_fraction: f64,
    /// When set, each request is held for a time drawn from a log-normal distribution whose
    /// median is [`StubBehavior::delay`] and whose 99th percentile is this (a long tail, as
    /// real functions have); `None` holds every request exactly `delay`.
    pub delay_p99: Option<Duration>,
    /// When set, a successful answer carries this many bytes instead of the request body.
    pub response_bytes: Option<usize>,
    /// Random faults drawn per attempt, independently of `fail_first`.
    pub faults: FaultMix,
    /// When set, a request arriving while this many are already inside is answered `429` at
    /// once (no `Retry-After`): a function with a concurrency limit of its own.
    pub capacity: Option<usize>,
    /// With [`StubBehavior::response_bytes`]: the first attempt of each call sends the status,
    /// a `Content-Length` of the whole answer and this many bytes of it, then stalls until the
    /// client goes away (a function caught mid-answer); later attempts answer whole.
    pub stall_first_answer_after: Option<usize>,
}

/// Shares of attempts (each 0.0..=1.0, summing to at most 1.0) that a [`StubFunction`] answers
/// with a fault instead of its normal answer, drawn at random per attempt, so that a retry
/// of the same call can succeed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultMix {
    /// `429 Too Many Requests` with `Retry-After: 1`.
    pub too_many_requests: f64,
    /// `503 Service Unavailable`.
    pub unavailable: f64,
    /// `500 Internal Server Error`.
    pub internal_error: f64,
    /// No answer: the request is held until the client gives up (its timeout).
    pub hang: f64,
}

/// The fault a [`FaultMix`] draws for one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status (and `Retry-After: 1` for 429).
    Status(u16),
    /// Never answer.
    Hang,
}

impl FaultMix {
    /// The sum of the shares.
    pub fn total(&self) -> f64 {
        self.too_many_requests + self.unavailable + self.internal_error + self.hang
    }

    /// Whether any fault is injected.
    pub fn any(&self) -> bool {
        self.total() > 0.0
    }

    /// Checks that every share is within 0..=1 and that they sum to at most 1.
    pub fn validate(&self) -> Result<(), String> {
        for (name, share) in [
            ("429", self.too_many_requests),
            ("503", self.unavailable),
            ("500", self.internal_error),
            ("hang", self.hang),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!(
                    "the {name} share must be within 0..=1, not {share}"
                ));
            }
        }
        if self.total() > 1.0 + f64::EPSILON {
            return Err(format!("fault shares sum to {}, more than 1", self.total()));
        }
        Ok(())
    }

    /// The fault for a uniform draw `u` in `0..1`, if any.
    pub fn pick(&self, u: f64) -> Option<Fault> {
        let mut bound = 0.0;
        for (share, fault) in [
            (self.too_many_requests, Fault::Status(429)),
            (self.unavailable, Fault::Status(503)),
            (self.internal_error, Fault::Status(500)),
            (self.hang, Fault::Hang),
        ] {
            bound += share;
            if u < bound {
                return Some(fault);
            }
        }
        None
    }
}

/// Header of every [`StubFunction`] answer: when the request arrived, Unix time in nanoseconds.
/// The worker forwards function headers in the callback, which is how the bench splits the
/// end-to-end time into queue wait, function time and callback time.
pub const INVOKED_AT_HEADER: &str = "x-load-tests-invoked-at";
/// Header of every [`StubFunction`] answer: when the answer was sent, Unix time in nanoseconds.
pub const ANSWERED_AT_HEADER: &str = "x-load-tests-answered-at";
/// How long a hanging attempt is held at most (the client gives up long before).
const HANG_FOR: Duration = Duration::from_secs(3600);
/// Longest delay a log-normal draw may produce.
const MAX_DRAWN_DELAY: Duration = Duration::from_secs(3600);
/// The standard normal quantile of 0.99.
const Z_99: f64 = 2.326_347_874;

impl Default for StubBehavior {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            status: 200,
            response_headers: Vec::new(),
            echo_body: true,
            fail_first: 0,
            fail_status: 503,
            fail_headers: Vec::new(),
            fail_fraction: 1.0,
            delay_p99: None,
            response_bytes: None,
            faults: FaultMix::default(),
            capacity: None,
            stall_first_answer_after: None,
        }
    }
}

impl StubBehavior {
    /// How long to hold one request: `delay`, or a log-normal draw (see
    /// [`StubBehavior::delay_p99`]).
    pub fn draw_delay(&self) -> Duration {
        let Some(p99) = self.delay_p99.filter(|p99| *p99 > self.delay) else {
            return self.delay;
        };
        if self.delay.is_zero() {
            return self.delay;
        }
        let sigma = (p99.as_secs_f64() / self.delay.as_secs_f64()).ln() / Z_99;
        let drawn = self.delay.as_secs_f64() * (sigma * standard_normal()).exp();
        Duration::try_from_secs_f64(drawn)
            .unwrap_or(MAX_DRAWN_DELAY)
            .min(MAX_DRAWN_DELAY)
    }

    /// Does attempt `attempt` (1-based) of call `call_id` fail?
    fn fails(&self, call_id: Option<&str>, attempt: u32) -> bool {
        if self.fail_first == 0 || attempt > self.fail_first {
            return false;
        }
        if self.fail_fraction >= 1.0 {
            return true;
        }
        // FNV-1a: a stable hash, so a call is in or out of the failing share on every attempt.
        let hash = call_id
            .unwrap_or_default()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        #[allow(clippy::cast_precision_loss, reason = "a fraction needs no precision")]
        let share = (hash % 10_000) as f64 / 10_000.0;
        share < self.fail_fraction
    }
}

/// A request received by a [`StubFunction`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The method, e.g. `POST`.
    pub method: String,
    /// Path and query exactly as received, e.g. `/function/echo/a%20b?x=1`.
    pub path_and_query: String,
    /// All headers in arrival order, names lower-case, values lossily decoded.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Bytes,
    /// The value of the `X-Call-Id` header, if any.
    pub call_id: Option<String>,
    /// When it arrived.
    pub received_at: std::time::Instant,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// A callback received by a [`CallbackReceiver`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCallback {
    /// The request path, without the query.
    pub path: String,
    /// All headers in arrival order, names lower-case, values lossily decoded.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Bytes,
    /// The value of the `X-Call-Id` header, if any.
    pub call_id: Option<String>,
    /// When the request reached the receiver's handler (before its body was
    /// read).
    pub received_at: std::time::Instant,
}

impl RecordedCallback {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// A fake OpenFaaS function (or gateway): answers any method on any path
/// according to its [`StubBehavior`] and records every request.
///
/// Responses carry `x-stub-method: <method>`. Dropping it shuts the server
/// down.
#[derive(Debug)]
pub struct StubFunction {
    addr: SocketAddr,
    state: Arc<StubState>,
    _server: Server,
}

#[derive(Debug, Default)]
struct StubState {
    behavior: Mutex<StubBehavior>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Set by [`StubFunction::set_recording`]`(false)`.
    not_recording: AtomicBool,
    /// Attempts seen per call id (for [`StubBehavior::fail_first`]).
    attempts: Mutex<std::collections::HashMap<String, u32>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Requests received, recorded or not.
    received: AtomicUsize,
    /// Requests refused with `429` for [`StubBehavior::capacity`].
    over_capacity: AtomicUsize,
}

impl StubFunction {
    /// Starts the server on a free port of 127.0.0.1.
    pub async fn start(behavior: StubBehavior) -> Result<Self, HarnessError> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), behavior).await
    }

    /// Starts the server on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr, behavior: StubBehavior) -> Result<Self, HarnessError> {
        let listener = bind(addr)?;
        let addr = local_addr(&listener)?;
        let state = Arc::new(StubState {
            behavior: Mutex::new(behavior),
            ..StubState::default()
        });
        let router = Router::new()
            .fallback(stub_handler)
            .with_state(Arc::clone(&state));
        Ok(Self {
            addr,
            state,
            _server: Server::spawn(listener, router),
        })
    }

    /// Replaces the behavior for requests arriving from now on.
    pub fn set_behavior(&self, behavior: StubBehavior) {
        *lock(&self.state.behavior) = behavior;
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether requests arriving from now on are recorded (the default). A
    /// long-running stub turns this off to keep its memory bounded; the
    /// request-inspecting methods then see no new requests.
    pub fn set_recording(&self, on: bool) {
        self.state.not_recording.store(!on, Ordering::SeqCst);
    }

    /// All requests answered so far, in completion order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    /// How many requests were answered so far.
    pub fn count(&self) -> usize {
        lock(&self.state.requests).len()
    }

    /// How many requests carried `X-Call-Id: call_id`.
    pub fn invocations_for(&self, call_id: &str) -> usize {
        lock(&self.state.requests)
            .iter()
            .filter(|request| request.call_id.as_deref() == Some(call_id))
            .count()
    }

    /// How many requests arrived so far, whether recorded or not (each retry
    /// is one).
    pub fn received(&self) -> usize {
        self.state.received.load(Ordering::SeqCst)
    }

    /// The highest number of requests handled at the same time so far.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Starts a new window for [`StubFunction::max_in_flight`]: the highest so far is
    /// returned and the count starts again from those in flight now.
    pub fn reset_max_in_flight(&self) -> usize {
        let now = self.state.in_flight.load(Ordering::SeqCst);
        self.state.max_in_flight.swap(now, Ordering::SeqCst)
    }

    /// How many requests were refused with `429` for [`StubBehavior::capacity`].
    pub fn over_capacity(&self) -> usize {
        self.state.over_capacity.load(Ordering::SeqCst)
    }

    /// How many requests are being handled right now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests were recorded; `false` on timeout.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || self.count() >= n).await
    }
}

async fn stub_handler(State(state): State<Arc<StubState>>, request: Request) -> Response {
    let in_flight = InFlight::enter(&state);
    state.received.fetch_add(1, Ordering::SeqCst);
    let behavior = lock(&state.behavior).clone();
    if behavior.capacity.is_some_and(|c| in_flight.now > c) {
        state.over_capacity.fetch_add(1, Ordering::SeqCst);
        return StatusCode::TOO_MANY_REQUESTS.into_response();
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    };
    // Recorded on arrival, so a call cut short (a killed worker) still counts as invoked.
    let received_at = std::time::Instant::now();
    let method = parts.method.to_string();
    let id = call_id(&parts.headers);
    let attempt = {
        let mut attempts = lock(&state.attempts);
        let n = attempts.entry(id.clone().unwrap_or_default()).or_insert(0);
        *n += 1;
        *n
    };
    let failing = behavior.fails(id.as_deref(), attempt);
    if !state.not_recording.load(Ordering::SeqCst) {
        lock(&state.requests).push(RecordedRequest {
            method: method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
            headers: header_pairs(&parts.headers),
            body: body.clone(),
            call_id: id,
            received_at,
        });
    }
    let invoked_at = unix_nanos();
    let fault = if failing || !behavior.faults.any() {
        None
    } else {
        behavior.faults.pick(fastrand::f64())
    };
    if fault == Some(Fault::Hang) {
        tokio::time::sleep(HANG_FOR).await;
    }
    let delay = behavior.draw_delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    drop(in_flight);

    let succeeds = !failing && fault.is_none();
    let stall = behavior
        .stall_first_answer_after
        .filter(|_| attempt == 1)
        .zip(behavior.response_bytes);
    let mut response = Response::new(match (succeeds, behavior.response_bytes) {
        (true, Some(n)) if stall.is_some() => {
            let sent = stall.map_or(0, |(after, _)| after.min(n));
            let head = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(vec![
                    b'r';
                    sent
                ]))]);
            Body::from_stream(futures::StreamExt::chain(head, futures::stream::pending()))
        }
        (true, Some(n)) => Body::from(vec![b'r'; n]),
        (true, None) if behavior.echo_body => Body::from(body),
        _ => Body::empty(),
    });
    let retry_after = [("retry-after".to_owned(), "1".to_owned())];
    let (status, extra_headers) = match fault {
        _ if failing => (behavior.fail_status, behavior.fail_headers.as_slice()),
        Some(Fault::Status(429)) => (429, retry_after.as_slice()),
        Some(Fault::Status(status)) => (status, &[][..]),
        _ => (behavior.status, behavior.response_headers.as_slice()),
    };
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(INVOKED_AT_HEADER, HeaderValue::from(invoked_at));
    headers.insert(ANSWERED_AT_HEADER, HeaderValue::from(unix_nanos()));
    for (name, value) in extra_headers {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::warn!(%name, %value, "stub function: skipping invalid response header"),
        }
    }
    if let Ok(method) = HeaderValue::try_from(method) {
        headers.insert("x-stub-method", method);
    }
    if let (true, Some((_, n))) = (succeeds, stall) {
        headers.insert(axum::http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    response
}

/// Now as Unix time in nanoseconds (0 before 1970, which does not happen).
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
        })
}

/// A standard normal draw (Box-Muller).
fn standard_normal() -> f64 {
    // 1 - f64() is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - fastrand::f64();
    let u2 = fastrand::f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Counts a request as in flight for as long as it lives, so that requests
/// whose client goes away are uncounted too.
struct InFlight<'a> {
    count: &'a AtomicUsize,
    /// In flight when this one arrived, itself included.
    now: usize,
}

impl<'a> InFlight<'a> {
    fn enter(state: &'a StubState) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self {
            count: &state.in_flight,
            now,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Receives callbacks on any method and path, records them and answers with
/// a configurable status (default 200).
///
/// It can be stopped and started again on the same port; the records survive.
/// Dropping it shuts the server down.
#[derive(Debug)]
pub struct CallbackReceiver {
    addr: SocketAddr,
    state: Arc<CallbackState>,
    server: Option<Server>,
}

#[derive(Debug)]
struct CallbackState {
    status: AtomicU16,
    /// `Location` of every answer, if set (with a 3xx status: a redirecting receiver).
    location: Mutex<Option<String>>,
    /// Every n-th callback is answered but not recorded (0: none); see
    /// [`CallbackReceiver::set_recording_fault`].
    drop_every: AtomicUsize,
    /// Every n-th callback is recorded twice (0: none).
    duplicate_every: AtomicUsize,
    /// Callbacks received, for the faults above.
    received: AtomicUsize,
    callbacks: Mutex<Vec<RecordedCallback>>,
    /// Notified after each recorded callback.
    arrived: Notify,
}

impl CallbackReceiver {
    /// Starts the receiver on a free port of 127.0.0.1.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts the receiver on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> Result<Self, HarnessError> {
        let listener = bind(addr)?;
        let mut receiver = Self {
            addr: local_addr(&listener)?,
            state: Arc::new(CallbackState {
                status: AtomicU16::new(200),
                location: Mutex::new(None),
                drop_every: AtomicUsize::new(0),
                duplicate_every: AtomicUsize::new(0),
                received: AtomicUsize::new(0),
                callbacks: Mutex::new(Vec::new()),
                arrived: Notify::new(),
            }),
            server: None,
        };
        receiver.serve(listener);
        Ok(receiver)
    }

    /// Shuts the server down gracefully and waits until its port refuses
    /// connections. Does nothing when already stopped.
    pub async fn stop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        server.shutdown().await;
        // The listener is closed by now; make sure the kernel agrees.
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        while TcpStream::connect(self.addr).await.is_ok() {
            if Instant::now() >= deadline {
                tracing::warn!(addr = %self.addr, "callback receiver port still accepts connections");
                return;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Starts the server again on the same port, retrying the bind for up to
    /// 10 s. Does nothing when already running.
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        if self.server.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let listener = loop {
            match bind(self.addr) {
                Ok(listener) => break listener,
                Err(err) if Instant::now() >= deadline => return Err(err),
                Err(_) => tokio::time::sleep(REBIND_INTERVAL).await,
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// Sets the status code of the answers from now on (an invalid code
    /// yields 500).
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Sends `Location: {location}` with every answer from now on (`None`: no `Location`);
    /// with [`CallbackReceiver::set_status`] `302`, the receiver redirects.
    pub fn set_location(&self, location: Option<String>) {
        *lock(&self.state.location) = location;
    }

    /// Makes the *recording* wrong on purpose, to test that whoever reads it (the bench)
    /// reports losses and duplicates: every `drop_every`-th callback is answered `2xx` but not
    /// recorded, every `duplicate_every`-th other one is recorded twice (0 turns either off).
    pub fn set_recording_fault(&self, drop_every: usize, duplicate_every: usize) {
        self.state.drop_every.store(drop_every, Ordering::SeqCst);
        self.state
            .duplicate_every
            .store(duplicate_every, Ordering::SeqCst);
    }

    /// The callback URL, `http://127.0.0.1:PORT/callback`.
    pub fn url(&self) -> String {
        format!("http://{}/callback", self.addr)
    }

    /// The address the receiver listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Removes and returns the callbacks received so far, in arrival order;
    /// the other methods no longer see them.
    pub fn take_callbacks(&self) -> Vec<RecordedCallback> {
        std::mem::take(&mut *lock(&self.state.callbacks))
    }

    /// Waits until at least one callback is recorded, then removes and
    /// returns all of them, like [`CallbackReceiver::take_callbacks`]. Meant
    /// for a single consumer that prints callbacks as they come.
    pub async fn next_callbacks(&self) -> Vec<RecordedCallback> {
        loop {
            let callbacks = self.take_callbacks();
            if !callbacks.is_empty() {
                return callbacks;
            }
            // A callback recorded since the take left a permit, so this
            // returns at once rather than missing it.
            self.state.arrived.notified().await;
        }
    }

    /// All callbacks received so far, in arrival order.
    pub fn callbacks(&self) -> Vec<RecordedCallback> {
        lock(&self.state.callbacks).clone()
    }

    /// How many callbacks were received so far.
    pub fn count(&self) -> usize {
        lock(&self.state.callbacks).len()
    }

    /// A function returning [`CallbackReceiver::count`], usable from
    /// another task.
    pub fn counter(&self) -> impl Fn() -> usize + Send + Sync + 'static {
        let state = Arc::clone(&self.state);
        move || lock(&state.callbacks).len()
    }

    /// How many callbacks were received per `X-Call-Id` (callbacks without
    /// one are not counted).
    pub fn count_by_call_id(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for call_id in lock(&self.state.callbacks)
            .iter()
            .filter_map(|callback| callback.call_id.clone())
        {
            *counts.entry(call_id).or_insert(0) += 1;
        }
        counts
    }

    /// Waits until at least `n` callbacks were received; `false` on timeout.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        poll_until(timeout, || self.count() >= n).await
    }

    /// Waits until a callback was received for each of `ids`; `false` on
    /// timeout.
    pub async fn wait_for_call_ids(&self, ids: &[String], timeout: Duration) -> bool {
        poll_until(timeout, || {
            let callbacks = lock(&self.state.callbacks);
            let seen: HashSet<&str> = callbacks
                .iter()
                .filter_map(|callback| callback.call_id.as_deref())
                .collect();
            ids.iter().all(|id| seen.contains(id.as_str()))
        })
        .await
    }

    fn serve(&mut self, listener: TcpListener) {
        let router = Router::new()
            .fallback(callback_handler)
            .with_state(Arc::clone(&self.state));
        self.server = Some(Server::spawn(listener, router));
    }
}

async fn callback_handler(State(state): State<Arc<CallbackState>>, request: Request) -> Response {
    let received_at = std::time::Instant::now();
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    };
    let n = state.received.fetch_add(1, Ordering::SeqCst) + 1;
    let every = |setting: &AtomicUsize| {
        let every = setting.load(Ordering::SeqCst);
        every > 0 && n % every == 0
    };
    if !every(&state.drop_every) {
        let recorded = RecordedCallback {
            path: parts.uri.path().to_owned(),
            headers: header_pairs(&parts.headers),
            // A copy: the body read may be a slice of the connection's read buffer, which it
            // would keep alive (kilobytes per kept callback; gigabytes over a soak).
            body: Bytes::copy_from_slice(&body),
            call_id: call_id(&parts.headers),
            received_at,
        };
        let mut callbacks = lock(&state.callbacks);
        if every(&state.duplicate_every) {
            callbacks.push(recorded.clone());
        }
        callbacks.push(recorded);
    }
    state.arrived.notify_one();
    let mut response = StatusCode::from_u16(state.status.load(Ordering::SeqCst))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response();
    if let Some(location) = lock(&state.location)
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        response
            .headers_mut()
            .insert(axum::http::header::LOCATION, location);
    }
    response
}

/// An axum server task with a graceful-shutdown trigger. Dropping it
/// triggers the shutdown without waiting for it.
#[derive(Debug)]
struct Server {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    fn spawn(listener: TcpListener, router: Router) -> Self {
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    // A dropped sender is a shutdown request too.
                    let _ = signal.await;
                })
                .await
        });
        Self {
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Triggers the graceful shutdown and waits for it (at most
    /// [`SHUTDOWN_TIMEOUT`], then the task is aborted).
    async fn shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let Some(mut task) = self.task.take() else {
            return;
        };
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => tracing::warn!(%err, "stub server failed"),
            Ok(Err(err)) => tracing::warn!(%err, "stub server task failed"),
            Err(_) => {
                tracing::warn!("stub server shutdown timed out; aborting it");
                task.abort();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Binds `addr` with `SO_REUSEADDR`, so that a port left in `TIME_WAIT` can
/// be bound again.
fn bind(addr: SocketAddr) -> Result<TcpListener, HarnessError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| HarnessError::io("creating socket", e))?;
    socket
        .set_reuseaddr(true)
        .and_then(|()| socket.bind(addr))
        .map_err(|e| HarnessError::io(format!("binding {addr}"), e))?;
    socket
        .listen(1024)
        .map_err(|e| HarnessError::io(format!("listening on {addr}"), e))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, HarnessError> {
    listener
        .local_addr()
        .map_err(|e| HarnessError::io("reading the listener address", e))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn call_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CALL_ID_HEADER)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(candidate, _)| candidate.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

/// Polls `condition` every [`POLL_INTERVAL`] until it holds or `timeout`
/// passes.
async fn poll_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::task::JoinSet;

    use super::*;

    fn http_client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    #[test]
    fn a_fault_mix_draws_each_fault_in_its_share() {
        let mix = FaultMix {
            too_many_requests: 0.1,
            unavailable: 0.2,
            internal_error: 0.05,
            hang: 0.05,
        };
        assert!(mix.validate().is_ok());
        assert_eq!(mix.pick(0.05), Some(Fault::Status(429)));
        assert_eq!(mix.pick(0.25), Some(Fault::Status(503)));
        assert_eq!(mix.pick(0.33), Some(Fault::Status(500)));
        assert_eq!(mix.pick(0.37), Some(Fault::Hang));
        assert_eq!(mix.pick(0.40), None);
        assert_eq!(FaultMix::default().pick(0.0), None);
        let too_much = FaultMix {
            unavailable: 0.7,
            hang: 0.4,
            ..FaultMix::default()
        };
        assert!(too_much.validate().is_err());
        let negative = FaultMix {
            hang: -0.1,
            ..FaultMix::default()
        };
        assert!(negative.validate().is_err());
    }

    #[test]
    fn log_normal_delays_have_the_median_and_tail_asked_for() {
        let behavior = StubBehavior {
            delay: Duration::from_millis(10),
            delay_p99: Some(Duration::from_millis(100)),
            ..StubBehavior::default()
        };
        let mut draws: Vec<Duration> = (0..20_000).map(|_| behavior.draw_delay()).collect();
        draws.sort();
        let (median, p99) = (draws[10_000], draws[19_800]);
        // 20,000 draws pin the quantiles within a few percent; allow far more.
        assert!(
            (Duration::from_millis(9)..Duration::from_millis(11)).contains(&median),
            "{median:?}"
        );
        assert!(
            (Duration::from_millis(80)..Duration::from_millis(125)).contains(&p99),
            "{p99:?}"
        );
        // Without a p99 the delay is fixed.
        let fixed = StubBehavior {
            delay: Duration::from_millis(10),
            ..StubBehavior::default()
        };
        assert_eq!(fixed.draw_delay(), Duration::from_millis(10));
    }

    #[tokio::test]
    async fn stub_injects_faults_per_attempt_and_stamps_its_answers() {
        let stub = StubFunction::start(StubBehavior {
            response_bytes: Some(1000),
            faults: FaultMix {
                unavailable: 0.3,
                hang: 0.2,
                ..FaultMix::default()
            },
            ..StubBehavior::default()
        })
        .await
        .unwrap();
        stub.set_recording(false);
        let client = http_client();
        let mut requests = JoinSet::new();
        for _ in 0..400 {
            // A hang is told from an answer by the client's timeout, far above an answer's time.
            let request = client
                .post(format!("{}/function/f", stub.url()))
                .header("X-Call-Id", "same-call")
                .body("in")
                .timeout(Duration::from_secs(5))
                .send();
            requests.spawn(async move {
                match request.await {
                    Err(err) if err.is_timeout() => "hang".to_owned(),
                    Err(err) => panic!("request failed: {err}"),
                    Ok(response) => {
                        let stamp = |name: &str| -> u64 {
                            response.headers()[name].to_str().unwrap().parse().unwrap()
                        };
                        let (invoked, answered) =
                            (stamp(INVOKED_AT_HEADER), stamp(ANSWERED_AT_HEADER));
                        assert!(invoked > 0 && answered >= invoked);
                        let status = response.status().as_u16();
                        let body = response.bytes().await.unwrap();
                        let expected_len = if status == 200 { 1000 } else { 0 };
                        assert_eq!(body.len(), expected_len, "status {status}");
                        status.to_string()
                    }
                }
            });
        }
        let mut statuses: HashMap<String, usize> = HashMap::new();
        while let Some(kind) = requests.join_next().await {
            *statuses.entry(kind.unwrap()).or_insert(0) += 1;
        }
        // Binomial(400, p): each share lands within ±0.1 with overwhelming probability
        // (more than 4 standard deviations).
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        let share = |kind: &str| statuses.get(kind).copied().unwrap_or(0) as f64 / 400.0;
        assert!((0.2..0.4).contains(&share("503")), "{statuses:?}");
        assert!((0.1..0.3).contains(&share("hang")), "{statuses:?}");
        assert!((0.4..0.6).contains(&share("200")), "{statuses:?}");
        assert_eq!(stub.received(), 400);
    }

    #[tokio::test]
    async fn stub_records_echoes_and_follows_behavior() {
        let stub = StubFunction::start(StubBehavior::default()).await.unwrap();
        let client = http_client();

        let response = client
            .post(format!("{}/function/echo/a%20b?x=1", stub.url()))
            .header("X-Call-Id", "call-1")
            .header("X-Custom", "yes")
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-stub-method"], "POST");
        assert_eq!(response.bytes().await.unwrap(), "payload");

        let requests = stub.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.method, "POST");
        assert_eq!(request.path_and_query, "/function/echo/a%20b?x=1");
        assert_eq!(request.body, "payload");
        assert_eq!(request.call_id.as_deref(), Some("call-1"));
        assert_eq!(request.header("X-CUSTOM"), Some("yes"));
        assert!(request.headers.iter().any(|(name, _)| name == "x-call-id"));
        assert_eq!(stub.invocations_for("call-1"), 1);
        assert_eq!(stub.invocations_for("other"), 0);

        stub.set_behavior(StubBehavior {
            status: 503,
            echo_body: false,
            response_headers: vec![("X-Reason".into(), "busy".into())],
            ..StubBehavior::default()
        });
        let response = client
            .put(format!("{}/anything", stub.url()))
            .body("ignored")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["x-reason"], "busy");
        assert_eq!(response.headers()["x-stub-method"], "PUT");
        assert!(response.bytes().await.unwrap().is_empty());
        assert_eq!(stub.count(), 2);
        assert_eq!(stub.requests()[1].call_id, None);
    }

    #[tokio::test]
    async fn stub_tracks_concurrency() {
        let stub = StubFunction::start(StubBehavior {
            delay: Duration::from_millis(500),
            ..StubBehavior::default()
        })
        .await
        .unwrap();
        let client = http_client();
        let mut requests = JoinSet::new();
        for i in 0..5 {
            let request = client
                .post(format!("{}/function/slow", stub.url()))
                .header("X-Call-Id", format!("call-{i}"))
                .send();
            requests.spawn(request);
        }
        // Requests are recorded on arrival, while they are still being held.
        assert!(stub.wait_for_count(1, Duration::from_millis(400)).await);
        assert!(stub.in_flight() > 0);
        for response in requests.join_all().await {
            assert_eq!(response.unwrap().status(), 200);
        }
        assert!(stub.wait_for_count(5, Duration::from_secs(1)).await);
        assert_eq!(stub.max_in_flight(), 5);
        assert_eq!(stub.in_flight(), 0);
        assert_eq!(stub.invocations_for("call-3"), 1);
    }

    #[tokio::test]
    async fn fixed_addresses_streaming_and_no_recording() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let receiver = CallbackReceiver::start_on(free).await.unwrap();
        assert_eq!(receiver.addr(), free);
        assert_eq!(receiver.url(), format!("http://{free}/callback"));
        let stub = StubFunction::start_on(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            StubBehavior::default(),
        )
        .await
        .unwrap();
        assert_ne!(stub.addr().port(), 0);
        stub.set_recording(false);
        let client = http_client();

        let response = client
            .post(format!("{}/elsewhere", stub.url()))
            .body("echo")
            .send()
            .await
            .unwrap();
        assert_eq!(response.bytes().await.unwrap(), "echo");
        assert_eq!(stub.count(), 0, "not recorded");

        // next_callbacks waits for a callback that arrives later.
        let before = std::time::Instant::now();
        let post = |id: &'static str| client.post(receiver.url()).header("X-Call-Id", id).send();
        let (taken, response) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(5), receiver.next_callbacks()),
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                post("x").await
            }
        );
        assert_eq!(response.unwrap().status(), 200);
        let taken = taken.unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].call_id.as_deref(), Some("x"));
        assert!(taken[0].received_at >= before);
        assert_eq!(receiver.count(), 0, "taken callbacks are gone");

        post("y").await.unwrap();
        let taken = receiver.take_callbacks();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].call_id.as_deref(), Some("y"));
        assert!(receiver.take_callbacks().is_empty());
    }

    #[tokio::test]
    async fn callback_receiver_survives_stop_and_start_again() {
        let mut receiver = CallbackReceiver::start().await.unwrap();
        let client = http_client();
        let response = client
            .post(receiver.url())
            .header("X-Call-Id", "a")
            .body("first")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);

        receiver.stop().await;
        receiver.stop().await; // idempotent
        let err = http_client()
            .post(receiver.url())
            .body("lost")
            .send()
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");

        receiver.start_again().await.unwrap();
        receiver.set_status(500);
        let response = client
            .post(receiver.url())
            .header("X-Call-Id", "b")
            .body("second")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 500);

        let ids = ["a".to_owned(), "b".to_owned()];
        assert!(
            receiver
                .wait_for_call_ids(&ids, Duration::from_secs(1))
                .await
        );
        assert!(
            !receiver
                .wait_for_call_ids(&["c".to_owned()], Duration::from_millis(50))
                .await
        );
        assert!(receiver.wait_for_count(2, Duration::from_secs(1)).await);
        let callbacks = receiver.callbacks();
        assert_eq!(callbacks.len(), 2);
        assert_eq!(callbacks[0].path, "/callback");
        assert_eq!(callbacks[0].body, "first");
        assert_eq!(callbacks[1].header("x-call-id"), Some("b"));
        assert_eq!(
            receiver.count_by_call_id(),
            HashMap::from([("a".to_owned(), 1), ("b".to_owned(), 1)])
        );
    }
}
