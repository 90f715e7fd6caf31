//! A message that is not a queued-call envelope is dead-lettered with reason `undecodable`,
//! removed from the work queue, and the worker goes on with other work.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::{DEADLINE, Fixture, InProcessWorker};
use futures::StreamExt;
use test_support::stub::StubBehavior;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn undecodable_messages_are_dead_lettered_and_work_goes_on() {
    let f = Fixture::start(StubBehavior::default()).await;
    let worker = InProcessWorker::start(&f.worker_args("state", &[]));

    for garbage in [&b"{\"not\": \"an envelope\"}"[..], b"", b"FAQC\x09rest"] {
        f.queue
            .js
            .publish("faas-async._.poison", bytes::Bytes::from_static(garbage))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let id = f.publish("fine", b"ok").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(
        f.queue.wait_until_empty().await,
        "poison stayed in the work queue"
    );

    let dead = f.queue.js.get_stream("faas-async-dead").await.unwrap();
    let consumer = dead
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut reasons = Vec::new();
    let mut payloads = Vec::new();
    while let Some(msg) = batch.next().await {
        let msg = msg.unwrap();
        let headers = msg.headers.clone().unwrap();
        reasons.push(headers.get("Dead-Letter-Reason").unwrap().to_string());
        assert_eq!(
            headers.get("Dead-Letter-Subject").unwrap().as_str(),
            "faas-async._.poison"
        );
        payloads.push(msg.payload.clone());
    }
    assert_eq!(reasons, ["undecodable"; 3]);
    assert!(
        payloads
            .iter()
            .any(|p| p.as_ref() == b"{\"not\": \"an envelope\"}"),
        "payload kept as it was"
    );
    assert_eq!(
        f.function.count(),
        1,
        "only the good call reached the function"
    );
    worker.shutdown().await;
}
