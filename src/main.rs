//! `faas-async`: the all-in-one server. Gateway, worker pool and queue in one process.
//!
//! - Without a NATS URL, the queue is the embedded one (sled, under `--queue-dir`): one command
//!   and nothing else installed gives a working async path on one machine.
//! - With `--nats-url` (or `NATS_URL`), the queue is JetStream and `--role` can run the gateway
//!   only or the worker only, so the same binary serves a laptop and a cluster.
//!
//! Every worker setting of `queue-worker` is a flag here too; `faas-async dlq ...` administers
//! the dead letters of whichever queue is configured.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, ValueEnum};
use gateway_plugin::HttpSettings;
use queue_core::backend::CallQueue;
use queue_core::backend::embedded::{EmbeddedOptions, EmbeddedQueue};
use queue_core::backend::jetstream::{ConsumerOptions, JetStreamOptions, JetStreamQueue};
use queue_core::blobs::SharedBlobs;
use queue_core::settings::{StreamArgs, parse_bytes, parse_duration};
use queue_worker::WorkerConfig;
use queue_worker::config::WorkerCommand;
use queue_worker::state::CallStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where the all-in-one server invokes functions unless `--gateway-url` says otherwise: the
/// address the example function (`stats-function`) listens on.
const DEFAULT_FUNCTIONS_URL: &str = "http://127.0.0.1:8081";

/// The blob store's directory inside the embedded queue's (`--queue-dir`).
const BLOB_DIR: &str = "bodies";

/// The async invocation system in one process: gateway + worker pool + queue (embedded by
/// default; JetStream when a NATS URL is given).
#[derive(Debug, Parser)]
#[command(name = "faas-async", version, about, args_override_self = true)]
struct ServerConfig {
    /// Server settings.
    #[command(flatten)]
    server: ServerArgs,
    /// Stream settings (JetStream), limits of the embedded queue.
    #[command(flatten)]
    stream: StreamArgs,
    /// Authentication and authorization of the HTTP front (as `gateway-plugin`'s).
    #[command(flatten)]
    auth: gateway_plugin::auth::AuthArgs,
    /// The audit log, quotas and rate limits of the HTTP front (as `gateway-plugin`'s).
    #[command(flatten)]
    controls: gateway_plugin::config::ControlArgs,
    /// Caps on the limits a call may set for itself (as `gateway-plugin`'s).
    #[command(flatten)]
    call_limits: gateway_plugin::overrides::CallLimitArgs,
    /// Front mode of the HTTP front: every other request passed to the OpenFaaS gateway (as
    /// `gateway-plugin`'s `--upstream-gateway`).
    #[command(flatten)]
    upstream: gateway_plugin::upstream::UpstreamArgs,
    /// Worker settings, NATS, logging, and the `dlq` command (as `queue-worker`'s).
    #[command(flatten)]
    worker: WorkerConfig,
}

/// What this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Gateway and worker.
    All,
    /// The HTTP front only. With JetStream, beside workers elsewhere; with the embedded queue,
    /// calls wait in `--queue-dir` until a `faas-async` with the worker opens it again (a
    /// maintenance window that still takes calls).
    Gateway,
    /// A worker only (JetStream).
    Worker,
}

/// Which queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum QueueKind {
    /// JetStream if a NATS URL is given (`--nats-url` or `NATS_URL`), else embedded.
    Auto,
    /// The embedded queue on local disk (one process).
    Embedded,
    /// NATS JetStream.
    Jetstream,
}

