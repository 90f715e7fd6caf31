//! The pull loop and the life of one message.
//!
//! Pull loop: take a concurrency permit *before* pulling, then ask the queue for at most as many
//! messages as permits are held, so no message waits in a local buffer with its ack clock running.
//!
//! One message: decode (undecodable → dead letter) → consult the dedup state → invoke the
//! function (in-progress heartbeats keep the message alive) → store the outcome durably →
//! release the permit → deliver the callback (retrying only the callback) → mark done → ack.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::callback::{CallbackSender, Delivery};
use crate::config::WorkerConfig;
use crate::functions::FunctionSettings;
use crate::invoke::{FunctionInvoker, Outcome, http_client};
use crate::retry::Decision;
use crate::state::{Begin, CallStore, StateError};
use queue_core::backend::jetstream::{ConsumerOptions, JetStreamOptions, JetStreamQueue};
use queue_core::backend::{CallQueue, DeadLetter, DeadLetterReason, QueueDelivery};
use queue_core::message::QueuedCall;
use queue_core::metrics;
use queue_core::records::{
    CallRecord, CallState, CallbackEntry, Event, OutcomeEvent, ResultAvailability, StoredResult,
};

/// Largest pull request, whatever the number of free permits.
const MAX_PULL_BATCH: usize = 256;
/// `X-Function-Error` of a call dead-lettered because its deliveries ran out before an attempt
/// could finish (workers died during it).
const EXHAUSTED_BY_REDELIVERY: &str = "attempts used up by redeliveries";
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
}

/// Everything a message handler needs, shared by all handlers.
#[derive(Debug)]
struct Ctx<Q> {
    config: WorkerConfig,
    queue: Arc<Q>,
    store: CallStore,
    invoker: FunctionInvoker,
    callbacks: CallbackSender,
    /// Fires when the shutdown grace period is over: running calls are handed back.
    hand_back: CancellationToken,
    /// Retry policy, timeout and max age per function.
    functions: FunctionSettings,
    /// Calls being invoked here, to abort on a cancel.
    running: RunningCalls,
    /// One per concurrent invocation (`max_inflight`).
    permits: Arc<Semaphore>,
}

/// Cancel tokens of the calls this worker is invoking.
#[derive(Debug, Default)]
struct RunningCalls(std::sync::Mutex<std::collections::HashMap<String, CancellationToken>>);

impl RunningCalls {
    fn calls(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, CancellationToken>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(&self, call_id: &str) -> CancellationToken {
        let token = CancellationToken::new();
        self.calls().insert(call_id.to_owned(), token.clone());
        token
    }

    fn remove(&self, call_id: &str) {
        self.calls().remove(call_id);
    }

    fn cancel(&self, call_id: &str) {
        if let Some(token) = self.calls().get(call_id) {
            token.cancel();
        }
    }
}

/// Aborts running invocations of calls announced as cancelled, until `stop` fires.
async fn listen_for_cancels<Q: CallQueue>(ctx: Arc<Ctx<Q>>, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    while !stop.is_cancelled() {
        let mut announced = match ctx.queue.cancellations().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for cancels; retrying");
                backoff.wait(&stop).await;
                continue;
            }
        };
        backoff.reset();
        loop {
            let next = tokio::select! {
                n = announced.next() => n,
                () = stop.cancelled() => return,
            };
            match next {
                Some(call_id) => ctx.running.cancel(&call_id),
                None => break,
            }
        }
    }
}

/// Runs a worker on JetStream until `shutdown` completes, then drains: no new pulls, in-flight
/// calls get `shutdown_grace` to finish, the rest are handed back to the queue (nak).
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    config.validate().map_err(WorkerError::Config)?;
    let options = JetStreamOptions {
        nats: config.nats.clone(),
        // The gateway creates the streams; the worker binds to them.
        manage_streams: None,
        consumer: Some(ConsumerOptions {
            name: config.consumer.clone(),
            ack_wait: config.ack_wait,
            max_ack_pending: config.max_ack_pending,
        }),
        records: config.records.clone(),
    };
    let queue = JetStreamQueue::connect(options, "queue-worker", CancellationToken::new()).await?;
    let metrics_stop = CancellationToken::new();
    serve_metrics(config.metrics_listen, queue.clone(), metrics_stop.clone()).await;
    let result = run_on(config, queue, shutdown).await;
    metrics_stop.cancel();
    result
}

