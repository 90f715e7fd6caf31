//! Client call ids (issue: a true drop-in for OpenFaaS): any `X-Call-Id` OpenFaaS would pass
//! through is kept exactly — to the function, the callback, the record and the result — or
//! refused with `400` saying why, never replaced silently; a reused id is `409 call_id_in_use`
//! with the existing call's state, unless it is the same request retried or carries the same
//! `Idempotency-Key`: nothing is dropped behind a `202`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, assert_json_error, http, queued};
use serde_json::Value;
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

/// `GET /async-calls/{id}` with the id percent-encoded as one path segment.
fn call_url(gateway: &Gateway, id: &str, tail: &str) -> String {
    let mut url = reqwest::Url::parse(&gateway.url).unwrap();
    url.path_segments_mut()
        .unwrap()
        .push("async-calls")
        .push(id);
    format!("{url}{tail}")
}

async fn record_of(client: &reqwest::Client, gateway: &Gateway, id: &str) -> Option<Value> {
    let response = client.get(call_url(gateway, id, "")).send().await.unwrap();
    (response.status() == 200).then_some(())?;
    Some(serde_json::from_slice(&response.bytes().await.unwrap()).unwrap())
}

async fn wait_state(client: &reqwest::Client, gateway: &Gateway, id: &str, want: &str) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(record) = record_of(client, gateway, id).await
            && record["state"] == want
        {
            return record;
        }
        assert!(Instant::now() < end, "{id}: never {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_outside_the_old_set_round_trip_unchanged() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    function.set_recording(true);
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start(&nats.url(), &function.url());
    let client = http();
    // Each would have been replaced by a fresh UUID before; OpenFaaS passes all of them on.
    let ids = [
        "job.42",
        "team-a/run:7",
        "order#42@billing",
        "=612e62",
        "a%2Fb?x=1&y=<2>",
        "~!'\"()*+,;[]{}|^`$",
    ];
    for id in ids {
        let response = client
            .post(format!("{}/async-function/echo", gateway.url))
            .header("X-Call-Id", id)
            .header("X-Callback-Url", receiver.url())
            .body(format!("body of {id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{id}");
        assert_eq!(response.headers()["x-call-id"], id);
    }
    for id in ids {
        let record = wait_state(&client, &gateway, id, "succeeded").await;
        assert_eq!(record["call_id"], id);
        assert!(record.get("request_digest").is_none(), "{record}");
        let result = client
            .get(call_url(&gateway, id, "/result"))
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 200, "{id}");
        assert_eq!(result.headers()["x-call-id"], id);
        assert_eq!(result.text().await.unwrap(), format!("body of {id}"));
    }
    let end = Instant::now() + DEADLINE;
    while receiver.count() < ids.len() {
        assert!(Instant::now() < end, "callbacks: {}", receiver.count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let callbacks = receiver.callbacks();
    for id in ids {
        assert_eq!(function.invocations_for(id), 1, "{id}");
        let seen: Vec<_> = function
            .requests()
            .into_iter()
            .filter(|r| r.header("x-call-id") == Some(id))
            .collect();
        assert_eq!(seen.len(), 1, "the function got {id} exactly");
        let back: Vec<_> = callbacks
            .iter()
            .filter(|c| c.header("x-call-id") == Some(id))
            .collect();
        assert_eq!(back.len(), 1, "one callback with {id}");
    }
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_that_cannot_be_kept_are_refused_saying_why_and_nothing_is_queued() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let long = "x".repeat(129);
    for (id, says) in [
        (long.as_bytes(), "at most 128"),
        (&b"has space"[..], "visible ASCII"),
        (&b"tab\there"[..], "visible ASCII"),
        ("caf\u{e9}".as_bytes(), "visible ASCII"),
    ] {
        let response = client
            .post(format!("{}/async-function/echo", gateway.url))
            .header(
                "X-Call-Id",
                reqwest::header::HeaderValue::from_bytes(id).unwrap(),
            )
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{id:?}");
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"], "invalid_call_id", "{body}");
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
    }
    // An empty header is no id: one is assigned, as OpenFaaS does.
    let response = client
        .post(format!("{}/async-function/echo", gateway.url))
        .header("X-Call-Id", "")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(!response.headers()["x-call-id"].is_empty());
    assert_eq!(queued(&nats.url()).await, 1, "only the call with a good id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reused_id_is_409_with_the_existing_state_unless_it_is_the_same_call() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let post = |id: &str, body: &'static str, key: Option<&str>| {
        let mut request = client
            .post(format!("{}/async-function/echo", gateway.url))
            .header("X-Call-Id", id)
            .body(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send()
    };

    // Queued (no worker): the very same request again is the same call, stored once.
    assert_eq!(
        post("chain-1", "step one", None).await.unwrap().status(),
        202
    );
    assert_eq!(
        post("chain-1", "step one", None).await.unwrap().status(),
        202
    );
    // The same id with another body — a chained function forwarding its own id, say — is
    // another call: refused, with the state of the one that has the id; nothing queued.
    let refused = post("chain-1", "step two", None).await.unwrap();
    assert_eq!(refused.status(), 409);
    let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "call_id_in_use", "{body}");
    assert_eq!(body["state"], "queued", "{body}");
    assert_eq!(body["call_id"], "chain-1", "{body}");
    assert_eq!(queued(&nats.url()).await, 1);

    // With an Idempotency-Key the repeat is answered as the first was.
    let keyed = post("chain-2", "work", Some("k-1")).await.unwrap();
    assert_eq!(keyed.status(), 202);
    let again = post("chain-2", "other work", Some("k-1")).await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["x-call-id"], "chain-2");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(queued(&nats.url()).await, 2);

    let worker = Worker::start(&nats.url(), &function.url());
    wait_state(&client, &gateway, "chain-1", "succeeded").await;
    wait_state(&client, &gateway, "chain-2", "succeeded").await;
    // Finished: even the same request is another call now.
    let late = post("chain-1", "step one", None).await.unwrap();
    assert_json_error_with_state(late, "succeeded").await;
    worker.shutdown().await;
    assert_eq!(function.invocations_for("chain-1"), 1);
    assert_eq!(function.invocations_for("chain-2"), 1);
    let bad = post("chain-3", "x", Some(&"k".repeat(300))).await.unwrap();
    assert_json_error(bad, 400, "invalid_idempotency_key").await;
}

async fn assert_json_error_with_state(response: reqwest::Response, state: &str) {
    assert_eq!(response.status(), 409);
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "call_id_in_use", "{body}");
    assert_eq!(body["state"], state, "{body}");
}
