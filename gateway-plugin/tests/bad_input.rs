//! Bad input gets a clear JSON error with the right status, and nothing is queued.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::{Gateway, assert_json_error, http, queued};
use test_support::nats_server::NatsServer;

/// Sends `POST {path}` exactly as written; returns the status and the body.
async fn raw_post(base: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    (status, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_names_paths_callbacks_and_headers_are_refused() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let url = |path: &str| format!("{}{path}", gateway.url);

    for path in [
        "/async-function/bad%20name",
        "/async-function/a.b.c",
        "/async-function/-leading-dash",
        "/async-function/fn.",
        &format!("/async-function/{}", "x".repeat(64)),
    ] {
        let r = client.post(url(path)).body("x").send().await.unwrap();
        assert_json_error(r, 400, "invalid_function_name").await;
    }
    let r = client
        .post(url("/async-function/fn/a%2Fb"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_json_error(r, 400, "invalid_path").await;
    // URL libraries resolve dot segments before sending; a raw request does not.
    for (path, code) in [
        ("/async-function/fn/../other", "invalid_path"),
        ("/async-function/fn/%2e%2e/admin", "invalid_path"),
        ("/async-function/%2e%2e", "invalid_function_name"),
    ] {
        let (status, body) = raw_post(&gateway.url, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(code), "{path}: {body}");
    }
    for callback in [
        "not a url",
        "ftp://example.com/x",
        "/relative/path",
        "http://",
    ] {
        let r = client
            .post(url("/async-function/fn"))
            .header("X-Callback-Url", callback)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_json_error(r, 400, "invalid_callback_url").await;
    }
    let r = client
        .post(url("/async-function/fn"))
        .header(
            "X-Binary",
            reqwest::header::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_json_error(r, 400, "invalid_header").await;

    let r = client.get(url("/nothing-here")).send().await.unwrap();
    assert_json_error(r, 404, "not_found").await;
    let r = client
        .request(reqwest::Method::OPTIONS, url("/async-function/fn"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "POST, PUT, PATCH, DELETE, GET");
    assert_json_error(r, 405, "method_not_allowed").await;

    assert_eq!(queued(&nats.url()).await, 0, "a refused call was queued");
    gateway.shutdown().await;
}

/// The inline size follows the server's `max_payload` (bodies above it go to the blob store),
/// bodies over `--max-body-bytes` get 413 before anything is stored or published, and
/// oversized header sets too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_limit_agrees_with_the_nats_max_payload() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nats.conf");
    std::fs::write(&conf, "max_payload: 262144\n").unwrap();
    let nats = NatsServer::start_with_args(&["-c", conf.to_str().unwrap()])
        .await
        .unwrap();
    // The server allows 256 KiB per message: bodies up to 192 KiB are queued inline, larger
    // ones (up to --max-body-bytes, 1 MiB) are stored apart in the blob store (whose records
    // are 128 KiB chunks: a server allowing less cannot hold them).
    let gateway = Gateway::start(&nats.url(), &["--max-body-bytes", "1MiB"]).await;
    // A fresh client per request: the gateway closes a connection whose body it refused.
    let post = |body: Vec<u8>| {
        http()
            .post(format!("{}/async-function/fn", gateway.url))
            .body(body)
            .send()
    };
    let r = post(vec![b'a'; 1024 * 1024 + 1]).await.unwrap();
    assert_json_error(r, 413, "body_too_large").await;
    // Without Content-Length (chunked), the limit holds while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..1025).map(|_| Ok(vec![b'b'; 1024])).collect();
    let r = http()
        .post(format!("{}/async-function/fn", gateway.url))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_json_error(r, 413, "body_too_large").await;
    // Body within the inline size but headers pushing the message over max_payload.
    let mut big_headers = http().post(format!("{}/async-function/fn", gateway.url));
    for i in 0..90 {
        big_headers = big_headers.header(format!("x-big-{i}"), "h".repeat(1000));
    }
    let r = big_headers
        .body(vec![b'c'; 180 * 1024])
        .send()
        .await
        .unwrap();
    assert_json_error(r, 413, "request_too_large").await;
    assert_eq!(queued(&nats.url()).await, 0, "an oversized call was queued");

    let r = post(vec![b'd'; 192 * 1024]).await.unwrap();
    assert_eq!(r.status(), 202, "a body at the inline size is accepted");
    let r = post(vec![b'd'; 192 * 1024 + 1]).await.unwrap();
    assert_eq!(r.status(), 202, "a body above it is stored apart");
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..200).map(|_| Ok(vec![b'b'; 1024])).collect();
    let r = http()
        .post(format!("{}/async-function/fn", gateway.url))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "a chunked body above it too");
    assert_eq!(queued(&nats.url()).await, 3);
    gateway.shutdown().await;
}

/// Issue 17, finding 5: `HEAD` (which the router sends to the GET handler) and any method the
/// worker will not run get `405` with `Allow`, and nothing is queued (no undecodable dead
/// letter later).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn methods_the_worker_will_not_run_are_refused_before_queueing() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    for method in ["HEAD", "OPTIONS", "TRACE", "PROPFIND"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = client
            .request(
                method.clone(),
                format!("{}/async-function/fn/x", gateway.url),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(
            r.headers()["allow"],
            "POST, PUT, PATCH, DELETE, GET",
            "{method}"
        );
        if method != reqwest::Method::HEAD {
            assert_json_error(r, 405, "method_not_allowed").await;
        }
    }
    assert_eq!(queued(&nats.url()).await, 0, "nothing was queued");
    let r = client
        .get(format!("{}/async-function/fn", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "GET still queues");
    assert_eq!(queued(&nats.url()).await, 1);
}

/// Sends `request` as written; returns the status (0 if the server closed without answering).
async fn raw_status(base: &str, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Issue 17, "checked and fine, keep them so": conflicting `Content-Length`s and more than 100
/// headers are refused by the HTTP layer, and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicting_lengths_and_header_floods_are_refused() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let host = gateway.url.trim_start_matches("http://").to_owned();
    let conflicting = format!(
        "POST /async-function/fn HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nxx"
    );
    assert_eq!(raw_status(&gateway.url, &conflicting).await, 400);
    let mut flood = format!("POST /async-function/fn HTTP/1.1\r\nHost: {host}\r\n");
    for i in 0..120 {
        flood.push_str(&format!("X-H-{i}: v\r\n"));
    }
    flood.push_str("Content-Length: 1\r\nConnection: close\r\n\r\nx");
    let status = raw_status(&gateway.url, &flood).await;
    assert!(
        status == 431 || status == 0,
        "header flood answered {status}"
    );
    assert_eq!(queued(&nats.url()).await, 0, "nothing was queued");
    gateway.shutdown().await;
}

/// Found while describing the API in `openapi.json`: a path parameter that is not valid
/// percent-encoded UTF-8 got axum's plain-text `400` (from the handlers, and from the
/// authorization layer before them), and a method a route does not take got an empty `405`;
/// every error is JSON `{"error", "message"}`. Both with and without an authenticator (the layer
/// reads the parameters first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_path_parameters_and_wrong_methods_are_json_errors() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = "openapi-regression-token";
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("tester {hex} *\n")).unwrap();
    let tokens = tokens.display().to_string();
    let client = http();
    for extra in [&[][..], &["--auth-tokens-file", tokens.as_str()][..]] {
        let gateway = Gateway::start(&nats.url(), extra).await;
        let send = |method: &str, path: &str| {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            client
                .request(method, format!("{}{path}", gateway.url))
                .bearer_auth(token)
                .send()
        };
        for (method, path) in [
            ("GET", "/async-calls/%FF"),
            ("DELETE", "/async-calls/%FF"),
            ("GET", "/async-calls/%C3%28/result"),
            ("GET", "/system/async/dead-letters/%FF"),
            ("GET", "/system/async/dead-letters/call/%FF"),
            ("POST", "/system/async/functions/%FF/pause"),
            ("POST", "/system/async/functions/%FE%FF/resume"),
        ] {
            let r = send(method, path).await.unwrap();
            assert_json_error(r, 400, "invalid_path").await;
        }
        for (method, path, allow) in [
            ("PUT", "/healthz", "GET,HEAD"),
            ("POST", "/openapi.json", "GET,HEAD"),
            ("GET", "/system/async/functions/fn/pause", "POST"),
            ("PATCH", "/async-calls/some-call", "OPTIONS,GET,HEAD,DELETE"),
            ("DELETE", "/system/async/dead-letters", "GET,HEAD"),
        ] {
            let r = send(method, path).await.unwrap();
            assert_eq!(r.headers()["allow"], allow, "{method} {path}");
            assert_json_error(r, 405, "method_not_allowed").await;
        }
        // The document is public, like the health routes.
        let r = client
            .get(format!("{}/openapi.json", gateway.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        let doc: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert!(doc["paths"]["/async-function/{name}"]["post"].is_object());
        gateway.shutdown().await;
    }
    assert_eq!(queued(&nats.url()).await, 0, "nothing was queued");
}
