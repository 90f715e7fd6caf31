//! The queue admin API, under `/system/async/`:
//!
//! - `GET  /system/async/queue`: depth, unacknowledged, consumers, dead letters, scheduled
//!   calls; per function: pending, scheduled, oldest age, paused, and its concurrency limit
//!   summed over the workers; the lanes of fair workers; each worker's announced status.
//! - `GET  /system/async/dead-letters`, `/dead-letters/{sequence}` and
//!   `/dead-letters/call/{call_id}`: list or show (metadata only).
//! - `POST /system/async/dead-letters/replay` and `/purge` with
//!   `{"sequences": [..], "call_ids": [..]}` or `{"all": true}`: the same operations as the
//!   `dlq` command. Sequences and call ids are typed apart (a call id may be digits).
//! - `POST /system/async/functions/{name}/pause` and `/resume`: hold a function's calls.
//!
//! Every view is the caller's [`AdminView`]: with an authenticator, an `admin:team-a` caller
//! sees and changes only team-a's functions and dead letters ([`crate::tenancy`]).
//!
//! Every state-changing route goes through [`refuse_cross_site`]: a page on another origin
//! cannot make a browser change the queue (CSRF), even with a form a browser sends without
//! asking ([`crate::site`]; no origin is an exception here, whatever the CORS file says).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use queue_core::backend::{BackendError, CallQueue, DeadLetterSelector, LaneStats, WorkerStatus};
use queue_core::message::canonical_function;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::ApiError;
use crate::paths::PathParam;
use crate::state::AppState;
use crate::tenancy::AdminView;

/// Middleware of the state-changing admin routes: `403` `cross_site_request` for a request a
/// browser sent from another origin.
pub async fn refuse_cross_site(request: Request, next: Next) -> Response {
    if let Some(reason) = crate::site::cross_site(request.headers(), |_| false) {
        tracing::warn!(
            path = request.uri().path(),
            reason,
            "cross-site admin request refused"
        );
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            format!("{reason}; admin changes are accepted from the gateway's own pages or from non-browser clients"),
        )
        .into_response();
    }
    next.run(request).await
}

fn unavailable<Q>(state: &AppState<Q>, e: &BackendError) -> ApiError {
    tracing::warn!(error = %e, "admin request failed");
    ApiError::unavailable(format!("the queue did not answer: {e}"), state.retry_after)
}

/// The paused functions of the view.
async fn paused_in<Q: CallQueue>(state: &AppState<Q>, view: &AdminView) -> Vec<String> {
    let mut paused = state.queue.paused_functions().await.unwrap_or_default();
    paused.retain(|f| view.sees_function(f));
    paused
}

