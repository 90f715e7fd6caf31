//! Why a benchmark run (or the system under test) could not produce a report.

use std::time::Duration;

use test_support::HarnessError;

/// Why [`crate::bench::run`] could not produce a [`crate::bench::Report`]. Lost calls are not an error:
/// they are part of the report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The options are out of bounds.
    #[error("invalid options: {0}")]
    Options(String),
    /// The run took longer than [`crate::bench::BenchOptions::time_limit`].
    #[error("bench exceeded its time limit of {0:?}; aborted")]
    TimeLimit(Duration),
    /// A harness component failed.
    #[error(transparent)]
    Harness(#[from] HarnessError),
    /// The gateway or worker binary is not where it was looked for.
    #[error(
        "binaries {binaries} not found in {searched}: run `cargo build --release --workspace` \
         (then run target/release/load-tests), or pass --bin-dir"
    )]
    BinariesMissing {
        /// The binaries looked for.
        binaries: String,
        /// The directories searched.
        searched: String,
    },
    /// Anything else in setting up or tearing down: NATS, sockets,
    /// configuration, readiness, a panicked task.
    #[error("{0}")]
    Setup(String),
}

impl BenchError {
    pub(crate) fn setup(context: &str, err: impl std::fmt::Display) -> Self {
        Self::Setup(format!("{context}: {err}"))
    }
}
