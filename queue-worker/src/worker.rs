//! The pull loop and the life of one message.
//!
//! Pull loop: take a concurrency permit *before* pulling, then ask the queue for at most as many
//! messages as permits are held, so no message waits in a local buffer with its ack clock running.
//!
//! One delivery: leased at once ([`crate::lease`]: kept alive by one shared heartbeat, ended by
//! exactly one terminal action) → decode (undecodable → dead letter) → held while its function
//! is paused (a watched cache, no read per call) → [`crate::plan`] decides from the dedup state,
//! the delivery count and the age → invoke → record the end and keep the result in one write →
//! store the outcome durably (group commit) → deliver the callback (retrying only the callback)
//! → record it → mark done → ack.
//!
//! The handler owns the call's record while it runs the call: it keeps the record and its
//! revision, and writes each next state at that revision without reading (the first one at the
//! revision the gateway put in the envelope); only a conflict (a cancel) costs a read. A
//! successful call costs three awaited round trips to the records (attempt started; attempt
//! ended with the result; callback), two dedup writes and one group-committed fsync.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use queue_core::Outcome;
use queue_core::backend::jetstream::{ConsumerOptions, JetStreamOptions, JetStreamQueue};
use queue_core::backend::{
    BackendError, CallQueue, DeadLetter, DeadLetterReason, Lane, OwnedRecord, QueueDelivery,
    apply_event,
};
use queue_core::blobs::SharedBlobs;
use queue_core::message::{DecodeError, EnvelopeSummary, InvalidCall, QueuedCall};
use queue_core::metrics;
use queue_core::records::{
    CallLimits, CallRecord, CallState, CallbackEntry, Event, OutcomeEvent, ResultAvailability,
    StoredResult,
};
use queue_core::tls_server::TlsAcceptor;

use crate::callback::{CallbackSender, Delivery};
use crate::concurrency::{Admission, Limits, Slot};
use crate::config::WorkerConfig;
use crate::fair;
use crate::functions::{CallSettings, FunctionSettings};
use crate::http1::Http1Client;
use crate::invoke::{FunctionInvoker, StoredBodyProblem, http_client};
use crate::lease::{Heartbeats, Lease, beat};
use crate::plan::{Plan, plan};
use crate::retry::Decision;
use crate::state::{CallStore, Generation, Seen, StateError};

/// Largest pull request, whatever the number of free permits.
const MAX_PULL_BATCH: usize = 256;
/// `X-Function-Error` of a call dead-lettered because its deliveries ran out before an attempt
/// could finish (workers died during it).
const EXHAUSTED_BY_REDELIVERY: &str = "attempts used up by redeliveries";
/// How long a call queued without a record waits for its first record write before it runs
/// anyway (the records store electing a leader takes seconds).
const RECORD_WAIT: Duration = Duration::from_secs(30);
/// Wait before a message is offered again after a local failure (state store, dead-letter publish).
const LOCAL_FAILURE_RETRY: Duration = Duration::from_secs(5);

/// Errors that stop the worker from starting.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The state directory could not be opened.
    #[error("cannot open state directory {dir}: {source}")]
    State {
        /// Directory.
        dir: String,
        /// Cause.
        #[source]
        source: StateError,
    },
    /// Queue problem at start.
    #[error(transparent)]
    Queue(#[from] queue_core::backend::BackendError),
    /// HTTP client could not be built.
    #[error("cannot build HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The metrics endpoint's TLS certificate or key cannot be used.
    #[error("metrics endpoint TLS: {0}")]
    MetricsTls(#[from] queue_core::tls_server::TlsFileError),
}

/// Everything a message handler needs, shared by all handlers.
#[derive(Debug)]
struct Ctx<Q: CallQueue> {
    config: WorkerConfig,
    queue: Arc<Q>,
    store: CallStore,
    invoker: FunctionInvoker,
    callbacks: CallbackSender,
    /// Fires when the shutdown grace period is over: running calls are handed back.
    hand_back: CancellationToken,
    /// Retry policy, timeout and max age per function.
    functions: FunctionSettings,
    /// Calls being handled here: a redelivery waits, a cancel aborts.
    running: RunningCalls,
    /// One per concurrent invocation (`max_inflight`).
    permits: Arc<Semaphore>,
    /// Each function's concurrency cap and adaptive limit.
    limits: Limits,
    /// The leased deliveries and their one heartbeat.
    beats: Arc<Heartbeats<Arc<Q::Delivery>>>,
    /// The paused functions.
    paused: PausedCache,
    /// Record writes in flight at once ([`RECORD_WRITES_IN_FLIGHT`]).
    record_writes: Semaphore,
}

/// Most record writes a worker has in flight at once. A write's future is ~3 KiB while it
/// waits for its round trip; when thousands of long calls start or answer within a second,
/// every one of them would hold one at once (the writes queue in the one NATS connection
/// anyway). A few hundred in flight keep the connection busy (at ~1 ms a round trip, far
/// more writes a second than a worker makes) and the rest wait in a FIFO at a few bytes each.
const RECORD_WRITES_IN_FLIGHT: usize = 512;

/// The calls this process is handling, each with the token that aborts its invocation.
#[derive(Debug, Default)]
struct RunningCalls(std::sync::Mutex<std::collections::HashMap<String, CancellationToken>>);

/// This process handles the call while the claim lives.
struct Claim<'a> {
    running: &'a RunningCalls,
    call_id: String,
    cancel: CancellationToken,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.running.calls().remove(&self.call_id);
    }
}

impl RunningCalls {
    fn calls(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, CancellationToken>> {
        // Short critical sections, never held across an await.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims `call_id`; `None` if this process is handling it already.
    fn claim(&self, call_id: &str) -> Option<Claim<'_>> {
        let mut calls = self.calls();
        if calls.contains_key(call_id) {
            return None;
        }
        let cancel = CancellationToken::new();
        calls.insert(call_id.to_owned(), cancel.clone());
        Some(Claim {
            running: self,
            call_id: call_id.to_owned(),
            cancel,
        })
    }

    fn cancel(&self, call_id: &str) {
        if let Some(token) = self.calls().get(call_id) {
            token.cancel();
        }
    }
}

/// Aborts running invocations of calls announced as cancelled, until `stop` fires.
async fn listen_for_cancels<Q: CallQueue>(ctx: Arc<Ctx<Q>>, stop: CancellationToken) {
    follow(
        || ctx.queue.cancellations(),
        |call_id| ctx.running.cancel(&call_id),
        || {},
        "cancel announcements",
        &stop,
    )
    .await;
}

/// Subscribes with `subscribe`, hands every item to `each`, calls `lost` when the stream
/// ends and subscribes again (with backoff), until `stop` fires.
async fn follow<T, S, F>(
    subscribe: impl Fn() -> F,
    each: impl Fn(T),
    lost: impl Fn(),
    what: &str,
    stop: &CancellationToken,
) where
    S: futures::Stream<Item = T> + Unpin,
    F: Future<Output = Result<S, queue_core::backend::BackendError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    while !stop.is_cancelled() {
        let mut items = match subscribe().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow the {what}; retrying");
                backoff.wait(stop).await;
                continue;
            }
        };
        backoff.reset();
        loop {
            let next = tokio::select! {
                n = items.next() => n,
                () = stop.cancelled() => return,
            };
            match next {
                Some(item) => each(item),
                None => break,
            }
        }
        lost();
        backoff.wait(stop).await;
    }
}

