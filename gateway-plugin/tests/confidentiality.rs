//! The gateway never logs bodies, query strings or secret headers, even at debug level.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::http;
use test_support::nats_server::NatsServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_logs_hold_no_bodies_or_secrets() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Credentials in the NATS URL are never logged (issue 17, finding 8).
    let nats_url = nats
        .url()
        .replace("nats://", "nats://alice:NATS-SECRET-s3cretPW@");
    let mut gateway = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway-plugin"))
        .args([
            "--nats-url",
            &nats_url,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("LOG_LEVEL", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = http();
    let base = format!("http://127.0.0.1:{port}");
    let end = std::time::Instant::now() + common::DEADLINE;
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "gateway never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let r = client
        .post(format!(
            "{base}/async-function/fn/p?token=QUERY-SECRET-1d2e"
        ))
        .header("Authorization", "Bearer TOKEN-SECRET-91c2")
        .header("Cookie", "sid=COOKIE-SECRET-55aa")
        .body("BODY-SECRET-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.headers()["x-call-id"].to_str().unwrap().to_owned();
    let r = client
        .post(format!("{base}/async-function/bad%20name"))
        .header("Authorization", "Bearer TOKEN-SECRET-91c2")
        .body("BODY-SECRET-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let pid = gateway.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = gateway.wait().await.unwrap();
    assert!(status.success(), "gateway exited with {status} on SIGTERM");

    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains(&id), "logs should identify the call:\n{logs}");
    assert!(
        logs.contains("NO AUTHENTICATION"),
        "without an authenticator the gateway warns that everything is open:\n{logs}"
    );
    assert!(
        logs.contains("nats://***@127.0.0.1"),
        "the NATS URL is logged, redacted:\n{logs}"
    );
    for secret in [
        "BODY-SECRET",
        "TOKEN-SECRET",
        "COOKIE-SECRET",
        "QUERY-SECRET",
        "NATS-SECRET",
    ] {
        assert!(
            !logs.contains(secret),
            "{secret} leaked into the gateway logs:\n{logs}"
        );
    }
}
