//! The dashboard in a real browser: headless Chromium loads `/dashboard/` from the real
//! `faas-async` binary after known traffic (successes, dead letters, a paused function, a
//! scheduled call; the worker's announced limits) and the
//! test asserts on the page the browser built. It also takes the screenshot used in the docs
//! (written to `$DASHBOARD_SCREENSHOT` when set).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);

/// Chromium from `CHROMIUM_BIN` (set by `test.sh` through `scripts/install-browser.sh`) or the
/// Debian path. Missing is a failure, not a skip.
fn chromium() -> PathBuf {
    let path =
        std::env::var_os("CHROMIUM_BIN").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from);
    assert!(
        path.exists(),
        "Chromium not found at {}: run scripts/install-browser.sh (test.sh does)",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `extra` flags and returns its stdout.
async fn browse(url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        DEADLINE,
        Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished")
    .unwrap();
    assert!(out.status.success(), "chromium failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn start(
    program: &str,
    args: &[&str],
    dir: &std::path::Path,
    banner: &str,
) -> (Child, String) {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env_remove("NATS_URL")
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = tokio::time::timeout(DEADLINE, async {
        loop {
            let line = tokio::select! {
                l = out.next_line() => l.unwrap(),
                l = err.next_line() => l.unwrap(),
            };
            let line = line.expect("exited before printing where it listens");
            if let Some(url) = line.strip_prefix(banner) {
                return url.to_owned();
            }
        }
    })
    .await
    .unwrap();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                l = out.next_line() => if !matches!(l, Ok(Some(_))) { break },
                l = err.next_line() => if !matches!(l, Ok(Some(_))) { break },
            }
        }
    });
    (child, url)
}

