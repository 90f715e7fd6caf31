//! Delayed calls on JetStream (issue 15): `X-Delay` and `X-Not-Before` store the call at once,
//! as `scheduled`; it runs within 1 s of its time, a worker and a NATS restart in between; a
//! scheduled call can be cancelled and never runs; a delay above `--max-delay`, or one that
//! does not parse, is refused `400` with a JSON body saying what is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, assert_json_error, http};
use serde_json::Value;
use test_support::nats_server::NatsServer;
use test_support::stub::{StubBehavior, StubFunction};

async fn record(client: &reqwest::Client, gateway: &Gateway, id: &str) -> Value {
    let response = client
        .get(format!("{}/async-calls/{id}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "record of {id}");
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

async fn post_delayed(
    client: &reqwest::Client,
    gateway: &Gateway,
    header: &str,
    value: &str,
) -> reqwest::Response {
    client
        .post(format!("{}/async-function/echo", gateway.url))
        .header(header, value)
        .body("later")
        .send()
        .await
        .unwrap()
}

fn call_id(response: &reqwest::Response) -> String {
    assert_eq!(response.status(), 202);
    response.headers()["x-call-id"].to_str().unwrap().to_owned()
}

/// Acceptance: a delayed call runs within 1 s of its time after a worker and a NATS restart in
/// between; a scheduled call is cancelled and never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delayed_call_runs_on_time_across_restarts_and_a_cancelled_one_never_runs() {
    let mut nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let gateway = Gateway::start(&nats.url(), &["--max-delay", "1h"]).await;
    let client = http();
    // The stub's arrival times are instants; this pair turns them into Unix time.
    let (base_instant, base_unix) = (Instant::now(), queue_core::unix_nanos_now());
    let worker = Worker::start(&nats.url(), &function.url());

    let delayed = call_id(&post_delayed(&client, &gateway, "X-Delay", "12s").await);
    let cancelled = call_id(&post_delayed(&client, &gateway, "X-Delay", "12s").await);
    let shown = record(&client, &gateway, &delayed).await;
    assert_eq!(shown["state"], "scheduled", "{shown}");
    let due = shown["scheduled_for"].as_u64().expect("scheduled_for");
    assert!(shown.get("queued_at").is_none(), "{shown}");
    let accepted = shown["accepted_at"].as_u64().unwrap();
    assert!(
        due.abs_diff(accepted + 12_000_000_000) < 1_000_000,
        "12 s after acceptance: {shown}"
    );

    let response = client
        .delete(format!("{}/async-calls/{cancelled}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let shown: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(shown["state"], "cancelled", "{shown}");

    // A worker restart and a NATS restart in between.
    worker.shutdown().await;
    nats.restart().await.unwrap();
    assert!(gateway.wait_ready(true).await, "gateway back after NATS");
    let worker = Worker::start(&nats.url(), &function.url());
    if queue_core::unix_nanos_now() + 500_000_000 < due {
        let shown = record(&client, &gateway, &delayed).await;
        assert_eq!(shown["state"], "scheduled", "after the restarts: {shown}");
        assert_eq!(function.invocations_for(&delayed), 0, "run before its time");
    }

    let end = Instant::now() + DEADLINE;
    let invoked = loop {
        if let Some(request) = function
            .requests()
            .into_iter()
            .find(|r| r.call_id.as_deref() == Some(delayed.as_str()))
        {
            break request;
        }
        assert!(Instant::now() < end, "the delayed call never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let at = base_unix
        + u64::try_from(invoked.received_at.duration_since(base_instant).as_nanos()).unwrap();
    assert!(at >= due, "ran {} ms early", (due - at) / 1_000_000);
    assert!(
        at - due < 1_000_000_000,
        "ran {} ms after its time",
        (at - due) / 1_000_000
    );

    let end = Instant::now() + DEADLINE;
    let shown = loop {
        let shown = record(&client, &gateway, &delayed).await;
        if shown["state"] == "succeeded" {
            break shown;
        }
        assert!(Instant::now() < end, "never succeeded: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(shown["attempts"].as_array().unwrap().len(), 1, "{shown}");
    assert!(shown["queued_at"].as_u64().unwrap() >= due, "{shown}");

    // The cancelled call was due at the same time: once it left the scheduled calls' stream and
    // the calls stream, it was taken and not run.
    let end = Instant::now() + DEADLINE;
    while delayed_and_queued(&nats.url()).await != (0, 0) {
        assert!(Instant::now() < end, "the cancelled call is still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        function.invocations_for(&cancelled),
        0,
        "a cancelled call ran"
    );
    assert_eq!(function.invocations_for(&delayed), 1, "run once");
    let shown = record(&client, &gateway, &cancelled).await;
    assert_eq!(shown["state"], "cancelled", "{shown}");
    assert!(shown["attempts"].as_array().unwrap().is_empty(), "{shown}");
    worker.shutdown().await;
}

/// Messages in the scheduled calls' stream and in the calls stream.
async fn delayed_and_queued(nats_url: &str) -> (u64, u64) {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut delayed = js.get_stream("faas-async-delayed").await.unwrap();
    let mut calls = js.get_stream("faas-async").await.unwrap();
    (
        delayed.info().await.unwrap().state.messages,
        calls.info().await.unwrap().state.messages,
    )
}

/// `X-Not-Before` schedules too; values above the cap, unparsable, in the past or both headers
/// at once are refused with a JSON body naming what is wrong; a zero delay runs now.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delays_are_checked_against_the_cap() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &["--max-delay", "1m"]).await;
    let client = http();

    for (header, value, code, says) in [
        ("X-Delay", "2m", "delay_above_cap", "1m (--max-delay)"),
        ("X-Delay", "soon", "invalid_delay", "not a duration"),
        (
            "X-Not-Before",
            "2999-01-01T00:00:00Z",
            "delay_above_cap",
            "1m (--max-delay)",
        ),
        (
            "X-Not-Before",
            "tomorrow",
            "invalid_delay",
            "not an RFC 3339 time",
        ),
        (
            "X-Not-Before",
            "2001-01-01T00:00:00Z",
            "invalid_delay",
            "in the past",
        ),
    ] {
        let response = post_delayed(&client, &gateway, header, value).await;
        let body = response.text().await.unwrap();
        assert!(body.contains(says), "{header}: {value}: {body}");
        let response = post_delayed(&client, &gateway, header, value).await;
        assert_json_error(response, 400, code).await;
    }
    let response = client
        .post(format!("{}/async-function/echo", gateway.url))
        .header("X-Delay", "5s")
        .header("X-Not-Before", "2999-01-01T00:00:00Z")
        .send()
        .await
        .unwrap();
    assert_json_error(response, 400, "invalid_delay").await;
    assert_eq!(
        common::queued(&nats.url()).await,
        0,
        "nothing refused was queued"
    );

    // Within the cap: scheduled, with its time from the header.
    let at = queue_core::unix_nanos_now() / 1_000_000_000 + 50;
    let stamp = rfc3339(at);
    let id = call_id(&post_delayed(&client, &gateway, "X-Not-Before", &stamp).await);
    let shown = record(&client, &gateway, &id).await;
    assert_eq!(shown["state"], "scheduled", "{shown}");
    assert_eq!(
        shown["scheduled_for"],
        at * 1_000_000_000,
        "{stamp}: {shown}"
    );
    // A zero delay is an ordinary call.
    let id = call_id(&post_delayed(&client, &gateway, "X-Delay", "0s").await);
    let shown = record(&client, &gateway, &id).await;
    assert_eq!(shown["state"], "queued", "{shown}");
    assert!(shown.get("scheduled_for").is_none(), "{shown}");
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds (civil from days, H. Hinnant's algorithm).
fn rfc3339(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap();
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}