/// Runs a worker on JetStream until `shutdown` completes, then drains: no new pulls, in-flight
/// calls get `shutdown_grace` to finish, the rest are handed back to the queue (nak).
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    config.validate().map_err(WorkerError::Config)?;
    metrics::set_pro_labels(&config.nats.stream, &config.default_namespace);
    // Checked before connecting: a bad certificate fails at once, whatever NATS does.
    let metrics_tls = metrics_tls(&config)?;
    let options = JetStreamOptions {
        nats: config.nats.clone(),
        // The gateway creates the streams; the worker binds to them.
        manage_streams: None,
        consumer: Some(ConsumerOptions {
            name: config.consumer.clone(),
            ack_wait: config.ack_wait,
            max_ack_pending: config.max_ack_pending,
            lane_idle: config.lane_idle(),
        }),
        records: config.records.clone(),
        sealing: config
            .encryption
            .sealing()
            .map_err(|e| WorkerError::Config(e.to_string()))?,
    };
    let sealing = options.sealing.clone();
    let queue = JetStreamQueue::connect(options, "queue-worker", CancellationToken::new()).await?;
    // The gateway creates the bucket; opened when a stored body or a large response first
    // needs it, and created as the gateway would (the calls stream's replicas) if no gateway
    // has yet.
    let replicas = match queue.context().get_stream(&config.nats.stream).await {
        Ok(stream) => stream.cached_info().config.num_replicas.max(1),
        Err(_) => 1,
    };
    let blobs = SharedBlobs::jetstream(
        queue.context().clone(),
        &config.nats.stream,
        Some(queue_core::blobs::jetstream::BucketSettings {
            replicas,
            max_bytes: 0,
        }),
        sealing,
    );
    let metrics_stop = CancellationToken::new();
    serve_metrics(
        config.metrics_listen,
        metrics_tls,
        queue.clone(),
        metrics_stop.clone(),
    )
    .await;
    let result = run_with_blobs(config, queue, None, Some(blobs), shutdown).await;
    metrics_stop.cancel();
    result
}

/// The metrics endpoint's settings, as its errors name them.
pub const METRICS_TLS_SETTINGS: queue_core::tls_server::TlsSettingNames =
    queue_core::tls_server::TlsSettingNames {
        cert_flag: "--metrics-tls-cert",
        cert_env: "QUEUE_WORKER_METRICS_TLS_CERT",
        key_flag: "--metrics-tls-key",
        key_env: "QUEUE_WORKER_METRICS_TLS_KEY",
    };

/// The metrics endpoint's TLS acceptor, if `--metrics-tls-cert`/`--metrics-tls-key` are set.
/// A file that cannot be used is an error: the operator asked for HTTPS, and a worker that
/// went on without it would serve its metrics in clear (or not at all) unnoticed.
pub fn metrics_tls(config: &WorkerConfig) -> Result<Option<TlsAcceptor>, WorkerError> {
    match (&config.metrics_tls_cert, &config.metrics_tls_key) {
        (Some(cert), Some(key)) => Ok(Some(queue_core::tls_server::acceptor(
            cert,
            key,
            METRICS_TLS_SETTINGS,
        )?)),
        (None, None) => Ok(None),
        _ => Err(WorkerError::Config(
            "--metrics-tls-cert and --metrics-tls-key go together".into(),
        )),
    }
}

/// Serves `/metrics` on `address` in the background until `stop` fires, over TLS with `tls`.
/// A taken port is logged, not fatal: the worker's job is the calls.
pub async fn serve_metrics<Q: CallQueue>(
    address: std::net::SocketAddr,
    tls: Option<TlsAcceptor>,
    queue: Arc<Q>,
    stop: CancellationToken,
) {
    let handle = metrics::install();
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            tracing::info!(listen = ?listener.local_addr().ok(), scheme, "metrics at /metrics");
            tokio::spawn(async move {
                if let Err(e) = crate::endpoint::serve(listener, tls, handle, queue, stop).await {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            });
        }
        Err(e) => {
            tracing::error!(%address, error = %e, "cannot serve metrics (--metrics-listen); going on without");
        }
    }
}

/// Runs a worker on `queue` until `shutdown` completes, then drains as [`run`] does.
pub async fn run_on<Q: CallQueue>(
    config: WorkerConfig,
    queue: Arc<Q>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    run_with_state(config, queue, None, shutdown).await
}

/// [`run_on`] with the dedup state given (`None`: opened in `--state-dir`).
pub async fn run_with_state<Q: CallQueue>(
    config: WorkerConfig,
    queue: Arc<Q>,
    store: Option<CallStore>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    run_with_blobs(config, queue, store, None, shutdown).await
}

