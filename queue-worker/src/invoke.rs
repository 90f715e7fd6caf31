//! Calling the function: the URL it lives at, forwarding method, path, query, headers and body,
//! and turning whatever happens (response, timeout, refused connection) into an [`Outcome`].

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use std::sync::Arc;

use crate::config::{InvokeMode, WorkerConfig};
use crate::http1::{Http1Client, Http1Error, Origin, Request};
use futures::{StreamExt, TryStreamExt};
use queue_core::blobs::{BlobError, BlobKey, BlobRef, BlobStore, PutOptions, SharedBlobs};
use queue_core::egress::EgressPolicy;
use queue_core::headers::is_worker_request_header;
pub use queue_core::headers::{HOP_BY_HOP, is_hop_by_hop};
use queue_core::message::{BodyLocation, QueuedCall};
pub use queue_core::outcome::Outcome;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// Builds function URLs and calls functions.
#[derive(Debug, Clone)]
pub struct FunctionInvoker {
    client: reqwest::Client,
    http1: Arc<Http1Client>,
    user_agent: String,
    mode: InvokeMode,
    gateway_url: String,
    default_namespace: String,
    /// Lower case; the default namespace included.
    allowed_namespaces: Vec<String>,
    function_suffix: String,
    max_response_bytes: u64,
    /// Largest response held in memory when a blob store is there (`--inline-response-bytes`).
    inline_response_bytes: u64,
    /// Direct mode: where functions may be reached (`--function-deny`, `--function-allow`).
    function_policy: Option<Arc<EgressPolicy>>,
    /// Gateway mode over plain `http`: `{gateway_url}/function/` taken apart once, so that a
    /// call's target is a concatenation, not a URL parse ([`FunctionInvoker::gateway_target`]).
    gateway_base: Option<Arc<PlainTarget>>,
    /// Where stored request bodies are (`None`: a call with one is refused before it runs).
    blobs: Option<SharedBlobs>,
    /// Direct mode: the general client with the function policy's resolver, for calls whose
    /// body is streamed from the blob store (the small client takes whole bodies only).
    policy_client: Option<reqwest::Client>,
}

/// Why a call's stored body cannot be sent ([`FunctionInvoker::check_stored_body`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoredBodyProblem {
    /// It will never be readable: missing, not the body the call names, failing its
    /// integrity check, or sealed with keys this worker does not have. The call is
    /// dead-lettered, never retried.
    #[error("{0}")]
    Unreadable(&'static str),
    /// The store cannot be reached now: the call waits and comes back.
    #[error("the blob store is unavailable: {0}")]
    Unavailable(String),
}

/// Why a call is not sent to any function.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// Direct mode: the namespace is not the default one nor in `--allowed-namespaces`.
    #[error("namespace not allowed")]
    NamespaceNotAllowed,
}

/// Shared HTTP client settings: no redirects (a 3xx is an answer, not an instruction), bounded
/// connect time, the process-wide rustls provider.
pub fn http_client(user_agent: &str) -> Result<reqwest::Client, reqwest::Error> {
    // async-nats already uses ring; install it for reqwest too so there is one provider.
    // Err means it is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(user_agent)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
}

impl FunctionInvoker {
    /// From the worker configuration.
    pub fn new(config: &WorkerConfig, client: reqwest::Client, http1: Arc<Http1Client>) -> Self {
        Self {
            client,
            http1,
            user_agent: concat!("queue-worker/", env!("CARGO_PKG_VERSION")).to_owned(),
            mode: config.invoke_mode,
            gateway_url: config.gateway_url.trim_end_matches('/').to_owned(),
            default_namespace: config.default_namespace.to_ascii_lowercase(),
            allowed_namespaces: config
                .allowed_namespaces
                .iter()
                .map(|ns| ns.trim().to_ascii_lowercase())
                .filter(|ns| !ns.is_empty())
                .chain(std::iter::once(
                    config.default_namespace.to_ascii_lowercase(),
                ))
                .collect(),
            function_suffix: config.function_suffix.clone(),
            max_response_bytes: config.max_response_bytes,
            inline_response_bytes: config.inline_response_bytes,
            function_policy: (config.invoke_mode == InvokeMode::Direct).then(|| {
                Arc::new(EgressPolicy::new(
                    &config.function_deny.concat(),
                    &config.function_allow.concat(),
                ))
            }),
            gateway_base: (config.invoke_mode == InvokeMode::Gateway)
                .then(|| {
                    let base = format!("{}/function/", config.gateway_url.trim_end_matches('/'));
                    PlainTarget::parse(&base).filter(|t| !t.path_and_query.contains('?'))
                })
                .flatten()
                .map(Arc::new),
            blobs: None,
            policy_client: None,
        }
    }

