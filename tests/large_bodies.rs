//! Large request bodies on the embedded backend (issue 16): the real `faas-async` binary,
//! bodies above the inline size stored as files under `<queue-dir>/bodies`, streamed to the
//! function; a SIGKILL while the function has the body runs the call again from the stored
//! body, with one callback; a cancel deletes the stored body.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use test_support::payload::{pattern, sha256};
use test_support::{CallbackReceiver, StubBehavior, StubFunction};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(120);
const MIB: usize = 1024 * 1024;

struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// `faas-async` in `dir` (data in `dir/data`), on a free port, the embedded queue.
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
        let url = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("faas-async listening on ") {
                    return url.to_owned();
                }
            }
            panic!("faas-async exited before listening");
        })
        .await
        .expect("faas-async did not print where it listens");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, url }
    }

    async fn kill9(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().await.unwrap();
    }
}

/// Blob files (temporary ones of a put in progress excluded).
/// Whether a result of `call_id` (an answer's key, `<id>.result-<tag>`) is stored.
fn has_result(dir: &Path, call_id: &str) -> bool {
    let prefix = format!("{call_id}.result");
    stored(dir).iter().any(|name| name.starts_with(&prefix))
}

fn stored(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir.join("data/queue/bodies")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_64_mib_body_round_trips_and_a_sigkill_mid_call_runs_it_again_from_the_stored_body() {
    let dir = tempfile::tempdir().unwrap();
    // Holds each request a while after reading it: the kill lands while the call runs.
    let function = StubFunction::start(StubBehavior {
        echo_body: true,
        delay: Duration::from_millis(1500),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let args = [
        "--gateway-url",
        &function.url(),
        "--max-body-bytes",
        "128MiB",
        "--max-response-bytes",
        "80MiB",
        "--ack-wait",
        "2s",
    ];
    let server = Server::start(dir.path(), &args).await;
    let client = queue_worker::invoke::http_client("large-bodies-test").unwrap();
    let body = pattern(64 * MIB, 1);
    let digest = sha256(&body);
    let response = client
        .post(format!("{}/async-function/echo", server.url))
        .header("X-Callback-Url", receiver.url())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let call_id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert_eq!(stored(dir.path()), [format!("{call_id}.request")]);

    wait_until("the function has the body", || function.count() >= 1).await;
    server.kill9().await;
    assert_eq!(receiver.count(), 0, "killed before its callback");

    let _restarted = Server::start(dir.path(), &args).await;
    assert!(
        receiver.wait_for_count(1, DEADLINE).await,
        "no callback after the restart"
    );
    let requests = function.requests();
    assert_eq!(requests.len(), 2, "run again after the kill");
    for request in &requests {
        assert_eq!(request.call_id.as_deref(), Some(call_id.as_str()));
        assert_eq!(sha256(&request.body), digest, "the function got the body");
    }
    let callbacks = receiver.callbacks();
    assert_eq!(callbacks.len(), 1);
    assert_eq!(
        sha256(&callbacks[0].body),
        digest,
        "the callback got the response"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_delayed_call_deletes_its_stored_body() {
    let dir = tempfile::tempdir().unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let args = [
        "--gateway-url",
        &function.url(),
        "--max-body-bytes",
        "16MiB",
    ];
    let server = Server::start(dir.path(), &args).await;
    let client = queue_worker::invoke::http_client("large-bodies-test").unwrap();
    let response = client
        .post(format!("{}/async-function/echo", server.url))
        .header("X-Delay", "1h")
        .body(pattern(4 * MIB, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let call_id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert_eq!(stored(dir.path()), [format!("{call_id}.request")]);
    let cancel = client
        .delete(format!("{}/async-calls/{call_id}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    assert!(stored(dir.path()).is_empty(), "{:?}", stored(dir.path()));
    assert_eq!(function.count(), 0);
    server.kill9().await;
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_32_mib_result_is_stored_streamed_to_the_callback_and_served_with_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let function = StubFunction::start(StubBehavior {
        echo_body: true,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let args = [
        "--gateway-url",
        &function.url(),
        "--max-body-bytes",
        "64MiB",
        "--max-response-bytes",
        "64MiB",
        "--max-result-bytes",
        "64MiB",
    ];
    let server = Server::start(dir.path(), &args).await;
    let client = queue_worker::invoke::http_client("large-bodies-test").unwrap();
    let body = pattern(32 * MIB, 1);
    let digest = sha256(&body);
    let response = client
        .post(format!("{}/async-function/echo", server.url))
        .header("X-Callback-Url", receiver.url())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let call_id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(
        receiver.wait_for_count(1, DEADLINE).await,
        "no callback for the large result"
    );
    let callback = &receiver.callbacks()[0];
    assert_eq!(callback.body.len(), body.len());
    assert_eq!(
        sha256(&callback.body),
        digest,
        "the callback got the response"
    );
    assert_eq!(header(&callback.headers, "x-function-status"), Some("200"));
    // The response went to the store (above --inline-response-bytes) and is kept there.
    assert!(has_result(dir.path(), &call_id), "{:?}", stored(dir.path()));

    let result_url = format!("{}/async-calls/{call_id}/result", server.url);
    let whole = client.get(&result_url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(
        whole.headers()["content-length"].to_str().unwrap(),
        body.len().to_string()
    );
    assert_eq!(whole.headers()["x-function-status"], "200");
    assert_eq!(sha256(&whole.bytes().await.unwrap()), digest);

    let part = client
        .get(&result_url)
        .header("Range", "bytes=1000000-1999999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"].to_str().unwrap(),
        format!("bytes 1000000-1999999/{}", body.len())
    );
    assert_eq!(
        &part.bytes().await.unwrap()[..],
        &body[1_000_000..2_000_000]
    );

    // A small answer stays inline: no blob for it.
    let small = client
        .post(format!("{}/async-function/echo", server.url))
        .header("X-Callback-Url", receiver.url())
        .body("small")
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 202);
    let small_id = small.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(receiver.wait_for_count(2, DEADLINE).await);
    assert!(!has_result(dir.path(), &small_id));
    let small_result = client
        .get(format!("{}/async-calls/{small_id}/result", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(small_result.status(), 200);
    assert_eq!(small_result.bytes().await.unwrap(), "small");
    server.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_result_too_large_to_keep_reaches_the_callback_and_its_blob_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let function = StubFunction::start(StubBehavior {
        echo_body: true,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let args = [
        "--gateway-url",
        &function.url(),
        "--max-body-bytes",
        "16MiB",
        "--max-response-bytes",
        "12MiB",
        "--max-result-bytes",
        "1MiB",
    ];
    let server = Server::start(dir.path(), &args).await;
    let client = queue_worker::invoke::http_client("large-bodies-test").unwrap();
    let body = pattern(8 * MIB, 1);
    let response = client
        .post(format!("{}/async-function/echo", server.url))
        .header("X-Callback-Url", receiver.url())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let call_id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(receiver.wait_for_count(1, DEADLINE).await);
    assert_eq!(sha256(&receiver.callbacks()[0].body), sha256(&body));
    wait_until("the result blob nobody keeps is deleted", || {
        !has_result(dir.path(), &call_id)
    })
    .await;
    let result = client
        .get(format!("{}/async-calls/{call_id}/result", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 409);
    let error: serde_json::Value = serde_json::from_slice(&result.bytes().await.unwrap()).unwrap();
    assert_eq!(error["error"], "result_too_large", "{error}");

    // Larger than --max-response-bytes: a 502 outcome, nothing left stored.
    let huge = client
        .post(format!("{}/async-function/echo", server.url))
        .header("X-Callback-Url", receiver.url())
        .header("X-Max-Retries", "0")
        .body(pattern(16 * MIB, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 202);
    let huge_id = huge.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(receiver.wait_for_count(2, DEADLINE).await);
    let callbacks = receiver.callbacks();
    let last = callbacks
        .iter()
        .find(|c| header(&c.headers, "x-call-id") == Some(huge_id.as_str()))
        .unwrap();
    assert_eq!(header(&last.headers, "x-function-status"), Some("502"));
    assert_eq!(
        header(&last.headers, "x-function-error"),
        Some("response too large")
    );
    assert!(!has_result(dir.path(), &huge_id));
    server.kill9().await;
}
