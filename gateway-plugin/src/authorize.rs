//! The authorization layer in front of every non-public route ([`authorize`]): who calls
//! ([`crate::auth::Authenticator`]), which scope the request needs here (the function's
//! namespace, a call's recorded namespace, admin of some namespace for the admin views, which
//! then hold only those namespaces: [`crate::tenancy`]; every namespace for `/metrics`; for
//! `DELETE /async-function/{name}`, a cancel's or an invocation's as the name is a call's id
//! or not: [`DeleteTarget`]), and the `401`/`403`/`404` answers. Apart from [`crate::auth`] so that the authenticators depend on
//! nothing of the router (no module cycle: `auth` ← `state` ← `calls` ← here).

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use queue_core::backend::CallQueue;
use queue_core::message::canonical_function;
use serde_json::json;

use crate::audit::AuditFacts;
use crate::auth::{Action, Authenticator, Denied, Needed, Permission, Principal};
use crate::error::ApiError;
use crate::paths::DeleteTarget;
use crate::state::AppState;

fn unauthorized(auth: &Authenticator, denied: Denied) -> Response {
    let message = match denied {
        Denied::Missing => "credentials required",
        Denied::Invalid(_) => "invalid credentials",
        Denied::Unavailable(why) => {
            let mut response =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable", why)
                    .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return response;
        }
    };
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    for value in auth.challenge(denied) {
        response
            .headers_mut()
            .append(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn forbidden(needed: &dyn std::fmt::Display) -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(json!({
            "error": "forbidden",
            "message": format!("this request needs the scope {needed}"),
            "missing_scope": needed.to_string(),
        })),
    )
        .into_response()
}

/// The guard of invocations authenticated by basic auth: a browser that cached the gateway's
/// basic-auth credentials sends them with a cross-site "simple" `POST` or `GET` too (no
/// preflight, so CORS does not stop it), so such a request is refused unless its `Origin` is
/// one the CORS settings allow for this function and method ([`crate::site::cross_site`]).
/// Bearer tokens are never attached by a browser on its own and are not held to this.
fn basic_auth_cross_site<Q>(state: &AppState<Q>, request: &Request) -> Option<Response> {
    let path = request.uri().path();
    let method = request.method().as_str();
    let cors = state.cors.as_ref().map(|file| file.current());
    let reason = crate::site::cross_site(request.headers(), |origin| {
        cors.is_some_and(|c| c.allows(crate::cors::Kind::Function, path, origin, method))
    })?;
    tracing::warn!(
        path,
        reason,
        "cross-site invocation with basic auth refused"
    );
    Some(
        ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            format!(
                "{reason}: basic-auth credentials (which a browser sends by itself) are not accepted on an invocation from another site's page; send a bearer token, or list the page's origin in the CORS file"
            ),
        )
        .into_response(),
    )
}

/// The namespace of a function as addressed (`name` or `name.namespace`).
fn namespace_of(addressed: &str, default_namespace: &str) -> Result<String, ApiError> {
    let (_, ns) = canonical_function(addressed, default_namespace)
        .map_err(|e| ApiError::bad_request("invalid_function_name", e.to_string()))?;
    Ok(ns.unwrap_or_else(|| default_namespace.to_ascii_lowercase()))
}

fn path_param<'a>(params: &'a axum::extract::RawPathParams, key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// `403`: the caller holds `action` in no namespace at all (said before a call's record is
/// read, so it tells nothing of the call).
fn missing_call_scope(principal: &Principal, action: Action, facts: &mut AuditFacts) -> Response {
    let needed = format!("{}:<namespace of the call>", action.as_str());
    tracing::info!(subject = principal.subject, needed, "authorization refused");
    facts.denied = Some("missing scope");
    forbidden(&needed)
}

/// Whether `principal` may `action` the call of `record`: `None` if so, else the refusal:
/// `403` without `action` anywhere, the `404` of an unknown call for a call of a namespace it
/// does not hold `action` in.
fn call_scope<Q>(
    state: &AppState<Q>,
    principal: &Principal,
    action: Action,
    record: &queue_core::records::CallRecord,
    facts: &mut AuditFacts,
) -> Option<Response> {
    if !principal.scopes.any(action) {
        return Some(missing_call_scope(principal, action, facts));
    }
    let ns = match namespace_of(&record.function, &state.default_namespace) {
        Ok(ns) => ns,
        Err(e) => return Some(e.into_response()),
    };
    facts.namespace = Some(ns.clone());
    let needed = Needed::In(action, ns);
    if !principal.scopes.grants(&needed) {
        tracing::info!(subject = principal.subject, needed = %needed, "authorization refused (answered as an unknown call)");
        facts.denied = Some("call of a namespace not granted (answered as unknown)");
        return Some(
            crate::calls::unknown_call()
                .with_call_id(&record.call_id)
                .into_response(),
        );
    }
    None
}

