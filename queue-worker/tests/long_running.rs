//! A function that runs three times longer than `ack_wait` is invoked once: in-progress
//! heartbeats keep JetStream from redelivering it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::{DEADLINE, Fixture, InProcessWorker};
use test_support::stub::StubBehavior;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn call_longer_than_ack_wait_is_not_redelivered() {
    let f = Fixture::start(StubBehavior {
        delay: Duration::from_secs(6),
        ..StubBehavior::default()
    })
    .await;
    let worker = InProcessWorker::start(&f.worker_args("state", &["--ack-wait", "2s"]));

    let id = f.publish("long", b"job").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(f.queue.wait_until_empty().await, "message was not acked");

    let mut consumer: async_nats::jetstream::consumer::PullConsumer = f
        .queue
        .js
        .get_stream("faas-async")
        .await
        .unwrap()
        .get_consumer("faas-async-workers")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        info.num_redelivered, 0,
        "JetStream redelivered the long call"
    );
    assert_eq!(
        f.function.invocations_for(&id),
        1,
        "function invoked more than once"
    );
    assert_eq!(
        f.receiver.count_by_call_id()[&id],
        1,
        "more than one callback"
    );
    let took: f64 = f.receiver.callbacks()[0]
        .header("x-duration-seconds")
        .unwrap()
        .parse()
        .unwrap();
    assert!(took >= 6.0, "the call really ran 3 x ack_wait ({took}s)");
    worker.shutdown().await;
}
