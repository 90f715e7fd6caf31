//! Killing a worker never loses a call.
//! - SIGKILL with calls in flight: after a restart every call gets its callback; a second
//!   callback happens only for calls caught in the kill window (counted and printed).
//! - A crash after the function's result was stored and before the ack: the redelivery does not
//!   invoke the function again, it only delivers the callback.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{DEADLINE, Fixture, signal, spawn_worker_process, wait_until};
use test_support::stub::StubBehavior;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_calls_in_flight_loses_nothing() {
    let f = Fixture::start(StubBehavior {
        delay: Duration::from_millis(800),
        ..StubBehavior::default()
    })
    .await;
    let args = f.worker_args("state", &["--max-inflight", "8", "--ack-wait", "2s"]);
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(f.publish("job", b"payload").await);
    }
    let mut worker = spawn_worker_process(&args, &f.log("worker.log"));
    assert!(
        wait_until(|| f.function.in_flight() >= 8 && f.receiver.count() >= 4).await,
        "worker never got busy"
    );
    signal(&worker, "KILL");
    worker.wait().await.unwrap();
    // Calls the function had seen but whose callback had not arrived: the kill window.
    let delivered_before: HashSet<String> = f.receiver.count_by_call_id().into_keys().collect();
    let started_before: HashSet<String> = f
        .function
        .requests()
        .into_iter()
        .filter_map(|r| r.call_id)
        .collect();
    let in_kill_window: HashSet<&String> = started_before.difference(&delivered_before).collect();

    let mut worker = spawn_worker_process(&args, &f.log("worker.log"));
    let all = f.receiver.wait_for_call_ids(&ids, DEADLINE).await;
    signal(&worker, "TERM");
    worker.wait().await.unwrap();
    assert!(
        all,
        "lost calls: {} of {} got callbacks",
        f.receiver.count_by_call_id().len(),
        ids.len()
    );
    assert!(
        f.queue.wait_until_empty().await,
        "calls left unacknowledged"
    );

    let counts = f.receiver.count_by_call_id();
    let duplicates: Vec<&String> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    let reinvoked: Vec<&String> = ids
        .iter()
        .filter(|id| f.function.invocations_for(id) > 1)
        .collect();
    println!(
        "kill test: {} calls, {} in the kill window, {} re-invoked, {} duplicate callbacks",
        ids.len(),
        in_kill_window.len(),
        reinvoked.len(),
        duplicates.len()
    );
    for id in &duplicates {
        // Either running at the kill, or delivered but not yet acked: both were started before.
        assert!(
            started_before.contains(*id),
            "call {id} got two callbacks without being caught by the kill"
        );
    }
    for id in &reinvoked {
        assert!(
            in_kill_window.contains(id),
            "call {id} re-invoked without being caught by the kill"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivery_after_completion_does_not_invoke_again() {
    let f = Fixture::start(StubBehavior {
        status: 201,
        ..StubBehavior::default()
    })
    .await;
    let log = f.log("worker.log");
    let id = f.publish("once", b"compute").await;
    // This worker aborts right after storing the function's result: no callback, no ack.
    let crashing = f.worker_args("state", &["--ack-wait", "1s", "--fault-crash-after-store"]);
    let mut worker = spawn_worker_process(&crashing, &log);
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .unwrap()
        .unwrap();
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !status.success(),
        "the fault-injected worker should have crashed:\n{logs}"
    );
    assert_eq!(f.function.invocations_for(&id), 1, "worker log:\n{logs}");
    assert_eq!(f.receiver.count(), 0, "no callback before the crash");
    assert_eq!(
        f.queue.pending().await,
        1,
        "the call is still queued after the crash"
    );

    let mut worker = spawn_worker_process(&f.worker_args("state", &["--ack-wait", "1s"]), &log);
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(f.queue.wait_until_empty().await, "redelivery not acked");
    signal(&worker, "TERM");
    assert!(worker.wait().await.unwrap().success());
    assert_eq!(
        f.function.invocations_for(&id),
        1,
        "the function ran again after the crash"
    );
    assert_eq!(
        f.receiver.count_by_call_id()[&id],
        1,
        "callback not delivered exactly once"
    );
    let cb = &f.receiver.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), Some("201"));
    assert_eq!(cb.body.as_ref(), b"compute", "stored result body delivered");
}

