//! The audit log: one JSON line per event, for every admin change (pause, resume, dead-letter
//! replay and purge), every cancel, every result read, every authentication or
//! authorization refusal (`401`, `403`, and the `404` given for a call of another namespace),
//! and every `429` of the quotas ([`Limited`]).
//!
//! [`layer`] sits in front of the authorization layer ([`crate::authorize`]) and of the quotas
//! layer on the routes [`classify`] names, so no handler writes audit lines itself. The
//! authorization layer leaves what it found ([`AuditFacts`]: the subject, the namespace, why it
//! refused) in the answer's extensions, the quotas layer its refusal; this layer adds the request id, the client address and the outcome, and writes
//! the line ([`AuditLog`]): to the `--audit-log` file (appended, one `write` per line, no
//! buffering in the process), or, without a file, as an `info` event of the `tracing` target
//! `audit`.
//!
//! Never in a line: a credential, a body, a query string, a header value (the client's
//! `X-Request-Id` only when it is a short token of safe characters).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use queue_core::backend::CallQueue;
use queue_core::message::{canonical_function, valid_call_id};

use crate::auth::Permission;
use crate::error::ApiError;
use crate::paths::DeleteTarget;
use crate::state::AppState;
use crate::verb::Verb;

pub mod log;

pub use log::{AuditError, AuditEvent, AuditLog, Limited};

/// What the authorization layer found, left in the answer's extensions for [`layer`]; without
/// an authorization layer, the handlers of `/async-calls/...` leave the call's namespace, read
/// from the record they load anyway ([`crate::calls`]).
#[derive(Debug, Clone, Default)]
pub struct AuditFacts {
    /// The authenticated subject.
    pub subject: Option<String>,
    /// How it authenticated.
    pub auth_method: Option<&'static str>,
    /// The namespace the request concerns (from the path or the call's record).
    pub namespace: Option<String>,
    /// Why the request was refused, when the authorization layer refused it.
    pub denied: Option<&'static str>,
}

/// What the resource of a route is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Nothing in particular (a queue-wide view).
    None,
    /// The `{call_id}` parameter.
    CallId,
    /// The `{name}` parameter of `DELETE /async-function/{name}`, a call's id (OpenFaaS Pro's
    /// cancel).
    AddressedCall,
    /// The function of the async path.
    AsyncFunction,
    /// The function of the `{name}` parameter.
    Function,
    /// The `{sequence}` parameter of a dead letter.
    Sequence,
    /// The dead letters selected by the body (`sequences`, `call_ids` or `all`).
    DeadLetterSelection,
}

/// How a route is audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audited {
    /// The action's name in the log.
    pub action: &'static str,
    /// Every request is logged (else only refusals by authentication or authorization).
    pub always: bool,
    /// What the resource is.
    pub resource: Resource,
    /// The route's path template.
    pub route: &'static str,
    /// A queue-wide route (`admin:*`): its namespace is `*`.
    pub queue_wide: bool,
}

/// How the route `path` with `methods` and `permission` is audited; `None` for public routes
/// (nothing to refuse, nothing to change). Every other route of the table has an action (a unit
/// test holds it to the table).
pub fn classify(methods: &[Verb], path: &'static str, permission: Permission) -> Option<Audited> {
    let changes = methods.iter().any(|m| *m != Verb::Get);
    let (action, always, resource) = match (permission, path) {
        (Permission::Public, _) => return None,
        (Permission::Invoke, _) => ("invoke", false, Resource::AsyncFunction),
        (Permission::Cancel, _) => ("call.cancel", true, Resource::CallId),
        // A cancel; an invocation when the name is no call's ([`Audited::as_invocation`]).
        (Permission::CancelOrInvoke, _) => ("call.cancel", true, Resource::AddressedCall),
        (Permission::Read, "/async-calls/{call_id}/result") => {
            ("call.result", true, Resource::CallId)
        }
        (Permission::Read, _) => ("call.read", false, Resource::CallId),
        (Permission::AdminFunction, p) if p.ends_with("/pause") => {
            ("function.pause", true, Resource::Function)
        }
        (Permission::AdminFunction, p) if p.ends_with("/resume") => {
            ("function.resume", true, Resource::Function)
        }
        (Permission::AdminFunction, _) => ("function.admin", changes, Resource::Function),
        (Permission::Metrics, _) => ("metrics", false, Resource::None),
        (Permission::Admin, "/system/async/dead-letters/replay") => {
            ("dead_letters.replay", true, Resource::DeadLetterSelection)
        }
        (Permission::Admin, "/system/async/dead-letters/purge") => {
            ("dead_letters.purge", true, Resource::DeadLetterSelection)
        }
        (Permission::Admin, "/system/async/dead-letters/{sequence}") => {
            ("dead_letters.show", false, Resource::Sequence)
        }
        (Permission::Admin, "/system/async/dead-letters/call/{call_id}") => {
            ("dead_letters.show", false, Resource::CallId)
        }
        (Permission::Admin, "/system/async/dead-letters") => {
            ("dead_letters.list", false, Resource::None)
        }
        (Permission::Admin, "/system/async/queue") => ("queue.stats", false, Resource::None),
        (Permission::Admin, "/system/async/stats") => ("live.stats", false, Resource::None),
        (Permission::Admin, p) if p.starts_with("/dashboard") => {
            ("dashboard", false, Resource::None)
        }
        // Any other admin route: a change is always logged.
        (Permission::Admin, _) => ("admin", changes, Resource::None),
    };
    Some(Audited {
        action,
        always,
        resource,
        route: path,
        queue_wide: matches!(permission, Permission::Admin | Permission::Metrics),
    })
}

