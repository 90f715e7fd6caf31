//! Call records and results on JetStream: `GET /async-calls/{id}` shows a call's state and
//! timeline from any gateway replica; `GET /async-calls/{id}/result` returns the kept final
//! response without any callback server; results expire; oversized ones are reported.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, assert_json_error, http};
use serde_json::Value;
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

async fn get_record(client: &reqwest::Client, gateway: &Gateway, id: &str) -> reqwest::Response {
    client
        .get(format!("{}/async-calls/{id}", gateway.url))
        .send()
        .await
        .unwrap()
}

async fn state_of(client: &reqwest::Client, gateway: &Gateway, id: &str) -> Option<Value> {
    let response = get_record(client, gateway, id).await;
    (response.status() == 200).then_some(())?;
    Some(serde_json::from_slice(&response.bytes().await.unwrap()).unwrap())
}

async fn post(
    client: &reqwest::Client,
    gateway: &Gateway,
    body: Vec<u8>,
    callback: Option<&str>,
) -> String {
    let mut request = client
        .post(format!("{}/async-function/echo", gateway.url))
        .body(body);
    if let Some(url) = callback {
        request = request.header("X-Callback-Url", url);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202);
    response.headers()["x-call-id"].to_str().unwrap().to_owned()
}

/// Acceptance 1: queued → running → (retrying →) succeeded, one timeline entry per attempt and
/// per callback delivery, read from a second gateway replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_moves_through_its_states_and_is_visible_from_another_replica() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_millis(700),
        fail_first: 1,
        fail_status: 503,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let first = Gateway::start(&nats.url(), &[]).await;
    let second = Gateway::start(&nats.url(), &[]).await;
    let client = http();

    let id = post(&client, &first, b"job".to_vec(), Some(&receiver.url())).await;
    // No worker yet: the record says queued, on the other replica too.
    let record = state_of(&client, &second, &id)
        .await
        .expect("record visible");
    assert_eq!(record["state"], "queued");
    assert_eq!(record["function"], "echo");
    assert_eq!(record["has_callback"], true);

    let worker = Worker::start(&nats.url(), &function.url());
    let mut seen: Vec<String> = vec!["queued".into()];
    let end = Instant::now() + DEADLINE;
    let record = loop {
        let record = state_of(&client, &second, &id)
            .await
            .expect("record visible");
        let state = record["state"].as_str().unwrap().to_owned();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == "succeeded" && record["callbacks"].as_array().unwrap().len() == 1 {
            break record;
        }
        assert!(Instant::now() < end, "states seen: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        seen.contains(&"running".to_owned()),
        "states seen: {seen:?}"
    );
    assert_eq!(seen.last().map(String::as_str), Some("succeeded"));
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{record}");
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[0]["status"], 503);
    assert_eq!(attempts[1]["status"], 200);
    assert!(attempts[1]["duration_ms"].as_u64().unwrap() >= 600);
    let callbacks = record["callbacks"].as_array().unwrap();
    assert_eq!(callbacks[0]["delivered"], true);
    assert_eq!(callbacks[0]["status"], 200);
    assert_eq!(receiver.count(), 1);

    assert_json_error(
        get_record(&client, &first, "no-such-call").await,
        404,
        "unknown_call",
    )
    .await;
    assert_json_error(
        get_record(&client, &first, "bad%20id").await,
        400,
        "invalid_call_id",
    )
    .await;
    worker.shutdown().await;
}

