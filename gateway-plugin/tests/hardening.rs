//! Regression tests of issue 17 (input handling probed against the release binaries): every
//! input from a client or a function is treated as hostile. Each test names its finding.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, http};
use serde_json::Value;
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

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

/// All values of header `name` the function received.
fn values(request: &test_support::stub::RecordedRequest, name: &str) -> Vec<String> {
    request
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

/// Sends one call with `headers` through `gateway`, waits for the function to get it, and
/// returns what it received.
async fn invoked_with(
    client: &reqwest::Client,
    gateway: &Gateway,
    function: &StubFunction,
    headers: &[(&str, &str)],
) -> test_support::stub::RecordedRequest {
    let mut request = client
        .post(format!("{}/async-function/echo", gateway.url))
        .body("x");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202);
    let id = call_id(&response);
    wait_final(client, gateway, &id).await;
    function
        .requests()
        .into_iter()
        .find(|r| r.call_id.as_deref() == Some(id.as_str()))
        .expect("the function was invoked")
}

/// Finding 6: a client cannot set the headers the worker sets (`X-Retry`, `X-Retry-Max`,
/// `X-Start-Time`): the function gets exactly one value of each, the worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_06_a_client_cannot_spoof_the_workers_headers() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start_with(&nats.url(), &function.url(), &["--retry-max-attempts", "3"]);
    let client = http();
    let received = invoked_with(
        &client,
        &gateway,
        &function,
        &[
            ("X-Retry", "7"),
            ("X-Retry-Max", "99"),
            ("X-Start-Time", "1"),
            ("X-Kept", "yes"),
        ],
    )
    .await;
    assert_eq!(
        values(&received, "x-retry"),
        ["1"],
        "{:?}",
        received.headers
    );
    assert_eq!(values(&received, "x-retry-max"), ["3"]);
    let start = values(&received, "x-start-time");
    assert_eq!(start.len(), 1);
    assert_ne!(start[0], "1");
    assert_eq!(values(&received, "x-kept"), ["yes"]);
    worker.shutdown().await;
}

/// Finding 12: a client's forwarding headers do not reach the function; `X-Forwarded-For` is
/// the peer's address. A trusted proxy's chain is kept, with the proxy appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_12_forwarding_headers_come_from_the_peer_unless_it_is_a_trusted_proxy() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let behind_proxy =
        Gateway::start(&nats.url(), &["--trusted-proxies", "10.0.0.0/8,127.0.0.1"]).await;
    let worker = Worker::start(&nats.url(), &function.url());
    let client = http();
    let spoofed = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "admin.internal"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=6.6.6.6;host=admin.internal"),
        ("X-Real-Ip", "6.6.6.6"),
    ];
    let received = invoked_with(&client, &gateway, &function, &spoofed).await;
    assert_eq!(
        values(&received, "x-forwarded-for"),
        ["127.0.0.1"],
        "{:?}",
        received.headers
    );
    for name in [
        "x-forwarded-host",
        "x-forwarded-proto",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(
            values(&received, name).is_empty(),
            "{name} reached the function"
        );
    }

    let received = invoked_with(&client, &behind_proxy, &function, &spoofed).await;
    assert_eq!(values(&received, "x-forwarded-for"), ["6.6.6.6, 127.0.0.1"]);
    assert_eq!(values(&received, "x-forwarded-host"), ["admin.internal"]);
    assert_eq!(values(&received, "x-real-ip"), ["6.6.6.6"]);
    worker.shutdown().await;
}

/// Finding 9: a function cannot set the headers a callback receiver trusts (`X-Call-State`
/// among them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_09_a_function_cannot_spoof_the_callback_headers() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        response_headers: vec![
            ("x-call-state".into(), "cancelled".into()),
            ("x-dead-letter-reason".into(), "spoof".into()),
            ("x-function-status".into(), "201".into()),
            ("x-app".into(), "kept".into()),
        ],
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start(&nats.url(), &function.url());
    let client = http();
    let response = client
        .post(format!("{}/async-function/echo", gateway.url))
        .header("X-Callback-Url", receiver.url())
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(receiver.wait_for_count(1, DEADLINE).await, "no callback");
    let callback = receiver.callbacks().remove(0);
    let all = |name: &str| {
        callback
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert!(all("x-call-state").is_empty(), "{:?}", callback.headers);
    assert!(all("x-dead-letter-reason").is_empty());
    assert_eq!(all("x-function-status"), ["200"]);
    assert_eq!(all("x-app"), ["kept"]);
    worker.shutdown().await;
}

