//! The worker's metrics endpoint over HTTPS (`--metrics-tls-cert`/`--metrics-tls-key`,
//! certificates made in the test): `/metrics` and `/readyz` answer a client that trusts the
//! authority; plain HTTP and a client that does not trust it get nothing; a connection that
//! never says hello holds nobody up; a certificate or key that cannot be used stops the worker
//! at start, naming the setting.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{DEADLINE, Fixture, signal, spawn_worker_process};
use queue_worker::WorkerConfig;
use test_support::TestPki;
use test_support::stub::StubBehavior;

/// An HTTPS client trusting `ca` (PEM file).
fn https_client(ca: &std::path::Path) -> reqwest::Client {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The metrics address the worker logged (port 0 in tests).
async fn metrics_address(log: &std::path::Path) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rest) = text.split("metrics at /metrics listen=Some(").nth(1) {
            return rest.split(')').next().unwrap().to_owned();
        }
        assert!(
            Instant::now() < end,
            "no metrics address in the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_https_and_only_https() {
    let f = Fixture::start(StubBehavior::default()).await;
    let pki = TestPki::generate().unwrap();
    let log = f.log("worker.log");
    let (cert, key) = (
        pki.server_cert().display().to_string(),
        pki.server_key().display().to_string(),
    );
    let mut worker = spawn_worker_process(
        &f.worker_args(
            "state",
            &["--metrics-tls-cert", &cert, "--metrics-tls-key", &key],
        ),
        &log,
    );
    let address = metrics_address(&log).await;
    let base = format!("https://{address}");
    let client = https_client(&pki.ca());

    // A connection that never says hello does not hold the endpoint up for others.
    let _silent = tokio::net::TcpStream::connect(&address).await.unwrap();

    let end = Instant::now() + DEADLINE;
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            let body: serde_json::Value =
                serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            assert_eq!(body["status"], "ready");
            break;
        }
        assert!(
            Instant::now() < end,
            "the HTTPS endpoint never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = f.publish("over-tls", b"x").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("faas_async_pending_messages"),
        "no queue gauge in\n{text}"
    );
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    // Plain HTTP on the TLS port: no HTTP answer.
    let plain = queue_worker::invoke::http_client("metrics-tls-test")
        .unwrap()
        .get(format!("http://{address}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(
        plain.is_err() || plain.unwrap().status() != 200,
        "plain HTTP was answered"
    );
    // A client that does not trust the authority: the handshake fails.
    let other = TestPki::generate().unwrap();
    assert!(
        https_client(&other.ca())
            .get(format!("{base}/metrics"))
            .send()
            .await
            .is_err()
    );

    signal(&worker, "TERM");
    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .expect("the worker did not stop")
        .unwrap();
    assert!(status.success(), "{status}");
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains(r#"scheme="https""#), "{logs}");
}

#[tokio::test]
async fn an_unusable_certificate_or_key_stops_the_worker_at_start() {
    let pki = TestPki::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let cases = [
        (
            pki.server_cert(),
            junk.clone(),
            "--metrics-tls-key (QUEUE_WORKER_METRICS_TLS_KEY)",
        ),
        (
            pki.server_cert(),
            missing.clone(),
            "--metrics-tls-key (QUEUE_WORKER_METRICS_TLS_KEY)",
        ),
        (
            junk.clone(),
            pki.server_key(),
            "--metrics-tls-cert (QUEUE_WORKER_METRICS_TLS_CERT)",
        ),
        // The key of another certificate.
        (
            pki.server_cert(),
            pki.client_key(),
            "--metrics-tls-cert and --metrics-tls-key",
        ),
    ];
    for (cert, key, named) in cases {
        let config = WorkerConfig::try_parse_from([
            "queue-worker",
            // Nothing listens there: the check comes before any connection.
            "--nats-url",
            "nats://127.0.0.1:1",
            "--state-dir",
            &dir.path().join("state").display().to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-tls-cert",
            &cert.display().to_string(),
            "--metrics-tls-key",
            &key.display().to_string(),
        ])
        .unwrap();
        let result =
            tokio::time::timeout(DEADLINE, queue_worker::run(config, std::future::pending()))
                .await
                .expect("the worker started with an unusable certificate");
        let error = result.unwrap_err().to_string();
        assert!(error.contains(named), "{error}");
        assert!(error.starts_with("metrics endpoint TLS: "), "{error}");
        assert!(!error.contains("PRIVATE KEY"), "{error}");
    }
    // One without the other is refused by the command line.
    let lonely = WorkerConfig::try_parse_from([
        "queue-worker",
        "--metrics-tls-cert",
        &pki.server_cert().display().to_string(),
    ]);
    assert!(lonely.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_binary_exits_with_the_error_for_a_bad_key_file() {
    let f = Fixture::start(StubBehavior::default()).await;
    let pki = TestPki::generate().unwrap();
    let junk = f.dir.path().join("junk-key.pem");
    std::fs::write(
        &junk,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let args = f.worker_args(
        "state",
        &[
            "--metrics-tls-cert",
            &pki.server_cert().display().to_string(),
            "--metrics-tls-key",
            &junk.display().to_string(),
        ],
    );
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .expect("the worker did not stop")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--metrics-tls-key (QUEUE_WORKER_METRICS_TLS_KEY)")
            || stderr.contains("--metrics-tls-cert and --metrics-tls-key"),
        "{stderr}"
    );
    assert!(!stderr.contains("AAAA"), "{stderr}");
}
