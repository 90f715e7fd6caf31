//! End to end: client → gateway → JetStream → worker → function → callback, for every route
//! form and method, with the body, status, path, query and headers checked on both sides.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashMap;

use common::{DEADLINE, Gateway, Worker, http};
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

struct Sent {
    call_id: String,
    start_time: String,
    method: &'static str,
    expected_function_path: String,
    custom_header: String,
    function_name: &'static str,
    body: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_form_and_method_is_accepted_invoked_and_called_back() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        status: 203,
        response_headers: vec![
            ("content-type".into(), "application/x-result".into()),
            ("x-result-kind".into(), "echo".into()),
        ],
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start(&nats.url(), &function.url());
    let client = http();

    let forms: [(&str, &str, &'static str); 3] = [
        ("/async-function/echo", "/function/echo", "echo"),
        ("/async-function/echo/", "/function/echo/", "echo"),
        (
            "/async-function/echo.team-a/deep/path%20x/",
            "/function/echo.team-a/deep/path%20x/",
            "echo.team-a",
        ),
    ];
    let methods: [&'static str; 5] = ["POST", "PUT", "PATCH", "DELETE", "GET"];
    let query = "a=1&b=two%20words&c=%2F";
    let mut calls = Vec::new();
    for (i, (route, function_path, name)) in forms.iter().enumerate() {
        for (j, method) in methods.iter().enumerate() {
            let body = format!("body {i}/{j} \u{1F600}").into_bytes();
            let response = client
                .request(
                    method.parse().unwrap(),
                    format!("{}{route}?{query}", gateway.url),
                )
                .header("X-Callback-Url", receiver.url())
                .header("X-Custom-Header", format!("value-{i}-{j}"))
                .header("Content-Type", "text/plain; charset=utf-8")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202, "{method} {route}");
            let h = response.headers();
            let call_id = h["x-call-id"].to_str().unwrap().to_owned();
            let start_time = h["x-start-time"].to_str().unwrap().to_owned();
            assert!(
                uuid::Uuid::parse_str(&call_id).is_ok(),
                "generated ids are UUIDs"
            );
            assert!(
                start_time.parse::<u64>().is_ok(),
                "X-Start-Time is unix nanos"
            );
            assert!(
                response.bytes().await.unwrap().is_empty(),
                "202 has an empty body"
            );
            calls.push(Sent {
                call_id,
                start_time,
                method,
                expected_function_path: format!("{function_path}?{query}"),
                custom_header: format!("value-{i}-{j}"),
                function_name: name,
                body,
            });
        }
    }
    let ids: Vec<String> = calls.iter().map(|c| c.call_id.clone()).collect();
    assert!(
        receiver.wait_for_call_ids(&ids, DEADLINE).await,
        "got {} callbacks",
        receiver.count()
    );
    assert_eq!(receiver.count(), ids.len(), "one callback per call");

    let requests: HashMap<String, _> = function
        .requests()
        .into_iter()
        .filter_map(|r| r.call_id.clone().map(|id| (id, r)))
        .collect();
    let callbacks: HashMap<String, _> = receiver
        .callbacks()
        .into_iter()
        .filter_map(|c| c.call_id.clone().map(|id| (id, c)))
        .collect();
    for c in &calls {
        let req = &requests[&c.call_id];
        assert_eq!(req.method, c.method);
        assert_eq!(
            req.path_and_query, c.expected_function_path,
            "path and query unchanged"
        );
        assert_eq!(
            req.header("x-custom-header"),
            Some(c.custom_header.as_str())
        );
        assert_eq!(
            req.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(req.header("x-callback-url"), Some(receiver.url().as_str()));
        assert_eq!(req.header("x-start-time"), Some(c.start_time.as_str()));
        assert_eq!(
            req.body.as_ref(),
            c.body.as_slice(),
            "body reaches the function unchanged"
        );

        let cb = &callbacks[&c.call_id];
        assert_eq!(cb.path, "/callback");
        assert_eq!(
            cb.body.as_ref(),
            c.body.as_slice(),
            "callback carries the function's body"
        );
        assert_eq!(cb.header("x-call-id"), Some(c.call_id.as_str()));
        assert_eq!(cb.header("x-function-status"), Some("203"));
        assert_eq!(cb.header("x-function-name"), Some(c.function_name));
        assert_eq!(cb.header("x-start-time"), Some(c.start_time.as_str()));
        let secs: f64 = cb.header("x-duration-seconds").unwrap().parse().unwrap();
        assert!((0.0..30.0).contains(&secs));
        assert_eq!(cb.header("content-type"), Some("application/x-result"));
        assert_eq!(cb.header("x-result-kind"), Some("echo"));
        assert_eq!(cb.header("x-stub-method"), Some(c.method));
    }
    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_call_ids_are_kept_when_valid_and_refused_when_not() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let post = |id: &'static str| {
        client
            .post(format!("{}/async-function/fn", gateway.url))
            .header("X-Call-Id", id)
            .send()
    };
    let r = post("job-42_a").await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-call-id"], "job-42_a");
    // The same id again is stored once (JetStream duplicate window).
    let r = post("job-42_a").await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(common::queued(&nats.url()).await, 1);
    // Never replaced behind the client's back: refused, saying why, and nothing queued.
    common::assert_json_error(
        post("not a valid id/..").await.unwrap(),
        400,
        "invalid_call_id",
    )
    .await;
    assert_eq!(common::queued(&nats.url()).await, 1);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_function_is_reported_as_503_in_the_callback() {
    let nats = NatsServer::start().await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    // Nothing listens on port 9 on loopback: connection refused.
    let worker = Worker::start(&nats.url(), "http://127.0.0.1:9");
    let r = http()
        .post(format!("{}/async-function/missing", gateway.url))
        .header("X-Callback-Url", receiver.url())
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(receiver.wait_for_count(1, DEADLINE).await);
    let cb = &receiver.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), Some("503"));
    assert_eq!(cb.header("x-function-error"), Some("connect"));
    // Refused connections are retried; after the last attempt the call is dead-lettered and
    // the callback says so.
    assert_eq!(cb.header("x-dead-letter-reason"), Some("retries_exhausted"));
    assert!(cb.header("x-duration-seconds").is_some());
    assert!(cb.body.is_empty());
    worker.shutdown().await;
    gateway.shutdown().await;
}
