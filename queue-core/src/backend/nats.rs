//! JetStream plumbing under [`super::jetstream`]: connecting, the stream and consumer
//! definitions, and publishing a call with `Nats-Msg-Id` dedup.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use super::{PublishError, QueueError};
use crate::message::QueuedCall;
use crate::sealing::Sealing;
use std::path::Path;

use async_nats::ConnectErrorKind;

use crate::settings::{
    NatsArgs, NatsAuth, NatsConnection, NatsSettingsError, NatsTls, RecordArgs, StreamArgs,
    nats_setting,
};

/// Room kept for NATS headers (message id, dead-letter reasons) when comparing an envelope with
/// the server's `max_payload`.
pub const HEADER_ALLOWANCE: usize = 4 * 1024;

/// Connects with unlimited reconnects, so a process started before NATS comes up waits for it
/// instead of exiting. `--nats-url` may list several servers (comma-separated): the client
/// connects to one of them and moves to another when it is lost.
///
/// Credentials (in the URLs, or from `--nats-user`/`--nats-password-file`, `--nats-token-file`,
/// `--nats-creds`, `--nats-nkey`) and TLS (`--nats-ca`, `--nats-cert`/`--nats-key`) are read
/// from the settings here, secrets from their files; no URL the client keeps (and may log)
/// carries a credential, and no error or log line carries a secret.
///
/// Fails at once, naming the setting, on what waiting cannot fix: unusable settings (a list
/// that cannot be parsed, two ways to authenticate, an unreadable file), and on a first attempt
/// that reaches a server which refuses the credentials or whose TLS does not verify. A server
/// that cannot be reached is waited for, as before.
pub async fn connect(nats: &NatsArgs, name: &str) -> Result<async_nats::Client, QueueError> {
    connect_with(nats, name, true).await
}

/// Like [`connect`], but one attempt at every server and no waiting: a server that cannot be
/// reached is an error too. For commands that should fail fast (`dlq`), where [`connect`]
/// would wait for NATS.
pub async fn connect_once(nats: &NatsArgs, name: &str) -> Result<async_nats::Client, QueueError> {
    connect_with(nats, name, false).await
}

