//! `queue-worker`: the worker engine of the async invocation path. It pulls queued calls (from
//! any [`queue_core::CallQueue`]), at most `max_inflight` at a time, invokes each function over
//! HTTP, keeps what it must to make the effect exactly-once, POSTs the result to the caller's
//! callback URL and only then acks the delivery.
//!
//! The message format, the queue contract, the backends and the call records are in
//! `queue-core`; this crate is the engine only.
//!
//! # Layout
//! - [`worker`]: the pull loop (permits before pulls) and the life of one delivery.
//! - [`lease`]: a delivery held from pull to exactly one terminal action, kept alive by one
//!   heartbeat timer for all leases.
//! - [`plan`]: what to do with a delivery (invoke, skip, send the stored result, give up), a
//!   pure function.
//! - [`invoke`]: function URLs and the HTTP call; transport failures become a 503 outcome.
//! - [`http1`]: the small HTTP/1.1 client for plain-`http` functions and callbacks (one
//!   socket and a right-sized buffer per in-flight call, an idle pool per origin).
//! - [`retry`]: the function retry policy (backoff with jitter, `Retry-After`).
//! - [`functions`]: per-function overrides (`--functions-config`, TOML).
//! - [`concurrency`]: per-function concurrency: a cap and the adaptive (AIMD) limit under it.
//! - [`callback`]: callback headers and delivery with retries of the callback alone; the
//!   callback URL policy at connect time.
//! - [`signing`]: Standard Webhooks signatures of callbacks, secrets from a file.
//! - [`state`]: the dedup state in sled.
//! - [`scheduler`]: scheduled calls held apart by the queue (JetStream's delayed stream),
//!   moved onto the queue at their time.
//! - [`dlq`]: dead-letter administration (`queue-worker dlq list|show|replay|purge`).
//! - [`endpoint`]: `/metrics` and `/healthz`.
//! - [`config`]: every setting as a flag and an environment variable.
//! - [`openfaas`]: OpenFaaS's queue-worker variables (CE and Pro), each mapped, noted or refused.

pub mod annotations;
pub mod callback;
pub mod concurrency;
pub mod config;
pub mod dlq;
pub mod endpoint;
pub mod fair;
pub mod functions;
pub mod http1;
pub mod invoke;
pub mod lease;
pub mod openfaas;
pub mod plan;
pub mod policy_client;
pub mod retry;
pub mod scheduler;
pub mod signing;
pub mod state;
pub mod status;
pub mod worker;

pub use config::WorkerConfig;
pub use worker::run;
