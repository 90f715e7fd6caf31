//! `gateway-plugin`: the OpenFaaS-compatible `/async-function/` endpoint. It validates a call,
//! publishes it to the queue (JetStream, or the embedded queue of the all-in-one server) in the envelope `queue-worker` defines, and answers `202 Accepted`
//! with `X-Call-Id` only after the queue stored the call durably.
//!
//! # Layout
//! - [`auth`]: authentication (basic auth, API tokens, JWT) and the authorization layer.
//! - [`audit`]: the audit log (admin changes, cancels, result reads, refusals).
//! - [`quota`]: quotas and rate limits per namespace and subject (`--quotas-file`).
//! - [`cors`]: CORS per function, namespace and for `/async-calls/...` (`--cors-file`).
//! - [`reload`]: the settings files reread on change and on SIGHUP (tokens, policy, quotas,
//!   CORS).
//! - [`admin`]: the queue admin API (`/system/async/...`).
//! - [`tenancy`]: admin views by namespace ([`tenancy::AdminView`]).
//! - [`calls`]: call records and kept results (`/async-calls/{id}`).
//! - [`state`]: [`state::AppState`], what every handler shares.
//! - [`routes`]: the router (the one place every route is declared) and the enqueue handler.
//! - [`live`]: live figures for the dashboard, from the workers' outcome announcements.
//! - `dashboard.html`: the dashboard page (served at `/dashboard/`).
//! - [`site`]: cross-site requests (the guards of admin changes and of basic-auth invocations).
//! - [`peer`]: the peer address, trusted proxies, `X-Forwarded-For`.
//! - [`large`]: request bodies above the inline size, streamed into the blob store; the
//!   blob sweep.
//! - [`link`]: the body limit derived from the queue's message limit.
//! - [`error`]: JSON error answers.
//! - [`connections`]: the accept loop: connection limit, header and body deadlines.
//! - [`config`]: settings (flags and environment variables; OpenFaaS's NATS variables).
//! - [`upstream`]: front mode (`--upstream-gateway`): every other request streamed to the
//!   OpenFaaS gateway.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod authorize;
pub mod calls;
pub mod config;
pub mod connections;
pub mod cors;
pub mod error;
pub mod large;
pub mod link;
pub mod live;
pub mod openapi;
pub mod overrides;
pub mod paths;
pub mod peer;
pub mod quota;
pub mod reload;
pub mod routes;
pub mod site;
pub mod state;
pub mod tenancy;
pub mod upstream;
pub mod verb;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub use config::GatewayConfig;
use queue_core::backend::CallQueue;
use queue_core::backend::jetstream::{JetStreamOptions, JetStreamQueue};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The queue could not be set up.
    #[error(transparent)]
    Queue(#[from] queue_core::backend::BackendError),
    /// The authentication settings are unusable.
    #[error("authentication: {0}")]
    Auth(#[from] auth::AuthError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Serve(#[from] std::io::Error),
    /// The listener's TLS certificate or key cannot be used.
    #[error("TLS listener: {0}")]
    Tls(#[from] connections::TlsFileError),
    /// The encryption keys file cannot be used.
    #[error(transparent)]
    Keys(#[from] queue_core::sealing::KeyFileError),
    /// The audit log cannot be written.
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    /// The quotas file cannot be used.
    #[error(transparent)]
    Quotas(#[from] quota::QuotaError),
    /// The CORS file cannot be used.
    #[error(transparent)]
    Cors(#[from] cors::CorsError),
}

/// How the HTTP front behaves, whatever the queue.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest request body (without a blob store, lowered to what the queue allows).
    pub max_body_bytes: Option<u64>,
    /// Largest body queued inline; larger ones go to `blobs`.
    pub inline_body_bytes: u64,
    /// Where bodies above the inline size go (`None`: none; every body inline).
    pub blobs: Option<queue_core::blobs::SharedBlobs>,
    /// `Retry-After` of 503 answers.
    pub retry_after: Duration,
    /// How long requests in progress may take to finish at shutdown.
    pub shutdown_grace: Duration,
    /// Peers whose forwarding headers (`X-Forwarded-For`, ...) are believed.
    pub trusted_proxies: peer::TrustedProxies,
    /// The workers' default namespace: `fn.{it}` is the function `fn`.
    pub default_namespace: String,
    /// Where callbacks may go: a callback URL it refuses as written is answered `400`
    /// `callback_not_allowed`.
    pub callback_policy: queue_core::egress::EgressPolicy,
    /// Who may do what (no authenticator: every route open, with a warning at start).
    pub auth: auth::AuthArgs,
    /// The audit log, quotas and rate limits.
    pub controls: config::ControlArgs,
    /// Caps on the limits a call may set for itself (`X-Max-Retries`, `X-Timeout`, `X-Max-Age`).
    pub call_limits: overrides::CallLimitArgs,
    /// Front mode: the OpenFaaS gateway every other request is passed to, and its timeouts.
    pub upstream: upstream::UpstreamArgs,
}

/// What [`HttpSettings::controls`] names, opened and read: checked before anything else starts,
/// so an unusable file stops the gateway at once.
#[derive(Debug)]
struct Controls {
    audit: Arc<audit::AuditLog>,
    quotas: Option<Arc<quota::Quotas>>,
    cors: Option<Arc<cors::CorsFile>>,
}

impl Controls {
    fn load(args: &config::ControlArgs, default_namespace: &str) -> Result<Self, GatewayError> {
        let audit = Arc::new(audit::AuditLog::open(args.audit_log.as_deref())?);
        if let Some(path) = &args.audit_log {
            tracing::info!(path = %path.display(), "audit log");
        }
        let quotas = match &args.quotas_file {
            Some(path) => {
                let quotas = quota::Quotas::load(path)?;
                tracing::info!(path = %path.display(), "quotas and rate limits");
                Some(Arc::new(quotas))
            }
            None => None,
        };
        let cors = match &args.cors_file {
            Some(path) => {
                let cors = cors::CorsPolicy::load(path, default_namespace)?;
                tracing::info!(path = %path.display(), "CORS settings");
                Some(Arc::new(cors))
            }
            None => None,
        };
        Ok(Self {
            audit,
            quotas,
            cors,
        })
    }
}

/// Serves on `listener` with JetStream as the queue until `shutdown` completes, then lets
/// requests in progress finish (up to the grace period) and flushes the NATS connection.
pub async fn run(
    mut config: GatewayConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    // Checked before connecting: a bad certificate fails at once, whatever NATS does.
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(connections::tls_acceptor(cert, key)?),
        _ => None,
    };
    if let Some(note) = config.call_limits.fit_to(config.records.records_retention) {
        tracing::warn!("{note}");
    }
    let controls = Controls::load(&config.controls, &config.default_namespace)?;
    queue_core::metrics::set_pro_labels(&config.nats.stream, &config.default_namespace);
    let stop = CancellationToken::new();
    let options = JetStreamOptions {
        nats: config.nats.clone(),
        manage_streams: Some(config.stream.clone()),
        consumer: None,
        records: config.records.clone(),
        sealing: config.encryption.sealing()?,
    };
    let sealing = options.sealing.clone();
    let queue = JetStreamQueue::connect(options, "gateway-plugin", stop.clone()).await?;
    tracing::info!(
        nats = %queue_core::settings::redact_url(&config.nats.nats_url),
        "queue: JetStream"
    );
    let mut settings = config.http_settings();
    settings.blobs = Some(jetstream_blobs(
        &queue,
        &config.nats.stream,
        &config.stream,
        sealing,
    ));
    let result = serve_loaded(
        queue,
        settings,
        controls,
        config.connection_limits(),
        tls,
        listener,
        shutdown,
    )
    .await;
    stop.cancel();
    result
}

/// The blob store of a gateway on JetStream: the calls stream's object-store bucket
/// (`<stream>-blobs`, its replicas), created in the background once the streams are ready
/// (not to slow their set-up) and, failing that, when a large body first needs it.
pub fn jetstream_blobs(
    queue: &Arc<JetStreamQueue>,
    stream: &str,
    stream_args: &queue_core::settings::StreamArgs,
    sealing: queue_core::sealing::Sealing,
) -> queue_core::blobs::SharedBlobs {
    let settings = queue_core::blobs::jetstream::BucketSettings::following(stream_args, 0);
    let blobs = queue_core::blobs::SharedBlobs::jetstream(
        queue.context().clone(),
        stream,
        Some(settings),
        sealing,
    );
    let early = blobs.clone();
    let queue = queue.clone();
    tokio::spawn(async move {
        // Up to 5 minutes; after that the first large body creates it.
        for _ in 0..1500 {
            if queue.check_ready().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if early.opened().is_some() {
                return;
            }
        }
        if let Err(e) = early.store().await {
            tracing::warn!(error = %e, "the blob store is not ready yet; tried again when a large body needs it");
        }
    });
    blobs
}

/// Serves with the default [`connections::ConnectionLimits`]; see [`serve_limited`].
pub async fn serve<Q: CallQueue>(
    queue: Arc<Q>,
    settings: HttpSettings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    serve_limited(
        queue,
        settings,
        connections::ConnectionLimits::default(),
        None,
        listener,
        shutdown,
    )
    .await
}

/// Serves on `listener`, storing calls in `queue`, until `shutdown` completes; then lets
/// requests in progress finish (up to the grace period) and flushes the queue.
pub async fn serve_limited<Q: CallQueue>(
    queue: Arc<Q>,
    settings: HttpSettings,
    limits: connections::ConnectionLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let controls = Controls::load(&settings.controls, &settings.default_namespace)?;
    serve_loaded(queue, settings, controls, limits, tls, listener, shutdown).await
}

async fn serve_loaded<Q: CallQueue>(
    queue: Arc<Q>,
    settings: HttpSettings,
    controls: Controls,
    limits: connections::ConnectionLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let authenticator = auth::Authenticator::from_args(&settings.auth)?.map(Arc::new);
    if authenticator.is_none() {
        tracing::warn!(
            "NO AUTHENTICATION: no authenticator is configured (--basic-auth, --auth-tokens-file, --jwks-file, --jwks-url); every route, admin included, is open to anyone who can reach this gateway"
        );
    }
    let live = Arc::new(live::LiveStats::default());
    let follow_stop = CancellationToken::new();
    // The settings files reread while the gateway runs (one task, one SIGHUP handler).
    let mut watched = Vec::new();
    if let Some(authenticator) = &authenticator {
        watched.extend(authenticator.watched());
        tokio::spawn(auth::follow_jwks(
            authenticator.clone(),
            follow_stop.clone(),
        ));
    }
    tokio::spawn(live::follow(
        queue.clone(),
        live.clone(),
        follow_stop.clone(),
    ));
    let upstream = upstream::Upstream::from_args(
        &settings.upstream,
        settings.trusted_proxies.clone(),
        tls.is_some(),
    )
    .map(Arc::new);
    if let Some(upstream) = &upstream {
        tracing::info!(
            upstream = %upstream.url(),
            "front mode: requests outside this gateway's routes go to the OpenFaaS gateway"
        );
    }
    let state = Arc::new(state::AppState {
        queue: queue.clone(),
        retry_after: settings.retry_after,
        configured_max_body: settings.max_body_bytes,
        inline_body_bytes: settings.inline_body_bytes,
        blobs: settings.blobs,
        warned_max_body: AtomicBool::new(false),
        metrics: queue_core::metrics::install(),
        live: live.clone(),
        trusted_proxies: settings.trusted_proxies,
        default_namespace: settings.default_namespace,
        callback_policy: settings.callback_policy,
        auth: authenticator,
        audit: controls.audit,
        quotas: controls.quotas.clone(),
        call_limits: settings.call_limits,
        cors: controls.cors,
        upstream,
    });
    watched.extend(controls.quotas.as_ref().and_then(|q| q.watched()));
    if let Some(cors) = &state.cors {
        watched.push(cors.clone() as Arc<dyn reload::Watched>);
    }
    tokio::spawn(reload::watch(watched, follow_stop.clone()));
    if let Some(blobs) = &state.blobs {
        tokio::spawn(large::follow_sweeps(
            queue.clone(),
            blobs.clone(),
            follow_stop.clone(),
        ));
    }
    if let (Some(quotas), Some(blobs)) = (&controls.quotas, &state.blobs) {
        tokio::spawn(quota::follow_stored(
            blobs.clone(),
            quotas.clone(),
            follow_stop.clone(),
        ));
    }
    if let Some(quotas) = controls.quotas {
        tokio::spawn(quota::follow_pending(
            queue.clone(),
            quotas,
            state.default_namespace.clone(),
            follow_stop.clone(),
        ));
    }
    let app = routes::router(state);
    tracing::info!(listen = %listener.local_addr()?, "gateway-plugin listening");

    let stop_accepting = CancellationToken::new();
    let serve = tokio::spawn(connections::serve(
        listener,
        app,
        limits,
        tls,
        stop_accepting.clone(),
    ));
    shutdown.await;
    stop_accepting.cancel();
    // Wait for the connections to drain, but not forever.
    let result = match tokio::time::timeout(settings.shutdown_grace, serve).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(join)) => Err(GatewayError::Serve(std::io::Error::other(join))),
        Err(_) => {
            tracing::warn!("grace period over with requests still in progress; stopping");
            Ok(())
        }
    };
    follow_stop.cancel();
    queue.flush_before_exit().await;
    tracing::info!("gateway-plugin stopped");
    result
}
