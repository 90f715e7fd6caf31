//! Request and response bodies and secret headers never reach the logs, even at debug level.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::{DEADLINE, Fixture, call, signal};
use test_support::stub::StubBehavior;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_logs_hold_no_bodies_or_secrets() {
    let f = Fixture::start(StubBehavior {
        response_headers: vec![("set-cookie".into(), "session=RESPONSE-COOKIE-SECRET".into())],
        ..StubBehavior::default()
    })
    .await;
    let log = f.log("worker.log");
    let args = f.worker_args("state", &[]);

    let mut c = call("secret", Some(&f.receiver.url()), b"BODY-SECRET-7f3a");
    c.meta
        .headers
        .push(("authorization".into(), "Bearer TOKEN-SECRET-91c2".into()));
    c.meta
        .headers
        .push(("cookie".into(), "sid=COOKIE-SECRET-55aa".into()));
    let id = f.queue.publish(&c).await;

    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .args(&args)
        .env("LOG_LEVEL", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    signal(&worker, "TERM");
    worker.wait().await.unwrap();

    // The secrets did travel: the function and the callback got them.
    let req = &f.function.requests()[0];
    assert_eq!(
        req.header("authorization"),
        Some("Bearer TOKEN-SECRET-91c2")
    );
    assert_eq!(f.receiver.callbacks()[0].body.as_ref(), b"BODY-SECRET-7f3a");

    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains(&id), "logs should identify the call: {logs}");
    for secret in [
        "BODY-SECRET",
        "TOKEN-SECRET",
        "COOKIE-SECRET",
        "RESPONSE-COOKIE-SECRET",
    ] {
        assert!(
            !logs.contains(secret),
            "{secret} leaked into the worker logs:\n{logs}"
        );
    }
}