impl Audited {
    /// `DELETE /async-function/{name}` of a function (not a call's id): audited as every
    /// other invocation.
    fn as_invocation(self) -> Self {
        Self {
            action: "invoke",
            always: false,
            resource: Resource::AsyncFunction,
            ..self
        }
    }
}

/// The largest dead-letter selection read for the log (a selection is a few ids).
const SELECTION_LIMIT: usize = 64 * 1024;

/// A client's `X-Request-Id` is kept when it is 1-128 characters of `A-Z a-z 0-9 - _ . :`.
fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The dead letters a replay or purge body selects, for the log: `all`, or the sequences and
/// call ids (an id that is not a valid call id is counted, not written).
fn selection_of(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("all").and_then(serde_json::Value::as_bool) == Some(true) {
        return Some("all".to_owned());
    }
    let mut parts = Vec::new();
    if let Some(sequences) = value.get("sequences").and_then(|v| v.as_array()) {
        let list: Vec<String> = sequences
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .map(|s| s.to_string())
            .collect();
        parts.push(format!("sequences={}", list.join(",")));
    }
    if let Some(ids) = value.get("call_ids").and_then(|v| v.as_array()) {
        let valid: Vec<&str> = ids
            .iter()
            .filter_map(|v| v.as_str())
            .filter(|id| valid_call_id(id))
            .collect();
        // Separated by spaces: a call id may hold any visible ASCII (commas too), never a space.
        let mut text = format!("call_ids={}", valid.join(" "));
        let invalid = ids.len() - valid.len();
        if invalid > 0 {
            text.push_str(&format!(" (+{invalid} invalid)"));
        }
        parts.push(text);
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

fn path_param<'a>(params: &'a axum::extract::RawPathParams, key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// The function `addressed` names, canonical, and its namespace.
fn function_and_namespace(addressed: &str, default_namespace: &str) -> Option<(String, String)> {
    let (name, ns) = canonical_function(addressed, default_namespace).ok()?;
    let ns = ns.unwrap_or_else(|| default_namespace.to_ascii_lowercase());
    Some((format!("{name}.{ns}"), ns))
}

/// The layer: notes the request's id and client, runs the rest, writes the line if `audited`
/// says so or the answer is a refusal. On a route where only refusals are written (the async
/// path among them) an allowed request costs a header lookup and a clone of its URI.
pub async fn layer<Q: CallQueue>(
    state: Arc<AppState<Q>>,
    log: Arc<AuditLog>,
    audited: Audited,
    request: Request,
    next: Next,
) -> Response {
    // Found before this layer ([`crate::calls::resolve_delete`]).
    let audited = match request.extensions().get::<DeleteTarget>() {
        Some(DeleteTarget::Function) => audited.as_invocation(),
        _ => audited,
    };
    let client_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| valid_request_id(id))
        .map(str::to_owned);
    let peer = request
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let client = crate::peer::client_address(
        peer,
        &state.trusted_proxies,
        (request.headers().get_all("x-forwarded-for").iter()).filter_map(|v| v.to_str().ok()),
    );
    let method = request.method().clone();
    let uri = request.uri().clone();
    let (mut parts, body) = request.into_parts();
    let params = match audited.resource {
        Resource::CallId | Resource::AddressedCall | Resource::Sequence | Resource::Function => {
            axum::RequestPartsExt::extract::<axum::extract::RawPathParams>(&mut parts)
                .await
                .ok()
        }
        _ => None,
    };
    let mut noted = Noted {
        method,
        client_id,
        peer,
        client,
        namespace: None,
        resource: None,
    };
    let body = if audited.resource == Resource::DeadLetterSelection {
        match axum::body::to_bytes(body, SELECTION_LIMIT).await {
            Ok(bytes) => {
                noted.resource = selection_of(&bytes);
                axum::body::Body::from(bytes)
            }
            Err(_) => {
                let response = ApiError::bad_request(
                    "invalid_body",
                    format!("a dead-letter selection is JSON of at most {SELECTION_LIMIT} bytes"),
                )
                .into_response();
                return finish(&log, audited, &noted, response);
            }
        }
    } else {
        body
    };
    let response = next.run(Request::from_parts(parts, body)).await;
    if !written(audited, &response) {
        return response;
    }
    // What the line names, worked out only when it is written.
    let param = |key| params.as_ref().and_then(|p| path_param(p, key));
    match audited.resource {
        Resource::None | Resource::DeadLetterSelection => {}
        Resource::CallId | Resource::AddressedCall => {
            let key = match audited.resource {
                Resource::AddressedCall => "name",
                _ => "call_id",
            };
            noted.resource = param(key).filter(|id| valid_call_id(id)).map(str::to_owned);
        }
        Resource::Sequence => {
            noted.resource = param("sequence")
                .and_then(|s| s.parse::<u64>().ok())
                .map(|s| format!("sequence={s}"));
        }
        Resource::AsyncFunction | Resource::Function => {
            let addressed = match audited.resource {
                Resource::Function => param("name").unwrap_or_default(),
                _ => crate::paths::split_path(uri.path()).0,
            };
            if let Some((function, ns)) =
                function_and_namespace(addressed, &state.default_namespace)
            {
                noted.resource = Some(function);
                noted.namespace = Some(ns);
            }
        }
    }
    if audited.queue_wide {
        noted.namespace = Some("*".to_owned());
    }
    let facts = response.extensions().get::<AuditFacts>();
    if let Some(ns) = facts.and_then(|f| f.namespace.clone()) {
        noted.namespace = Some(ns);
    }
    finish(&log, audited, &noted, response)
}

/// Whether the answer `response` of a route `audited` is written: always, or for a refusal
/// (by authentication, authorization, a cross-site guard, a rate limit or quota).
fn written(audited: Audited, response: &Response) -> bool {
    audited.always
        || response
            .extensions()
            .get::<AuditFacts>()
            .is_some_and(|f| f.denied.is_some())
        || response.extensions().get::<Limited>().is_some()
        || matches!(
            response.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        )
}

/// What [`layer`] noted of a request before it ran.
struct Noted {
    method: Method,
    client_id: Option<String>,
    peer: Option<IpAddr>,
    client: Option<IpAddr>,
    namespace: Option<String>,
    resource: Option<String>,
}

fn finish(log: &AuditLog, audited: Audited, noted: &Noted, mut response: Response) -> Response {
    let status = response.status();
    let facts = response.extensions().get::<AuditFacts>();
    let denied_by_layer = facts.and_then(|f| f.denied);
    let refused = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
    if !written(audited, &response) {
        return response;
    }
    let limited = response.extensions().get::<Limited>().map(|l| l.0);
    let outcome = if denied_by_layer.is_some() || refused {
        "denied"
    } else if limited.is_some() {
        "limited"
    } else if status.is_success() || status.is_redirection() {
        "ok"
    } else {
        "error"
    };
    let reason = denied_by_layer.or(limited).or(match status {
        StatusCode::UNAUTHORIZED => Some("authentication refused"),
        // Not the authorization layer's: the cross-site guard of the admin changes.
        StatusCode::FORBIDDEN => Some("cross-site request"),
        _ => None,
    });
    let request_id = (noted.client_id.clone()).unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let subject = facts.and_then(|f| f.subject.clone());
    let auth_method = facts.and_then(|f| f.auth_method);
    log.write(&AuditEvent {
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        request_id: &request_id,
        subject: subject.as_deref(),
        auth_method,
        action: audited.action,
        namespace: noted.namespace.as_deref(),
        resource: noted.resource.as_deref(),
        outcome,
        status: status.as_u16(),
        reason,
        client: noted.client.map(|ip| ip.to_string()),
        peer: noted.peer.map(|ip| ip.to_string()),
        method: noted.method.as_str(),
        route: audited.route,
    });
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_name_what_they_select_and_nothing_else() {
        assert_eq!(selection_of(br#"{"all": true}"#).as_deref(), Some("all"));
        assert_eq!(
            selection_of(br#"{"sequences": [3, 4], "call_ids": ["job-1", "a,b", "has space"]}"#)
                .as_deref(),
            Some("sequences=3,4 call_ids=job-1 a,b (+1 invalid)")
        );
        assert_eq!(selection_of(b"not json"), None);
    }

    #[test]
    fn request_ids_are_safe_tokens() {
        assert!(valid_request_id("req-1.2:3_x"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }

    #[test]
    fn lines_go_to_the_file_one_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(Some(&path)).unwrap();
        for id in ["a", "b"] {
            log.write(&AuditEvent {
                time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                request_id: id,
                subject: None,
                auth_method: None,
                action: "call.cancel",
                namespace: None,
                resource: None,
                outcome: "ok",
                status: 200,
                reason: None,
                client: None,
                peer: None,
                method: "DELETE",
                route: "/async-calls/{call_id}",
            });
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["request_id"], "b");
        assert!(lines[0]["subject"].is_null());
        assert!(matches!(
            AuditLog::open(Some(std::path::Path::new("/nonexistent-dir/audit.log"))),
            Err(AuditError::Open { .. })
        ));
    }
}
