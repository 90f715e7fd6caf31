//! Real components shared by the integration tests of the workspace crates and
//! by the `load-tests` binary: no mocks, only real processes and real sockets on
//! `127.0.0.1`.
//!
//! # Layout
//!
//! - [`nats_server`]: [`NatsServer`], a private `nats-server` process with
//!   JetStream enabled, its own port and its own store directory; it can be
//!   stopped and restarted on the same port and store.
//! - [`stub`]: [`StubFunction`], an HTTP server standing in for an OpenFaaS
//!   function or gateway that records every request, and [`CallbackReceiver`],
//!   an HTTP server that records the callbacks it receives and can be stopped
//!   and started again on the same port.
//! - [`HarnessError`]: the error type of everything above.
//! - [`open_loop`](mod@open_loop): [`open_loop()`], an open-loop load generator
//!   measuring every latency from the request's intended send time.
//! - [`audit`]: [`audit::audit_callbacks`], matching received callbacks to
//!   accepted call ids: lost, duplicated, unexpected, bad headers.
//! - [`bench`]: the benchmark behind `load-tests bench`, built from the
//!   components above plus the gateway and the worker as child processes
//!   ([`sut`]).

use std::path::PathBuf;
use std::time::Duration;

pub mod audit;
pub mod bench;
pub mod nats_server;
pub mod open_loop;
pub mod stub;
pub mod sut;

pub use nats_server::{NatsServer, nats_server_binary};
pub use open_loop::{Timed, open_loop};
pub use stub::{
    ANSWERED_AT_HEADER, CallbackReceiver, Fault, FaultMix, INVOKED_AT_HEADER, RecordedCallback,
    RecordedRequest, StubBehavior, StubFunction,
};

/// Errors raised while setting up or driving the test components.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The `nats-server` binary is not where it is expected.
    #[error(
        "nats-server binary not found at {}: run `./scripts/install-tools.sh` \
         (it installs the pinned nats-server 2.15.1), or set NATS_SERVER_BIN",
        path.display()
    )]
    NatsServerBinaryMissing {
        /// The path that was looked up.
        path: PathBuf,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The `nats-server` process exited before it became ready.
    #[error("nats-server exited before becoming ready ({status}); log tail:\n{log_tail}")]
    NatsServerExited {
        /// The exit status of the process.
        status: std::process::ExitStatus,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// The `nats-server` process did not become ready in time.
    #[error(
        "nats-server on port {port} not ready after {timeout:?} (last error: {last_error}); \
         log tail:\n{log_tail}"
    )]
    NatsServerNotReady {
        /// The port the server was started on.
        port: u16,
        /// How long readiness was waited for.
        timeout: Duration,
        /// The last connection or JetStream error seen.
        last_error: String,
        /// The last lines of the server log.
        log_tail: String,
    },
}

/// The workspace this crate was built in (where `.tools/` and `scripts/` are).
pub(crate) fn workspace_dir() -> PathBuf {
    let manifest_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
