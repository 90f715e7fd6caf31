//! `max_inflight = N`: the function never sees more than N concurrent calls from one worker,
//! and 2N from two.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::{DEADLINE, InProcessWorker, Queue, call, worker_args};
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

async fn run_with_workers(workers: usize, max_inflight: usize, calls: usize) -> (usize, usize) {
    let queue = Queue::start().await;
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_millis(700),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..calls {
        ids.push(
            queue
                .publish(&call("slow", Some(&receiver.url()), b"x"))
                .await,
        );
    }
    let dirs: Vec<_> = (0..workers).map(|_| tempfile::tempdir().unwrap()).collect();
    let running: Vec<_> = dirs
        .iter()
        .map(|dir| {
            let mut args = worker_args(&queue.nats.url(), &function.url(), dir.path());
            args.extend(["--max-inflight".into(), max_inflight.to_string()]);
            InProcessWorker::start(&args)
        })
        .collect();
    assert!(
        receiver.wait_for_call_ids(&ids, DEADLINE).await,
        "not every call got its callback: {} of {}",
        receiver.count(),
        ids.len()
    );
    for w in running {
        w.shutdown().await;
    }
    (function.max_in_flight(), function.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_worker_never_exceeds_max_inflight() {
    let (max_seen, invocations) = run_with_workers(1, 3, 15).await;
    assert_eq!(invocations, 15, "each call invoked once");
    assert!(
        max_seen <= 3,
        "function saw {max_seen} concurrent calls with max_inflight 3"
    );
    // 15 calls of 700 ms queued up front: the worker does use its whole budget.
    assert_eq!(max_seen, 3, "worker never reached max_inflight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_never_exceed_twice_max_inflight() {
    let (max_seen, invocations) = run_with_workers(2, 3, 24).await;
    assert_eq!(invocations, 24, "each call invoked once");
    assert!(
        max_seen <= 6,
        "function saw {max_seen} concurrent calls with 2 x max_inflight 3"
    );
    assert!(
        max_seen > 3,
        "two workers should run more than one worker's budget, saw {max_seen}"
    );
}
