//! HTTP routes. Every route is declared in [`routes`], with the permission it needs; [`router`]
//! builds the router from that table and puts the authorization layer ([`crate::auth`]) in
//! front of every route that is not public.
//!
//! - `POST|PUT|PATCH|DELETE|GET /async-function/{name}[.{namespace}][/{path...}][?query]`
//!   → `202 Accepted` once the queue stored the call. `DELETE /async-function/{name}` with
//!   nothing after the name is OpenFaaS Pro's cancel when `{name}` is the id of a call with a
//!   record ([`crate::paths::DeleteTarget`]); `/async-function/{name}/` invokes with `DELETE`
//!   whatever the name.
//! - `GET /async-calls/{call_id}[/result]`, `DELETE /async-calls/{call_id}`: where a call is, its
//!   kept result, cancel ([`crate::calls`]).
//! - `/system/async/...`: the queue admin API ([`crate::admin`]).
//! - `GET /metrics`: Prometheus metrics; `GET /system/async/stats`: live figures
//!   ([`crate::live`]); `GET /dashboard/`: the dashboard page (`dashboard.html`).
//! - `GET /healthz` (process up), `GET /readyz` (the queue can take calls: with JetStream, NATS
//!   connected and the stream present; with `--jwks-url`, the JWT signing keys fetched).
//! - `GET /openapi.json`: the OpenAPI document of these routes ([`crate::openapi`]).
//! - Anything else: the fallback, declared in [`UNROUTED`]: `404`, or in front mode
//!   (`--upstream-gateway`) passed to the OpenFaaS gateway ([`crate::upstream`]).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use queue_core::backend::{CallQueue, PublishError, RecordWriteError, Revision};
use queue_core::blobs::BlobRef;
use queue_core::headers::is_dropped_from_client;
use queue_core::message::{
    BodyLocation, CallMeta, InvalidCall, METHODS, QueuedCall, call_id_problem, canonical_function,
    parse_callback_url, valid_call_id, validate_path,
};
use queue_core::records::{self, CallState, Event, idempotency_key};
use serde_json::json;

use crate::auth::Permission;
use crate::error::ApiError;
use crate::state::AppState;

use crate::paths::{DeleteTarget, split_path};

/// Writes the record of a call about to be queued; returns its revision and whether this
/// request created it. A record already there is the same call retried (still queued, same
/// function, within the queue's duplicate window, so publishing again stores it once) or
/// another call's: then the id is refused with 409 rather than rebinding another call's record,
/// result and dedup state. Only a client's own id can meet an existing record: the request's
/// digest, which tells a retry from another call, is taken and kept for those alone.
async fn record_call<Q: CallQueue>(
    state: &AppState<Q>,
    call: &QueuedCall,
    received_at: u64,
    client_id: bool,
) -> Result<(Revision, bool), ApiError> {
    let call_id = call.meta.call_id.as_str();
    let function = call.meta.qualified_function();
    let accepted = Event::Accepted {
        function: function.clone(),
        at: received_at,
        has_callback: call.meta.callback_url.is_some(),
        not_before: call.meta.not_before_unix_nanos,
    };
    let mut record = records::apply(call_id, None, &accepted, received_at);
    let digest = client_id.then(|| request_digest(call));
    record.request_digest.clone_from(&digest);
    let unavailable = |e: &dyn std::fmt::Display| {
        tracing::warn!(call_id, error = %e, "could not write the call record");
        ApiError::unavailable(
            "call records are unavailable now; retry with the same X-Call-Id",
            state.retry_after,
        )
    };
    match state.queue.write_record(call_id, None, &record, None).await {
        Ok(revision) => return Ok((revision, true)),
        Err(RecordWriteError::Backend(e)) => return Err(unavailable(&e)),
        Err(RecordWriteError::Conflict) => {}
    }
    let window = u64::try_from(state.queue.duplicate_window().as_nanos()).unwrap_or(u64::MAX);
    match state.queue.record_entry(call_id).await {
        Ok(Some(queue_core::backend::RecordEntry {
            record: existing,
            revision,
            ..
        })) if matches!(existing.state, CallState::Queued | CallState::Scheduled)
            && existing.function == function
            && existing.attempts.is_empty()
            && digest.is_some()
            && existing.request_digest == digest
            && received_at.saturating_sub(existing.accepted_at) < window =>
        {
            Ok((revision, false))
        }
        Ok(Some(entry)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "call_id_in_use",
            "this X-Call-Id belongs to another call (its state is given); send a new id (or \
             none, to get one), or the Idempotency-Key of that call to be answered as it was",
        )
        .with_state(entry.record.state)),
        // Expired between the two requests: the client may simply retry.
        Ok(None) => Err(unavailable(&"the record vanished while it was read")),
        Err(e) => Err(unavailable(&e)),
    }
}

pub use crate::verb::Verb;

/// The methods of an async call.
const CALL_METHODS: &[Verb] = &[Verb::Post, Verb::Put, Verb::Patch, Verb::Delete, Verb::Get];
/// The methods of an async call to `/async-function/{name}` but `DELETE`, which is a cancel
/// there when the name is a call's id ([`delete_function`]).
const CALL_METHODS_BUT_DELETE: &[Verb] = &[Verb::Post, Verb::Put, Verb::Patch, Verb::Get];
/// The CORS preflight: public (browsers send no credentials with it), answered from the CORS
/// settings alone ([`crate::cors`]).
const PREFLIGHT: &[Verb] = &[Verb::Options];

