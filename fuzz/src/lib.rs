//! The fuzz targets: one function per input that crosses a trust boundary, shared by every
//! engine. `fuzz/libfuzzer/fuzz_targets/*.rs` hands each to libFuzzer (cargo-fuzz); this crate's tests
//! drive the same functions with a seeded mutation loop, so `cargo test` runs them too.
//!
//! Each target takes arbitrary bytes and checks properties, not only the absence of a panic:
//! what decodes re-encodes to itself, what is refused is refused with the error of the part
//! that is wrong, what the callback policy accepts never reaches a refused address. The same
//! bytes are read twice: once as the raw input of the decoder, once as the source of a
//! structured value ([`arbitrary::Unstructured`]) whose encoding must round-trip.
//!
//! A failed property is a panic, which is what every engine reports as a crash.
//!
//! - [`envelope`]: the queued-call envelope (`QueuedCall::decode`/`encode`).
//! - [`records`]: call records and kept results as the KV bucket and the sled trees store them.
//! - [`callback_url`]: `parse_callback_url` and the egress policy.
//! - [`headers`]: the header policy, and the worker's request head built from stored headers.
//! - [`http1_response`]: the worker's HTTP/1.1 response parser (function and callback answers).
//! - [`mutate`]: the coverage-less mutator of the smoke tests (no libFuzzer needed).

use std::fmt::Display;

pub use cap;

pub mod callback_url;
pub mod envelope;
mod generate;
pub mod headers;
pub mod http1_response;
pub mod mutate;
pub mod records;

/// Every target, by the name of its `fuzz/libfuzzer/fuzz_targets/<name>.rs` and seed directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// [`envelope::run`].
    Envelope,
    /// [`records::run`].
    Records,
    /// [`callback_url::run`].
    CallbackUrl,
    /// [`headers::run`].
    Headers,
    /// [`http1_response::run`].
    Http1Response,
}

impl Target {
    /// All of them, in the order the fuzz script runs them.
    pub const ALL: [Self; 5] = [
        Self::Envelope,
        Self::Records,
        Self::CallbackUrl,
        Self::Headers,
        Self::Http1Response,
    ];

    /// The target's name: its cargo-fuzz binary and its seed directory.
    pub fn name(self) -> &'static str {
        match self {
            Self::Envelope => "envelope",
            Self::Records => "records",
            Self::CallbackUrl => "callback_url",
            Self::Headers => "headers",
            Self::Http1Response => "http1_response",
        }
    }

    /// Runs the target on one input; panics when a property fails.
    pub fn run(self, data: &[u8]) {
        match self {
            Self::Envelope => envelope::run(data),
            Self::Records => records::run(data),
            Self::CallbackUrl => callback_url::run(data),
            Self::Headers => headers::run(data),
            Self::Http1Response => http1_response::run(data),
        }
    }

    /// Valid inputs to start from (committed under `fuzz/seeds/<name>/`).
    pub fn seeds(self) -> Vec<Vec<u8>> {
        match self {
            Self::Envelope => envelope::seeds(),
            Self::Records => records::seeds(),
            Self::CallbackUrl => callback_url::seeds(),
            Self::Headers => headers::seeds(),
            Self::Http1Response => http1_response::seeds(),
        }
    }
}

/// Most memory a target may hold at once. The inputs are a few KiB: a target that needs more
/// allocated from a length prefix or a count it did not check.
pub const MEMORY_LIMIT: usize = 256 << 20;

/// Declares the process's allocator: the system one, refusing to hold more than `$limit`
/// bytes (default [`MEMORY_LIMIT`]). A refused allocation aborts the process, which the
/// engines report as a crash with its input.
#[macro_export]
macro_rules! limit_memory {
    () => {
        $crate::limit_memory!($crate::MEMORY_LIMIT);
    };
    ($limit:expr) => {
        #[global_allocator]
        static ALLOCATOR: $crate::cap::Cap<::std::alloc::System> =
            $crate::cap::Cap::new(::std::alloc::System, $limit);
    };
}

/// The value of a step a property needs, or a panic naming it (a failed property).
fn must<T, E: Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// The value of a step a property needs, or a panic naming it (a failed property).
fn some<T>(value: Option<T>, what: &str) -> T {
    match value {
        Some(value) => value,
        None => panic!("{what}"),
    }
}
