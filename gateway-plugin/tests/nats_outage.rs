//! NATS down: the gateway answers 503 with `Retry-After` (never 202) and is not ready; NATS
//! back: calls are accepted again without restarting the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, assert_json_error, http, queued};
use load_tests::nats_server::NatsServer;

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