/// One route: its methods, its path, the permission it needs, its handler.
pub struct Route<Q> {
    /// The methods.
    pub methods: &'static [Verb],
    /// The path (axum syntax).
    pub path: &'static str,
    /// What a caller needs ([`crate::auth`]).
    pub permission: Permission,
    endpoint: MethodRouter<Arc<AppState<Q>>>,
    /// Whether `endpoint` has its own answer for other methods.
    method_fallback: bool,
}

impl<Q: CallQueue> Route<Q> {
    fn new<H, T>(
        methods: &'static [Verb],
        path: &'static str,
        permission: Permission,
        handler: H,
    ) -> Self
    where
        H: Handler<T, Arc<AppState<Q>>>,
        T: 'static,
    {
        let filter = methods
            .iter()
            .map(|m| m.filter())
            .reduce(MethodFilter::or)
            .unwrap_or(MethodFilter::GET);
        Self {
            methods,
            path,
            permission,
            endpoint: on(filter, handler),
            method_fallback: false,
        }
    }

    /// The async routes' own 405: every method the worker does not run.
    fn with_method_fallback(mut self) -> Self {
        self.endpoint = self.endpoint.fallback(method_not_allowed);
        self.method_fallback = true;
        self
    }

    /// Whether the route changes the queue from the admin API (guarded against CSRF).
    fn is_admin_change(&self) -> bool {
        matches!(
            self.permission,
            Permission::Admin | Permission::AdminFunction
        ) && self.methods.iter().any(|m| *m != Verb::Get)
    }
}

impl<Q> std::fmt::Debug for Route<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("methods", &self.methods)
            .field("path", &self.path)
            .field("permission", &self.permission)
            .finish_non_exhaustive()
    }
}

/// Every route, each with the permission it needs: the one table [`router`] is built from.
pub fn routes<Q: CallQueue>() -> Vec<Route<Q>> {
    use Permission::*;
    vec![
        Route::new(
            CALL_METHODS_BUT_DELETE,
            "/async-function/{name}",
            Invoke,
            enqueue::<Q>,
        )
        .with_method_fallback(),
        Route::new(
            &[Verb::Delete],
            "/async-function/{name}",
            CancelOrInvoke,
            delete_function::<Q>,
        ),
        Route::new(
            CALL_METHODS,
            "/async-function/{name}/",
            Invoke,
            enqueue::<Q>,
        )
        .with_method_fallback(),
        Route::new(
            CALL_METHODS,
            "/async-function/{name}/{*path}",
            Invoke,
            enqueue::<Q>,
        )
        .with_method_fallback(),
        Route::new(
            PREFLIGHT,
            "/async-function/{name}",
            Public,
            preflight_function::<Q>,
        ),
        Route::new(
            PREFLIGHT,
            "/async-function/{name}/",
            Public,
            preflight_function::<Q>,
        ),
        Route::new(
            PREFLIGHT,
            "/async-function/{name}/{*path}",
            Public,
            preflight_function::<Q>,
        ),
        Route::new(
            PREFLIGHT,
            "/async-calls/{call_id}",
            Public,
            preflight_calls::<Q>,
        ),
        Route::new(
            PREFLIGHT,
            "/async-calls/{call_id}/result",
            Public,
            preflight_calls::<Q>,
        ),
        Route::new(
            &[Verb::Get],
            "/async-calls/{call_id}",
            Read,
            crate::calls::record::<Q>,
        ),
        Route::new(
            &[Verb::Delete],
            "/async-calls/{call_id}",
            Cancel,
            crate::calls::cancel::<Q>,
        ),
        Route::new(
            &[Verb::Get],
            "/async-calls/{call_id}/result",
            Read,
            crate::calls::result::<Q>,
        ),
        Route::new(
            &[Verb::Get],
            "/system/async/queue",
            Admin,
            crate::admin::queue::<Q>,
        ),
        Route::new(&[Verb::Get], "/system/async/stats", Admin, live_stats::<Q>),
        Route::new(&[Verb::Get], "/dashboard", Admin, || async {
            Redirect::permanent("/dashboard/")
        }),
        Route::new(&[Verb::Get], "/dashboard/", Admin, dashboard),
        Route::new(
            &[Verb::Get],
            "/system/async/dead-letters",
            Admin,
            crate::admin::dead_letters::<Q>,
        ),
        Route::new(
            &[Verb::Post],
            "/system/async/dead-letters/replay",
            Admin,
            crate::admin::replay::<Q>,
        ),
        Route::new(
            &[Verb::Post],
            "/system/async/dead-letters/purge",
            Admin,
            crate::admin::purge::<Q>,
        ),
        Route::new(
            &[Verb::Get],
            "/system/async/dead-letters/{sequence}",
            Admin,
            crate::admin::dead_letter::<Q>,
        ),
        Route::new(
            &[Verb::Get],
            "/system/async/dead-letters/call/{call_id}",
            Admin,
            crate::admin::dead_letter_of_call::<Q>,
        ),
        Route::new(
            &[Verb::Post],
            "/system/async/functions/{name}/pause",
            AdminFunction,
            crate::admin::pause::<Q>,
        ),
        Route::new(
            &[Verb::Post],
            "/system/async/functions/{name}/resume",
            AdminFunction,
            crate::admin::resume::<Q>,
        ),
        Route::new(&[Verb::Get], "/metrics", Metrics, metrics_text::<Q>),
        Route::new(&[Verb::Get], "/healthz", Public, healthz),
        Route::new(&[Verb::Get], "/readyz", Public, readyz::<Q>),
        Route::new(
            &[Verb::Get],
            "/openapi.json",
            Public,
            crate::openapi::document,
        ),
    ]
}