/// Serves `/metrics` on `address` in the background until `stop` fires. A taken port is
/// logged, not fatal: the worker's job is the calls.
pub async fn serve_metrics<Q: CallQueue>(
    address: std::net::SocketAddr,
    queue: Arc<Q>,
    stop: CancellationToken,
) {
    let handle = metrics::install();
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            tracing::info!(listen = ?listener.local_addr().ok(), "metrics at /metrics");
            tokio::spawn(async move {
                if let Err(e) = crate::endpoint::serve(listener, handle, queue, stop).await {
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
    config.validate().map_err(WorkerError::Config)?;
    let functions =
        FunctionSettings::load(&config).map_err(|e| WorkerError::Config(e.to_string()))?;
    let store = {
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
    let http = http_client(concat!("queue-worker/", env!("CARGO_PKG_VERSION")))?;

    let stop_pulling = CancellationToken::new();
    let ctx = Arc::new(Ctx {
        invoker: FunctionInvoker::new(&config, http.clone()),
        callbacks: CallbackSender::new(&config, http),
        queue,
        store,
        hand_back: CancellationToken::new(),
        functions,
        running: RunningCalls::default(),
        permits: Arc::new(Semaphore::new(config.max_inflight as usize)),
        config,
    });
    {
        let stop = stop_pulling.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    let sweeper = tokio::spawn(sweep_expired(ctx.store.clone(), stop_pulling.clone()));
    let cancel_listener = tokio::spawn(listen_for_cancels(ctx.clone(), stop_pulling.clone()));

    tracing::info!(
        consumer = %ctx.config.consumer,
        max_inflight = ctx.config.max_inflight,
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
    sweeper.abort();
    cancel_listener.abort();
    ctx.queue.flush_before_exit().await;
    if let Err(e) = ctx.store.flush().await {
        tracing::warn!(error = %e, "could not flush state at shutdown");
    }
    tracing::info!("queue-worker stopped");
    Ok(())
}

/// Pulls until `stop` fires; returns the handlers still running.
async fn pull_loop<Q: CallQueue>(ctx: &Arc<Ctx<Q>>, stop: &CancellationToken) -> JoinSet<()> {
    let permits = ctx.permits.clone();
    let mut tasks = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    while !stop.is_cancelled() {
        while tasks.try_join_next().is_some() {}
        let first = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let mut held = vec![first];
        while held.len() < MAX_PULL_BATCH {
            match permits.clone().try_acquire_owned() {
                Ok(p) => held.push(p),
                Err(_) => break,
            }
        }
        let batch = ctx.queue.pull(held.len(), ctx.config.pull_expires);
        let mut batch = tokio::select! {
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
        loop {
            let next = tokio::select! {
                n = batch.next() => n,
                () = stop.cancelled() => None,
            };
            match next {
                None => break,
                Some(Ok(msg)) => {
                    backoff.reset();
                    let Some(permit) = held.pop() else {
                        // The queue sent more than asked; hand it straight back.
                        nak(&msg, None).await;
                        continue;
                    };
                    tasks.spawn(handle(ctx.clone(), msg, permit));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull failed");
                    backoff.wait(stop).await;
                    break;
                }
            }
        }
    }
    tasks
}

/// Sends in-progress acks while a message is being handled so JetStream does not redeliver
/// it, however long the function runs. Stops when dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start<D: QueueDelivery>(msg: &D, every: Duration) -> Self {
        let msg = msg.clone();
        Self(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = msg.in_progress().await {
                    tracing::warn!(error = %e, "in-progress ack failed");
                }
            }
        }))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn handle<Q: CallQueue>(ctx: Arc<Ctx<Q>>, msg: Q::Delivery, permit: OwnedSemaphorePermit) {
    let call = match QueuedCall::decode(msg.payload()) {
        Ok(mut call) => {
            call.meta.canonicalize(&ctx.config.default_namespace);
            call
        }
        Err(e) => {
            drop(permit);
            let detail = e.to_string();
            let letter = letter_for(&msg, DeadLetterReason::Undecodable, &detail, None, None, 0);
            ::metrics::counter!(metrics::DEAD_LETTERS, "function" => "unknown", "reason" => "undecodable")
                .increment(1);
            return dead_letter_and_ack(&ctx, &msg, &letter).await;
        }
    };
    let attempt = msg.attempt();
    let span = tracing::info_span!(
        "call",
        call_id = %call.meta.call_id,
        function = %call.meta.qualified_function(),
        delivered = attempt,
    );
    handle_call(ctx, msg, call, attempt, permit)
        .instrument(span)
        .await;
}

/// The dead-letter record for this message.
fn letter_for<'a, D: QueueDelivery>(
    msg: &'a D,
    reason: DeadLetterReason,
    detail: &'a str,
    call: Option<&'a QueuedCall>,
    last_status: Option<u16>,
    attempts: u32,
) -> DeadLetter<'a> {
    DeadLetter {
        reason,
        detail,
        original_subject: msg.subject(),
        stream_sequence: msg.sequence(),
        call_id: call.map(|c| c.meta.call_id.as_str()),
        received_at_unix_nanos: call.map(|c| c.meta.received_at_unix_nanos),
        last_status,
        attempts,
    }
}

fn is_expired(call: &QueuedCall, max_age: Duration) -> bool {
    let age_nanos = queue_core::unix_nanos_now().saturating_sub(call.meta.received_at_unix_nanos);
    Duration::from_nanos(age_nanos) > max_age
}

/// `attempt` is the queue's delivery count: it also counts deliveries lost to a crashed worker,
/// so a call that kills workers is bounded by the same maximum.
async fn handle_call<Q: CallQueue>(
    ctx: Arc<Ctx<Q>>,
    msg: Q::Delivery,
    call: QueuedCall,
    attempt: u32,
    permit: OwnedSemaphorePermit,
) {
    let call_id = call.meta.call_id.as_str();
    let heartbeat = Heartbeat::start(&msg, ctx.config.progress_interval());
    let Some(permit) = hold_while_paused(&ctx, &call, permit).await else {
        drop(heartbeat);
        return nak(&msg, None).await;
    };
    let begin = match ctx.store.begin(call_id) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "state store failed; handing the call back");
            drop(heartbeat);
            return nak(&msg, Some(LOCAL_FAILURE_RETRY)).await;
        }
    };
    let (outcome, attempts) = match begin {
        Begin::Finished => {
            tracing::info!("redelivered call already finished; acking without invoking");
            drop(heartbeat);
            return ack(&msg).await;
        }
        Begin::RunningHere => {
            tracing::debug!("redelivery of a call running here; offering it again later");
            drop(heartbeat);
            return nak(&msg, Some(ctx.config.ack_wait)).await;
        }
        Begin::CallbackPending { outcome, attempts } => {
            tracing::info!("redelivered call already completed; delivering its callback only");
            drop(permit);
            (outcome, attempts)
        }
        Begin::Invoke { .. } => {
            let settings = ctx.functions.for_call(&call.meta);
            let max = settings.retry.max_attempts;
            if is_expired(&call, settings.max_age) {
                drop(permit);
                let final_outcome = no_response(504, "expired");
                return give_up(
                    &ctx,
                    &msg,
                    &call,
                    DeadLetterReason::Expired,
                    final_outcome,
                    attempt - 1,
                    heartbeat,
                )
                .await;
            }
            if attempt > max {
                // Earlier deliveries died with their workers (or their dead-lettering failed).
                drop(permit);
                let final_outcome = no_response(503, EXHAUSTED_BY_REDELIVERY);
                return give_up(
                    &ctx,
                    &msg,
                    &call,
                    DeadLetterReason::RetriesExhausted,
                    final_outcome,
                    max,
                    heartbeat,
                )
                .await;
            }
            tracing::debug!(attempt, max, "invoking");
            let started = note(
                &ctx,
                &call,
                Event::AttemptStarted {
                    function: call.meta.qualified_function(),
                    attempt,
                    at: queue_core::unix_nanos_now(),
                    accepted_at: call.meta.received_at_unix_nanos,
                },
            )
            .await;
            if is_cancelled(started.as_ref()) {
                drop(permit);
                return cancelled(&ctx, &msg, &call, attempt - 1, heartbeat).await;
            }
            if attempt == 1 {
                ::metrics::histogram!(
                    metrics::QUEUE_WAIT_SECONDS,
                    "function" => metrics::function_label(&call.meta.qualified_function())
                )
                .record(metrics::seconds_since(call.meta.received_at_unix_nanos));
            }
            let cancel = ctx.running.register(call_id);
            let in_flight = InFlight::start(&call);
            let outcome = tokio::select! {
                o = ctx.invoker.invoke(&call, attempt, max, settings.timeout) => o,
                () = cancel.cancelled() => {
                    tracing::info!("cancelled while running: invocation aborted");
                    ctx.running.remove(call_id);
                    drop(permit);
                    let aborted = no_response(CANCELLED_STATUS, CANCELLED);
                    note(&ctx, &call, attempt_ended(attempt, &aborted, CallState::Cancelled, None)).await;
                    return cancelled(&ctx, &msg, &call, attempt, heartbeat).await;
                }
                () = ctx.hand_back.cancelled() => {
                    tracing::warn!("shutdown: abandoning the running call and handing it back");
                    ctx.running.remove(call_id);
                    if let Err(e) = ctx.store.release(call_id) {
                        tracing::warn!(error = %e, "could not release the claim");
                    }
                    drop(heartbeat);
                    return nak(&msg, None).await;
                }
            };
            ctx.running.remove(call_id);
            drop(in_flight);
            drop(permit);
            ::metrics::histogram!(
                metrics::FUNCTION_SECONDS,
                "function" => metrics::function_label(&call.meta.qualified_function())
            )
            .record(outcome.duration.as_secs_f64());
            tracing::info!(
                status = outcome.status,
                duration_ms = u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
                error = outcome.error.as_deref(),
                attempt,
                "function returned"
            );
            let decision = settings.retry.decide(attempt, &outcome);
            let (next, result) = match decision {
                Decision::Final => {
                    let kept = keep_result(&ctx, &call, &outcome).await;
                    let next = if (200..300).contains(&outcome.status) {
                        CallState::Succeeded
                    } else {
                        CallState::Failed
                    };
                    (next, kept)
                }
                Decision::RetryAfter(_) => (CallState::Retrying, None),
                // give_up records the dead letter.
                Decision::Exhausted => (CallState::Failed, None),
            };
            let ended = note(&ctx, &call, attempt_ended(attempt, &outcome, next, result)).await;
            if is_cancelled(ended.as_ref()) {
                // Cancelled while it ran and the announcement did not reach us.
                return cancelled(&ctx, &msg, &call, attempt, heartbeat).await;
            }
            match decision {
                Decision::Final => {}
                Decision::RetryAfter(wait) => {
                    tracing::info!(retry_in = ?wait, "retryable failure; scheduling the next attempt");
                    ::metrics::counter!(
                        metrics::RETRIES,
                        "function" => metrics::function_label(&call.meta.qualified_function())
                    )
                    .increment(1);
                    if let Err(e) = ctx.store.release(call_id) {
                        tracing::warn!(error = %e, "could not release the claim");
                    }
                    drop(heartbeat);
                    return nak(&msg, Some(wait)).await;
                }
                Decision::Exhausted => {
                    return give_up(
                        &ctx,
                        &msg,
                        &call,
                        DeadLetterReason::RetriesExhausted,
                        outcome,
                        attempt,
                        heartbeat,
                    )
                    .await;
                }
            }
            if let Err(e) = ctx.store.complete(call_id, attempt, &outcome).await {
                // The function ran. Handing the message back would run it again for sure;
                // going on without the record only risks that if we also crash before the ack.
                tracing::error!(error = %e, "could not store the outcome; delivering without it");
            }
            if ctx.config.fault_crash_after_store {
                tracing::error!("fault injection: aborting after storing the outcome");
                std::process::abort();
            }
            (outcome, attempt)
        }
    };
    deliver_and_ack(&ctx, &msg, &call, &outcome, attempts, heartbeat).await;
}

