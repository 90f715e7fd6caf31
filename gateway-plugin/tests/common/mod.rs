//! Shared set-up for the gateway's integration tests: a private nats-server, the gateway on a
//! free port, and (for end-to-end tests) a worker in the same process.
#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test set-up fails loudly"
)]

use std::time::{Duration, Instant};

use clap::Parser;
use gateway_plugin::GatewayConfig;
use tokio::sync::oneshot;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// Test logs on stderr when `TEST_LOG` is set (e.g. `TEST_LOG=debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

pub fn http() -> reqwest::Client {
    init_logs();
    queue_worker::invoke::http_client("gateway-tests").unwrap()
}

pub struct Gateway {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), gateway_plugin::GatewayError>>,
}

impl Gateway {
    pub async fn start(nats_url: &str, extra: &[&str]) -> Self {
        let gateway = Self::launch(nats_url, extra).await;
        assert!(gateway.wait_ready(true).await, "gateway never became ready");
        gateway
    }

    /// Starts without waiting for `/readyz` to answer ready.
    pub async fn launch(nats_url: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "gateway-plugin",
            "--nats-url",
            nats_url,
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let config = GatewayConfig::try_parse_from(args).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(gateway_plugin::run(config, listener, async move {
            let _ = rx.await;
        }));
        Self {
            url,
            stop: Some(tx),
            handle,
        }
    }

    /// Waits until `/readyz` answers ready (or not ready, with `want = false`).
    pub async fn wait_ready(&self, want: bool) -> bool {
        let client = http();
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if let Ok(r) = client.get(format!("{}/readyz", self.url)).send().await
                && (r.status() == 200) == want
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub async fn shutdown(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(DEADLINE, &mut self.handle)
            .await
            .expect("gateway did not stop")
            .unwrap()
            .unwrap();
    }
}

/// A worker in this process, invoking functions through `function_gateway_url`.
pub struct Worker {
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), queue_worker::worker::WorkerError>>,
    _state: tempfile::TempDir,
}

impl Worker {
    pub fn start(nats_url: &str, function_gateway_url: &str) -> Self {
        Self::start_with(nats_url, function_gateway_url, &[])
    }

    /// A worker with extra flags.
    pub fn start_with(nats_url: &str, function_gateway_url: &str, extra: &[&str]) -> Self {
        let state = tempfile::tempdir().unwrap();
        let state_dir = state.path().display().to_string();
        let mut args = vec![
            "queue-worker",
            "--nats-url",
            nats_url,
            "--gateway-url",
            function_gateway_url,
            "--state-dir",
            &state_dir,
            "--metrics-listen",
            "127.0.0.1:0",
            "--pull-expires",
            "1s",
            "--retry-initial-wait",
            "100ms",
            "--retry-max-wait",
            "200ms",
        ];
        args.extend_from_slice(extra);
        let config = queue_worker::WorkerConfig::try_parse_from(args).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(queue_worker::run(config, async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            handle,
            _state: state,
        }
    }

    /// Where this worker keeps its dedup state.
    pub fn state_dir(&self) -> std::path::PathBuf {
        self._state.path().to_path_buf()
    }

    /// Stops the worker (drains); returns its state directory, kept until dropped.
    pub async fn shutdown(mut self) -> tempfile::TempDir {
        drop(self.stop.take());
        tokio::time::timeout(DEADLINE, &mut self.handle)
            .await
            .expect("worker did not stop")
            .unwrap()
            .unwrap();
        self._state
    }
}

/// The SHA-256 of `token` in hex, by the system's `sha256sum` (an implementation independent of
/// the gateway's), as a tokens file lists it.
pub fn sha256_hex(token: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", "printf %s \"$T\" | sha256sum"])
        .env("T", token)
        .output()
        .unwrap();
    assert!(out.status.success(), "sha256sum failed");
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// A fresh API token (`fa_` and 64 random hex digits).
pub fn token() -> String {
    format!(
        "fa_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Whether `key` is a result (an answer) of `call_id`.
pub fn is_result_of(key: &queue_core::blobs::BlobKey, call_id: &str) -> bool {
    key.call_id() == call_id && key.role() == queue_core::blobs::BlobRole::Result
}

/// The gateway's blob store (the bucket of the `faas-async` stream), once the gateway made it.
pub async fn blobs(nats_url: &str) -> queue_core::blobs::jetstream::JetStreamBlobs {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let end = Instant::now() + DEADLINE;
    loop {
        match queue_core::blobs::jetstream::JetStreamBlobs::open(
            &js,
            "faas-async",
            queue_core::sealing::Sealing::off(),
        )
        .await
        {
            Ok(blobs) => return blobs,
            Err(e) if Instant::now() > end => panic!("the gateway made no blob bucket: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Messages in the queued-calls stream.
pub async fn queued(nats_url: &str) -> u64 {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("faas-async").await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Checks an error answer: status, JSON body with the given error code.
pub async fn assert_json_error(response: reqwest::Response, status: u16, code: &str) {
    let url = response.url().to_string();
    assert_eq!(
        response.status().as_u16(),
        status,
        "status for {url} (expected {code})"
    );
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "error bodies are JSON"
    );
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], code, "error code in {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error message missing in {body}"
    );
}

/// The gateway binary as a process of its own (for what a process sees: signals, its log),
/// with its log in a file.
pub struct GatewayProcess {
    pub url: String,
    child: tokio::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts `gateway-plugin --nats-url nats_url --listen 127.0.0.1:<free port> args...` with
    /// `env` and waits until `/readyz` answers ready.
    pub async fn start(nats_url: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("gateway.log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway-plugin"));
        command
            .args([
                "--nats-url",
                nats_url,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(args)
            .env("LOG_LEVEL", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let gateway = Self {
            url: format!("http://127.0.0.1:{port}"),
            child: command.spawn().unwrap(),
            log,
            _dir: dir,
        };
        let client = http();
        let end = Instant::now() + DEADLINE;
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", gateway.url)).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(
                Instant::now() < end,
                "gateway never became ready:\n{}",
                gateway.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gateway
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log holds `needle` at least `times` times.
    pub async fn wait_log(&self, needle: &str, times: usize) {
        let end = Instant::now() + DEADLINE;
        while self.log().matches(needle).count() < times {
            assert!(
                Instant::now() < end,
                "{needle:?} not {times} times in the log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the gateway is running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Sends it `SIGHUP`.
    pub fn hangup(&self) {
        self.signal("HUP");
    }

    /// Stops it with `SIGTERM`; it must exit with success. Its log.
    pub async fn stop(mut self) -> String {
        self.signal("TERM");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the gateway did not stop")
            .unwrap();
        assert!(
            status.success(),
            "gateway exited with {status}:\n{}",
            self.log()
        );
        self.log()
    }
}

/// Polls `probe` until it returns `true`, failing with `what` after [`DEADLINE`].
pub async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !probe().await {
        assert!(Instant::now() < end, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces `path` with `text` as an operator should (a new file renamed over the old one), so
/// that a reread never sees it half-written.
pub fn replace_file(path: &std::path::Path, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}
