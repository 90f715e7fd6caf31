//! Encryption at rest, end to end on JetStream: with `--encryption-keys-file` on the gateway and
//! the worker, no byte of a call's headers, body or result reaches the JetStream store, the
//! records bucket or the worker's sled state in clear (and without keys the same search finds
//! them, so the search can fail); calls queued under an old key complete after a rotation; a
//! call sealed with a key the worker lacks is dead-lettered `undecryptable`, not retried, and
//! runs once replayed with the key in place.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, http};
use queue_core::message::EnvelopeSummary;
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

const K1: &str = "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "k2 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

fn keys_file(dir: &Path, name: &str, lines: &[&str]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.display().to_string()
}

fn echo_with_marker(marker: &str) -> StubBehavior {
    StubBehavior {
        response_headers: vec![("x-result-marker".into(), marker.into())],
        ..StubBehavior::default()
    }
}

async fn submit(
    client: &reqwest::Client,
    gateway: &str,
    callback: &str,
    body: String,
    header: &str,
) -> String {
    let r = client
        .post(format!("{gateway}/async-function/echo"))
        .header("X-Callback-Url", callback)
        .header("X-Input-Marker", header)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.headers()["x-call-id"].to_str().unwrap().to_owned()
}

async fn wait_for_state(client: &reqwest::Client, gateway: &str, id: &str, want: &str) {
    let end = Instant::now() + DEADLINE;
    loop {
        let r = client
            .get(format!("{gateway}/async-calls/{id}"))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            let record: serde_json::Value = r
                .bytes()
                .await
                .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap())
                .unwrap();
            if record["state"] == want {
                return;
            }
        }
        assert!(Instant::now() < end, "call {id} never reached {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The key id each queued message of the calls stream is sealed with (`None`: in clear).
async fn queued_key_ids(nats_url: &str) -> Vec<Option<String>> {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("faas-async").await.unwrap();
    let mut ids = Vec::new();
    let info = stream.get_info().await.unwrap();
    for sequence in info.state.first_sequence..=info.state.last_sequence {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            ids.push(EnvelopeSummary::of(&message.payload).unwrap().key_id);
        }
    }
    ids
}

