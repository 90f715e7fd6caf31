//! NATS down: the gateway answers 503 with `Retry-After` (never 202) and is not ready; NATS
//! back: calls are accepted again without restarting the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, assert_json_error, http, queued};
use test_support::nats_server::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_answers_503_while_nats_is_down_and_recovers() {
    let mut nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &["--retry-after", "3s"]).await;
    let client = http();
    let post = || {
        client
            .post(format!("{}/async-function/fn", gateway.url))
            .body("payload")
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 202);

    nats.stop().await;
    assert!(
        gateway.wait_ready(false).await,
        "gateway still ready with NATS down"
    );
    for _ in 0..3 {
        let r = post().await.unwrap();
        assert_eq!(r.headers()["retry-after"], "3");
        assert!(
            r.headers().contains_key("x-call-id"),
            "503 names the call id to retry with"
        );
        assert_json_error(r, 503, "queue_unavailable").await;
    }
    let r = client
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = client
        .get(format!("{}/healthz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the process itself is healthy");

    nats.restart().await.unwrap();
    let end = Instant::now() + DEADLINE;
    let mut accepted = false;
    while Instant::now() < end {
        let r = post().await.unwrap();
        if r.status() == 202 {
            accepted = true;
            break;
        }
        assert_eq!(r.status(), 503, "only 503 while reconnecting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        accepted,
        "gateway never accepted calls again after NATS came back"
    );
    assert!(gateway.wait_ready(true).await);
    // Exactly the two accepted calls are stored: no 503 left a call behind.
    assert_eq!(queued(&nats.url()).await, 2);
    gateway.shutdown().await;
}

/// A full stream (discard-new policy) refuses the call: 503, not 202, and nothing is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_stream_answers_503() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &["--stream-max-bytes", "16KiB"]).await;
    let client = http();
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..64 {
        let r = client
            .post(format!("{}/async-function/fn", gateway.url))
            .body(vec![b'x'; 1024])
            .send()
            .await
            .unwrap();
        if r.status() == 202 {
            accepted += 1;
        } else {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("a 16 KiB stream took 64 KiB of calls");
    assert!(refused.headers().contains_key("retry-after"));
    assert_json_error(refused, 503, "queue_unavailable").await;
    assert!(accepted > 0, "the stream took nothing");
    assert_eq!(
        queued(&nats.url()).await,
        accepted,
        "every accepted call is still stored"
    );
    gateway.shutdown().await;
}

/// A stream that disappears (a NATS server that lost its store) is recreated by the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_stream_is_recreated() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.delete_stream("faas-async").await.unwrap();
    let client = http();
    let end = Instant::now() + DEADLINE;
    loop {
        let r = client
            .post(format!("{}/async-function/fn", gateway.url))
            .body("x")
            .send()
            .await
            .unwrap();
        if r.status() == 202 {
            break;
        }
        assert_json_error(r, 503, "queue_unavailable").await;
        assert!(Instant::now() < end, "the stream was never recreated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queued(&nats.url()).await, 1);
    gateway.shutdown().await;
}

/// A gateway that has not reached NATS yet does not know the queue's message limit: a call is
/// refused as the queue being unavailable (`503` with `Retry-After`), never as too large (the
/// unknown limit used to read as 0 bytes: `413 body_too_large`); once NATS is up the same call
/// is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_that_never_reached_nats_answers_503_not_413() {
    let mut nats = NatsServer::start().await.unwrap();
    nats.stop().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _gateway = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway-plugin"))
        .args([
            "--nats-url",
            &nats.url(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--retry-after",
            "2s",
        ])
        .env("LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = http();
    let base = format!("http://127.0.0.1:{port}");
    let post = || {
        client
            .post(format!("{base}/async-function/fn"))
            .body("a body of some bytes")
            .send()
    };
    let end = Instant::now() + DEADLINE;
    let refused = loop {
        if let Ok(r) = post().await {
            break r;
        }
        assert!(Instant::now() < end, "the gateway never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "2");
    assert_json_error(refused, 503, "queue_unavailable").await;

    nats.restart().await.unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        let r = post().await.unwrap();
        if r.status() == 202 {
            break;
        }
        assert_eq!(r.status(), 503, "only 503 until NATS is reached");
        assert!(Instant::now() < end, "no 202 after NATS came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
