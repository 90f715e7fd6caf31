//! Real components for the tests of every crate in the workspace and for the `load-tests`
//! harness: no mocks, only real processes and real sockets on `127.0.0.1`.
//!
//! A leaf: it depends on no crate of the product, so any product crate can dev-depend on it
//! without a cycle, and the product never depends on it.
//!
//! # Layout
//!
//! - [`nats_server`]: [`NatsServer`], a private `nats-server` process with
//!   JetStream enabled, its own port and its own store directory; it can be
//!   stopped and restarted on the same port and store. The pinned server by
//!   default, Debian's packaged one with [`NatsServer::start_debian`].
//! - [`nats_cluster`]: [`NatsCluster`], a JetStream cluster of such servers
//!   with routes between them, each node killable and restartable on its own.
//! - [`stub`]: [`StubFunction`], an HTTP server standing in for an OpenFaaS
//!   function or gateway that records every request, and [`CallbackReceiver`],
//!   an HTTP server that records the callbacks it receives and can be stopped
//!   and started again on the same port.
//! - [`payload`]: [`payload::pattern`] bytes and their [`payload::sha256`] for the large-body tests.
//! - [`open_loop`](mod@open_loop): [`open_loop()`], an open-loop load generator
//!   measuring every latency from the request's intended send time.
//! - [`audit`]: [`audit::audit_callbacks`], matching received callbacks to
//!   accepted call ids: lost, duplicated, unexpected, bad headers.
//! - [`tools_python`]: the Python of `.tools/` (`./scripts/install-tools.sh`), with the
//!   `standardwebhooks` verifier.
//! - [`tls`]: [`TestPki`], a private certificate authority with server and client
//!   certificates as PEM files, made for one test.
//! - [`HarnessError`]: the error type of everything above.

pub mod audit;
mod error;
pub mod nats_cluster;
pub mod nats_server;
pub mod open_loop;
pub mod payload;
pub mod stub;
pub mod tls;

pub use error::{HarnessError, workspace_dir};
pub use nats_cluster::NatsCluster;
pub use nats_server::{NatsServer, debian_nats_server_binary, nats_server_binary};
pub use tls::TestPki;

/// The Python interpreter of the test tools: `$TOOLS_PYTHON` if set, else
/// `<workspace root>/.tools/venv/bin/python3`, where `./scripts/install-tools.sh` installs the
/// pinned `standardwebhooks` package (the independent verifier of signed callbacks).
pub fn tools_python() -> Result<std::path::PathBuf, HarnessError> {
    let path = match std::env::var_os("TOOLS_PYTHON") {
        Some(p) if !p.is_empty() => std::path::PathBuf::from(p),
        _ => workspace_dir().join(".tools/venv/bin/python3"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::io(
            format!(
                "no Python at {} (set TOOLS_PYTHON or run ./scripts/install-tools.sh)",
                path.display()
            ),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ))
    }
}
pub use open_loop::{Timed, open_loop};
pub use stub::{
    ANSWERED_AT_HEADER, CallbackReceiver, Fault, FaultMix, INVOKED_AT_HEADER, RecordedCallback,
    RecordedRequest, StubBehavior, StubFunction,
};

/// Every file under `root` (recursively) whose bytes contain `marker`: how the encryption tests
/// show that no call data reached a store's files in clear.
pub fn files_containing(root: &std::path::Path, marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(marker.len()).any(|w| w == marker.as_bytes()))
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}
