//! Where a call is: `GET /async-calls/{call_id}` (its record) and
//! `GET /async-calls/{call_id}/result` (the function's final response, when it was kept);
//! `DELETE /async-calls/{call_id}`, and OpenFaaS Pro's `DELETE /async-function/{call_id}`
//! ([`resolve_delete`], [`cancel_addressed`]), cancel it.
//! The `/async-calls/` prefix cannot collide with the `/async-function/{name}/...` routes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::TryStreamExt;
use queue_core::backend::{CallQueue, apply_event};
use queue_core::blobs::{BlobError, BlobKey, BlobRef, BlobStore, ByteRange};
use queue_core::headers;
use queue_core::message::{canonical_function, valid_call_id};
use queue_core::records::{CallRecord, CallState, Event, ResultAvailability, StoredResult};
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
/// `X-Function-Status`; `206` for a satisfiable single `Range: bytes=...` ([`requested_range`]),
/// `416` for an unsatisfiable one; `202` while the call is not finished; `409` when there is no
/// result to give (too large to keep, or the call ended without a final answer). A body kept in
/// the blob store is streamed from it ([`serve_stored`]), never held whole.
pub async fn result<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    PathParam(call_id): PathParam,
    request_headers: HeaderMap,
) -> Response {
    let mut namespace = None;
    let range = requested_range(&request_headers);
    let response = match result_response(&state, &call_id, range, &mut namespace).await {
        Ok(response) => response,
        Err(e) => e.with_call_id(&call_id).into_response(),
    };
    with_namespace(response, namespace)
}

async fn result_response<Q: CallQueue>(
    state: &AppState<Q>,
    call_id: &str,
    range: Option<ByteRange>,
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
        Ok(None) => return Err(result_expired()),
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
    let StoredResult {
        status,
        headers,
        body,
        stored,
    } = stored;
    let meta = ResultMeta { status, headers };
    match stored {
        Some(blob) => serve_stored(state, call_id, &meta, &blob, range).await,
        None => serve_inline(call_id, &meta, Bytes::from(body), range),
    }
}

/// `404` `result_expired`: the record says `stored`, the result (or its blob) is gone.
fn result_expired() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "result_expired",
        "the result is no longer kept",
    )
}

/// `500` `result_unreadable`: the kept result is there but cannot be served as it is.
fn result_unreadable(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "result_unreadable",
        message,
    )
}

/// The single byte range a request asks for: `Range: bytes=a-b`, `bytes=a-` or `bytes=-n`
/// (the unit in any case, optional whitespace around the range). Anything else (another unit,
/// several ranges, `b < a`, not digits, numbers beyond `u64`, several `Range` fields) is
/// ignored, as RFC 9110 14.2 allows: the whole body is sent. So is a range with an `If-Range`:
/// the result has no validator the condition could match, so it never holds (14.3).
pub(crate) fn requested_range(request_headers: &HeaderMap) -> Option<ByteRange> {
    let mut values = request_headers.get_all(axum::http::header::RANGE).iter();
    let value = values.next()?;
    if values.next().is_some() || request_headers.contains_key(axum::http::header::IF_RANGE) {
        return None;
    }
    let text = value.to_str().ok()?;
    let (unit, spec) = text.trim().split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (first, last) = spec.trim().split_once('-')?;
    let number = |digits: &str| -> Option<u64> {
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    match (first.is_empty(), last.is_empty()) {
        (true, true) => None,
        (true, false) => number(last).map(ByteRange::Suffix),
        (false, true) => number(first).map(ByteRange::From),
        (false, false) => {
            let (start, last) = (number(first)?, number(last)?);
            (last >= start).then_some(ByteRange::Inclusive { start, last })
        }
    }
}

/// `416` for a range that selects no byte of a body of `len` bytes: `Content-Range: bytes
/// */len`, the JSON error body.
fn range_not_satisfiable(call_id: &str, len: u64) -> Response {
    let mut response = ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
        format!("the range selects no byte of the result, which has {len} bytes"),
    )
    .with_call_id(call_id)
    .into_response();
    let out = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!("bytes */{len}")) {
        out.insert(axum::http::header::CONTENT_RANGE, value);
    }
    out.insert(
        axum::http::header::ACCEPT_RANGES,
        HeaderValue::from_static("bytes"),
    );
    response
}

/// The status and length headers of a body of `len` bytes of which `sent` is served: `200`
/// with the whole, else `206` with `Content-Range`; `Content-Length` and `Accept-Ranges`
/// either way.
fn with_extent(mut response: Response, sent: std::ops::Range<u64>, len: u64) -> Response {
    use axum::http::header;
    let partial = sent != (0..len);
    let out = response.headers_mut();
    out.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(sent.end - sent.start),
    );
    out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if partial {
        if let Ok(value) = HeaderValue::from_str(&format!(
            "bytes {}-{}/{len}",
            sent.start,
            sent.end.saturating_sub(1)
        )) {
            out.insert(header::CONTENT_RANGE, value);
        }
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    response
}