async fn connect_with(
    nats: &NatsArgs,
    name: &str,
    wait_for_server: bool,
) -> Result<async_nats::Client, QueueError> {
    let url = || crate::settings::redact_url(&nats.nats_url);
    let failed = |kind: ConnectErrorKind, cause: String| QueueError::Connect {
        url: url(),
        source: async_nats::ConnectError::with_source(kind, cause),
    };
    let connection = nats.connection().map_err(|e| match e {
        NatsSettingsError::Urls(e) => failed(ConnectErrorKind::ServerParse, e.to_string()),
        other => failed(ConnectErrorKind::Io, format!("NATS settings: {other}")),
    })?;
    check_tls_files(&connection.tls)
        .map_err(|e| failed(ConnectErrorKind::Tls, format!("NATS settings: {e}")))?;
    let servers = connection
        .urls
        .iter()
        .enumerate()
        .map(|(i, one)| {
            one.parse::<async_nats::ServerAddr>().map_err(|e| {
                let invalid = crate::settings::NatsUrlError::Invalid {
                    index: i + 1,
                    url: one.clone(),
                    reason: e.to_string(),
                };
                failed(ConnectErrorKind::ServerParse, invalid.to_string())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = options(&connection, nats, name)
        .await
        .map_err(|e| failed(ConnectErrorKind::Io, format!("NATS settings: {e}")))?;

    // One attempt at every server first: a refusal of the credentials or a certificate that
    // does not verify is a mistake in the settings, reported now rather than retried forever.
    match options.clone().connect(servers.clone()).await {
        Ok(client) => {
            check_server_version(&client.server_info().version).map_err(|message| {
                QueueError::UnsupportedServer {
                    url: url(),
                    message,
                }
            })?;
            return Ok(client);
        }
        Err(e) => {
            if let Some((kind, cause)) = fatal_cause(&e, &connection) {
                return Err(failed(kind, cause));
            }
            if !wait_for_server {
                return Err(QueueError::Connect {
                    url: url(),
                    source: e,
                });
            }
            tracing::warn!(error = %e, "NATS not reachable yet; waiting for it");
        }
    }
    options
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .map_err(|source| QueueError::Connect { url: url(), source })
}

/// The oldest nats-server this system runs on, and why: 2.9 brought the consumer-create API
/// that names the subject filter, and direct gets, which the workers and the call records use.
/// README, "NATS servers", gives the range the tests run against.
pub const MINIMUM_SERVER_VERSION: &str = "2.9.0";

/// Whether a server of `version` (`2.10.4`, `2.11.0-beta.1`, `v2.9.10`) is new enough; the
/// message names the version and the minimum when it is not. A version that does not read as
/// `major.minor.patch` is let through (a build that reports its own): what it lacks shows up as
/// a JetStream error naming the request.
pub fn check_server_version(version: &str) -> Result<(), String> {
    let number = |part: Option<&str>| -> Option<u64> {
        let digits: String = part?.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let parse = |v: &str| {
        let mut parts = v.trim().trim_start_matches('v').split('.');
        Some((
            number(parts.next())?,
            number(parts.next())?,
            number(parts.next()).unwrap_or(0),
        ))
    };
    match (parse(version), parse(MINIMUM_SERVER_VERSION)) {
        (Some(found), Some(minimum)) if found < minimum => Err(format!(
            "nats-server {} is too old: the oldest supported is {MINIMUM_SERVER_VERSION} \
             (upgrade the server; README, \"NATS servers\")",
            version.trim()
        )),
        _ => Ok(()),
    }
}

/// Whether a server of `version` is at least `major.minor` (a version that does not read as
/// one is taken to be: what it lacks shows up as a JetStream error).
pub fn server_has(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version.trim().trim_start_matches('v').split('.');
    let mut number = || -> Option<u64> {
        let digits: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    match (number(), number()) {
        (Some(found_major), Some(found_minor)) => (found_major, found_minor) >= (major, minor),
        _ => true,
    }
}

/// The client options: name, timeouts, reconnect events, credentials and TLS.
async fn options(
    connection: &NatsConnection,
    nats: &NatsArgs,
    name: &str,
) -> Result<async_nats::ConnectOptions, String> {
    let was_disconnected = Arc::new(AtomicBool::new(false));
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
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
                            metrics::counter!(crate::metrics::PRO_RECONNECTS).increment(1);
                        }
                    }
                    async_nats::Event::Disconnected => {
                        was_disconnected.store(true, Ordering::Relaxed);
                        tracing::warn!("disconnected from NATS");
                    }
                    async_nats::Event::Closed => tracing::info!("NATS connection closed"),
                    // A reconnect attempt that failed: an authorization violation here means
                    // the server now refuses the credentials (it is retried, as the server's
                    // configuration may be fixed without restarting the clients).
                    async_nats::Event::ClientError(error) => {
                        tracing::error!(%error, "NATS connection attempt failed");
                    }
                    other => tracing::warn!(event = %other, "NATS event"),
                }
            }
        });
    options = match &connection.auth {
        NatsAuth::None => options,
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => options.token(token.clone()),
        NatsAuth::NKey(seed) => options.nkey(seed.clone()),
        NatsAuth::CredsFile(path) => options
            .credentials_file(path)
            .await
            .map_err(|e| format!("{}: {e}", nats_setting::CREDS))?,
    };
    let tls = &connection.tls;
    if tls.required() {
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &tls.client_cert {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// Checks at start that the TLS files hold what they should (the client reads them only when
/// it connects, and would report a bad file as a failed connection, again and again).
fn check_tls_files(tls: &NatsTls) -> Result<(), NatsSettingsError> {
    use async_nats::rustls::pki_types::pem::{self, PemObject};
    use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let error = |setting: &'static str, path: &Path, e: pem::Error, what: &str| match e {
        pem::Error::Io(source) => NatsSettingsError::Read {
            setting,
            path: path.to_owned(),
            source,
        },
        _ => NatsSettingsError::BadFile {
            setting,
            path: path.to_owned(),
            reason: format!("no PEM {what} in it"),
        },
    };
    let certificates = |setting: &'static str, path: &Path| {
        let found = CertificateDer::pem_file_iter(path)
            .map_err(|e| error(setting, path, e, "certificate"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error(setting, path, e, "certificate"))?;
        if found.is_empty() {
            return Err(NatsSettingsError::BadFile {
                setting,
                path: path.to_owned(),
                reason: "no PEM certificate in it".into(),
            });
        }
        Ok(())
    };
    if let Some(ca) = &tls.ca {
        certificates(nats_setting::CA, ca)?;
    }
    if let Some((cert, key)) = &tls.client_cert {
        certificates(nats_setting::CERT, cert)?;
        PrivateKeyDer::from_pem_file(key)
            .map_err(|e| error(nats_setting::KEY, key, e, "private key"))?;
    }
    Ok(())
}

/// Whether a failed first attempt is a mistake in the settings (not a server that is down),
/// and what to say: which kind, and a cause naming the setting to check.
fn fatal_cause(
    error: &async_nats::ConnectError,
    connection: &NatsConnection,
) -> Option<(ConnectErrorKind, String)> {
    let kind = error.kind();
    match kind {
        ConnectErrorKind::AuthorizationViolation => Some((
            kind,
            match connection.auth {
                NatsAuth::None => "the server requires credentials and none are configured \
                                   (--nats-user with --nats-password-file, --nats-token-file, \
                                   --nats-creds, --nats-nkey, or user:password@ in --nats-url)"
                    .to_owned(),
                _ => format!(
                    "the server refused the credentials given by {}: wrong user, password, token or \
                     key, or not allowed on this server",
                    connection.auth_from
                ),
            },
        )),
        ConnectErrorKind::Authentication => Some((
            kind,
            format!(
                "the key of {} could not sign the server's challenge",
                connection.auth_from
            ),
        )),
        ConnectErrorKind::Tls => Some((kind, format!("TLS set-up failed: {error}"))),
        _ => tls_failure(error).map(|tls| {
            (
                ConnectErrorKind::Tls,
                format!(
                    "TLS handshake failed: {tls} (check {}: it must hold the authority that \
                     signed the server's certificate; if the server verifies clients, \
                     {} and {})",
                    nats_setting::CA,
                    nats_setting::CERT,
                    nats_setting::KEY
                ),
            )
        }),
    }
}

/// The TLS error somewhere in `error`'s chain of causes (a certificate that does not verify,
/// an alert from the server), if there is one.
fn tls_failure<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a async_nats::rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<async_nats::rustls::Error>() {
            return Some(tls);
        }
        // An I/O error's `source` skips the error it wraps: look at that one too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && let Some(tls) = tls_failure(inner)
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
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

/// The stream of scheduled calls beside the calls stream (`<stream>-delayed`).
pub fn delayed_stream_name(stream: &str) -> String {
    format!("{stream}-delayed")
}

/// The subject prefix of scheduled calls (`<prefix>-delayed`, outside the calls stream's
/// `<prefix>.>`): `<prefix>-delayed.<namespace or _>.<function>.<call id>` (the id as for
/// [`super::call_subject_with_id`]), which the scheduler releases on the same subject under
/// `<prefix>`.
pub fn delayed_subject_prefix(subject_prefix: &str) -> String {
    format!("{subject_prefix}-delayed")
}

/// The scheduled calls' stream: a call published with a not-before time waits here, apart from
/// the calls stream, so waiting calls never take a place in the workers' consumer
/// (`max_ack_pending`) nor delay the calls behind them. Work-queue retention (gone once the
/// scheduler moved it and acked), discard-new when full, the calls stream's size limits, and
/// no age limit: a scheduled call leaves only by being moved to the calls stream, never by
/// being dropped unseen (the gateway caps the delay with `--max-delay`).
pub fn delayed_stream_config(
    nats: &NatsArgs,
    settings: &StreamArgs,
    max_payload: usize,
) -> stream::Config {
    stream::Config {
        name: delayed_stream_name(&nats.stream),
        subjects: vec![format!(
            "{}.>",
            delayed_subject_prefix(&nats.subject_prefix)
        )],
        max_age: Duration::ZERO,
        description: Some(
            "scheduled async function calls, moved to the calls stream when due".into(),
        ),
        ..stream_config(nats, settings, max_payload)
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

/// The stream behind the records bucket (`KV_<bucket>`), as the client's key-value helper
/// defines it for a bucket with one value per key: rollups allowed, deletes only through the
/// bucket, direct gets, discard-new. Every field is what that helper sends, so a bucket it
/// created before is left as it is.
pub fn records_bucket_config(records: &RecordArgs, settings: &StreamArgs) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", records.records_bucket),
        description: Some("async call records and kept results".into()),
        subjects: vec![format!("$KV.{}.>", records.records_bucket)],
        max_messages_per_subject: 1,
        max_bytes: 0,
        max_age: records.records_retention,
        max_message_size: 0,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        num_replicas: settings.stream_replicas.max(1),
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// Creates or updates the streams (calls, dead letters, scheduled calls). Called by the gateway at start and after NATS comes back.
pub async fn ensure_streams(
    js: &jetstream::Context,
    nats: &NatsArgs,
    settings: &StreamArgs,
    max_payload: usize,
) -> Result<(), QueueError> {
    for config in [
        stream_config(nats, settings, max_payload),
        dead_letter_stream_config(nats, settings),
        delayed_stream_config(nats, settings, max_payload),
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
/// `subject` is where it is queued ([`super::call_subject`] or [`super::call_subject_with_id`]
/// under the calls' prefix, or under [`delayed_subject_prefix`] for a call with a not-before
/// time: the caller picks it).
/// `max_payload` is the server's limit (the envelope must fit with [`HEADER_ALLOWANCE`]).
pub async fn publish_call(
    client: &async_nats::Client,
    js: &jetstream::Context,
    subject: String,
    call: &QueuedCall,
    sealing: &Sealing,
    max_payload: usize,
) -> Result<bool, PublishError> {
    if client.connection_state() != async_nats::connection::State::Connected {
        return Err(PublishError::Disconnected);
    }
    let payload = call.encode_with(sealing)?;
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
        .send_publish(subject, publish)
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

/// The durable pull consumer of the workers' schedulers on the scheduled calls' stream
/// (`<consumer>-scheduler`). A scheduled call is delivered to it at once and naked with the
/// time left until due, so every waiting call is pending there: no limit on pending acks, and
/// no limit on deliveries (a long wait may be redelivered early, by a restart, and naked again).
pub fn scheduler_consumer_config(
    name: &str,
    subject_prefix: &str,
    ack_wait: Duration,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(format!("{name}-scheduler")),
        description: Some(
            "queue-worker: scheduled calls, moved to the calls stream when due".into(),
        ),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: -1,
        max_deliver: -1,
        filter_subject: format!("{}.>", delayed_subject_prefix(subject_prefix)),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// The durable pull consumer of one lane (fair workers, [`super::Lane`]): the lane's filters
/// only, so the lanes of a stream never overlap; the server deletes it after
/// `inactive_threshold` without a pull (its calls stay in the stream, and the next pull of the
/// lane creates it again).
pub fn lane_consumer_config(
    group: &str,
    subject_prefix: &str,
    lane: &super::Lane,
    ack_wait: Duration,
    max_ack_pending: i64,
    inactive_threshold: Duration,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(lane.consumer_name(group)),
        description: Some("queue-worker: async function calls of one lane".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending,
        filter_subjects: lane.filters(subject_prefix),
        deliver_policy: consumer::DeliverPolicy::All,
        inactive_threshold,
        ..Default::default()
    }
}

/// Whether a consumer could not be created because another consumer of the work-queue stream
/// filters on (some of) the same subjects: the other consumer layout (shared or by lane) is in
/// place.
pub fn is_overlapping_consumer(error: &jetstream::stream::ConsumerError) -> bool {
    use async_nats::jetstream::ErrorCode;
    match error.kind() {
        jetstream::stream::ConsumerErrorKind::JetStream(e) => {
            e.error_code() == ErrorCode::CONSUMER_WQ_CONSUMER_NOT_UNIQUE
                || e.error_code() == ErrorCode::CONSUMER_WQ_MULTIPLE_UNFILTERED
        }
        _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str) -> NatsArgs {
        NatsArgs::for_tests(url)
    }

    #[test]
    fn servers_older_than_2_9_are_refused_naming_both_versions() {
        for ok in [
            "2.9.0",
            "2.9.10",
            "v2.9.10",
            "2.10.4",
            "2.11.0-beta.1",
            "3.0.0",
            "custom",
        ] {
            assert!(check_server_version(ok).is_ok(), "{ok}");
        }
        for old in ["2.8.4", "2.2.6", "1.4.1", "v2.8.0-RC.1"] {
            let e = check_server_version(old).unwrap_err();
            assert!(
                e.contains(old.trim_start_matches('v')) && e.contains("2.9.0"),
                "{e}"
            );
        }
    }

    #[test]
    fn server_has_compares_major_and_minor() {
        assert!(server_has("2.10.0", (2, 10)));
        assert!(server_has("v2.15.1", (2, 10)));
        assert!(server_has("3.0.0", (2, 10)));
        assert!(!server_has("2.9.25", (2, 10)));
        assert!(!server_has("1.99.0", (2, 10)));
        assert!(server_has("custom", (2, 10)));
    }

    #[tokio::test]
    async fn connect_once_fails_on_an_unreachable_server_where_connect_waits() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let nats = args(&format!("nats://127.0.0.1:{port}"));
        let e = connect_once(&nats, "test")
            .await
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("cannot connect to NATS")));
        // `connect` hands back a client that keeps trying.
        let client = connect(&nats, "test").await.ok();
        assert!(
            client
                .is_some_and(|c| c.connection_state() != async_nats::connection::State::Connected)
        );
    }

    #[tokio::test]
    async fn a_bad_tls_file_fails_before_any_connection_naming_the_setting() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        let junk = dir.path().join("ca.pem");
        assert!(std::fs::write(&junk, "not PEM\n").is_ok());
        let mut nats = args("nats://127.0.0.1:1");
        nats.nats_ca = Some(junk);
        let e = connect(&nats, "test").await.err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(
                |e| e.contains("--nats-ca (NATS_CA)") && e.contains("no PEM certificate")
            ),
            "{e:?}"
        );
        let mut nats = args("nats://127.0.0.1:1");
        nats.nats_cert = Some(dir.path().join("missing.pem"));
        nats.nats_key = Some(dir.path().join("missing-key.pem"));
        let e = connect(&nats, "test").await.err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("--nats-cert (NATS_CERT)") && e.contains("missing.pem")),
            "{e:?}"
        );
    }
}
