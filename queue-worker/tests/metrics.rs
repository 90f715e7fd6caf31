//! The `queue-worker` binary serves Prometheus metrics on `--metrics-listen`: after a known
//! workload its counters say what happened, and queue gauges are read at scrape time.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Fixture, signal, spawn_worker_process};
use test_support::stub::StubBehavior;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_binary_exports_the_documented_series() {
    let f = Fixture::start(StubBehavior::default()).await;
    let log = f.log("worker.log");
    let mut worker = spawn_worker_process(&f.worker_args("state", &[]), &log);
    // The worker logs the address it bound (port 0 in tests).
    let end = Instant::now() + DEADLINE;
    let address = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = text.split("metrics at /metrics listen=Some(").nth(1) {
            break rest.split(')').next().unwrap().to_owned();
        }
        assert!(
            Instant::now() < end,
            "no metrics address in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A function has a label of its own once it answered (issue 17, finding 10): a first call,
    // finished before the workload, has its queue wait counted under `other`.
    let warm_up = f.publish("metered", b"x").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&warm_up), DEADLINE)
            .await
    );
    let mut ids = vec![warm_up];
    for _ in 0..3 {
        ids.push(f.publish("metered", b"x").await);
    }
    assert!(f.receiver.wait_for_call_ids(&ids, DEADLINE).await);

    let client = queue_worker::invoke::http_client("metrics-test").unwrap();
    let expected = [
        "faas_async_processed_total{function=\"metered\",outcome=\"succeeded\"} 4",
        "faas_async_callbacks_total{function=\"metered\",outcome=\"delivered\"} 4",
        "faas_async_function_duration_seconds_count{function=\"metered\"} 4",
        "faas_async_queue_wait_seconds_count{function=\"metered\"} 3",
        "faas_async_queue_wait_seconds_count{function=\"other\"} 1",
        "faas_async_in_flight{function=\"metered\"} 0",
        "faas_async_pending_messages 0",
        "faas_async_oldest_pending_seconds 0",
        "faas_async_dead_letters_kept 0",
    ];
    let end = Instant::now() + DEADLINE;
    loop {
        let text = client
            .get(format!("http://{address}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let missing: Vec<_> = expected
            .iter()
            .filter(|line| !text.lines().any(|l| l == **line))
            .collect();
        if missing.is_empty() {
            assert!(
                ids.iter().all(|id| !text.contains(id.as_str())),
                "no call ids"
            );
            break;
        }
        assert!(Instant::now() < end, "missing {missing:?} in\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(&worker, "TERM");
    worker.wait().await.unwrap();
}

/// `GET /readyz` on the metrics listener: 200 while the worker can take calls, 503 with the
/// reason while its NATS server is down, 200 again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_readiness_follows_its_queue() {
    let mut f = Fixture::start(StubBehavior::default()).await;
    let log = f.log("worker.log");
    let mut worker = spawn_worker_process(&f.worker_args("state", &[]), &log);
    let end = Instant::now() + DEADLINE;
    let address = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = text.split("metrics at /metrics listen=Some(").nth(1) {
            break rest.split(')').next().unwrap().to_owned();
        }
        assert!(
            Instant::now() < end,
            "no metrics address in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let client = queue_worker::invoke::http_client("readiness-test").unwrap();
    let url = format!("http://{address}/readyz");
    let wait_for = |want: u16| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let end = Instant::now() + DEADLINE;
            loop {
                let response = client.get(&url).send().await.unwrap();
                let status = response.status().as_u16();
                let body: serde_json::Value =
                    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
                if status == want {
                    return body;
                }
                assert!(Instant::now() < end, "/readyz stayed {status}: {body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(wait_for(200).await["status"], "ready");
    f.queue.nats.stop().await;
    let down = wait_for(503).await;
    assert_eq!(down["status"], "not_ready", "{down}");
    assert!(
        down["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{down}"
    );
    f.queue.nats.restart().await.unwrap();
    assert_eq!(wait_for(200).await["status"], "ready");
    signal(&worker, "TERM");
    worker.wait().await.unwrap();
}
