//! SIGTERM: the worker stops pulling, lets in-flight calls finish within the grace period and
//! hands back what does not finish, so another worker runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::{DEADLINE, Queue, call, signal, spawn_worker_process, wait_until, worker_args};
use load_tests::stub::{CallbackReceiver, StubBehavior, StubFunction};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_calls_and_takes_no_new_ones() {
    let queue = Queue::start().await;
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_secs(2),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut args = worker_args(
        &queue.nats.url(),
        &function.url(),
        &dir.path().join("state"),
    );
    args.extend([
        "--max-inflight".into(),
        "2".into(),
        "--shutdown-grace".into(),
        "30s".into(),
    ]);
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            queue
                .publish(&call("job", Some(&receiver.url()), b"x"))
                .await,
        );
    }
    let mut worker = spawn_worker_process(&args, &dir.path().join("worker.log"));
    assert!(wait_until(|| function.in_flight() == 2).await);
    signal(&worker, "TERM");
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "worker exited with {status}");
    // The two running calls finished and were delivered; nothing else was started.
    assert_eq!(
        receiver.count(),
        2,
        "in-flight calls did not complete on SIGTERM"
    );
    assert_eq!(function.count(), 2, "worker took new work after SIGTERM");
    assert_eq!(queue.pending().await, 4, "unstarted calls must stay queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_running_past_the_grace_period_are_handed_back() {
    let queue = Queue::start().await;
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_secs(5),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut args = worker_args(
        &queue.nats.url(),
        &function.url(),
        &dir.path().join("state"),
    );
    args.extend([
        "--shutdown-grace".into(),
        "1s".into(),
        "--ack-wait".into(),
        "30s".into(),
    ]);
    let id = queue
        .publish(&call("slow", Some(&receiver.url()), b"x"))
        .await;
    let mut worker = spawn_worker_process(&args, &dir.path().join("worker.log"));
    assert!(wait_until(|| function.in_flight() == 1).await);
    signal(&worker, "TERM");
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "worker exited with {status}");
    assert_eq!(receiver.count(), 0);
    assert_eq!(
        queue.pending().await,
        1,
        "the abandoned call must stay queued"
    );

    // Handed back with a nak, not left to ack_wait (30 s): a new worker gets it at once.
    function.set_behavior(StubBehavior::default());
    let second = tempfile::tempdir().unwrap();
    let args = worker_args(&queue.nats.url(), &function.url(), second.path());
    let mut worker = spawn_worker_process(&args, &dir.path().join("worker2.log"));
    let started = std::time::Instant::now();
    assert!(
        receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "redelivery waited for ack_wait instead of the nak"
    );
    signal(&worker, "TERM");
    worker.wait().await.unwrap();
}