/// Applies a record event and returns the new record; a failure is logged, never fails the
/// call (records are for visibility; the queue and the dedup state carry the guarantees).
async fn note<Q: CallQueue>(ctx: &Ctx<Q>, call: &QueuedCall, event: Event) -> Option<CallRecord> {
    match ctx.queue.apply(&call.meta.call_id, &event).await {
        Ok(record) => Some(record),
        Err(e) => {
            tracing::warn!(error = %e, "could not update the call record");
            None
        }
    }
}

/// Delivers a callback, counting and timing it.
async fn deliver_callback<Q: CallQueue>(
    ctx: &Ctx<Q>,
    call: &QueuedCall,
    url: &str,
    outcome: &Outcome,
    final_reason: Option<&str>,
) -> Delivery {
    let started = std::time::Instant::now();
    let delivery = ctx
        .callbacks
        .deliver(url, &call.meta, outcome, final_reason, &ctx.hand_back)
        .await;
    let result = match &delivery {
        Delivery::Delivered { .. } => "delivered",
        Delivery::GaveUp { .. } => "failed",
        Delivery::Interrupted => return delivery,
    };
    let function = metrics::function_label(&call.meta.qualified_function());
    ::metrics::counter!(metrics::CALLBACKS, "function" => function.clone(), "outcome" => result)
        .increment(1);
    ::metrics::histogram!(metrics::CALLBACK_SECONDS, "function" => function)
        .record(started.elapsed().as_secs_f64());
    delivery
}

