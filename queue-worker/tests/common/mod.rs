//! Shared set-up for queue-worker's integration tests: a private nats-server, the streams as the
//! gateway creates them, publishing calls, and workers in-process or as real processes.
#![allow(dead_code, reason = "each test binary uses a different subset")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test set-up fails loudly"
)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use clap::Parser;
use queue_core::message::{BodyLocation, CallMeta, QueuedCall};
use queue_core::settings::{NatsArgs, StreamArgs};
use queue_worker::WorkerConfig;
use test_support::nats_server::NatsServer;
use tokio::sync::oneshot;

/// Generous deadline for anything that waits for a condition on a loaded machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub struct Queue {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub args: NatsArgs,
}

pub fn nats_args(url: &str) -> NatsArgs {
    #[derive(Parser)]
    struct A {
        #[command(flatten)]
        nats: NatsArgs,
    }
    A::try_parse_from(["x", "--nats-url", url]).unwrap().nats
}

pub fn record_args() -> queue_core::settings::RecordArgs {
    #[derive(Parser)]
    struct A {
        #[command(flatten)]
        records: queue_core::settings::RecordArgs,
    }
    A::try_parse_from(["x"]).unwrap().records
}

pub fn stream_args() -> StreamArgs {
    #[derive(Parser)]
    struct A {
        #[command(flatten)]
        stream: StreamArgs,
    }
    A::try_parse_from(["x"]).unwrap().stream
}

impl Queue {
    /// A fresh nats-server with the streams created the way the gateway creates them.
    pub async fn start() -> Self {
        let nats = NatsServer::start().await.unwrap();
        let args = nats_args(&nats.url());
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client.clone());
        let max_payload = client.server_info().max_payload;
        queue_core::backend::nats::ensure_streams(&js, &args, &stream_args(), max_payload)
            .await
            .unwrap();
        Self {
            nats,
            client,
            js,
            args,
        }
    }

    /// Publishes a call the way the gateway does; returns its id.
    pub async fn publish(&self, call: &QueuedCall) -> String {
        queue_core::backend::nats::publish_call(
            &self.client,
            &self.js,
            queue_core::backend::call_subject(&self.args.subject_prefix, call),
            call,
            &queue_core::sealing::Sealing::off(),
            self.client.server_info().max_payload,
        )
        .await
        .unwrap();
        call.meta.call_id.clone()
    }

    /// The dead letters, as `queue-worker dlq list` shows them.
    pub async fn dead_letters(&self) -> Vec<queue_core::backend::DeadLetterEntry> {
        use queue_core::backend::CallQueue;
        let options = queue_core::backend::jetstream::JetStreamOptions {
            nats: self.args.clone(),
            manage_streams: None,
            consumer: None,
            records: record_args(),
            sealing: queue_core::sealing::Sealing::off(),
        };
        let queue = queue_core::backend::jetstream::JetStreamQueue::with_client(
            self.client.clone(),
            options,
            tokio_util::sync::CancellationToken::new(),
        );
        queue.dead_letters().await.unwrap()
    }

    /// Messages still in the work-queue stream (unacknowledged calls).
    pub async fn pending(&self) -> u64 {
        let mut stream = self.js.get_stream(&self.args.stream).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    pub async fn wait_until_empty(&self) -> bool {
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            if self.pending().await == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// A call to `function` with a callback to `callback_url`.
pub fn call(function: &str, callback_url: Option<&str>, body: &'static [u8]) -> QueuedCall {
    QueuedCall {
        meta: CallMeta {
            call_id: uuid::Uuid::now_v7().to_string(),
            function: function.into(),
            namespace: None,
            method: "POST".into(),
            path: String::new(),
            query: None,
            headers: vec![("content-type".into(), "text/plain".into())],
            callback_url: callback_url.map(Into::into),
            received_at_unix_nanos: queue_core::unix_nanos_now(),
            body: BodyLocation::Inline { len: 0 },
            record_revision: None,
            overrides: Default::default(),
            not_before_unix_nanos: None,
        },
        body: Bytes::from_static(body),
    }
}

/// Worker flags for a test: this queue, this function gateway, this state dir.
pub fn worker_args(nats_url: &str, gateway_url: &str, state_dir: &Path) -> Vec<String> {
    vec![
        "--nats-url".into(),
        nats_url.into(),
        "--gateway-url".into(),
        gateway_url.into(),
        "--state-dir".into(),
        state_dir.display().to_string(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
        "--pull-expires".into(),
        "1s".into(),
        "--callback-initial-wait".into(),
        "200ms".into(),
        "--callback-max-wait".into(),
        "1s".into(),
        "--retry-initial-wait".into(),
        "200ms".into(),
        "--retry-max-wait".into(),
        "1s".into(),
    ]
}

/// A worker running in this process; dropping `stop` (or sending on it) shuts it down.
pub struct InProcessWorker {
    pub stop: Option<oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<Result<(), queue_worker::worker::WorkerError>>,
}

impl InProcessWorker {
    pub fn start(args: &[String]) -> Self {
        let config = WorkerConfig::try_parse_from(
            std::iter::once("queue-worker".to_owned()).chain(args.iter().cloned()),
        )
        .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(queue_worker::run(config, async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            handle,
        }
    }

    pub async fn shutdown(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(DEADLINE, &mut self.handle)
            .await
            .expect("worker did not stop")
            .unwrap()
            .unwrap();
    }
}

/// The worker binary as a real process (for SIGKILL and SIGTERM tests). Logs go to `log`.
pub fn spawn_worker_process(args: &[String], log: &Path) -> tokio::process::Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"))
        .args(args)
        .env_remove("NATS_URL")
        .env("LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Sends a signal to a child process.
pub fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("child already exited");
    let status = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Polls `cond` until it holds or the deadline passes.
pub async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// The usual cast of a test: a queue, a stub function, a callback receiver, a scratch directory.
pub struct Fixture {
    pub queue: Queue,
    pub function: test_support::stub::StubFunction,
    pub receiver: test_support::stub::CallbackReceiver,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub async fn start(behavior: test_support::stub::StubBehavior) -> Self {
        Self {
            queue: Queue::start().await,
            function: test_support::stub::StubFunction::start(behavior)
                .await
                .unwrap(),
            receiver: test_support::stub::CallbackReceiver::start().await.unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Worker flags for this fixture with the state in `<dir>/<state>`, plus `extra`.
    pub fn worker_args(&self, state: &str, extra: &[&str]) -> Vec<String> {
        let mut args = worker_args(
            &self.queue.nats.url(),
            &self.function.url(),
            &self.dir.path().join(state),
        );
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    }

    /// A log file path in the scratch directory.
    pub fn log(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Publishes a call to `function` with a callback to the receiver.
    pub async fn publish(&self, function: &str, body: &'static [u8]) -> String {
        self.queue
            .publish(&call(function, Some(&self.receiver.url()), body))
            .await
    }
}
