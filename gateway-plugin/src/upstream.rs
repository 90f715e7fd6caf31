//! Front mode (`--upstream-gateway`): the gateway stands where OpenFaaS's gateway stood (its
//! Service, its ingress) and passes every request that is not one of its own routes to it.
//!
//! - **Which requests**: those no route of [`crate::routes::routes`] matches, outside the
//!   gateway's own path spaces (`/async-function`, `/async-calls`, `/system/async`: an unknown
//!   path there is our `404`). The router's fallback, declared in the route table
//!   ([`crate::routes::UNROUTED`]) as public: OpenFaaS's gateway checks its own credentials
//!   (its basic auth on `/system/...`), so `Authorization` and every other end-to-end header
//!   reach it untouched and ours are not asked for.
//! - **Streaming**: request and response bodies are passed frame by frame in both directions,
//!   never collected; the upstream's status and headers come back as they are.
//! - **Headers** (the header policy, [`queue_core::headers`]): the hop-by-hop headers
//!   (`Connection`, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//!   and those `Connection` names) are removed in both directions. `Host` becomes the upstream's
//!   and the client's goes to `X-Forwarded-Host`; `X-Forwarded-For` is the peer (a trusted
//!   proxy's chain, then the proxy: [`crate::peer::forwarded_for`]); `X-Forwarded-Proto` is
//!   how the client reached us. From a peer that is not in `--trusted-proxies` every
//!   forwarding header (`X-Forwarded-*`, `Forwarded`, `X-Real-Ip`, `X-Client-Ip`) is replaced
//!   or dropped; a trusted proxy's `X-Forwarded-Host` and `X-Forwarded-Proto` are kept.
//! - **Bounded**: a connect timeout, and a timeout from sending the request until the
//!   upstream's response headers (the upload included); past them `504 upstream_timeout`.
//!   A refused or failed connection, or a connection that ends before an answer, is
//!   `502 upstream_unavailable`. Bodies have no deadline of their own once the answer started
//!   (a function may stream), besides the request body deadline of every request
//!   (`--body-read-timeout`).
//! - Plain `http` to the upstream (the OpenFaaS gateway inside the cluster), pooled
//!   connections (hyper's client), HTTP/1.1. Protocol upgrades (WebSocket) are not passed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use queue_core::headers::{connection_tokens, is_forwarding_header, is_proxy_hop_by_hop};
use queue_core::settings::parse_duration;

use crate::error::ApiError;
use crate::peer::TrustedProxies;

/// How long an idle pooled connection to the upstream is kept: short, so the pool lets a
/// connection go before the upstream's own idle timeout closes it under a new request.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Front-mode settings: flags and environment variables, shared by `gateway-plugin` and
/// `faas-async`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Front mode: the OpenFaaS gateway (`http://gateway.openfaas:8080`) every request that
    /// is not one of this gateway's routes is passed to, streamed both ways. `gateway-plugin`
    /// also takes OpenFaaS's `faas_gateway_address` / `faas_gateway_port`. Without it,
    /// unknown routes are `404`.
    #[arg(long, env = "UPSTREAM_GATEWAY_URL", value_name = "URL", value_parser = parse_upstream_url)]
    pub upstream_gateway: Option<UpstreamUrl>,
    /// Front mode: longest wait for a connection to the upstream (`504 upstream_timeout`).
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,
    /// Front mode: longest wait from sending a request (its body included) until the
    /// upstream's response headers (`504 upstream_timeout`); keep it above the OpenFaaS
    /// gateway's own `upstream_timeout`, so that its answer arrives first.
    #[arg(long, env = "UPSTREAM_RESPONSE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub upstream_response_timeout: Duration,
}

impl Default for UpstreamArgs {
    fn default() -> Self {
        Self {
            upstream_gateway: None,
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(75),
        }
    }
}

/// The upstream gateway's address: `http://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    authority: Authority,
    /// Prepended to every proxied path; empty, or `/...` without a trailing `/`.
    prefix: String,
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

/// Why `--upstream-gateway` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--upstream-gateway (UPSTREAM_GATEWAY_URL, or faas_gateway_address/faas_gateway_port): {0}"
)]
pub struct InvalidUpstreamUrl(String);

