//! Fault-injection soak: thousands of calls while the worker is SIGKILLed several times,
//! nats-server restarts once, the function answers 503 or 429 to a share of calls, and the
//! callback receiver is down for ten seconds. Afterwards every accepted call has exactly one
//! final outcome (a success callback or a dead letter), none is lost, and no call was invoked
//! more often than the retry bound. Duplicate callbacks are counted and printed.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Fixture, call, signal, spawn_worker_process};
use test_support::stub::StubBehavior;

const CALLS: usize = 5_000;
const MAX_ATTEMPTS: u32 = 6;
const SOAK_DEADLINE: Duration = Duration::from_secs(300);

async fn wait_callbacks(f: &Fixture, n: usize) {
    let end = Instant::now() + SOAK_DEADLINE;
    while f.receiver.count_by_call_id().len() < n {
        assert!(Instant::now() < end, "stuck below {n} delivered calls");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_ends_once_through_kills_restarts_and_outages() {
    let mut f = Fixture::start(StubBehavior {
        fail_first: 2,
        fail_status: 503,
        fail_fraction: 0.1,
        ..StubBehavior::default()
    })
    .await;
    let args = f.worker_args(
        "state",
        &[
            "--max-inflight",
            "64",
            "--ack-wait",
            "2s",
            "--retry-max-attempts",
            &MAX_ATTEMPTS.to_string(),
            "--retry-initial-wait",
            "100ms",
            "--retry-max-wait",
            "1s",
            "--callback-max-attempts",
            "1000",
            "--callback-max-wait",
            "1s",
        ],
    );
    let log = f.log("worker.log");
    let started = Instant::now();

    // Publishers: every call is retried with the same call id until JetStream acknowledges it
    // (NATS restarts in the middle); an acknowledged call is an accepted call.
    let calls: Vec<_> = (0..CALLS)
        .map(|_| Arc::new(call("soak", Some(&f.receiver.url()), b"soak payload")))
        .collect();
    let ids: Vec<String> = calls.iter().map(|c| c.meta.call_id.clone()).collect();
    let mut publishers = tokio::task::JoinSet::new();
    for chunk in calls.chunks(CALLS / 8) {
        let chunk = chunk.to_vec();
        let url = f.queue.nats.url();
        publishers.spawn(async move {
            let client = async_nats::connect(url).await.unwrap();
            let js = async_nats::jetstream::new(client.clone());
            for c in chunk {
                let end = Instant::now() + SOAK_DEADLINE;
                while queue_core::backend::nats::publish_call(
                    &client,
                    &js,
                    queue_core::backend::call_subject("faas-async", &c),
                    &c,
                    &queue_core::sealing::Sealing::off(),
                    client.server_info().max_payload,
                )
                .await
                .is_err()
                {
                    assert!(Instant::now() < end, "could not publish");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }

    let mut worker = spawn_worker_process(&args, &log);
    let mut kills = 0;
    for (threshold, fault) in [
        (500, "kill"),
        (1_200, "429"),
        (1_500, "kill"),
        (2_200, "nats"),
        (2_800, "receiver"),
        (3_600, "kill"),
    ] {
        wait_callbacks(&f, threshold).await;
        match fault {
            "kill" => {
                signal(&worker, "KILL");
                worker.wait().await.unwrap();
                kills += 1;
                worker = spawn_worker_process(&args, &log);
            }
            "429" => f.function.set_behavior(StubBehavior {
                fail_first: 1,
                fail_status: 429,
                fail_headers: vec![("Retry-After".into(), "1".into())],
                fail_fraction: 0.1,
                ..StubBehavior::default()
            }),
            "nats" => {
                f.queue.nats.stop().await;
                f.queue.nats.restart().await.unwrap();
            }
            _ => {
                f.receiver.stop().await;
                // The scenario itself: the receiver stays down for ten seconds.
                tokio::time::sleep(Duration::from_secs(10)).await;
                f.receiver.start_again().await.unwrap();
            }
        }
    }
    while let Some(r) = publishers.join_next().await {
        r.unwrap();
    }

    // Everything ends: a callback for each call, or a dead letter.
    let end = Instant::now() + SOAK_DEADLINE;
    let (letters, delivered) = loop {
        let letters = f.queue.dead_letters().await;
        let delivered = f.receiver.count_by_call_id();
        let dead: HashSet<&str> = letters
            .iter()
            .filter_map(|l| l.call_id.as_deref())
            .collect();
        let open = ids
            .iter()
            .filter(|id| !delivered.contains_key(*id) && !dead.contains(id.as_str()))
            .count();
        if open == 0 {
            break (letters, delivered);
        }
        assert!(Instant::now() < end, "{open} calls without a final outcome");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker died on its own"
    );
    signal(&worker, "TERM");
    worker.wait().await.unwrap();

    // Final outcome of each callback, grouped by call id (one pass over the recording).
    let mut final_callbacks: HashMap<String, Vec<String>> =
        ids.iter().map(|id| (id.clone(), Vec::new())).collect();
    for c in f.receiver.callbacks() {
        let outcome = c.header("x-dead-letter-reason").map_or_else(
            || c.header("x-function-status").unwrap_or("?").to_owned(),
            str::to_owned,
        );
        if let Some(statuses) = c
            .call_id
            .as_ref()
            .and_then(|id| final_callbacks.get_mut(id))
        {
            statuses.push(outcome);
        }
    }
    let dead_ids: HashSet<&str> = letters
        .iter()
        .filter_map(|l| l.call_id.as_deref())
        .collect();
    let duplicates = delivered.values().filter(|n| **n > 1).count();
    let extra_callbacks: usize = delivered.values().map(|n| n - 1).sum();
    let mut most_invocations = 0;
    let mut retried = 0;
    for id in &ids {
        let n = f.function.invocations_for(id);
        most_invocations = most_invocations.max(n);
        if n > 1 {
            retried += 1;
        }
        assert!(n <= MAX_ATTEMPTS as usize, "call {id} invoked {n} times");
        // One kind of final outcome per call: success callbacks, or a dead letter.
        let outcomes = &final_callbacks[id.as_str()];
        if dead_ids.contains(id.as_str()) {
            assert!(
                outcomes.iter().all(|o| !o.starts_with('2')),
                "call {id} both succeeded and was dead-lettered: {outcomes:?}"
            );
        } else {
            assert!(
                !outcomes.is_empty() && outcomes.iter().all(|o| o == "200"),
                "call {id}: {outcomes:?}"
            );
        }
    }
    assert!(
        f.queue.wait_until_empty().await,
        "calls left on the work queue"
    );
    println!(
        "soak: {CALLS} calls in {:.1}s; {kills} SIGKILLs, 1 NATS restart, receiver down 10 s; \
         {} delivered, {} dead-lettered, 0 lost; {retried} calls invoked more than once \
         (max {most_invocations} invocations, bound {MAX_ATTEMPTS}); {duplicates} calls with a \
         duplicate callback ({extra_callbacks} extra callbacks)",
        started.elapsed().as_secs_f64(),
        delivered.len(),
        dead_ids.len(),
    );
}