/// [`run_with_state`] with the blob store of large bodies (`None`: a call whose body is
/// stored is dead-lettered as unreadable).
pub async fn run_with_blobs<Q: CallQueue>(
    config: WorkerConfig,
    queue: Arc<Q>,
    store: Option<CallStore>,
    blobs: Option<SharedBlobs>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    config.validate().map_err(WorkerError::Config)?;
    if config.fair_scheduling && !queue.pulls_by_lane() {
        return Err(WorkerError::Config(
            "--fair-scheduling needs the JetStream backend (the embedded queue is pulled in \
             arrival order)"
                .into(),
        ));
    }
    let functions =
        FunctionSettings::load(&config).map_err(|e| WorkerError::Config(e.to_string()))?;
    let function_list = crate::annotations::function_list(&config).map_err(WorkerError::Config)?;
    let store = if let Some(store) = store {
        store
    } else {
        let (dir, cache, retention) = (
            config.state_dir.clone(),
            config.state_cache_bytes,
            config.dedup_retention,
        );
        tokio::task::spawn_blocking(move || CallStore::open(&dir, cache, retention))
            .await
            .map_err(|e| WorkerError::Config(format!("state open task failed: {e}")))?
            .map_err(|source| WorkerError::State {
                dir: config.state_dir.display().to_string(),
                source,
            })?
    };
    // The dedup state holds function responses: it is sealed with the queue's keys.
    let store = store.with_sealing(queue.sealing().clone());
    let http = http_client(concat!("queue-worker/", env!("CARGO_PKG_VERSION")))?;
    // Plain-http functions and callbacks: idle connections kept for as many calls as run at
    // once, like the general client's pool.
    let plain = Arc::new(Http1Client::new(
        config.max_inflight as usize,
        Duration::from_secs(60),
        Duration::from_secs(10),
    ));

    let stop_pulling = CancellationToken::new();
    let ctx = Arc::new(Ctx {
        invoker: FunctionInvoker::new(&config, http, plain.clone()).with_blobs(blobs.clone())?,
        callbacks: CallbackSender::new(&config, plain)
            .map_err(|e| WorkerError::Config(e.to_string()))?
            .with_blobs(blobs.clone()),
        queue,
        store,
        hand_back: CancellationToken::new(),
        functions,
        running: RunningCalls::default(),
        permits: Arc::new(Semaphore::new(config.max_inflight as usize)),
        limits: Limits::new(
            config.adaptive_concurrency == crate::config::Adaptive::On,
            config.max_inflight,
        ),
        beats: Heartbeats::new(),
        paused: PausedCache::default(),
        record_writes: Semaphore::new(RECORD_WRITES_IN_FLIGHT),
        config,
    });
    let beats_stop = CancellationToken::new();
    let status = tokio::spawn(crate::status::announce(
        ctx.queue.clone(),
        crate::status::Identity::of(&ctx.config, ctx.limits.adaptive()),
        {
            let ctx = ctx.clone();
            move || (ctx.limits.snapshot(), ctx.running.calls().len())
        },
        beats_stop.clone(),
    ));
    let heartbeat = tokio::spawn(ctx.beats.clone().run(
        ctx.config.progress_interval(),
        beats_stop.clone(),
        beat,
    ));
    {
        let stop = stop_pulling.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    let sweeper = tokio::spawn(sweep_expired(ctx.store.clone(), stop_pulling.clone()));
    let cancel_listener = tokio::spawn(listen_for_cancels(ctx.clone(), stop_pulling.clone()));
    let paused_follower = tokio::spawn(follow_paused(ctx.clone(), stop_pulling.clone()));
    let mut scheduler = tokio::spawn(crate::scheduler::run(
        ctx.queue.clone(),
        stop_pulling.clone(),
    ));
    let annotations = function_list.map(|list| {
        tokio::spawn(crate::annotations::follow(
            list,
            ctx.config.annotations_refresh,
            ctx.functions.annotated(),
            stop_pulling.clone(),
        ))
    });

    tracing::info!(
        consumer = %ctx.config.consumer,
        max_inflight = ctx.config.max_inflight,
        adaptive_concurrency = ctx.limits.adaptive(),
        ack_wait = ?ctx.config.ack_wait,
        "queue-worker started"
    );
    let mut tasks = pull_loop(&ctx, &stop_pulling).await;

    tracing::info!(
        in_flight = tasks.len(),
        grace = ?ctx.config.shutdown_grace,
        "shutting down: no new pulls; waiting for in-flight calls"
    );
    let drained = tokio::time::timeout(ctx.config.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            in_flight = tasks.len(),
            "grace period over: handing the remaining calls back to the queue"
        );
        ctx.hand_back.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
    // The scheduler hands back what it held (stopped with the pulls): bounded.
    if tokio::time::timeout(Duration::from_secs(5), &mut scheduler)
        .await
        .is_err()
    {
        tracing::warn!("the scheduler did not stop in time");
        scheduler.abort();
    }
    sweeper.abort();
    cancel_listener.abort();
    paused_follower.abort();
    if let Some(annotations) = annotations {
        annotations.abort();
    }
    beats_stop.cancel();
    let _ = heartbeat.await;
    let _ = status.await;
    ctx.queue.flush_before_exit().await;
    if let Err(e) = ctx.store.flush().await {
        tracing::warn!(error = %e, "could not flush state at shutdown");
    }
    tracing::info!("queue-worker stopped");
    Ok(())
}

/// Pulls until `stop` fires; returns the handlers still running.
async fn pull_loop<Q: CallQueue>(ctx: &Arc<Ctx<Q>>, stop: &CancellationToken) -> JoinSet<()> {
    if ctx.config.fair_scheduling {
        return fair_pull_loop(ctx, stop).await;
    }
    let mut tasks = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    while !stop.is_cancelled() {
        while tasks.try_join_next().is_some() {}
        let Some(held) = hold_permits(ctx, stop).await else {
            break;
        };
        let Some(held) = held else { continue };
        let batch = ctx.queue.pull(held.len(), ctx.config.pull_expires);
        let batch = tokio::select! {
            b = batch => match b {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.peek(), "pull request failed (is the stream created?)");
                    backoff.wait(stop).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        dispatch(ctx, batch, held, &mut tasks, stop, &mut backoff).await;
    }
    tasks
}

/// Waits for at least one permit and takes as many more as are free (up to a batch). `None`:
/// stop fired. `Some(None)`: a call with its function's slot wanted the permit (ask again).
async fn hold_permits<Q: CallQueue>(
    ctx: &Arc<Ctx<Q>>,
    stop: &CancellationToken,
) -> Option<Option<Vec<OwnedSemaphorePermit>>> {
    let permits = &ctx.permits;
    let first = tokio::select! {
        p = permits.clone().acquire_owned() => p.ok()?,
        () = stop.cancelled() => return None,
    };
    if ctx.limits.permits_wanted() > 0 {
        // A call with its function's slot waits for a permit: it goes first (the permit
        // passes to it, queued on the semaphore).
        drop(first);
        tokio::task::yield_now().await;
        return Some(None);
    }
    let mut held = vec![first];
    while held.len() < MAX_PULL_BATCH {
        match permits.clone().try_acquire_owned() {
            Ok(p) => held.push(p),
            Err(_) => break,
        }
    }
    Some(Some(held))
}

/// What [`dispatch`] saw of one pull.
#[derive(Debug, Default)]
struct Dispatched {
    /// Deliveries it brought.
    deliveries: usize,
    /// The queue's count of calls left behind, from the last delivery.
    pending: Option<u64>,
    /// The pull failed part way.
    failed: bool,
}

/// Hands each delivery of one pull to a handler with one of the `held` permits.
async fn dispatch<Q: CallQueue>(
    ctx: &Arc<Ctx<Q>>,
    mut batch: futures::stream::BoxStream<'static, Result<Q::Delivery, BackendError>>,
    mut held: Vec<OwnedSemaphorePermit>,
    tasks: &mut JoinSet<()>,
    stop: &CancellationToken,
    backoff: &mut Backoff,
) -> Dispatched {
    let mut seen = Dispatched::default();
    // Permits given up to calls with a slot (`Limits::permits_wanted`): as many deliveries
    // of this pull still to come wait for a permit of their own.
    let mut owed = 0usize;
    loop {
        let next = tokio::select! {
            n = batch.next() => n,
            () = ctx.limits.permit_wanted(), if !held.is_empty() => {
                if ctx.limits.permits_wanted() > 0 {
                    owed += held.len();
                    held.clear();
                }
                continue;
            }
            () = stop.cancelled() => None,
        };
        match next {
            None => break,
            Some(Ok(msg)) => {
                backoff.reset();
                seen.deliveries += 1;
                seen.pending = msg.pending();
                let lease = Lease::new(msg, &ctx.beats);
                if let Some(permit) = held.pop() {
                    tasks.spawn(handle(ctx.clone(), lease, permit));
                } else if owed > 0 {
                    owed -= 1;
                    tasks.spawn(handle_when_permitted(ctx.clone(), lease));
                } else {
                    // The queue sent more than asked; hand it straight back.
                    lease.hand_back().await;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pull failed");
                seen.failed = true;
                backoff.wait(stop).await;
                break;
            }
        }
    }
    seen
}

/// [`pull_loop`] under fair scheduling: each pull asks one lane, picked by [`fair::Scheduler`]
/// among those known to hold calls (announced by publishers, found by a census or a listing of
/// the queue) or due for a poll.
async fn fair_pull_loop<Q: CallQueue>(ctx: &Arc<Ctx<Q>>, stop: &CancellationToken) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let mut lanes = fair::Scheduler::new(fair::Timing::default());
    let weight = |lane: &Lane| ctx.config.namespace_weight(lane.namespace());
    // The lanes of the functions of this worker's queues (`--queues`), asked each time: a
    // function's queue may change with its annotations.
    let ours = |lane: &Lane| {
        let queue = ctx.functions.queue_of(&lane.function, lane.namespace());
        ctx.config.queues.contains(&queue)
    };
    // Announcements first, then the listing: a call queued in between is in one or the other.
    let mut announcements = match ctx.queue.lane_announcements().await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "no lane announcements; lanes are found by census only");
            futures::stream::pending().boxed()
        }
    };
    let mut census = tokio::time::interval(ctx.config.lane_census_interval);
    census.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A listing of the queue is due at start and after two censuses in a row found calls no
    // known lane accounts for (one alone may be a call acked or queued between two reads).
    let mut list_due = true;
    let mut unaccounted_before = false;
    // Calls the last listing found in other queues' lanes: not a reason to list again while
    // those queues' workers are away (their consumers would account for them).
    let mut foreign = 0u64;
    while !stop.is_cancelled() {
        while tasks.try_join_next().is_some() {}
        if list_due {
            match ctx.queue.waiting_lanes().await {
                Ok(found) => {
                    let now = Instant::now();
                    foreign = 0;
                    for (lane, calls) in &found {
                        if ours(lane) {
                            lanes.ready(lane, weight(lane), now);
                        } else {
                            foreign += calls;
                        }
                    }
                    tracing::debug!(lanes = found.len(), "listed the lanes holding calls");
                    list_due = false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.peek(), "cannot list the lanes holding calls");
                    backoff.wait(stop).await;
                    continue;
                }
            }
        }
        let Some(held) = hold_permits(ctx, stop).await else {
            break;
        };
        let Some(held) = held else { continue };
        // A lane to pull, waiting for one to be announced or due.
        let pick = loop {
            while let Some(Some(lane)) = announcements.next().now_or_never() {
                if ours(&lane) {
                    lanes.ready(&lane, weight(&lane), Instant::now());
                }
            }
            let now = Instant::now();
            if let Some(pick) = lanes.pick(now) {
                if !ours(&pick.lane) {
                    lanes.forget(&pick.lane);
                    continue;
                }
                break Some(pick);
            }
            let due = lanes.next_due(now);
            tokio::select! {
                a = announcements.next() => if let Some(lane) = a.filter(|l| ours(l)) {
                    lanes.ready(&lane, weight(&lane), Instant::now());
                },
                () = async {
                    match due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = census.tick() => break None,
                () = stop.cancelled() => break None,
            }
        };
        let Some(pick) = pick else {
            drop(held);
            if stop.is_cancelled() {
                break;
            }
            take_census(
                ctx,
                &mut lanes,
                &ours,
                foreign,
                &mut list_due,
                &mut unaccounted_before,
            )
            .await;
            continue;
        };
        let asked = held.len();
        let batch = tokio::select! {
            b = ctx.queue.pull_lane(&pick.lane, asked) => b,
            () = stop.cancelled() => break,
        };
        let seen = match batch {
            Ok(batch) => dispatch(ctx, batch, held, &mut tasks, stop, &mut backoff).await,
            Err(e) => {
                drop(held);
                tracing::warn!(error = %e, lane = %pick.lane.qualified_function(), retry_in = ?backoff.peek(), "lane pull failed");
                backoff.wait(stop).await;
                Dispatched {
                    failed: true,
                    ..Dispatched::default()
                }
            }
        };
        let now = Instant::now();
        if seen.deliveries == asked && seen.pending.is_some_and(|p| p > 0) {
            lanes.fetched(&pick.lane, now);
        } else {
            lanes.drained(&pick.lane, pick.generation, seen.deliveries > 0, now);
        }
        // A census when one is due, also while lanes keep every permit busy.
        if census.tick().now_or_never().is_some() {
            take_census(
                ctx,
                &mut lanes,
                &ours,
                foreign,
                &mut list_due,
                &mut unaccounted_before,
            )
            .await;
        }
    }
    tasks
}

