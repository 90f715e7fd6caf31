//! Dead-letter administration (`queue-worker dlq list | show | replay | purge`): read the
//! dead-letter stream, put calls back on the work queue with the same call id, or delete them.
//!
//! A dead letter is the original queued message, untouched, with `Dead-Letter-*` headers (see
//! [`crate::queue::dead_letter_headers`]). Listing shows metadata only: never bodies or header
//! values of the call, which may be confidential.

use async_nats::HeaderValue;
use async_nats::jetstream::{self, message::StreamMessage, stream::Stream};
use serde::Serialize;

use crate::message::QueuedCall;
use crate::queue::dead_letter_headers as h;

/// Errors of the dead-letter commands.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// A JetStream request failed.
    #[error("{0}")]
    JetStream(String),
    /// A dead letter has no subject to replay to.
    #[error("dead letter {0} has no Dead-Letter-Subject header; it cannot be replayed")]
    NoSubject(u64),
}

fn js_err(e: impl std::fmt::Display) -> DlqError {
    DlqError::JetStream(e.to_string())
}

/// One dead letter, as listed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetterEntry {
    /// Sequence in the dead-letter stream (what `show`, `replay` and `purge` take).
    pub sequence: u64,
    /// The call's id, if the message could be decoded.
    pub call_id: Option<String>,
    /// `name` or `name.namespace`, if decoded.
    pub function: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Data-free explanation.
    pub detail: String,
    /// The function's last status, if it ran.
    pub last_status: Option<u16>,
    /// Function invocations made.
    pub attempts: u32,
    /// Subject the call was queued on.
    pub subject: String,
    /// When it was dead-lettered (Unix nanoseconds).
    pub dead_lettered_at_unix_nanos: Option<u64>,
    /// When the gateway accepted the call (Unix nanoseconds), if decoded.
    pub received_at_unix_nanos: Option<u64>,
    /// Request body size, if decoded.
    pub body_bytes: Option<usize>,
}

fn header<'a>(msg: &'a StreamMessage, name: &str) -> Option<&'a str> {
    msg.headers.get(name).map(HeaderValue::as_str)
}

impl DeadLetterEntry {
    fn from_message(msg: &StreamMessage) -> Self {
        let call = QueuedCall::decode(&msg.payload).ok();
        Self {
            sequence: msg.sequence,
            call_id: call
                .as_ref()
                .map(|c| c.meta.call_id.clone())
                .or_else(|| header(msg, h::CALL_ID).map(str::to_owned)),
            function: call.as_ref().map(|c| c.meta.qualified_function()),
            reason: header(msg, h::REASON).unwrap_or("unknown").to_owned(),
            detail: header(msg, h::DETAIL).unwrap_or_default().to_owned(),
            last_status: header(msg, h::LAST_STATUS).and_then(|v| v.parse().ok()),
            attempts: header(msg, h::ATTEMPTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            subject: header(msg, h::SUBJECT).unwrap_or_default().to_owned(),
            dead_lettered_at_unix_nanos: header(msg, h::TIME).and_then(|v| v.parse().ok()),
            received_at_unix_nanos: call.as_ref().map(|c| c.meta.received_at_unix_nanos),
            body_bytes: call.as_ref().map(|c| c.body.len()),
        }
    }

    /// Does `selector` (a sequence number or a call id) name this entry?
    pub fn matches(&self, selector: &str) -> bool {
        selector.parse::<u64>().ok() == Some(self.sequence)
            || self.call_id.as_deref() == Some(selector)
    }
}

async fn stream(js: &jetstream::Context, name: &str) -> Result<Stream, DlqError> {
    js.get_stream(name).await.map_err(js_err)
}

async fn messages(stream: &mut Stream) -> Result<Vec<StreamMessage>, DlqError> {
    let (first, last, count) = {
        let state = &stream.info().await.map_err(js_err)?.state;
        (state.first_sequence, state.last_sequence, state.messages)
    };
    let mut out = Vec::new();
    if count == 0 {
        return Ok(out);
    }
    for seq in first..=last {
        // Gaps (deleted messages) answer "not found": skip them.
        if let Ok(msg) = stream.get_raw_message(seq).await {
            out.push(msg);
        }
    }
    Ok(out)
}

/// Lists the dead letters, oldest first.
pub async fn list(js: &jetstream::Context, dlq: &str) -> Result<Vec<DeadLetterEntry>, DlqError> {
    let mut stream = stream(js, dlq).await?;
    Ok(messages(&mut stream)
        .await?
        .iter()
        .map(DeadLetterEntry::from_message)
        .collect())
}

/// Puts the selected dead letters (all with `selectors` empty and `all`) back on the work
/// queue, with the same call id, and removes them from the dead-letter stream. Returns the
/// replayed entries.
pub async fn replay(
    js: &jetstream::Context,
    dlq: &str,
    selectors: &[String],
    all: bool,
) -> Result<Vec<DeadLetterEntry>, DlqError> {
    let mut stream = stream(js, dlq).await?;
    let mut replayed = Vec::new();
    for msg in messages(&mut stream).await? {
        let entry = DeadLetterEntry::from_message(&msg);
        if !all && !selectors.iter().any(|s| entry.matches(s)) {
            continue;
        }
        if entry.subject.is_empty() {
            return Err(DlqError::NoSubject(entry.sequence));
        }
        // A fresh message id: the original one may still be inside the duplicate window.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            HeaderValue::from(format!("replay-{dlq}-{}", entry.sequence).as_str()),
        );
        js.publish_with_headers(entry.subject.clone(), headers, msg.payload.clone())
            .await
            .map_err(js_err)?
            .await
            .map_err(js_err)?;
        stream
            .delete_message(entry.sequence)
            .await
            .map_err(js_err)?;
        replayed.push(entry);
    }
    Ok(replayed)
}

/// Deletes the selected dead letters (all with `all`). Returns how many were deleted.
pub async fn purge(
    js: &jetstream::Context,
    dlq: &str,
    selectors: &[String],
    all: bool,
) -> Result<u64, DlqError> {
    let mut stream = stream(js, dlq).await?;
    if all {
        return Ok(stream.purge().await.map_err(js_err)?.purged);
    }
    let mut deleted = 0;
    for msg in messages(&mut stream).await? {
        let entry = DeadLetterEntry::from_message(&msg);
        if selectors.iter().any(|s| entry.matches(s))
            && stream
                .delete_message(entry.sequence)
                .await
                .map_err(js_err)?
        {
            deleted += 1;
        }
    }
    Ok(deleted)
}
