//! Signed callbacks (issue 12, acceptance 2), verified by an independent implementation: the
//! Python `standardwebhooks` package (PyPI, pinned in `scripts/install-tools.sh`). Two secrets
//! configured: both verify; a retried callback keeps its `webhook-id`; after a rotation (the old
//! secret removed from the file, re-read without a restart) only the new one verifies; a
//! tampered body fails; a broken file keeps the secrets in use; no secret is ever logged.
//! Real worker process, nats-server, stub function and receiver.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::{DEADLINE, Fixture, call, signal};
use test_support::stub::{RecordedCallback, StubBehavior};

/// `whsec_` and 32 random bytes, and the base64 part alone (to look for in the logs).
fn new_secret() -> (String, String) {
    let mut raw = uuid::Uuid::new_v4().as_bytes().to_vec();
    raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    let encoded = STANDARD.encode(&raw);
    (format!("whsec_{encoded}"), encoded)
}

const VERIFIER: &str = r#"
import json, sys
from standardwebhooks import Webhook, WebhookVerificationError
case = json.load(sys.stdin)
results = []
for secret, tamper in case["checks"]:
    body = case["body"] + ("!" if tamper else "")
    try:
        Webhook(secret).verify(body, case["headers"], json_parse=False)
        results.append(True)
    except WebhookVerificationError:
        results.append(False)
print(json.dumps(results))
"#;

/// Runs the Python verifier on `callback` for each `(secret, tamper the body)`; one bool each.
fn verify(callback: &RecordedCallback, checks: &[(&str, bool)]) -> Vec<bool> {
    let python = test_support::tools_python().expect("the test tools' Python");
    let headers: serde_json::Map<String, serde_json::Value> = callback
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let case = serde_json::json!({
        "body": std::str::from_utf8(&callback.body).unwrap(),
        "headers": headers,
        "checks": checks,
    });
    let mut child = std::process::Command::new(python)
        .args(["-c", VERIFIER])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(case.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the verifier failed (is standardwebhooks installed? ./scripts/install-tools.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The last callback received for `id` (all of them are removed from the receiver).
fn take_for(f: &Fixture, id: &str) -> RecordedCallback {
    f.receiver
        .take_callbacks()
        .into_iter()
        .rev()
        .find(|c| c.header("x-call-id") == Some(id))
        .unwrap()
}

fn signatures(callback: &RecordedCallback) -> usize {
    callback
        .header("webhook-signature")
        .map_or(0, |s| s.split(' ').count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callbacks_are_signed_verifiably_across_a_rotation_and_no_secret_is_logged() {
    let f = Fixture::start(StubBehavior::default()).await;
    let (old, old_b64) = new_secret();
    let (new, new_b64) = new_secret();
    let (stranger, _) = new_secret();
    let (broken, broken_b64) = new_secret();
    let secrets = f.dir.path().join("callback-secrets");
    std::fs::write(&secrets, format!("# current\n{old}\n{new}\n")).unwrap();
    let log = f.log("worker.log");
    let mut args = f.worker_args("state", &[]);
    args.extend([
        "--callback-signing-secrets-file".to_owned(),
        secrets.display().to_string(),
    ]);
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .args(&args)
        .env("LOG_LEVEL", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Two secrets: both verify; a retry of the callback keeps its webhook-id.
    f.receiver.set_status(503);
    let id = f
        .queue
        .publish(&call(
            "signed",
            Some(&f.receiver.url()),
            "résultat ✓ 42".as_bytes(),
        ))
        .await;
    assert!(f.receiver.wait_for_count(1, DEADLINE).await);
    f.receiver.set_status(200);
    assert!(
        f.queue.wait_until_empty().await,
        "the callback was never delivered"
    );
    let tries = f.receiver.take_callbacks();
    assert!(tries.len() >= 2, "the callback was retried");
    for callback in &tries {
        assert_eq!(callback.header("webhook-id"), Some(id.as_str()));
        assert_eq!(
            callback.header("x-call-id"),
            Some(id.as_str()),
            "OpenFaaS headers stay"
        );
        assert!(callback.header("x-function-status").is_some());
        let ts: u64 = callback
            .header("webhook-timestamp")
            .unwrap()
            .parse()
            .unwrap();
        let now = queue_worker::signing::unix_seconds_now();
        assert!(ts <= now && now - ts < 300, "timestamp {ts}, now {now}");
        assert_eq!(signatures(callback), 2);
        assert_eq!(
            verify(
                callback,
                &[
                    (&old, false),
                    (&new, false),
                    (&old, true),
                    (&new, true),
                    (&stranger, false)
                ]
            ),
            [true, true, false, false, false],
            "old and new verify; a tampered body or another secret does not"
        );
    }

    // Rotation: the old secret removed from the file; the worker re-reads it, no restart.
    std::fs::write(&secrets, format!("{new}\n")).unwrap();
    let end = Instant::now() + DEADLINE;
    let rotated = loop {
        let id = f.publish("signed", b"after the rotation").await;
        assert!(
            f.receiver
                .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
                .await
        );
        let callback = take_for(&f, &id);
        if signatures(&callback) == 1 {
            break callback;
        }
        assert!(Instant::now() < end, "the secrets file was never re-read");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        verify(&rotated, &[(&new, false), (&old, false), (&new, true)]),
        [true, false, false],
        "after the rotation only the new secret verifies"
    );

    // A broken file (a secret with garbage) is reported and the secrets in use stay.
    std::fs::write(&secrets, format!("{new}\n{broken}!!\n")).unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        let id = f.publish("signed", b"while the file is broken").await;
        assert!(
            f.receiver
                .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
                .await
        );
        let callback = take_for(&f, &id);
        assert_eq!(verify(&callback, &[(&new, false)]), [true]);
        if std::fs::read_to_string(&log)
            .unwrap()
            .contains("callback signing secrets file not re-read")
        {
            break;
        }
        assert!(Instant::now() < end, "the broken file was never reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    signal(&worker, "TERM");
    worker.wait().await.unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("line 2"),
        "the warning names the line: {logs}"
    );
    for secret in [&old, &new, &broken, &old_b64, &new_b64, &broken_b64] {
        assert!(
            !logs.contains(secret.as_str()) && !logs.contains(&secret[..12]),
            "a secret leaked into the worker logs:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_secrets_file_stops_the_worker_at_start_without_showing_it() {
    let f = Fixture::start(StubBehavior::default()).await;
    let (secret, _) = new_secret();
    let secrets = f.dir.path().join("callback-secrets");
    std::fs::write(&secrets, format!("{}\n", &secret["whsec_".len()..])).unwrap();
    let mut args = f.worker_args("state", &[]);
    args.extend([
        "--callback-signing-secrets-file".to_owned(),
        secrets.display().to_string(),
    ]);
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
    assert!(stderr.contains("line 1"), "{stderr}");
    assert!(!stderr.contains(&secret[6..18]), "{stderr}");
}
