//! `gateway-plugin` binary: parse configuration, set up logging, bind, serve until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use gateway_plugin::config::{GatewayConfig, openfaas_compat_args};
use queue_core::settings::with_leading_args;

/// mimalloc instead of the system allocator: allocation was a quarter of the instructions an
/// accept costs with glibc's. Built without transparent huge pages (`no_thp`): with them the
/// worker's RSS doubled (BENCHMARKS.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let compat = openfaas_compat_args(|k| std::env::var(k).ok())
        .map_err(|e| anyhow::anyhow!("OpenFaaS settings: {e}"))?;
    let args = with_leading_args(std::env::args_os(), compat);
    let config = GatewayConfig::parse_from(args);
    queue_core::telemetry::init(&config.log).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    gateway_plugin::run(config, listener, queue_core::signal::shutdown_signal())
        .await
        .context("gateway-plugin failed")
}
