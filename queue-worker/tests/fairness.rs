//! Fair scheduling (`--fair-scheduling`): one lane per function and priority, each with its
//! own consumer, pulled in weighted round-robin. A backlog of one function does not hold back
//! another's calls, high priority goes first without starving the rest, and switching a
//! worker group between the shared consumer and lanes loses no call.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{DEADLINE, Fixture, InProcessWorker, wait_until};
use queue_core::backend::CallQueue;
use queue_core::backend::jetstream::{JetStreamOptions, JetStreamQueue};
use queue_core::message::Priority;
use test_support::stub::StubBehavior;

/// A queue that publishes the way the gateway does (call id and priority in the subject, the
/// lane announced after each call).
fn publisher(f: &Fixture) -> Arc<JetStreamQueue> {
    JetStreamQueue::with_client(
        f.queue.client.clone(),
        JetStreamOptions {
            nats: f.queue.args.clone(),
            manage_streams: None,
            consumer: None,
            records: common::record_args(),
            sealing: queue_core::sealing::Sealing::off(),
        },
        tokio_util::sync::CancellationToken::new(),
    )
}

async fn publish(
    queue: &JetStreamQueue,
    f: &Fixture,
    function: &str,
    priority: Option<Priority>,
) -> String {
    let mut call = common::call(function, Some(&f.receiver.url()), b"x");
    call.meta.overrides.priority = priority;
    queue.publish(&call).await.unwrap();
    call.meta.call_id
}

/// Callbacks received so far for `ids`.
fn done(f: &Fixture, ids: &[String]) -> usize {
    let callbacks = f.receiver.callbacks();
    ids.iter()
        .filter(|id| callbacks.iter().any(|c| c.call_id.as_deref() == Some(id)))
        .count()
}

fn fair_worker(f: &Fixture, max_inflight: &str) -> InProcessWorker {
    InProcessWorker::start(&f.worker_args(
        "state",
        &[
            "--fair-scheduling",
            "true",
            "--max-inflight",
            max_inflight,
            "--lane-census-interval",
            "1s",
        ],
    ))
}

/// 300 calls of 50 ms for `batch` queued, then one for `interactive`: in arrival order it would
/// wait for the whole backlog (about 4 s at 4 in flight); with lanes it is pulled at the next
/// free permit, while most of the backlog still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_one_function_does_not_hold_back_another() {
    const BACKLOG: usize = 300;
    let f = Fixture::start(StubBehavior {
        delay: Duration::from_millis(50),
        ..StubBehavior::default()
    })
    .await;
    let queue = publisher(&f);
    let mut batch = Vec::new();
    for _ in 0..BACKLOG {
        batch.push(publish(&queue, &f, "batch", None).await);
    }
    let worker = fair_worker(&f, "4");
    assert!(
        wait_until(|| done(&f, &batch) >= 8).await,
        "the backlog started"
    );
    let interactive = publish(&queue, &f, "interactive", None).await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&interactive), DEADLINE)
            .await,
        "the interactive call came back"
    );
    let batch_done = done(&f, &batch);
    assert!(
        batch_done < 8 + 40,
        "the interactive call waited for {batch_done} of the backlog's {BACKLOG} calls"
    );
    assert!(
        f.receiver.wait_for_call_ids(&batch, DEADLINE).await,
        "the backlog drained: {} of {BACKLOG}",
        done(&f, &batch)
    );
    worker.shutdown().await;
    for id in batch.iter().chain([&interactive]) {
        assert_eq!(f.function.invocations_for(id), 1, "{id} ran once");
    }
    assert!(f.queue.dead_letters().await.is_empty());
    assert!(f.queue.wait_until_empty().await);
}

/// 120 normal calls running, then 20 high ones: the high ones finish while most normal ones
/// still wait (high gets 4 pulls to normal's 2), and normal ones keep running meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn high_priority_goes_first_and_normal_still_runs() {
    const NORMAL: usize = 120;
    const HIGH: usize = 20;
    let f = Fixture::start(StubBehavior {
        delay: Duration::from_millis(50),
        ..StubBehavior::default()
    })
    .await;
    let queue = publisher(&f);
    let mut normal = Vec::new();
    for _ in 0..NORMAL {
        normal.push(publish(&queue, &f, "model", None).await);
    }
    let worker = fair_worker(&f, "2");
    assert!(
        wait_until(|| done(&f, &normal) >= 4).await,
        "normal started"
    );
    let mut high = Vec::new();
    for _ in 0..HIGH {
        high.push(publish(&queue, &f, "model", Some(Priority::High)).await);
    }
    let normal_at_high = done(&f, &normal);
    assert!(
        f.receiver.wait_for_call_ids(&high, DEADLINE).await,
        "the high calls came back: {} of {HIGH}",
        done(&f, &high)
    );
    let normal_after_high = done(&f, &normal);
    assert!(
        normal_after_high < NORMAL / 2,
        "the {HIGH} high calls waited for {normal_after_high} of {NORMAL} normal ones"
    );
    assert!(
        normal_after_high > normal_at_high,
        "normal calls kept running beside the high ones ({normal_at_high} → {normal_after_high})"
    );
    assert!(f.receiver.wait_for_call_ids(&normal, DEADLINE).await);
    worker.shutdown().await;
    for request in f.function.requests() {
        assert_eq!(request.header("x-retry"), Some("1"), "one attempt each");
    }
    assert_eq!(f.function.count(), NORMAL + HIGH);
    assert!(f.queue.wait_until_empty().await);
}

