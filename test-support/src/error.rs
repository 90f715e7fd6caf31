//! The error type of the test components, and where the workspace is.

use std::path::PathBuf;
use std::time::Duration;

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
    /// Debian's packaged `nats-server` is not installed.
    #[error(
        "Debian's nats-server not found at {}: install the package (`apt-get install \
         nats-server`; `./scripts/install-tools.sh` does it), or set DEBIAN_NATS_SERVER_BIN to \
         the binary",
        path.display()
    )]
    DebianNatsServerMissing {
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
    /// A test certificate could not be generated.
    #[error("generating a test certificate: {0}")]
    Certificate(String),
    /// A cluster condition was not met, or a cluster request failed.
    #[error("nats cluster: {0}")]
    Cluster(String),
}

/// The workspace this crate was built in (where `.tools/` and `scripts/` are).
pub fn workspace_dir() -> PathBuf {
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