/// A result kept inline (in the record or beside it): the body, or the range of it.
fn serve_inline(
    call_id: &str,
    meta: &ResultMeta,
    body: Bytes,
    range: Option<ByteRange>,
) -> Result<Response, ApiError> {
    let len = body.len() as u64;
    let sent = match range.map(|r| r.resolve(len)) {
        None => 0..len,
        Some(Ok(sent)) => sent,
        Some(Err(_)) => return Ok(range_not_satisfiable(call_id, len)),
    };
    let (Ok(start), Ok(end)) = (usize::try_from(sent.start), usize::try_from(sent.end)) else {
        return Ok(range_not_satisfiable(call_id, len));
    };
    let body = if sent == (0..len) {
        body
    } else {
        body.slice(start..end)
    };
    let response = result_as_data(call_id, meta, Body::from(body));
    Ok(with_extent(response, sent, len))
}

/// A result whose body is in the blob store: streamed from it (memory does not grow with its
/// size), after checking that the blob is the one the record names (its length and SHA-256).
/// Every chunk is checked by the store before it is sent; a failure mid-way ends the body
/// short of its `Content-Length` (logged), which the client sees as an incomplete response.
async fn serve_stored<Q>(
    state: &AppState<Q>,
    call_id: &str,
    meta: &ResultMeta,
    blob: &BlobRef,
    range: Option<ByteRange>,
) -> Result<Response, ApiError> {
    let Some(blobs) = &state.blobs else {
        tracing::error!(
            call_id,
            "a kept result is in the blob store, and this gateway has none"
        );
        return Err(result_unreadable(
            "the kept result is in the blob store, which this gateway is not configured with",
        ));
    };
    let key = BlobKey::parse(&blob.key).map_err(|e| {
        tracing::error!(call_id, error = %e, "a kept result names an invalid blob key");
        result_unreadable("the kept result names an invalid blob")
    })?;
    let unavailable = |e: &BlobError| {
        tracing::warn!(call_id, error = %e, "reading a result from the blob store failed");
        ApiError::unavailable("results are unavailable now", state.retry_after)
    };
    let store = blobs.store().await.map_err(|e| unavailable(&e))?;
    let read = match store.get(&key, range).await {
        Ok(read) => read,
        Err(BlobError::NotFound) => return Err(result_expired()),
        Err(BlobError::RangeNotSatisfiable { len }) if len == blob.len => {
            return Ok(range_not_satisfiable(call_id, len));
        }
        Err(BlobError::RangeNotSatisfiable { len }) => {
            tracing::error!(
                call_id,
                key = %key,
                recorded = blob.len,
                stored = len,
                "a kept result's blob is not the length its record names"
            );
            return Err(result_unreadable(
                "the kept result's stored body does not match its record",
            ));
        }
        Err(e @ BlobError::Integrity { .. }) => {
            tracing::error!(call_id, error = %e, "a kept result's blob failed its integrity check");
            return Err(result_unreadable(
                "the kept result's stored body failed its integrity check",
            ));
        }
        Err(e @ BlobError::Undecryptable { .. }) => {
            tracing::error!(call_id, error = %e, "a kept result's blob does not open with this gateway's keys");
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "result_undecryptable",
                format!("the kept result cannot be decrypted here: {e}"),
            ));
        }
        Err(e) => return Err(unavailable(&e)),
    };
    if read.info.len != blob.len || !read.info.sha256.eq_ignore_ascii_case(&blob.sha256) {
        tracing::error!(
            call_id,
            key = %key,
            recorded = blob.len,
            stored = read.info.len,
            digest_matches = read.info.sha256.eq_ignore_ascii_case(&blob.sha256),
            "a kept result's blob is not the one its record names"
        );
        return Err(result_unreadable(
            "the kept result's stored body does not match its record",
        ));
    }
    let logged_id = call_id.to_owned();
    let body = read.body.inspect_err(move |e| {
        tracing::warn!(call_id = %logged_id, error = %e, "streaming a kept result failed; the body ends short");
    });
    let response = result_as_data(call_id, meta, Body::from_stream(body));
    Ok(with_extent(response, read.range, blob.len))
}

/// What a kept result's response carries besides its body.
struct ResultMeta {
    /// The function's status.
    status: u16,
    /// The function's headers.
    headers: Vec<(String, String)>,
}

