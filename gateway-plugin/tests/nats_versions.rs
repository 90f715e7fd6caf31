//! The NATS a user already has: the whole path (gateway ready, a call accepted, run, called
//! back, its record and kept result read) on Debian's packaged
//! nats-server (stable: 2.9.10) as on the pinned one. Against 2.9 the gateway never became
//! ready: it retried creating the records bucket forever ("data did not match any variant of
//! untagged enum Response"). Debian's server missing is a failure, not a skip
//! (`./scripts/install-tools.sh` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, http};
use serde_json::Value;
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

/// One call end to end. (The queue contract on Debian's server, the paused-list watch among it,
/// is `queue-worker/tests/conformance.rs`'s `jetstream_debian`.)
async fn the_whole_path_works_on(nats: &NatsServer) {
    let version = async_nats::connect(nats.url())
        .await
        .unwrap()
        .server_info()
        .version;
    let function = StubFunction::start(StubBehavior {
        status: 201,
        echo_body: true,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::launch(&nats.url(), &[]).await;
    assert!(
        gateway.wait_ready(true).await,
        "gateway never became ready on nats-server {version}"
    );
    let worker = Worker::start(&nats.url(), &function.url());
    let client = http();

    let response = client
        .post(format!("{}/async-function/echo", gateway.url))
        .header("X-Callback-Url", receiver.url())
        .body("first")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "nats-server {version}");
    let id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(
        receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await,
        "no callback on nats-server {version}"
    );
    let callback = receiver.callbacks().pop().unwrap();
    assert_eq!(callback.header("x-function-status"), Some("201"));
    assert_eq!(callback.body.as_ref(), b"first");

    // The record (a key-value bucket) and the kept result.
    let end = Instant::now() + DEADLINE;
    loop {
        let response = client
            .get(format!("{}/async-calls/{id}", gateway.url))
            .send()
            .await
            .unwrap();
        let record: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        if record["state"] == "succeeded" && record["callbacks"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < end, "nats-server {version}: {record}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let result = client
        .get(format!("{}/async-calls/{id}/result", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200, "nats-server {version}");
    assert_eq!(result.headers()["x-function-status"], "201");
    assert_eq!(result.bytes().await.unwrap().as_ref(), b"first");

    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_path_works_on_debians_nats_server() {
    let nats = NatsServer::start_debian().await.unwrap();
    the_whole_path_works_on(&nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_path_works_on_the_pinned_nats_server() {
    let nats = NatsServer::start().await.unwrap();
    the_whole_path_works_on(&nats).await;
}
