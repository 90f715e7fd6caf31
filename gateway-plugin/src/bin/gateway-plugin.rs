//! `gateway-plugin` binary: parse configuration, set up logging, bind, serve until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use gateway_plugin::config::{GatewayConfig, args_with_openfaas_compat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args_with_openfaas_compat(std::env::args_os(), |k| std::env::var(k).ok());
    let config = GatewayConfig::parse_from(args);
    queue_worker::telemetry::init(&config.log).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    gateway_plugin::run(config, listener, queue_worker::signal::shutdown_signal())
        .await
        .context("gateway-plugin failed")
}