/// A kept result as a response that a browser treats as data, never as a page of the
/// gateway's origin: an inert content type (the function's own only when it cannot render
/// active content; always in `X-Function-Content-Type`), `nosniff`, an attachment, a sandbox
/// CSP, and none of the function's browser-control headers (cookies, CORS, refresh, ...).
fn result_as_data(call_id: &str, stored: &ResultMeta, body: Body) -> Response {
    use axum::http::header;
    let declared = stored
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .map(|(_, value)| value.clone());
    let mut response = Response::new(body);
    let out = response.headers_mut();
    out.remove(header::CONTENT_TYPE);
    for (name, value) in &stored.headers {
        if !headers::is_served_from_result(name) || is_extent_header(name) {
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

/// Headers that describe the bytes sent, which the gateway sets itself ([`with_extent`]): a
/// function's own would contradict them.
fn is_extent_header(name: &str) -> bool {
    ["content-length", "content-range", "accept-ranges"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use axum::http::header::{IF_RANGE, RANGE};

    use super::*;

    fn range_of(values: &[&str]) -> Option<ByteRange> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(RANGE, HeaderValue::from_str(value).unwrap());
        }
        requested_range(&headers)
    }

    #[test]
    fn a_single_byte_range_is_read_and_anything_else_is_ignored() {
        assert_eq!(
            range_of(&["bytes=100-199"]),
            Some(ByteRange::Inclusive {
                start: 100,
                last: 199
            })
        );
        assert_eq!(range_of(&["bytes=5-"]), Some(ByteRange::From(5)));
        assert_eq!(range_of(&["bytes=-10"]), Some(ByteRange::Suffix(10)));
        assert_eq!(range_of(&["Bytes = 0-0 "]), None, "no space before '='");
        assert_eq!(
            range_of(&[" BYTES=0-0 "]),
            Some(ByteRange::Inclusive { start: 0, last: 0 })
        );
        assert_eq!(range_of(&["bytes=-0"]), Some(ByteRange::Suffix(0)));
        for ignored in [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=1-2,4-5",
            "bytes=0-1,",
            "bytes=9-3",
            "bytes=+1-2",
            "bytes=1-2-3",
            "bytes=a-b",
            "bytes=0x10-",
            "items=0-1",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(range_of(&[ignored]), None, "{ignored:?}");
        }
        assert_eq!(range_of(&["bytes=0-1", "bytes=2-3"]), None);
        assert_eq!(range_of(&[]), None);
        let mut conditional = HeaderMap::new();
        conditional.insert(RANGE, HeaderValue::from_static("bytes=0-1"));
        conditional.insert(IF_RANGE, HeaderValue::from_static("\"x\""));
        assert_eq!(requested_range(&conditional), None);
    }

    fn meta() -> ResultMeta {
        ResultMeta {
            status: 201,
            headers: vec![
                ("content-type".into(), "text/html".into()),
                ("content-range".into(), "bytes 0-0/1".into()),
                ("accept-ranges".into(), "none".into()),
                ("x-kept".into(), "yes".into()),
            ],
        }
    }

    #[tokio::test]
    async fn an_inline_result_answers_ranges_like_a_stored_one() {
        use axum::http::header;
        let body = Bytes::from_static(b"0123456789");
        let whole = serve_inline("c", &meta(), body.clone(), None).unwrap();
        assert_eq!(whole.status(), StatusCode::OK);
        assert_eq!(whole.headers()[header::CONTENT_LENGTH], "10");
        assert_eq!(whole.headers()[header::ACCEPT_RANGES], "bytes");
        assert!(whole.headers().get(header::CONTENT_RANGE).is_none());
        assert_eq!(whole.headers()["x-kept"], "yes");
        assert_eq!(whole.headers()["x-function-status"], "201");
        assert_eq!(
            whole.headers()[header::CONTENT_TYPE],
            "application/octet-stream"
        );

        let part = serve_inline(
            "c",
            &meta(),
            body.clone(),
            Some(ByteRange::Inclusive { start: 2, last: 4 }),
        )
        .unwrap();
        assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(part.headers()[header::CONTENT_RANGE], "bytes 2-4/10");
        assert_eq!(part.headers()[header::CONTENT_LENGTH], "3");
        assert_eq!(
            part.headers().get_all(header::ACCEPT_RANGES).iter().count(),
            1
        );
        let bytes = axum::body::to_bytes(part.into_body(), 100).await.unwrap();
        assert_eq!(&bytes[..], b"234");

        // A suffix longer than the body is the whole body: 200.
        let all = serve_inline("c", &meta(), body.clone(), Some(ByteRange::Suffix(50))).unwrap();
        assert_eq!(all.status(), StatusCode::OK);

        let refused = serve_inline("c", &meta(), body, Some(ByteRange::From(10))).unwrap();
        assert_eq!(refused.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(refused.headers()[header::CONTENT_RANGE], "bytes */10");
        assert_eq!(refused.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = axum::body::to_bytes(refused.into_body(), 1000)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["error"], "range_not_satisfiable");
        assert_eq!(json["call_id"], "c");
    }
}
