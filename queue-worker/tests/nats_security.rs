//! The worker binary over a NATS server that requires TLS (a private authority made in the
//! test) and a password: it processes a call; a wrong authority or a wrong password stops it at
//! start with a message naming the cause, and its logs never hold the password.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::Path;
use std::time::Instant;

use common::{DEADLINE, Queue, call, nats_args, signal, spawn_worker_process, worker_args};
use test_support::TestPki;
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

const PASSWORD: &str = "NATS-PASSWORD-9b7c31";

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Runs the worker binary with `args` until it exits; its exit status and log.
async fn run_until_exit(args: &[String], log: &Path) -> (std::process::ExitStatus, String) {
    let mut worker = spawn_worker_process(args, log);
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .expect("the worker kept running instead of failing at start")
        .unwrap();
    (status, std::fs::read_to_string(log).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_binary_works_over_tls_with_a_password_and_fails_at_start_when_refused() {
    let pki = TestPki::generate().unwrap();
    let ca = path(&pki.ca());
    let nats = NatsServer::start_tls_with_password(&pki, "alice", PASSWORD)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let password_file = path(&password_file);

    // The streams, made the way the gateway makes them, through the same secured connect.
    let mut args = nats_args(&nats.url());
    args.nats_ca = Some(pki.ca());
    args.nats_user = Some("alice".into());
    args.nats_password_file = Some(password_file.clone().into());
    let client = queue_core::backend::nats::connect(&args, "test")
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    queue_core::backend::nats::ensure_streams(
        &js,
        &args,
        &common::stream_args(),
        client.server_info().max_payload,
    )
    .await
    .unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let queue = Queue {
        nats,
        client,
        js,
        args,
    };
    let id = queue
        .publish(&call("echo", Some(&receiver.url()), b"over TLS"))
        .await;

    let flags = |ca: &str, password: &str| {
        let mut all = worker_args(
            &queue.nats.url(),
            &function.url(),
            &dir.path().join("state"),
        );
        all.extend(
            [
                "--nats-ca",
                ca,
                "--nats-user",
                "alice",
                "--nats-password-file",
                password,
            ]
            .map(str::to_owned),
        );
        all
    };

    // A wrong authority: the worker exits at start, naming TLS and the setting to check.
    let other = TestPki::generate().unwrap();
    let log = dir.path().join("wrong-ca.log");
    let (status, log) = run_until_exit(&flags(&path(&other.ca()), &password_file), &log).await;
    assert!(!status.success(), "{status}");
    assert!(
        log.contains("TLS handshake failed") && log.contains("--nats-ca (NATS_CA)"),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "{log}");

    // A wrong password: the same, naming the credentials' settings; neither password logged.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "NATS-PASSWORD-wrong-1d\n").unwrap();
    let log = dir.path().join("wrong-password.log");
    let (status, log) = run_until_exit(&flags(&ca, &path(&wrong)), &log).await;
    assert!(!status.success(), "{status}");
    assert!(
        log.contains("authorization violation") && log.contains("--nats-password-file"),
        "{log}"
    );
    assert!(!log.contains("NATS-PASSWORD-wrong-1d"), "{log}");

    // The right settings: the call is processed and called back.
    let log_path = dir.path().join("worker.log");
    let started = Instant::now();
    let worker = spawn_worker_process(&flags(&ca, &password_file), &log_path);
    assert!(
        receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await,
        "no callback within {:?}",
        started.elapsed()
    );
    assert_eq!(function.requests()[0].body, "over TLS");
    signal(&worker, "TERM");
    let mut worker = worker;
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("connected to NATS"), "{log}");
    assert!(!log.contains(PASSWORD), "{log}");

    // The dead-letter command connects with the same settings: TLS and the password file.
    let dlq = |ca: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
            .args([
                "--nats-url",
                &queue.nats.url(),
                "--nats-ca",
                ca,
                "--nats-user",
                "alice",
                "--nats-password-file",
                &password_file,
                "dlq",
                "list",
            ])
            .env("LOG_LEVEL", "warn")
            .output()
            .unwrap()
    };
    let listed = dlq(&ca);
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{listed:?}");
    assert!(stdout.contains("0 dead letter(s)"), "{stdout}");
    let refused = dlq(&path(&other.ca()));
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("TLS handshake failed"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
}
