//! NATS with TLS (certificates made in the test), a client certificate, user and password, a
//! token and credentials in the URL: the gateway and a worker connect and a call round-trips.
//! A wrong authority, a wrong password or missing credentials stop the gateway binary at start
//! with a message naming the cause, and no log line of a failed or a successful start holds
//! the password or the token.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, http};
use test_support::TestPki;
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

const PASSWORD: &str = "NATS-PASSWORD-5e1f9a";
const TOKEN: &str = "NATS-TOKEN-c0ffee42";

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A secret's file as an operator writes it: with a trailing newline.
fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    file
}

/// A server that requires TLS and, with `verify_clients`, a client certificate signed by the
/// test authority.
async fn tls_server(pki: &TestPki, verify_clients: bool) -> NatsServer {
    let (ca, cert, key) = (
        path(&pki.ca()),
        path(&pki.server_cert()),
        path(&pki.server_key()),
    );
    let mut args = vec!["--tls", "--tlscert", &cert, "--tlskey", &key];
    let mut probe = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(pki.ca());
    if verify_clients {
        args.extend(["--tlsverify", "--tlscacert", &ca]);
        probe = probe.add_client_certificate(pki.client_cert(), pki.client_key());
    }
    NatsServer::start_secured(&args, probe).await.unwrap()
}

async fn user_password_server() -> NatsServer {
    NatsServer::start_secured(
        &["--user", "alice", "--pass", PASSWORD],
        async_nats::ConnectOptions::with_user_and_password("alice".into(), PASSWORD.into()),
    )
    .await
    .unwrap()
}

