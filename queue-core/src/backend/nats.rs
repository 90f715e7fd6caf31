//! JetStream plumbing under [`super::jetstream`]: connecting, the stream and consumer
//! definitions, and publishing a call with `Nats-Msg-Id` dedup.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use super::{PublishError, QueueError, call_subject};
use crate::message::QueuedCall;
use crate::settings::{NatsArgs, NatsCredentials, NatsServers, StreamArgs};

/// Room kept for NATS headers (message id, dead-letter reasons) when comparing an envelope with
/// the server's `max_payload`.
pub const HEADER_ALLOWANCE: usize = 4 * 1024;

/// Connects with unlimited reconnects, including on the first connect, so a process started
/// before NATS comes up waits for it instead of exiting. `--nats-url` may list several servers
/// (comma-separated): the client connects to one of them and moves to another when it is lost.
/// Credentials in the URLs (`user:password@`, `token@`) are taken out and given to the client
/// as options, so that no URL the client keeps (and may log) carries them. A list that cannot
/// be parsed fails at once, naming the bad entry (redacted).
pub async fn connect(nats: &NatsArgs, name: &str) -> Result<async_nats::Client, QueueError> {
    let was_disconnected = Arc::new(AtomicBool::new(false));
    let url = || crate::settings::redact_url(&nats.nats_url);
    let parse_error = |source: crate::settings::NatsUrlError| QueueError::Connect {
        url: url(),
        source: async_nats::ConnectError::with_source(
            async_nats::ConnectErrorKind::ServerParse,
            source,
        ),
    };
    let NatsServers { urls, credentials } =
        crate::settings::parse_nats_urls(&nats.nats_url).map_err(parse_error)?;
    let servers = urls
        .iter()
        .enumerate()
        .map(|(i, one)| {
            one.parse::<async_nats::ServerAddr>().map_err(|e| {
                parse_error(crate::settings::NatsUrlError::Invalid {
                    index: i + 1,
                    url: one.clone(),
                    reason: e.to_string(),
                })
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = match credentials {
        None => async_nats::ConnectOptions::new(),
        Some(NatsCredentials::UserPassword(user, password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        Some(NatsCredentials::Token(token)) => async_nats::ConnectOptions::with_token(token),
    };
    options
        .name(name)
        .retry_on_initial_connect()
        .request_timeout(Some(nats.nats_request_timeout))
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let was_disconnected = was_disconnected.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("connected to NATS");
                        if was_disconnected.swap(false, Ordering::Relaxed) {
                            metrics::counter!(crate::metrics::RECONNECTS).increment(1);
                        }
                    }
                    async_nats::Event::Disconnected => {
                        was_disconnected.store(true, Ordering::Relaxed);
                        tracing::warn!("disconnected from NATS");
                    }
                    async_nats::Event::Closed => tracing::info!("NATS connection closed"),
                    other => tracing::warn!(event = %other, "NATS event"),
                }
            }
        })
        .connect(servers)
        .await
        .map_err(|source| QueueError::Connect { url: url(), source })
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
/// `max_payload` is the server's limit (the envelope must fit with [`HEADER_ALLOWANCE`]).
pub async fn publish_call(
    client: &async_nats::Client,
    js: &jetstream::Context,
    subject_prefix: &str,
    call: &QueuedCall,
    max_payload: usize,
) -> Result<bool, PublishError> {
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err(PublishError::Disconnected);
    }
    let payload = call.encode()?;
    let max = max_payload;
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