/// What answers a request no route of [`routes`] matches: the router's one fallback, declared
/// here as a route is, with its permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrouted {
    /// What a caller needs.
    pub permission: Permission,
    /// Path spaces of this gateway's own: an unknown path there is our `404`, never passed on.
    pub own_prefixes: &'static [&'static str],
}

/// The fallback: public. Without an upstream it answers `404`; in front mode it passes the
/// request to the OpenFaaS gateway, which checks its own credentials (its basic auth on
/// `/system/...`; functions do their own): the client's `Authorization` reaches it untouched,
/// and ours are not asked for. Paths under [`Unrouted::own_prefixes`] stay ours (`404`).
pub const UNROUTED: Unrouted = Unrouted {
    permission: Permission::Public,
    own_prefixes: &["/async-function", "/async-calls", "/system/async"],
};

impl Unrouted {
    /// Whether `path` is in one of this gateway's own path spaces (the prefix itself, or below
    /// it): answered here, never passed on.
    pub fn is_own(&self, path: &str) -> bool {
        self.own_prefixes.iter().any(|prefix| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }
}

/// All routes, from [`routes`]. Each route that is not public gets the authorization layer
/// ([`crate::authorize::authorize`]) with its permission; without an authenticator configured, no
/// route gets one (all open, nothing added to a request's path through the gateway).
pub fn router<Q: CallQueue>(state: Arc<AppState<Q>>) -> Router {
    let mut router = Router::new();
    let table = routes::<Q>();
    // One answer per path for the methods it does not take: axum merges the routes of one
    // path, and only one of them may have it.
    let mut method_fallbacks: std::collections::HashSet<&str> = (table.iter())
        .filter(|route| route.method_fallback)
        .map(|route| route.path)
        .collect();
    for route in table {
        let permission = route.permission;
        let admin_change = route.is_admin_change();
        let mut endpoint = route.endpoint;
        if method_fallbacks.insert(route.path) {
            // A method the route does not take: the JSON error of every other refusal (axum's
            // own 405 has no body), with the `Allow` axum adds.
            endpoint = endpoint.fallback(wrong_method);
        }
        if admin_change {
            // The CSRF guard of every state-changing admin route.
            endpoint = endpoint.layer(axum::middleware::from_fn(crate::admin::refuse_cross_site));
        }
        if matches!(permission, Permission::Invoke | Permission::CancelOrInvoke)
            && let Some(quotas) = state.quotas.clone()
        {
            // Inside the authorization layer: the subject is known, refused calls spend nothing.
            let default_namespace: Arc<str> = Arc::from(state.default_namespace.as_str());
            let retry_after = state.retry_after;
            // Read per request: a JetStream server's message limit may change.
            let sizes = state.clone();
            endpoint = endpoint.route_layer(axum::middleware::from_fn(
                move |request: Request, next: axum::middleware::Next| {
                    crate::quota::layer(
                        quotas.clone(),
                        default_namespace.clone(),
                        retry_after,
                        sizes.inline_limit(),
                        request,
                        next,
                    )
                },
            ));
        }
        endpoint = guarded(&state, permission, endpoint);
        if route.path == "/dashboard/" {
            // A browser refused the page still gets the page's shell (static, no data) with
            // the 401, so that a token can be typed into it: the data it shows comes from the
            // admin API, which the same layer guards.
            endpoint = endpoint.route_layer(axum::middleware::from_fn(dashboard_shell_on_401));
        }
        // Outside the authorization layer: it sees the refusals, and what the layer found;
        // outside the quotas layer too, whose `429`s it writes.
        if let Some(audited) = crate::audit::classify(route.methods, route.path, permission)
            && (audited.always
                || state
                    .auth
                    .as_ref()
                    .is_some_and(|a| !a.is_public(permission))
                || (permission == Permission::Invoke && state.quotas.is_some()))
        {
            let state = state.clone();
            let log = state.audit.clone();
            endpoint = endpoint.route_layer(axum::middleware::from_fn(
                move |request: Request, next: axum::middleware::Next| {
                    crate::audit::layer(state.clone(), log.clone(), audited, request, next)
                },
            ));
        }
        if permission == Permission::CancelOrInvoke {
            // Outside every layer but CORS: what the request addresses, found once.
            let state = state.clone();
            endpoint = endpoint.route_layer(axum::middleware::from_fn(
                move |request: Request, next: axum::middleware::Next| {
                    crate::calls::resolve_delete(state.clone(), request, next)
                },
            ));
        }
        // Outermost: every answer of these routes (refusals too) gets its CORS headers.
        let cors_kind = match permission {
            Permission::Invoke | Permission::CancelOrInvoke => Some(crate::cors::Kind::Function),
            Permission::Read | Permission::Cancel => Some(crate::cors::Kind::Calls),
            _ => None,
        };
        if let (Some(kind), Some(policy)) = (cors_kind, state.cors.clone()) {
            endpoint = endpoint.layer(axum::middleware::from_fn(
                move |request: Request, next: axum::middleware::Next| {
                    crate::cors::layer(policy.clone(), kind, request, next)
                },
            ));
        }
        // ROUTE-TABLE: the one place a route is added.
        router = router.route(route.path, endpoint);
    }
    // ROUTE-TABLE: the fallback, declared in UNROUTED, guarded as a route is.
    let fallback = guarded(
        &state,
        UNROUTED.permission,
        axum::routing::any(unrouted::<Q>),
    );
    let router = router.fallback(fallback);
    router
        // The body limit is enforced by the handler against the queue's live limit.
        .layer(DefaultBodyLimit::disable())
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(on_panic))
        .layer(axum::middleware::map_response(no_sniffing))
        .with_state(state)
}

