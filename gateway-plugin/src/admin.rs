//! The queue admin API, under `/system/async/`:
//!
//! - `GET  /system/async/queue`: depth, unacknowledged, consumers, dead letters; per function:
//!   pending, oldest age, paused.
//! - `GET  /system/async/dead-letters[/{seq-or-call-id}]`: list or show (metadata only).
//! - `POST /system/async/dead-letters/replay` and `/purge` with `{"ids": [...]}` or
//!   `{"all": true}`: the same operations as the `dlq` command.
//! - `POST /system/async/functions/{name}/pause` and `/resume`: hold a function's calls.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use queue_core::backend::{BackendError, CallQueue};
use queue_core::message::parse_function;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

fn unavailable<Q>(state: &AppState<Q>, e: &BackendError) -> ApiError {
    tracing::warn!(error = %e, "admin request failed");
    ApiError::unavailable(format!("the queue did not answer: {e}"), state.retry_after)
}

/// `GET /system/async/queue`.
pub async fn queue<Q: CallQueue>(State(state): State<Arc<AppState<Q>>>) -> Response {
    let stats = match state.queue.stats().await {
        Ok(s) => s,
        Err(e) => return unavailable(&state, &e).into_response(),
    };
    let functions = match state.queue.function_stats().await {
        Ok(f) => f,
        Err(e) => return unavailable(&state, &e).into_response(),
    };
    let paused = state.queue.paused_functions().await.unwrap_or_default();
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
        "pending": stats.pending,
        "unacked": stats.unacked,
        "consumers": stats.consumers,
        "dead_letters": stats.dead_letters,
        "functions": functions,
        "paused_functions": paused,
    }))
    .into_response()
}

/// `GET /system/async/dead-letters`.
pub async fn dead_letters<Q: CallQueue>(State(state): State<Arc<AppState<Q>>>) -> Response {
    match state.queue.dead_letters().await {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => unavailable(&state, &e).into_response(),
    }
}

/// `GET /system/async/dead-letters/{selector}`: by sequence or call id.
pub async fn dead_letter<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    Path(selector): Path<String>,
) -> Response {
    match state.queue.dead_letters().await {
        Ok(list) => match list.into_iter().find(|e| e.matches(&selector)) {
            Some(entry) => axum::Json(entry).into_response(),
            None => ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_dead_letter",
                "no dead letter with this sequence or call id",
            )
            .into_response(),
        },
        Err(e) => unavailable(&state, &e).into_response(),
    }
}

/// Which dead letters an operation applies to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// Sequence numbers or call ids.
    #[serde(default)]
    ids: Vec<String>,
    /// Every dead letter.
    #[serde(default)]
    all: bool,
}

fn selection(body: Result<axum::Json<Selection>, JsonRejection>) -> Result<Selection, ApiError> {
    let axum::Json(selection) = body.map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("expected {{\"ids\": [...]}} or {{\"all\": true}}: {e}"),
        )
    })?;
    if selection.ids.is_empty() && !selection.all {
        return Err(ApiError::bad_request(
            "nothing_selected",
            "give \"ids\" (sequences or call ids) or \"all\": true",
        ));
    }
    if !selection.ids.is_empty() && selection.all {
        return Err(ApiError::bad_request(
            "ambiguous_selection",
            "give either \"ids\" or \"all\", not both",
        ));
    }
    Ok(selection)
}

/// `POST /system/async/dead-letters/replay`.
pub async fn replay<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    body: Result<axum::Json<Selection>, JsonRejection>,
) -> Result<Response, ApiError> {
    let selection = selection(body)?;
    let replayed = (state.queue)
        .replay_dead_letters(&selection.ids, selection.all)
        .await
        .map_err(|e| unavailable(&state, &e))?;
    tracing::info!(count = replayed.len(), "dead letters replayed");
    Ok(axum::Json(json!({ "replayed": replayed })).into_response())
}

/// `POST /system/async/dead-letters/purge`.
pub async fn purge<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    body: Result<axum::Json<Selection>, JsonRejection>,
) -> Result<Response, ApiError> {
    let selection = selection(body)?;
    let deleted = (state.queue)
        .purge_dead_letters(&selection.ids, selection.all)
        .await
        .map_err(|e| unavailable(&state, &e))?;
    tracing::info!(deleted, "dead letters purged");
    Ok(axum::Json(json!({ "deleted": deleted })).into_response())
}

async fn set_paused<Q: CallQueue>(state: &AppState<Q>, name: &str, paused: bool) -> Response {
    let function = match parse_function(name) {
        Ok((name, None)) => name,
        Ok((name, Some(namespace))) => format!("{name}.{namespace}"),
        Err(e) => {
            return ApiError::bad_request("invalid_function_name", e.to_string()).into_response();
        }
    };
    match state.queue.set_paused(&function, paused).await {
        Ok(list) => {
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
    Path(name): Path<String>,
) -> Response {
    set_paused(&state, &name, true).await
}

/// `POST /system/async/functions/{name}/resume`.
pub async fn resume<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    Path(name): Path<String>,
) -> Response {
    set_paused(&state, &name, false).await
}
