//! The all-in-one server on a NATS server that requires TLS (a private authority made in the
//! test) and a password: a call round-trips; a wrong password stops it at start, naming the
//! cause, and no log line holds the password.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use test_support::nats_server::NatsServer;
use test_support::{CallbackReceiver, StubBehavior, StubFunction, TestPki};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const DEADLINE: Duration = Duration::from_secs(60);
const PASSWORD: &str = "NATS-PASSWORD-a11in0ne";

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn faas_async(dir: &Path, args: &[&str], log: &Path) -> tokio::process::Child {
    Command::new(env!("CARGO_BIN_EXE_faas-async"))
        .current_dir(dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--state-dir", &path(&dir.join("state"))])
        .args(args)
        .env_remove("NATS_URL")
        .env_remove("FAAS_ASYNC_QUEUE")
        .env("LOG_LEVEL", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_all_in_one_server_works_over_tls_with_a_password_and_refuses_a_wrong_one() {
    let pki = TestPki::generate().unwrap();
    let ca = path(&pki.ca());
    let nats = NatsServer::start_tls_with_password(&pki, "alice", PASSWORD)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "NATS-PASSWORD-wrong-4b\n").unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    let url = nats.url();
    let flags = |password: &Path| {
        vec![
            "--nats-url".to_owned(),
            url.clone(),
            "--gateway-url".to_owned(),
            function.url(),
            "--nats-ca".to_owned(),
            ca.clone(),
            "--nats-user".to_owned(),
            "alice".to_owned(),
            "--nats-password-file".to_owned(),
            path(password),
        ]
    };

    // A wrong password: exits at start with the cause.
    let log = dir.path().join("wrong.log");
    let args = flags(&wrong);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = faas_async(dir.path(), &args, &log);
    let status = tokio::time::timeout(DEADLINE, server.wait())
        .await
        .expect("faas-async kept running with a wrong password")
        .unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("authorization violation") && text.contains("--nats-password-file"),
        "{text}"
    );
    assert!(!text.contains("NATS-PASSWORD-wrong-4b"), "{text}");

    // The right one: the banner, then a call through gateway, JetStream and worker.
    let log = dir.path().join("faas-async.log");
    let args = flags(&password);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = faas_async(dir.path(), &args, &log);
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let base = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("faas-async listening on ") {
                return url.to_owned();
            }
        }
        panic!(
            "faas-async exited before listening:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
    })
    .await
    .expect("faas-async did not print where it listens");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    // The banner comes once the front listens; calls are taken once the streams are set up.
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        let ready = reqwest::Client::new()
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "faas-async never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = reqwest::Client::new()
        .post(format!("{base}/async-function/echo"))
        .header("X-Callback-Url", receiver.url())
        .body("all in one, over TLS")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let id = response.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(
        receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await,
        "no callback for {id}"
    );
    let pid = server.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(DEADLINE, server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(PASSWORD), "{text}");
}
