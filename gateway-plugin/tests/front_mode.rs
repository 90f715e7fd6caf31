//! Front mode (`--upstream-gateway`): the gateway in front of an OpenFaaS gateway stand-in (a
//! real HTTP server on 127.0.0.1). Every route not ours passes through byte for byte (status,
//! headers, streamed bodies both ways, 32 MiB each way), hop-by-hop headers removed,
//! `X-Forwarded-*` added; `/async-function/...` is queued by us (a real nats-server); an
//! upstream that is down is `502`, one too slow `504`, both JSON.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use common::{DEADLINE, Gateway, assert_json_error, http, queued};
use futures::StreamExt;
use test_support::nats_server::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

/// The `Date` every stand-in answer carries, so that a direct answer and a proxied one can be
/// compared header for header.
const FIXED_DATE: &str = "Thu, 01 Jan 2026 00:00:00 GMT";
const LARGE: usize = 32 << 20;

/// What the stand-in saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn all(&self, name: &str) -> Vec<&str> {
        (self.headers.iter())
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str) -> Option<&str> {
        let all = self.all(name);
        assert!(all.len() <= 1, "{name} repeated: {all:?}");
        all.first().copied()
    }
}

/// The OpenFaaS gateway's stand-in.
#[derive(Default)]
struct StandIn {
    seen: Mutex<Vec<Seen>>,
    /// `/function/stream`: sends its second chunk once notified.
    release: Notify,
    /// `/function/upload`: notified when the first chunk of the request body arrived.
    first_chunk: Notify,
}

impl StandIn {
    async fn start() -> (Arc<Self>, SocketAddr) {
        let state = Arc::new(Self::default());
        let app = axum::Router::new()
            .fallback(stand_in)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (state, addr)
    }

    fn seen(&self, target_prefix: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        (seen.iter())
            .filter(|s| s.target.starts_with(target_prefix))
            .cloned()
            .collect()
    }
}

/// `len` bytes of a pattern that does not repeat at chunk boundaries.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
}

fn stream_of(data: Vec<u8>, chunk: usize) -> Body {
    let data = Bytes::from(data);
    let chunks = futures::stream::unfold(0, move |at| {
        let data = data.clone();
        async move {
            (at < data.len()).then(|| {
                let end = (at + chunk).min(data.len());
                (Ok::<_, std::io::Error>(data.slice(at..end)), end)
            })
        }
    });
    Body::from_stream(chunks)
}

fn channel_body(rx: mpsc::Receiver<Bytes>) -> Body {
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    }))
}

async fn stand_in(State(state): State<Arc<StandIn>>, request: Request) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(String::new, ToString::to_string);
    let seen = Seen {
        method: request.method().to_string(),
        target: target.clone(),
        headers: (request.headers().iter())
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    state.seen.lock().unwrap().push(seen);
    let path = request.uri().path().to_owned();
    let mut response = Response::builder().header("date", FIXED_DATE);
    match path.as_str() {
        p if p.starts_with("/function/echo") => {
            let content_type = request.headers().get("content-type").cloned();
            if let Some(ct) = content_type {
                response = response.header("content-type", ct);
            }
            response
                .header("x-upstream", "stand-in")
                .body(request.into_body())
                .unwrap()
        }
        "/system/custom" => response
            .status(418)
            .header("x-multi", "a")
            .header("x-multi", "b")
            .header("set-cookie", "session=1; HttpOnly")
            .header("www-authenticate", "Basic realm=\"OpenFaaS\"")
            .header("connection", "x-hop-response")
            .header("x-hop-response", "1")
            .header("keep-alive", "timeout=5")
            .header("content-type", "text/plain")
            .body(Body::from("teapot"))
            .unwrap(),
        "/system/big" => {
            let len = request
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            // No Content-Length: chunked, as a function streaming its answer.
            response
                .header("content-type", "application/octet-stream")
                .body(stream_of(pattern(len), 61 * 1024))
                .unwrap()
        }
        "/function/slow" => std::future::pending().await,
        "/function/stream" => {
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"first;")).await.unwrap();
                state.release.notified().await;
                tx.send(Bytes::from_static(b"second")).await.unwrap();
            });
            response.body(channel_body(rx)).unwrap()
        }
        "/function/upload" => {
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                let mut body = request.into_body().into_data_stream();
                let mut total = 0;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.unwrap();
                    if total == 0 && !chunk.is_empty() {
                        state.first_chunk.notify_one();
                    }
                    total += chunk.len();
                }
                tx.send(Bytes::from(format!("received {total}")))
                    .await
                    .unwrap();
            });
            response.body(channel_body(rx)).unwrap()
        }
        _ => response
            .status(203)
            .header("content-type", "text/html")
            .body(Body::from(format!("page {target}")))
            .unwrap(),
    }
}