/// `GET /system/async/queue`. In a view short of every namespace, `pending`, `scheduled` and
/// `dead_letters` count the view's functions and dead letters, the queue-wide `unacked` and
/// `consumers` are `null`, and so are each worker's figures for all its functions
/// (`max_inflight`, `in_flight`, `functions_omitted`); lanes and the workers' functions are the
/// view's.
pub async fn queue<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: AdminView,
) -> Response {
    let stats = match state.queue.stats().await {
        Ok(s) => s,
        Err(e) => return unavailable(&state, &e).into_response(),
    };
    let mut functions = match state.queue.function_stats().await {
        Ok(f) => f,
        Err(e) => return unavailable(&state, &e).into_response(),
    };
    let mut scheduled = match state.queue.scheduled_stats().await {
        Ok(s) => s,
        Err(e) => return unavailable(&state, &e).into_response(),
    };
    let paused = paused_in(&state, &view).await;
    let workers = workers_in(&state, &view).await;
    let lanes = lanes_in(&state, &view, &workers).await;
    functions.retain(|f| view.sees_function(&f.function));
    scheduled.retain(|f| view.sees_function(&f.function));
    let (pending, unacked, consumers, dead_letters, scheduled_total) = if view.is_everything() {
        (
            stats.pending,
            Some(stats.unacked),
            Some(stats.consumers),
            stats.dead_letters,
            stats.scheduled,
        )
    } else {
        let letters = match state.queue.dead_letters().await {
            Ok(list) => list,
            Err(e) => return unavailable(&state, &e).into_response(),
        };
        let dead_letters = letters.iter().filter(|e| view.sees_dead_letter(e)).count();
        (
            functions.iter().map(|f| f.pending).sum(),
            None,
            None,
            dead_letters as u64,
            scheduled.iter().map(|f| f.scheduled).sum(),
        )
    };
    let concurrency = concurrency_per_function(&workers);
    let mut rows: BTreeMap<String, FunctionRow> = BTreeMap::new();
    for f in functions {
        let row = rows.entry(f.function).or_default();
        row.pending = f.pending;
        row.oldest_age_seconds = f.oldest_age_seconds;
    }
    for f in scheduled {
        rows.entry(f.function).or_default().scheduled = f.scheduled;
    }
    for function in concurrency.keys() {
        rows.entry(function.clone()).or_default();
    }
    let functions: Vec<_> = rows
        .into_iter()
        .map(|(function, row)| {
            json!({
                "paused": paused.contains(&function),
                "concurrency": concurrency.get(&function),
                "function": function,
                "pending": row.pending,
                "scheduled": row.scheduled,
                "oldest_age_seconds": row.oldest_age_seconds,
            })
        })
        .collect();
    let now = queue_core::unix_nanos_now();
    let workers: Vec<_> = workers
        .into_iter()
        .map(|w| {
            let everything = view.is_everything();
            json!({
                "worker": w.worker,
                "hostname": w.hostname,
                "consumer": w.consumer,
                "max_inflight": everything.then_some(w.max_inflight),
                "in_flight": everything.then_some(w.in_flight),
                "fair_scheduling": w.fair_scheduling,
                "adaptive_concurrency": w.adaptive_concurrency,
                "interval_seconds": w.interval_seconds,
                "age_seconds": Duration::from_nanos(now.saturating_sub(w.announced_at_unix_nanos))
                    .as_secs_f64(),
                "functions": w.functions,
                "functions_omitted": everything.then_some(w.functions_omitted),
            })
        })
        .collect();
    axum::Json(json!({
        "pending": pending,
        "unacked": unacked,
        "consumers": consumers,
        "dead_letters": dead_letters,
        "scheduled": scheduled_total,
        "functions": functions,
        "paused_functions": paused,
        "lanes": lanes,
        "workers": workers,
    }))
    .into_response()
}

/// One function's queue figures, gathered from the queue's listings.
#[derive(Debug, Default)]
struct FunctionRow {
    pending: u64,
    scheduled: u64,
    oldest_age_seconds: f64,
}

/// One function's concurrency summed over the workers that track it.
#[derive(Debug, Default, Serialize)]
struct Concurrency {
    /// Calls of it the workers run at once now (the sum of their limits).
    limit: u64,
    /// The sum of their caps.
    cap: u64,
    /// Running now.
    in_flight: u64,
    /// Waiting for a slot.
    waiting: u64,
    /// Workers tracking it.
    workers: u64,
}

fn concurrency_per_function(workers: &[WorkerStatus]) -> BTreeMap<String, Concurrency> {
    let mut out: BTreeMap<String, Concurrency> = BTreeMap::new();
    for f in workers.iter().flat_map(|w| &w.functions) {
        let sum = out.entry(f.function.clone()).or_default();
        sum.limit += u64::from(f.limit);
        sum.cap += u64::from(f.cap);
        sum.in_flight += u64::from(f.in_flight);
        sum.waiting += u64::from(f.waiting);
        sum.workers += 1;
    }
    out
}

/// The workers' statuses with the functions of the view (best effort: none when they cannot
/// be read, the queue's own figures still answer).
async fn workers_in<Q: CallQueue>(state: &AppState<Q>, view: &AdminView) -> Vec<WorkerStatus> {
    let mut workers = match state.queue.worker_statuses().await {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "worker statuses unavailable");
            Vec::new()
        }
    };
    for w in &mut workers {
        w.functions.retain(|f| view.sees_function(&f.function));
    }
    workers
}

