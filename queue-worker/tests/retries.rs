//! Delivery under failure: function retries with backoff (`Retry-After` honoured), dead letters
//! with a final callback and replay from the CLI, callback retries that never re-invoke the
//! function, and expired calls.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::Duration;

use common::{DEADLINE, Fixture, InProcessWorker, wait_until};
use test_support::stub::StubBehavior;

fn failing(first: u32, status: u16, headers: &[(&str, &str)]) -> StubBehavior {
    StubBehavior {
        fail_first: first,
        fail_status: status,
        fail_headers: headers
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..StubBehavior::default()
    }
}

/// Arrival times of the attempts of one call, as gaps between them.
fn gaps(f: &Fixture, id: &str) -> Vec<Duration> {
    let times: Vec<_> = f
        .function
        .requests()
        .into_iter()
        .filter(|r| r.call_id.as_deref() == Some(id))
        .map(|r| r.received_at)
        .collect();
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_function_failing_twice_is_invoked_three_times_with_backoff() {
    let f = Fixture::start(failing(2, 503, &[])).await;
    let worker = InProcessWorker::start(&f.worker_args(
        "state",
        &["--retry-initial-wait", "600ms", "--retry-max-wait", "5s"],
    ));
    let id = f.publish("flaky", b"data").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(f.queue.wait_until_empty().await);
    worker.shutdown().await;

    assert_eq!(f.function.invocations_for(&id), 3, "503, 503, then 200");
    assert_eq!(f.receiver.count(), 1, "one callback, for the final outcome");
    let cb = &f.receiver.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), Some("200"));
    assert_eq!(cb.body.as_ref(), b"data");
    let retries: Vec<_> = f
        .function
        .requests()
        .iter()
        .map(|r| {
            (
                r.header("x-retry").unwrap().to_owned(),
                r.header("x-retry-max").unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        retries,
        [
            ("1".into(), "5".into()),
            ("2".into(), "5".into()),
            ("3".into(), "5".into())
        ]
    );
    // Backoff windows: [300ms, 600ms] then [600ms, 1.2s]; the upper side allows for a loaded
    // machine's scheduling, the lower side is exact.
    let g = gaps(&f, &id);
    println!("retry gaps: {g:?}");
    assert!(
        g[0] >= Duration::from_millis(300) && g[0] < Duration::from_millis(600 + 1500),
        "{g:?}"
    );
    assert!(
        g[1] >= Duration::from_millis(600) && g[1] < Duration::from_millis(1200 + 1500),
        "{g:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_after_on_429_is_honoured() {
    let f = Fixture::start(failing(1, 429, &[("Retry-After", "2")])).await;
    let worker = InProcessWorker::start(&f.worker_args(
        "state",
        &["--retry-initial-wait", "100ms", "--retry-max-wait", "10s"],
    ));
    let id = f.publish("throttled", b"x").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    worker.shutdown().await;
    let g = gaps(&f, &id);
    println!("429 gap: {g:?}");
    assert_eq!(g.len(), 1);
    assert!(g[0] >= Duration::from_secs(2), "waited only {:?}", g[0]);
    assert_eq!(
        f.receiver.callbacks()[0].header("x-function-status"),
        Some("200")
    );
}

/// `queue-worker dlq <action> --all` against the fixture's NATS: it must succeed; its stdout.
async fn dlq(f: &Fixture, action: &str) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .args(["dlq", action, "--all", "--nats-url", &f.queue.nats.url()])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permanent_failure_is_dead_lettered_with_a_final_callback_and_replayed_from_the_cli() {
    let f = Fixture::start(failing(u32::MAX, 500, &[])).await;
    let args = f.worker_args(
        "state",
        &[
            "--retry-max-attempts",
            "3",
            "--retry-initial-wait",
            "100ms",
            "--retry-max-wait",
            "300ms",
        ],
    );
    let worker = InProcessWorker::start(&args);
    let id = f.publish("broken", b"keep me").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(
        f.queue.wait_until_empty().await,
        "the failed call left the work queue"
    );

    assert_eq!(f.function.invocations_for(&id), 3, "attempts = max");
    let cb = &f.receiver.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), Some("500"));
    assert_eq!(cb.header("x-dead-letter-reason"), Some("retries_exhausted"));
    let letters = f.queue.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.reason, "retries_exhausted");
    assert_eq!(letter.last_status, Some(500));
    assert_eq!(letter.attempts, 3);
    assert_eq!(letter.call_id.as_deref(), Some(id.as_str()));
    assert_eq!(letter.body_bytes, Some(7), "the request body is kept");

    // The function recovers; the operator replays the dead letter with the CLI.
    f.function.set_behavior(StubBehavior::default());
    let out = dlq(&f, "replay").await;
    assert!(out.contains("1 call(s) put back"), "{out}");
    assert!(
        wait_until(|| f.receiver.count() == 2).await,
        "no callback after the replay"
    );
    let cb = &f.receiver.callbacks()[1];
    assert_eq!(cb.header("x-call-id"), Some(id.as_str()), "same call id");
    assert_eq!(cb.header("x-function-status"), Some("200"));
    assert_eq!(cb.header("x-dead-letter-reason"), None);
    assert_eq!(cb.body.as_ref(), b"keep me");
    assert!(f.queue.dead_letters().await.is_empty());
    worker.shutdown().await;
    assert_eq!(f.receiver.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_callback_is_retried_without_invoking_the_function_again() {
    let f = Fixture::start(StubBehavior::default()).await;
    f.receiver.set_status(503);
    let worker =
        InProcessWorker::start(&f.worker_args("state", &["--callback-max-attempts", "50"]));
    let id = f.publish("once", b"result").await;
    // The receiver is unavailable for a while: three refused deliveries...
    assert!(wait_until(|| f.receiver.count() >= 3).await);
    // ...then it is back.
    f.receiver.set_status(200);
    assert!(
        f.queue.wait_until_empty().await,
        "call not acked after the receiver came back"
    );
    worker.shutdown().await;
    assert_eq!(f.function.invocations_for(&id), 1, "the function ran once");
    let statuses: Vec<_> = f
        .receiver
        .callbacks()
        .iter()
        .map(|c| c.header("x-function-status").unwrap().to_owned())
        .collect();
    assert!(
        statuses.len() >= 4 && statuses.iter().all(|s| s == "200"),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_callback_receiver_that_is_down_gets_the_result_when_it_is_back() {
    let mut f = Fixture::start(StubBehavior::default()).await;
    f.receiver.stop().await;
    let worker =
        InProcessWorker::start(&f.worker_args("state", &["--callback-max-attempts", "50"]));
    let id = f.publish("once", b"result").await;
    assert!(wait_until(|| f.function.count() == 1).await);
    // Refused connections while it is down; the worker keeps the message in progress.
    assert!(!f.receiver.wait_for_count(1, Duration::from_secs(2)).await);
    f.receiver.start_again().await.unwrap();
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    assert!(f.queue.wait_until_empty().await);
    worker.shutdown().await;
    assert_eq!(f.function.invocations_for(&id), 1, "the function ran once");
    assert_eq!(f.receiver.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_older_than_its_max_age_is_dead_lettered_not_invoked() {
    let f = Fixture::start(StubBehavior::default()).await;
    let worker = InProcessWorker::start(&f.worker_args("state", &["--call-max-age", "1h"]));
    let mut old = common::call("late", Some(&f.receiver.url()), b"stale");
    old.meta.received_at_unix_nanos -= 2 * 3600 * 1_000_000_000;
    let id = f.queue.publish(&old).await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    worker.shutdown().await;
    assert_eq!(f.function.count(), 0, "an expired call must not run");
    let cb = &f.receiver.callbacks()[0];
    assert_eq!(cb.header("x-dead-letter-reason"), Some("expired"));
    assert_eq!(cb.header("x-function-status"), Some("504"));
    let letters = f.queue.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "expired");
    assert_eq!(letters[0].attempts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_function_overrides_change_attempts_and_timeout() {
    let f = Fixture::start(failing(u32::MAX, 500, &[])).await;
    let conf = f.dir.path().join("functions.toml");
    std::fs::write(
        &conf,
        r#"
        [functions."strict"]
        max_attempts = 2
        [functions."patient"]
        max_attempts = 4
        retry_codes = [500]
        "#,
    )
    .unwrap();
    let worker = InProcessWorker::start(&f.worker_args(
        "state",
        &[
            "--retry-max-attempts",
            "3",
            "--retry-initial-wait",
            "100ms",
            "--retry-max-wait",
            "200ms",
            "--functions-config",
            conf.to_str().unwrap(),
        ],
    ));
    let strict = f.publish("strict", b"s").await;
    let patient = f.publish("patient", b"p").await;
    let default = f.publish("plain", b"d").await;
    let ids = [strict.clone(), patient.clone(), default.clone()];
    assert!(f.receiver.wait_for_call_ids(&ids, DEADLINE).await);
    worker.shutdown().await;
    assert_eq!(f.function.invocations_for(&strict), 2);
    assert_eq!(f.function.invocations_for(&patient), 4);
    assert_eq!(
        f.function.invocations_for(&default),
        3,
        "the command-line default"
    );
    assert_eq!(
        f.function
            .requests()
            .iter()
            .find(|r| r.call_id.as_deref() == Some(&patient))
            .unwrap()
            .header("x-retry-max"),
        Some("4")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_function_times_out_and_is_retried() {
    let f = Fixture::start(StubBehavior {
        delay: Duration::from_secs(30),
        ..StubBehavior::default()
    })
    .await;
    let conf = f.dir.path().join("functions.toml");
    std::fs::write(
        &conf,
        "[functions.hangs]\ntimeout = \"300ms\"\nmax_attempts = 2\n",
    )
    .unwrap();
    let worker = InProcessWorker::start(&f.worker_args(
        "state",
        &[
            "--retry-initial-wait",
            "100ms",
            "--functions-config",
            conf.to_str().unwrap(),
        ],
    ));
    let id = f.publish("hangs", b"x").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    worker.shutdown().await;
    let cb = &f.receiver.callbacks()[0];
    assert_eq!(cb.header("x-function-status"), Some("503"));
    assert_eq!(cb.header("x-function-error"), Some("timeout"));
    assert_eq!(cb.header("x-dead-letter-reason"), Some("retries_exhausted"));
    assert_eq!(f.function.invocations_for(&id), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_functions_file_stops_the_worker_at_start_with_a_clear_error() {
    let f = Fixture::start(StubBehavior::default()).await;
    let conf = f.dir.path().join("functions.toml");
    std::fs::write(&conf, "[functions.x]\nmax_atempts = 2\n").unwrap();
    let worker = InProcessWorker::start(
        &f.worker_args("state", &["--functions-config", conf.to_str().unwrap()]),
    );
    let err = tokio::time::timeout(DEADLINE, worker.handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_atempts") && err.contains("functions.toml"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_callback_endpoint_times_out_and_the_call_is_dead_lettered_once() {
    let f = Fixture::start(StubBehavior::default()).await;
    // A "receiver" that never answers in time: a second stub holding every request 30 s.
    let hanging = test_support::stub::StubFunction::start(StubBehavior {
        delay: Duration::from_secs(30),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let worker = InProcessWorker::start(&f.worker_args(
        "state",
        &[
            "--callback-timeout",
            "300ms",
            "--callback-max-attempts",
            "2",
        ],
    ));
    let id = f
        .queue
        .publish(&common::call(
            "fast",
            Some(&format!("{}/hook", hanging.url())),
            b"r",
        ))
        .await;
    assert!(
        f.queue.wait_until_empty().await,
        "the call was not finished"
    );
    worker.shutdown().await;
    assert_eq!(f.function.invocations_for(&id), 1, "the function ran once");
    assert_eq!(
        hanging.invocations_for(&id),
        2,
        "two callback attempts, each timed out"
    );
    let letters = f.queue.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "callback_failed");
    assert_eq!(letters[0].last_status, Some(200));
}

/// `queue-worker dlq purge` deletes the purged calls' stored bodies with their dead letters
/// (nothing can replay them any more); another call's stored body stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dlq_purge_command_deletes_the_purged_calls_stored_bodies() {
    use queue_core::blobs::jetstream::JetStreamBlobs;
    use queue_core::blobs::{BlobKey, BlobRole, BlobStore, PutOptions};

    let f = Fixture::start(StubBehavior {
        fail_first: u32::MAX,
        fail_status: 500,
        ..StubBehavior::default()
    })
    .await;
    let args = f.worker_args("state", &["--retry-max-attempts", "1"]);
    let worker = InProcessWorker::start(&args);
    let id = f.publish("broken", b"keep me").await;
    assert!(
        wait_until(|| f.receiver.count() == 1).await,
        "no dead-letter callback"
    );
    assert!(f.queue.wait_until_empty().await);
    worker.shutdown().await;
    // Blobs under this call's keys and another call's (the bucket as a gateway makes it).
    let stream = f.queue.args.stream.clone();
    let store = JetStreamBlobs::ensure(
        &f.queue.js,
        &stream,
        queue_core::blobs::jetstream::BucketSettings {
            replicas: 1,
            max_bytes: 0,
        },
        queue_core::sealing::Sealing::off(),
    )
    .await
    .unwrap();
    for (call, role) in [
        (id.as_str(), BlobRole::Request),
        (id.as_str(), BlobRole::Result),
        ("another-call", BlobRole::Request),
    ] {
        let key = BlobKey::for_call(call, role).unwrap();
        let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
            b"stored",
        ))]);
        store
            .put(&key, body, PutOptions::at_most(1024))
            .await
            .unwrap();
    }

    let out = dlq(&f, "purge").await;
    assert!(out.contains("1 dead letter(s) deleted"), "{out}");
    assert!(f.queue.dead_letters().await.is_empty());
    let left: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key.as_str().to_owned())
        .collect();
    assert_eq!(
        left,
        ["another-call.request"],
        "only the purged call's blobs go"
    );
}
