//! Error answers: every error is JSON `{"error": "<code>", "message": "<what is wrong>"}` with
//! the right status, and the call id when one was assigned.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation (never contains request data beyond what the client sent
    /// in the URL or a header it named).
    pub message: String,
    /// `Retry-After` to send, for 503.
    pub retry_after: Option<Duration>,
    /// Call id assigned to the request, if any.
    pub call_id: Option<String>,
    /// The state of the call the answer is about (`409 call_id_in_use`: the existing call's).
    pub state: Option<queue_core::records::CallState>,
    /// The limit a `413` is about, bytes (`max_bytes` in the body).
    pub limit: Option<u64>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    call_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<queue_core::records::CallState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_bytes: Option<u64>,
}

impl ApiError {
    /// A new error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            call_id: None,
            state: None,
            limit: None,
        }
    }

    /// `413` with the limit (in the body as `max_bytes`).
    pub fn too_large(code: &'static str, message: impl Into<String>, limit: u64) -> Self {
        Self {
            limit: Some(limit),
            ..Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, message)
        }
    }

    /// 400.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_unavailable",
                message,
            )
        }
    }

    /// Attaches the state of the call the answer is about (in the body).
    pub fn with_state(mut self, state: queue_core::records::CallState) -> Self {
        self.state = Some(state);
        self
    }

    /// Attaches the call id (sent as `X-Call-Id` and in the body).
    pub fn with_call_id(mut self, call_id: &str) -> Self {
        self.call_id = Some(call_id.to_owned());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: self.code,
            message: &self.message,
            call_id: self.call_id.as_deref(),
            state: self.state,
            max_bytes: self.limit,
        };
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(after) = self.retry_after {
            let secs = after.as_secs().max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(id) = self
            .call_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            headers.insert("x-call-id", id);
        }
        response
    }
}

/// `400 unreadable_body`: the body did not arrive whole.
pub(crate) fn unreadable_body() -> ApiError {
    ApiError::bad_request("unreadable_body", "could not read the request body")
}