    /// Reads stored request bodies from `blobs`.
    pub fn with_blobs(mut self, blobs: Option<SharedBlobs>) -> Result<Self, reqwest::Error> {
        if blobs.is_some()
            && let Some(policy) = &self.function_policy
        {
            self.policy_client = Some(crate::policy_client::policy_client(
                policy.clone(),
                &self.user_agent,
            )?);
        }
        self.blobs = blobs;
        Ok(self)
    }

    /// Whether the stored body of `call` (a [`BodyLocation::Blob`]) is there and is the one
    /// the call names, before the call runs.
    pub async fn check_stored_body(&self, call: &QueuedCall) -> Result<(), StoredBodyProblem> {
        self.open_stored_body(call).await.map(drop)
    }

    async fn open_stored_body(
        &self,
        call: &QueuedCall,
    ) -> Result<queue_core::blobs::BlobRead, StoredBodyProblem> {
        let BodyLocation::Blob(BlobRef { key, len, sha256 }) = &call.meta.body else {
            return Err(StoredBodyProblem::Unreadable("the body is not stored"));
        };
        let Some(blobs) = &self.blobs else {
            return Err(StoredBodyProblem::Unreadable(
                "this worker has no blob store for the call's stored body",
            ));
        };
        let key = BlobKey::parse(key)
            .map_err(|_| StoredBodyProblem::Unreadable("the stored body's key is malformed"))?;
        let store = blobs
            .store()
            .await
            .map_err(|e| StoredBodyProblem::Unavailable(e.to_string()))?;
        let read = store.get(&key, None).await.map_err(|e| match e {
            BlobError::NotFound => StoredBodyProblem::Unreadable("the stored body is missing"),
            BlobError::Integrity { .. } => {
                StoredBodyProblem::Unreadable("the stored body failed its integrity check")
            }
            BlobError::Undecryptable { .. } => StoredBodyProblem::Unreadable(
                "the stored body cannot be decrypted with this worker's keys",
            ),
            other => StoredBodyProblem::Unavailable(other.to_string()),
        })?;
        if read.info.len != *len || read.info.sha256 != *sha256 {
            return Err(StoredBodyProblem::Unreadable(
                "the stored body is not the one the call names (length or digest)",
            ));
        }
        Ok(read)
    }