/// Finding 11: a page on another origin cannot pause a function (or replay, purge, resume)
/// through the visitor's browser: a form post with a foreign `Origin` or a cross-site
/// `Sec-Fetch-Site` is refused; the dashboard's own requests and non-browser clients are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_11_admin_changes_are_refused_from_other_sites() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let host = gateway.url.trim_start_matches("http://").to_owned();
    let paused = async || {
        let r = client
            .get(format!("{}/system/async/queue", gateway.url))
            .send()
            .await
            .unwrap();
        let queue: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        queue["paused_functions"].as_array().unwrap().len()
    };
    let post = |path: &str, headers: &[(&str, &str)]| {
        let mut request = client
            .post(format!("{}{path}", gateway.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("x=1");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };
    for headers in [
        &[("Origin", "http://attacker.example")][..],
        &[("Origin", "null")][..],
        &[("Sec-Fetch-Site", "cross-site")][..],
        &[
            ("Sec-Fetch-Site", "same-site"),
            ("Origin", "http://127.0.0.1:1"),
        ][..],
    ] {
        for path in [
            "/system/async/functions/billing/pause",
            "/system/async/functions/billing/resume",
            "/system/async/dead-letters/purge",
            "/system/async/dead-letters/replay",
        ] {
            let r = post(path, headers).await.unwrap();
            common::assert_json_error(r, 403, "cross_site_request").await;
        }
    }
    assert_eq!(paused().await, 0, "nothing was paused");

    // The gateway's own page (same origin) and a non-browser client.
    let own_origin = format!("http://{host}");
    let r = post(
        "/system/async/functions/billing/pause",
        &[
            ("Origin", own_origin.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(paused().await, 1);
    let r = post("/system/async/functions/billing/resume", &[])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(paused().await, 0);
}

/// Finding 7: one identity per function. With `billing` paused, `billing.openfaas-fn` (the
/// default namespace), `Billing` and `BILLING.OpenFaaS-FN` are held too, and recorded as
/// `billing`; `billing._` (the subject token of "no namespace") is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_07_pause_cannot_be_bypassed_by_spelling_the_name_differently() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start(&nats.url(), &function.url());
    let client = http();
    let r = client
        .post(format!(
            "{}/system/async/functions/Billing.openfaas-fn/pause",
            gateway.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let paused: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(paused["paused_functions"], serde_json::json!(["billing"]));

    let post = async |name: &str| {
        client
            .post(format!("{}/async-function/{name}", gateway.url))
            .body("x")
            .send()
            .await
            .unwrap()
    };
    let r = post("billing._").await;
    common::assert_json_error(r, 400, "invalid_function_name").await;
    let mut held = Vec::new();
    for name in [
        "billing.openfaas-fn",
        "Billing",
        "BILLING.OpenFaaS-FN",
        "billing",
    ] {
        let r = post(name).await;
        assert_eq!(r.status(), 202, "{name}");
        held.push((name, call_id(&r)));
    }
    // A call queued after them runs: the worker has seen theirs by then.
    let r = post("echo").await;
    let sentinel = call_id(&r);
    wait_final(&client, &gateway, &sentinel).await;
    for (name, id) in &held {
        let record: Value = serde_json::from_slice(
            &client
                .get(format!("{}/async-calls/{id}", gateway.url))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(record["function"], "billing", "{name}: {record}");
        assert_eq!(function.invocations_for(id), 0, "{name} ran while paused");
    }
    let r = client
        .post(format!(
            "{}/system/async/functions/billing/resume",
            gateway.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (name, id) in &held {
        let record = wait_final(&client, &gateway, id).await;
        assert_eq!(record["state"], "succeeded", "{name}");
    }
    let paths: Vec<String> = function
        .requests()
        .into_iter()
        .filter(|r| {
            held.iter()
                .any(|(_, id)| r.call_id.as_deref() == Some(id.as_str()))
        })
        .map(|r| r.path_and_query)
        .collect();
    assert_eq!(paths, vec!["/function/billing"; 4], "one function, one URL");
    worker.shutdown().await;
}

/// Finding 2: in direct mode the caller picks a function, never a host. A namespace that is
/// not the default one nor allowed (`attacker.com`, `kube-apiserver.kube-system`) is not
/// called at all: the call fails with 403 `namespace not allowed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_02_direct_mode_only_reaches_allowed_namespaces() {
    let nats = NatsServer::start().await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start_with(
        &nats.url(),
        "http://127.0.0.1:9",
        &[
            "--invoke-mode",
            "direct",
            "--allowed-namespaces",
            "team-a",
            "--retry-max-attempts",
            "1",
            "--upstream-timeout",
            "3s",
        ],
    );
    let client = http();
    let mut ids = Vec::new();
    for name in [
        "attacker.com",
        "kube-apiserver.kube-system",
        "metadata.google",
        "probe.Team-A",
    ] {
        let r = client
            .post(format!("{}/async-function/{name}/probe", gateway.url))
            .header("X-Callback-Url", receiver.url())
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        ids.push((name, call_id(&r)));
    }
    let ids_only: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    assert!(
        receiver.wait_for_call_ids(&ids_only, DEADLINE).await,
        "callbacks missing"
    );
    for (name, id) in &ids {
        let callback = receiver
            .callbacks()
            .into_iter()
            .find(|c| c.call_id.as_deref() == Some(id.as_str()))
            .unwrap();
        if *name == "probe.Team-A" {
            // Allowed (lower-cased): really looked up, and not found on this machine.
            assert_ne!(callback.header("x-function-status"), Some("403"), "{name}");
        } else {
            assert_eq!(callback.header("x-function-status"), Some("403"), "{name}");
            assert_eq!(
                callback.header("x-function-error"),
                Some("namespace not allowed"),
                "{name}"
            );
        }
    }
    worker.shutdown().await;
}

/// Finding 4: a call id made of digits never selects the dead letter whose sequence it
/// spells: selections name sequences and call ids apart, and the untyped `ids` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_04_numeric_call_ids_do_not_collide_with_dead_letter_sequences() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        status: 500,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start_with(&nats.url(), &function.url(), &["--retry-max-attempts", "1"]);
    let client = http();
    let dead_letters = async || -> Vec<Value> {
        let r = client
            .get(format!("{}/system/async/dead-letters", gateway.url))
            .send()
            .await
            .unwrap();
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
    };
    let wait_dead = async |n: usize| {
        let end = Instant::now() + DEADLINE;
        while dead_letters().await.len() < n {
            assert!(Instant::now() < end, "no {n} dead letters");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let post = async |id: &str| {
        let r = client
            .post(format!("{}/async-function/work", gateway.url))
            .header("X-Call-Id", id)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    };
    post("victim").await;
    wait_dead(1).await;
    let sequence = dead_letters().await[0]["sequence"].as_u64().unwrap();
    // A call whose id is the victim's sequence.
    let digits = sequence.to_string();
    post(&digits).await;
    wait_dead(2).await;

    let purge = async |body: Value| {
        let r = client
            .post(format!("{}/system/async/dead-letters/purge", gateway.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap(),
        )
    };
    let (status, answer) = purge(serde_json::json!({ "ids": [digits] })).await;
    assert_eq!(
        dead_letters().await.len(),
        2,
        "an untyped id deleted: {answer}"
    );
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("untyped_selection"))
    );

    // Show by sequence and by call id.
    let shown = client
        .get(format!(
            "{}/system/async/dead-letters/{sequence}",
            gateway.url
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let shown: Value = serde_json::from_slice(&shown).unwrap();
    assert_eq!(shown["call_id"], "victim");
    let shown = client
        .get(format!(
            "{}/system/async/dead-letters/call/{digits}",
            gateway.url
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let shown: Value = serde_json::from_slice(&shown).unwrap();
    assert_eq!(shown["call_id"], digits.as_str());
    let r = client
        .get(format!("{}/system/async/dead-letters/victim", gateway.url))
        .send()
        .await
        .unwrap();
    common::assert_json_error(r, 400, "invalid_sequence").await;

    // Purge by call id: only that call's dead letter goes.
    let (status, answer) = purge(serde_json::json!({ "call_ids": [digits] })).await;
    assert_eq!((status, answer["deleted"].as_u64()), (200, Some(1)));
    let left = dead_letters().await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["call_id"], "victim");
    let (status, answer) = purge(serde_json::json!({ "sequences": [sequence] })).await;
    assert_eq!((status, answer["deleted"].as_u64()), (200, Some(1)));
    assert!(dead_letters().await.is_empty());

    // The dashboard's Replay button sends the sequence as a number, in `sequences`.
    let page = client
        .get(format!("{}/dashboard/", gateway.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("JSON.stringify({ sequences: [Number(sequence)] })"));
    assert!(!page.contains("ids:"));
    worker.shutdown().await;
}

/// Finding 10: names of functions that do not exist (the gateway answers 404 for them) take
/// no metrics label and no live-stats slot, so a real function is still shown on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_10_junk_function_names_cannot_squat_label_slots() {
    const JUNK: usize = 210;
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        status: 404,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start_with(&nats.url(), &function.url(), &["--max-inflight", "200"]);
    let client = http();
    for i in 0..JUNK {
        let r = client
            .post(format!("{}/async-function/squat-{i}", gateway.url))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    assert!(
        function.wait_for_count(JUNK, DEADLINE).await,
        "junk not invoked"
    );
    function.set_behavior(StubBehavior::default());
    let r = client
        .post(format!("{}/async-function/real-fn-10", gateway.url))
        .body("x")
        .send()
        .await
        .unwrap();
    let id = call_id(&r);
    let record = wait_final(&client, &gateway, &id).await;
    assert_eq!(record["state"], "succeeded");

    let end = Instant::now() + DEADLINE;
    loop {
        let stats: Value = serde_json::from_slice(
            &client
                .get(format!("{}/system/async/stats", gateway.url))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        let names: Vec<&str> = stats["functions"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["function"].as_str())
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with("squat-")),
            "junk in the live stats: {names:?}"
        );
        if names.contains(&"real-fn-10") {
            break;
        }
        assert!(Instant::now() < end, "real-fn-10 missing from {names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = client
        .get(format!("{}/metrics", gateway.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "faas_async_processed_total{function=\"real-fn-10\",outcome=\"succeeded\"} 1"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("squat-"), "junk names became labels");
    // OpenFaaS Pro's series: every accepted call counted, labelled by queue only.
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("queue_worker_messages_submitted_total{queue_name=\"faas-async\"} ")),
        "{metrics}"
    );
    worker.shutdown().await;
}

/// Finding 3: a client `X-Call-Id` that already has a record belongs to that call. Another
/// function (or a second submission of a finished call) is refused with 409 and changes
/// nothing: not the record, not the kept result, not the dedup state. A retried submission of
/// a call still queued (the answer to a 503 was "retry with the same X-Call-Id") is accepted
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finding_03_a_call_id_with_a_record_is_not_rebound_to_another_call() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let client = http();
    let post = |function_name: &str, id: &str, body: &'static str| {
        client
            .post(format!("{}/async-function/{function_name}", gateway.url))
            .header("x-call-id", id)
            .body(body)
            .send()
    };

    // Queued, no worker yet: the same submission again is the same call, accepted once.
    assert_eq!(
        post("billing", "victim1", "invoice")
            .await
            .unwrap()
            .status(),
        202
    );
    assert_eq!(
        post("billing", "victim1", "invoice")
            .await
            .unwrap()
            .status(),
        202
    );
    // Another function with that id while it is queued: refused, nothing queued for it.
    let refused = post("attacker", "victim1", "evil").await.unwrap();
    assert_eq!(refused.status(), 409);
    let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "call_id_in_use", "{body}");

    let worker = Worker::start(&nats.url(), &function.url());
    let record = wait_final(&client, &gateway, "victim1").await;
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["function"], "billing");
    let accepted_at = record["accepted_at"].clone();
    let result_before = client
        .get(format!("{}/async-calls/victim1/result", gateway.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(result_before.as_ref(), b"invoice");

    // Finished: neither another function nor the same one can take the id again.
    for name in ["attacker", "billing"] {
        let again = post(name, "victim1", "evil").await.unwrap();
        assert_eq!(again.status(), 409, "{name}");
    }
    let record_after: Value = serde_json::from_slice(
        &client
            .get(format!("{}/async-calls/victim1", gateway.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record_after["function"], "billing");
    assert_eq!(record_after["accepted_at"], accepted_at);
    assert_eq!(record_after["attempts"].as_array().map(Vec::len), Some(1));
    let result_after = client
        .get(format!("{}/async-calls/victim1/result", gateway.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(result_after, result_before);
    // The function ran once, for billing, with billing's body; never with the attacker's.
    let requests = function.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].body.as_ref(), b"invoice");
    drop(worker);
}