/// Counts a call's final outcome and its end-to-end time, and announces it to the gateways'
/// live statistics.
async fn finalize<Q: CallQueue>(
    ctx: &Ctx<Q>,
    call: &QueuedCall,
    outcome: &'static str,
    status: Option<u16>,
    reason: Option<&str>,
) {
    let function = metrics::function_label(&call.meta.qualified_function());
    let end_to_end = metrics::seconds_since(call.meta.received_at_unix_nanos);
    ::metrics::counter!(metrics::PROCESSED, "function" => function.clone(), "outcome" => outcome)
        .increment(1);
    ::metrics::histogram!(metrics::END_TO_END_SECONDS, "function" => function).record(end_to_end);
    let event = OutcomeEvent {
        call_id: call.meta.call_id.clone(),
        function: call.meta.qualified_function(),
        outcome: outcome.to_owned(),
        at: queue_core::unix_nanos_now(),
        end_to_end_seconds: end_to_end,
        status,
        reason: reason.map(str::to_owned),
    };
    ctx.queue.announce_outcome(&event).await;
}

/// Counts a function invocation as in flight while it lives.
struct InFlight(String);

impl InFlight {
    fn start(call: &QueuedCall) -> Self {
        let function = metrics::function_label(&call.meta.qualified_function());
        ::metrics::gauge!(metrics::IN_FLIGHT, "function" => function.clone()).increment(1.0);
        Self(function)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::IN_FLIGHT, "function" => self.0.clone()).decrement(1.0);
    }
}