    /// Gateway mode: the target of `call` built from [`FunctionInvoker::gateway_base`], when
    /// the result is what parsing the URL would give: a path and query of characters a URL
    /// parser leaves as they are (the gateway checked the path for dot segments and
    /// backslashes before queueing; anything else goes through the parser).
    fn gateway_target(&self, call: &QueuedCall) -> Option<PlainTarget> {
        let base = self.gateway_base.as_deref()?;
        let m = &call.meta;
        // What the URL standard percent-encodes in a path, and in a special URL's query.
        let plain = |s: &str, extra: &[u8]| {
            s.bytes().all(|b| {
                (0x21..=0x7e).contains(&b) && !b"\"#<>`{}".contains(&b) && !extra.contains(&b)
            })
        };
        let query = m.query.as_deref().filter(|q| !q.is_empty());
        if !plain(&m.path, b"?") || !query.is_none_or(|q| plain(q, b"'")) {
            return None;
        }
        let function = m.qualified_function();
        let mut path_and_query = String::with_capacity(
            base.path_and_query.len()
                + function.len()
                + m.path.len()
                + query.map_or(0, |q| q.len() + 1),
        );
        path_and_query.push_str(&base.path_and_query);
        path_and_query.push_str(&function);
        path_and_query.push_str(&m.path);
        if let Some(q) = query {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Some(PlainTarget {
            origin: base.origin.clone(),
            host_header: base.host_header.clone(),
            path_and_query,
        })
    }

    /// The URL a call is sent to. The path and query are appended exactly as the client sent
    /// them (the path was checked for dot segments before it was queued). In direct mode the
    /// namespace must be the default one or an allowed one, and names are lower-cased: the
    /// caller picks a function, never a host.
    pub fn url(&self, call: &QueuedCall) -> Result<String, Unroutable> {
        let m = &call.meta;
        let mut url = match self.mode {
            InvokeMode::Gateway => format!(
                "{}/function/{}{}",
                self.gateway_url,
                m.qualified_function(),
                m.path
            ),
            InvokeMode::Direct => {
                let ns = m
                    .namespace
                    .as_deref()
                    .unwrap_or(&self.default_namespace)
                    .to_ascii_lowercase();
                if !self.allowed_namespaces.contains(&ns) {
                    return Err(Unroutable::NamespaceNotAllowed);
                }
                let path = if m.path.is_empty() { "/" } else { &m.path };
                format!(
                    "http://{}.{ns}{}:8080{path}",
                    m.function.to_ascii_lowercase(),
                    self.function_suffix
                )
            }
        };
        if let Some(q) = m.query.as_deref().filter(|q| !q.is_empty()) {
            url.push('?');
            url.push_str(q);
        }
        Ok(url)
    }

    /// Calls the function once (attempt `attempt` of at most `max_attempts`, sent as `X-Retry`
    /// and `X-Retry-Max`). Never fails: transport problems become a 503 outcome.
    pub async fn invoke(
        &self,
        call: &QueuedCall,
        attempt: u32,
        max_attempts: u32,
        timeout: Duration,
    ) -> Outcome {
        let started = Instant::now();
        if call.meta.body.is_blob() {
            return Box::pin(self.invoke_stored(call, attempt, max_attempts, timeout, started))
                .await;
        }
        if let Some(target) = self.gateway_target(call) {
            return Box::pin(self.invoke_plain(
                call,
                &target,
                attempt,
                max_attempts,
                timeout,
                started,
            ))
            .await;
        }
        let url = match self.url(call) {
            Ok(url) => url,
            Err(e) => return no_answer(403, &e.to_string(), started),
        };
        if let Some(target) = PlainTarget::parse(&url) {
            return Box::pin(self.invoke_plain(
                call,
                &target,
                attempt,
                max_attempts,
                timeout,
                started,
            ))
            .await;
        }
        Box::pin(self.invoke_general(call, url, attempt, max_attempts, timeout, started)).await
    }

    /// [`FunctionInvoker::invoke`] with the general client (`https`, or what the small one
    /// does not take).
    async fn invoke_general(
        &self,
        call: &QueuedCall,
        url: String,
        attempt: u32,
        max_attempts: u32,
        timeout: Duration,
        started: Instant,
    ) -> Outcome {
        let failed = |status: u16, error: &str| no_answer(status, error, started);
        let method = match reqwest::Method::from_bytes(call.meta.method.as_bytes()) {
            Ok(m) => m,
            Err(_) => return failed(502, "invalid method"),
        };
        let request = self
            .client
            .request(method, url)
            .timeout(timeout)
            .headers(function_request_headers(call, attempt, max_attempts))
            .body(call.body.clone());
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return failed(503, transport_error_kind(&e)),
        };
        let status = response.status().as_u16();
        // A function that answers gets its own metrics label; names nobody answers for do not.
        queue_core::metrics::note_answered(&call.meta.qualified_function(), status);
        let headers = response_headers(response.headers());
        match self.read_body(call, response).await {
            Ok(body) => answered(status, headers, body, started),
            Err((status, error)) => failed(status, error),
        }
    }
}

impl FunctionInvoker {
    /// [`FunctionInvoker::invoke`] of a call whose body is in the blob store: streamed from
    /// the store to the function through the general client, one record in memory at a time,
    /// with its `Content-Length`. A read that fails on the way (the store lost, a record that
    /// does not check) aborts the request: a `503` outcome (retried as any).
    async fn invoke_stored(
        &self,
        call: &QueuedCall,
        attempt: u32,
        max_attempts: u32,
        timeout: Duration,
        started: Instant,
    ) -> Outcome {
        let failed = |status: u16, error: &str| no_answer(status, error, started);
        let url = match self.url(call) {
            Ok(url) => url,
            Err(e) => return failed(403, &e.to_string()),
        };
        let client = match (&self.function_policy, &self.policy_client) {
            (None, _) => &self.client,
            (Some(policy), Some(client)) => {
                // Address literals skip the resolver: checked as written.
                match url::Url::parse(&url) {
                    Ok(parsed) if policy.check_url(&parsed).is_ok() => client,
                    _ => return failed(403, "function address not allowed"),
                }
            }
            (Some(_), None) => return failed(403, "function address not allowed"),
        };
        let method = match reqwest::Method::from_bytes(call.meta.method.as_bytes()) {
            Ok(m) => m,
            Err(_) => return failed(502, "invalid method"),
        };
        let read = match self.open_stored_body(call).await {
            Ok(read) => read,
            Err(_) => return failed(503, "stored body unreadable"),
        };
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let noted = broken.clone();
        let body = read.body.map(move |item| {
            item.map_err(|e| {
                noted.store(true, std::sync::atomic::Ordering::Relaxed);
                std::io::Error::other(e.to_string())
            })
        });
        let mut headers = function_request_headers(call, attempt, max_attempts);
        headers.insert(
            reqwest::header::CONTENT_LENGTH,
            HeaderValue::from(read.info.len),
        );
        let request = client
            .request(method, url)
            .timeout(timeout)
            .headers(headers)
            .body(reqwest::Body::wrap_stream(body));
        let response = match request.send().await {
            Ok(r) => r,
            Err(_) if broken.load(std::sync::atomic::Ordering::Relaxed) => {
                return failed(503, "stored body unreadable");
            }
            Err(e) => {
                if crate::policy_client::refusal_of(&e).is_some() {
                    return failed(403, "function address not allowed");
                }
                return failed(503, transport_error_kind(&e));
            }
        };
        let status = response.status().as_u16();
        queue_core::metrics::note_answered(&call.meta.qualified_function(), status);
        let headers = response_headers(response.headers());
        match self.read_body(call, response).await {
            Ok(body) => answered(status, headers, body, started),
            Err((status, error)) => failed(status, error),
        }
    }

