//! Calls held for their function's slot (`concurrency.rs`) keep their delivery alive: with a
//! cap of 1 and an ack wait shorter than the wait, no call is delivered again or runs twice, and
//! `faas_async_concurrency_waiting` counts the held calls. A test binary of its own: the
//! gauge is process-wide, and other tests' held calls would count in it.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::{DEADLINE, Fixture, InProcessWorker};
use test_support::stub::StubBehavior;

/// The worker's `faas_async_concurrency_waiting`, summed over `labels`.
fn waiting(labels: &[&str]) -> f64 {
    let text = queue_core::metrics::install().render();
    labels
        .iter()
        .filter_map(|label| {
            let prefix = format!(
                "{}{{function=\"{label}\"}} ",
                queue_core::metrics::CONCURRENCY_WAITING
            );
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .sum()
}

/// Five calls of 600 ms for a function capped at 1, an ack wait of 1 s: the last waits about
/// 2.4 s, more than twice the ack wait. Each runs once, as its first attempt (a redelivery
/// would have counted one more), one at a time; while they wait they are counted as waiting
/// (under `other` until the function first answered: they were all pulled before that).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_calls_outlive_the_ack_wait_without_a_redelivery_or_a_second_run() {
    const CALLS: usize = 5;
    let f = Fixture::start(StubBehavior {
        delay: Duration::from_millis(600),
        ..StubBehavior::default()
    })
    .await;
    let conf = f.dir.path().join("functions.toml");
    std::fs::write(&conf, "[functions.\"held\"]\nmax_concurrency = 1\n").unwrap();
    let worker = InProcessWorker::start(&f.worker_args(
        "state",
        &[
            "--functions-config",
            conf.to_str().unwrap(),
            "--ack-wait",
            "1s",
        ],
    ));
    let mut ids = Vec::new();
    for _ in 0..CALLS {
        ids.push(f.publish("held", b"x").await);
    }
    let mut most_waiting = 0.0_f64;
    let end = std::time::Instant::now() + DEADLINE;
    while f.receiver.count() < CALLS && std::time::Instant::now() < end {
        most_waiting = most_waiting.max(waiting(&["held", "other"]));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        f.receiver.wait_for_call_ids(&ids, DEADLINE).await,
        "{} callbacks of {CALLS}",
        f.receiver.count()
    );
    let after = waiting(&["held", "other"]);
    // One delivery per call: a held call whose lease lapsed would have been delivered again
    // (and handed back by the worker, which still holds the call).
    let deliveries = f
        .queue
        .js
        .get_stream(&f.queue.args.stream)
        .await
        .unwrap()
        .consumer_info("faas-async-workers")
        .await
        .unwrap()
        .delivered
        .consumer_sequence;
    worker.shutdown().await;
    assert_eq!(
        deliveries,
        u64::try_from(CALLS).unwrap(),
        "each call delivered once"
    );

    for id in &ids {
        assert_eq!(f.function.invocations_for(id), 1, "{id} ran once");
    }
    for request in f.function.requests() {
        assert_eq!(
            request.header("x-retry"),
            Some("1"),
            "{:?} ran as its first attempt",
            request.call_id
        );
    }
    assert_eq!(f.function.max_in_flight(), 1, "the cap holds");
    for c in f.receiver.callbacks() {
        assert_eq!(
            c.header("x-function-status"),
            Some("200"),
            "{:?}",
            c.call_id
        );
    }
    assert!(f.queue.dead_letters().await.is_empty());
    assert!(
        most_waiting >= f64::from(u32::try_from(CALLS).unwrap() - 2),
        "held calls counted as waiting: at most {most_waiting} seen"
    );
    assert!(
        after.abs() < f64::EPSILON,
        "none waiting at the end: {after}"
    );
}
