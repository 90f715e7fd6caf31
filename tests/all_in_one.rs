//! The all-in-one server (`faas-async`) as a user runs it: the real binary, the embedded queue,
//! no nats-server anywhere. The README's round trip, a SIGKILL in the middle of processing, the
//! dead-letter command and start-up errors.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use test_support::{CallbackReceiver, StubBehavior, StubFunction};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Generous deadline for anything that waits for a condition on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(60);

/// A running `faas-async` process and where it listens.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts `faas-async` in `dir` (its data goes to `dir/data`) with `args`, on a free port,
    /// and waits for its banner. NATS variables are removed: the embedded queue is the default.
    async fn start(dir: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_faas-async"))
            .current_dir(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("NATS_URL")
            .env_remove("FAAS_ASYNC_QUEUE")
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut banner = Vec::new();
        let url = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                banner.push(line.clone());
                if let Some(url) = line.strip_prefix("faas-async listening on ") {
                    return url.to_owned();
                }
            }
            panic!("faas-async exited before listening");
        })
        .await
        .expect("faas-async did not print where it listens");
        // Read the rest of the banner: it says which queue is in use.
        while banner.len() < 2 {
            banner.push(lines.next_line().await.unwrap().unwrap());
        }
        assert!(
            banner[1].contains("queue:     embedded"),
            "the default queue is the embedded one: {banner:?}"
        );
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, url }
    }

    /// `POST /async-function/{function}` with a callback; returns the call id.
    async fn call(
        &self,
        client: &reqwest::Client,
        function: &str,
        body: &str,
        callback: &str,
    ) -> String {
        let response = client
            .post(format!("{}/async-function/{function}", self.url))
            .header("X-Callback-Url", callback)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
        response.headers()["x-call-id"].to_str().unwrap().to_owned()
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("faas-async stops on SIGTERM")
            .unwrap();
        assert!(exit.success(), "faas-async exited with {exit}");
    }

    fn kill9(&mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Starts the example function on a free port; returns it and its URL.
async fn start_stats_function() -> (Child, String) {
    let mut function = Command::new(env!("CARGO_BIN_EXE_stats-function"))
        .args(["--listen", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut function_log = BufReader::new(function.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(DEADLINE, function_log.next_line())
        .await
        .unwrap()
        .unwrap()
        .and_then(|l| {
            l.strip_prefix("stats-function listening on ")
                .map(str::to_owned)
        })
        .expect("stats-function prints where it listens");
    (function, url)
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The README's round trip, with free ports instead of the fixed ones: the example function,
/// the all-in-one server with nothing else installed, an async call with a callback.
#[tokio::test]
async fn readme_round_trip_works_without_nats() {
    let dir = tempfile::tempdir().unwrap();
    let (_function, function_url) = start_stats_function().await;
    let receiver = CallbackReceiver::start().await.unwrap();
    let server = Server::start(dir.path(), &["--gateway-url", &function_url]).await;
    let client = queue_worker::invoke::http_client("all-in-one-test").unwrap();
    let ready = client
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let call_id = server
        .call(&client, "stats", "[1, 2, 3, 4]", &receiver.url())
        .await;
    wait_until("the callback arrived", || receiver.count() == 1).await;
    let callback = &receiver.callbacks()[0];
    assert_eq!(callback.header("x-call-id"), Some(call_id.as_str()));
    assert_eq!(callback.header("x-function-status"), Some("200"));
    let stats: serde_json::Value = serde_json::from_slice(&callback.body).unwrap();
    assert_eq!(stats["count"], 4);
    assert_eq!(stats["mean"], 2.5);
    assert_eq!(stats["median"], 2.5);

    // The same result without a callback server, from the embedded queue's call records.
    // The callback entry is written just after the delivery: wait for it.
    let end = Instant::now() + DEADLINE;
    let record = loop {
        let record: serde_json::Value = serde_json::from_slice(
            &client
                .get(format!("{}/async-calls/{call_id}", server.url))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .unwrap();
        if record["callbacks"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
        {
            break record;
        }
        assert!(Instant::now() < end, "no callback entry: {record}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(record["callbacks"][0]["delivered"], true);
    let result = client
        .get(format!("{}/async-calls/{call_id}/result", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 200);
    assert_eq!(result.headers()["x-function-status"], "200");
    let kept: serde_json::Value = serde_json::from_slice(&result.bytes().await.unwrap()).unwrap();
    assert_eq!(kept, stats);

    // Bad input reaches the function and its 400 comes back in the callback.
    server
        .call(&client, "stats", "1, two", &receiver.url())
        .await;
    wait_until("the second callback arrived", || receiver.count() == 2).await;
    assert_eq!(
        receiver.callbacks()[1].header("x-function-status"),
        Some("400")
    );
    assert!(
        dir.path().join("data/queue").is_dir(),
        "the queue is kept under ./data"
    );
}

/// Acceptance: publish N, kill -9 the server mid-processing, restart on the same directory:
/// every call completes, none is lost.
#[tokio::test]
async fn sigkill_mid_processing_loses_no_call() {
    const CALLS: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_millis(150),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let args = [
        "--gateway-url",
        &function.url(),
        "--max-inflight",
        "4",
        "--ack-wait",
        "2s",
    ];
    let mut server = Server::start(dir.path(), &args).await;
    let client = queue_worker::invoke::http_client("all-in-one-test").unwrap();
    let mut ids = Vec::new();
    for i in 0..CALLS {
        ids.push(
            server
                .call(&client, "work", &format!("job {i}"), &receiver.url())
                .await,
        );
    }
    wait_until("some callbacks arrived", || receiver.count() >= 8).await;
    let before_kill = receiver.count();
    assert!(before_kill < CALLS, "the kill must land mid-processing");
    server.kill9();
    server.child.wait().await.unwrap();

    let _restarted = Server::start(dir.path(), &args).await;
    wait_until("every call has a callback", || {
        let done = receiver.count_by_call_id();
        ids.iter().all(|id| done.contains_key(id))
    })
    .await;
    let done = receiver.count_by_call_id();
    let invocations: HashMap<&String, usize> = ids
        .iter()
        .map(|id| (id, function.invocations_for(id)))
        .collect();
    let reinvoked = invocations.values().filter(|n| **n > 1).count();
    let duplicate_callbacks = done.values().filter(|n| **n > 1).count();
    eprintln!(
        "{CALLS} calls, {before_kill} callbacks before the SIGKILL; after restart all {CALLS} \
         completed; {reinvoked} re-invoked, {duplicate_callbacks} duplicate callbacks"
    );
    // With 4 in flight at the kill, at most those (and the ones whose ack sled had not flushed)
    // run again.
    assert!(reinvoked <= 12, "{reinvoked} calls re-invoked");
}

/// Dead letters of the embedded queue are administered with `faas-async dlq`; the queue
/// directory is locked by a running server, and the command says so.
#[tokio::test]
async fn dlq_command_reads_the_embedded_queue() {
    let dir = tempfile::tempdir().unwrap();
    let run_dlq = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_faas-async"))
            .current_dir(dir.path())
            .args(["dlq", "list"])
            .env_remove("NATS_URL")
            .env("LOG_LEVEL", "warn")
            .output()
            .unwrap()
    };
    let idle = run_dlq();
    assert!(idle.status.success(), "{idle:?}");
    assert!(String::from_utf8_lossy(&idle.stdout).contains("0 dead letter(s)"));

    let _server = Server::start(dir.path(), &[]).await;
    let busy = run_dlq();
    assert!(!busy.status.success());
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains("is another faas-async using it?"),
        "{stderr}"
    );
}

/// `--role gateway` on the embedded queue takes calls and keeps them in the queue directory
/// until a server with the worker opens it: nothing runs meanwhile, and nothing is lost.
#[tokio::test]
async fn gateway_role_on_the_embedded_queue_keeps_calls_for_later() {
    const CALLS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let function_url = function.url();
    let gateway = Server::start(
        dir.path(),
        &["--gateway-url", &function_url, "--role", "gateway"],
    )
    .await;
    let client = queue_worker::invoke::http_client("all-in-one-test").unwrap();
    let mut ids = Vec::new();
    for i in 0..CALLS {
        ids.push(
            gateway
                .call(&client, "later", &format!("job {i}"), &receiver.url())
                .await,
        );
    }
    let status: serde_json::Value = serde_json::from_slice(
        &client
            .get(format!("{}/async-calls/{}", gateway.url, ids[0]))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(status["state"], "queued", "{status}");
    gateway.stop().await;
    assert_eq!(
        function.received(),
        0,
        "a gateway-only process runs no call"
    );
    assert_eq!(receiver.count(), 0);

    let _server = Server::start(dir.path(), &["--gateway-url", &function_url]).await;
    wait_until(
        "every call kept by the gateway-only process has a callback",
        || {
            let done = receiver.count_by_call_id();
            ids.iter().all(|id| done.contains_key(id))
        },
    )
    .await;
    for id in &ids {
        assert_eq!(function.invocations_for(id), 1, "call {id}");
    }
}

/// The worker role alone needs a queue that several processes share.
#[test]
fn worker_only_without_nats_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_faas-async"))
        .current_dir(dir.path())
        .args(["--role", "worker"])
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--nats-url"), "{stderr}");
}

/// Idempotency keys and cancel on the embedded queue (the in-process cancel announcement and
/// the sled-backed claims): the same key twice is one call, and cancelling it while the
/// function runs aborts the invocation.
#[tokio::test]
async fn idempotency_and_cancel_work_on_the_embedded_queue() {
    let dir = tempfile::tempdir().unwrap();
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_secs(30),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let server = Server::start(dir.path(), &["--gateway-url", &function.url()]).await;
    let client = queue_worker::invoke::http_client("all-in-one-test").unwrap();
    let send = || {
        client
            .post(format!("{}/async-function/slow", server.url))
            .header("Idempotency-Key", "nightly-2026-11-28")
            .header("X-Callback-Url", receiver.url())
            .body("job")
            .send()
    };
    let first = send().await.unwrap();
    let id = first.headers()["x-call-id"].to_str().unwrap().to_owned();
    let again = send().await.unwrap();
    assert_eq!(again.headers()["x-call-id"], id.as_str());
    assert_eq!(again.headers()["idempotent-replayed"], "true");

    wait_until("the function runs", || function.invocations_for(&id) == 1).await;
    // The admin API on the embedded queue sees it queued and delivered.
    let queue: serde_json::Value = serde_json::from_slice(
        &client
            .get(format!("{}/system/async/queue", server.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(queue["pending"], 1, "{queue}");
    assert_eq!(queue["unacked"], 1, "{queue}");
    assert_eq!(queue["functions"][0]["function"], "slow");
    assert_eq!(queue["functions"][0]["paused"], false);
    let cancelled = client
        .delete(format!("{}/async-calls/{id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    wait_until("the cancel callback arrived", || receiver.count() == 1).await;
    let callback = &receiver.callbacks()[0];
    assert_eq!(callback.header("x-call-id"), Some(id.as_str()));
    assert_eq!(callback.header("x-call-state"), Some("cancelled"));
    assert_eq!(function.invocations_for(&id), 1);
}

/// Acceptance (metrics): after a known workload, `/metrics` shows the documented series with
/// the right counts. A separate process, so no other test's traffic is counted.
#[tokio::test]
async fn metrics_count_a_known_workload() {
    let dir = tempfile::tempdir().unwrap();
    let (_function, function_url) = start_stats_function().await;
    let receiver = CallbackReceiver::start().await.unwrap();
    let server = Server::start(dir.path(), &["--gateway-url", &function_url]).await;
    let client = queue_worker::invoke::http_client("all-in-one-test").unwrap();
    // A function has a label of its own once it answered (issue 17, finding 10): a first call,
    // finished before the workload, is counted under `other` where it was counted before the
    // function answered (submitted, queue wait, in flight) and under `stats` afterwards.
    let warm_up = server.call(&client, "stats", "[0]", &receiver.url()).await;
    wait_until("the warm-up call called back", || receiver.count() == 1).await;
    let mut ids = vec![warm_up];
    for body in ["[1, 2]", "[3]", "4 5 6", "not numbers"] {
        ids.push(server.call(&client, "stats", body, &receiver.url()).await);
    }
    let refused = client
        .post(format!("{}/async-function/stats", server.url))
        .header("X-Callback-Url", "not a url")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);

    let expected = [
        "faas_async_refused_total{reason=\"invalid_callback_url\"} 1",
        "faas_async_processed_total{function=\"stats\",outcome=\"succeeded\"} 4",
        "faas_async_processed_total{function=\"stats\",outcome=\"failed\"} 1",
        "faas_async_callbacks_total{function=\"stats\",outcome=\"delivered\"} 5",
        "faas_async_queue_wait_seconds_count{function=\"stats\"} 4",
        "faas_async_function_duration_seconds_count{function=\"stats\"} 5",
        "faas_async_callback_duration_seconds_count{function=\"stats\"} 5",
        "faas_async_end_to_end_seconds_count{function=\"stats\"} 5",
        "faas_async_accept_seconds_count 5",
        "faas_async_in_flight{function=\"stats\"} 0",
        "faas_async_pending_messages 0",
        "faas_async_dead_letters_kept 0",
    ];
    let end = Instant::now() + DEADLINE;
    loop {
        let response = client
            .get(format!("{}/metrics", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let missing: Vec<_> = expected
            .iter()
            .filter(|line| !text.lines().any(|l| l == **line))
            .collect();
        if missing.is_empty() {
            assert!(
                ids.iter().all(|id| !text.contains(id.as_str())),
                "no call ids in labels"
            );
            // The warm-up was accepted before the function answered (so under `other`, unless
            // the function answered first); the workload after it.
            let submitted = |label: &str| {
                let prefix = format!("faas_async_submitted_total{{function=\"{label}\"}} ");
                text.lines()
                    .find_map(|l| l.strip_prefix(prefix.as_str()))
                    .map_or(0, |n| n.parse::<u64>().unwrap())
            };
            let (stats, other) = (submitted("stats"), submitted("other"));
            assert!(
                stats >= 4 && stats + other == 5,
                "submitted: {stats} + {other}\n{text}"
            );
            break;
        }
        assert!(Instant::now() < end, "missing series: {missing:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gateway's authentication settings reach the all-in-one server's HTTP front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_settings_reach_the_http_front() {
    let dir = tempfile::tempdir().unwrap();
    let token = format!("fa_{}", uuid_like());
    // SHA-256 of the token, by sha256sum (an implementation other than the gateway's).
    let out = std::process::Command::new("sh")
        .args(["-c", "printf %s \"$T\" | sha256sum"])
        .env("T", &token)
        .output()
        .unwrap();
    let hash = String::from_utf8(out.stdout).unwrap()[..64].to_owned();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("bot {hash} invoke:openfaas-fn\n")).unwrap();
    let audit = dir.path().join("audit.log");
    let quotas = dir.path().join("quotas.toml");
    std::fs::write(
        &quotas,
        "[namespaces.openfaas-fn]\nrate = 0.01\nburst = 1\n",
    )
    .unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rule]]\nclaim = \"groups\"\ncontains = \"ops\"\nscopes = [\"admin:*\"]\n",
    )
    .unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--auth-policy-file",
            policy.to_str().unwrap(),
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
            "--quotas-file",
            quotas.to_str().unwrap(),
            // Nothing listens there: the keys are never fetched.
            "--jwks-url",
            "http://127.0.0.1:9/certs",
            "--jwks-refresh",
            "10m",
            "--jwt-issuer",
            "https://login.example.test/realms/research",
            "--jwt-audience",
            "faas-async",
        ],
    )
    .await;
    let client = queue_worker::invoke::http_client("all-in-one-test").unwrap();
    let get = |path: &str| client.get(format!("{}{path}", server.url)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    // The JWT settings reach the HTTP front: not ready while the keys of --jwks-url are not
    // fetched, and a JWT cannot be checked yet (503); the tokens file works meanwhile.
    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("signing keys"));
    let jwt = client
        .post(format!("{}/async-function/fn", server.url))
        .bearer_auth("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.e30.c2ln")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(jwt.status(), 503);
    assert_eq!(get("/system/async/queue").await.unwrap().status(), 401);
    let invoke = |bearer: Option<&str>| {
        let r = client
            .post(format!("{}/async-function/fn", server.url))
            .body("x");
        match bearer {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
        .send()
    };
    assert_eq!(invoke(None).await.unwrap().status(), 401);
    assert_eq!(invoke(Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(invoke(Some(&token)).await.unwrap().status(), 202);
    // The quotas reach the HTTP front too: the burst of one is spent.
    let limited = invoke(Some(&token)).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    let r = client
        .get(format!("{}/system/async/queue", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "invoke is not admin");
    // The audit log setting reaches the HTTP front too: a line per refusal.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let denied = |action: &str, status: u16| {
        lines
            .iter()
            .filter(|l| l["action"] == action && l["status"] == status && l["outcome"] == "denied")
            .count()
    };
    assert_eq!(denied("queue.stats", 401), 1, "{lines:#?}");
    assert_eq!(denied("invoke", 401), 2, "{lines:#?}");
    assert_eq!(denied("queue.stats", 403), 1, "{lines:#?}");
    assert!(!std::fs::read_to_string(&audit).unwrap().contains(&token));
    server.stop().await;
}

/// A random hex string from the kernel.
fn uuid_like() -> String {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
    id.trim().replace('-', "")
}

/// Encryption at rest on the embedded queue: with a keys file, the queue directory (queued
/// calls, kept results, dedup state: one sled database) holds no marker of a call's body,
/// headers or result, while the callback and the result endpoint give them back; without keys
/// the same search finds them (the control), and a restart with the keys rotated (a new current
/// key, the old one still listed) still serves the results kept under the old key.
#[tokio::test]
async fn embedded_queue_keeps_call_data_encrypted_at_rest() {
    let function = StubFunction::start(StubBehavior {
        response_headers: vec![("x-result-marker".into(), "RESULT-MARKER-e1".into())],
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let client = queue_worker::invoke::http_client("all-in-one-test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    let rotated = dir.path().join("rotated");
    std::fs::write(
        &rotated,
        "k2 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=\nk1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
    )
    .unwrap();
    for (sealed, data) in [(true, "sealed"), (false, "clear")] {
        let data_dir = dir.path().join(data);
        let mut args = vec![
            "--gateway-url".to_owned(),
            function.url(),
            "--queue-dir".to_owned(),
            data_dir.display().to_string(),
        ];
        if sealed {
            args.extend([
                "--encryption-keys-file".to_owned(),
                keys.display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Server::start(dir.path(), &args).await;
        let before = receiver.count();
        let mut ids = Vec::new();
        for i in 0..3 {
            let response = client
                .post(format!("{}/async-function/echo", server.url))
                .header("X-Callback-Url", receiver.url())
                .header("X-Input-Marker", "HEADER-MARKER-e1")
                .body(format!("BODY-MARKER-e1 {i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 202);
            ids.push(response.headers()["x-call-id"].to_str().unwrap().to_owned());
        }
        wait_until("the callbacks arrived", || receiver.count() == before + 3).await;
        for callback in &receiver.callbacks()[before..] {
            assert!(String::from_utf8_lossy(&callback.body).starts_with("BODY-MARKER-e1"));
        }
        let fetch_results = |url: String| {
            let client = client.clone();
            let ids = ids.clone();
            async move {
                for id in &ids {
                    let r = client
                        .get(format!("{url}/async-calls/{id}/result"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 200, "result of {id}");
                    assert!(
                        String::from_utf8_lossy(&r.bytes().await.unwrap())
                            .starts_with("BODY-MARKER-e1")
                    );
                }
            }
        };
        fetch_results(server.url.clone()).await;
        server.stop().await;
        let found: Vec<String> = ["BODY-MARKER-e1", "HEADER-MARKER-e1", "RESULT-MARKER-e1"]
            .iter()
            .flat_map(|m| test_support::files_containing(&data_dir, m))
            .collect();
        if sealed {
            assert!(found.is_empty(), "call data in clear: {found:?}");
            // Rotated: k2 seals from now on, k1 still opens what it sealed.
            let mut args = args.clone();
            let rotated = rotated.display().to_string();
            if let Some(at) = args.iter().position(|a| *a == keys.to_str().unwrap()) {
                args[at] = &rotated;
            }
            let server = Server::start(dir.path(), &args).await;
            fetch_results(server.url.clone()).await;
            server.stop().await;
        } else {
            assert!(!found.is_empty(), "the control run must find the markers");
        }
    }
}

/// Delayed calls on the embedded queue (issue 15): an `X-Delay` call is `scheduled`, survives a
/// restart of the server on the same directory, and runs within 1 s of its time; a cancelled
/// scheduled call never runs (its cancel callback comes when its time comes).
#[tokio::test]
async fn a_delayed_call_survives_a_restart_and_runs_on_time_on_the_embedded_queue() {
    let dir = tempfile::tempdir().unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let function_url = function.url();
    let (base_instant, base_unix) = (Instant::now(), queue_core::unix_nanos_now());
    let server = Server::start(dir.path(), &["--gateway-url", &function_url]).await;
    let client = queue_worker::invoke::http_client("all-in-one-test").unwrap();
    let post = || {
        client
            .post(format!("{}/async-function/later", server.url))
            .header("X-Delay", "8s")
            .header("X-Callback-Url", receiver.url())
            .body("job")
            .send()
    };
    let delayed = post().await.unwrap();
    assert_eq!(delayed.status(), 202);
    let delayed = delayed.headers()["x-call-id"].to_str().unwrap().to_owned();
    let cancelled = post().await.unwrap();
    let cancelled = cancelled.headers()["x-call-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let record = |id: String| {
        let client = client.clone();
        let url = server.url.clone();
        async move {
            let body = client
                .get(format!("{url}/async-calls/{id}"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        }
    };
    let shown = record(delayed.clone()).await;
    assert_eq!(shown["state"], "scheduled", "{shown}");
    let due = shown["scheduled_for"].as_u64().expect("scheduled_for");
    let response = client
        .delete(format!("{}/async-calls/{cancelled}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    server.stop().await;

    let _server = Server::start(dir.path(), &["--gateway-url", &function_url]).await;
    wait_until(
        "the delayed call ran and the cancelled one was called back",
        || {
            let done = receiver.count_by_call_id();
            done.contains_key(&delayed) && done.contains_key(&cancelled)
        },
    )
    .await;
    let invoked = function
        .requests()
        .into_iter()
        .find(|r| r.call_id.as_deref() == Some(delayed.as_str()))
        .expect("invoked");
    let at = base_unix
        + u64::try_from(invoked.received_at.duration_since(base_instant).as_nanos()).unwrap();
    assert!(at >= due, "ran {} ms early", (due - at) / 1_000_000);
    assert!(
        at - due < 1_000_000_000,
        "ran {} ms after its time",
        (at - due) / 1_000_000
    );
    assert_eq!(function.invocations_for(&delayed), 1);
    assert_eq!(
        function.invocations_for(&cancelled),
        0,
        "a cancelled call ran"
    );
    let callback = receiver
        .callbacks()
        .into_iter()
        .find(|c| c.call_id.as_deref() == Some(cancelled.as_str()))
        .unwrap();
    assert_eq!(callback.header("x-call-state"), Some("cancelled"));
}