    /// [`FunctionInvoker::invoke`] over plain `http` with [`Http1Client`].
    async fn invoke_plain(
        &self,
        call: &QueuedCall,
        target: &PlainTarget,
        attempt: u32,
        max_attempts: u32,
        timeout: Duration,
        started: Instant,
    ) -> Outcome {
        let failed = |status: u16, error: &str| no_answer(status, error, started);
        let (start_time, retry, retry_max) = (
            call.meta.received_at_unix_nanos.to_string(),
            attempt.to_string(),
            max_attempts.to_string(),
        );
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(call.meta.headers.len() + 5);
        let mut user_agent = false;
        for (name, value) in &call.meta.headers {
            if is_hop_by_hop(name) || is_worker_request_header(name) {
                continue;
            }
            user_agent |= name.eq_ignore_ascii_case("user-agent");
            headers.push((name, value));
        }
        // Set from the call itself, as OpenFaaS's gateway adds them to the queued request.
        headers.extend([
            ("x-call-id", call.meta.call_id.as_str()),
            ("x-start-time", start_time.as_str()),
            ("x-retry", retry.as_str()),
            ("x-retry-max", retry_max.as_str()),
        ]);
        if !user_agent {
            headers.push(("user-agent", self.user_agent.as_str()));
        }
        let request = Request {
            method: &call.meta.method,
            origin: &target.origin,
            host_header: &target.host_header,
            target: &target.path_and_query,
            headers: &headers,
            body: &call.body,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let sent = self.http1.send_spilling(
            &request,
            self.max_response_bytes,
            self.spill_above(),
            self.function_policy.as_deref(),
        );
        match tokio::time::timeout_at(deadline, sent).await {
            Err(_) => failed(503, "timeout"),
            // A refusal is 403, not retried (403 is not a retry code): the operator's policy
            // will not change.
            Ok(Err(e)) => {
                let (status, error) = plain_failure(&e);
                failed(status, error)
            }
            Ok(Ok(response)) => {
                // A function that answers gets its own metrics label; names nobody answers for
                // do not.
                queue_core::metrics::note_answered(
                    &call.meta.qualified_function(),
                    response.status,
                );
                let headers = response
                    .headers
                    .into_iter()
                    .filter(|(name, _)| !is_hop_by_hop(name))
                    .collect();
                let Some(rest) = response.rest else {
                    return answered(
                        response.status,
                        headers,
                        Kept::Inline(response.body),
                        started,
                    );
                };
                // Larger than `--inline-response-bytes`: streamed into the store from the
                // connection, within the same deadline.
                let announced = rest.announced_len();
                // A broken answer is the outcome it is before the spill (not a generic
                // "interrupted"): what the first stream error means is noted for the put's.
                let failure = std::sync::OnceLock::new();
                let body = futures::stream::iter([Ok(response.body)])
                    .chain(rest.into_stream())
                    .inspect_err(|e| {
                        let _ = failure.set(plain_failure(e));
                    });
                // Boxed: a put's state is large, and only a call with a large answer needs it
                // (every call in flight holds its invocation future at its largest size).
                let stored = Box::pin(self.store_response(call, body, announced, &failure));
                match tokio::time::timeout_at(deadline, stored).await {
                    Err(_) => failed(503, "timeout"),
                    Ok(Err((status, error))) => failed(status, error),
                    Ok(Ok(stored)) => {
                        answered(response.status, headers, Kept::Stored(stored), started)
                    }
                }
            }
        }
    }
}

/// A plain-`http` URL taken apart for [`Http1Client`].
#[derive(Debug, PartialEq, Eq)]
pub struct PlainTarget {
    /// Where to connect.
    pub origin: Origin,
    /// The `Host` header.
    pub host_header: String,
    /// Path and query.
    pub path_and_query: String,
}

impl PlainTarget {
    /// `None` for anything but a valid `http://` URL (`https` goes through the general client).
    pub fn parse(raw: &str) -> Option<Self> {
        Self::from_url(&url::Url::parse(raw).ok()?)
    }