impl std::str::FromStr for UpstreamUrl {
    type Err = InvalidUpstreamUrl;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| InvalidUpstreamUrl(why.to_owned());
        let uri: Uri = s
            .trim()
            .parse()
            .map_err(|_| invalid("not a URL (e.g. http://gateway.openfaas:8080)"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "https is not supported: give the OpenFaaS gateway's plain http address inside the cluster (TLS ends at the ingress or at this gateway's --tls-cert)",
                ));
            }
            _ => return Err(invalid("the URL must start with http://")),
        }
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or_else(|| invalid("the URL has no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "credentials in the URL are not supported: clients' own Authorization headers are passed through",
            ));
        }
        if uri.query().is_some() {
            return Err(invalid("the URL must not have a query"));
        }
        Ok(Self {
            authority: authority.clone(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

/// `--upstream-gateway`'s value parser; errors name the setting, never credentials.
pub fn parse_upstream_url(s: &str) -> Result<UpstreamUrl, String> {
    s.parse().map_err(|e: InvalidUpstreamUrl| e.to_string())
}

/// Marks an answer that came from the upstream: the gateway's own response headers
/// (`X-Content-Type-Options`) are not added to it.
#[derive(Debug, Clone, Copy)]
pub struct Proxied;

/// The upstream gateway and the pooled client to it.
#[derive(Debug)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    url: UpstreamUrl,
    connect_timeout: Duration,
    response_timeout: Duration,
    trusted: TrustedProxies,
    /// `X-Forwarded-Proto`: how clients reach this gateway.
    proto: HeaderValue,
}

impl Upstream {
    /// A client for `args.upstream_gateway` (`None` without one). `tls`: whether this gateway
    /// serves HTTPS (`X-Forwarded-Proto`).
    pub fn from_args(args: &UpstreamArgs, trusted: TrustedProxies, tls: bool) -> Option<Self> {
        let url = args.upstream_gateway.clone()?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(args.upstream_connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Some(Self {
            client,
            url,
            connect_timeout: args.upstream_connect_timeout,
            response_timeout: args.upstream_response_timeout,
            trusted,
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
        })
    }

    /// Where requests go.
    pub fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    /// Passes `request` to the upstream and its answer back, both bodies streamed; a failure
    /// to get an answer is a JSON `502`/`504` (module documentation).
    pub async fn forward(&self, request: Request) -> Response {
        let method = request.method().clone();
        let (mut parts, body) = request.into_parts();
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            (parts.uri.authority()).and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        parts.uri = match self.target(&parts.uri) {
            Ok(uri) => uri,
            Err(e) => return e.into_response(),
        };
        remove_hop_by_hop(&mut parts.headers);
        self.set_forwarding(&mut parts.headers, peer, original_host);
        parts.version = Version::HTTP_11;
        let request = Request::from_parts(parts, body);
        let answer = tokio::time::timeout(self.response_timeout, self.client.request(request));
        match answer.await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                // Our connection's version, not the upstream's (an HTTP/1.0 upstream's answer
                // would otherwise close a kept-alive HTTP/1.1 connection).
                parts.version = Version::HTTP_11;
                parts.extensions.insert(Proxied);
                Response::from_parts(parts, Body::new(body))
            }
            Ok(Err(e)) => self.failed(&method, &e).into_response(),
            Err(_) => {
                tracing::warn!(
                    %method,
                    upstream = %self.url,
                    timeout = ?self.response_timeout,
                    "the upstream gateway did not answer in time"
                );
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "the OpenFaaS gateway did not answer within {}",
                        humantime::format_duration(self.response_timeout)
                    ),
                )
                .into_response()
            }
        }
    }

    /// The upstream URI of a request for `uri`: the upstream's authority, its prefix, then the
    /// request's path and query as they came.
    fn target(&self, uri: &Uri) -> Result<Uri, ApiError> {
        let path_and_query = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let path_and_query = if self.url.prefix.is_empty() {
            path_and_query
        } else {
            let joined = format!("{}{path_and_query}", self.url.prefix);
            PathAndQuery::try_from(joined)
                .map_err(|_| ApiError::bad_request("invalid_path", "the path is not valid"))?
        };
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.url.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ApiError::bad_request("invalid_path", "the path is not valid"))
    }

    /// The forwarding headers the upstream gets (module documentation).
    fn set_forwarding(
        &self,
        headers: &mut HeaderMap,
        peer: Option<IpAddr>,
        original_host: Option<HeaderValue>,
    ) {
        let trusted_peer = peer.is_some_and(|ip| self.trusted.trusts(ip));
        let chain = {
            let client_chain =
                (headers.get_all(X_FORWARDED_FOR).iter()).filter_map(|v| v.to_str().ok());
            crate::peer::forwarded_for(peer, trusted_peer, client_chain)
        };
        if !trusted_peer
            && headers
                .keys()
                .any(|name| is_forwarding_header(name.as_str()))
        {
            let forwarding: Vec<HeaderName> = (headers.keys())
                .filter(|name| is_forwarding_header(name.as_str()))
                .cloned()
                .collect();
            for name in forwarding {
                headers.remove(name);
            }
        }
        headers.remove(X_FORWARDED_FOR);
        if let Some(chain) = chain.and_then(|c| HeaderValue::from_str(&c).ok()) {
            headers.insert(X_FORWARDED_FOR, chain);
        }
        if !(trusted_peer && headers.contains_key(X_FORWARDED_PROTO)) {
            headers.insert(X_FORWARDED_PROTO, self.proto.clone());
        }
        if !(trusted_peer && headers.contains_key(X_FORWARDED_HOST)) {
            headers.remove(X_FORWARDED_HOST);
            if let Some(host) = original_host {
                headers.insert(X_FORWARDED_HOST, host);
            }
        }
        // The client sets the upstream's own (`Host` is the connection's, here the upstream's).
        headers.remove(header::HOST);
    }

    /// The answer to a request the upstream did not answer.
    fn failed(
        &self,
        method: &axum::http::Method,
        e: &hyper_util::client::legacy::Error,
    ) -> ApiError {
        let timed_out = e.is_connect()
            && has_source(e, |s| {
                s.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            });
        let body_late = has_source(e, |s| s.is::<crate::connections::BodyTimeout>());
        tracing::warn!(%method, upstream = %self.url, error = %ErrorChain(e), "upstream gateway request failed");
        if body_late {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                "the request body did not arrive in time",
            );
        }
        if timed_out {
            return ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "could not connect to the OpenFaaS gateway within {}",
                    humantime::format_duration(self.connect_timeout)
                ),
            );
        }
        let message = if e.is_connect() {
            "cannot connect to the OpenFaaS gateway; retry later"
        } else {
            "the OpenFaaS gateway closed the connection without an answer; retry later"
        };
        ApiError::new(StatusCode::BAD_GATEWAY, "upstream_unavailable", message)
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes the hop-by-hop headers and those `Connection` names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = (headers.get_all(header::CONNECTION).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(connection_tokens)
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    if headers
        .keys()
        .any(|name| is_proxy_hop_by_hop(name.as_str()))
    {
        for name in queue_core::headers::PROXY_HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

/// Whether `e` or any error it came from passes `test`.
fn has_source(
    e: &(dyn std::error::Error + 'static),
    test: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if test(err) {
            return true;
        }
        source = err.source();
    }
    false
}

/// An error with its sources, `a: b: c`, for the log.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_parse_or_say_why_not() {
        let url: UpstreamUrl = "http://gateway.openfaas:8080".parse().unwrap();
        assert_eq!(url.to_string(), "http://gateway.openfaas:8080");
        let url: UpstreamUrl = "http://10.0.0.1/base/".parse().unwrap();
        assert_eq!(url.prefix, "/base");
        for (bad, says) in [
            ("https://gateway:8080", "https"),
            ("gateway:8080", "http://"),
            ("ftp://gateway", "http://"),
            ("http://user:pw@gateway:8080", "credentials"),
            ("http://gateway:8080/?a=1", "query"),
            ("not a url", "not a URL"),
        ] {
            let err = bad.parse::<UpstreamUrl>().unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains("--upstream-gateway"),
                "{bad}: {err}"
            );
            assert!(!err.contains("pw"), "{err}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("x-hop, keep-alive"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("authorization", HeaderValue::from_static("Basic y"));
        remove_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "content-length"]);
    }

    fn upstream(trusted: &[&str]) -> Upstream {
        let args = UpstreamArgs {
            upstream_gateway: Some("http://gw:8080/p".parse().unwrap()),
            ..UpstreamArgs::default()
        };
        let trusted = TrustedProxies(trusted.iter().map(|t| t.parse().unwrap()).collect());
        Upstream::from_args(&args, trusted, false).unwrap()
    }

    #[tokio::test]
    async fn forwarding_headers_follow_the_trusted_proxies() {
        let peer = Some("10.0.0.5".parse().unwrap());
        let client_headers = || {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_static("public.example"));
            h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
            h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
            h.insert("x-forwarded-host", HeaderValue::from_static("lb.example"));
            h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
            h
        };
        let get = |h: &HeaderMap, n: &str| h.get(n).map(|v| v.to_str().unwrap().to_owned());

        let mut h = client_headers();
        let host = h.get("host").cloned();
        upstream(&[]).set_forwarding(&mut h, peer, host);
        assert_eq!(get(&h, "x-forwarded-for").as_deref(), Some("10.0.0.5"));
        assert_eq!(get(&h, "x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(
            get(&h, "x-forwarded-host").as_deref(),
            Some("public.example")
        );
        assert_eq!(get(&h, "x-real-ip"), None);
        assert_eq!(get(&h, "host"), None, "the client sets the upstream's");

        let mut h = client_headers();
        let host = h.get("host").cloned();
        upstream(&["10.0.0.0/8"]).set_forwarding(&mut h, peer, host);
        assert_eq!(
            get(&h, "x-forwarded-for").as_deref(),
            Some("6.6.6.6, 10.0.0.5")
        );
        assert_eq!(get(&h, "x-forwarded-proto").as_deref(), Some("https"));
        assert_eq!(get(&h, "x-forwarded-host").as_deref(), Some("lb.example"));
        assert_eq!(get(&h, "x-real-ip").as_deref(), Some("6.6.6.6"));
    }

    #[tokio::test]
    async fn the_target_keeps_the_path_and_query_under_the_prefix() {
        let uri: Uri = "/function/f/a%20b?x=1&y".parse().unwrap();
        assert_eq!(
            upstream(&[]).target(&uri).unwrap().to_string(),
            "http://gw:8080/p/function/f/a%20b?x=1&y"
        );
    }
}
