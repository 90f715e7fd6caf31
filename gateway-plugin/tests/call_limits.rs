//! Per-call limits end to end on JetStream: `X-Max-Retries`, `X-Timeout` and `X-Max-Age` are
//! applied by the worker and recorded on the call (`limits`), never forwarded to the function;
//! values above the gateway's caps are refused with 400 naming the cap, and nothing is queued.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, http};
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

async fn record_when(
    client: &reqwest::Client,
    gateway: &str,
    id: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let r = client
            .get(format!("{gateway}/async-calls/{id}"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            let record: serde_json::Value =
                serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            if done(&record) {
                return record;
            }
            assert!(Instant::now() < end, "call {id} never got there: {record}");
        }
        assert!(Instant::now() < end, "no record for {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit(
    client: &reqwest::Client,
    url: &str,
    function: &str,
    callback: &str,
    limits: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client
        .post(format!("{url}/async-function/{function}"))
        .header("X-Callback-Url", callback)
        .body("job");
    for (name, value) in limits {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn call_id(r: &reqwest::Response) -> String {
    assert_eq!(r.status(), 202);
    r.headers()["x-call-id"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_and_timeout_set_by_the_call_are_applied_and_recorded() {
    let nats = NatsServer::start().await.unwrap();
    let failing = StubFunction::start(StubBehavior {
        status: 503,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    // The worker's own settings: 5 attempts, a 30 s timeout.
    let worker = Worker::start_with(
        &nats.url(),
        &failing.url(),
        &["--retry-max-attempts", "5", "--upstream-timeout", "30s"],
    );
    let client = http();

    let r = submit(
        &client,
        &gateway.url,
        "flaky",
        &receiver.url(),
        &[("X-Max-Retries", "1")],
    )
    .await;
    let id = call_id(&r);
    let record = record_when(&client, &gateway.url, &id, |r| {
        r["state"] == "dead_lettered"
    })
    .await;
    assert_eq!(
        record["dead_letter_reason"], "retries_exhausted",
        "{record}"
    );
    assert_eq!(record["attempts"].as_array().unwrap().len(), 2, "{record}");
    assert_eq!(record["limits"]["max_attempts"], 2, "{record}");
    assert_eq!(record["limits"]["timeout_ms"], 30_000, "{record}");
    assert_eq!(failing.invocations_for(&id), 2);
    // The limit headers are the system's, not the function's.
    for request in failing.requests() {
        assert!(request.header("x-max-retries").is_none());
        assert_eq!(request.header("x-retry-max"), Some("2"));
    }
    // Without headers: the worker's settings.
    let r = submit(&client, &gateway.url, "flaky", &receiver.url(), &[]).await;
    let id = call_id(&r);
    let record = record_when(&client, &gateway.url, &id, |r| {
        r["state"] == "dead_lettered"
    })
    .await;
    assert_eq!(record["limits"]["max_attempts"], 5, "{record}");
    assert_eq!(failing.invocations_for(&id), 5);
    worker.shutdown().await;

    // X-Timeout: a 300 ms limit on a function that takes 30 s ends the attempt early.
    let slow = StubFunction::start(StubBehavior {
        delay: Duration::from_secs(30),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let worker = Worker::start_with(&nats.url(), &slow.url(), &["--upstream-timeout", "1h"]);
    let started = Instant::now();
    let r = submit(
        &client,
        &gateway.url,
        "slow",
        &receiver.url(),
        &[("X-Timeout", "300ms"), ("X-Max-Retries", "0")],
    )
    .await;
    let id = call_id(&r);
    let record = record_when(&client, &gateway.url, &id, |r| {
        r["state"] == "dead_lettered" || r["state"] == "failed"
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the 300 ms timeout was not applied"
    );
    assert_eq!(record["limits"]["timeout_ms"], 300, "{record}");
    assert_eq!(record["limits"]["max_attempts"], 1, "{record}");
    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_older_than_its_own_max_age_expires_unrun() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let young = call_id(&submit(&client, &gateway.url, "f", &receiver.url(), &[]).await);
    let old = call_id(
        &submit(
            &client,
            &gateway.url,
            "f",
            &receiver.url(),
            &[("X-Max-Age", "1s")],
        )
        .await,
    );
    // No worker yet: the call ages past its own limit (1 s) in the queue.
    let accepted = Instant::now();
    while accepted.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let worker = Worker::start(&nats.url(), &function.url());
    let record = record_when(&client, &gateway.url, &old, |r| r["state"] == "expired").await;
    assert_eq!(record["dead_letter_reason"], "expired", "{record}");
    record_when(&client, &gateway.url, &young, |r| r["state"] == "succeeded").await;
    assert_eq!(function.invocations_for(&old), 0);
    assert_eq!(function.invocations_for(&young), 1);
    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_above_the_caps_are_refused_and_nothing_is_queued() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(
        &nats.url(),
        &[
            "--max-retries-cap",
            "3",
            "--timeout-cap",
            "10m",
            "--max-age-cap",
            "1h",
        ],
    )
    .await;
    let client = http();
    for (header, value, code, says) in [
        (
            "X-Max-Retries",
            "4",
            "override_above_cap",
            "cap of 3 (--max-retries-cap)",
        ),
        (
            "X-Timeout",
            "11m",
            "override_above_cap",
            "cap of 10m (--timeout-cap)",
        ),
        (
            "X-Max-Age",
            "2h",
            "override_above_cap",
            "cap of 1h (--max-age-cap)",
        ),
        ("X-Max-Retries", "many", "invalid_override", "whole number"),
        ("X-Timeout", "0s", "invalid_override", "longer than zero"),
        (
            "X-Priority",
            "urgent",
            "invalid_priority",
            "low, normal or high",
        ),
        ("X-Priority", "3", "invalid_priority", "low, normal or high"),
    ] {
        let r = submit(
            &client,
            &gateway.url,
            "f",
            "http://127.0.0.1:9/cb",
            &[(header, value)],
        )
        .await;
        assert_eq!(r.status(), 400, "{header}: {value}");
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"], code, "{body}");
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
    }
    assert_eq!(
        common::queued(&nats.url()).await,
        0,
        "nothing refused was queued"
    );
    let r = submit(
        &client,
        &gateway.url,
        "f",
        "http://127.0.0.1:9/cb",
        &[("X-Max-Retries", "3")],
    )
    .await;
    assert_eq!(r.status(), 202, "at the cap is allowed");
    gateway.shutdown().await;
}

/// `X-Priority: high` queues the call in its function's high lane (the level is a subject token
/// after the id), never forwards the header, and its status is found while it waits (the
/// gateway wrote no record: the queued message is found by the second filter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_call_is_queued_in_its_lane_and_found_while_it_waits() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let mut ids = Vec::new();
    for level in ["high", "LOW", "1"] {
        let r = submit(
            &client,
            &gateway.url,
            "f",
            "http://127.0.0.1:9/cb",
            &[("X-Priority", level)],
        )
        .await;
        ids.push(call_id(&r));
    }
    let nats_client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(nats_client);
    let stream = js.get_stream("faas-async").await.unwrap();
    let mut subjects: Vec<String> = Vec::new();
    let mut listed = stream.info_with_subjects("faas-async.>").await.unwrap();
    use futures::StreamExt;
    while let Some(item) = listed.next().await {
        subjects.push(item.unwrap().0);
    }
    subjects.sort();
    let mut want = vec![
        format!("faas-async._.f.{}.high", ids[0]),
        format!("faas-async._.f.{}.low", ids[1]),
        format!("faas-async._.f.{}", ids[2]),
    ];
    want.sort();
    assert_eq!(subjects, want);
    for id in &ids {
        let record = record_when(&client, &gateway.url, id, |r| r["state"] == "queued").await;
        assert_eq!(record["call_id"], id.as_str(), "{record}");
    }
    gateway.shutdown().await;
}
