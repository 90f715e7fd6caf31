//! JetStream plumbing shared by the gateway and the worker: connecting, the stream and consumer
//! definitions, publishing a call (with `Nats-Msg-Id` dedup) and dead-lettering a message.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;

use crate::config::{NatsArgs, StreamArgs};
use crate::message::QueuedCall;

/// Room kept for NATS headers (message id, dead-letter reasons) when comparing an envelope with
/// the server's `max_payload`.
pub const HEADER_ALLOWANCE: usize = 4 * 1024;

/// Errors talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Could not connect.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// URL used.
        url: String,
        /// Cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// Stream create/update/lookup failed.
    #[error("stream {name}: {message}")]
    Stream {
        /// Stream name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// Consumer create/lookup failed.
    #[error("consumer {name}: {message}")]
    Consumer {
        /// Consumer name.
        name: String,
        /// What went wrong.
        message: String,
    },
}

/// Why a publish did not store the call.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not connected to NATS right now.
    #[error("not connected to NATS")]
    Disconnected,
    /// The envelope is larger than the server accepts.
    #[error("message of {size} bytes exceeds the NATS max payload of {max} bytes")]
    TooLarge {
        /// Envelope size.
        size: usize,
        /// Server limit.
        max: usize,
    },
    /// The stream refused it or did not answer: full, missing, timed out.
    #[error("JetStream did not store the call: {0}")]
    NotStored(String),
    /// Could not encode the envelope.
    #[error("cannot encode the call: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Connects with unlimited reconnects, including on the first connect, so a process started
/// before NATS comes up waits for it instead of exiting.
pub async fn connect(nats: &NatsArgs, name: &str) -> Result<async_nats::Client, QueueError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .request_timeout(Some(nats.nats_request_timeout))
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                async_nats::Event::Closed => tracing::info!("NATS connection closed"),
                other => tracing::warn!(event = %other, "NATS event"),
            }
        })
        .connect(nats.nats_url.as_str())
        .await
        .map_err(|source| QueueError::Connect {
            url: nats.nats_url.clone(),
            source,
        })
}

/// Sends what the client still buffers (acks, naks) before the process exits. Bounded: with
/// NATS unreachable a flush would wait for a reconnect that may never come.
pub async fn flush_before_exit(client: &async_nats::Client) {
    if client.connection_state() != async_nats::connection::State::Connected {
        tracing::warn!("not connected to NATS at exit; unsent acks will be redelivered");
        return;
    }
    match tokio::time::timeout(Duration::from_secs(5), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not flush the NATS connection at exit"),
        Err(_) => tracing::warn!("NATS unreachable at exit; unsent acks will be redelivered"),
    }
}

/// A JetStream context with the configured request timeout.
pub fn jetstream(client: async_nats::Client, nats: &NatsArgs) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(nats.nats_request_timeout)
        .build(client)
}

/// The subject a call is published on: `<prefix>.<namespace or _>.<function>`. One token per
/// namespace and function leaves room for per-function consumers (filter subjects).
pub fn call_subject(prefix: &str, call: &QueuedCall) -> String {
    let ns = call.meta.namespace.as_deref().unwrap_or("_");
    format!("{prefix}.{ns}.{}", call.meta.function)
}

/// The queued-calls stream definition: work-queue retention (a message is gone once acked), file
/// storage, discard-new when full (publishers get an error, so the gateway answers 503).
pub fn stream_config(nats: &NatsArgs, settings: &StreamArgs, max_payload: usize) -> stream::Config {
    stream::Config {
        name: nats.stream.clone(),
        subjects: vec![format!("{}.>", nats.subject_prefix)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_age: settings.stream_max_age,
        max_bytes: if settings.stream_max_bytes == 0 {
            -1
        } else {
            i64::try_from(settings.stream_max_bytes).unwrap_or(i64::MAX)
        },
        max_message_size: i32::try_from(max_payload).unwrap_or(i32::MAX),
        num_replicas: settings.stream_replicas,
        duplicate_window: settings.stream_duplicate_window,
        description: Some("queued async function calls (gateway-plugin -> queue-worker)".into()),
        ..Default::default()
    }
}

/// The dead-letter stream: limits retention, kept until purged or aged out.
pub fn dead_letter_stream_config(nats: &NatsArgs, settings: &StreamArgs) -> stream::Config {
    stream::Config {
        name: nats.dead_letter_stream.clone(),
        subjects: vec![format!("{}.>", nats.dead_letter_stream)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_age: Duration::from_secs(7 * 24 * 3600).max(settings.stream_max_age),
        num_replicas: settings.stream_replicas,
        description: Some("async calls that could not be processed".into()),
        ..Default::default()
    }
}

/// Creates or updates both streams. Called by the gateway at start and after NATS comes back.
pub async fn ensure_streams(
    js: &jetstream::Context,
    nats: &NatsArgs,
    settings: &StreamArgs,
    max_payload: usize,
) -> Result<(), QueueError> {
    for config in [
        stream_config(nats, settings, max_payload),
        dead_letter_stream_config(nats, settings),
    ] {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| QueueError::Stream {
                name,
                message: e.to_string(),
            })?;
    }
    Ok(())
}

/// Publishes a call and waits for JetStream's acknowledgement: when this returns `Ok` the call
/// is stored durably. Returns whether JetStream saw the call id before (a retried publish).
pub async fn publish_call(
    client: &async_nats::Client,
    js: &jetstream::Context,
    subject_prefix: &str,
    call: &QueuedCall,
) -> Result<bool, PublishError> {
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err(PublishError::Disconnected);
    }
    let payload = call.encode()?;
    let max = client.server_info().max_payload;
    if payload.len() + HEADER_ALLOWANCE > max {
        return Err(PublishError::TooLarge {
            size: payload.len(),
            max: max.saturating_sub(HEADER_ALLOWANCE),
        });
    }
    let publish = jetstream::message::PublishMessage::build()
        .payload(payload)
        .message_id(call.meta.call_id.as_str());
    let ack = js
        .send_publish(call_subject(subject_prefix, call), publish)
        .await
        .map_err(|e| PublishError::NotStored(e.to_string()))?
        .await
        .map_err(|e| PublishError::NotStored(e.to_string()))?;
    Ok(ack.duplicate)
}