    /// [`PlainTarget::parse`] of a parsed URL.
    pub fn from_url(url: &url::Url) -> Option<Self> {
        if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() {
            return None;
        }
        let host = match url.host()? {
            url::Host::Domain(d) => d.to_owned(),
            url::Host::Ipv4(a) => a.to_string(),
            url::Host::Ipv6(a) => a.to_string(),
        };
        let port = url.port_or_known_default()?;
        let host_header = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return None,
        };
        let mut path_and_query = url.path().to_owned();
        if let Some(q) = url.query() {
            path_and_query.push('?');
            path_and_query.push_str(q);
        }
        Some(Self {
            origin: Origin { host, port },
            host_header,
            path_and_query,
        })
    }
}

/// The headers of a function request: the call's (hop-by-hop and the worker's own removed,
/// whatever a client or an older gateway left in the message), then the worker's, *inserted*
/// so that each has exactly one value: `X-Call-Id`, `X-Start-Time` (as OpenFaaS's gateway adds
/// them to a queued request), `X-Retry` and `X-Retry-Max`.
pub fn function_request_headers(call: &QueuedCall, attempt: u32, max_attempts: u32) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(call.meta.headers.len() + 4);
    for (name, value) in &call.meta.headers {
        if is_hop_by_hop(name) || is_worker_request_header(name) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    if let Ok(id) = HeaderValue::from_str(&call.meta.call_id) {
        headers.insert("x-call-id", id);
    }
    headers.insert(
        "x-start-time",
        HeaderValue::from(call.meta.received_at_unix_nanos),
    );
    headers.insert("x-retry", HeaderValue::from(attempt));
    headers.insert("x-retry-max", HeaderValue::from(max_attempts));
    headers
}

/// The outcome a plain-http error means, as [`FunctionInvoker::invoke_plain`] maps it.
fn plain_failure(e: &Http1Error) -> (u16, &'static str) {
    match e {
        Http1Error::Refused(_) => (403, "function address not allowed"),
        Http1Error::Connect => (503, "connect"),
        Http1Error::Io => (503, "request"),
        Http1Error::TooLarge => (502, "response too large"),
        Http1Error::Malformed(_) => (502, "invalid response"),
    }
}

/// The outcome of an invocation that got no usable answer: `status` (503 unreachable, 502
/// unusable, 403 refused by policy) and a data-free reason.
fn no_answer(status: u16, error: &str, started: Instant) -> Outcome {
    Outcome {
        status,
        headers: Vec::new(),
        body: Bytes::new(),
        stored: None,
        duration: started.elapsed(),
        error: Some(error.to_owned()),
    }
}

/// Copies response headers that may be forwarded, as strings (non-UTF-8 values are dropped).
pub fn response_headers(headers: &reqwest::header::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name.as_str()))
        .filter_map(|(name, value)| {
            value
                .to_str()
                .ok()
                .map(|v| (name.as_str().to_owned(), v.to_owned()))
        })
        .collect()
}

/// A short, data-free name for a transport error.
pub fn transport_error_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    }
}

/// A function's response body: whole in memory, or in the blob store as the call's result.
enum Kept {
    Inline(Bytes),
    Stored(BlobRef),
}

/// The outcome of a function that answered.
fn answered(status: u16, headers: Vec<(String, String)>, body: Kept, started: Instant) -> Outcome {
    let (body, stored) = match body {
        Kept::Inline(body) => (body, None),
        Kept::Stored(stored) => (Bytes::new(), Some(stored)),
    };
    Outcome {
        status,
        headers,
        body,
        stored,
        duration: started.elapsed(),
        error: None,
    }
}