fn is_cancelled(record: Option<&CallRecord>) -> bool {
    record.is_some_and(|r| r.state == CallState::Cancelled)
}

/// `X-Function-Status` of a cancelled call's callback (no function answer; the convention for
/// a request the client abandoned).
const CANCELLED_STATUS: u16 = 499;
/// `X-Function-Error` of a cancelled call's callback (which then says `X-Call-State: cancelled`).
const CANCELLED: &str = crate::callback::CANCELLED;

/// The call was cancelled: it is not run (again); its callback, if any, says so with
/// `X-Call-State: cancelled`; then it is marked done and acked.
async fn cancelled<Q: CallQueue>(
    ctx: &Ctx<Q>,
    msg: &Q::Delivery,
    call: &QueuedCall,
    attempts: u32,
    heartbeat: Heartbeat,
) {
    tracing::info!("call cancelled; not running it (again)");
    finalize(ctx, call, "cancelled", None, None).await;
    if let Some(url) = call.meta.callback_url.as_deref() {
        let outcome = no_response(CANCELLED_STATUS, CANCELLED);
        match deliver_callback(ctx, call, url, &outcome, None).await {
            Delivery::Delivered { status, attempts } => {
                note(ctx, call, callback_event(status, attempts, None)).await;
            }
            Delivery::GaveUp { reason, attempts } => {
                tracing::warn!(%reason, "cancel callback not delivered");
                note(ctx, call, callback_event(0, attempts, Some(&reason))).await;
            }
            Delivery::Interrupted => {
                drop(heartbeat);
                return nak(msg, None).await;
            }
        }
    }
    if let Err(e) = ctx.store.finish(&call.meta.call_id, attempts).await {
        tracing::warn!(error = %e, "could not mark the call done");
    }
    drop(heartbeat);
    ack(msg).await;
}

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