#[derive(Debug, Clone, Args)]
struct ServerArgs {
    /// What this process runs; worker-only needs JetStream (the embedded queue's calls come in
    /// through this process's own gateway).
    #[arg(long, env = "FAAS_ASYNC_ROLE", value_enum, default_value_t = Role::All)]
    role: Role,
    /// Which queue.
    #[arg(long, env = "FAAS_ASYNC_QUEUE", value_enum, default_value_t = QueueKind::Auto)]
    queue: QueueKind,
    /// Address of the HTTP front.
    #[arg(long, env = "FAAS_ASYNC_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Largest request body accepted (413 above it, the limit in the answer); GiB too: bodies
    /// above `--inline-body-bytes` go to the blob store.
    #[arg(long, env = "FAAS_ASYNC_MAX_BODY_BYTES", value_parser = parse_bytes)]
    max_body_bytes: Option<u64>,
    /// Largest body queued inside the call's message; a larger one is streamed into the blob
    /// store (embedded: files in `<queue-dir>/bodies`; JetStream: the bucket `<stream>-blobs`).
    #[arg(long, env = "FAAS_ASYNC_INLINE_BODY_BYTES", default_value = "256KiB", value_parser = parse_bytes)]
    inline_body_bytes: u64,
    /// A request's whole body must arrive within this time after its headers (`400
    /// unreadable_body` and the connection closed otherwise): raise it for large uploads.
    #[arg(long, env = "FAAS_ASYNC_BODY_READ_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    body_read_timeout: std::time::Duration,
    /// `Retry-After` of 503 answers.
    #[arg(long, env = "FAAS_ASYNC_RETRY_AFTER", default_value = "5s", value_parser = parse_duration)]
    retry_after: std::time::Duration,
    /// Directory of the embedded queue (sled; one process at a time).
    #[arg(long, env = "FAAS_ASYNC_QUEUE_DIR", default_value = "./data/queue")]
    queue_dir: PathBuf,
    /// Largest message (request metadata and body) the embedded queue takes.
    #[arg(long, env = "FAAS_ASYNC_QUEUE_MAX_MESSAGE_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    queue_max_message_bytes: u64,
    /// Memory the embedded queue's page cache may use.
    #[arg(long, env = "FAAS_ASYNC_QUEUE_CACHE_BYTES", default_value = "32MiB", value_parser = parse_bytes)]
    queue_cache_bytes: u64,
    /// Proxies (addresses or CIDR blocks, comma-separated) whose `X-Forwarded-For`,
    /// `X-Forwarded-Host`, `Forwarded` and `X-Real-Ip` are passed to functions. From any other
    /// peer they are dropped, and `X-Forwarded-For` is the peer's address.
    #[arg(long, env = "FAAS_ASYNC_TRUSTED_PROXIES", value_delimiter = ',', value_parser = gateway_plugin::peer::parse_ip_block)]
    trusted_proxies: Vec<gateway_plugin::peer::IpBlock>,
}

fn is_default(matches: &ArgMatches, id: &str) -> bool {
    matches
        .value_source(id)
        .is_none_or(|s| s == ValueSource::DefaultValue)
}