/// The lanes of the view, where the queue is pulled by lanes and a worker group does (`None`
/// otherwise; best effort: an empty list when they cannot be read).
async fn lanes_in<Q: CallQueue>(
    state: &AppState<Q>,
    view: &AdminView,
    workers: &[WorkerStatus],
) -> Option<Vec<LaneStats>> {
    let groups: BTreeSet<&str> = (workers.iter())
        .filter(|w| w.fair_scheduling)
        .map(|w| w.consumer.as_str())
        .collect();
    if !state.queue.pulls_by_lane() || groups.is_empty() {
        return None;
    }
    let mut lanes = Vec::new();
    for group in groups {
        match state.queue.lane_stats(group).await {
            Ok(found) => lanes.extend(found),
            Err(e) => tracing::debug!(error = %e, "lanes unavailable"),
        }
    }
    lanes.retain(|l| view.sees_function(&l.function));
    Some(lanes)
}

/// `GET /system/async/dead-letters`: those of the view.
pub async fn dead_letters<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: AdminView,
) -> Response {
    match state.queue.dead_letters().await {
        Ok(mut list) => {
            list.retain(|e| view.sees_dead_letter(e));
            axum::Json(list).into_response()
        }
        Err(e) => unavailable(&state, &e).into_response(),
    }
}

/// `GET /system/async/dead-letters/{sequence}`.
pub async fn dead_letter<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: AdminView,
    PathParam(sequence): PathParam,
) -> Response {
    let Ok(sequence) = sequence.parse::<u64>() else {
        return ApiError::bad_request(
            "invalid_sequence",
            "a dead letter's sequence is a number; by call id: /system/async/dead-letters/call/{call_id}",
        )
        .into_response();
    };
    show(&state, &view, &DeadLetterSelector::Sequence(sequence)).await
}

/// `GET /system/async/dead-letters/call/{call_id}`.
pub async fn dead_letter_of_call<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: AdminView,
    PathParam(call_id): PathParam,
) -> Response {
    show(&state, &view, &DeadLetterSelector::CallId(call_id)).await
}

/// One dead letter; one of another namespace is as unknown as one that does not exist.
async fn show<Q: CallQueue>(
    state: &AppState<Q>,
    view: &AdminView,
    selector: &DeadLetterSelector,
) -> Response {
    match state.queue.dead_letters().await {
        Ok(list) => {
            match (list.into_iter()).find(|e| e.matches(selector) && view.sees_dead_letter(e)) {
                Some(entry) => axum::Json(entry).into_response(),
                None => ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_dead_letter",
                    "no dead letter with this sequence or call id",
                )
                .into_response(),
            }
        }
        Err(e) => unavailable(state, &e).into_response(),
    }
}

/// Which dead letters an operation applies to: by sequence (numbers) and by call id
/// (strings), typed apart, or all of them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Dead-letter sequences.
    #[serde(default)]
    sequences: Vec<u64>,
    /// Call ids.
    #[serde(default)]
    call_ids: Vec<String>,
    /// Every dead letter.
    #[serde(default)]
    all: bool,
    /// The untyped selector list of earlier versions, refused with an explanation.
    #[serde(default)]
    ids: Option<serde_json::Value>,
}

/// What a checked [`Selection`] selects.
struct Selected {
    selectors: Vec<DeadLetterSelector>,
    all: bool,
}

fn selection(body: Result<axum::Json<Selection>, JsonRejection>) -> Result<Selected, ApiError> {
    const SHAPE: &str = "{\"sequences\": [30], \"call_ids\": [\"job-1\"]} or {\"all\": true}";
    let axum::Json(selection) =
        body.map_err(|e| ApiError::bad_request("invalid_body", format!("expected {SHAPE}: {e}")))?;
    if selection.ids.is_some() {
        return Err(ApiError::bad_request(
            "untyped_selection",
            format!("\"ids\" mixed sequences and call ids; give {SHAPE}"),
        ));
    }
    let selectors: Vec<DeadLetterSelector> = (selection.sequences.iter())
        .map(|s| DeadLetterSelector::Sequence(*s))
        .chain(
            selection
                .call_ids
                .into_iter()
                .map(DeadLetterSelector::CallId),
        )
        .collect();
    if selectors.is_empty() && !selection.all {
        return Err(ApiError::bad_request(
            "nothing_selected",
            format!("nothing selected: give {SHAPE}"),
        ));
    }
    if !selectors.is_empty() && selection.all {
        return Err(ApiError::bad_request(
            "ambiguous_selection",
            "give either \"sequences\"/\"call_ids\" or \"all\", not both",
        ));
    }
    Ok(Selected {
        selectors,
        all: selection.all,
    })
}