fn callback_event(status: u16, attempts: u32, error: Option<&str>) -> Event {
    Event::Callback(CallbackEntry {
        at: queue_core::unix_nanos_now(),
        status: (status != 0).then_some(status),
        attempts,
        delivered: error.is_none(),
        error: error.map(str::to_owned),
    })
}

fn gave_up(call: &QueuedCall, state: CallState, reason: DeadLetterReason) -> Event {
    Event::GaveUp {
        state,
        reason: Some(reason.as_str().to_owned()),
        function: call.meta.qualified_function(),
        accepted_at: call.meta.received_at_unix_nanos,
    }
}

/// Keeps the final response for the result endpoint, if it fits.
async fn keep_result<Q: CallQueue>(
    ctx: &Ctx<Q>,
    call: &QueuedCall,
    outcome: &Outcome,
) -> Option<ResultAvailability> {
    // Encoded once: measured here, stored as is.
    let encoded = match StoredResult::encode_parts(outcome.status, &outcome.headers, &outcome.body)
    {
        Ok(encoded) => encoded,
        Err(e) => {
            tracing::warn!(error = %e, "could not encode the result");
            return None;
        }
    };
    let encoded_len = encoded.len();
    if encoded_len > ctx.queue.max_result_bytes() {
        tracing::info!(
            result_bytes = encoded_len,
            limit = ctx.queue.max_result_bytes(),
            "result too large to keep"
        );
        return Some(ResultAvailability::TooLarge);
    }
    match ctx.queue.store_result(&call.meta.call_id, encoded).await {
        Ok(()) => Some(ResultAvailability::Stored),
        Err(e) => {
            tracing::warn!(error = %e, "could not keep the result");
            None
        }
    }
}

/// Poll interval of a call held because its function is paused.
const PAUSE_POLL: Duration = Duration::from_millis(500);

async fn is_paused<Q: CallQueue>(ctx: &Ctx<Q>, call: &QueuedCall) -> bool {
    match ctx.queue.paused_functions().await {
        Ok(paused) => paused.contains(&call.meta.qualified_function()),
        Err(e) => {
            tracing::debug!(error = %e, "paused functions unknown; not holding");
            false
        }
    }
}

