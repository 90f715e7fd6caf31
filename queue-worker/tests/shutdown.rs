//! SIGTERM: the worker stops pulling, lets in-flight calls finish within the grace period and
//! hands back what does not finish, so another worker runs it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::{DEADLINE, Fixture, signal, spawn_worker_process, wait_until};
use test_support::stub::StubBehavior;

fn slow(secs: u64) -> StubBehavior {
    StubBehavior {
        delay: Duration::from_secs(secs),
        ..StubBehavior::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_calls_and_takes_no_new_ones() {
    let f = Fixture::start(slow(2)).await;
    let args = f.worker_args("state", &["--max-inflight", "2", "--shutdown-grace", "30s"]);
    for _ in 0..6 {
        f.publish("job", b"x").await;
    }
    let mut worker = spawn_worker_process(&args, &f.log("worker.log"));
    assert!(wait_until(|| f.function.in_flight() == 2).await);
    signal(&worker, "TERM");
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "worker exited with {status}");
    // The two running calls finished and were delivered; nothing else was started.
    assert_eq!(
        f.receiver.count(),
        2,
        "in-flight calls did not complete on SIGTERM"
    );
    assert_eq!(f.function.count(), 2, "worker took new work after SIGTERM");
    assert_eq!(
        f.queue.pending().await,
        4,
        "unstarted calls must stay queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_running_past_the_grace_period_are_handed_back() {
    let f = Fixture::start(slow(5)).await;
    let args = f.worker_args("state", &["--shutdown-grace", "1s", "--ack-wait", "30s"]);
    let id = f.publish("slow", b"x").await;
    let mut worker = spawn_worker_process(&args, &f.log("worker.log"));
    assert!(wait_until(|| f.function.in_flight() == 1).await);
    signal(&worker, "TERM");
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "worker exited with {status}");
    assert_eq!(f.receiver.count(), 0);
    assert_eq!(
        f.queue.pending().await,
        1,
        "the abandoned call must stay queued"
    );

    // Handed back with a nak, not left to ack_wait (30 s): a new worker gets it at once.
    f.function.set_behavior(StubBehavior::default());
    let mut worker = spawn_worker_process(&f.worker_args("state2", &[]), &f.log("worker2.log"));
    let started = std::time::Instant::now();
    assert!(
        f.receiver
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
