//! Signed callbacks (issue 12, acceptance 2), verified by an independent implementation: the
//! Python `standardwebhooks` package (PyPI, pinned in `scripts/install-tools.sh`). Two secrets
//! configured: both verify; a retried callback keeps its `webhook-id`; after a rotation (the old
//! secret removed from the file, re-read without a restart) only the new one verifies; a
//! tampered body fails; a broken file keeps the secrets in use; no secret is ever logged.
//! Asymmetric `v1a` (Ed25519) signatures verified by Python's `cryptography`: two private keys
//! configured beside a secret, each signature verifies with its public key alone (derived by
//! Python and by `queue-worker signing-public-keys`, which agree), a tampered body or another
//! key fails. Real worker process, nats-server, stub function and receiver.
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

/// Ed25519 with Python's `cryptography` (an implementation independent of the worker's):
/// `derive` turns seeds into the 64-byte `whsk_` form and the `whpk_` public key; `verify`
/// checks every `v1a` signature of the headers against each `(public key, tamper the body)`,
/// true if one of them verifies over `"{webhook-id}.{webhook-timestamp}.{body}"`.
const ED25519: &str = r#"
import base64, json, sys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
case = json.load(sys.stdin)
raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
if case["mode"] == "derive":
    out = []
    for seed in case["seeds"]:
        seed = base64.b64decode(seed)
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(*raw)
        out.append(["whsk_" + base64.b64encode(seed + public).decode(),
                    "whpk_" + base64.b64encode(public).decode()])
    print(json.dumps(out))
else:
    h = {k.lower(): v for k, v in case["headers"].items()}
    sigs = [base64.b64decode(s[4:]) for s in h["webhook-signature"].split(" ") if s.startswith("v1a,")]
    results = []
    for public, tamper in case["checks"]:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public.removeprefix("whpk_")))
        body = case["body"] + ("!" if tamper else "")
        signed = f'{h["webhook-id"]}.{h["webhook-timestamp"]}.{body}'.encode()
        ok = False
        for sig in sigs:
            try:
                key.verify(sig, signed)
                ok = True
            except InvalidSignature:
                pass
        results.append(ok)
    print(json.dumps(results))
"#;

/// The callback's headers and body as the Python scripts take them.
fn case_of(callback: &RecordedCallback) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = callback
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "body": std::str::from_utf8(&callback.body).unwrap(),
        "headers": headers,
    })
}

/// Runs the Python verifier on `callback` for each `(secret, tamper the body)`; one bool each.
fn verify(callback: &RecordedCallback, checks: &[(&str, bool)]) -> Vec<bool> {
    let mut case = case_of(callback);
    case["checks"] = serde_json::json!(checks);
    serde_json::from_value(python(VERIFIER, &case)).unwrap()
}

