//! [`open_loop`] against a real HTTP server that stalls: latencies measured
//! from the intended send time show the queueing behind the stall that a
//! measurement from the actual send time would hide (coordinated omission).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly"
)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use load_tests::open_loop;
use tokio::net::TcpListener;
use tokio::time::Instant;

const STALL: Duration = Duration::from_secs(1);
const SLOW: Duration = Duration::from_millis(500);

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "small positive index"
    )]
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_runs_from_the_intended_send_time_through_a_stall() {
    // A server whose handler holds the first request for a second.
    let first = Arc::new(AtomicBool::new(true));
    let router = Router::new().route(
        "/",
        post(move || {
            let first = first.swap(false, Ordering::SeqCst);
            async move {
                if first {
                    tokio::time::sleep(STALL).await;
                }
                StatusCode::ACCEPTED
            }
        }),
    );
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    // One connection, one request in flight: requests due during the stall
    // really are sent late, after it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let timed = open_loop(100, 50.0, 1, move |_| {
        let request = client.post(url.as_str()).body("x").send();
        async move {
            let sent = Instant::now();
            let status = request.await.map(|response| response.status());
            (sent, status)
        }
    })
    .await
    .unwrap();
    server.abort();

    assert_eq!(timed.len(), 100);
    for t in &timed {
        assert!(
            matches!(t.output.1, Ok(StatusCode::ACCEPTED)),
            "{}: {:?}",
            t.index,
            t.output.1
        );
    }
    let mut intended: Vec<Duration> = timed.iter().map(|t| t.latency).collect();
    let mut actual: Vec<Duration> = timed
        .iter()
        .map(|t| t.completed().saturating_duration_since(t.output.0))
        .collect();
    intended.sort_unstable();
    actual.sort_unstable();
    let slow = |latencies: &[Duration]| latencies.iter().filter(|&&l| l > SLOW).count();

    // The stall and the queue behind it: request k (due at 20k ms) is
    // answered at about 1 s, so about 25 requests wait more than 500 ms.
    let max = intended[intended.len() - 1];
    let p99 = percentile(&intended, 0.99);
    assert!(max >= STALL, "max {max:?}; {intended:?}");
    assert!(
        p99 >= Duration::from_millis(900),
        "p99 {p99:?}; {intended:?}"
    );
    assert!(slow(&intended) > 10, "{intended:?}");
    // Measured from the actual send, only the stalled request is slow: this
    // is what the intended-time measurement must not report.
    assert!(slow(&actual) <= 2, "{actual:?}");
}
