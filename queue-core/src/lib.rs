//! `queue-core`: the room both binaries stand on. The queued-call envelope, the queue contract
//! and its two backends, call records and kept results, the outcome of an invocation, the header
//! policy, the shared settings and the process plumbing (logging, signals, metrics names).
//!
//! `gateway-plugin` and `queue-worker` depend on this crate and never on each other: the
//! gateway never links the worker engine, and this crate knows nothing of either.
//!
//! # Layout
//! - [`message`]: the versioned queued-call envelope (metadata JSON + raw body) and its checks.
//! - [`backend`]: the [`CallQueue`]/[`QueueDelivery`] contract, with
//!   [`backend::jetstream::JetStreamQueue`] and (feature `embedded`) the sled-backed
//!   `backend::embedded::EmbeddedQueue`.
//! - [`blobs`]: large bodies and results by reference: the [`BlobStore`] contract (streamed
//!   puts and reads, digests, sealing, sweep), on a JetStream object store or on files.
//! - [`records`]: call records (`GET /async-calls/{id}`), their events and kept results.
//! - [`outcome`]: [`Outcome`], what came of one invocation.
//! - [`headers`]: which headers never cross from one HTTP exchange to another.
//! - [`egress`]: where callbacks (and direct-mode function calls) may go: the SSRF policy.
//! - [`sealing`]: encryption at rest: keys by id from a file, sealed values bound to their call.
//! - [`settings`]: NATS, stream, record and log settings as plain structs (clap argument groups
//!   with the `cli` feature), and the duration and size parsers.
//! - [`metrics`]: metric names, the process-wide recorder, the bounded `function` label.
//! - [`telemetry`], [`signal`], [`clock`]: logging, SIGTERM/SIGINT, Unix time.
//! - `sled_flush` (feature `sled`): group commit for sled databases.
//! - `tls_server` (feature `tls-server`): a rustls acceptor from PEM files, for the binaries'
//!   own listeners (the gateway's, the worker's metrics endpoint).
//!
//! # Features
//! - `embedded`: the embedded queue (links sled). The gateway-only and worker-only binaries
//!   on JetStream do not need it; the all-in-one server does.
//! - `sled`: the group-commit helper alone (the worker's dedup state uses it).
//! - `cli`: the shared settings also derive clap's `Args`.
//! - `tls-server`: `tls_server` (links rustls and tokio-rustls directly).

pub mod backend;
pub mod blobs;
pub mod call_id;
pub mod clock;
pub mod egress;
pub mod headers;
pub mod message;
pub mod metrics;
pub mod outcome;
pub mod records;
pub mod sealing;
pub mod settings;
pub mod signal;
#[cfg(feature = "sled")]
pub mod sled_flush;
pub mod telemetry;
#[cfg(feature = "tls-server")]
pub mod tls_server;

pub use backend::{CallQueue, QueueDelivery};
pub use blobs::{BlobError, BlobKey, BlobRole, BlobStore};
pub use clock::unix_nanos_now;
pub use outcome::Outcome;