/// `endpoint` behind the authorization layer ([`crate::authorize::authorize`]) with
/// `permission`, unless no authenticator is configured or the permission is public.
fn guarded<Q: CallQueue>(
    state: &Arc<AppState<Q>>,
    permission: Permission,
    endpoint: MethodRouter<Arc<AppState<Q>>>,
) -> MethodRouter<Arc<AppState<Q>>> {
    let Some(auth) = state
        .auth
        .clone()
        .filter(|auth| !auth.is_public(permission))
    else {
        return endpoint;
    };
    let state = state.clone();
    endpoint.route_layer(axum::middleware::from_fn(
        move |request: Request, next: axum::middleware::Next| {
            crate::authorize::authorize(state.clone(), auth.clone(), permission, request, next)
        },
    ))
}

/// The fallback ([`UNROUTED`]): in front mode, every request outside our own path spaces goes
/// to the OpenFaaS gateway; anything else is `404`.
async fn unrouted<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    request: Request,
) -> Response {
    match &state.upstream {
        Some(_) if request.method() == axum::http::Method::CONNECT => {
            wrong_method().await.into_response()
        }
        Some(upstream) if !UNROUTED.is_own(request.uri().path()) => upstream.forward(request).await,
        _ => not_found().await.into_response(),
    }
}

fn on_panic(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
    )
    .into_response()
}

/// Every answer says what it is: a browser never guesses a type from the bytes. An answer of
/// the upstream gateway (front mode) is passed as it came.
async fn no_sniffing(mut response: Response) -> Response {
    if response
        .extensions()
        .get::<crate::upstream::Proxied>()
        .is_some()
    {
        return response;
    }
    response
        .headers_mut()
        .entry(header::X_CONTENT_TYPE_OPTIONS)
        .or_insert(HeaderValue::from_static("nosniff"));
    response
}

/// The CORS preflight of the async routes; any other `OPTIONS` is refused as the method
/// of a call the worker does not run.
async fn preflight_function<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    request: Request,
) -> Response {
    let policy = state
        .cors
        .as_ref()
        .map(|file| file.current())
        .unwrap_or_default();
    match policy.preflight(
        crate::cors::Kind::Function,
        request.uri().path(),
        request.headers(),
    ) {
        Some(answer) => answer,
        None => method_not_allowed().await,
    }
}

/// The CORS preflight of `/async-calls/...`; any other `OPTIONS` is a method the route does
/// not take.
async fn preflight_calls<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    request: Request,
) -> Response {
    let policy = state
        .cors
        .as_ref()
        .map(|file| file.current())
        .unwrap_or_default();
    let path = request.uri().path();
    if let Some(answer) = policy.preflight(crate::cors::Kind::Calls, path, request.headers()) {
        return answer;
    }
    // As axum's own `Allow` on these paths (OPTIONS: the preflight).
    let allow = if path.ends_with("/result") {
        "OPTIONS,GET,HEAD"
    } else {
        "OPTIONS,GET,HEAD,DELETE"
    };
    let mut response = wrong_method().await.into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; async calls go to /async-function/{name}",
    )
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take this method; Allow lists those it takes",
    )
}

async fn method_not_allowed() -> Response {
    with_allow(method_refused().into_response())
}

/// `405` for a method the worker will not run (HEAD, which axum routes to GET, included).
fn method_refused() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "async calls accept POST, PUT, PATCH, DELETE and GET",
    )
}

fn with_allow(mut response: Response) -> Response {
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("POST, PUT, PATCH, DELETE, GET"),
        );
    }
    response
}

/// The gateway's answer to a call the worker would refuse ([`QueuedCall::validate`]).
fn refused(e: &InvalidCall) -> ApiError {
    let code = match e {
        InvalidCall::Method(_) => return method_refused(),
        InvalidCall::FunctionName(_) => "invalid_function_name",
        InvalidCall::Path(_) => "invalid_path",
        InvalidCall::CallId(_) => "invalid_call_id",
        InvalidCall::CallbackUrl(_) => "invalid_callback_url",
        InvalidCall::BodyReference(_) => "invalid_body",
    };
    ApiError::bad_request(code, e.to_string())
}

async fn metrics_text<Q: CallQueue>(State(state): State<Arc<AppState<Q>>>) -> Response {
    let text = queue_core::backend::render_metrics(&state.metrics, state.queue.as_ref()).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The live figures of the caller's view ([`crate::tenancy`]).
async fn live_stats<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    view: crate::tenancy::AdminView,
) -> Response {
    let mut snapshot = state.live.snapshot();
    if !view.is_everything() {
        snapshot
            .functions
            .retain(|f| view.sees_function(&f.function));
        (snapshot.recent_failures).retain(|e| view.sees_function(&e.function));
    }
    axum::Json(snapshot).into_response()
}