/// Learns the lanes the consumers know (other workers' too), forgets long idle ones, and
/// decides whether the queue must be listed (calls no lane accounts for, twice in a row).
async fn take_census<Q: CallQueue>(
    ctx: &Arc<Ctx<Q>>,
    lanes: &mut fair::Scheduler,
    ours: &impl Fn(&Lane) -> bool,
    foreign: u64,
    list_due: &mut bool,
    unaccounted_before: &mut bool,
) {
    let now = Instant::now();
    lanes.forget_idle(now);
    match ctx.queue.lane_census().await {
        Ok(census) => {
            // Lanes with calls only: an idle lane's consumer is left to lapse (`--lane-idle`),
            // and its next call is announced.
            for count in census.lanes.iter().filter(|c| ours(&c.lane)) {
                let weight = ctx.config.namespace_weight(count.lane.namespace());
                if count.waiting > 0 {
                    lanes.ready(&count.lane, weight, now);
                } else if count.delivered > 0 {
                    lanes.know(&count.lane, weight, now);
                }
            }
            let unaccounted = census.unaccounted > foreign;
            if unaccounted && *unaccounted_before {
                tracing::info!(
                    calls = census.unaccounted,
                    "calls queued that no known lane accounts for: listing the queue"
                );
                *list_due = true;
            }
            *unaccounted_before = unaccounted && !*list_due;
        }
        Err(e) => tracing::warn!(error = %e, "lane census failed"),
    }
}

/// A delivery whose reserved permit went to a call with a slot: it waits for a permit (its
/// lease kept alive), or is handed back at shutdown.
async fn handle_when_permitted<Q: CallQueue>(ctx: Arc<Ctx<Q>>, lease: Lease<Q::Delivery>) {
    let permit = tokio::select! {
        p = ctx.permits.clone().acquire_owned() => p.ok(),
        () = ctx.hand_back.cancelled() => None,
    };
    match permit {
        Some(permit) => handle(ctx, lease, permit).await,
        None => lease.hand_back().await,
    }
}

/// Whether the record of `call` says it was cancelled.
async fn cancelled_call<Q: CallQueue>(ctx: &Ctx<Q>, call: &QueuedCall) -> bool {
    matches!(
        ctx.queue.record_entry(&call.meta.call_id).await,
        Ok(Some(entry)) if entry.record.state == CallState::Cancelled
    )
}

/// Opens a delivery: the call, with its stored body checked; `None` when the delivery was
/// dealt with here (an unreadable message dead-lettered, a store out of reach naked).
async fn open_call<Q: CallQueue>(
    ctx: &Ctx<Q>,
    lease: Lease<Q::Delivery>,
    permit: OwnedSemaphorePermit,
) -> Option<(QueuedCall, Lease<Q::Delivery>, OwnedSemaphorePermit)> {
    let mut opened = QueuedCall::open(lease.delivery().payload(), ctx.queue.sealing());
    // A body in the blob store: there and the one the call names, or the call is refused as
    // one it cannot read (never retried); the store out of reach: it comes back later.
    if let Ok(call) = &opened
        && call.meta.body.is_blob()
    {
        // Boxed, as the other cold paths here: every call is opened, few have a stored body.
        match Box::pin(ctx.invoker.check_stored_body(call)).await {
            Ok(()) => {}
            // A cancelled call's body is deleted with the cancel: the call goes on to be
            // dropped as cancelled, never run.
            Err(StoredBodyProblem::Unreadable(_)) if Box::pin(cancelled_call(ctx, call)).await => {}
            Err(StoredBodyProblem::Unreadable(why)) => {
                opened = Err(DecodeError::Invalid(InvalidCall::BodyReference(why)));
            }
            Err(StoredBodyProblem::Unavailable(e)) => {
                tracing::warn!(call_id = %call.meta.call_id, error = %e, "stored body out of reach; the call waits");
                drop(permit);
                lease.nak(Some(LOCAL_FAILURE_RETRY)).await;
                return None;
            }
        }
    }
    let call = match opened {
        Ok(mut call) => {
            call.meta.canonicalize(&ctx.config.default_namespace);
            call
        }
        Err(e) => {
            drop(permit);
            let detail = e.to_string();
            let subject = lease.delivery().subject().to_owned();
            let reason = match e {
                DecodeError::Sealed(_) | DecodeError::ClearMismatch => {
                    DeadLetterReason::Undecryptable
                }
                _ => DeadLetterReason::Undecodable,
            };
            // A sealed call keeps its id and time in clear: the dead letter names its call.
            let summary = EnvelopeSummary::of(lease.delivery().payload()).ok();
            let letter = DeadLetter {
                reason,
                detail: &detail,
                original_subject: &subject,
                stream_sequence: lease.delivery().sequence(),
                call_id: summary.as_ref().map(|s| s.call_id.as_str()),
                received_at_unix_nanos: summary.as_ref().map(|s| s.received_at_unix_nanos),
                last_status: None,
                attempts: 0,
            };
            ::metrics::counter!(metrics::DEAD_LETTERS, "function" => "unknown", "reason" => reason.as_str())
                .increment(1);
            tracing::error!(
                stream_sequence = letter.stream_sequence,
                subject = %subject,
                detail = %detail,
                reason = reason.as_str(),
                "message cannot be read; dead-lettering it"
            );
            let stored = lease
                .dead_letter(ctx.queue.as_ref(), &letter, LOCAL_FAILURE_RETRY)
                .await;
            if let (true, Some(summary)) = (stored, summary) {
                // The call's record says where it went (its id was readable in clear).
                let gave_up = Event::GaveUp {
                    state: CallState::DeadLettered,
                    reason: Some(reason.as_str().to_owned()),
                    function: summary.function,
                    accepted_at: summary.received_at_unix_nanos,
                };
                let events = [gave_up];
                let recorded = Box::pin(apply_event(
                    ctx.queue.as_ref(),
                    &summary.call_id,
                    None,
                    &events,
                    None,
                ));
                if let Err(e) = recorded.await {
                    tracing::warn!(call_id = %summary.call_id, error = %e, "could not record the dead letter on the call");
                }
            }
            return None;
        }
    };
    Some((call, lease, permit))
}