/// mimalloc instead of the system allocator: allocation was a quarter of the instructions an
/// accept costs with glibc's. Built without transparent huge pages (`no_thp`): with them the
/// worker's RSS doubled (BENCHMARKS.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let matches = ServerConfig::command().get_matches();
    let mut config = ServerConfig::from_arg_matches(&matches)?;
    queue_core::telemetry::init(&config.worker.log).map_err(anyhow::Error::msg)?;
    if is_default(&matches, "gateway_url") {
        config.worker.gateway_url = DEFAULT_FUNCTIONS_URL.to_owned();
    }
    queue_core::metrics::set_pro_labels(
        &config.worker.nats.stream,
        &config.worker.default_namespace,
    );
    let kind = match config.server.queue {
        QueueKind::Auto if is_default(&matches, "nats_url") => QueueKind::Embedded,
        QueueKind::Auto => QueueKind::Jetstream,
        other => other,
    };
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            queue_core::signal::shutdown_signal().await;
            stop.cancel();
        });
    }
    if let Some(WorkerCommand::SigningPublicKeys { file }) = &config.worker.command {
        return queue_worker::signing::print_public_keys(
            file.as_deref()
                .or(config.worker.callback_signing_keys_file.as_deref()),
            &mut std::io::stdout().lock(),
        )
        .context("signing-public-keys");
    }
    let dlq = config.worker.command.take();
    if let Some(note) = config
        .call_limits
        .fit_to(config.worker.records.records_retention)
    {
        tracing::warn!("{note}");
    }
    if kind == QueueKind::Embedded {
        if config.server.role == Role::Worker {
            bail!(
                "--role worker needs a shared queue: give --nats-url (the embedded queue serves one process, whose gateway feeds it)"
            );
        }
        let options = EmbeddedOptions {
            dir: config.server.queue_dir.clone(),
            subject_prefix: config.worker.nats.subject_prefix.clone(),
            ack_wait: config.worker.ack_wait,
            duplicate_window: config.stream.stream_duplicate_window,
            max_message_bytes: usize::try_from(config.server.queue_max_message_bytes)
                .unwrap_or(usize::MAX),
            max_bytes: config.stream.stream_max_bytes,
            cache_bytes: config.server.queue_cache_bytes,
            records_retention: config.worker.records.records_retention,
            max_result_bytes: usize::try_from(config.worker.records.max_result_bytes)
                .unwrap_or(usize::MAX),
            sealing: config.worker.encryption.sealing()?,
        };
        let dir = options.dir.display().to_string();
        let queue = EmbeddedQueue::open(options).with_context(|| {
            format!("cannot open the embedded queue in {dir} (is another faas-async using it?)")
        })?;
        let queue = Arc::new(queue);
        if let Some(WorkerCommand::Dlq { action }) = dlq {
            let blobs = SharedBlobs::files(
                config.server.queue_dir.join(BLOB_DIR),
                config.worker.encryption.sealing()?,
            )
            .await
            .with_context(|| format!("cannot open the blob store in {dir}/{BLOB_DIR}"))?;
            return dead_letters(queue.as_ref(), &blobs, action).await;
        }
        // One database for the queue and the worker's dedup state: one group commit covers
        // both (--state-dir is not used with the embedded queue).
        let (db, flusher) = queue.database();
        let state = CallStore::in_database(db, flusher, config.worker.dedup_retention)
            .with_context(|| format!("cannot open the dedup state in {dir}"))?;
        // Large bodies and results: files beside the database, in the same locked directory.
        let blobs = SharedBlobs::files(
            config.server.queue_dir.join(BLOB_DIR),
            config.worker.encryption.sealing()?,
        )
        .await
        .with_context(|| format!("cannot open the blob store in {dir}/{BLOB_DIR}"))?;
        return serve(
            config,
            queue,
            &format!("embedded, in {dir}"),
            stop,
            Some(state),
            blobs,
        )
        .await;
    }
    let with_gateway = config.server.role != Role::Worker;
    let with_worker = config.server.role != Role::Gateway;
    let options = JetStreamOptions {
        nats: config.worker.nats.clone(),
        manage_streams: (with_gateway && dlq.is_none()).then(|| config.stream.clone()),
        consumer: with_worker.then(|| ConsumerOptions {
            name: config.worker.consumer.clone(),
            ack_wait: config.worker.ack_wait,
            max_ack_pending: config.worker.max_ack_pending,
            lane_idle: config.worker.lane_idle(),
        }),
        records: config.worker.records.clone(),
        sealing: config.worker.encryption.sealing()?,
    };
    let nats_url = queue_core::settings::redact_url(&config.worker.nats.nats_url);
    let sealing = options.sealing.clone();
    let queue = JetStreamQueue::connect(options, "faas-async", stop.clone()).await?;
    if let Some(WorkerCommand::Dlq { action }) = dlq {
        let blobs = SharedBlobs::jetstream(
            queue.context().clone(),
            &config.worker.nats.stream,
            None,
            sealing,
        );
        return dead_letters(queue.as_ref(), &blobs, action).await;
    }
    // The gateway creates the bucket with the streams; a worker alone opens it as found.
    let blobs = if with_gateway {
        gateway_plugin::jetstream_blobs(&queue, &config.worker.nats.stream, &config.stream, sealing)
    } else {
        SharedBlobs::jetstream(
            queue.context().clone(),
            &config.worker.nats.stream,
            None,
            sealing,
        )
    };
    serve(
        config,
        queue,
        &format!("JetStream at {nats_url}"),
        stop,
        None,
        blobs,
    )
    .await
}

