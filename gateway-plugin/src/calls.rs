//! Where a call is: `GET /async-calls/{call_id}` (its record) and
//! `GET /async-calls/{call_id}/result` (the function's final response, when it was kept);
//! `DELETE /async-calls/{call_id}`, and OpenFaaS Pro's `DELETE /async-function/{call_id}`
//! ([`resolve_delete`], [`cancel_addressed`]), cancel it.
//! The `/async-calls/` prefix cannot collide with the `/async-function/{name}/...` routes.

use std::sync::Arc;

use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use queue_core::backend::{CallQueue, apply_event};
use queue_core::headers;
use queue_core::message::{canonical_function, valid_call_id};
use queue_core::records::{CallRecord, CallState, Event, ResultAvailability};
use serde_json::json;

use crate::audit::AuditFacts;
use crate::error::ApiError;
use crate::paths::{DeleteTarget, PathParam};
use crate::state::AppState;

/// The answer for a call id with no record (and, with authorization, for a call of a namespace
/// the caller may not see: the same answer, so ids do not leak).
pub(crate) fn unknown_call() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_call",
        "no call with this id (never accepted, or its record expired)",
    )
}

/// The record of `call_id`: `400` for an invalid id, `404` for none, `503` when records cannot
/// be read.
pub(crate) async fn load<Q: CallQueue>(
    state: &AppState<Q>,
    call_id: &str,
) -> Result<CallRecord, ApiError> {
    if !valid_call_id(call_id) {
        return Err(ApiError::bad_request(
            "invalid_call_id",
            "a call id is 1-128 characters of visible ASCII (! to ~)",
        ));
    }
    match state.queue.record(call_id).await {
        Ok(Some(record)) => Ok(record),
        Ok(None) => Err(unknown_call()),
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
    PathParam(call_id): PathParam,
) -> Response {
    match load(&state, &call_id).await {
        Ok(record) => axum::Json(record.for_api(queue_core::unix_nanos_now())).into_response(),
        Err(e) => e.with_call_id(&call_id).into_response(),
    }
}

/// `DELETE /async-calls/{call_id}`: cancels a call that has not finished. A queued call is not
/// run; a running call's invocation is aborted. `200` with the record; `409` once final.
pub async fn cancel<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    PathParam(call_id): PathParam,
) -> Response {
    let mut namespace = None;
    let response = match cancel_call(&state, &call_id, None, &mut namespace).await {
        Ok(record) => axum::Json(record.for_api(queue_core::unix_nanos_now())).into_response(),
        Err(e) => e.with_call_id(&call_id).into_response(),
    };
    with_namespace(response, namespace)
}

/// What `DELETE /async-function/{name}` addresses: the call whose id is `name` when it has a
/// record, else the function `name`. A name that cannot be a call id is a function without a
/// read; `503` when records cannot be read (an invocation could not be queued either).
pub(crate) async fn delete_target<Q: CallQueue>(
    state: &AppState<Q>,
    name: &str,
) -> Result<DeleteTarget, ApiError> {
    if !valid_call_id(name) {
        return Ok(DeleteTarget::Function);
    }
    match state.queue.record(name).await {
        Ok(Some(record)) => Ok(DeleteTarget::Call(Box::new(record))),
        Ok(None) => Ok(DeleteTarget::Function),
        Err(e) => {
            tracing::warn!(error = %e, "reading a call record failed");
            Err(ApiError::unavailable(
                "call records are unavailable now",
                state.retry_after,
            ))
        }
    }
}

