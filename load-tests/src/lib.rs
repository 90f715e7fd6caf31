//! The load-test harness behind `load-tests bench`: the gateway and the worker (or the
//! all-in-one server) as child processes ([`sut`]), driven and measured by [`bench`] with the
//! real components of `test-support` (private nats-server, stub function, callback receiver,
//! open-loop generator, callback audit), which this crate re-exports for its own tests.
//!
//! # Layout
//!
//! - [`bench`]: options, load loops, baselines and the report.
//! - [`sut`]: the system under test as processes (builds missing binaries under `cargo run`).
//! - [`adaptive`]: the worker's concurrency limit over a run (the `adaptive` scenario).
//! - [`fairness`]: `load-tests fairness`, a call's wait behind another function's backlog.
//! - [`sampling`]: resident memory and store sizes through a run (`--sample-every`, soaks).

pub mod adaptive;
pub mod bench;
mod error;
pub mod fairness;
pub mod large;
pub mod sampling;
pub mod sut;

pub use test_support::*;
pub use test_support::{audit, nats_server, open_loop, stub};
