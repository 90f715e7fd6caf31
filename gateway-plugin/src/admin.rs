//! The queue admin API, under `/system/async/`:
//!
//! - `GET  /system/async/queue`: depth, unacknowledged, consumers, dead letters; per function:
//!   pending, oldest age, paused.
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

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use queue_core::backend::{BackendError, CallQueue, DeadLetterSelector};
use queue_core::message::canonical_function;
use serde::Deserialize;
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

/// `GET /system/async/queue`. In a view short of every namespace, `pending` and
/// `dead_letters` count the view's functions and dead letters, and the queue-wide `unacked` and
/// `consumers` are `null`.
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
    let paused = paused_in(&state, &view).await;
    let (pending, unacked, consumers, dead_letters) = if view.is_everything() {
        (
            stats.pending,
            Some(stats.unacked),
            Some(stats.consumers),
            stats.dead_letters,
        )
    } else {
        functions.retain(|f| view.sees_function(&f.function));
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
        )
    };
    let functions: Vec<_> = functions
        .into_iter()
        .map(|f| {
            json!({
                "function": f.function,
                "pending": f.pending,
                "oldest_age_seconds": f.oldest_age_seconds,
                "paused": paused.contains(&f.function),
            })
        })
        .collect();
    axum::Json(json!({
        "pending": pending,
        "unacked": unacked,
        "consumers": consumers,
        "dead_letters": dead_letters,
        "functions": functions,
        "paused_functions": paused,
    }))
    .into_response()
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
    let deleted = (state.queue)
        .purge_dead_letters(&selection.selectors, selection.all)
        .await
        .map_err(|e| unavailable(&state, &e))?;
    tracing::info!(deleted, "dead letters purged");
    Ok(axum::Json(json!({ "deleted": deleted })).into_response())
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