/// A gateway and a worker with the same NATS flags; one call goes through and is called back.
async fn round_trip(nats_url: &str, nats_flags: &[&str]) {
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let gateway = Gateway::start(nats_url, nats_flags).await;
    let worker = Worker::start_with(nats_url, &function.url(), nats_flags);
    let response = http()
        .post(format!("{}/async-function/echo", gateway.url))
        .header("X-Callback-Url", receiver.url())
        .body("over a secured NATS")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(
        receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await,
        "no callback for {id}"
    );
    assert_eq!(function.requests()[0].body, "over a secured NATS");
    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_a_private_authority_and_a_client_certificate_round_trips() {
    let pki = TestPki::generate().unwrap();
    let nats = tls_server(&pki, true).await;
    let (ca, cert, key) = (
        path(&pki.ca()),
        path(&pki.client_cert()),
        path(&pki.client_key()),
    );
    round_trip(
        &nats.url(),
        &["--nats-ca", &ca, "--nats-cert", &cert, "--nats-key", &key],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_and_a_password_from_a_file_round_trip() {
    let pki = TestPki::generate().unwrap();
    let ca = path(&pki.ca());
    let nats = NatsServer::start_tls_with_password(&pki, "alice", PASSWORD)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = path(&secret_file(dir.path(), "password", PASSWORD));
    // A tls:// URL as well as --nats-ca: both say TLS.
    let url = nats.url().replace("nats://", "tls://");
    round_trip(
        &url,
        &[
            "--nats-ca",
            &ca,
            "--nats-user",
            "alice",
            "--nats-password-file",
            &password,
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_from_a_file_and_credentials_in_the_url_round_trip() {
    let nats = NatsServer::start_secured(
        &["--auth", TOKEN],
        async_nats::ConnectOptions::with_token(TOKEN.into()),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = path(&secret_file(dir.path(), "token", TOKEN));
    round_trip(&nats.url(), &["--nats-token-file", &token]).await;

    let nats = user_password_server().await;
    let url = nats
        .url()
        .replace("nats://", &format!("nats://alice:{PASSWORD}@"));
    round_trip(&url, &[]).await;
}

/// The gateway binary's log (stderr) and whether it exited, with `flags`, within `wait`.
struct Started {
    log: String,
    exit: Option<std::process::ExitStatus>,
}

/// Runs the gateway binary against `nats_url` until it exits or its `/readyz` answers 200
/// (then it is stopped with SIGTERM); returns its log.
async fn run_gateway_binary(nats_url: &str, flags: &[&str]) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("gateway.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gateway = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway-plugin"))
        .args([
            "--nats-url",
            nats_url,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(flags)
        .env("LOG_LEVEL", "debug")
        .env_remove("NATS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = http();
    let end = Instant::now() + DEADLINE;
    let exit = loop {
        if let Some(status) = gateway.try_wait().unwrap() {
            break Some(status);
        }
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            && r.status() == 200
        {
            let pid = gateway.id().unwrap().to_string();
            assert!(
                std::process::Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
            let status = tokio::time::timeout(DEADLINE, gateway.wait())
                .await
                .unwrap()
                .unwrap();
            assert!(status.success(), "gateway exited with {status} on SIGTERM");
            break None;
        }
        assert!(
            Instant::now() < end,
            "the gateway neither became ready nor exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Started {
        log: std::fs::read_to_string(&log_path).unwrap(),
        exit,
    }
}

fn assert_failed_with(started: &Started, causes: &[&str]) {
    let exit = started
        .exit
        .expect("the gateway started instead of failing");
    assert!(!exit.success(), "exit status {exit}");
    for cause in causes {
        assert!(
            started.log.contains(cause),
            "the error names {cause:?}; log:\n{}",
            started.log
        );
    }
}

fn assert_no_secret(started: &Started) {
    for secret in [PASSWORD, TOKEN] {
        assert!(
            !started.log.contains(secret),
            "the log holds a secret:\n{}",
            started.log
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_authority_fails_at_start_naming_the_certificate() {
    let pki = TestPki::generate().unwrap();
    let other = TestPki::generate().unwrap();
    let nats = tls_server(&pki, false).await;
    let wrong_ca = path(&other.ca());
    let started = run_gateway_binary(&nats.url(), &["--nats-ca", &wrong_ca]).await;
    assert_failed_with(
        &started,
        &["TLS handshake failed", "certificate", "--nats-ca"],
    );

    // No CA at all: the server's certificate is checked against the system's authorities,
    // which never signed it.
    let started = run_gateway_binary(&nats.url(), &[]).await;
    assert_failed_with(&started, &["TLS handshake failed"]);

    // The right authority, but the server verifies clients and none is presented.
    let nats = tls_server(&pki, true).await;
    let ca = path(&pki.ca());
    let started = run_gateway_binary(&nats.url(), &["--nats-ca", &ca]).await;
    assert_failed_with(&started, &["TLS handshake failed"]);

    // A file that holds no certificate is refused before any connection.
    let dir = tempfile::tempdir().unwrap();
    let junk = path(&secret_file(dir.path(), "junk.pem", "not a certificate"));
    let started = run_gateway_binary(&nats.url(), &["--nats-ca", &junk]).await;
    assert_failed_with(&started, &["--nats-ca (NATS_CA)", "no PEM certificate"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_password_fails_at_start_and_no_start_logs_a_secret() {
    let nats = user_password_server().await;
    let dir = tempfile::tempdir().unwrap();
    let wrong = path(&secret_file(dir.path(), "wrong", "NATS-PASSWORD-wrong-77"));
    let started = run_gateway_binary(
        &nats.url(),
        &["--nats-user", "alice", "--nats-password-file", &wrong],
    )
    .await;
    assert_failed_with(
        &started,
        &[
            "authorization violation",
            "refused the credentials given by --nats-user (NATS_USER) with --nats-password-file",
        ],
    );
    assert!(
        !started.log.contains("NATS-PASSWORD-wrong-77"),
        "{}",
        started.log
    );

    // Wrong credentials in the URL: refused, the URL logged without them.
    let url = nats
        .url()
        .replace("nats://", "nats://alice:NATS-PASSWORD-wrong-77@");
    let started = run_gateway_binary(&url, &[]).await;
    assert_failed_with(
        &started,
        &["refused the credentials given by user:password@ or token@ in --nats-url"],
    );
    assert!(
        !started.log.contains("NATS-PASSWORD-wrong-77"),
        "{}",
        started.log
    );

    // None at all.
    let started = run_gateway_binary(&nats.url(), &[]).await;
    assert_failed_with(&started, &["requires credentials and none are configured"]);

    // Two ways at once: refused by name, before connecting.
    let password = path(&secret_file(dir.path(), "password", PASSWORD));
    let token = path(&secret_file(dir.path(), "token", TOKEN));
    let started = run_gateway_binary(
        &nats.url(),
        &[
            "--nats-user",
            "alice",
            "--nats-password-file",
            &password,
            "--nats-token-file",
            &token,
        ],
    )
    .await;
    assert_failed_with(&started, &["NATS_USER", "NATS_TOKEN_FILE", "both set"]);
    assert_no_secret(&started);

    // The right password: the gateway starts, serves, stops; its debug log holds no secret.
    let started = run_gateway_binary(
        &nats.url(),
        &["--nats-user", "alice", "--nats-password-file", &password],
    )
    .await;
    assert!(
        started.exit.is_none(),
        "the gateway did not start:\n{}",
        started.log
    );
    assert!(started.log.contains("connected to NATS"), "{}", started.log);
    assert_no_secret(&started);
    // The token too.
    let nats = NatsServer::start_secured(
        &["--auth", TOKEN],
        async_nats::ConnectOptions::with_token(TOKEN.into()),
    )
    .await
    .unwrap();
    let started = run_gateway_binary(&nats.url(), &["--nats-token-file", &token]).await;
    assert!(
        started.exit.is_none(),
        "the gateway did not start:\n{}",
        started.log
    );
    assert_no_secret(&started);
}

/// A server whose configuration file lists one NKey user.
async fn nkey_server(dir: &Path, public_key: &str, seed: &str) -> NatsServer {
    let config = dir.join("nkey.conf");
    std::fs::write(
        &config,
        format!("authorization {{\n  users = [ {{ nkey: \"{public_key}\" }} ]\n}}\n"),
    )
    .unwrap();
    NatsServer::start_secured(
        &["-c", &path(&config)],
        async_nats::ConnectOptions::with_nkey(seed.to_owned()),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_nkey_seed_file_round_trips_and_a_stranger_nkey_or_bad_creds_fail_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (seed, public_key) = test_support::tls::nkey_user();
    let nats = nkey_server(dir.path(), &public_key, &seed).await;
    let seed_file = path(&secret_file(dir.path(), "user.nk", &seed));
    round_trip(&nats.url(), &["--nats-nkey", &seed_file]).await;

    // Another user's seed: refused by the server, at start, naming the setting.
    let (stranger, _) = test_support::tls::nkey_user();
    let stranger_file = path(&secret_file(dir.path(), "stranger.nk", &stranger));
    let started = run_gateway_binary(&nats.url(), &["--nats-nkey", &stranger_file]).await;
    assert_failed_with(
        &started,
        &["authorization violation", "--nats-nkey (NATS_NKEY)"],
    );
    assert!(!started.log.contains(&stranger), "{}", started.log);
    assert!(!started.log.contains(&seed), "{}", started.log);

    // A .creds file that holds no credentials: refused before connecting, naming it.
    let creds = path(&secret_file(dir.path(), "user.creds", "not a creds file"));
    let started = run_gateway_binary(&nats.url(), &["--nats-creds", &creds]).await;
    assert_failed_with(&started, &["--nats-creds (NATS_CREDS)", "credentials file"]);
}