/// One request over a new connection, written as is; the answer read to its end
/// (`Connection: close`): status, headers in order, body (chunked decoded).
async fn raw_exchange(addr: &str, request: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw))
        .await
        .expect("no answer")
        .unwrap();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v == "chunked")
    {
        body = dechunk(&body);
    }
    (status.parse().unwrap(), headers, body)
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = std::str::from_utf8(&raw[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn header_list(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    (headers.iter())
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

fn front_mode_args(upstream: &str) -> Vec<String> {
    vec![
        "--upstream-gateway".into(),
        upstream.into(),
        "--upstream-response-timeout".into(),
        "3s".into(),
    ]
}

async fn start_gateway(nats: &NatsServer, extra: &[String]) -> Gateway {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    Gateway::start(&nats.url(), &extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_routes_pass_through_as_they_are_and_async_calls_are_ours() {
    let nats = NatsServer::start().await.unwrap();
    let (upstream, upstream_addr) = StandIn::start().await;
    let upstream_url = format!("http://{upstream_addr}");
    let gateway = start_gateway(&nats, &front_mode_args(&upstream_url)).await;
    let gateway_addr = gateway.url.trim_start_matches("http://").to_owned();
    let client = http();

    // A request as a client writes it: hop-by-hop headers, forwarding headers it may not
    // set, repeated headers, a query, an encoded path, credentials for OpenFaaS.
    let request = "POST /function/echo.openfaas-fn/deep/a%20b?q=1&r=two%2F HTTP/1.1\r\n\
        Host: public.example\r\n\
        Connection: close, X-Hop-Request\r\n\
        X-Hop-Request: secret\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Proxy-Authorization: Basic cHJveHk6cHc=\r\n\
        Authorization: Basic dXNlcjpvcGVuZmFhcw==\r\n\
        X-Forwarded-For: 6.6.6.6\r\n\
        X-Forwarded-Host: evil.example\r\n\
        X-Real-Ip: 6.6.6.6\r\n\
        X-Custom: a\r\n\
        X-Custom: b\r\n\
        X-Call-Id: client-trace-1\r\n\
        Content-Type: application/x-thing\r\n\
        Content-Length: 5\r\n\
        \r\n\
        hello";
    let (status, headers, body) = raw_exchange(&gateway_addr, request.as_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"hello", "the body came back through both ways");
    let get = |name: &str| {
        (headers.iter())
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("x-upstream"), ["stand-in"]);
    assert_eq!(get("content-type"), ["application/x-thing"]);
    assert_eq!(get("date"), [FIXED_DATE], "the upstream's own headers");
    assert!(
        get("x-content-type-options").is_empty(),
        "nothing of ours added"
    );

    let seen = upstream.seen("/function/echo");
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let seen = &seen[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(
        seen.target,
        "/function/echo.openfaas-fn/deep/a%20b?q=1&r=two%2F"
    );
    for hop in [
        "connection",
        "x-hop-request",
        "keep-alive",
        "te",
        "proxy-authorization",
        "transfer-encoding",
        "upgrade",
    ] {
        assert_eq!(seen.one(hop), None, "{hop} is hop-by-hop");
    }
    assert_eq!(
        seen.one("authorization"),
        Some("Basic dXNlcjpvcGVuZmFhcw=="),
        "OpenFaaS's credentials reach it untouched"
    );
    assert_eq!(seen.all("x-custom"), ["a", "b"], "repeated, in order");
    assert_eq!(seen.one("x-call-id"), Some("client-trace-1"));
    assert_eq!(seen.one("content-type"), Some("application/x-thing"));
    assert_eq!(seen.one("content-length"), Some("5"));
    assert_eq!(seen.one("host"), Some(upstream_addr.to_string().as_str()));
    assert_eq!(
        seen.one("x-forwarded-for"),
        Some("127.0.0.1"),
        "the peer, not what an untrusted client said"
    );
    assert_eq!(seen.one("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.one("x-forwarded-host"), Some("public.example"));
    assert_eq!(seen.one("x-real-ip"), None);

    // The upstream's status and headers, as they came: the same answer asked directly and
    // through the gateway, header for header, less the hop-by-hop ones.
    let direct = client
        .get(format!("{upstream_url}/system/custom"))
        .send()
        .await
        .unwrap();
    assert!(
        direct.headers().contains_key("x-hop-response"),
        "the stand-in sends a connection-named header"
    );
    let mut expected = header_list(direct.headers());
    expected.retain(|(n, _)| !matches!(n.as_str(), "connection" | "keep-alive" | "x-hop-response"));
    let proxied = client
        .get(format!("{}/system/custom", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), 418);
    assert_eq!(header_list(proxied.headers()), expected);
    assert_eq!(proxied.bytes().await.unwrap(), "teapot");

    // An unknown route of ours is the upstream's too.
    let page = client
        .get(format!("{}/ui/some/page?x=1", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 203);
    assert_eq!(page.text().await.unwrap(), "page /ui/some/page?x=1");

    // 32 MiB up and back, and 32 MiB down (chunked), byte for byte.
    let large = pattern(LARGE);
    let echoed = client
        .post(format!("{}/function/echo", gateway.url))
        .header("content-type", "application/octet-stream")
        .body(large.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), 200);
    assert_eq!(
        echoed
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap()),
        Some(LARGE.to_string().as_str()),
        "the upstream's length passed on"
    );
    let echoed = echoed.bytes().await.unwrap();
    assert!(echoed.len() == LARGE && echoed == large, "32 MiB echoed");
    let big = client
        .get(format!("{}/system/big?bytes={LARGE}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 200);
    assert!(!big.headers().contains_key("content-length"), "chunked");
    let big = big.bytes().await.unwrap();
    assert!(big.len() == LARGE && big == large, "32 MiB downloaded");

    // Ours: an async call is queued here, never passed on.
    let accepted = client
        .post(format!("{}/async-function/echo", gateway.url))
        .body("queued")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    assert!(accepted.headers().contains_key("x-call-id"));
    assert_eq!(queued(&nats.url()).await, 1, "the stream holds the call");
    for path in ["/async-calls/nothing/here", "/system/async/nothing"] {
        let r = client
            .get(format!("{}{path}", gateway.url))
            .send()
            .await
            .unwrap();
        assert_json_error(r, 404, "not_found").await;
    }
    let health = client
        .get(format!("{}/healthz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    for ours in [
        "/async-function",
        "/async-calls",
        "/system/async",
        "/healthz",
    ] {
        assert!(upstream.seen(ours).is_empty(), "{ours} was passed on");
    }
    gateway.shutdown().await;
}

/// Neither body is held back: the upstream's first chunk reaches the client before the
/// upstream finished, and the client's first chunk reaches the upstream before the client
/// finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_stream_both_ways() {
    let nats = NatsServer::start().await.unwrap();
    let (upstream, upstream_addr) = StandIn::start().await;
    let gateway = start_gateway(&nats, &front_mode_args(&format!("http://{upstream_addr}"))).await;
    let client = http();

    let response = tokio::time::timeout(
        DEADLINE,
        client
            .get(format!("{}/function/stream", gateway.url))
            .send(),
    )
    .await
    .expect("the answer's head did not arrive before the upstream finished")
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut chunks = response.bytes_stream();
    let first = tokio::time::timeout(DEADLINE, chunks.next())
        .await
        .expect("the first chunk did not arrive before the upstream finished")
        .unwrap()
        .unwrap();
    assert_eq!(first, "first;");
    upstream.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, chunks.next()).await.unwrap() {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"second");

    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let upload = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let request = client
        .post(format!("{}/function/upload", gateway.url))
        .body(reqwest::Body::wrap_stream(upload))
        .send();
    let request = tokio::spawn(request);
    tx.send(Bytes::from(vec![b'a'; 1000])).await.unwrap();
    tokio::time::timeout(DEADLINE, upstream.first_chunk.notified())
        .await
        .expect("the first chunk did not reach the upstream before the client finished");
    tx.send(Bytes::from(vec![b'b'; 24])).await.unwrap();
    drop(tx);
    let response = tokio::time::timeout(DEADLINE, request)
        .await
        .expect("no answer")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "received 1024");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_down_is_502_and_one_too_slow_504() {
    let nats = NatsServer::start().await.unwrap();
    // A port nothing listens on any more.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let down = start_gateway(&nats, &front_mode_args(&format!("http://{closed}"))).await;
    let client = http();
    for path in ["/function/fn", "/system/functions"] {
        let r = client
            .get(format!("{}{path}", down.url))
            .send()
            .await
            .unwrap();
        assert_json_error(r, 502, "upstream_unavailable").await;
    }
    // Still ours: an async call is queued whatever the upstream does.
    let accepted = client
        .post(format!("{}/async-function/fn", down.url))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    down.shutdown().await;

    let (upstream, upstream_addr) = StandIn::start().await;
    let slow = start_gateway(&nats, &front_mode_args(&format!("http://{upstream_addr}"))).await;
    let started = std::time::Instant::now();
    let r = client
        .post(format!("{}/function/slow", slow.url))
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_json_error(r, 504, "upstream_timeout").await;
    assert_eq!(upstream.seen("/function/slow").len(), 1);
    slow.shutdown().await;
}

/// With an authenticator, proxied routes stay public (OpenFaaS checks its own credentials,
/// which reach it untouched) while ours still ask for ours; a trusted proxy's forwarding
/// headers are kept and the chain extended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxied_routes_are_public_and_trusted_proxies_are_believed() {
    let nats = NatsServer::start().await.unwrap();
    let (upstream, upstream_addr) = StandIn::start().await;
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(secrets.path().join("basic-auth-password"), "ours\n").unwrap();
    let mut args = front_mode_args(&format!("http://{upstream_addr}/"));
    args.extend(
        [
            "--basic-auth",
            "--secret-mount-path",
            secrets.path().to_str().unwrap(),
            "--trusted-proxies",
            "127.0.0.1",
        ]
        .map(str::to_owned),
    );
    let gateway = start_gateway(&nats, &args).await;
    let client = http();

    let r = client
        .get(format!("{}/system/functions", gateway.url))
        .basic_auth("admin", Some("openfaas-password"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "faas.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 203, "passed on without our credentials");
    let seen = upstream.seen("/system/functions");
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(
        seen.one("authorization"),
        Some("Basic YWRtaW46b3BlbmZhYXMtcGFzc3dvcmQ="),
        "the client's credentials, untouched"
    );
    assert_eq!(seen.one("x-forwarded-for"), Some("203.0.113.9, 127.0.0.1"));
    assert_eq!(seen.one("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.one("x-forwarded-host"), Some("faas.example"));

    let r = client
        .post(format!("{}/async-function/fn", gateway.url))
        .send()
        .await
        .unwrap();
    assert_json_error(r, 401, "unauthorized").await;
    let r = client
        .post(format!("{}/async-function/fn", gateway.url))
        .basic_auth("admin", Some("ours"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(upstream.seen("/async-function").is_empty());
    gateway.shutdown().await;
}

/// An HTTP/1.0 upstream's answer reaches an HTTP/1.1 client as HTTP/1.1, on a connection kept
/// alive for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_upstream_is_answered_in_http_1_1() {
    let nats = NatsServer::start().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap() == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let answer = b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\nx-old: yes\r\n\r\nok";
                stream.write_all(answer).await.unwrap();
            });
        }
    });
    let gateway = start_gateway(&nats, &front_mode_args(&format!("http://{upstream_addr}"))).await;
    let mut stream = tokio::net::TcpStream::connect(gateway.url.trim_start_matches("http://"))
        .await
        .unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET /function/old HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\nok") {
            let n = tokio::time::timeout(DEADLINE, stream.read(&mut byte))
                .await
                .expect("no answer")
                .unwrap();
            assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.push(byte[0]);
        }
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("x-old: yes\r\n"), "{answer}");
    }
    gateway.shutdown().await;
}

/// Without `--upstream-gateway` nothing changes: an unknown route is our `404`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_upstream_unknown_routes_are_404() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    for path in ["/function/fn", "/system/functions", "/ui/"] {
        let r = client
            .get(format!("{}{path}", gateway.url))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()
                .get("x-content-type-options")
                .map(|v| v.to_str().unwrap()),
            Some("nosniff")
        );
        assert_json_error(r, 404, "not_found").await;
    }
    gateway.shutdown().await;
}