/// While the call's function is paused, holds the call (its message kept alive by the
/// heartbeat, its delivery count unchanged) without a concurrency permit; returns a permit
/// once resumed, or `None` when shutdown hands the call back.
async fn hold_while_paused<Q: CallQueue>(
    ctx: &Ctx<Q>,
    call: &QueuedCall,
    permit: OwnedSemaphorePermit,
) -> Option<OwnedSemaphorePermit> {
    if !is_paused(ctx, call).await {
        return Some(permit);
    }
    drop(permit);
    tracing::info!("function paused; holding the call");
    loop {
        tokio::select! {
            () = tokio::time::sleep(PAUSE_POLL) => {}
            () = ctx.hand_back.cancelled() => return None,
        }
        if !is_paused(ctx, call).await {
            break;
        }
    }
    tracing::info!("function resumed; running the call");
    tokio::select! {
        p = ctx.permits.clone().acquire_owned() => p.ok(),
        () = ctx.hand_back.cancelled() => None,
    }
}

fn no_response(status: u16, error: &str) -> Outcome {
    Outcome {
        status,
        headers: Vec::new(),
        body: bytes::Bytes::new(),
        duration: Duration::ZERO,
        error: Some(error.to_owned()),
    }
}

async fn deliver_and_ack<Q: CallQueue>(
    ctx: &Ctx<Q>,
    msg: &Q::Delivery,
    call: &QueuedCall,
    outcome: &Outcome,
    attempts: u32,
    heartbeat: Heartbeat,
) {
    if let Some(url) = call.meta.callback_url.as_deref() {
        match deliver_callback(ctx, call, url, outcome, None).await {
            Delivery::Delivered { status, attempts } => {
                tracing::info!(
                    callback_status = status,
                    callback_attempts = attempts,
                    "callback delivered"
                );
                note(ctx, call, callback_event(status, attempts, None)).await;
            }
            Delivery::GaveUp {
                reason,
                attempts: tries,
            } => {
                tracing::error!(%reason, callback_attempts = tries, "callback not delivered; dead-lettering the call");
                note(ctx, call, callback_event(0, tries, Some(&reason))).await;
                let detail = format!("callback: {reason}");
                let letter = letter_for(
                    msg,
                    DeadLetterReason::CallbackFailed,
                    &detail,
                    Some(call),
                    Some(outcome.status),
                    attempts,
                );
                if let Err(e) = ctx.store.forget(&call.meta.call_id) {
                    tracing::warn!(error = %e, "could not forget the call");
                }
                drop(heartbeat);
                note(
                    ctx,
                    call,
                    gave_up(
                        call,
                        CallState::DeadLettered,
                        DeadLetterReason::CallbackFailed,
                    ),
                )
                .await;
                count_dead_letter(
                    ctx,
                    call,
                    DeadLetterReason::CallbackFailed,
                    Some(outcome.status),
                )
                .await;
                return dead_letter_and_ack(ctx, msg, &letter).await;
            }
            Delivery::Interrupted => {
                tracing::warn!(
                    "shutdown: callback pending; handing the call back (the result is kept)"
                );
                drop(heartbeat);
                return nak(msg, None).await;
            }
        }
    }
    let result = if (200..300).contains(&outcome.status) {
        "succeeded"
    } else {
        "failed"
    };
    finalize(ctx, call, result, Some(outcome.status), None).await;
    if let Err(e) = ctx.store.finish(&call.meta.call_id, attempts).await {
        tracing::warn!(error = %e, "could not mark the call done");
    }
    drop(heartbeat);
    ack(msg).await;
}

/// Counts a dead letter of a decoded call.
async fn count_dead_letter<Q: CallQueue>(
    ctx: &Ctx<Q>,
    call: &QueuedCall,
    reason: DeadLetterReason,
    last_status: Option<u16>,
) {
    let function = metrics::function_label(&call.meta.qualified_function());
    ::metrics::counter!(metrics::DEAD_LETTERS, "function" => function.clone(), "reason" => reason.as_str())
        .increment(1);
    if reason == DeadLetterReason::Expired {
        ::metrics::counter!(metrics::EXPIRED, "function" => function).increment(1);
        finalize(ctx, call, "expired", None, Some(reason.as_str())).await;
    } else {
        finalize(
            ctx,
            call,
            "dead_lettered",
            last_status,
            Some(reason.as_str()),
        )
        .await;
    }
}