/// The dashboard's content security policy: its own inline script and style only, requests to
/// the gateway only, no frames of it anywhere (clickjacking its buttons), no forms, no base.
const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The dashboard page: static HTML and script that read the admin API (no build step, no
/// external resources: it works air-gapped).
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// `401` on `/dashboard/` for a browser (`Accept: text/html`): the dashboard's static page
/// instead of the JSON error, with the same status and challenges. The page holds no data; it
/// asks for a token (or a user and password) and sends it with its admin API requests, which
/// the authorization layer checks as any other. Other clients get the JSON error.
async fn dashboard_shell_on_401(request: Request, next: axum::middleware::Next) -> Response {
    let wants_html = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    let refused = next.run(request).await;
    if refused.status() != StatusCode::UNAUTHORIZED || !wants_html {
        return refused;
    }
    let mut shell = dashboard().await;
    *shell.status_mut() = StatusCode::UNAUTHORIZED;
    for challenge in refused.headers().get_all(header::WWW_AUTHENTICATE) {
        shell
            .headers_mut()
            .append(header::WWW_AUTHENTICATE, challenge.clone());
    }
    shell
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz<Q: CallQueue>(State(state): State<Arc<AppState<Q>>>) -> Response {
    let ready = match state.queue.check_ready().await {
        Ok(()) => state.auth.as_ref().map_or(Ok(()), |auth| auth.ready()),
        Err(reason) => Err(reason),
    };
    let (status, mut body) = match ready {
        Ok(()) => (StatusCode::OK, json!({"status": "ready"})),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not_ready", "reason": reason}),
        ),
    };
    // Who may do what is part of the gateway's state: an open gateway says so here too, not
    // only in its start-up log.
    match &state.auth {
        Some(auth) => body["authentication"] = json!(auth.kinds()),
        None => {
            body["authentication"] = json!("none");
            body["warning"] = json!(
                "no authenticator is configured: every route, admin included, is open to anyone who can reach this gateway"
            );
        }
    }
    (status, axum::Json(body)).into_response()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            ApiError::bad_request("invalid_header", format!("header {name} is not valid text"))
        }),
    }
}

/// Headers kept with the call. Every header the system sets is removed from the client's
/// input ([`is_dropped_from_client`]): hop-by-hop, the worker's `X-Call-Id`, `X-Start-Time`,
/// `X-Retry`, `X-Retry-Max`, and the forwarding headers unless `peer` is a trusted proxy; then
/// `X-Forwarded-For` is set from `peer`.
fn captured_headers(
    headers: &HeaderMap,
    peer: Option<std::net::IpAddr>,
    trusted: &crate::peer::TrustedProxies,
) -> Result<Vec<(String, String)>, ApiError> {
    let trusted_peer = peer.is_some_and(|ip| trusted.trusts(ip));
    let mut out = Vec::with_capacity(headers.len() + 1);
    for (name, value) in headers {
        let name = name.as_str();
        if is_dropped_from_client(name, trusted_peer) || name == "x-forwarded-for" {
            continue;
        }
        let value = value.to_str().map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("header {name} is not valid text (only visible ASCII is forwarded)"),
            )
        })?;
        out.push((name.to_owned(), value.to_owned()));
    }
    let client_chain = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    if let Some(chain) = crate::peer::forwarded_for(peer, trusted_peer, client_chain) {
        out.push(("x-forwarded-for".to_owned(), chain));
    }
    Ok(out)
}

/// `DELETE /async-function/{name}`: the cancel of the call whose id is `{name}` when it has a
/// record (OpenFaaS Pro's cancel, [`crate::calls::cancel_addressed`]), else an invocation of
/// the function `{name}` with method `DELETE`. What it addresses was found by
/// [`crate::calls::resolve_delete`], and authorized as such.
async fn delete_function<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    mut request: Request,
) -> Response {
    match request.extensions_mut().remove::<DeleteTarget>() {
        Some(DeleteTarget::Call(record)) => crate::calls::cancel_addressed(&state, *record).await,
        Some(DeleteTarget::Function) => enqueue(State(state), request).await,
        None => {
            tracing::error!("DELETE /async-function/{{name}} without its target");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
            .into_response()
        }
    }
}

async fn enqueue<Q: CallQueue>(
    State(state): State<Arc<AppState<Q>>>,
    request: Request,
) -> Response {
    let received_at = queue_core::unix_nanos_now();
    let (parts, body) = request.into_parts();
    // A client's id is kept exactly as sent, or refused saying why: never replaced behind
    // its back (an empty header is no id, as OpenFaaS reads it).
    let call_id = match parts.headers.get("x-call-id").map(|v| v.as_bytes()) {
        None | Some(b"") => uuid::Uuid::now_v7().to_string(),
        Some(raw) => match std::str::from_utf8(raw) {
            Ok(id) if valid_call_id(id) => id.to_owned(),
            Ok(id) => return invalid_call_id(call_id_problem(id).unwrap_or_default()),
            Err(_) => {
                return invalid_call_id(
                    "X-Call-Id is not text (only visible ASCII, ! to ~, is accepted)".to_owned(),
                );
            }
        },
    };
    match accept(&state, parts, body, &call_id, received_at).await {
        Ok(response) => response,
        Err(e) => {
            tracing::info!(
                call_id,
                status = e.status.as_u16(),
                error = e.code,
                "call refused"
            );
            metrics::counter!(queue_core::metrics::REFUSED, "reason" => e.code).increment(1);
            with_allow(e.with_call_id(&call_id).into_response())
        }
    }
}

