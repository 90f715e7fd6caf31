//! Where a call is: `GET /async-calls/{call_id}` (its record) and
//! `GET /async-calls/{call_id}/result` (the function's final response, when it was kept).
//! The `/async-calls/` prefix cannot collide with the `/async-function/{name}/...` routes.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use queue_core::backend::{CallQueue, apply_event};
use queue_core::headers::is_hop_by_hop;
use queue_core::message::valid_call_id;
use queue_core::records::{CallRecord, CallState, Event, ResultAvailability};
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

async fn load<Q: CallQueue>(state: &AppState<Q>, call_id: &str) -> Result<CallRecord, ApiError> {
    if !valid_call_id(call_id) {
        return Err(ApiError::bad_request(
            "invalid_call_id",
            "a call id is 1-128 characters of A-Z a-z 0-9 - _",
        ));
    }
    match state.queue.record(call_id).await {
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_call",
            "no call with this id (never accepted, or its record expired)",
        )),
        Err(e) => {
            tracing::warn!(error = %e, "reading a call record failed");
            Err(ApiError::unavailable(
                "call records are unavailable now",
                state.retry_after,
            ))
        }
    }
}

/// `GET /async-calls/{call_id}`: the call's record as JSON.
pub async fn record<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    Path(call_id): Path<String>,
) -> Response {
    match load(&state, &call_id).await {
        Ok(record) => axum::Json(record).into_response(),
        Err(e) => e.with_call_id(&call_id).into_response(),
    }
}

/// `DELETE /async-calls/{call_id}`: cancels a call that has not finished. A queued call is not
/// run; a running call's invocation is aborted. `200` with the record; `409` once final.
pub async fn cancel<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    Path(call_id): Path<String>,
) -> Response {
    match cancel_call(&state, &call_id).await {
        Ok(record) => axum::Json(record).into_response(),
        Err(e) => e.with_call_id(&call_id).into_response(),
    }
}

async fn cancel_call<Q: CallQueue>(
    state: &AppState<Q>,
    call_id: &str,
) -> Result<CallRecord, ApiError> {
    let record = load(state, call_id).await?;
    let finished = |record: &CallRecord| {
        ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!(
                "the call already ended (state {})",
                serde_json::to_value(record.state).unwrap_or_default()
            ),
        )
    };
    if record.state.is_final() {
        return Err(finished(&record));
    }
    let record = apply_event(state.queue.as_ref(), call_id, None, &[Event::Cancel], None)
        .await
        .map(|owned| owned.record)
        .map_err(|e| {
            tracing::warn!(error = %e, "cancelling failed");
            ApiError::unavailable("call records are unavailable now", state.retry_after)
        })?;
    if record.state != CallState::Cancelled {
        return Err(finished(&record));
    }
    if let Err(e) = state.queue.announce_cancel(call_id).await {
        // Workers also check the record before and after each attempt.
        tracing::warn!(call_id, error = %e, "could not announce the cancel");
    }
    tracing::info!(call_id, "call cancelled");
    Ok(record)
}

/// `GET /async-calls/{call_id}/result`: `200` with the function's final body, headers and
/// `X-Function-Status`; `202` while the call is not finished; `409` when there is no result to
/// give (too large to keep, or the call ended without a final answer).
pub async fn result<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    Path(call_id): Path<String>,
) -> Response {
    match result_response(&state, &call_id).await {
        Ok(response) => response,
        Err(e) => e.with_call_id(&call_id).into_response(),
    }
}

async fn result_response<Q: CallQueue>(
    state: &AppState<Q>,
    call_id: &str,
) -> Result<Response, ApiError> {
    let record = load(state, call_id).await?;
    let no_result =
        |code: &'static str, message: String| ApiError::new(StatusCode::CONFLICT, code, message);
    match record.state {
        CallState::Queued | CallState::Running | CallState::Retrying => {
            return Ok((
                StatusCode::ACCEPTED,
                axum::Json(json!({
                    "call_id": call_id,
                    "state": record.state,
                    "message": "the call has not finished yet",
                })),
            )
                .into_response());
        }
        CallState::Succeeded | CallState::Failed => {}
        other => {
            let state = serde_json::to_value(other).unwrap_or_default();
            return Err(no_result(
                "no_result",
                format!(
                    "the call ended without a final answer (state {state}{})",
                    record
                        .dead_letter_reason
                        .as_deref()
                        .map(|r| format!(", reason {r}"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    match record.result {
        Some(ResultAvailability::TooLarge) => {
            return Err(no_result(
                "result_too_large",
                "the function's response was larger than --max-result-bytes; it was not kept"
                    .into(),
            ));
        }
        Some(ResultAvailability::Stored) => {}
        None => {
            return Err(no_result(
                "result_not_kept",
                "the function's response could not be kept".into(),
            ));
        }
    }
    let stored = match state.queue.result(call_id).await {
        Ok(Some(stored)) => stored,
        Ok(None) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "result_expired",
                "the result is no longer kept",
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading a result failed");
            return Err(ApiError::unavailable(
                "results are unavailable now",
                state.retry_after,
            ));
        }
    };
    let mut response = stored.body.into_response();
    let headers = response.headers_mut();
    // The function's own content type (if any), not the default for a byte body.
    headers.remove(axum::http::header::CONTENT_TYPE);
    for (name, value) in &stored.headers {
        if is_hop_by_hop(name) || name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    headers.insert("x-function-status", HeaderValue::from(stored.status));
    if let Ok(id) = HeaderValue::from_str(call_id) {
        headers.insert("x-call-id", id);
    }
    Ok(response)
}