/// The durable pull consumer all workers share (a work-queue stream allows one per subject).
pub fn consumer_config(
    name: &str,
    subject_prefix: &str,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        description: Some("queue-worker: async function calls".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending,
        filter_subject: format!("{subject_prefix}.>"),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// Finds the stream (created by the gateway) and creates or updates the durable consumer.
pub async fn bind_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    config: consumer::pull::Config,
) -> Result<consumer::PullConsumer, QueueError> {
    let name = config.durable_name.clone().unwrap_or_default();
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|e| QueueError::Stream {
            name: stream_name.to_owned(),
            message: e.to_string(),
        })?;
    stream
        .create_consumer(config)
        .await
        .map_err(|e| QueueError::Consumer {
            name,
            message: e.to_string(),
        })
}

/// Why a message is being dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The payload is not a valid envelope.
    Undecodable,
    /// The function kept failing with retryable errors until no attempts were left.
    RetriesExhausted,
    /// The call was older than its maximum age before it could run.
    Expired,
    /// The function ran but its callback could not be delivered.
    CallbackFailed,
}

impl DeadLetterReason {
    /// Stable name used in headers and subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Expired => "expired",
            Self::CallbackFailed => "callback_failed",
        }
    }
}

/// Headers of a dead letter (its payload is the original message, untouched).
pub mod dead_letter_headers {
    /// Why (`undecodable`, `retries_exhausted`, `expired`, `callback_failed`).
    pub const REASON: &str = "Dead-Letter-Reason";
    /// Subject the call was queued on (replay publishes there again).
    pub const SUBJECT: &str = "Dead-Letter-Subject";
    /// Data-free explanation.
    pub const DETAIL: &str = "Dead-Letter-Detail";
    /// When it was dead-lettered, Unix nanoseconds.
    pub const TIME: &str = "Dead-Letter-Time";
    /// The function's last status, when there was an attempt.
    pub const LAST_STATUS: &str = "Dead-Letter-Last-Status";
    /// Function invocations made.
    pub const ATTEMPTS: &str = "Dead-Letter-Attempts";
    /// The call id, when the message could be decoded.
    pub const CALL_ID: &str = "Dead-Letter-Call-Id";
    /// When the gateway accepted the call, Unix nanoseconds.
    pub const RECEIVED: &str = "Dead-Letter-Received-Time";
}

/// What is known about a message being dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// Why.
    pub reason: DeadLetterReason,
    /// Data-free explanation.
    pub detail: &'a str,
    /// Subject the message came from.
    pub original_subject: &'a str,
    /// Its stream sequence (makes the dead-letter publish idempotent).
    pub stream_sequence: u64,
    /// Call id, if decoded.
    pub call_id: Option<&'a str>,
    /// Accepted at, if decoded.
    pub received_at_unix_nanos: Option<u64>,
    /// The function's last status, if it ran.
    pub last_status: Option<u16>,
    /// Invocations made.
    pub attempts: u32,
}

/// Copies a message, untouched, to the dead-letter stream with what is known in headers, and
/// waits for the store acknowledgement. The caller acks the original only after this succeeds.
/// Publishing the same message twice (a crash in between) is stored once.
pub async fn dead_letter(
    js: &jetstream::Context,
    dead_letter_stream: &str,
    payload: Bytes,
    letter: &DeadLetter<'_>,
) -> Result<(), PublishError> {
    use dead_letter_headers as h;
    let mut headers = HeaderMap::new();
    headers.insert(h::REASON, letter.reason.as_str());
    headers.insert(h::SUBJECT, letter.original_subject);
    // Header values cannot hold newlines; the detail is an error message we produced.
    let detail: String = letter
        .detail
        .chars()
        .filter(|c| !c.is_control())
        .take(512)
        .collect();
    headers.insert(h::DETAIL, HeaderValue::from(detail.as_str()));
    headers.insert(
        h::TIME,
        HeaderValue::from(crate::unix_nanos_now().to_string().as_str()),
    );
    headers.insert(
        h::ATTEMPTS,
        HeaderValue::from(letter.attempts.to_string().as_str()),
    );
    if let Some(status) = letter.last_status {
        headers.insert(
            h::LAST_STATUS,
            HeaderValue::from(status.to_string().as_str()),
        );
    }
    if let Some(id) = letter.call_id {
        headers.insert(h::CALL_ID, id);
    }
    if let Some(at) = letter.received_at_unix_nanos {
        headers.insert(h::RECEIVED, HeaderValue::from(at.to_string().as_str()));
    }
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        HeaderValue::from(
            format!("{}-{}", letter.original_subject, letter.stream_sequence).as_str(),
        ),
    );
    let subject = format!("{dead_letter_stream}.{}", letter.reason.as_str());
    js.publish_with_headers(subject, headers, payload)
        .await
        .map_err(|e| PublishError::NotStored(e.to_string()))?
        .await
        .map_err(|e| PublishError::NotStored(e.to_string()))?;
    Ok(())
}
