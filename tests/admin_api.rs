//! The queue admin API (`/system/async/...`) on JetStream, through the real `faas-async`
//! binary: it agrees with the `dlq` command, replays dead letters, and pause holds a
//! function's calls until resume.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_support::nats_server::NatsServer;
use test_support::{CallbackReceiver, StubBehavior, StubFunction};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);

async fn start_server(nats_url: &str, function_url: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_faas-async"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--nats-url",
            nats_url,
            "--gateway-url",
            function_url,
            "--retry-max-attempts",
            "1",
            "--state-dir",
        ])
        .arg(tempfile::tempdir().unwrap().keep())
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("faas-async listening on ") {
                return url.to_owned();
            }
        }
        panic!("faas-async exited");
    })
    .await
    .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url)
}

async fn get_json(client: &reqwest::Client, url: String) -> Value {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

async fn post_json(client: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap(),
    )
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cli_dead_letters(nats_url: &str) -> Vec<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_faas-async"))
        .args(["dlq", "list", "--json", "--nats-url", nats_url])
        .env("LOG_LEVEL", "warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_agrees_with_the_cli_replays_and_pauses() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        fail_first: u32::MAX,
        fail_status: 500,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let (_server, url) = start_server(&nats.url(), &function.url()).await;
    let client = queue_worker::invoke::http_client("admin-test").unwrap();
    wait_for("the gateway is ready", async || {
        client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let call = async |body: &str| {
        let response = client
            .post(format!("{url}/async-function/work"))
            .header("X-Callback-Url", receiver.url())
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        response.headers()["x-call-id"].to_str().unwrap().to_owned()
    };

    // Two calls fail for good (one attempt allowed) and are dead-lettered.
    let first = call("one").await;
    let second = call("two").await;
    wait_for("two dead letters", async || {
        get_json(&client, format!("{url}/system/async/dead-letters"))
            .await
            .as_array()
            .unwrap()
            .len()
            == 2
    })
    .await;
    let api = get_json(&client, format!("{url}/system/async/dead-letters")).await;
    assert_eq!(
        api.as_array().unwrap(),
        &cli_dead_letters(&nats.url()),
        "API and CLI agree"
    );
    let shown = get_json(
        &client,
        format!("{url}/system/async/dead-letters/call/{first}"),
    )
    .await;
    assert_eq!(shown["reason"], "retries_exhausted");
    assert_eq!(shown["call_id"], first.as_str());

    // Pause, then replay one dead letter and send a new call: both are held.
    let (status, paused) = post_json(
        &client,
        format!("{url}/system/async/functions/work/pause"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["paused_functions"], json!(["work"]));
    function.set_behavior(StubBehavior::default());
    let invocations_before = function.requests().len();
    let (status, replayed) = post_json(
        &client,
        format!("{url}/system/async/dead-letters/replay"),
        json!({ "call_ids": [first] }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(replayed["replayed"].as_array().unwrap().len(), 1);
    let third = call("three").await;
    wait_for("the worker holds both calls", async || {
        let queue = get_json(&client, format!("{url}/system/async/queue")).await;
        queue["unacked"] == 2
    })
    .await;
    let queue = get_json(&client, format!("{url}/system/async/queue")).await;
    assert_eq!(queue["pending"], 2, "{queue}");
    assert_eq!(queue["functions"][0]["function"], "work");
    assert_eq!(queue["functions"][0]["pending"], 2);
    assert_eq!(queue["functions"][0]["paused"], true);
    assert_eq!(
        function.requests().len(),
        invocations_before,
        "no invocation while paused"
    );

    // Resume: both run and call back.
    let (status, _) = post_json(
        &client,
        format!("{url}/system/async/functions/work/resume"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    wait_for("both held calls called back with 200", async || {
        let ok = |id: &str| {
            receiver.callbacks().iter().any(|c| {
                c.call_id.as_deref() == Some(id) && c.header("x-function-status") == Some("200")
            })
        };
        ok(&first) && ok(&third)
    })
    .await;

    // Purge the other dead letter from the API; the CLI sees none.
    let (status, _) = post_json(
        &client,
        format!("{url}/system/async/dead-letters/purge"),
        json!({}),
    )
    .await;
    assert_eq!(status, 400, "an empty selection is refused");
    let (status, purged) = post_json(
        &client,
        format!("{url}/system/async/dead-letters/purge"),
        json!({ "call_ids": [second] }),
    )
    .await;
    assert_eq!((status, purged["deleted"].as_u64()), (200, Some(1)));
    assert!(cli_dead_letters(&nats.url()).is_empty());
}

/// Issue 17, finding 8: credentials in the NATS URL appear neither in the start banner nor in
/// the logs (at debug level), and they still authenticate: the server becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_credentials_are_never_printed() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let nats_url = nats
        .url()
        .replace("nats://", "nats://alice:NATS-SECRET-s3cretPW@");
    let mut child = Command::new(env!("CARGO_BIN_EXE_faas-async"))
        .args(["--listen", "127.0.0.1:0", "--nats-url", &nats_url])
        .args(["--gateway-url", "http://bob:GW-SECRET-pw@127.0.0.1:9"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("LOG_LEVEL", "debug")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut url = String::new();
    wait_for("the banner", async || {
        let out = std::fs::read_to_string(&out_path).unwrap();
        match out
            .lines()
            .find_map(|l| l.strip_prefix("faas-async listening on "))
        {
            Some(found) if out.contains("ready:") => {
                url = found.to_owned();
                true
            }
            _ => false,
        }
    })
    .await;
    let client = queue_worker::invoke::http_client("admin-test").unwrap();
    wait_for("the gateway is ready", async || {
        client
            .get(format!("{url}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    let banner = std::fs::read_to_string(&out_path).unwrap();
    let logs = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        banner.contains(&format!(
            "JetStream at nats://***@127.0.0.1:{}",
            nats.port()
        )),
        "{banner}"
    );
    assert!(
        banner.contains("http://***@127.0.0.1:9/function"),
        "{banner}"
    );
    for secret in ["NATS-SECRET", "GW-SECRET", "alice", "bob:"] {
        assert!(
            !banner.contains(secret),
            "{secret} in the banner:\n{banner}"
        );
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
}
