//! `queue-worker`: the worker side of the async invocation path, and the owner of the queue
//! contract that `gateway-plugin` publishes into.
//!
//! A worker pulls queued calls from a durable JetStream consumer, at most `max_inflight` at a
//! time, invokes each function over HTTP, stores the outcome in its sled state, POSTs the result
//! to the caller's callback URL and only then acks the message.
//!
//! # Layout
//! - [`message`]: the versioned queued-call envelope (metadata JSON + raw body) and its checks.
//! - [`queue`]: JetStream plumbing: connect, stream and consumer definitions, publish, dead letters.
//! - [`worker`]: the pull loop (permits before pulls) and the life of one message.
//! - [`invoke`]: function URLs and the HTTP call; transport failures become a 503 [`invoke::Outcome`].
//! - [`retry`]: the function retry policy (backoff with jitter, `Retry-After`).
//! - [`functions`]: per-function overrides (`--functions-config`, TOML).
//! - [`callback`]: callback headers and delivery with retries of the callback alone.
//! - [`state`]: the dedup state in sled (`claimed` → `completed` → `done`, with expiry).
//! - [`dlq`]: dead-letter administration (`queue-worker dlq list|show|replay|purge`).
//! - [`config`]: every setting as a flag and an environment variable; OpenFaaS variable mapping.
//! - [`telemetry`]: tracing setup (text or JSON); bodies and secret headers are never logged.
//! - [`signal`]: SIGTERM/SIGINT as a future, for graceful shutdown.

pub mod backend;
pub mod callback;
pub mod config;
pub mod dlq;
pub mod functions;
pub mod invoke;
pub mod message;
pub mod metrics;
pub mod queue;
pub mod records;
pub mod retry;
pub mod signal;
pub mod sled_flush;
pub mod state;
pub mod telemetry;
pub mod worker;

pub use config::WorkerConfig;
pub use worker::run;

/// Current Unix time in nanoseconds (0 if the clock is before 1970).
pub fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
