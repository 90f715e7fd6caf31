//! `queue-worker` binary: parse configuration, set up logging, run until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use queue_worker::config::{WorkerConfig, args_with_openfaas_compat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args_with_openfaas_compat(std::env::args_os(), |k| std::env::var(k).ok());
    let config = WorkerConfig::parse_from(args);
    queue_worker::telemetry::init(&config.log).map_err(anyhow::Error::msg)?;
    queue_worker::run(config, queue_worker::signal::shutdown_signal())
        .await
        .context("queue-worker failed")
}