async fn handle<Q: CallQueue>(
    ctx: Arc<Ctx<Q>>,
    lease: Lease<Q::Delivery>,
    permit: OwnedSemaphorePermit,
) {
    // Opened in a boxed future of its own, the job built in a block: each call in flight
    // holds this future at its largest size, which then has no copy of the call beside the
    // job's and none of the opening's states (the store's open and read are kilobytes).
    let (mut job, lease, permit, delivery, span) = {
        let Some((call, lease, permit)) = Box::pin(open_call(&ctx, lease, permit)).await else {
            return;
        };
        let delivery = lease.delivery().attempt();
        let function = call.meta.qualified_function();
        let span = tracing::info_span!(
            "call",
            call_id = %call.meta.call_id,
            function = %function,
            delivered = delivery,
        );
        let job = Job {
            label: metrics::function_label(&function),
            function,
            ctx: &ctx,
            call,
            record: None,
            tries: None,
        };
        (job, lease, permit, delivery, span)
    };
    job.run(lease, delivery, permit).instrument(span).await;
}

/// One call being handled: the call, its canonical function name, its metric label (both
/// computed once) and the record this worker last wrote for it.
struct Job<'a, Q: CallQueue> {
    ctx: &'a Ctx<Q>,
    call: QueuedCall,
    function: String,
    label: String,
    /// The record as this worker last wrote it: the next write starts from it.
    record: Option<OwnedRecord>,
    /// The attempt running or last run (from 1) and the attempts allowed: the callback's
    /// `X-Retry` and `X-Retry-Max`.
    tries: Option<(u32, u32)>,
}

