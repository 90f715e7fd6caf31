//! Logging setup. Every log line is about a call's *handling* (ids, function names, statuses,
//! durations); request and response bodies and header values are never logged, at any level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::settings::{LogArgs, LogFormat};

/// Installs the global subscriber, writing to stderr. Call once, from a binary.
pub fn init(args: &LogArgs) -> Result<(), String> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| format!("invalid --log-level {:?}: {e}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true);
    let result = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install logger: {e}"))
}
