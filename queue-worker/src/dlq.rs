//! Dead-letter administration for any backend: the `dlq list | show | replay | purge` commands
//! of `queue-worker` (JetStream) and of the all-in-one server (embedded queue).
//!
//! Output shows metadata only: never bodies or header values of the call, which may be
//! confidential.

use std::io::Write;

use crate::config::DlqAction;
use queue_core::backend::{BackendError, CallQueue, DeadLetterEntry};
use queue_core::blobs::SharedBlobs;

/// Errors of the dead-letter commands.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The queue failed.
    #[error(transparent)]
    Queue(#[from] BackendError),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    /// Encoding JSON output failed.
    #[error("encoding output: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs one dead-letter command against `queue`, writing what it did to `out`. A purge also
/// deletes the purged calls' stored bodies from `blobs` (nothing can replay them any more).
pub async fn run_command<Q: CallQueue>(
    queue: &Q,
    blobs: Option<&SharedBlobs>,
    action: DlqAction,
    out: &mut impl Write,
) -> Result<(), DlqError> {
    match action {
        DlqAction::List { json } => {
            let entries = queue.dead_letters().await?;
            if json {
                for e in &entries {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                }
            } else {
                writeln!(
                    out,
                    "{:>6}  {:<36}  {:<24}  {:<18}  {:>6}  {:>8}",
                    "SEQ", "CALL ID", "FUNCTION", "REASON", "STATUS", "ATTEMPTS"
                )?;
                for e in &entries {
                    writeln!(out, "{}", table_row(e))?;
                }
                writeln!(out, "{} dead letter(s)", entries.len())?;
            }
        }
        DlqAction::Show { select } => {
            let selectors = select.selectors();
            for e in queue
                .dead_letters()
                .await?
                .iter()
                .filter(|e| e.selected(&selectors, false))
            {
                writeln!(out, "{}", serde_json::to_string_pretty(e)?)?;
            }
        }
        DlqAction::Replay { select, all } => {
            let replayed = queue.replay_dead_letters(&select.selectors(), all).await?;
            for e in &replayed {
                writeln!(out, "replayed {}", table_row(e))?;
            }
            writeln!(out, "{} call(s) put back on the queue", replayed.len())?;
        }
        DlqAction::Purge { select, all } => {
            let purged = queue.purge_dead_letters(&select.selectors(), all).await?;
            if let Some(blobs) = blobs {
                for call_id in purged.iter().filter_map(|e| e.call_id.as_deref()) {
                    queue_core::blobs::delete_call_blobs(blobs, call_id).await;
                }
            }
            writeln!(out, "{} dead letter(s) deleted", purged.len())?;
        }
    }
    queue.flush_before_exit().await;
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