async fn get_json(client: &reqwest::Client, url: String) -> Value {
    serde_json::from_slice(&client.get(url).send().await.unwrap().bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_functions_failures_dead_letters_pauses_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (_function, function_url) = start(
        env!("CARGO_BIN_EXE_stats-function"),
        &["--listen", "127.0.0.1:0"],
        dir.path(),
        "stats-function listening on ",
    )
    .await;
    // Bad input (400) is made retryable with one attempt, so it ends as a dead letter.
    let (_server, url) = start(
        env!("CARGO_BIN_EXE_faas-async"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--gateway-url",
            &function_url,
            "--retry-codes",
            "400",
            "--retry-max-attempts",
            "1",
            "--status-interval",
            "200ms",
        ],
        dir.path(),
        "faas-async listening on ",
    )
    .await;
    let client = queue_worker::invoke::http_client("dashboard-test").unwrap();
    let call_with = async |function: &str, body: &str, delay: Option<&str>| {
        let mut request = client
            .post(format!("{url}/async-function/{function}"))
            .body(body.to_owned());
        if let Some(delay) = delay {
            request = request.header("X-Delay", delay);
        }
        assert_eq!(request.send().await.unwrap().status(), 202);
    };
    let call = async |function: &str, body: &str| call_with(function, body, None).await;
    for body in ["[1, 2]", "[3]", "4 5", "6", "[7, 8, 9]"] {
        call("stats", body).await;
    }
    call("stats", "not numbers").await;
    call("stats", "nor this").await;
    let paused = client
        .post(format!("{url}/system/async/functions/reports/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status(), 200);
    call("reports", "[1]").await;
    // Scheduled for later: counted apart from the queue.
    call_with("stats", "[10]", Some("1h")).await;

    let end = Instant::now() + DEADLINE;
    loop {
        let stats = get_json(&client, format!("{url}/system/async/stats")).await;
        let queue = get_json(&client, format!("{url}/system/async/queue")).await;
        let limit = |function: &str| {
            (queue["functions"].as_array().unwrap().iter())
                .find(|f| f["function"] == function)
                .map(|f| f["concurrency"]["limit"].clone())
        };
        if stats["functions"][0]["completed"] == 7
            && queue["dead_letters"] == 2
            && queue["unacked"] == 1
            && queue["scheduled"] == 1
            && limit("stats") == Some(50.into())
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "traffic did not settle: {stats} {queue}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let dom = browse(&format!("{url}/dashboard/"), &["--dump-dom"]).await;
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page loaded its data:\n{dom}"
    );
    let row = |function: &str| -> String {
        let start = dom
            .find(&format!(r#"data-function="{function}""#))
            .unwrap_or_else(|| panic!("no row for {function}:\n{dom}"));
        let end = dom[start..].find("</tr>").unwrap() + start;
        dom[start..end].to_owned()
    };
    let stats_row = row("stats");
    assert!(
        stats_row.contains(r#"data-field="completed">7<"#),
        "{stats_row}"
    );
    assert!(stats_row.contains("28.6 %"), "2 of 7 failed: {stats_row}");
    assert!(stats_row.contains(">running<"), "{stats_row}");
    assert!(
        stats_row.contains(r#"data-field="scheduled">1<"#),
        "one scheduled call: {stats_row}"
    );
    assert!(
        stats_row.contains(r#"data-field="limit">50 / 50<"#),
        "the worker's limit of 50 (its --max-inflight): {stats_row}"
    );
    assert!(
        dom.contains(r#"id="scheduled">1<"#),
        "the scheduled card says 1"
    );
    assert_eq!(dom.matches("data-worker=").count(), 1, "one worker listed");
    assert!(
        dom.contains(r#"<section id="lanes-section" hidden="">"#),
        "no lanes in the embedded queue:\n{dom}"
    );
    let reports_row = row("reports");
    assert!(reports_row.contains(">paused<"), "{reports_row}");
    assert_eq!(
        dom.matches("data-sequence=").count(),
        2,
        "two dead letters listed"
    );
    assert_eq!(
        dom.matches(">Replay<").count(),
        2,
        "each with a replay button"
    );
    assert!(
        dom.contains(r#"id="dead-letters">2<"#),
        "the dead-letter card says 2"
    );
    assert!(dom.contains(">retries_exhausted<"));
    assert_eq!(
        dom.matches(r#"data-call-id="#).count(),
        2,
        "two recent failures"
    );

    let shot = dir.path().join("dashboard.png");
    browse(
        &format!("{url}/dashboard/"),
        &[
            "--window-size=1280,860",
            &format!("--screenshot={}", shot.display()),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );
    if let Some(target) = std::env::var_os("DASHBOARD_SCREENSHOT") {
        std::fs::write(target, png).unwrap();
    }
}

/// With an authenticator (here an API token), a browser that opens the dashboard without
/// credentials gets the page's shell with the 401 (no data: the sign-in row shows), and the
/// same page with the token typed once (here given in the address's fragment, which never
/// reaches the server) loads its data from the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_with_a_token_typed_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_function, function_url) = start(
        env!("CARGO_BIN_EXE_stats-function"),
        &["--listen", "127.0.0.1:0"],
        dir.path(),
        "stats-function listening on ",
    )
    .await;
    let token = "dashboard-token-0123456789abcdef";
    let digest: String = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("ops {digest} admin:* invoke:*\n")).unwrap();
    let (_server, url) = start(
        env!("CARGO_BIN_EXE_faas-async"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--gateway-url",
            &function_url,
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
        ],
        dir.path(),
        "faas-async listening on ",
    )
    .await;
    let client = queue_worker::invoke::http_client("dashboard-test").unwrap();
    let accepted = client
        .post(format!("{url}/async-function/stats"))
        .bearer_auth(token)
        .body("[1, 2]")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let end = Instant::now() + DEADLINE;
    loop {
        let response = client
            .get(format!("{url}/system/async/stats"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let stats: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        if stats["functions"][0]["completed"] == 1 {
            break;
        }
        assert!(Instant::now() < end, "the call did not finish: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Not a browser: the JSON refusal, as on every route.
    let refused = client
        .get(format!("{url}/dashboard/"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(
        refused.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    // A browser without credentials: the shell, asking for them, and no data.
    let dom = browse(&format!("{url}/dashboard/"), &["--dump-dom"]).await;
    assert!(dom.contains(r#"id="sign-in""#), "the page's shell:\n{dom}");
    assert!(
        dom.contains(r#"<body class="signed-out">"#),
        "the sign-in row shows:\n{dom}"
    );
    assert!(
        !dom.contains(r#"data-loaded="true""#),
        "no data without credentials"
    );
    assert!(
        !dom.contains(r#"data-function="stats""#),
        "no data without credentials"
    );
    // The token given once: the data loads.
    let dom = browse(&format!("{url}/dashboard/#token={token}"), &["--dump-dom"]).await;
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page loaded its data with the token:\n{dom}"
    );
    assert!(dom.contains(r#"data-function="stats""#), "{dom}");
    assert!(!dom.contains(token), "the token is not left in the page");
}