impl<Q: CallQueue> Job<'_, Q> {
    fn call_id(&self) -> &str {
        &self.call.meta.call_id
    }

    async fn run(
        &mut self,
        lease: Lease<Q::Delivery>,
        delivery: u32,
        permit: OwnedSemaphorePermit,
    ) {
        let ctx = self.ctx;
        let Some(permit) = Box::pin(hold_while_paused(ctx, &self.function, permit)).await else {
            return lease.hand_back().await;
        };
        // Held while this process handles the call, so a redelivery racing it waits.
        let claim = ctx.running.claim(self.call_id());
        let seen = match claim {
            // Running here: what the store says does not matter to the plan.
            None => Seen::New,
            Some(_) => match ctx.store.lookup(&self.function, self.call_id()) {
                Ok(seen) => seen,
                Err(e) => {
                    tracing::error!(error = %e, "state store failed; handing the call back");
                    return lease.nak(Some(LOCAL_FAILURE_RETRY)).await;
                }
            },
        };
        let settings = ctx.functions.for_call(&self.call.meta);
        // A scheduled call ages from its time, not from its acceptance.
        let age = Duration::from_nanos(
            queue_core::unix_nanos_now().saturating_sub(self.call.meta.due_at_unix_nanos()),
        );
        match plan(
            seen,
            claim.is_none(),
            delivery,
            settings.retry.max_attempts,
            age,
            settings.max_age,
        ) {
            Plan::AlreadyDone => {
                tracing::info!("redelivered call already finished; acking without invoking");
                lease.ack().await;
            }
            Plan::RunningHere => {
                drop(permit);
                tracing::debug!("redelivery of a call running here; offering it again later");
                lease.nak(Some(ctx.config.ack_wait)).await;
            }
            Plan::SendStored {
                outcome,
                attempts,
                generation,
            } => {
                drop(permit);
                tracing::info!("redelivered call already completed; delivering its callback only");
                // Replayed from the dedup entry: kept if it was within the limit when the
                // attempt ended (a failed record write then is not known here).
                let kept = outcome
                    .stored
                    .as_ref()
                    .is_none_or(|stored| stored.len <= ctx.queue.max_stored_result_bytes());
                Box::pin(self.deliver(lease, &outcome, attempts, Some(generation), kept)).await;
            }
            Plan::Expire { attempts } => {
                drop(permit);
                let detail = format!("older than the maximum age of {:?}", settings.max_age);
                Box::pin(self.give_up(
                    lease,
                    DeadLetterReason::Expired,
                    &detail,
                    no_response(504, "expired"),
                    attempts,
                ))
                .await;
            }
            Plan::Exhausted { attempts } => {
                drop(permit);
                let detail = format!("{attempts} attempts, the last lost with its worker");
                Box::pin(self.give_up(
                    lease,
                    DeadLetterReason::RetriesExhausted,
                    &detail,
                    no_response(503, EXHAUSTED_BY_REDELIVERY),
                    attempts,
                ))
                .await;
            }
            Plan::Invoke { attempt } => {
                // `plan` invokes only what this process claimed; without a claim it said
                // RunningHere, so the `None` arm only keeps the match total.
                let Some(claim) = &claim else {
                    return lease.nak(Some(ctx.config.ack_wait)).await;
                };
                // The function's own slot; a full function waits without the permit.
                let admission = ctx.limits.admit(
                    &self.function,
                    &self.label,
                    settings.max_concurrency,
                    permit,
                    &ctx.permits,
                    &ctx.hand_back,
                    &claim.cancel,
                );
                let (permit, slot) = match Box::pin(admission).await {
                    Admission::Run(permit, slot) => (permit, slot),
                    Admission::HandBack => return lease.hand_back().await,
                    Admission::Cancelled => {
                        return Box::pin(self.cancelled(lease, attempt - 1)).await;
                    }
                };
                // Held for its function's slot, the call may have grown too old to start.
                let age = Duration::from_nanos(
                    queue_core::unix_nanos_now()
                        .saturating_sub(self.call.meta.received_at_unix_nanos),
                );
                if age > settings.max_age {
                    drop((permit, slot));
                    let detail = format!("older than the maximum age of {:?}", settings.max_age);
                    return Box::pin(self.give_up(
                        lease,
                        DeadLetterReason::Expired,
                        &detail,
                        no_response(504, "expired"),
                        attempt - 1,
                    ))
                    .await;
                }
                // Boxed, like the other branches: a task's memory is its largest state, and
                // with thousands of long calls in flight the per-call task is most of the
                // worker's memory.
                Box::pin(self.invoke(lease, attempt, (permit, slot), claim, &settings)).await;
            }
        }
        drop(claim);
    }

    /// Writes `events` to the call's record, from what this worker last wrote (or the
    /// revision the gateway put in the envelope): one round trip unless someone else wrote
    /// in between. A failure is logged, never fails the call: the queue and the dedup state
    /// carry the guarantees, the record is for visibility.
    async fn note(
        &mut self,
        events: &[Event],
        result: Option<bytes::Bytes>,
    ) -> Option<&CallRecord> {
        let known = self.record.take().or_else(|| {
            let meta = &self.call.meta;
            meta.record_revision.map(|revision| {
                OwnedRecord::accepted(
                    &meta.call_id,
                    &self.function,
                    meta.received_at_unix_nanos,
                    meta.callback_url.is_some(),
                    meta.not_before_unix_nanos,
                    revision,
                )
            })
        });
        // In turn: the boxed write below is made only once a slot is free (never closed).
        let _slot = self.ctx.record_writes.acquire().await.ok();
        // Boxed: the record write's future is large and lives only for a round trip.
        match Box::pin(apply_event(
            self.ctx.queue.as_ref(),
            self.call_id(),
            known,
            events,
            result,
        ))
        .await
        {
            Ok(owned) => {
                self.record = Some(owned);
                self.record.as_ref().map(|o| &o.record)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not update the call record");
                None
            }
        }
    }

    fn cancelled_in_record(&self) -> bool {
        self.record
            .as_ref()
            .is_some_and(|o| o.record.state == CallState::Cancelled)
    }

    async fn invoke(
        &mut self,
        lease: Lease<Q::Delivery>,
        attempt: u32,
        (permit, slot): (OwnedSemaphorePermit, Slot),
        claim: &Claim<'_>,
        settings: &CallSettings,
    ) {
        let ctx = self.ctx;
        let max = settings.retry.max_attempts;
        tracing::debug!(attempt, max, "invoking");
        self.tries = Some((attempt, max));
        let started = Event::AttemptStarted {
            function: self.function.clone(),
            attempt,
            at: queue_core::unix_nanos_now(),
            accepted_at: self.call.meta.received_at_unix_nanos,
            limits: Some(CallLimits {
                max_attempts: max,
                timeout_ms: u64::try_from(settings.timeout.as_millis()).unwrap_or(u64::MAX),
                max_age_ms: u64::try_from(settings.max_age.as_millis()).unwrap_or(u64::MAX),
            }),
        };
        self.note(std::slice::from_ref(&started), None).await;
        if self.record.is_none()
            && self.call.meta.record_revision == Some(queue_core::backend::NOT_STORED)
        {
            // Queued without a record: the call must not run (and be acked) before one is
            // written, or `GET` would not know it afterwards. The records store is electing a
            // leader or out of reach: wait for it, the lease keeping the delivery, then run it
            // anyway rather than hold it back for good (its later writes create the record).
            let give_up_at = tokio::time::Instant::now() + RECORD_WAIT;
            let mut delay = Duration::from_millis(100);
            while self.record.is_none() && tokio::time::Instant::now() < give_up_at {
                tokio::select! {
                    () = ctx.hand_back.cancelled() => return lease.hand_back().await,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                self.note(std::slice::from_ref(&started), None).await;
            }
        }
        if self.cancelled_in_record() {
            drop((permit, slot));
            return Box::pin(self.cancelled(lease, attempt - 1)).await;
        }
        if attempt == 1 {
            ::metrics::histogram!(metrics::QUEUE_WAIT_SECONDS, "function" => self.label.clone())
                .record(metrics::seconds_since(self.call.meta.due_at_unix_nanos()));
        }
        let in_flight = InFlight::start(&self.label);
        let outcome = tokio::select! {
            o = ctx.invoker.invoke(&self.call, attempt, max, settings.timeout) => o,
            () = claim.cancel.cancelled() => {
                tracing::info!("cancelled while running: invocation aborted");
                drop((permit, slot));
                let aborted = no_response(CANCELLED_STATUS, CANCELLED);
                self.note(&[attempt_ended(attempt, &aborted, CallState::Cancelled, None)], None).await;
                return Box::pin(self.cancelled(lease, attempt)).await;
            }
            () = ctx.hand_back.cancelled() => {
                tracing::warn!("shutdown: abandoning the running call and handing it back");
                return lease.hand_back().await;
            }
        };
        drop(in_flight);
        drop(permit);
        if self.label == "other" {
            // A function that answered has a label of its own now (see `metrics::note_answered`).
            self.label = metrics::function_label(&self.function);
        }
        slot.finish(&outcome, &self.label);
        ::metrics::histogram!(metrics::FUNCTION_SECONDS, "function" => self.label.clone())
            .record(outcome.duration.as_secs_f64());
        // The success path logs at debug: at thousands of calls a second, a line per call
        // costs more than the rest of its handling; failures, retries and dead letters log at
        // info and above, and the metrics count every call.
        tracing::debug!(
            status = outcome.status,
            duration_ms = u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
            error = outcome.error.as_deref(),
            attempt,
            "function returned"
        );
        match settings.retry.decide(attempt, &outcome) {
            Decision::Final => {
                let next = if (200..300).contains(&outcome.status) {
                    CallState::Succeeded
                } else {
                    CallState::Failed
                };
                let kept = Box::pin(self.note_final(attempt, &outcome, next)).await;
                if self.cancelled_in_record() {
                    // Cancelled while it ran and the announcement did not reach us: nobody
                    // reads its response (a cancelled call serves no result).
                    if let Some(stored) = &outcome.stored {
                        ctx.invoker.discard_stored(stored).await;
                    }
                    return Box::pin(self.cancelled(lease, attempt)).await;
                }
                let generation = match ctx
                    .store
                    .complete(&self.function, self.call_id(), attempt, &outcome)
                    .await
                {
                    Ok(generation) => Some(generation),
                    Err(e) => {
                        // The function ran. Handing the message back would run it again for
                        // sure; going on without the entry only risks that if we also crash
                        // before the ack.
                        tracing::error!(error = %e, "could not store the outcome; delivering without it");
                        None
                    }
                };
                if ctx.config.fault_crash_after_store {
                    tracing::error!("fault injection: aborting after storing the outcome");
                    std::process::abort();
                }
                Box::pin(self.deliver(lease, &outcome, attempt, generation, kept)).await;
            }
            Decision::RetryAfter(wait) => {
                self.note(
                    &[attempt_ended(attempt, &outcome, CallState::Retrying, None)],
                    None,
                )
                .await;
                // Not kept (only final answers are); the next attempt answers anew.
                if let Some(stored) = &outcome.stored {
                    ctx.invoker.discard_stored(stored).await;
                }
                if self.cancelled_in_record() {
                    return Box::pin(self.cancelled(lease, attempt)).await;
                }
                tracing::info!(retry_in = ?wait, "retryable failure; scheduling the next attempt");
                ::metrics::counter!(metrics::RETRIES, "function" => self.label.clone())
                    .increment(1);
                lease.nak(Some(wait)).await;
            }
            Decision::Exhausted => {
                self.note(
                    &[attempt_ended(attempt, &outcome, CallState::Failed, None)],
                    None,
                )
                .await;
                if self.cancelled_in_record() {
                    if let Some(stored) = &outcome.stored {
                        ctx.invoker.discard_stored(stored).await;
                    }
                    return Box::pin(self.cancelled(lease, attempt)).await;
                }
                let detail = format!("{attempt} attempts, last status {}", outcome.status);
                let stored = outcome.stored.clone();
                Box::pin(self.give_up(
                    lease,
                    DeadLetterReason::RetriesExhausted,
                    &detail,
                    outcome,
                    attempt,
                ))
                .await;
                // Not kept (only final answers are): sent with the last callback, then gone.
                if let Some(stored) = &stored {
                    ctx.invoker.discard_stored(stored).await;
                }
            }
        }
    }

    /// Records the end of the final attempt and keeps its response for the result endpoint
    /// when it fits: one write for both.
    /// Returns whether the record now names the response's blob (a response in the blob store
    /// that is not is deleted once its callback is done).
    async fn note_final(&mut self, attempt: u32, outcome: &Outcome, next: CallState) -> bool {
        let limit = self.ctx.queue.max_result_bytes();
        if let Some(stored) = &outcome.stored
            && stored.len > self.ctx.queue.max_stored_result_bytes()
        {
            // Sent to the callback from the store, not kept (the blob goes after the callback).
            tracing::info!(
                result_bytes = stored.len,
                limit = self.ctx.queue.max_stored_result_bytes(),
                "result too large to keep"
            );
            let ended = attempt_ended(attempt, outcome, next, Some(ResultAvailability::TooLarge));
            self.note(&[ended], None).await;
            return false;
        }
        let (kept, availability) = match StoredResult::encode_parts(
            outcome.status,
            &outcome.headers,
            &outcome.body,
            outcome.stored.as_ref(),
        ) {
            Ok(encoded) if encoded.len() <= limit => (
                Some(bytes::Bytes::from(encoded)),
                Some(ResultAvailability::Stored),
            ),
            Ok(encoded) => {
                tracing::info!(
                    result_bytes = encoded.len(),
                    limit,
                    "result too large to keep"
                );
                (None, Some(ResultAvailability::TooLarge))
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not encode the result");
                (None, None)
            }
        };
        let ended = attempt_ended(attempt, outcome, next, availability);
        let had_result = kept.is_some();
        if self
            .note(std::slice::from_ref(&ended), kept)
            .await
            .is_none()
        {
            if had_result {
                // Perhaps only the result could not be kept: record the end without it.
                let ended = attempt_ended(attempt, outcome, next, None);
                self.note(&[ended], None).await;
            }
            return false;
        }
        had_result
    }

    /// Delivers the callback (if any), records it, marks the call done and acks. A callback
    /// that cannot be delivered dead-letters the call.
    async fn deliver(
        &mut self,
        lease: Lease<Q::Delivery>,
        outcome: &Outcome,
        attempts: u32,
        generation: Option<Generation>,
        kept: bool,
    ) {
        let ctx = self.ctx;
        // A stored response the record does not name is read only by the callback.
        let unkept = outcome.stored.as_ref().filter(|_| !kept);
        if let Some(url) = self.call.meta.callback_url.clone() {
            let delivery = self.send_callback(&url, outcome, None).await;
            let Some(entry) = callback_entry(&delivery) else {
                tracing::warn!(
                    "shutdown: callback pending; handing the call back (the result is kept)"
                );
                return lease.hand_back().await;
            };
            if let Delivery::GaveUp {
                reason,
                attempts: tries,
                dead_letter: why,
            } = delivery
            {
                tracing::error!(%reason, callback_attempts = tries, "callback not delivered; dead-lettering the call");
                let gave_up = self.gave_up(CallState::DeadLettered, why);
                self.note(&[entry, gave_up], None).await;
                if let Err(e) = ctx.store.forget(&self.function, self.call_id()) {
                    tracing::warn!(error = %e, "could not forget the call");
                }
                self.count_dead_letter(why, Some(outcome.status)).await;
                let detail = format!("callback: {reason}");
                let subject = lease.delivery().subject().to_owned();
                let letter = self.letter(
                    lease.delivery(),
                    &subject,
                    why,
                    &detail,
                    Some(outcome.status),
                    attempts,
                );
                lease
                    .dead_letter(ctx.queue.as_ref(), &letter, LOCAL_FAILURE_RETRY)
                    .await;
                if let Some(stored) = unkept {
                    ctx.invoker.discard_stored(stored).await;
                }
                return;
            }
            tracing::debug!(?delivery, "callback delivered");
            self.note(&[entry], None).await;
        }
        let result = if (200..300).contains(&outcome.status) {
            "succeeded"
        } else {
            "failed"
        };
        self.finalize(result, Some(outcome.status), None).await;
        if let Err(e) = ctx
            .store
            .finish(&self.function, self.call_id(), attempts, generation)
        {
            tracing::warn!(error = %e, "could not mark the call done");
        }
        lease.ack().await;
        if let Some(stored) = unkept {
            ctx.invoker.discard_stored(stored).await;
        }
    }

    /// The call was cancelled: it is not run (again); its callback, if any, says so with
    /// `X-Call-State: cancelled`; then it is marked done and acked.
    async fn cancelled(&mut self, lease: Lease<Q::Delivery>, attempts: u32) {
        tracing::info!("call cancelled; not running it (again)");
        self.finalize("cancelled", None, None).await;
        if let Some(url) = self.call.meta.callback_url.clone() {
            let outcome = no_response(CANCELLED_STATUS, CANCELLED);
            let delivery = self.send_callback(&url, &outcome, None).await;
            let Some(entry) = callback_entry(&delivery) else {
                return lease.hand_back().await;
            };
            if let Delivery::GaveUp { reason, .. } = &delivery {
                tracing::warn!(%reason, "cancel callback not delivered");
            }
            self.note(&[entry], None).await;
        }
        if let Err(e) = self
            .ctx
            .store
            .finish(&self.function, self.call_id(), attempts, None)
        {
            tracing::warn!(error = %e, "could not mark the call done");
        }
        lease.ack().await;
    }

    /// The call failed for good: dead-letter it (keeping the request), send the final
    /// callback (marked with `X-Dead-Letter-Reason`), forget it so a replay runs it again,
    /// then ack.
    async fn give_up(
        &mut self,
        lease: Lease<Q::Delivery>,
        reason: DeadLetterReason,
        detail: &str,
        outcome: Outcome,
        attempts: u32,
    ) {
        let ctx = self.ctx;
        // A synthesized outcome (no attempt ran in this delivery) has no real last status.
        let last_status = outcome
            .error
            .as_deref()
            .is_none_or(|e| e != EXHAUSTED_BY_REDELIVERY && e != "expired")
            .then_some(outcome.status);
        tracing::warn!(
            reason = reason.as_str(),
            attempts,
            last_status,
            "dead-lettering the call"
        );
        let subject = lease.delivery().subject().to_owned();
        let letter = self.letter(
            lease.delivery(),
            &subject,
            reason,
            detail,
            last_status,
            attempts,
        );
        if let Err(e) = ctx
            .queue
            .dead_letter(lease.delivery().payload().clone(), &letter)
            .await
        {
            tracing::error!(error = %e, "dead-letter publish failed; retrying later");
            return lease.nak(Some(LOCAL_FAILURE_RETRY)).await;
        }
        let state = if reason == DeadLetterReason::Expired {
            CallState::Expired
        } else {
            CallState::DeadLettered
        };
        let gave_up = self.gave_up(state, reason);
        self.note(&[gave_up], None).await;
        self.count_dead_letter(reason, last_status).await;
        if let Some(url) = self.call.meta.callback_url.clone() {
            let delivery = self
                .send_callback(&url, &outcome, Some(reason.as_str()))
                .await;
            // Interrupted: the redelivery dead-letters again (stored once) and retries the
            // callback.
            let Some(entry) = callback_entry(&delivery) else {
                return lease.hand_back().await;
            };
            if let Delivery::GaveUp { reason, .. } = &delivery {
                tracing::error!(%reason, "final callback not delivered (the call is in the dead-letter stream)");
            } else {
                tracing::info!(?delivery, "final callback delivered");
            }
            self.note(&[entry], None).await;
        }
        if let Err(e) = ctx.store.forget(&self.function, self.call_id()) {
            tracing::warn!(error = %e, "could not forget the call");
        }
        lease.ack().await;
    }

    /// The dead-letter record of this call's delivery (`subject`: the delivery's, owned by the
    /// caller so the record can outlive the borrow of the lease).
    fn letter<'b>(
        &'b self,
        delivery: &Q::Delivery,
        subject: &'b str,
        reason: DeadLetterReason,
        detail: &'b str,
        last_status: Option<u16>,
        attempts: u32,
    ) -> DeadLetter<'b> {
        DeadLetter {
            reason,
            detail,
            original_subject: subject,
            stream_sequence: delivery.sequence(),
            call_id: Some(self.call_id()),
            received_at_unix_nanos: Some(self.call.meta.received_at_unix_nanos),
            last_status,
            attempts,
        }
    }

    fn gave_up(&self, state: CallState, reason: DeadLetterReason) -> Event {
        Event::GaveUp {
            state,
            reason: Some(reason.as_str().to_owned()),
            function: self.function.clone(),
            accepted_at: self.call.meta.received_at_unix_nanos,
        }
    }

    /// Delivers a callback, counting and timing it.
    async fn send_callback(
        &self,
        url: &str,
        outcome: &Outcome,
        final_reason: Option<&str>,
    ) -> Delivery {
        let ctx = self.ctx;
        let started = std::time::Instant::now();
        let delivery = ctx
            .callbacks
            .deliver(
                url,
                &self.call.meta,
                outcome,
                final_reason,
                self.tries,
                &ctx.hand_back,
            )
            .await;
        let result = match &delivery {
            Delivery::Delivered { .. } => "delivered",
            Delivery::GaveUp { .. } => "failed",
            Delivery::Interrupted => return delivery,
        };
        ::metrics::counter!(metrics::CALLBACKS, "function" => self.label.clone(), "outcome" => result)
            .increment(1);
        ::metrics::histogram!(metrics::CALLBACK_SECONDS, "function" => self.label.clone())
            .record(started.elapsed().as_secs_f64());
        delivery
    }

    /// Counts a dead letter of a decoded call.
    async fn count_dead_letter(&self, reason: DeadLetterReason, last_status: Option<u16>) {
        ::metrics::counter!(metrics::DEAD_LETTERS, "function" => self.label.clone(), "reason" => reason.as_str())
            .increment(1);
        if reason == DeadLetterReason::Expired {
            ::metrics::counter!(metrics::EXPIRED, "function" => self.label.clone()).increment(1);
            self.finalize("expired", None, Some(reason.as_str())).await;
        } else {
            self.finalize("dead_lettered", last_status, Some(reason.as_str()))
                .await;
        }
    }

    /// Counts a call's final outcome and its end-to-end time, and announces it to the
    /// gateways' live statistics (one-way).
    async fn finalize(&self, outcome: &'static str, status: Option<u16>, reason: Option<&str>) {
        let end_to_end = metrics::seconds_since(self.call.meta.received_at_unix_nanos);
        ::metrics::counter!(metrics::PROCESSED, "function" => self.label.clone(), "outcome" => outcome)
            .increment(1);
        ::metrics::counter!(metrics::PRO_PROCESSED, "queue_name" => metrics::pro_queue_name())
            .increment(1);
        ::metrics::histogram!(metrics::END_TO_END_SECONDS, "function" => self.label.clone())
            .record(end_to_end);
        let event = OutcomeEvent {
            call_id: self.call.meta.call_id.clone(),
            function: self.function.clone(),
            outcome: outcome.to_owned(),
            at: queue_core::unix_nanos_now(),
            end_to_end_seconds: end_to_end,
            status,
            reason: reason.map(str::to_owned),
        };
        self.ctx.queue.announce_outcome(&event).await;
    }
}

