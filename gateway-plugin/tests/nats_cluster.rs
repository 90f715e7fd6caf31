//! A three-node JetStream cluster given to the gateway and the worker as a list of three URLs
//! (`--nats-url nats://a,nats://b,nats://c`, the form `NATS_URL` takes): the stream, the
//! dead-letter stream and the records bucket get three replicas, calls go through while the
//! stream's leader is SIGKILLed, after it rejoined and after the records bucket's leader moved;
//! credentials in every entry authenticate;
//! a bad list stops both at start with the bad entry named and no password shown.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::{DEADLINE, Gateway, Worker, http};
use test_support::nats_cluster::NatsCluster;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

/// POSTs a call with the id `call_id` until it is accepted (`503` while the cluster fails
/// over is retried with the same id, as the README tells clients to).
async fn submit(client: &reqwest::Client, gateway: &str, callback: &str, call_id: &str) {
    let end = Instant::now() + DEADLINE;
    loop {
        let response = client
            .post(format!("{gateway}/async-function/echo"))
            .header("x-callback-url", callback)
            .header("x-call-id", call_id)
            .body(format!("body of {call_id}"))
            .send()
            .await;
        match response.map(|r| r.status().as_u16()) {
            Ok(202) => return,
            Ok(503) | Err(_) if Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("{call_id}: {other:?}"),
        }
    }
}

async fn replicas(js: &async_nats::jetstream::Context, stream: &str) -> usize {
    js.get_stream(stream)
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .config
        .num_replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_urls_reach_a_three_node_cluster_through_a_leader_kill() {
    let mut cluster = NatsCluster::start(3).await.unwrap();
    let urls = cluster.urls();
    assert_eq!(urls.split(',').count(), 3, "{urls}");
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&urls, &["--stream-replicas", "3"]).await;
    let worker = Worker::start(&urls, &function.url());
    let client = http();

    let js = cluster.jetstream().await.unwrap();
    for stream in ["faas-async", "faas-async-dead", "KV_faas-async-calls"] {
        assert_eq!(replicas(&js, stream).await, 3, "{stream}");
    }

    submit(&client, &gateway.url, &receiver.url(), "before-0").await;
    assert!(
        receiver
            .wait_for_call_ids(&["before-0".into()], DEADLINE)
            .await,
        "no callback before the kill"
    );

    cluster
        .wait_stream_current(&js, "faas-async")
        .await
        .unwrap();
    let leader = cluster
        .wait_stream_leader(&js, "faas-async", None)
        .await
        .unwrap();
    let killed = cluster.index_of(&leader).unwrap();
    cluster.kill(killed).await;
    let js = cluster.jetstream().await.unwrap();
    let new_leader = cluster
        .wait_stream_leader(&js, "faas-async", Some(&leader))
        .await
        .unwrap();
    assert_ne!(new_leader, leader);
    let during: Vec<String> = (0..5).map(|i| format!("during-{i}")).collect();
    for id in &during {
        submit(&client, &gateway.url, &receiver.url(), id).await;
    }
    assert!(
        receiver.wait_for_call_ids(&during, DEADLINE).await,
        "calls accepted with node {leader} down were not all called back: {:?}",
        receiver.count_by_call_id()
    );

    cluster.restart(killed).await.unwrap();
    cluster
        .wait_stream_current(&js, "faas-async")
        .await
        .unwrap();
    let after: Vec<String> = (0..5).map(|i| format!("after-{i}")).collect();
    for id in &after {
        submit(&client, &gateway.url, &receiver.url(), id).await;
    }
    assert!(receiver.wait_for_call_ids(&after, DEADLINE).await);

    // The records bucket's leader moves: the worker writes records through the new one.
    let kv = "KV_faas-async-calls";
    let kv_leader = cluster.wait_stream_leader(&js, kv, None).await.unwrap();
    NatsCluster::step_down(&js, kv).await.unwrap();
    cluster
        .wait_stream_leader(&js, kv, Some(&kv_leader))
        .await
        .unwrap();
    let moved: Vec<String> = (0..5).map(|i| format!("kv-moved-{i}")).collect();
    for id in &moved {
        submit(&client, &gateway.url, &receiver.url(), id).await;
    }
    assert!(receiver.wait_for_call_ids(&moved, DEADLINE).await);
    let record = client
        .get(format!("{}/async-calls/kv-moved-4", gateway.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(record["state"], "succeeded", "{record}");

    // Nothing called twice.
    let counts = receiver.count_by_call_id();
    assert_eq!(counts.len(), 16, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");

    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_in_every_entry_authenticate_to_the_cluster() {
    let cluster = NatsCluster::start_with_args(3, &["--user", "faas", "--pass", "s3cretPW"])
        .await
        .unwrap();
    let urls = (0..cluster.len())
        .map(|i| format!("nats://faas:s3cretPW@127.0.0.1:{}", cluster.node(i).port()))
        .collect::<Vec<_>>()
        .join(",");
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(&urls, &["--stream-replicas", "3"]).await;
    let worker = Worker::start(&urls, &function.url());
    let client = http();
    submit(&client, &gateway.url, &receiver.url(), "with-credentials").await;
    assert!(
        receiver
            .wait_for_call_ids(&["with-credentials".into()], DEADLINE)
            .await
    );
    worker.shutdown().await;
    gateway.shutdown().await;
}

/// The whole error chain of `err`, as a binary prints it.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_list_stops_both_at_start_naming_the_entry() {
    let list = "nats://faas:s3cretPW@127.0.0.1:4222,nats://faas:s3cretPW@127.0.0.1:42x3";
    let config = gateway_plugin::GatewayConfig::try_parse_from([
        "gateway-plugin",
        "--nats-url",
        list,
        "--listen",
        "127.0.0.1:0",
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = tokio::time::timeout(
        DEADLINE,
        gateway_plugin::run(config, listener, std::future::pending()),
    )
    .await
    .expect("the gateway waited instead of refusing the list")
    .expect_err("a bad list must not start the gateway");
    let message = chain(&err);
    assert!(
        message.contains("entry 2 of the NATS URL list, \"nats://***@127.0.0.1:42x3\""),
        "{message}"
    );
    assert!(!message.contains("s3cretPW"), "{message}");

    let state = tempfile::tempdir().unwrap();
    let config = queue_worker::WorkerConfig::try_parse_from([
        "queue-worker",
        "--nats-url",
        list,
        "--state-dir",
        state.path().to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .unwrap();
    let err = tokio::time::timeout(DEADLINE, queue_worker::run(config, std::future::pending()))
        .await
        .expect("the worker waited instead of refusing the list")
        .expect_err("a bad list must not start the worker");
    let message = chain(&err);
    assert!(
        message.contains("entry 2 of the NATS URL list"),
        "{message}"
    );
    assert!(!message.contains("s3cretPW"), "{message}");
}
