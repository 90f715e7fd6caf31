//! `queue-worker` binary: parse configuration, set up logging, run until SIGTERM/SIGINT; or run
//! a dead-letter command (`queue-worker dlq ...`) or print the signing keys' public keys
//! (`queue-worker signing-public-keys`).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use queue_core::backend::jetstream::{JetStreamOptions, JetStreamQueue};
use queue_core::settings::redact_url;
use queue_worker::config::{DlqAction, WorkerCommand, WorkerConfig, with_leading_args};
use queue_worker::openfaas::openfaas_compat_args;
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: allocation was a quarter of the instructions an
/// accept costs with glibc's. Built without transparent huge pages (`no_thp`): with them the
/// worker's RSS doubled (BENCHMARKS.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let compat = openfaas_compat_args(|k| std::env::var(k).ok())
        .map_err(|e| anyhow::anyhow!("OpenFaaS settings: {e}"))?;
    let args = with_leading_args(std::env::args_os(), compat.args);
    let mut config = WorkerConfig::parse_from(args);
    queue_core::telemetry::init(&config.log).map_err(anyhow::Error::msg)?;
    for note in &compat.notes {
        tracing::info!(target: "openfaas", "{note}");
    }
    match config.command.take() {
        Some(WorkerCommand::Dlq { action }) => return dead_letters(&config, action).await,
        Some(WorkerCommand::SigningPublicKeys { file }) => {
            return queue_worker::signing::print_public_keys(
                file.as_deref()
                    .or(config.callback_signing_keys_file.as_deref()),
                &mut std::io::stdout().lock(),
            )
            .context("signing-public-keys");
        }
        None => {}
    }
    queue_worker::run(config, queue_core::signal::shutdown_signal())
        .await
        .context("queue-worker failed")
}

async fn dead_letters(config: &WorkerConfig, action: DlqAction) -> anyhow::Result<()> {
    let nats = &config.nats;
    // A command fails fast when NATS is down, unlike the worker, which waits for it; it uses
    // the same connection settings (URL list, TLS, credentials files) as the worker.
    let client = tokio::time::timeout(
        Duration::from_secs(10),
        queue_core::backend::nats::connect_once(nats, "queue-worker dlq"),
    )
    .await
    .with_context(|| {
        format!(
            "timed out connecting to NATS at {}",
            redact_url(&nats.nats_url)
        )
    })??;
    let options = JetStreamOptions {
        nats: nats.clone(),
        manage_streams: None,
        consumer: None,
        records: config.records.clone(),
        sealing: config.encryption.sealing()?,
    };
    let sealing = options.sealing.clone();
    let queue = JetStreamQueue::with_client(client, options, CancellationToken::new());
    // The bucket as found (a purge deletes the purged calls' stored bodies).
    let blobs = queue_core::blobs::SharedBlobs::jetstream(
        queue.context().clone(),
        &nats.stream,
        None,
        sealing,
    );
    queue_worker::dlq::run_command(
        queue.as_ref(),
        Some(&blobs),
        action,
        &mut std::io::stdout().lock(),
    )
    .await
    .with_context(|| format!("dead letters in {}", nats.dead_letter_stream))
}