/// Counts a function invocation as in flight while it lives (ours and OpenFaaS Pro's series).
struct InFlight(::metrics::Gauge, ::metrics::Gauge);

impl InFlight {
    fn start(label: &str) -> Self {
        let ours = ::metrics::gauge!(metrics::IN_FLIGHT, "function" => label.to_owned());
        let pro = ::metrics::gauge!(
            metrics::PRO_INFLIGHT,
            "queue_name" => metrics::pro_queue_name(),
            "function_name" => metrics::pro_function_name(label)
        );
        ours.increment(1.0);
        pro.increment(1.0);
        Self(ours, pro)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
        self.1.decrement(1.0);
    }
}

/// `X-Function-Status` of a cancelled call's callback (no function answer; the convention for
/// a request the client abandoned).
const CANCELLED_STATUS: u16 = 499;
/// `X-Function-Error` of a cancelled call's callback (which then says `X-Call-State: cancelled`).
const CANCELLED: &str = crate::callback::CANCELLED;

fn attempt_ended(
    attempt: u32,
    outcome: &Outcome,
    next: CallState,
    result: Option<ResultAvailability>,
) -> Event {
    Event::AttemptEnded {
        attempt,
        status: outcome.status,
        duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
        error: outcome.error.clone(),
        next,
        result,
    }
}

