//! `queue-worker` binary: parse configuration, set up logging, run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use queue_worker::config::{WorkerConfig, openfaas_compat_args, with_leading_args};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let compat = openfaas_compat_args(|k| std::env::var(k).ok());
    let args = with_leading_args(std::env::args_os(), compat);
    let config = WorkerConfig::parse_from(args);
    queue_worker::telemetry::init(&config.log).map_err(anyhow::Error::msg)?;
    queue_worker::run(config, queue_worker::signal::shutdown_signal())
        .await
        .context("queue-worker failed")
}