/// Runs calls with unique markers through gateway and worker, then searches every store.
/// Returns the files that hold a marker.
async fn run_and_search(keys: Option<&str>, tag: &str) -> Vec<String> {
    let nats = NatsServer::start().await.unwrap();
    let result_marker = format!("RESULT-MARKER-{tag}-5e1b");
    let body_marker = format!("BODY-MARKER-{tag}-7f3a");
    let header_marker = format!("HEADER-MARKER-{tag}-9c1d");
    let function = StubFunction::start(echo_with_marker(&result_marker))
        .await
        .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let failing = CallbackReceiver::start().await.unwrap();
    failing.set_status(500);
    let extra: Vec<&str> = keys.map_or(Vec::new(), |k| vec!["--encryption-keys-file", k]);
    let gateway = Gateway::start(&nats.url(), &extra).await;
    let mut worker_extra = extra.clone();
    worker_extra.extend(["--callback-max-attempts", "1"]);
    let worker = Worker::start_with(&nats.url(), &function.url(), &worker_extra);
    let client = http();

    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            submit(
                &client,
                &gateway.url,
                &receiver.url(),
                format!("{body_marker} {i}"),
                &header_marker,
            )
            .await,
        );
    }
    // One call whose callback fails: it ends in the dead letters, with its envelope.
    let dead = submit(
        &client,
        &gateway.url,
        &failing.url(),
        format!("{body_marker} dead"),
        &header_marker,
    )
    .await;
    assert!(receiver.wait_for_call_ids(&ids, DEADLINE).await);
    for callback in receiver.callbacks() {
        let body = String::from_utf8_lossy(&callback.body).into_owned();
        assert!(body.starts_with(&body_marker), "the worker opened the call");
    }
    for id in &ids {
        wait_for_state(&client, &gateway.url, id, "succeeded").await;
        let r = client
            .get(format!("{}/async-calls/{id}/result", gateway.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the gateway opens the kept result");
        assert!(String::from_utf8_lossy(&r.bytes().await.unwrap()).starts_with(&body_marker));
    }
    wait_for_state(&client, &gateway.url, &dead, "dead_lettered").await;
    let r = client
        .get(format!("{}/system/async/dead-letters", gateway.url))
        .send()
        .await
        .unwrap();
    let letters: serde_json::Value = r
        .bytes()
        .await
        .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap())
        .unwrap();
    let listed = letters.to_string();
    assert!(
        listed.contains(&dead),
        "the dead letter is listed by its call id without opening it: {listed}"
    );

    let state = worker.shutdown().await;
    gateway.shutdown().await;
    let mut nats = nats;
    nats.stop().await;
    let mut found = Vec::new();
    for marker in [&result_marker, &body_marker, &header_marker] {
        found.extend(test_support::files_containing(nats.store_dir(), marker));
        found.extend(test_support::files_containing(state.path(), marker));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_call_data_reaches_the_stores_in_clear_with_keys() {
    let dir = tempfile::tempdir().unwrap();
    let keys = keys_file(dir.path(), "keys", &["# current first", K1]);
    let sealed = run_and_search(Some(&keys), "sealed").await;
    assert!(
        sealed.is_empty(),
        "call data in clear with encryption on: {sealed:?}"
    );
    // The control: the same run without keys leaves the markers where the search looks.
    let clear = run_and_search(None, "clear").await;
    assert!(
        clear.iter().any(|f| f.contains("jetstream")),
        "without keys the markers are in the JetStream store: {clear:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_queued_under_the_old_key_complete_after_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let old = keys_file(dir.path(), "old", &[K1]);
    let rotated = keys_file(dir.path(), "rotated", &[K2, K1]);
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(echo_with_marker("r")).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let client = http();

    // Queued under k1 with no worker running.
    let gateway = Gateway::start(&nats.url(), &["--encryption-keys-file", &old]).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            submit(
                &client,
                &gateway.url,
                &receiver.url(),
                format!("old {i}"),
                "h",
            )
            .await,
        );
    }
    gateway.shutdown().await;
    // The gateway restarted with k2 current: new calls are sealed with k2.
    let gateway = Gateway::start(&nats.url(), &["--encryption-keys-file", &rotated]).await;
    for i in 0..3 {
        ids.push(
            submit(
                &client,
                &gateway.url,
                &receiver.url(),
                format!("new {i}"),
                "h",
            )
            .await,
        );
    }
    let key_ids = queued_key_ids(&nats.url()).await;
    assert_eq!(
        key_ids,
        [
            Some("k1"),
            Some("k1"),
            Some("k1"),
            Some("k2"),
            Some("k2"),
            Some("k2")
        ]
        .map(|k| k.map(str::to_owned))
    );
    let worker = Worker::start_with(
        &nats.url(),
        &function.url(),
        &["--encryption-keys-file", &rotated],
    );
    assert!(receiver.wait_for_call_ids(&ids, DEADLINE).await);
    for id in &ids {
        wait_for_state(&client, &gateway.url, id, "succeeded").await;
        let r = client
            .get(format!("{}/async-calls/{id}/result", gateway.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(function.count(), 6, "each call ran once");
    worker.shutdown().await;
    gateway.shutdown().await;
    // A gateway that lacks k2 (the results' key) says so: 500, not a passing outage.
    let stale = Gateway::start(&nats.url(), &["--encryption-keys-file", &old]).await;
    let r = client
        .get(format!("{}/async-calls/{}/result", stale.url, ids[0]))
        .send()
        .await
        .unwrap();
    common::assert_json_error(r, 500, "result_undecryptable").await;
    stale.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_the_worker_cannot_open_is_dead_lettered_and_runs_once_replayed_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let gateway_keys = keys_file(dir.path(), "gateway", &[K2]);
    let other_keys = keys_file(dir.path(), "other", &[K1]);
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(echo_with_marker("r")).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let client = http();
    let gateway = Gateway::start(&nats.url(), &["--encryption-keys-file", &gateway_keys]).await;
    // A worker with the wrong key, then one with none: both dead-letter, neither invokes.
    for worker_keys in [Some(other_keys.as_str()), None] {
        let extra: Vec<&str> =
            worker_keys.map_or(Vec::new(), |k| vec!["--encryption-keys-file", k]);
        let worker = Worker::start_with(&nats.url(), &function.url(), &extra);
        let id = submit(&client, &gateway.url, &receiver.url(), "body".into(), "h").await;
        wait_for_state(&client, &gateway.url, &id, "dead_lettered").await;
        let record: serde_json::Value = client
            .get(format!("{}/async-calls/{id}", gateway.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap())
            .unwrap();
        assert_eq!(record["dead_letter_reason"], "undecryptable", "{record}");
        let letter: serde_json::Value = client
            .get(format!(
                "{}/system/async/dead-letters/call/{id}",
                gateway.url
            ))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap())
            .unwrap();
        let shown = letter.to_string();
        assert!(shown.contains("undecryptable"), "{shown}");
        let detail = letter["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("key id \"k2\""),
            "the detail names the key id: {shown}"
        );
        assert!(!shown.contains("ICEiIyQl"), "never the key: {shown}");
        worker.shutdown().await;
    }
    assert_eq!(function.count(), 0, "nothing undecryptable was invoked");
    // With the key in place, a replay runs both, once each.
    let worker = Worker::start_with(
        &nats.url(),
        &function.url(),
        &["--encryption-keys-file", &gateway_keys],
    );
    let r = client
        .post(format!("{}/system/async/dead-letters/replay", gateway.url))
        .header("content-type", "application/json")
        .body(r#"{"all": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(receiver.wait_for_count(2, DEADLINE).await);
    assert_eq!(function.count(), 2);
    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_keys_file_stops_the_gateway_at_start_without_showing_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let short = keys_file(dir.path(), "short", &["k1 c2hvcnQta2V5LW1hdGVyaWFs"]);
    let nats = NatsServer::start().await.unwrap();
    for (file, expected) in [
        (short.as_str(), "line 1"),
        ("/nonexistent/keys", "cannot read the encryption keys file"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway-plugin"))
            .args([
                "--nats-url",
                &nats.url(),
                "--listen",
                "127.0.0.1:0",
                "--encryption-keys-file",
                file,
            ])
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("c2hvcnQta2V5"), "{stderr}");
    }
}