/// SHA-256 (hex) of what makes a request this call: method, path, query, callback URL, body.
/// Fields are length-prefixed, so no two requests share the bytes hashed.
fn request_digest(call: &QueuedCall) -> String {
    let m = &call.meta;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for field in [
        m.method.as_bytes(),
        m.path.as_bytes(),
        m.query.as_deref().unwrap_or_default().as_bytes(),
        m.callback_url.as_deref().unwrap_or_default().as_bytes(),
        match &m.body {
            BodyLocation::Blob(BlobRef { sha256, .. }) => sha256.as_bytes(),
            BodyLocation::Inline { .. } => call.body.as_ref(),
        },
    ] {
        context.update(&u64::try_from(field.len()).unwrap_or(u64::MAX).to_be_bytes());
        context.update(field);
    }
    let mut hex = String::with_capacity(64);
    for byte in context.finish().as_ref() {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

use crate::error::unreadable_body;

/// `400 invalid_call_id` for a client's `X-Call-Id` that cannot be kept as sent.
fn invalid_call_id(why: String) -> Response {
    metrics::counter!(queue_core::metrics::REFUSED, "reason" => "invalid_call_id").increment(1);
    with_allow(ApiError::bad_request("invalid_call_id", why).into_response())
}

async fn accept<Q: CallQueue>(
    state: &AppState<Q>,
    parts: axum::http::request::Parts,
    body: Body,
    call_id: &str,
    received_at: u64,
) -> Result<Response, ApiError> {
    if !METHODS.contains(&parts.method.as_str()) {
        return Err(method_refused());
    }
    let client_id = parts
        .headers
        .get("x-call-id")
        .is_some_and(|v| !v.is_empty());
    let (addressed, path) = split_path(parts.uri.path());
    let (function, namespace) = canonical_function(addressed, &state.default_namespace)
        .map_err(|e| ApiError::bad_request("invalid_function_name", e.to_string()))?;
    validate_path(path).map_err(|e| ApiError::bad_request("invalid_path", e.to_string()))?;
    let callback_url = match header_str(&parts.headers, "x-callback-url")? {
        None => None,
        Some(raw) => Some(
            parse_callback_url(raw)
                .map_err(|e| ApiError::bad_request("invalid_callback_url", e.to_string()))
                .and_then(|url| state.allowed_callback(url))?
                .to_string(),
        ),
    };
    let peer = parts
        .extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let headers = captured_headers(&parts.headers, peer, &state.trusted_proxies)?;
    let overrides = crate::overrides::call_overrides(&parts.headers, &state.call_limits)?;
    let not_before = crate::overrides::not_before(&parts.headers, &state.call_limits, received_at)?;

    let Some(limit) = state.max_body() else {
        return Err(ApiError::unavailable(
            "the queue is not reachable yet (its message limit is unknown); retry with the same X-Call-Id",
            state.retry_after,
        ));
    };
    let too_large = || {
        ApiError::too_large(
            "body_too_large",
            format!("request body exceeds the limit of {limit} bytes"),
            limit,
        )
    };
    let declared =
        header_str(&parts.headers, "content-length")?.and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    // Small bodies (the hot path): read whole, queued inline. A body that is or may be larger
    // than the inline size, with a blob store: read up to the inline size, and what goes past
    // it is streamed into the store (below).
    let inline = state.inline_limit();
    let (body, rest) = match &state.blobs {
        Some(_) if declared.is_none_or(|len| len > inline) => {
            let mut source = body.into_data_stream();
            let (head, ended) = crate::large::read_head(&mut source, inline, declared).await?;
            (head, (!ended).then_some(source))
        }
        _ => (
            axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
                .await
                .map_err(|e| {
                    // to_bytes reports an exceeded limit as a LengthLimitError somewhere in
                    // the chain.
                    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                    while let Some(err) = source {
                        if err.is::<http_body_util::LengthLimitError>() {
                            return too_large();
                        }
                        source = err.source();
                    }
                    unreadable_body()
                })?,
            None,
        ),
    };

    let mut call = QueuedCall {
        meta: CallMeta {
            call_id: call_id.to_owned(),
            function,
            namespace,
            method: parts.method.as_str().to_owned(),
            path: path.to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers,
            callback_url,
            received_at_unix_nanos: received_at,
            body: BodyLocation::Inline { len: 0 },
            record_revision: None,
            overrides,
            not_before_unix_nanos: not_before,
        },
        body,
    };
    // The worker's own rules: what it would refuse as poison is refused here, never queued.
    call.validate().map_err(|e| refused(&e))?;
    let idempotency = match header_str(&parts.headers, "idempotency-key")? {
        None => None,
        Some(key) if (1..=255).contains(&key.len()) => {
            Some(idempotency_key(&call.meta.qualified_function(), key))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-255 characters of visible ASCII",
            ));
        }
    };
    if let Some(key) = &idempotency {
        match state.queue.claim_idempotency_key(key, call_id).await {
            Ok(None) => {}
            Ok(Some(original)) => {
                tracing::info!(call_id = %original, "repeated Idempotency-Key; not queued again");
                let mut response = StatusCode::ACCEPTED.into_response();
                if let Ok(v) = HeaderValue::from_str(&original) {
                    response.headers_mut().insert("x-call-id", v);
                }
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(response);
            }
            Err(e) => {
                tracing::warn!(error = %e, "idempotency store failed");
                return Err(ApiError::unavailable(
                    "idempotency keys cannot be checked now; retry",
                    state.retry_after,
                ));
            }
        }
    }
    let release_key = || async {
        if let Some(key) = &idempotency
            && let Err(e) = state.queue.release_idempotency_key(key).await
        {
            tracing::warn!(error = %e, "could not release the idempotency key");
        }
    };
    // A body past the inline size: into the blob store (streamed; a failed or interrupted
    // upload leaves nothing stored), the call carries the reference. Dropped from here on
    // (the client gone, a failed publish), the guard deletes the blob.
    let mut stored = None;
    if let (Some(rest), Some(blobs)) = (rest, &state.blobs) {
        let head = std::mem::take(&mut call.body);
        let upload = crate::large::Upload {
            blobs,
            call: &call,
            head,
            rest,
            limit,
            declared,
            client_id,
        };
        match upload.store(state).await {
            Ok((location, guard)) => {
                call.meta.body = location;
                stored = guard;
            }
            Err(e) => {
                release_key().await;
                return Err(e);
            }
        }
    }
    // The record first, so that `GET /async-calls/{id}` knows every call answered 202, a
    // reused call id is caught before anything is queued, and the worker can write the next
    // state at the revision the envelope carries without reading the record. A generated id
    // needs no such check, and a queue that finds its queued calls by id answers their
    // record until a worker writes it: the call is then one store, not two. A scheduled call
    // (`X-Delay`, `X-Not-Before`) waits apart from the queued calls, where no such look-up
    // finds it: its record is written, so that it is `scheduled` and cancellable until it runs.
    let scheduled = call.meta.not_before_unix_nanos.is_some();
    let (revision, created) = if !client_id && !scheduled && state.queue.finds_queued_calls() {
        (queue_core::backend::NOT_STORED, false)
    } else {
        match record_call(state, &call, received_at, client_id).await {
            Ok(written) => written,
            Err(e) => {
                release_key().await;
                return Err(e);
            }
        }
    };
    call.meta.record_revision = Some(revision);
    let published = state.queue.publish(&call).await;
    if published.is_err() {
        release_key().await;
        if created && let Err(e) = state.queue.delete_record(call_id).await {
            tracing::warn!(call_id, error = %e, "could not remove the record of a call not queued");
        }
    }
    if let Some(guard) = stored {
        match published {
            Ok(_) => guard.keep(),
            Err(_) => guard.delete().await,
        }
    }
    let published = published.map_err(|e| match e {
        PublishError::TooLarge { max, .. } => ApiError::too_large(
            "request_too_large",
            format!("request headers and body together exceed the queue's limit of {max} bytes"),
            max as u64,
        ),
        PublishError::Disconnected | PublishError::NotStored(_) => {
            tracing::warn!(error = %e, "call not queued");
            ApiError::unavailable(
                format!("the queue cannot take the call now ({e}); retry with the same X-Call-Id"),
                state.retry_after,
            )
        }
        PublishError::Encode(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not encode the call",
        ),
    })?;
    // Debug, as the worker's success path: a line per accepted call is the largest cost of
    // an accept at high rates; refusals log at info.
    tracing::debug!(
        call_id,
        function = %call.meta.qualified_function(),
        method = %call.meta.method,
        duplicate = published.duplicate,
        scheduled,
        "call queued"
    );
    let function = queue_core::metrics::function_label(&call.meta.qualified_function());
    metrics::counter!(queue_core::metrics::SUBMITTED, "function" => function).increment(1);
    metrics::counter!(queue_core::metrics::PRO_SUBMITTED, "queue_name" => queue_core::metrics::pro_queue_name())
        .increment(1);
    metrics::histogram!(queue_core::metrics::ACCEPT_SECONDS)
        .record(queue_core::metrics::seconds_since(received_at));
    let mut response = StatusCode::ACCEPTED.into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(call_id) {
        h.insert("x-call-id", v);
    }
    h.insert("x-start-time", HeaderValue::from(received_at));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_but_the_public_ones_has_an_action() {
        use queue_core::backend::jetstream::JetStreamQueue;
        for route in routes::<JetStreamQueue>() {
            let audited = crate::audit::classify(route.methods, route.path, route.permission);
            assert_eq!(
                audited.is_none(),
                route.permission == Permission::Public,
                "{route:?}"
            );
            let changes = route.methods.iter().any(|m| *m != Verb::Get);
            if let Some(audited) = audited {
                let admin = matches!(
                    route.permission,
                    Permission::Admin | Permission::AdminFunction
                );
                assert!(
                    audited.always || !(admin && changes),
                    "an admin change is always logged: {route:?}"
                );
                assert!(
                    !matches!(audited.action, "admin" | "function.admin"),
                    "{route:?} needs its own action name"
                );
            }
        }
    }

    /// Routes are added in one place only, the loop over [`routes`]: a route added anywhere
    /// else (`route`, `route_service`, `nest`, `merge` called on a router) would bypass the
    /// table and its permission.
    #[test]
    fn routes_are_added_only_from_the_table() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        // Built here so that this test's own lines do not match.
        let needles = [
            "route(",
            "route_service(",
            "nest(",
            "nest_service(",
            "merge(",
        ]
        .map(|n| format!(".{n}"));
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                if needles.iter().any(|needle| line.contains(needle.as_str())) {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
        assert_eq!(found.len(), 1, "routes added outside the table: {found:#?}");
        assert!(found[0].contains("router = router"), "{found:?}");
        // One fallback, the declared one: a request no route matches meets UNROUTED.
        let fallbacks: Vec<String> = fallback_lines(&src);
        assert_eq!(fallbacks.len(), 1, "fallbacks: {fallbacks:#?}");
        assert!(
            fallbacks[0].ends_with(concat!("router", ".fallback(fallback);")),
            "{fallbacks:?}"
        );
    }

    /// Lines that give a router a fallback (`Router::fallback`, `fallback_service`); the
    /// methods' own answers (`MethodRouter::fallback`, on `endpoint`) are not counted.
    fn fallback_lines(src: &std::path::Path) -> Vec<String> {
        // Split so that this test's own lines do not match.
        let needles = [
            concat!("router", ".fallback("),
            concat!("fallback", "_service("),
        ];
        let mut found = Vec::new();
        for entry in std::fs::read_dir(src).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                let code = line.trim();
                if !code.starts_with("//") && needles.iter().any(|n| code.contains(n)) {
                    found.push(code.to_owned());
                }
            }
        }
        found
    }

    /// The fallback is declared like a route: public (the OpenFaaS gateway behind it checks
    /// its own credentials), never audited as an action of ours, and our own path spaces stay
    /// ours.
    #[test]
    fn the_fallback_is_declared_public_and_keeps_our_path_spaces() {
        use queue_core::backend::jetstream::JetStreamQueue;
        assert_eq!(UNROUTED.permission, Permission::Public);
        let every: Vec<Verb> = CALL_METHODS.iter().chain(PREFLIGHT).copied().collect();
        assert!(crate::audit::classify(&every, "/{*rest}", UNROUTED.permission).is_none());
        for path in [
            "/async-function",
            "/async-function/",
            "/async-function/fn/deep",
            "/async-calls/x/y/z",
            "/system/async",
            "/system/async/unknown",
        ] {
            assert!(UNROUTED.is_own(path), "{path}");
        }
        for path in [
            "/function/fn",
            "/system/functions",
            "/system/async-report",
            "/async-functions",
            "/ui/",
            "/",
        ] {
            assert!(!UNROUTED.is_own(path), "{path}");
        }
        // Every route of the table is in one of our path spaces or is one of our own fixed
        // paths, which the router matches before the fallback.
        for route in routes::<JetStreamQueue>() {
            assert!(
                UNROUTED.is_own(route.path)
                    || matches!(
                        route.path,
                        "/metrics"
                            | "/healthz"
                            | "/readyz"
                            | "/openapi.json"
                            | "/dashboard"
                            | "/dashboard/"
                    ),
                "{route:?}"
            );
        }
    }

    #[test]
    fn every_route_declares_a_permission_and_health_is_public() {
        use queue_core::backend::jetstream::JetStreamQueue;
        let table = routes::<JetStreamQueue>();
        for route in &table {
            let public = route.permission == Permission::Public;
            assert_eq!(
                public,
                matches!(route.path, "/healthz" | "/readyz" | "/openapi.json")
                    || route.methods == PREFLIGHT,
                "{route:?}"
            );
            assert!(
                !route.methods.contains(&Verb::Options) || route.methods == PREFLIGHT,
                "OPTIONS is the preflight alone: {route:?}"
            );
            assert!(!route.methods.is_empty(), "{route:?}");
        }
        let mut seen = std::collections::HashSet::new();
        for route in &table {
            for m in route.methods {
                assert!(seen.insert((m.as_str(), route.path)), "{route:?} twice");
            }
        }
    }

    /// OpenFaaS Pro's cancel is `DELETE /async-function/{name}` alone, the one route that
    /// reads a record before it knows what it does; every other method and every path with
    /// something after the name (a trailing slash too) is an invocation, as every call method
    /// is on each async path.
    #[test]
    fn only_a_delete_without_a_path_may_be_a_cancel() {
        use queue_core::backend::jetstream::JetStreamQueue;
        let table = routes::<JetStreamQueue>();
        for route in &table {
            let pro = route.permission == Permission::CancelOrInvoke;
            assert_eq!(
                pro,
                route.path == "/async-function/{name}" && route.methods == [Verb::Delete],
                "{route:?}"
            );
            if route.path.starts_with("/async-function/") && route.methods != PREFLIGHT && !pro {
                assert_eq!(route.permission, Permission::Invoke, "{route:?}");
            }
        }
        for path in [
            "/async-function/{name}",
            "/async-function/{name}/",
            "/async-function/{name}/{*path}",
        ] {
            let mut methods: Vec<&str> = (table.iter())
                .filter(|r| r.path == path && r.methods != PREFLIGHT)
                .flat_map(|r| r.methods.iter().map(|m| m.as_str()))
                .collect();
            methods.sort_unstable();
            assert_eq!(methods, ["DELETE", "GET", "PATCH", "POST", "PUT"], "{path}");
        }
    }

    #[test]
    fn captured_headers_drop_hop_by_hop_and_call_ids() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("x-call-id", HeaderValue::from_static("client"));
        h.append("x-multi", HeaderValue::from_static("1"));
        h.append("x-multi", HeaderValue::from_static("2"));
        let out = captured_headers(&h, None, &crate::peer::TrustedProxies::default()).unwrap();
        assert!(!out.iter().any(|(k, _)| k == "connection"));
        assert_eq!(
            out.iter().filter(|(k, _)| k == "x-multi").count(),
            2,
            "repeated headers are kept"
        );
        assert!(
            !out.iter().any(|(k, _)| k == "x-call-id"),
            "the client's id is not kept"
        );
        assert!(out.contains(&("content-type".into(), "text/plain".into())));
    }
}