/// The call failed for good: dead-letter it (keeping the request), send the final callback
/// (marked with `X-Dead-Letter-Reason`), forget it so a replay runs it again, then ack.
async fn give_up<Q: CallQueue>(
    ctx: &Ctx<Q>,
    msg: &Q::Delivery,
    call: &QueuedCall,
    reason: DeadLetterReason,
    outcome: Outcome,
    attempts: u32,
    heartbeat: Heartbeat,
) {
    let detail = match reason {
        DeadLetterReason::Expired => format!(
            "older than the maximum age of {:?}",
            ctx.functions.for_call(&call.meta).max_age
        ),
        _ => format!("{attempts} attempts, last status {}", outcome.status),
    };
    // A synthesized outcome (no attempt ran in this delivery) has no real last status.
    let last_status = outcome
        .error
        .as_deref()
        .is_none_or(|e| e != EXHAUSTED_BY_REDELIVERY && e != "expired")
        .then_some(outcome.status);
    let letter = letter_for(msg, reason, &detail, Some(call), last_status, attempts);
    tracing::warn!(
        reason = reason.as_str(),
        attempts,
        last_status,
        "dead-lettering the call"
    );
    if let Err(e) = ctx.queue.dead_letter(msg.payload().clone(), &letter).await {
        tracing::error!(error = %e, "dead-letter publish failed; retrying later");
        if let Err(e) = ctx.store.release(&call.meta.call_id) {
            tracing::warn!(error = %e, "could not release the claim");
        }
        drop(heartbeat);
        return nak(msg, Some(LOCAL_FAILURE_RETRY)).await;
    }
    let state = if reason == DeadLetterReason::Expired {
        CallState::Expired
    } else {
        CallState::DeadLettered
    };
    note(ctx, call, gave_up(call, state, reason)).await;
    count_dead_letter(ctx, call, reason, last_status).await;
    if let Some(url) = call.meta.callback_url.as_deref() {
        match deliver_callback(ctx, call, url, &outcome, Some(reason.as_str())).await {
            Delivery::Delivered { status, attempts } => {
                tracing::info!(callback_status = status, "final callback delivered");
                note(ctx, call, callback_event(status, attempts, None)).await;
            }
            Delivery::GaveUp { reason, attempts } => {
                tracing::error!(%reason, "final callback not delivered (the call is in the dead-letter stream)");
                note(ctx, call, callback_event(0, attempts, Some(&reason))).await;
            }
            Delivery::Interrupted => {
                // The redelivery dead-letters again (stored once) and retries the callback.
                drop(heartbeat);
                return nak(msg, None).await;
            }
        }
    }
    if let Err(e) = ctx.store.forget(&call.meta.call_id) {
        tracing::warn!(error = %e, "could not forget the call");
    }
    drop(heartbeat);
    ack(msg).await;
}

async fn dead_letter_and_ack<Q: CallQueue>(
    ctx: &Ctx<Q>,
    msg: &Q::Delivery,
    letter: &DeadLetter<'_>,
) {
    tracing::error!(
        stream_sequence = letter.stream_sequence,
        subject = %msg.subject(),
        reason = letter.reason.as_str(),
        detail = letter.detail,
        "dead-lettering the message"
    );
    match ctx.queue.dead_letter(msg.payload().clone(), letter).await {
        Ok(()) => ack(msg).await,
        Err(e) => {
            tracing::error!(error = %e, "dead-letter publish failed; retrying later");
            nak(msg, Some(LOCAL_FAILURE_RETRY)).await;
        }
    }
}

async fn ack<D: QueueDelivery>(msg: &D) {
    if let Err(e) = msg.ack().await {
        // The call is done and recorded: a redelivery will be acked without invoking.
        tracing::warn!(error = %e, "ack failed");
    }
}

async fn nak<D: QueueDelivery>(msg: &D, delay: Option<Duration>) {
    if let Err(e) = msg.nak(delay).await {
        tracing::warn!(error = %e, "nak failed; the message will be redelivered after ack_wait");
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