/// Runs `script` with the test tools' Python, `case` as JSON on its standard input; its
/// standard output as JSON.
fn python(script: &str, case: &serde_json::Value) -> serde_json::Value {
    let python = test_support::tools_python().expect("the test tools' Python");
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
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
        "the Python check failed (are standardwebhooks and cryptography installed? ./scripts/install-tools.sh): {}",
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

/// 32 random bytes, base64.
fn new_seed() -> String {
    let mut raw = uuid::Uuid::new_v4().as_bytes().to_vec();
    raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    STANDARD.encode(&raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ed25519_signatures_verify_with_the_public_keys_alone() {
    let f = Fixture::start(StubBehavior::default()).await;
    let seeds = [new_seed(), new_seed(), new_seed()];
    // Python derives the 64-byte private keys and the public keys from the seeds.
    let derived: Vec<(String, String)> = serde_json::from_value(python(
        ED25519,
        &serde_json::json!({"mode": "derive", "seeds": seeds}),
    ))
    .unwrap();
    let [
        (first_private, first_public),
        (_, second_public),
        (_, stranger_public),
    ] = <[_; 3]>::try_from(derived).unwrap();
    // Both forms of a key: seed and public key (what Standard Webhooks tools print), and the
    // seed alone (what openssl gives).
    let second_private = format!("whsk_{}", seeds[1]);
    let keys = f.dir.path().join("callback-keys");
    std::fs::write(
        &keys,
        format!("# two keys: rotation\n{first_private}\n\n{second_private}\n"),
    )
    .unwrap();
    let (secret, _) = new_secret();
    let secrets = f.dir.path().join("callback-secrets");
    std::fs::write(&secrets, format!("{secret}\n")).unwrap();

    // What an operator gives receivers: the subcommand agrees with Python.
    let printed = std::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .args(["signing-public-keys", &keys.display().to_string()])
        .env_remove("CALLBACK_SIGNING_KEYS_FILE")
        .output()
        .unwrap();
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let printed = String::from_utf8(printed.stdout).unwrap();
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        [first_public.as_str(), second_public.as_str()]
    );
    for private in [&first_private, &second_private] {
        assert!(!printed.contains(&private[5..20]), "a private key printed");
    }
    // The same from the setting's variable.
    let from_env = std::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .arg("signing-public-keys")
        .env("CALLBACK_SIGNING_KEYS_FILE", &keys)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(from_env.stdout).unwrap(), printed);

    let log = f.log("worker.log");
    let mut args = f.worker_args("state", &[]);
    args.extend([
        "--callback-signing-secrets-file".to_owned(),
        secrets.display().to_string(),
        "--callback-signing-keys-file".to_owned(),
        keys.display().to_string(),
    ]);
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .args(&args)
        .env("LOG_LEVEL", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let id = f.publish("signed", "résultat ✓ v1a".as_bytes()).await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    let callback = take_for(&f, &id);
    let header = callback.header("webhook-signature").unwrap().to_owned();
    let kinds: Vec<&str> = header
        .split(' ')
        .map(|s| s.split(',').next().unwrap())
        .collect();
    assert_eq!(kinds, ["v1", "v1a", "v1a"], "{header}");
    for entry in header.split(' ').filter(|s| s.starts_with("v1a,")) {
        assert_eq!(STANDARD.decode(&entry[4..]).unwrap().len(), 64, "{entry}");
    }
    let mut case = case_of(&callback);
    case["mode"] = "verify".into();
    case["checks"] = serde_json::json!([
        (&first_public, false),
        (&second_public, false),
        (&first_public, true),
        (&second_public, true),
        (&stranger_public, false),
    ]);
    let results: Vec<bool> = serde_json::from_value(python(ED25519, &case)).unwrap();
    assert_eq!(
        results,
        [true, true, false, false, false],
        "each key's signature verifies with its public key; a tampered body or another key does not"
    );
    // The symmetric signature in the same header still verifies with standardwebhooks.
    assert_eq!(verify(&callback, &[(&secret, false)]), [true]);

    signal(&worker, "TERM");
    worker.wait().await.unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    for private in [&first_private, &second_private] {
        assert!(
            !logs.contains(&private[5..20]),
            "a private key leaked into the worker logs:\n{logs}"
        );
    }
    for seed in &seeds[..2] {
        assert!(!logs.contains(&seed[..16]), "a seed leaked:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_keys_file_stops_the_worker_at_start_without_showing_it() {
    let f = Fixture::start(StubBehavior::default()).await;
    let seed = new_seed();
    let keys = f.dir.path().join("callback-keys");
    // A public key where a private key belongs.
    std::fs::write(&keys, format!("whsk_{seed}\nwhpk_{seed}\n")).unwrap();
    let mut args = f.worker_args("state", &[]);
    args.extend([
        "--callback-signing-keys-file".to_owned(),
        keys.display().to_string(),
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
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("callback signing keys file"), "{stderr}");
    assert!(!stderr.contains(&seed[..16]), "{stderr}");
}

/// A response above `--inline-response-bytes` goes to the blob store (the worker creates the
/// bucket, no gateway here) and its callback is streamed from there: the `v1` signature is
/// computed over a first read of the blob, the `v1a` one over the whole message; both verify
/// with the independent implementations, a tampered body does not, and the blob of a result
/// too large to keep is deleted once the callback is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_result_sent_from_the_blob_store_is_signed_verifiably() {
    const LEN: usize = 3 * 1024 * 1024;
    let f = Fixture::start(StubBehavior {
        response_bytes: Some(LEN),
        ..StubBehavior::default()
    })
    .await;
    let seed = new_seed();
    let derived: Vec<(String, String)> = serde_json::from_value(python(
        ED25519,
        &serde_json::json!({"mode": "derive", "seeds": [seed]}),
    ))
    .unwrap();
    let (private, public) = derived.into_iter().next().unwrap();
    let keys = f.dir.path().join("callback-keys");
    std::fs::write(&keys, format!("{private}\n")).unwrap();
    let (secret, _) = new_secret();
    let secrets = f.dir.path().join("callback-secrets");
    std::fs::write(&secrets, format!("{secret}\n")).unwrap();
    let log = f.log("worker.log");
    let mut args = f.worker_args("state", &["--inline-response-bytes", "64KiB"]);
    args.extend([
        "--callback-signing-secrets-file".to_owned(),
        secrets.display().to_string(),
        "--callback-signing-keys-file".to_owned(),
        keys.display().to_string(),
    ]);
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .args(&args)
        .env("LOG_LEVEL", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let id = f.publish("large", b"make it big").await;
    assert!(
        f.receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await
    );
    let callback = take_for(&f, &id);
    assert_eq!(callback.body.len(), LEN);
    assert!(
        callback.body.iter().all(|&b| b == b'r'),
        "the function's body"
    );
    assert_eq!(callback.header("x-function-status"), Some("200"));
    assert_eq!(
        verify(&callback, &[(&secret, false), (&secret, true)]),
        [true, false]
    );
    let mut case = case_of(&callback);
    case["mode"] = "verify".into();
    case["checks"] = serde_json::json!([(&public, false), (&public, true)]);
    let results: Vec<bool> = serde_json::from_value(python(ED25519, &case)).unwrap();
    assert_eq!(results, [true, false]);

    // Above the default --max-result-bytes (512KiB): not kept, so its blob goes.
    let js = f.queue.js.clone();
    let end = Instant::now() + DEADLINE;
    loop {
        let blobs = queue_core::blobs::jetstream::JetStreamBlobs::open(
            &js,
            &f.queue.args.stream,
            queue_core::sealing::Sealing::off(),
        )
        .await
        .expect("the worker created the blob bucket");
        let listed = queue_core::blobs::BlobStore::list(&blobs).await.unwrap();
        if listed.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "the result blob stayed: {listed:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(&worker, "TERM");
    worker.wait().await.unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("rrrrrrrr"), "no body in the logs");
    assert!(!logged.contains(&secret[6..]), "no secret in the logs");
}
