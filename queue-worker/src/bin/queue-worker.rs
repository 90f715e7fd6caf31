//! `queue-worker` binary: parse configuration, set up logging, run until SIGTERM/SIGINT; or run
//! a dead-letter command (`queue-worker dlq ...`).

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use queue_worker::config::{
    DlqAction, WorkerCommand, WorkerConfig, openfaas_compat_args, with_leading_args,
};
use queue_worker::dlq::{self, DeadLetterEntry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let compat = openfaas_compat_args(|k| std::env::var(k).ok());
    let args = with_leading_args(std::env::args_os(), compat);
    let mut config = WorkerConfig::parse_from(args);
    queue_worker::telemetry::init(&config.log).map_err(anyhow::Error::msg)?;
    if let Some(WorkerCommand::Dlq { action }) = config.command.take() {
        return dead_letters(&config, action).await;
    }
    queue_worker::run(config, queue_worker::signal::shutdown_signal())
        .await
        .context("queue-worker failed")
}

#[allow(clippy::print_stdout, reason = "command-line output")]
async fn dead_letters(config: &WorkerConfig, action: DlqAction) -> anyhow::Result<()> {
    let nats = &config.nats;
    let client = tokio::time::timeout(
        Duration::from_secs(10),
        async_nats::connect(nats.nats_url.as_str()),
    )
    .await
    .with_context(|| format!("timed out connecting to NATS at {}", nats.nats_url))?
    .with_context(|| format!("cannot connect to NATS at {}", nats.nats_url))?;
    let js = queue_worker::queue::jetstream(client.clone(), nats);
    let dlq_name = nats.dead_letter_stream.as_str();
    match action {
        DlqAction::List { json } => {
            let entries = dlq::list(&js, dlq_name).await?;
            if json {
                for e in &entries {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                println!(
                    "{:>6}  {:<36}  {:<24}  {:<18}  {:>6}  {:>8}",
                    "SEQ", "CALL ID", "FUNCTION", "REASON", "STATUS", "ATTEMPTS"
                );
                for e in &entries {
                    println!("{}", table_row(e));
                }
                println!("{} dead letter(s) in {dlq_name}", entries.len());
            }
        }
        DlqAction::Show { ids } => {
            for e in dlq::list(&js, dlq_name)
                .await?
                .iter()
                .filter(|e| ids.iter().any(|id| e.matches(id)))
            {
                println!("{}", serde_json::to_string_pretty(e)?);
            }
        }
        DlqAction::Replay { ids, all } => {
            let replayed = dlq::replay(&js, dlq_name, &ids, all).await?;
            for e in &replayed {
                println!("replayed {}", table_row(e));
            }
            println!("{} call(s) put back on the queue", replayed.len());
        }
        DlqAction::Purge { ids, all } => {
            let n = dlq::purge(&js, dlq_name, &ids, all).await?;
            println!("{n} dead letter(s) deleted");
        }
    }
    client.flush().await.context("flushing NATS")?;
    Ok(())
}

fn table_row(e: &DeadLetterEntry) -> String {
    format!(
        "{:>6}  {:<36}  {:<24}  {:<18}  {:>6}  {:>8}",
        e.sequence,
        e.call_id.as_deref().unwrap_or("-"),
        e.function.as_deref().unwrap_or("-"),
        e.reason,
        e.last_status
            .map_or_else(|| "-".to_owned(), |s| s.to_string()),
        e.attempts
    )
}