impl FunctionInvoker {
    /// Deletes the blob of a stored response nobody will read (an attempt that is retried, a
    /// result not kept once its callback is done); a failure is logged, the record's expiry
    /// sweeps it later.
    pub async fn discard_stored(&self, stored: &BlobRef) {
        let (Some(blobs), Ok(key)) = (&self.blobs, BlobKey::parse(&stored.key)) else {
            return;
        };
        // Boxed: the store's open and delete states are large, and every call in flight
        // holds its handler's future at its largest size, whichever branch it takes.
        let deleted = Box::pin(async {
            match blobs.store().await {
                Ok(store) => store.delete(&key).await,
                Err(e) => Err(e),
            }
        })
        .await;
        if let Err(e) = deleted {
            tracing::warn!(error = %e, "could not delete a stored response nobody reads");
        }
    }

    /// Above how many bytes a response goes to the blob store (`None`: no store, every
    /// response is held, up to `--max-response-bytes`).
    fn spill_above(&self) -> Option<u64> {
        self.blobs
            .as_ref()
            .map(|_| self.inline_response_bytes.min(self.max_response_bytes))
    }

    /// Reads a response body of the general client: into memory up to
    /// [`FunctionInvoker::spill_above`], streamed into the store beyond; the status and
    /// data-free reason of the outcome when that fails.
    async fn read_body(
        &self,
        call: &QueuedCall,
        mut response: reqwest::Response,
    ) -> Result<Kept, (u16, &'static str)> {
        let max = self.max_response_bytes;
        let announced = response.content_length();
        if announced.is_some_and(|len| len > max) {
            return Err((502, "response too large"));
        }
        let spill = self.spill_above();
        if let Some(spill) = spill
            && announced.is_some_and(|len| len > spill)
        {
            let failure = std::sync::OnceLock::new();
            let body = Box::pin(response.bytes_stream()).inspect_err(|e| {
                let _ = failure.set((503, transport_error_kind(e)));
            });
            return Box::pin(self.store_response(call, body, announced, &failure))
                .await
                .map(Kept::Stored);
        }
        let mut buf = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| (503, transport_error_kind(&e)))?
        {
            let total = (buf.len() + chunk.len()) as u64;
            if let Some(spill) = spill
                && total > spill
            {
                buf.extend_from_slice(&chunk);
                let first = futures::stream::iter([Ok::<_, reqwest::Error>(buf.freeze())]);
                let failure = std::sync::OnceLock::new();
                let body = first
                    .chain(Box::pin(response.bytes_stream()))
                    .inspect_err(|e| {
                        let _ = failure.set((503, transport_error_kind(e)));
                    });
                return Box::pin(self.store_response(call, body, announced, &failure))
                    .await
                    .map(Kept::Stored);
            }
            if total > max {
                return Err((502, "response too large"));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Kept::Inline(buf.freeze()))
    }

