//! The async route's path: `/async-function/{name}{rest}`, split where the router and the
//! authorization layer both need it; what a `DELETE /async-function/{name}` addresses
//! ([`DeleteTarget`]); and [`PathParam`], the one path parameter of the other routes, refused
//! as JSON like every other error.

use axum::extract::{FromRequestParts, Path};
use axum::http::StatusCode;
use axum::http::request::Parts;

use crate::error::ApiError;

/// The prefix of the async routes.
pub const ASYNC_PREFIX: &str = "/async-function/";

/// Splits `/async-function/{name}{rest}` from the raw (still percent-encoded) path.
pub fn split_path(raw: &str) -> (&str, &str) {
    let rest = raw.strip_prefix(ASYNC_PREFIX).unwrap_or(raw);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    }
}

/// What `DELETE /async-function/{name}` (no path after the name) addresses, found once, before
/// any other layer of that route, by [`crate::calls::resolve_delete`]: a call whose id is
/// `{name}` (it has a record: OpenFaaS Pro's cancel), or else the function `{name}` (an
/// invocation with method `DELETE`). The authorization layer, the quotas layer, the audit layer
/// and the handler all read it from the request's extensions.
#[derive(Debug, Clone)]
pub enum DeleteTarget {
    /// The call of this record: a cancel.
    Call(Box<queue_core::records::CallRecord>),
    /// The function: an invocation.
    Function,
}

impl DeleteTarget {
    /// Whether it is a cancel.
    pub fn is_call(&self) -> bool {
        matches!(self, Self::Call(_))
    }
}

/// A path parameter that cannot be read (not valid percent-encoded UTF-8): `400` `invalid_path`
/// naming the parameter, as JSON (axum's own rejection is plain text). `status` and `text` are
/// the rejection's; anything but a client error is the gateway's own fault.
pub fn refused_parameter(status: StatusCode, text: &str) -> ApiError {
    if status.is_client_error() {
        ApiError::new(status, "invalid_path", text)
    } else {
        tracing::error!(error = text, "path parameters not extracted");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

/// The route's one path parameter, percent-decoded (axum's `Path<String>` with a JSON
/// rejection: [`refused_parameter`]).
#[derive(Debug)]
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(e) => Err(refused_parameter(e.status(), &e.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_separates_function_and_rest() {
        assert_eq!(split_path("/async-function/fn"), ("fn", ""));
        assert_eq!(split_path("/async-function/fn/"), ("fn", "/"));
        assert_eq!(split_path("/async-function/fn.ns/a/b"), ("fn.ns", "/a/b"));
    }
}