/// Calls queued the old way (no id in the subject, no announcement) before any worker runs are
/// found by the fair worker's listing; a worker group switched to the shared consumer and
/// back takes over the other layout's calls; every call runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_between_the_shared_consumer_and_lanes_loses_no_call() {
    let f = Fixture::start(StubBehavior::default()).await;
    let queue = publisher(&f);
    let mut all = Vec::new();
    for (fair, old_style) in [(true, true), (false, false), (true, false)] {
        let mut ids = Vec::new();
        for i in 0..20 {
            let function = if i % 2 == 0 { "even" } else { "odd" };
            ids.push(if old_style {
                f.publish(function, b"x").await
            } else {
                publish(&queue, &f, function, (i % 3 == 0).then_some(Priority::Low)).await
            });
        }
        all.extend(ids.iter().cloned());
        let worker = InProcessWorker::start(&f.worker_args(
            "state",
            &["--fair-scheduling", if fair { "true" } else { "false" }],
        ));
        assert!(
            f.receiver.wait_for_call_ids(&ids, DEADLINE).await,
            "fair={fair}: {} of 20 came back",
            done(&f, &ids)
        );
        worker.shutdown().await;
    }
    for id in &all {
        assert_eq!(f.function.invocations_for(id), 1, "{id} ran once");
    }
    assert!(f.queue.dead_letters().await.is_empty());
    assert!(f.queue.wait_until_empty().await);
}

/// `slow` is mapped to the queue `batch` (`queue` in the functions file), `fast` is not: the
/// worker of `--queues batch` (its own function gateway) runs only `slow`'s calls, the default
/// queue's worker only `fast`'s, each call once, whichever worker starts first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn named_queues_keep_their_functions_apart() {
    let f = Fixture::start(StubBehavior::default()).await;
    let batch_gateway = test_support::stub::StubFunction::start(StubBehavior::default())
        .await
        .unwrap();
    let conf = f.dir.path().join("functions.toml");
    std::fs::write(&conf, "[functions.slow]\nqueue = \"batch\"\n").unwrap();
    let conf = conf.to_str().unwrap();
    let queue = publisher(&f);
    let mut slow = Vec::new();
    let mut fast = Vec::new();
    for _ in 0..15 {
        slow.push(publish(&queue, &f, "slow", None).await);
        fast.push(publish(&queue, &f, "fast", Some(Priority::High)).await);
    }
    let mut batch_args = common::worker_args(
        &f.queue.nats.url(),
        &batch_gateway.url(),
        &f.dir.path().join("batch-state"),
    );
    batch_args.extend(
        [
            "--fair-scheduling",
            "true",
            "--queues",
            "batch",
            "--functions-config",
            conf,
        ]
        .map(str::to_owned),
    );
    let default_worker = InProcessWorker::start(&f.worker_args(
        "state",
        &["--fair-scheduling", "true", "--functions-config", conf],
    ));
    assert!(
        f.receiver.wait_for_call_ids(&fast, DEADLINE).await,
        "fast came back: {} of 15",
        done(&f, &fast)
    );
    // The default queue's worker never takes `slow`.
    assert_eq!(done(&f, &slow), 0, "slow ran without its queue's worker");
    let batch_worker = InProcessWorker::start(&batch_args);
    assert!(
        f.receiver.wait_for_call_ids(&slow, DEADLINE).await,
        "slow came back: {} of 15",
        done(&f, &slow)
    );
    default_worker.shutdown().await;
    batch_worker.shutdown().await;
    assert!(
        f.function
            .requests()
            .iter()
            .all(|r| r.path_and_query.ends_with("/fast")),
        "the default queue's worker ran only fast"
    );
    assert!(
        batch_gateway
            .requests()
            .iter()
            .all(|r| r.path_and_query.ends_with("/slow")),
        "the batch worker ran only slow"
    );
    assert_eq!(f.function.count(), 15);
    assert_eq!(batch_gateway.count(), 15);
    assert!(f.queue.wait_until_empty().await);
}

/// `--queues` other than `default` without fair scheduling is refused at start.
#[test]
fn named_queues_need_fair_scheduling() {
    use clap::Parser;
    let config =
        queue_worker::WorkerConfig::try_parse_from(["queue-worker", "--queues", "batch"]).unwrap();
    let e = config.validate().unwrap_err();
    assert!(e.contains("--fair-scheduling"), "{e}");
    assert!(
        queue_worker::WorkerConfig::try_parse_from(["queue-worker", "--queues", "Bad_Name"])
            .is_err()
    );
}

/// Calls whose lane was never announced (queued by an older gateway, or the announcement lost)
/// after the worker started are found all the same: a census sees calls that no lane's
/// consumer accounts for and the worker lists the stream's subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_of_an_unannounced_lane_are_found_by_the_census() {
    let f = Fixture::start(StubBehavior::default()).await;
    let queue = publisher(&f);
    let worker = fair_worker(&f, "4");
    let first = publish(&queue, &f, "announced", None).await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&first), DEADLINE)
            .await,
        "the worker runs"
    );
    // The old subject form and no announcement: only a census can tell.
    let mut quiet = Vec::new();
    for _ in 0..5 {
        quiet.push(f.publish("quiet", b"x").await);
    }
    assert!(
        f.receiver.wait_for_call_ids(&quiet, DEADLINE).await,
        "{} of 5 unannounced calls came back",
        done(&f, &quiet)
    );
    worker.shutdown().await;
    for id in &quiet {
        assert_eq!(f.function.invocations_for(id), 1, "{id} ran once");
    }
    assert!(f.queue.wait_until_empty().await);
}