/// The same with a response above `--inline-response-bytes`: the dedup entry holds the
/// reference to the stored response, and the redelivery sends the callback from the store
/// without running the function again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivery_after_completion_sends_a_stored_response_from_the_store() {
    const LEN: usize = 2 * 1024 * 1024 + 17;
    let f = Fixture::start(StubBehavior {
        response_bytes: Some(LEN),
        ..StubBehavior::default()
    })
    .await;
    let log = f.log("worker.log");
    let id = f.publish("once-large", b"compute").await;
    let crashing = f.worker_args(
        "state",
        &[
            "--ack-wait",
            "1s",
            "--inline-response-bytes",
            "64KiB",
            "--fault-crash-after-store",
        ],
    );
    let mut worker = spawn_worker_process(&crashing, &log);
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .unwrap()
        .unwrap();
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "no crash:\n{logs}");
    assert_eq!(f.function.invocations_for(&id), 1, "worker log:\n{logs}");
    assert_eq!(f.receiver.count(), 0, "no callback before the crash");

    let mut worker = spawn_worker_process(
        &f.worker_args(
            "state",
            &["--ack-wait", "1s", "--inline-response-bytes", "64KiB"],
        ),
        &log,
    );
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(f.queue.wait_until_empty().await, "redelivery not acked");
    signal(&worker, "TERM");
    assert!(worker.wait().await.unwrap().success());
    assert_eq!(f.function.invocations_for(&id), 1, "the function ran again");
    assert_eq!(f.receiver.count_by_call_id()[&id], 1, "one callback");
    let cb = &f.receiver.callbacks()[0];
    assert_eq!(cb.body.len(), LEN, "the stored response was delivered");
    assert!(cb.body.iter().all(|&b| b == b'r'));
}

/// A worker SIGKILLed while the function's answer streams into the blob store: the put is cut
/// short (chunks stored, no object), the redelivery runs the call again and stores the whole
/// answer, the callback arrives once with all of it, and the chunks the killed put left are
/// removed as leftovers: afterwards the store holds nothing (the result is above
/// `--max-result-bytes`, so it is not kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_the_answer_streams_into_the_store_reruns_and_calls_back_once() {
    use queue_core::blobs::BlobStore;
    use queue_core::blobs::jetstream::JetStreamBlobs;

    const LEN: usize = 4 * 1024 * 1024 + 5;
    const BEFORE_STALL: usize = 1024 * 1024;
    let f = Fixture::start(StubBehavior {
        response_bytes: Some(LEN),
        stall_first_answer_after: Some(BEFORE_STALL),
        ..StubBehavior::default()
    })
    .await;
    let log = f.log("worker.log");
    let args = f.worker_args(
        "state",
        &[
            "--ack-wait",
            "2s",
            "--inline-response-bytes",
            "64KiB",
            "--max-response-bytes",
            "16MiB",
        ],
    );
    let id = f.publish("stalls", b"compute").await;
    let mut worker = spawn_worker_process(&args, &log);
    // The worker made the bucket and is storing the answer: chunks are in its stream.
    let stream = f.queue.args.stream.clone();
    let object_stream = format!("OBJ_{}", queue_core::blobs::jetstream::bucket_name(&stream));
    let chunks = || async {
        match f.queue.js.get_stream(&object_stream).await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        }
    };
    let mut stored = 0;
    let end = std::time::Instant::now() + DEADLINE;
    while stored < 4 {
        assert!(
            std::time::Instant::now() < end,
            "the answer never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        stored = chunks().await;
    }
    signal(&worker, "KILL");
    worker.wait().await.unwrap();
    assert_eq!(f.receiver.count(), 0, "no callback before the kill");
    let blobs = JetStreamBlobs::open(&f.queue.js, &stream, queue_core::sealing::Sealing::off())
        .await
        .unwrap();
    assert!(
        blobs.list().await.unwrap().is_empty(),
        "a cut put stores no object"
    );

    let mut worker = spawn_worker_process(&args, &log);
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await,
        "no callback after the restart"
    );
    assert!(f.queue.wait_until_empty().await, "redelivery not acked");
    signal(&worker, "TERM");
    assert!(worker.wait().await.unwrap().success());
    assert_eq!(
        f.function.invocations_for(&id),
        2,
        "run again from the start"
    );
    assert_eq!(f.receiver.count_by_call_id()[&id], 1, "one callback");
    let cb = &f.receiver.callbacks()[0];
    assert_eq!(cb.body.len(), LEN, "the whole answer");
    assert!(cb.body.iter().all(|&b| b == b'r'));
    // The killed put's chunks are leftovers; once removed, nothing is stored.
    assert!(blobs.list().await.unwrap().is_empty(), "not kept: deleted");
    let removed = blobs.remove_leftovers(Duration::ZERO).await.unwrap();
    assert!(removed > 0, "the killed put left chunks");
    assert_eq!(chunks().await, 0, "nothing left in the store");
}
