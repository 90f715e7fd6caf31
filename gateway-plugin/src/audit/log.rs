//! The audit log's sink: where the lines go ([`AuditLog`]) and what one says ([`AuditEvent`]).
//! Apart from the layer that writes them, so that the handlers' shared state can hold the log
//! without depending on the layer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// A refusal by a limit (a rate limit, a pending-calls quota: `429`), left in the answer's
/// extensions by the layer that refused (inside the audit layer) so that the audit line says
/// so: its outcome is `limited` and its reason this code (`rate_limited`, `quota_exceeded`).
/// Here, beside the sink, so that the quotas layer names it without depending on the audit
/// layer (which reads the shared state that holds the quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited(pub &'static str);

/// The audit log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The file cannot be opened for appending.
    #[error("audit log {path}: cannot open it for appending: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Where audit lines go.
#[derive(Debug)]
enum Sink {
    /// Appended to a file.
    File {
        path: PathBuf,
        file: Mutex<std::fs::File>,
    },
    /// `tracing` events of the target `audit`.
    Tracing,
}

/// The audit log of this gateway.
#[derive(Debug)]
pub struct AuditLog {
    sink: Sink,
}

impl AuditLog {
    /// The log `path` names (opened, or created with mode 0600, for appending), or the
    /// `tracing` target `audit` without one.
    pub fn open(path: Option<&Path>) -> Result<Self, AuditError> {
        let Some(path) = path else {
            return Ok(Self {
                sink: Sink::Tracing,
            });
        };
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            sink: Sink::File {
                path: path.to_owned(),
                file: Mutex::new(file),
            },
        })
    }

    /// The `tracing` target only.
    pub fn to_tracing() -> Self {
        Self {
            sink: Sink::Tracing,
        }
    }

    /// Writes one event. A failed write is logged (the request is answered anyway).
    pub fn write(&self, event: &AuditEvent<'_>) {
        let mut line = match serde_json::to_string(event) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "audit event not serialized");
                return;
            }
        };
        match &self.sink {
            Sink::Tracing => tracing::info!(target: "audit", "{line}"),
            Sink::File { path, file } => {
                line.push('\n');
                let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                // One write(2) on an O_APPEND descriptor: lines of concurrent writers (other
                // processes included) do not interleave.
                if let Err(e) = file.write_all(line.as_bytes()).and_then(|()| file.flush()) {
                    tracing::error!(path = %path.display(), error = %e, "audit line not written");
                }
            }
        }
    }
}

/// One audit line.
#[derive(Debug, Serialize)]
pub struct AuditEvent<'a> {
    /// When (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// The request's id (the client's `X-Request-Id` if it is a safe token, else generated).
    pub request_id: &'a str,
    /// Who: the basic-auth user, the token's name, the JWT's `sub`; `null` when unknown.
    pub subject: Option<&'a str>,
    /// How the subject authenticated (`basic`, `token`, `jwt`).
    pub auth_method: Option<&'static str>,
    /// What was asked ([`super::classify`]).
    pub action: &'static str,
    /// The namespace it concerns (`*` for queue-wide operations); `null` when unknown.
    pub namespace: Option<&'a str>,
    /// The call id, the function, the dead letter (sequence, call id or selection).
    pub resource: Option<&'a str>,
    /// `ok` (2xx), `denied` (refused by authentication or authorization), `limited` (refused by
    /// a rate limit or quota) or `error`.
    pub outcome: &'static str,
    /// The answer's status.
    pub status: u16,
    /// Why it was denied (a fixed phrase, never the credentials).
    pub reason: Option<&'a str>,
    /// The client (the peer, or what a trusted proxy says the client was).
    pub client: Option<String>,
    /// The connection's peer.
    pub peer: Option<String>,
    /// The request's method.
    pub method: &'a str,
    /// The route (its template, never the query).
    pub route: &'static str,
}
