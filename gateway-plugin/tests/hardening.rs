//! Regression tests of issue 17 (input handling probed against the release binaries): every
//! input from a client or a function is treated as hostile. Each test names its finding.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, http};
use serde_json::Value;
use test_support::nats_server::NatsServer;
use test_support::stub::{StubBehavior, StubFunction};

/// Waits until the call's record is in a final state; returns the record.
async fn wait_final(client: &reqwest::Client, gateway: &Gateway, id: &str) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let response = client
            .get(format!("{}/async-calls/{id}", gateway.url))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            let record: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            let state = record["state"].as_str().unwrap_or_default().to_owned();
            if !["queued", "running", "retrying"].contains(&state.as_str()) {
                return record;
            }
        }
        assert!(Instant::now() < end, "call {id} never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn call_id(response: &reqwest::Response) -> String {
    response.headers()["x-call-id"].to_str().unwrap().to_owned()
}

/// Finding 1: a function answering `text/html` with a script, cookies, CORS and `Refresh` must
/// not get a page on the gateway's origin: the result is served as data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_01_a_kept_result_is_served_as_inert_data() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        response_headers: vec![
            ("content-type".into(), "text/html; charset=utf-8".into()),
            ("set-cookie".into(), "session=stolen; Path=/".into()),
            ("access-control-allow-origin".into(), "*".into()),
            ("refresh".into(), "0; url=http://attacker.example/".into()),
            ("content-security-policy".into(), "script-src *".into()),
            ("x-app-detail".into(), "kept".into()),
        ],
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start(&nats.url(), &function.url());
    let client = http();

    let script = "<script>fetch('/system/async/functions/billing/pause',{method:'POST'})</script>";
    let response = client
        .post(format!("{}/async-function/echo", gateway.url))
        .body(script)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = call_id(&response);
    let record = wait_final(&client, &gateway, &id).await;
    assert_eq!(record["state"], "succeeded", "{record}");

    let result = client
        .get(format!("{}/async-calls/{id}/result", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    let h = result.headers().clone();
    let get = |name: &str| h.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        get("content-type").as_deref(),
        Some("application/octet-stream"),
        "active content is never served as itself"
    );
    assert_eq!(
        get("x-function-content-type").as_deref(),
        Some("text/html; charset=utf-8"),
        "the function's type is available as data"
    );
    assert_eq!(get("x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(get("content-disposition").as_deref(), Some("attachment"));
    assert!(
        get("content-security-policy").is_some_and(|csp| csp.starts_with("sandbox")),
        "{h:?}"
    );
    assert_eq!(h.get_all("content-security-policy").iter().count(), 1);
    for control in ["set-cookie", "access-control-allow-origin", "refresh"] {
        assert!(h.get(control).is_none(), "{control} passed through: {h:?}");
    }
    assert_eq!(get("x-app-detail").as_deref(), Some("kept"));
    assert_eq!(get("x-function-status").as_deref(), Some("200"));
    assert_eq!(result.bytes().await.unwrap(), script.as_bytes());

    // The dashboard: no frames of it, its own script only, nosniff.
    let page = client
        .get(format!("{}/dashboard/", gateway.url))
        .send()
        .await
        .unwrap();
    let h = page.headers();
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    worker.shutdown().await;
}