/// The selection a view may apply: as given for everything; else the sequences of the
/// selected dead letters of the view (`all`: all of the view's), `None` when that is none.
async fn within_view<Q: CallQueue>(
    state: &AppState<Q>,
    view: &AdminView,
    selection: Selected,
) -> Result<Option<Selected>, ApiError> {
    if view.is_everything() {
        return Ok(Some(selection));
    }
    let letters = (state.queue.dead_letters().await).map_err(|e| unavailable(state, &e))?;
    let selectors = view.narrow(&letters, &selection.selectors, selection.all);
    Ok((!selectors.is_empty()).then_some(Selected {
        selectors,
        all: false,
    }))
}

/// `POST /system/async/dead-letters/replay`: of the view's dead letters.
pub async fn replay<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: AdminView,
    body: Result<axum::Json<Selection>, JsonRejection>,
) -> Result<Response, ApiError> {
    let selection = selection(body)?;
    let Some(selection) = within_view(&state, &view, selection).await? else {
        return Ok(axum::Json(json!({ "replayed": [] })).into_response());
    };
    let replayed = (state.queue)
        .replay_dead_letters(&selection.selectors, selection.all)
        .await
        .map_err(|e| unavailable(&state, &e))?;
    tracing::info!(count = replayed.len(), "dead letters replayed");
    Ok(axum::Json(json!({ "replayed": replayed })).into_response())
}

/// `POST /system/async/dead-letters/purge`: of the view's dead letters.
pub async fn purge<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: AdminView,
    body: Result<axum::Json<Selection>, JsonRejection>,
) -> Result<Response, ApiError> {
    let selection = selection(body)?;
    let Some(selection) = within_view(&state, &view, selection).await? else {
        return Ok(axum::Json(json!({ "deleted": 0 })).into_response());
    };
    let purged = (state.queue)
        .purge_dead_letters(&selection.selectors, selection.all)
        .await
        .map_err(|e| unavailable(&state, &e))?;
    // Nothing can replay them now: their stored bodies go too.
    for call_id in purged.iter().filter_map(|e| e.call_id.as_deref()) {
        crate::large::delete_call_blobs(&state, call_id).await;
    }
    tracing::info!(deleted = purged.len(), "dead letters purged");
    Ok(axum::Json(json!({ "deleted": purged.len() })).into_response())
}

/// Pauses or resumes `name`. The authorization layer checked `admin:<its namespace>`; the
/// answer's `paused_functions` are those of the view.
async fn set_paused<Q: CallQueue>(
    state: &AppState<Q>,
    view: &AdminView,
    name: &str,
    paused: bool,
) -> Response {
    let function = match canonical_function(name, &state.default_namespace) {
        Ok((name, None)) => name,
        Ok((name, Some(namespace))) => format!("{name}.{namespace}"),
        Err(e) => {
            return ApiError::bad_request("invalid_function_name", e.to_string()).into_response();
        }
    };
    match state.queue.set_paused(&function, paused).await {
        Ok(mut list) => {
            list.retain(|f| view.sees_function(f));
            tracing::info!(function, paused, "function pause changed");
            axum::Json(json!({ "function": function, "paused": paused, "paused_functions": list }))
                .into_response()
        }
        Err(e) => unavailable(state, &e).into_response(),
    }
}

/// `POST /system/async/functions/{name}/pause`: its calls are held (stay queued) until resumed.
pub async fn pause<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: AdminView,
    PathParam(name): PathParam,
) -> Response {
    set_paused(&state, &view, &name, true).await
}

/// `POST /system/async/functions/{name}/resume`.
pub async fn resume<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: AdminView,
    PathParam(name): PathParam,
) -> Response {
    set_paused(&state, &view, &name, false).await
}
