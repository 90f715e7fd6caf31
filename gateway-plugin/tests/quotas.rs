//! Quotas and rate limits against a live gateway on a private nats-server: a namespace limited
//! to 5 calls a second with a burst of 5 gets `429 rate_limited` with `Retry-After` for the
//! excess while another namespace is unaffected; a namespace at its pending-calls cap gets
//! `429 quota_exceeded` and nothing more is queued; a changed file applies without a restart; a
//! malformed file stops the gateway at start, naming the line. Bounds are generous: the machine may be loaded.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::{DEADLINE, Gateway, http, sha256_hex};
use serde_json::Value;
use test_support::nats_server::NatsServer;

fn quotas_file(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("quotas.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Sends `n` calls to `function` at once; the answers.
async fn burst(
    client: &reqwest::Client,
    base: &str,
    function: &str,
    n: usize,
) -> Vec<reqwest::Response> {
    let sends = (0..n).map(|_| {
        client
            .post(format!("{base}/async-function/{function}"))
            .body("x")
            .send()
    });
    futures::future::join_all(sends)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_over_its_rate_gets_429_while_another_is_unaffected() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = quotas_file(&dir, "[namespaces.team-a]\nrate = 5\nburst = 5\n");
    let gateway = Gateway::start(&nats.url(), &["--quotas-file", &file]).await;
    let client = http();

    let answers = burst(&client, &gateway.url, "fn.team-a", 20).await;
    let accepted = answers.iter().filter(|r| r.status() == 202).count();
    let limited: Vec<&reqwest::Response> = answers.iter().filter(|r| r.status() == 429).collect();
    assert_eq!(accepted + limited.len(), 20, "only 202 and 429");
    assert!(accepted >= 5, "the burst is accepted: {accepted}");
    assert!(
        accepted <= 7,
        "at most the burst and a little refill: {accepted}"
    );
    assert!(
        limited.len() >= 10,
        "the excess is refused: {}",
        limited.len()
    );
    for r in &limited {
        let after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(after, 1, "whole seconds, rounded up");
    }
    let refused = answers.into_iter().find(|r| r.status() == 429).unwrap();
    let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert_eq!(body["limit"]["kind"], "namespace", "{body}");
    assert_eq!(body["limit"]["namespace"], "team-a", "{body}");
    assert_eq!(body["limit"]["rate"], 5.0, "{body}");
    assert_eq!(body["limit"]["burst"], 5, "{body}");
    assert_eq!(
        common::queued(&nats.url()).await,
        accepted as u64,
        "refused calls are not queued"
    );

    // Another namespace (no entry) is not limited.
    let answers = burst(&client, &gateway.url, "fn.team-b", 20).await;
    assert!(answers.iter().all(|r| r.status() == 202));

    // A changed file applies without a restart: team-b gets a burst of one.
    std::fs::write(
        dir.path().join("quotas.toml"),
        "[namespaces.team-a]\nrate = 5\nburst = 5\n[namespaces.team-b]\nrate = 0.01\nburst = 1\n",
    )
    .unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        let r = burst(&client, &gateway.url, "fn.team-b", 1).await;
        if r[0].status() == 429 {
            break;
        }
        assert_eq!(r[0].status(), 202);
        assert!(Instant::now() < end, "the changed file never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The bucket refills: team-a is accepted again (polled, no fixed wait).
    let end = Instant::now() + DEADLINE;
    loop {
        let r = burst(&client, &gateway.url, "fn.team-a", 1).await;
        if r[0].status() == 202 {
            break;
        }
        assert!(Instant::now() < end, "the bucket never refilled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_at_its_pending_cap_gets_quota_exceeded_and_nothing_is_queued() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = quotas_file(
        &dir,
        "pending_refresh = \"200ms\"\n[namespaces.team-c]\nmax_pending = 3\n",
    );
    let gateway = Gateway::start(&nats.url(), &["--quotas-file", &file]).await;
    let client = http();
    let send = |function: &str| {
        client
            .post(format!("{}/async-function/{function}", gateway.url))
            .body("x")
            .send()
    };
    // No worker: the calls stay pending.
    for _ in 0..3 {
        assert_eq!(send("fn.team-c").await.unwrap().status(), 202);
    }
    // Calls are taken until the gateway's figures show the three pending, then refused.
    let mut accepted = 3_u64;
    let end = Instant::now() + DEADLINE;
    let refused = loop {
        let r = send("fn.team-c").await.unwrap();
        match r.status().as_u16() {
            202 => accepted += 1,
            429 => break r,
            other => panic!("unexpected {other}"),
        }
        assert!(Instant::now() < end, "the cap was never enforced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "quota_exceeded", "{body}");
    assert_eq!(body["limit"]["namespace"], "team-c", "{body}");
    assert_eq!(body["limit"]["max_pending"], 3, "{body}");
    assert!(body["limit"]["pending"].as_u64().unwrap() >= 3, "{body}");
    assert_eq!(common::queued(&nats.url()).await, accepted);
    for _ in 0..5 {
        let r = send("fn.team-c").await.unwrap();
        assert_eq!(r.status(), 429);
    }
    assert_eq!(
        common::queued(&nats.url()).await,
        accepted,
        "nothing queued above the cap"
    );
    // Another namespace is not capped.
    assert_eq!(send("fn.team-d").await.unwrap().status(), 202);
    assert_eq!(send("fn").await.unwrap().status(), 202);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_quotas_file_stops_the_gateway_at_start_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = quotas_file(&dir, "[namespaces.team-a]\nrate = 5\nbrust = 5\n");
    // No NATS server: the file is read before connecting.
    let config = gateway_plugin::GatewayConfig::try_parse_from([
        "gateway-plugin",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--quotas-file",
        &file,
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(
        DEADLINE,
        gateway_plugin::run(config, listener, std::future::pending()),
    )
    .await
    .expect("the gateway kept running");
    let error = result.expect_err("a malformed file is refused").to_string();
    assert!(
        error.contains(&file) && error.contains("line 3") && error.contains("brust"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subject_over_its_rate_gets_429_while_another_caller_is_unaffected() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bot = format!("fa_{}", uuid::Uuid::new_v4().simple());
    let other = format!("fa_{}", uuid::Uuid::new_v4().simple());
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "ci-bot {} invoke:*\nteam-bot {} invoke:*\n",
            sha256_hex(&bot),
            sha256_hex(&other)
        ),
    )
    .unwrap();
    let file = quotas_file(&dir, "[subjects.ci-bot]\nrate = 0.01\nburst = 2\n");
    let gateway = Gateway::start(
        &nats.url(),
        &[
            "--quotas-file",
            &file,
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
        ],
    )
    .await;
    let client = http();
    let send = |token: Option<&str>| {
        let r = client
            .post(format!("{}/async-function/fn.team-a", gateway.url))
            .body("x");
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
        .send()
    };
    // Refusals by authentication spend no token.
    for _ in 0..3 {
        assert_eq!(send(None).await.unwrap().status(), 401);
    }
    assert_eq!(send(Some(&bot)).await.unwrap().status(), 202);
    assert_eq!(send(Some(&bot)).await.unwrap().status(), 202);
    let refused = send(Some(&bot)).await.unwrap();
    assert_eq!(refused.status(), 429);
    let after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after >= 90, "a token every 100 s: {after}");
    let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    assert_eq!(body["limit"]["kind"], "subject", "{body}");
    assert_eq!(body["limit"]["subject"], "ci-bot", "{body}");
    assert_eq!(body["limit"]["burst"], 2, "{body}");
    for _ in 0..5 {
        assert_eq!(send(Some(&other)).await.unwrap().status(), 202);
    }
    assert_eq!(common::queued(&nats.url()).await, 7);
    gateway.shutdown().await;
}

/// A namespace's stored-bytes cap against the blob store it fills: large bodies are accepted
/// until the gateway's listing shows the namespace past its cap, then refused `429
/// quota_exceeded` (nothing stored, nothing queued); a body larger than the whole cap is `413`
/// at once; another namespace is unaffected; cancelling the calls frees the space.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_at_its_stored_bytes_cap_gets_quota_exceeded_until_space_is_freed() {
    use queue_core::blobs::{BlobStore, stored_bytes_by_namespace};

    const BODY: usize = 600 * 1024;
    const CAP: u64 = 1024 * 1024;
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = quotas_file(
        &dir,
        "stored_refresh = \"1s\"\n[namespaces.team-s]\nmax_stored_bytes = \"1MiB\"\n",
    );
    let gateway = Gateway::start(
        &nats.url(),
        &["--quotas-file", &file, "--max-body-bytes", "8MiB"],
    )
    .await;
    let client = http();
    let send = |function: &str, len: usize| {
        client
            .post(format!("{}/async-function/{function}", gateway.url))
            .body(vec![b'x'; len])
            .send()
    };
    let call_id = |r: &reqwest::Response| r.headers()["x-call-id"].to_str().unwrap().to_owned();

    // Larger than the whole cap: 413 at once, figures or not.
    let too_big = send("fn.team-s", 2 * 1024 * 1024).await.unwrap();
    assert_eq!(too_big.status(), 413);
    assert!(!too_big.headers().contains_key("retry-after"));
    let body: Value = serde_json::from_slice(&too_big.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "quota_exceeded", "{body}");
    assert_eq!(body["limit"]["max_stored_bytes"], CAP, "{body}");
    assert_eq!(body["limit"]["body_bytes"], 2 * 1024 * 1024, "{body}");

    // Stored bodies are taken until the listing shows them, then refused.
    let mut accepted = Vec::new();
    let end = Instant::now() + DEADLINE;
    let refused = loop {
        let r = send("fn.team-s", BODY).await.unwrap();
        match r.status().as_u16() {
            202 => accepted.push(call_id(&r)),
            429 => break r,
            other => panic!("unexpected {other}"),
        }
        assert!(Instant::now() < end, "the cap was never enforced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!accepted.is_empty());
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "quota_exceeded", "{body}");
    assert_eq!(body["limit"]["namespace"], "team-s", "{body}");
    assert_eq!(body["limit"]["max_stored_bytes"], CAP, "{body}");
    assert_eq!(body["limit"]["body_bytes"], BODY, "{body}");
    let stored = body["limit"]["stored_bytes"].as_u64().unwrap();
    assert!(stored >= BODY as u64, "{body}");
    assert!(stored + BODY as u64 > CAP, "{body}");

    // What the gateway summed is in the store, under the namespace.
    let store = common::blobs(&nats.url()).await;
    let listed = store.list().await.unwrap();
    assert_eq!(
        listed.len(),
        accepted.len(),
        "refused bodies are not stored"
    );
    let sums = stored_bytes_by_namespace(&listed);
    assert_eq!(sums["team-s"], (BODY * accepted.len()) as u64);
    assert_eq!(common::queued(&nats.url()).await, accepted.len() as u64);

    // A small call is stored nothing apart: refused only once the namespace is at its cap.
    let small = send("fn.team-s", 10).await.unwrap();
    if sums["team-s"] >= CAP {
        assert_eq!(small.status(), 429);
    } else {
        assert_eq!(small.status(), 202);
        accepted.push(call_id(&small));
    }
    // Another namespace is not capped.
    assert_eq!(send("fn.team-t", BODY).await.unwrap().status(), 202);

    // Cancelling the calls deletes their bodies: once listed again, bodies are taken.
    for id in &accepted {
        let r = client
            .delete(format!("{}/async-calls/{id}", gateway.url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    let end = Instant::now() + DEADLINE;
    loop {
        let r = send("fn.team-s", BODY).await.unwrap();
        match r.status().as_u16() {
            202 => break,
            429 => {}
            other => panic!("unexpected {other}"),
        }
        assert!(Instant::now() < end, "the freed space was never seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gateway.shutdown().await;
}
