//! A function that runs three times longer than `ack_wait` is invoked once: in-progress
//! heartbeats keep JetStream from redelivering it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::{DEADLINE, InProcessWorker, Queue, call, worker_args};
use load_tests::stub::{CallbackReceiver, StubBehavior, StubFunction};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn call_longer_than_ack_wait_is_not_redelivered() {
    let queue = Queue::start().await;
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_secs(6),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut args = worker_args(&queue.nats.url(), &function.url(), dir.path());
    args.extend(["--ack-wait".into(), "2s".into()]);
    let worker = InProcessWorker::start(&args);

    let id = queue
        .publish(&call("long", Some(&receiver.url()), b"job"))
        .await;
    assert!(
        receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(queue.wait_until_empty().await, "message was not acked");

    let mut consumer: async_nats::jetstream::consumer::PullConsumer = queue
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
        function.invocations_for(&id),
        1,
        "function invoked more than once"
    );
    assert_eq!(
        receiver.count_by_call_id()[&id],
        1,
        "more than one callback"
    );
    let took: f64 = receiver.callbacks()[0]
        .header("x-duration-seconds")
        .unwrap()
        .parse()
        .unwrap();
    assert!(took >= 6.0, "the call really ran 3 x ack_wait ({took}s)");
    worker.shutdown().await;
}
