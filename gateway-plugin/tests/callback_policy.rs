//! The callback URL policy end to end (issue 12, acceptance 1): hostile callback URLs in every
//! notation are refused at enqueue (`400 callback_not_allowed`, nothing queued); a host name
//! that resolves to a denied address passes the gateway and is refused by the worker when it
//! connects (over plain `http` and over `https`): the callback is recorded as refused, the call
//! is dead-lettered `callback_refused`, nothing reaches the receiver, and it is not retried; a
//! receiver that redirects is a failed delivery and the redirect target receives nothing.
//! Real gateway, worker, nats-server and HTTP servers on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, assert_json_error, http, queued};
use serde_json::Value;
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

/// The operator locks loopback down (as the README explains) and denies a name and a port.
const DENY: &str = "127.0.0.0/8,::1,*.internal.example,:25";

async fn submit(client: &reqwest::Client, gateway: &Gateway, callback: &str) -> reqwest::Response {
    client
        .post(format!("{}/async-function/echo", gateway.url))
        .header("X-Callback-Url", callback)
        .body("confidential result")
        .send()
        .await
        .unwrap()
}

async fn record(client: &reqwest::Client, gateway: &Gateway, id: &str) -> Value {
    let response = client
        .get(format!("{}/async-calls/{id}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

/// Waits until the call's record reaches a final state with its callback entry written.
async fn final_record(client: &reqwest::Client, gateway: &Gateway, id: &str) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let r = record(client, gateway, id).await;
        let done = matches!(
            r["state"].as_str(),
            Some("dead_lettered" | "succeeded" | "failed")
        ) && r["callbacks"].as_array().is_some_and(|c| !c.is_empty());
        if done {
            return r;
        }
        assert!(Instant::now() < end, "call {id} never finished: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dead_letter_reason(client: &reqwest::Client, gateway: &Gateway, id: &str) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let response = client
            .get(format!(
                "{}/system/async/dead-letters/call/{id}",
                gateway.url
            ))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            let letter: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            return letter["reason"].clone();
        }
        assert!(Instant::now() < end, "no dead letter for {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_callback_urls_are_refused_at_enqueue_or_at_delivery() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let port = receiver.addr().port();
    let gateway = Gateway::start(&nats.url(), &["--callback-deny", DENY]).await;
    let client = http();

    // 1. Refused as written: every notation of the metadata address, the other built-in
    // classes, loopback in disguise (denied by the operator), a denied name and port.
    let at_enqueue = [
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://2852039166/latest/meta-data/".to_owned(),
        "http://0251.0376.0251.0376/".to_owned(),
        "http://0xa9.0xfe.0xa9.0xfe/".to_owned(),
        "http://0xa9fea9fe/".to_owned(),
        "http://169.254.43518/".to_owned(),
        "http://%31%36%39.254.169.254/".to_owned(),
        "http://169.254.169.254./".to_owned(),
        "http://[::ffff:169.254.169.254]/".to_owned(),
        "http://[::ffff:a9fe:a9fe]/".to_owned(),
        "http://[::169.254.169.254]/".to_owned(),
        "http://[64:ff9b::a9fe:a9fe]/".to_owned(),
        "http://[fe80::1]/".to_owned(),
        "http://[fd00:ec2::254]/latest/meta-data/".to_owned(),
        "http://user:pass@169.254.169.254/".to_owned(),
        "http://receiver.example@169.254.169.254/".to_owned(),
        "http://169.254.169.254\\@receiver.example/".to_owned(),
        "https://169.254.169.254/".to_owned(),
        format!("http://0.0.0.0:{port}/"),
        "http://[::]/".to_owned(),
        "http://224.0.0.1/".to_owned(),
        "http://255.255.255.255/".to_owned(),
        format!("http://127.0.0.1:{port}/callback"),
        format!("http://127.1:{port}/callback"),
        format!("http://0x7f000001:{port}/callback"),
        format!("http://2130706433:{port}/callback"),
        format!("http://[::ffff:127.0.0.1]:{port}/callback"),
        format!("http://[::1]:{port}/callback"),
        "http://metadata.internal.example/".to_owned(),
        "http://hooks.example.com:25/".to_owned(),
    ];
    for url in &at_enqueue {
        let response = submit(&client, &gateway, url).await;
        assert_json_error(response, 400, "callback_not_allowed").await;
    }
    // A zone id is not a valid URL host at all.
    let response = submit(&client, &gateway, "http://[fe80::1%25eth0]/").await;
    assert_json_error(response, 400, "invalid_callback_url").await;
    assert_eq!(queued(&nats.url()).await, 0, "a refused call was queued");

    // 2. Refused at delivery: a name the machine resolves to 127.0.0.1, denied, over plain
    // http (the worker's own client) and over https (the general client's resolver).
    let worker = Worker::start_with(
        &nats.url(),
        &function.url(),
        &[
            "--callback-deny",
            DENY,
            "--callback-initial-wait",
            "50ms",
            "--callback-max-wait",
            "100ms",
        ],
    );
    for url in [
        format!("http://localhost:{port}/callback"),
        format!("https://localhost:{port}/callback"),
    ] {
        let response = submit(&client, &gateway, &url).await;
        assert_eq!(response.status(), 202, "{url}: a name passes the gateway");
        let id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
        let r = final_record(&client, &gateway, &id).await;
        assert_eq!(r["state"], "dead_lettered", "{url}: {r}");
        assert_eq!(r["dead_letter_reason"], "callback_refused", "{url}: {r}");
        let callbacks = r["callbacks"].as_array().unwrap();
        assert_eq!(callbacks.len(), 1, "{url}: {r}");
        assert_eq!(callbacks[0]["delivered"], false);
        assert_eq!(
            callbacks[0]["attempts"], 1,
            "{url}: a refusal is not retried"
        );
        let error = callbacks[0]["error"].as_str().unwrap();
        assert!(error.contains("refused"), "{url}: {error}");
        assert!(
            !error.contains("127.0.0.1") && !error.contains("localhost"),
            "{error}"
        );
        assert_eq!(
            dead_letter_reason(&client, &gateway, &id).await,
            "callback_refused"
        );
    }
    assert_eq!(function.count(), 2, "the functions ran");
    assert_eq!(
        receiver.count(),
        0,
        "a refused callback reached the receiver"
    );

    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirecting_receiver_is_a_failed_delivery_and_its_target_gets_nothing() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let target = CallbackReceiver::start().await.unwrap();
    let redirecting = CallbackReceiver::start().await.unwrap();
    redirecting.set_status(302);
    redirecting.set_location(Some(target.url()));
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let worker = Worker::start(&nats.url(), &function.url());
    let client = http();

    // Over the worker's own client, and over the general one (a URL with user info goes
    // through it).
    let port = redirecting.addr().port();
    for (i, url) in [
        redirecting.url(),
        format!("http://user:pw@127.0.0.1:{port}/callback"),
    ]
    .into_iter()
    .enumerate()
    {
        let response = submit(&client, &gateway, &url).await;
        assert_eq!(response.status(), 202);
        let id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
        let r = final_record(&client, &gateway, &id).await;
        assert_eq!(r["state"], "dead_lettered", "{r}");
        assert_eq!(r["dead_letter_reason"], "callback_failed", "{r}");
        let callbacks = r["callbacks"].as_array().unwrap();
        assert_eq!(callbacks[0]["delivered"], false, "{r}");
        assert_eq!(callbacks[0]["attempts"], 1, "a 3xx is not retried: {r}");
        assert!(
            callbacks[0]["error"].as_str().unwrap().contains("302"),
            "{r}"
        );
        assert_eq!(
            redirecting.count(),
            i + 1,
            "the receiver got each callback once"
        );
        assert_eq!(target.count(), 0, "the redirect was followed");
    }

    worker.shutdown().await;
    gateway.shutdown().await;
}