/// The layer in front of every non-public route: lets the request through only if its caller
/// holds the scope `permission` needs here. What it found (who, which namespace, why it
/// refused) goes with the answer, in its extensions, for the audit log ([`AuditFacts`]).
pub async fn authorize<Q: CallQueue>(
    state: Arc<AppState<Q>>,
    auth: Arc<Authenticator>,
    permission: Permission,
    request: Request,
    next: Next,
) -> Response {
    let mut facts = AuditFacts::default();
    let mut response = decide(&state, &auth, permission, request, next, &mut facts).await;
    response.extensions_mut().insert(facts);
    response
}

async fn decide<Q: CallQueue>(
    state: &Arc<AppState<Q>>,
    auth: &Authenticator,
    permission: Permission,
    request: Request,
    next: Next,
    facts: &mut AuditFacts,
) -> Response {
    // `DELETE /async-function/{name}`: a cancel or an invocation, found before this layer.
    let target = match permission {
        Permission::CancelOrInvoke => match request.extensions().get::<DeleteTarget>() {
            Some(DeleteTarget::Function) if auth.is_public(Permission::Invoke) => {
                // An invocation, open as on the other async routes.
                return next.run(request).await;
            }
            Some(target) => Some(target.clone()),
            None => {
                tracing::error!("DELETE /async-function/{{name}} without its target");
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
                .into_response();
            }
        },
        _ => None,
    };
    let cancelled = match &target {
        Some(DeleteTarget::Call(record)) => Some(record.as_ref()),
        _ => None,
    };
    let invokes = permission == Permission::Invoke
        || (permission == Permission::CancelOrInvoke && cancelled.is_none());
    let principal = match auth.authenticate(request.headers()).await {
        Ok(p) => p,
        Err(denied) => {
            let reason = match denied {
                Denied::Missing => "no credentials",
                Denied::Invalid(why) | Denied::Unavailable(why) => why,
            };
            tracing::info!(
                path = request.uri().path(),
                reason,
                "authentication refused"
            );
            facts.denied = Some(reason);
            return unauthorized(auth, denied);
        }
    };
    facts.subject = Some(principal.subject.clone());
    facts.auth_method = Some(principal.method);
    if invokes
        && principal.method == "basic"
        && let Some(refused) = basic_auth_cross_site(state, &request)
    {
        facts.denied = Some("cross-site request with basic auth");
        return refused;
    }
    let (mut parts, body) = request.into_parts();
    let params =
        match axum::RequestPartsExt::extract::<axum::extract::RawPathParams>(&mut parts).await {
            Ok(p) => p,
            Err(e) => {
                return crate::paths::refused_parameter(e.status(), &e.body_text()).into_response();
            }
        };
    // Percent-decoded, as axum's `Path` gives them to the handler.
    let decoded = |key: &str| path_param(&params, key).unwrap_or_default().to_owned();
    let needed = match (permission, cancelled) {
        (Permission::Public, _) => None,
        (Permission::CancelOrInvoke, Some(record)) => {
            // OpenFaaS Pro's cancel: answered as `DELETE /async-calls/{id}`.
            if let Some(refused) = call_scope(state, &principal, Action::Cancel, record, facts) {
                return refused;
            }
            None
        }
        (Permission::Invoke | Permission::CancelOrInvoke, _) => {
            let (addressed, _) = crate::paths::split_path(parts.uri.path());
            match namespace_of(addressed, &state.default_namespace) {
                Ok(ns) => {
                    facts.namespace = Some(ns.clone());
                    Some(Needed::In(Action::Invoke, ns))
                }
                Err(e) => return e.into_response(),
            }
        }
        (Permission::AdminFunction, _) => {
            let name = decoded("name");
            match namespace_of(&name, &state.default_namespace) {
                Ok(ns) => {
                    facts.namespace = Some(ns.clone());
                    Some(Needed::In(Action::Admin, ns))
                }
                Err(e) => return e.into_response(),
            }
        }
        (Permission::Admin, _) => {
            // Admin of some namespace: the handler shows and changes only those
            // ([`crate::tenancy::AdminView`]).
            if !principal.scopes.any(Action::Admin) {
                tracing::info!(
                    subject = principal.subject,
                    "authorization refused (no admin scope)"
                );
                facts.denied = Some("missing scope");
                return forbidden(&"admin:<namespace>");
            }
            None
        }
        (Permission::Metrics, _) => Some(Needed::Everywhere(Action::Admin)),
        (Permission::Read | Permission::Cancel, _) => {
            let action = match permission {
                Permission::Cancel => Action::Cancel,
                _ => Action::Read,
            };
            if !principal.scopes.any(action) {
                return missing_call_scope(&principal, action, facts);
            }
            let call_id = decoded("call_id");
            let record = match crate::calls::load(state, &call_id).await {
                Ok(r) => r,
                Err(e) => return e.with_call_id(&call_id).into_response(),
            };
            if let Some(refused) = call_scope(state, &principal, action, &record, facts) {
                return refused;
            }
            None
        }
    };
    if let Some(needed) = needed
        && !principal.scopes.grants(&needed)
    {
        tracing::info!(subject = principal.subject, needed = %needed, "authorization refused");
        facts.denied = Some("missing scope");
        return forbidden(&needed);
    }
    let mut request = Request::from_parts(parts, body);
    request.extensions_mut().insert(Arc::new(principal));
    next.run(request).await
}