/// The record entry of a callback that ended; `None` when shutdown interrupted it (the
/// delivery is handed back).
fn callback_entry(delivery: &Delivery) -> Option<Event> {
    match delivery {
        Delivery::Delivered { status, attempts } => Some(callback_event(*status, *attempts, None)),
        Delivery::GaveUp {
            reason, attempts, ..
        } => Some(callback_event(0, *attempts, Some(reason))),
        Delivery::Interrupted => None,
    }
}

fn callback_event(status: u16, attempts: u32, error: Option<&str>) -> Event {
    Event::Callback(CallbackEntry {
        at: queue_core::unix_nanos_now(),
        status: (status != 0).then_some(status),
        attempts,
        delivered: error.is_none(),
        error: error.map(str::to_owned),
    })
}

fn no_response(status: u16, error: &str) -> Outcome {
    Outcome {
        status,
        headers: Vec::new(),
        body: bytes::Bytes::new(),
        stored: None,
        duration: Duration::ZERO,
        error: Some(error.to_owned()),
    }
}

/// Poll interval of a call held because its function is paused.
const PAUSE_POLL: Duration = Duration::from_millis(500);

/// The paused functions, kept current by a watch on the backend (no read per call).
#[derive(Debug, Default)]
struct PausedCache {
    /// `None` until the watch delivered the list (then a call reads it directly).
    list: std::sync::RwLock<Option<std::collections::HashSet<String>>>,
}

impl PausedCache {
    fn set(&self, list: Option<Vec<String>>) {
        *self
            .list
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            list.map(|l| l.into_iter().collect());
    }

    fn get(&self, function: &str) -> Option<bool> {
        self.list
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|l| l.contains(function))
    }
}

/// Keeps `ctx.paused` current until `stop` fires; while the watch is lost, calls read the
/// list directly.
async fn follow_paused<Q: CallQueue>(ctx: Arc<Ctx<Q>>, stop: CancellationToken) {
    follow(
        || ctx.queue.paused_updates(),
        |list| ctx.paused.set(Some(list)),
        || ctx.paused.set(None),
        "paused functions",
        &stop,
    )
    .await;
}

async fn is_paused<Q: CallQueue>(ctx: &Ctx<Q>, function: &str) -> bool {
    if let Some(paused) = ctx.paused.get(function) {
        return paused;
    }
    match ctx.queue.paused_functions().await {
        Ok(paused) => paused.iter().any(|f| f == function),
        Err(e) => {
            tracing::debug!(error = %e, "paused functions unknown; not holding");
            false
        }
    }
}

/// While the call's function is paused, holds the call (its delivery kept alive by its lease,
/// its delivery count unchanged) without a concurrency permit; returns a permit once resumed,
/// or `None` when shutdown hands the call back.
async fn hold_while_paused<Q: CallQueue>(
    ctx: &Ctx<Q>,
    function: &str,
    permit: OwnedSemaphorePermit,
) -> Option<OwnedSemaphorePermit> {
    if !is_paused(ctx, function).await {
        return Some(permit);
    }
    drop(permit);
    tracing::info!("function paused; holding the call");
    loop {
        tokio::select! {
            () = tokio::time::sleep(PAUSE_POLL) => {}
            () = ctx.hand_back.cancelled() => return None,
        }
        if !is_paused(ctx, function).await {
            break;
        }
    }
    tracing::info!("function resumed; running the call");
    tokio::select! {
        p = ctx.permits.clone().acquire_owned() => p.ok(),
        () = ctx.hand_back.cancelled() => None,
    }
}

async fn sweep_expired(store: CallStore, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
            () = stop.cancelled() => return,
        }
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.sweep_expired()).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(removed = n, "expired call records swept"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping expired call records failed"),
            Err(e) => tracing::warn!(error = %e, "sweep task failed"),
        }
    }
}

/// Exponential wait between reconnect attempts; never a busy loop.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }
    fn reset(&mut self) {
        self.next = self.initial;
    }
    fn peek(&self) -> Duration {
        self.next
    }
    async fn wait(&mut self, stop: &CancellationToken) {
        tokio::select! {
            () = tokio::time::sleep(self.next) => {}
            () = stop.cancelled() => {}
        }
        self.next = (self.next * 2).min(self.max);
    }
}
