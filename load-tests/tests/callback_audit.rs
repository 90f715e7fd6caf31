//! The harness's own accounting: callbacks that are lost, duplicated,
//! unexpected or missing a promised header, delivered over real HTTP to a
//! real [`CallbackReceiver`], are counted as such in the bench's figures.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly"
)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use load_tests::CallbackReceiver;
use load_tests::audit::{Expectations, audit_callbacks};
use load_tests::bench::end_to_end_figures;

const BODY: &[u8] = b"echo";

/// Posts one callback the way the worker does, leaving out `skip`.
async fn post(client: &reqwest::Client, url: &str, call_id: Option<&str>, skip: Option<&str>) {
    let mut headers = vec![
        ("X-Function-Status", "200"),
        ("X-Function-Name", "bench"),
        ("X-Duration-Seconds", "0.002500"),
        ("X-Start-Time", "1764300000000000000"),
    ];
    if let Some(id) = call_id {
        headers.push(("X-Call-Id", id));
    }
    let mut request = client.post(url).body(BODY);
    for (name, value) in headers {
        if Some(name) != skip {
            request = request.header(name, value);
        }
    }
    let response = request.send().await.expect("callback POST");
    assert!(response.status().is_success(), "{}", response.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_duplicated_unexpected_and_malformed_callbacks_are_counted() {
    let receiver = CallbackReceiver::start().await.expect("receiver");
    let client = queue_worker::invoke::http_client("load-tests-test").expect("client");
    let url = receiver.url();

    let started = Instant::now();
    let submitted: HashMap<String, Instant> =
        ["ok", "twice", "thrice", "lost-1", "lost-2", "no-start"]
            .into_iter()
            .map(|id| (id.to_owned(), started))
            .collect();

    post(&client, &url, Some("ok"), None).await;
    for _ in 0..2 {
        post(&client, &url, Some("twice"), None).await;
    }
    for _ in 0..3 {
        post(&client, &url, Some("thrice"), None).await;
    }
    post(&client, &url, Some("no-start"), Some("X-Start-Time")).await;
    post(&client, &url, Some("never-accepted"), None).await;
    post(&client, &url, None, None).await;
    let sent = 1 + 2 + 3 + 1 + 1 + 1;
    assert!(
        receiver.wait_for_count(sent, Duration::from_secs(20)).await,
        "receiver got {} of {sent} callbacks",
        receiver.count()
    );

    let audit = audit_callbacks(
        &submitted,
        &receiver.callbacks(),
        &Expectations {
            function: "bench",
            body: Some(BODY),
            failures_allowed: false,
        },
    );
    let figures = end_to_end_figures(&audit, started).expect("figures");
    assert_eq!(figures.completed, 4, "{audit:?}");
    assert_eq!(figures.lost, 2, "{audit:?}");
    assert_eq!(figures.duplicates, 2, "{audit:?}");
    assert_eq!(audit.extra_callbacks, 3, "{audit:?}");
    assert_eq!(figures.unexpected, 2, "{audit:?}");
    assert_eq!(figures.bad_headers, 1, "{audit:?}");
    assert_eq!(figures.bad_results, 0, "{audit:?}");
    assert!(!audit.is_clean());
    assert!(figures.first_problem.is_some());
    // The function time comes from X-Duration-Seconds of the first callbacks.
    // 2.5 ms, to the histogram's three significant digits.
    assert!(
        (2490..=2510).contains(&figures.function_time_us.p50),
        "{figures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_result_or_function_name_is_not_clean() {
    let receiver = CallbackReceiver::start().await.expect("receiver");
    let client = queue_worker::invoke::http_client("load-tests-test").expect("client");
    let started = Instant::now();
    let submitted: HashMap<String, Instant> = ["a", "b"]
        .into_iter()
        .map(|id| (id.to_owned(), started))
        .collect();
    client
        .post(receiver.url())
        .header("X-Call-Id", "a")
        .header("X-Function-Status", "503")
        .header("X-Function-Name", "bench")
        .header("X-Duration-Seconds", "0.1")
        .header("X-Start-Time", "1")
        .body(BODY)
        .send()
        .await
        .expect("callback POST");
    client
        .post(receiver.url())
        .header("X-Call-Id", "b")
        .header("X-Function-Status", "200")
        .header("X-Function-Name", "benchmark")
        .header("X-Duration-Seconds", "0.1")
        .header("X-Start-Time", "1")
        .body(BODY)
        .send()
        .await
        .expect("callback POST");
    assert!(receiver.wait_for_count(2, Duration::from_secs(20)).await);

    let audit = audit_callbacks(
        &submitted,
        &receiver.callbacks(),
        &Expectations {
            function: "bench",
            body: Some(BODY),
            failures_allowed: false,
        },
    );
    assert_eq!(audit.completed, 2, "{audit:?}");
    assert_eq!(audit.lost, 0, "{audit:?}");
    assert_eq!(audit.bad_results, 1, "{audit:?}");
    assert_eq!(audit.bad_headers, 1, "{audit:?}");
    assert!(!audit.is_clean());

    // Where failures are expected (injected faults), the 503 is a result, not a bad one;
    // both results are counted by kind either way.
    let tolerant = audit_callbacks(
        &submitted,
        &receiver.callbacks(),
        &Expectations {
            function: "bench",
            body: Some(BODY),
            failures_allowed: true,
        },
    );
    assert_eq!(tolerant.bad_results, 0, "{tolerant:?}");
    assert_eq!(tolerant.bad_headers, 1, "{tolerant:?}");
    let results: Vec<(&str, u64)> = tolerant
        .results
        .iter()
        .map(|(kind, n)| (kind.as_str(), *n))
        .collect();
    assert_eq!(results, [("200", 1), ("503", 1)], "{tolerant:?}");
}