async fn dead_letters<Q: CallQueue>(
    queue: &Q,
    blobs: &SharedBlobs,
    action: queue_worker::config::DlqAction,
) -> anyhow::Result<()> {
    queue_worker::dlq::run_command(queue, Some(blobs), action, &mut std::io::stdout().lock())
        .await
        .context("dead-letter command failed")
}

/// Runs the configured roles on `queue` until `stop` fires.
async fn serve<Q: CallQueue>(
    config: ServerConfig,
    queue: Arc<Q>,
    queue_description: &str,
    stop: CancellationToken,
    state: Option<CallStore>,
    blobs: SharedBlobs,
) -> anyhow::Result<()> {
    let role = config.server.role;
    let mut tasks = tokio::task::JoinSet::new();
    if role != Role::Worker {
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let address = listener.local_addr()?;
        let settings = HttpSettings {
            max_body_bytes: config.server.max_body_bytes,
            inline_body_bytes: config.server.inline_body_bytes,
            blobs: Some(blobs.clone()),
            retry_after: config.server.retry_after,
            shutdown_grace: config.worker.shutdown_grace,
            trusted_proxies: gateway_plugin::peer::TrustedProxies(
                config.server.trusted_proxies.clone(),
            ),
            default_namespace: config.worker.default_namespace.clone(),
            callback_policy: config.worker.callback_policy.policy(),
            auth: config.auth.clone(),
            controls: config.controls.clone(),
            call_limits: config.call_limits.clone(),
            upstream: config.upstream.clone(),
        };
        let queue = queue.clone();
        let stop = stop.clone();
        let body_read_timeout = config.server.body_read_timeout;
        tasks.spawn(async move {
            let limits = gateway_plugin::connections::ConnectionLimits {
                body_read_timeout,
                ..Default::default()
            };
            gateway_plugin::serve_limited(
                queue,
                settings,
                limits,
                None,
                listener,
                stop.cancelled_owned(),
            )
            .await
            .context("gateway failed")
        });
        print_banner(address, role, queue_description, &config.worker.gateway_url);
    }
    if role == Role::Worker {
        // No HTTP front in this process: the worker serves /metrics on its own address.
        queue_worker::worker::serve_metrics(
            config.worker.metrics_listen,
            queue_worker::worker::metrics_tls(&config.worker)?,
            queue.clone(),
            stop.clone(),
        )
        .await;
    }
    if role != Role::Gateway {
        let worker = config.worker;
        let stop = stop.clone();
        tasks.spawn(async move {
            queue_worker::worker::run_with_blobs(
                worker,
                queue,
                state,
                Some(blobs),
                stop.cancelled_owned(),
            )
            .await
            .context("worker failed")
        });
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        // One part stopping (by error or not) stops the other.
        stop.cancel();
        let outcome = done.context("task panicked").and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "stopping");
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

#[allow(clippy::print_stdout, reason = "the start-up banner is for the user")]
fn print_banner(address: SocketAddr, role: Role, queue: &str, functions: &str) {
    let base = format!("http://{address}");
    let functions = queue_core::settings::redact_url(functions);
    println!("faas-async listening on {base}");
    println!("  queue:     {queue}");
    if role == Role::All {
        println!("  functions: {functions}/function/{{name}}");
    }
    println!("  call one:  curl -i {base}/async-function/stats -d '[1, 2, 3, 4]' \\");
    println!("               -H 'X-Callback-Url: http://127.0.0.1:8082/'");
    println!("  ready:     curl {base}/readyz");
}