/// Acceptance 2: the result without any callback URL; 202 while not finished; an oversized
/// result is reported, not truncated; results expire after the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_are_kept_reported_when_too_large_and_expire() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        response_headers: vec![("content-type".into(), "application/x-result".into())],
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let gateway = Gateway::start(&nats.url(), &["--records-retention", "3s"]).await;
    let client = http();
    let result_of = |id: String| {
        let client = client.clone();
        let url = format!("{}/async-calls/{id}/result", gateway.url);
        async move { client.get(url).send().await.unwrap() }
    };

    let small = post(&client, &gateway, b"the answer".to_vec(), None).await;
    let pending = result_of(small.clone()).await;
    assert_eq!(pending.status(), 202, "not finished without a worker");
    let pending: Value = serde_json::from_slice(&pending.bytes().await.unwrap()).unwrap();
    assert_eq!(pending["state"], "queued");

    let big = post(&client, &gateway, vec![b'x'; 4096], None).await;
    let worker = Worker::start_with(
        &nats.url(),
        &function.url(),
        &["--max-result-bytes", "1KiB"],
    );

    let end = Instant::now() + DEADLINE;
    let response = loop {
        let response = result_of(small.clone()).await;
        if response.status() != 202 {
            break response;
        }
        assert!(Instant::now() < end, "no result");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-function-status"], "200");
    // Served as data: a type a browser cannot render as active content, the function's own
    // in a header of ours.
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert_eq!(
        response.headers()["x-function-content-type"],
        "application/x-result"
    );
    assert_eq!(response.headers()["x-call-id"], small.as_str());
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"the answer");

    let end = Instant::now() + DEADLINE;
    loop {
        let record = state_of(&client, &gateway, &big).await.expect("record");
        if record["state"] == "succeeded" {
            assert_eq!(record["result"], "too_large");
            break;
        }
        assert!(Instant::now() < end, "big call did not finish: {record}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_json_error(result_of(big.clone()).await, 409, "result_too_large").await;

    // Past the 3 s retention the record and the result are gone.
    let end = Instant::now() + DEADLINE;
    while get_record(&client, &gateway, &small).await.status() != 404 {
        assert!(Instant::now() < end, "the record did not expire");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_json_error(result_of(small.clone()).await, 404, "unknown_call").await;
    worker.shutdown().await;
}

/// Acceptance 3: the same `Idempotency-Key` twice (same function) → the same call id, one
/// invocation; another function with the same key is another call; a bad key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_idempotency_key_gives_the_same_call_once() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let second = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let send = |gateway: &Gateway, function_name: &str, key: &str| {
        client
            .post(format!("{}/async-function/{function_name}", gateway.url))
            .header("Idempotency-Key", key)
            .body("order 42")
            .send()
    };

    let first = send(&gateway, "echo", "order-42").await.unwrap();
    assert_eq!(first.status(), 202);
    let id = first.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(first.headers().get("idempotent-replayed").is_none());
    // Repeated, on the other replica too.
    for g in [&gateway, &second] {
        let again = send(g, "echo", "order-42").await.unwrap();
        assert_eq!(again.status(), 202);
        assert_eq!(again.headers()["x-call-id"], id.as_str());
        assert_eq!(again.headers()["idempotent-replayed"], "true");
    }
    let other = send(&gateway, "other", "order-42").await.unwrap();
    assert_ne!(other.headers()["x-call-id"], id.as_str());
    let bad = send(&gateway, "echo", &"k".repeat(256)).await.unwrap();
    assert_json_error(bad, 400, "invalid_idempotency_key").await;

    let worker = Worker::start(&nats.url(), &function.url());
    let end = Instant::now() + DEADLINE;
    loop {
        let record = state_of(&client, &gateway, &id).await.expect("record");
        if record["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < end, "not finished: {record}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still the same call after it finished.
    let late = send(&second, "echo", "order-42").await.unwrap();
    assert_eq!(late.headers()["x-call-id"], id.as_str());
    worker.shutdown().await;
    assert_eq!(function.invocations_for(&id), 1);
    assert_eq!(
        function
            .requests()
            .iter()
            .filter(|r| r.path_and_query == "/function/echo")
            .count(),
        1,
        "one invocation of echo"
    );
}

/// Acceptance 4: cancelling a queued call (never run) and a running call (invocation aborted);
/// the record says `cancelled` and the callback says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_and_running_calls_can_be_cancelled() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_secs(30),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let cancel = |id: &str| {
        client
            .delete(format!("{}/async-calls/{id}", gateway.url))
            .send()
    };

    // Queued: no worker yet.
    let queued = post(&client, &gateway, b"q".to_vec(), Some(&receiver.url())).await;
    let response = cancel(&queued).await.unwrap();
    assert_eq!(response.status(), 200);
    let record: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(record["state"], "cancelled");
    assert_json_error(cancel(&queued).await.unwrap(), 409, "already_finished").await;
    assert_json_error(cancel("no-such-call").await.unwrap(), 404, "unknown_call").await;

    let started = Instant::now();
    let worker = Worker::start(&nats.url(), &function.url());
    // Running: the function holds it for 30 s; the cancel aborts it.
    let running = post(&client, &gateway, b"r".to_vec(), Some(&receiver.url())).await;
    let end = Instant::now() + DEADLINE;
    while function.invocations_for(&running) == 0 {
        assert!(Instant::now() < end, "the function was not called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cancel(&running).await.unwrap().status(), 200);

    let end = Instant::now() + DEADLINE;
    while receiver.count() < 2 {
        assert!(Instant::now() < end, "cancel callbacks did not arrive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the running call was aborted, not waited for"
    );
    for id in [&queued, &running] {
        let callback = receiver
            .callbacks()
            .into_iter()
            .find(|c| c.call_id.as_deref() == Some(id.as_str()))
            .expect("a callback per cancelled call");
        assert_eq!(callback.header("x-call-state"), Some("cancelled"));
        assert_eq!(callback.header("x-function-status"), Some("499"));
        let record = state_of(&client, &gateway, id).await.unwrap();
        assert_eq!(record["state"], "cancelled", "{record}");
    }
    assert_eq!(
        function.invocations_for(&queued),
        0,
        "a cancelled queued call never runs"
    );
    assert_eq!(function.invocations_for(&running), 1, "not run again");
    let record = state_of(&client, &gateway, &running).await.unwrap();
    assert_eq!(record["attempts"][0]["error"], "cancelled");
    worker.shutdown().await;
}

/// OpenFaaS Pro's cancel, `DELETE /async-function/{call_id}` (issue 14): a queued call is never
/// run, a running one is aborted, both answered `202` with the cancelled record; a `DELETE` of a
/// function that is no call's id is still an invocation with method `DELETE`; and a trailing
/// slash invokes with `DELETE` a function named like a call's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_of_a_call_id_cancels_and_of_a_function_invokes() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_secs(30),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let delete = |path: &str| {
        client
            .delete(format!("{}/async-function/{path}", gateway.url))
            .body("delete-body")
            .send()
    };
    let cancelled = async |response: reqwest::Response, id: &str| {
        assert_eq!(response.status(), 202, "OpenFaaS Pro answers a cancel 202");
        assert_eq!(response.headers()["x-call-id"], id);
        let record: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(record["call_id"], id, "{record}");
        assert_eq!(record["state"], "cancelled", "{record}");
    };

    // Queued: no worker yet.
    let queued = post(&client, &gateway, b"q".to_vec(), Some(&receiver.url())).await;
    cancelled(delete(&queued).await.unwrap(), &queued).await;
    assert_json_error(delete(&queued).await.unwrap(), 409, "already_finished").await;

    let started = Instant::now();
    let worker = Worker::start(&nats.url(), &function.url());
    // Running: the function holds it for 30 s; the cancel aborts it.
    let running = post(&client, &gateway, b"r".to_vec(), Some(&receiver.url())).await;
    let end = Instant::now() + DEADLINE;
    while function.invocations_for(&running) == 0 {
        assert!(Instant::now() < end, "the function was not called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancelled(delete(&running).await.unwrap(), &running).await;
    let end = Instant::now() + DEADLINE;
    while receiver.count() < 2 {
        assert!(Instant::now() < end, "cancel callbacks did not arrive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the running call was aborted, not waited for"
    );
    for id in [&queued, &running] {
        let callback = (receiver.callbacks().into_iter())
            .find(|c| c.call_id.as_deref() == Some(id.as_str()))
            .expect("a callback per cancelled call");
        assert_eq!(callback.header("x-call-state"), Some("cancelled"));
        assert_eq!(
            state_of(&client, &gateway, id).await.unwrap()["state"],
            "cancelled"
        );
    }
    assert_eq!(
        function.invocations_for(&queued),
        0,
        "a cancelled queued call never runs"
    );
    let record = state_of(&client, &gateway, &running).await.unwrap();
    assert_eq!(record["attempts"][0]["error"], "cancelled");

    // A function that is no call's id: an invocation with method DELETE, as before. And a call
    // whose id is a function's name: `DELETE /async-function/billing` is its cancel (409 once it
    // ended), `DELETE /async-function/billing/` invokes billing with DELETE.
    function.set_behavior(StubBehavior::default());
    let r = client
        .post(format!("{}/async-function/echo", gateway.url))
        .header("x-call-id", "billing")
        .body("named")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let invoked = delete("echo").await.unwrap();
    assert_eq!(invoked.status(), 202);
    let echo_call = invoked.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(
        invoked.bytes().await.unwrap().is_empty(),
        "an invocation's 202 has no body"
    );
    let end = Instant::now() + DEADLINE;
    loop {
        let done = (state_of(&client, &gateway, "billing").await)
            .is_some_and(|r| r["state"] == "succeeded");
        if done {
            break;
        }
        assert!(Instant::now() < end, "the call billing never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_json_error(delete("billing").await.unwrap(), 409, "already_finished").await;
    let escaped = delete("billing/").await.unwrap();
    assert_eq!(escaped.status(), 202);
    let billing_call = escaped.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert_ne!(billing_call, "billing");
    for (id, path) in [
        (&echo_call, "/function/echo"),
        (&billing_call, "/function/billing/"),
    ] {
        let end = Instant::now() + DEADLINE;
        let request = loop {
            let seen = (function.requests().into_iter())
                .find(|r| r.call_id.as_deref() == Some(id.as_str()));
            if let Some(request) = seen {
                break request;
            }
            assert!(Instant::now() < end, "{path} was not invoked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(request.method, "DELETE", "{path}");
        assert_eq!(request.path_and_query, path);
        assert_eq!(&request.body[..], b"delete-body");
    }
    worker.shutdown().await;
}

/// Calls with a generated id are queued without a record (one store per accept); until a
/// worker writes it their record comes from the queue. Polled from a second replica from the
/// `202` on, while a worker runs them, no call is ever unknown (`404`) or goes back to an
/// earlier state: the worker writes a record before it acks, and the gateway reads the records,
/// then the queue, then the records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_queued_without_a_record_is_never_unknown() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let first = Gateway::start(&nats.url(), &[]).await;
    let second = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let rank = |state: &str| match state {
        "queued" => 0,
        "running" | "retrying" => 1,
        "succeeded" => 2,
        other => panic!("unexpected state {other}"),
    };
    let mut polls = Vec::new();
    let mut worker = None;
    for i in 0..40u32 {
        if i == 20 {
            // The first half is queued before any worker runs; the second races one.
            worker = Some(Worker::start(&nats.url(), &function.url()));
        }
        let id = post(&client, &first, format!("job {i}").into_bytes(), None).await;
        let client = client.clone();
        let url = format!("{}/async-calls/{id}", second.url);
        polls.push(tokio::spawn(async move {
            let end = Instant::now() + DEADLINE;
            let mut seen = Vec::new();
            loop {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200, "{url} after {seen:?}");
                let record: Value =
                    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
                let state = record["state"].as_str().unwrap().to_owned();
                assert!(
                    seen.last()
                        .is_none_or(|last: &String| rank(last) <= rank(&state)),
                    "{url}: {state} after {seen:?}"
                );
                if seen.last() != Some(&state) {
                    seen.push(state.clone());
                }
                if state == "succeeded" {
                    return seen;
                }
                assert!(Instant::now() < end, "{url}: states seen {seen:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let mut from_the_queue = 0;
    for poll in polls {
        let seen = poll.await.unwrap();
        if seen.first().map(String::as_str) == Some("queued") {
            from_the_queue += 1;
        }
    }
    assert!(
        from_the_queue >= 20,
        "{from_the_queue} calls were seen queued"
    );
    if let Some(worker) = worker {
        worker.shutdown().await;
    }
}
