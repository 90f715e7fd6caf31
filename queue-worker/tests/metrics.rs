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
    let mut worker = spawn_worker_process(&f.worker_args("state", &["--max-inflight", "1"]), &log);
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
        // OpenFaaS Pro's series, for its dashboards and autoscaling rules.
        "queue_worker_messages_processed_total{queue_name=\"faas-async\"} 4",
        "queue_worker_function_invocation_inflight{queue_name=\"faas-async\",function_name=\"metered.openfaas-fn\"} 0",
    ];
    let scrape = || async {
        client
            .get(format!("http://{address}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let wait_for = |expected: Vec<String>| async move {
        let end = Instant::now() + DEADLINE;
        loop {
            let text = scrape().await;
            let missing: Vec<_> = expected
                .iter()
                .filter(|line| !text.lines().any(|l| l == line.as_str()))
                .collect();
            if missing.is_empty() {
                return text;
            }
            assert!(Instant::now() < end, "missing {missing:?} in\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let text = wait_for(expected.iter().map(|l| (*l).to_owned()).collect()).await;
    assert!(
        ids.iter().all(|id| !text.contains(id.as_str())),
        "no call ids"
    );

    // A slow call holds the only slot while two more wait: three pending for the function,
    // one in flight.
    f.function.set_behavior(StubBehavior {
        delay: Duration::from_secs(3),
        ..StubBehavior::default()
    });
    let mut slow = Vec::new();
    for _ in 0..3 {
        slow.push(f.publish("metered", b"x").await);
    }
    wait_for(vec![
        "queue_worker_pending_messages{queue_name=\"faas-async\",function_name=\"metered.openfaas-fn\"} 3".to_owned(),
        "queue_worker_function_invocation_inflight{queue_name=\"faas-async\",function_name=\"metered.openfaas-fn\"} 1".to_owned(),
    ])
    .await;
    assert!(f.receiver.wait_for_call_ids(&slow, DEADLINE).await);
    // Drained: the gauge falls back to 0, it does not keep the last figure.
    wait_for(vec![
        "queue_worker_pending_messages{queue_name=\"faas-async\",function_name=\"metered.openfaas-fn\"} 0".to_owned(),
        "queue_worker_messages_processed_total{queue_name=\"faas-async\"} 7".to_owned(),
    ])
    .await;
    signal(&worker, "TERM");
    worker.wait().await.unwrap();
}

/// `GET /readyz` on the metrics listener: 200 while the worker can take calls, 503 with the
/// reason while its NATS server is down, 200 again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_readiness_follows_its_queue() {
    let mut f = Fixture::start(StubBehavior::default()).await;
    let log = f.log("worker.log");
    let mut worker = spawn_worker_process(&f.worker_args("state", &["--max-inflight", "1"]), &log);
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