    /// Streams a response body into the blob store as `call`'s result (`failure`: the outcome
    /// the body stream's first error means, noted by the caller), up to
    /// `--max-response-bytes` (the store's put holds one chunk at a time and leaves nothing
    /// behind when it fails or is dropped).
    async fn store_response<S, E>(
        &self,
        call: &QueuedCall,
        body: S,
        announced: Option<u64>,
        failure: &std::sync::OnceLock<(u16, &'static str)>,
    ) -> Result<BlobRef, (u16, &'static str)>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display + Send,
    {
        let too_large = (502, "response too large");
        let Some(blobs) = &self.blobs else {
            return Err(too_large);
        };
        // Call ids the gateway accepts always name a blob; another cannot keep a large answer.
        // A key of this answer's own: another worker running the same call at once (one that
        // lost its lease) writes and deletes its own.
        let key = BlobKey::fresh_answer(&call.meta.call_id).map_err(|_| too_large)?;
        let unavailable = (503, "result store unavailable");
        let store = blobs.store().await.map_err(|_| unavailable)?;
        let namespace = call
            .meta
            .namespace
            .as_deref()
            .map_or_else(|| self.default_namespace.clone(), str::to_ascii_lowercase);
        let limit = PutOptions {
            max_bytes: self.max_response_bytes,
            expected_len: announced,
            namespace: Some(namespace),
        };
        match store.put(&key, body, limit).await {
            Ok(info) => Ok(info.into()),
            Err(BlobError::TooLarge { .. }) => Err(too_large),
            // The answer broke on the way: what its first error means.
            Err(BlobError::Interrupted(_)) => Err(failure.get().copied().unwrap_or((503, "body"))),
            Err(_) => Err(unavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use queue_core::message::{BodyLocation, CallMeta};

    fn call(ns: Option<&str>, path: &str, query: Option<&str>) -> QueuedCall {
        QueuedCall {
            meta: CallMeta {
                call_id: "c".into(),
                function: "figlet".into(),
                namespace: ns.map(Into::into),
                method: "POST".into(),
                path: path.into(),
                query: query.map(Into::into),
                headers: vec![],
                callback_url: None,
                received_at_unix_nanos: 0,
                body: BodyLocation::Inline { len: 0 },
                record_revision: None,
                overrides: Default::default(),
                not_before_unix_nanos: None,
            },
            body: Bytes::new(),
        }
    }

    fn invoker(args: &[&str]) -> FunctionInvoker {
        let config = WorkerConfig::try_parse_from(
            std::iter::once("queue-worker").chain(args.iter().copied()),
        )
        .unwrap();
        FunctionInvoker::new(
            &config,
            http_client("test").unwrap(),
            Arc::new(Http1Client::new(
                1,
                Duration::from_secs(1),
                Duration::from_secs(1),
            )),
        )
    }

    #[test]
    fn gateway_targets_built_without_a_parse_equal_the_parsed_ones() {
        let gateways = [
            "http://gateway:8080",
            "http://127.0.0.1:8080/",
            "http://GateWay.OpenFaaS/prefix",
            "http://[::1]:9000",
            "http://gw",
        ];
        let cases: [(Option<&str>, &str, Option<&str>); 12] = [
            (None, "", None),
            (None, "/", None),
            (Some("team-a"), "/a/b", Some("x=1&y=2")),
            (None, "/%41b", Some("q=%20")),
            (None, "/a:b@c;d=e,f+g$h!i*j(k)l~m", Some("a=b/c?d")),
            (None, "", Some("")),
            // What a parser rewrites goes through the parser (no fast target).
            (None, "/a\"b", None),
            (None, "/a<b>", None),
            (None, "/a{b}", None),
            (None, "/é", None),
            (None, "/a", Some("x='1'")),
            (None, "/a?b", None),
        ];
        for gateway in gateways {
            let inv = invoker(&["--gateway-url", gateway]);
            for (ns, path, query) in cases {
                let c = call(ns, path, query);
                let parsed = PlainTarget::parse(&inv.url(&c).unwrap());
                match inv.gateway_target(&c) {
                    Some(fast) => assert_eq!(Some(fast), parsed, "{gateway} {path:?} {query:?}"),
                    None => assert!(
                        path.bytes()
                            .any(|b| !(0x21..=0x7e).contains(&b) || b"\"<>{}?".contains(&b))
                            || query.is_some_and(|q| q.contains('\'')),
                        "{gateway} {path:?} {query:?}: no fast target for a plain path"
                    ),
                }
            }
        }
        // https gateways and direct mode keep the general path.
        let tls = invoker(&["--gateway-url", "https://gateway:8443"]);
        assert!(tls.gateway_target(&call(None, "/a", None)).is_none());
        let direct = invoker(&["--invoke-mode", "direct"]);
        assert!(direct.gateway_target(&call(None, "/a", None)).is_none());
    }

    #[test]
    fn gateway_urls_keep_path_and_query_as_sent() {
        let inv = invoker(&["--gateway-url", "http://gw:8080/"]);
        assert_eq!(
            inv.url(&call(None, "", None)).unwrap(),
            "http://gw:8080/function/figlet"
        );
        assert_eq!(
            inv.url(&call(Some("team"), "/a/b%20c/", Some("x=1&y=%2F")))
                .unwrap(),
            "http://gw:8080/function/figlet.team/a/b%20c/?x=1&y=%2F"
        );
    }

    #[test]
    fn direct_urls_use_namespace_and_suffix() {
        let inv = invoker(&[
            "--invoke-mode",
            "direct",
            "--function-suffix",
            ".svc.cluster.local",
            "--allowed-namespaces",
            "dev,staging",
        ]);
        assert_eq!(
            inv.url(&call(None, "", Some("q=1"))).unwrap(),
            "http://figlet.openfaas-fn.svc.cluster.local:8080/?q=1"
        );
        assert_eq!(
            inv.url(&call(Some("dev"), "/x", None)).unwrap(),
            "http://figlet.dev.svc.cluster.local:8080/x"
        );
        assert_eq!(
            inv.url(&call(Some("Dev"), "/x", None)).unwrap(),
            "http://figlet.dev.svc.cluster.local:8080/x"
        );
        for foreign in ["com", "kube-system", "google"] {
            assert_eq!(
                inv.url(&call(Some(foreign), "/", None)),
                Err(Unroutable::NamespaceNotAllowed),
                "{foreign}"
            );
        }
    }

    #[tokio::test]
    async fn direct_mode_refuses_function_addresses_the_function_policy_refuses() {
        // `{name}.{namespace}{suffix}` spelling an address: 127.0.0.1 and 169.254.169.254.
        let loopback = invoker(&[
            "--invoke-mode",
            "direct",
            "--default-namespace",
            "0",
            "--function-suffix",
            ".0.1",
            "--function-deny",
            "127.0.0.0/8",
        ]);
        let mut c = call(None, "/", None);
        c.meta.function = "127".into();
        let outcome = loopback.invoke(&c, 1, 1, Duration::from_secs(5)).await;
        assert_eq!(outcome.status, 403);
        assert_eq!(
            outcome.error.as_deref(),
            Some("function address not allowed")
        );
        // The built-in refusals apply without any list.
        let metadata = invoker(&[
            "--invoke-mode",
            "direct",
            "--default-namespace",
            "254",
            "--function-suffix",
            ".169.254",
        ]);
        c.meta.function = "169".into();
        let outcome = metadata.invoke(&c, 1, 1, Duration::from_secs(5)).await;
        assert_eq!(
            (outcome.status, outcome.error.as_deref()),
            (403, Some("function address not allowed"))
        );
    }

    /// A server that answers every connection's first request with `answer`, then closes.
    async fn answering(answer: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream.write_all(&answer).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_large_answer_is_stored_and_a_broken_one_keeps_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = SharedBlobs::files(dir.path(), queue_core::sealing::Sealing::off())
            .await
            .unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let chunked = |tail: &[u8]| {
            let mut answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            for piece in big.chunks(50_000) {
                answer.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                answer.extend_from_slice(piece);
                answer.extend_from_slice(b"\r\n");
            }
            answer.extend_from_slice(tail);
            answer
        };
        let mut c = call(None, "", None);
        c.meta.call_id = "large-answer".into();
        let cases: [(&[u8], u16, Option<&str>); 3] = [
            (b"0\r\n\r\n", 200, None),
            // Past the spill: bad framing is still an invalid answer (502, not retried), a
            // cut connection still a failed request (503).
            (b"zz\r\n", 502, Some("invalid response")),
            (b"", 503, Some("request")),
        ];
        for (tail, status, error) in cases {
            let url = answering(chunked(tail)).await;
            let inv = invoker(&["--gateway-url", &url, "--inline-response-bytes", "64KiB"])
                .with_blobs(Some(blobs.clone()))
                .unwrap();
            let outcome = inv.invoke(&c, 1, 1, Duration::from_secs(20)).await;
            assert_eq!((outcome.status, outcome.error.as_deref()), (status, error));
            let store = blobs.store().await.unwrap();
            if status == 200 {
                let stored = outcome.stored.expect("stored");
                let key = BlobKey::parse(&stored.key).unwrap();
                assert_eq!(key.call_id(), "large-answer");
                assert!(key.tag().is_some(), "an answer's own key: {key}");
                assert!(outcome.body.is_empty());
                assert_eq!(stored.len, big.len() as u64);
                let mut read = store.get(&key, None).await.unwrap();
                let mut all = Vec::new();
                while let Some(piece) = read.body.next().await {
                    all.extend_from_slice(&piece.unwrap());
                }
                assert_eq!(all, big);
                inv.discard_stored(&stored).await;
            } else {
                assert!(outcome.stored.is_none());
            }
            // Nothing left: discarded, or never completed.
            assert!(store.list().await.unwrap().is_empty(), "{status}");
        }
    }

    #[test]
    fn the_workers_headers_replace_whatever_the_message_carries() {
        let mut c = call(None, "", None);
        c.meta.headers = vec![
            ("x-retry".into(), "7".into()),
            ("X-Retry-Max".into(), "99".into()),
            ("x-call-id".into(), "spoofed".into()),
            ("connection".into(), "close".into()),
            ("x-multi".into(), "1".into()),
            ("x-multi".into(), "2".into()),
        ];
        let h = function_request_headers(&c, 2, 5);
        let all = |n: &str| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("x-retry"), ["2"]);
        assert_eq!(all("x-retry-max"), ["5"]);
        assert_eq!(all("x-call-id"), ["c"]);
        assert!(all("connection").is_empty());
        assert_eq!(all("x-multi"), ["1", "2"]);
    }

    #[test]
    fn hop_by_hop_headers_are_recognised() {
        for h in [
            "Connection",
            "transfer-encoding",
            "Host",
            "Content-Length",
            "TE",
        ] {
            assert!(is_hop_by_hop(h), "{h}");
        }
        for h in ["content-type", "authorization", "x-call-id"] {
            assert!(!is_hop_by_hop(h), "{h}");
        }
    }
}