/// The outermost layer of `DELETE /async-function/{name}` (after CORS): reads the record of
/// `{name}` (percent-decoded, as `/async-calls/{call_id}` takes an id) once, and leaves what
/// the request addresses ([`DeleteTarget`]) in its extensions for the audit, authorization and
/// quotas layers and the handler. No other method of the async routes comes here.
pub async fn resolve_delete<Q: CallQueue>(
    state: Arc<AppState<Q>>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let name = match axum::RequestPartsExt::extract::<RawPathParams>(&mut parts).await {
        Ok(params) => (params.iter())
            .find(|(key, _)| *key == "name")
            .map(|(_, value)| value.to_owned())
            .unwrap_or_default(),
        Err(e) => {
            return crate::paths::refused_parameter(e.status(), &e.body_text()).into_response();
        }
    };
    match delete_target(&state, &name).await {
        Ok(target) => {
            parts.extensions.insert(target);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(e) => e.into_response(),
    }
}

/// `DELETE /async-function/{call_id}` of a call with a record (OpenFaaS Pro's cancel): the
/// cancel of `DELETE /async-calls/{call_id}`, answered `202` as OpenFaaS Pro does, with the
/// record and `X-Call-Id`; `409` `already_finished` once final.
pub(crate) async fn cancel_addressed<Q: CallQueue>(
    state: &AppState<Q>,
    record: CallRecord,
) -> Response {
    let call_id = record.call_id.clone();
    let mut namespace = None;
    let response = match cancel_call(state, &call_id, Some(record), &mut namespace).await {
        Ok(record) => {
            let mut response = (
                StatusCode::ACCEPTED,
                axum::Json(record.for_api(queue_core::unix_nanos_now())),
            )
                .into_response();
            if let Ok(id) = HeaderValue::from_str(&call_id) {
                response.headers_mut().insert("x-call-id", id);
            }
            response
        }
        Err(e) => e.with_call_id(&call_id).into_response(),
    };
    with_namespace(response, namespace)
}

/// The namespace of a call's function, from its record.
fn namespace_of<Q>(state: &AppState<Q>, record: &CallRecord) -> Option<String> {
    let (_, namespace) = canonical_function(&record.function, &state.default_namespace).ok()?;
    Some(namespace.unwrap_or_else(|| state.default_namespace.to_ascii_lowercase()))
}

/// `response` with the call's namespace for its audit line ([`AuditFacts`]), which the
/// authorization layer knows when there is one, and this handler otherwise: it read the record
/// anyway, so the line costs no second read.
fn with_namespace(mut response: Response, namespace: Option<String>) -> Response {
    if namespace.is_some() {
        response.extensions_mut().insert(AuditFacts {
            namespace,
            ..AuditFacts::default()
        });
    }
    response
}

/// Cancels `call_id`, whose record is `known` when the caller read it already.
async fn cancel_call<Q: CallQueue>(
    state: &AppState<Q>,
    call_id: &str,
    known: Option<CallRecord>,
    namespace: &mut Option<String>,
) -> Result<CallRecord, ApiError> {
    let record = match known {
        Some(record) => record,
        None => load(state, call_id).await?,
    };
    *namespace = namespace_of(state, &record);
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
    // A cancelled call is never run: its stored body (and any result) can go now.
    crate::large::delete_call_blobs(state, call_id).await;
    tracing::info!(call_id, "call cancelled");
    Ok(record)
}

/// `GET /async-calls/{call_id}/result`: `200` with the function's final body, headers and
/// `X-Function-Status`; `202` while the call is not finished; `409` when there is no result to
/// give (too large to keep, or the call ended without a final answer).
pub async fn result<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    PathParam(call_id): PathParam,
) -> Response {
    let mut namespace = None;
    let response = match result_response(&state, &call_id, &mut namespace).await {
        Ok(response) => response,
        Err(e) => e.with_call_id(&call_id).into_response(),
    };
    with_namespace(response, namespace)
}

async fn result_response<Q: CallQueue>(
    state: &AppState<Q>,
    call_id: &str,
    namespace: &mut Option<String>,
) -> Result<Response, ApiError> {
    let record = load(state, call_id).await?;
    *namespace = namespace_of(state, &record);
    let no_result =
        |code: &'static str, message: String| ApiError::new(StatusCode::CONFLICT, code, message);
    match record.state {
        CallState::Scheduled | CallState::Queued | CallState::Running | CallState::Retrying => {
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
        Err(queue_core::backend::BackendError::Sealed(e)) => {
            // Not a passing outage: this gateway lacks the key (or the value was altered).
            tracing::error!(error = %e, "a kept result does not open with this gateway's keys");
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "result_undecryptable",
                format!("the kept result cannot be decrypted here: {e}"),
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
    Ok(result_as_data(call_id, stored))
}

/// A kept result as a response that a browser treats as data, never as a page of the
/// gateway's origin: an inert content type (the function's own only when it cannot render
/// active content; always in `X-Function-Content-Type`), `nosniff`, an attachment, a sandbox
/// CSP, and none of the function's browser-control headers (cookies, CORS, refresh, ...).
fn result_as_data(call_id: &str, stored: queue_core::records::StoredResult) -> Response {
    use axum::http::header;
    let declared = stored
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.clone());
    let mut response = stored.body.into_response();
    let out = response.headers_mut();
    out.remove(header::CONTENT_TYPE);
    for (name, value) in &stored.headers {
        if !headers::is_served_from_result(name) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.append(name, value);
        }
    }
    out.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(headers::served_content_type(declared.as_deref())),
    );
    if let Some(value) = declared.and_then(|v| HeaderValue::from_str(&v).ok()) {
        out.insert("x-function-content-type", value);
    }
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment"),
    );
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; frame-ancestors 'none'"),
    );
    out.insert("x-function-status", HeaderValue::from(stored.status));
    if let Ok(id) = HeaderValue::from_str(call_id) {
        out.insert("x-call-id", id);
    }
    response
}
