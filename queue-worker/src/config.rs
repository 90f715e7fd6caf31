//! Configuration: one clap-derive struct per binary, every setting a flag and an environment
//! variable, durations in humantime form (`30s`, `5m`). The NATS and stream settings are
//! shared with `gateway-plugin`, which flattens [`NatsArgs`] and [`StreamArgs`] into its own.
//!
//! OpenFaaS's queue-worker variables (`faas_nats_address`, `nats_host`, `max_inflight`, ...) are
//! read by [`crate::openfaas`], which turns them into flags that come before the real command
//! line. Precedence: command-line flag > our environment variable > OpenFaaS variable > default.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
pub use queue_core::settings::{
    CallbackPolicyArgs, EncryptionArgs, LogArgs, LogFormat, NatsArgs, RecordArgs, StreamArgs,
    parse_bytes, parse_duration, redact_url, with_leading_args,
};

/// Whether the gateway's function annotations are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Annotations {
    /// Read them.
    On,
    /// Do not.
    Off,
}

/// Whether each function's concurrency adapts to its answers ([`crate::concurrency`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Adaptive {
    /// Lowered on backpressure (429, 503, timeouts), raised again on answers.
    On,
    /// Fixed: the function's cap, else `--max-inflight`.
    Off,
}

/// How the worker reaches functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InvokeMode {
    /// Through the OpenFaaS gateway: `{gateway}/function/{name}{path}` (OpenFaaS's default).
    Gateway,
    /// Straight to the function's service: `http://{name}.{namespace}{suffix}:8080{path}`.
    Direct,
}

/// `queue-worker` settings.
#[derive(Debug, Clone, Parser)]
#[command(name = "queue-worker", version, about, args_override_self = true)]
pub struct WorkerConfig {
    /// Without a command, run the worker.
    #[command(subcommand)]
    pub command: Option<WorkerCommand>,
    /// NATS connection and stream names.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// Call records.
    #[command(flatten)]
    pub records: RecordArgs,
    /// Durable consumer shared by all workers.
    #[arg(
        long,
        env = "QUEUE_WORKER_CONSUMER",
        default_value = "faas-async-workers"
    )]
    pub consumer: String,
    /// Most function invocations this worker runs at once.
    #[arg(long, env = "QUEUE_WORKER_MAX_INFLIGHT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_inflight: u32,
    /// Adaptive concurrency per function: each function's calls at once are lowered when it
    /// pushes back (429, 503, timeouts) and raised again on its other answers, never above its
    /// `max_concurrency` or `--max-inflight`, never below 1; `on` or `off` (OpenFaaS:
    /// `limiter_enabled`). It starts at the cap, so it only ever lowers concurrency.
    #[arg(long, env = "QUEUE_WORKER_ADAPTIVE_CONCURRENCY", value_enum, default_value_t = Adaptive::On)]
    pub adaptive_concurrency: Adaptive,
    /// Time JetStream waits for an ack (or in-progress heartbeat) before redelivering.
    /// Short: a dead worker's calls are redelivered quickly; heartbeats keep long calls alive.
    #[arg(long, env = "QUEUE_WORKER_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// Upper bound on unacknowledged calls across all workers of the consumer.
    #[arg(long, env = "QUEUE_WORKER_MAX_ACK_PENDING", default_value_t = 20_000)]
    pub max_ack_pending: i64,
    /// Fair scheduling: pull each lane (one function at one priority: its own subject) through
    /// a consumer of its own, in weighted round-robin across namespaces, then functions, then
    /// priorities (4:2:1), so a backlog of one function does not hold back the others and
    /// `X-Priority` takes effect. Off: one consumer shared by all, in arrival order. Switch
    /// the whole fleet at once (each layout deletes the other's consumers; no call is lost).
    #[arg(long, env = "QUEUE_WORKER_FAIR_SCHEDULING", default_value_t = false, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub fair_scheduling: bool,
    /// Fair scheduling: the weights of namespaces (`team-a=3,team-b=1`; unlisted ones 1, the
    /// default namespace by its name). A namespace of weight 3 gets three pulls to one of
    /// weight 1 while both have calls waiting.
    #[arg(long, env = "QUEUE_WORKER_NAMESPACE_WEIGHTS", value_delimiter = ',', value_parser = parse_namespace_weight)]
    pub namespace_weights: Vec<(String, u32)>,
    /// Fair scheduling: the named queues this worker serves (comma-separated): the functions
    /// whose `queue` (`--functions-config`) or `com.openfaas.queue` annotation names one of
    /// them; `default` is the functions that name none. Workers of other queues never take
    /// these functions' calls, so a slow batch function and an interactive one never share
    /// capacity.
    #[arg(long, env = "QUEUE_WORKER_QUEUES", value_delimiter = ',', default_value = "default", value_parser = parse_queue_name)]
    pub queues: Vec<String>,
    /// Fair scheduling: how often the worker takes a census of the lanes (one listing of the
    /// consumers): it learns the lanes other workers pull, and lists the queue when it holds
    /// calls no known lane accounts for (an announcement missed in a reconnect). Publishers
    /// announce each call's lane, so a new lane is pulled from at once, not after this.
    #[arg(long, env = "QUEUE_WORKER_LANE_CENSUS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub lane_census_interval: Duration,
    /// How often the worker announces its status (its limit per function, calls in flight)
    /// for the gateway's admin API and dashboard; `0s`: never. At most 20s (a status is kept
    /// for three intervals).
    #[arg(long, env = "QUEUE_WORKER_STATUS_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub status_interval: Duration,
    /// Fair scheduling (JetStream): a lane's consumer not pulled from for this long is deleted
    /// by the server, and created again by the next call. Never less than twice
    /// `--upstream-timeout` (a consumer must outlive the calls it delivered).
    #[arg(long, env = "QUEUE_WORKER_LANE_IDLE", default_value = "1h", value_parser = parse_duration)]
    pub lane_idle: Duration,
    /// How long one pull request waits for messages before it is renewed.
    #[arg(long, env = "QUEUE_WORKER_PULL_EXPIRES", default_value = "5s", value_parser = parse_duration)]
    pub pull_expires: Duration,
    /// Gateway or direct invocation.
    #[arg(long, env = "QUEUE_WORKER_INVOKE_MODE", value_enum, default_value_t = InvokeMode::Gateway)]
    pub invoke_mode: InvokeMode,
    /// OpenFaaS gateway base URL (gateway mode).
    #[arg(
        long,
        env = "QUEUE_WORKER_GATEWAY_URL",
        default_value = "http://gateway:8080"
    )]
    pub gateway_url: String,
    /// Namespace used in direct mode when the call did not name one.
    #[arg(
        long,
        env = "QUEUE_WORKER_DEFAULT_NAMESPACE",
        default_value = "openfaas-fn"
    )]
    pub default_namespace: String,
    /// Namespaces a call may name in direct mode, besides the default one (comma-separated).
    /// A call naming any other namespace is not sent anywhere: it fails with status 403. The
    /// host a worker calls is `{name}.{namespace}{suffix}` with all three in the operator's
    /// hands, never the caller's.
    #[arg(long, env = "QUEUE_WORKER_ALLOWED_NAMESPACES", value_delimiter = ',')]
    pub allowed_namespaces: Vec<String>,
    /// DNS suffix appended to `{name}.{namespace}` in direct mode (e.g. `.svc.cluster.local`).
    #[arg(long, env = "QUEUE_WORKER_FUNCTION_SUFFIX", default_value = "")]
    pub function_suffix: String,
    /// Longest a single function call may take.
    #[arg(long, env = "QUEUE_WORKER_UPSTREAM_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub upstream_timeout: Duration,
    /// Largest function response kept and forwarded; a larger one is reported as status 502.
    #[arg(long, env = "QUEUE_WORKER_MAX_RESPONSE_BYTES", default_value = "32MiB", value_parser = parse_bytes)]
    pub max_response_bytes: u64,
    /// Largest function response held in memory; a larger one (up to
    /// `--max-response-bytes`) is streamed into the blob store as the call's result and sent
    /// to the callback from there. Without a blob store every response is held in memory.
    #[arg(long, env = "QUEUE_WORKER_INLINE_RESPONSE_BYTES", default_value = "256KiB", value_parser = parse_bytes)]
    pub inline_response_bytes: u64,
    /// Function invocations at most per call, the first included (retries on retryable
    /// failures: the statuses in `--retry-codes`, refused connections, timeouts).
    #[arg(long, env = "QUEUE_WORKER_RETRY_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub retry_max_attempts: u32,
    /// Base wait before the first retry; doubles per attempt (with jitter) up to the maximum.
    #[arg(long, env = "QUEUE_WORKER_RETRY_INITIAL_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub retry_initial_wait: Duration,
    /// Longest wait between attempts, `Retry-After` included.
    #[arg(long, env = "QUEUE_WORKER_RETRY_MAX_WAIT", default_value = "2m", value_parser = parse_duration)]
    pub retry_max_wait: Duration,
    /// Function statuses that are retried.
    #[arg(long, env = "QUEUE_WORKER_RETRY_CODES", default_value = "408,429,500,502,503,504", value_parser = crate::retry::parse_codes)]
    pub retry_codes: std::vec::Vec<u16>,
    /// How the wait before a retry is drawn from the exponential delay (OpenFaaS Pro's
    /// `backoff`): `exponential` (no jitter), `full` (anywhere from 0 to the delay), `equal`
    /// (from half the delay to the delay).
    #[arg(long, env = "QUEUE_WORKER_RETRY_BACKOFF", value_enum, default_value_t = crate::retry::Backoff::Equal)]
    pub retry_backoff: crate::retry::Backoff,
    /// A call older than this (since the gateway accepted it) is not invoked: it is
    /// dead-lettered with reason `expired`.
    #[arg(long, env = "QUEUE_WORKER_CALL_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    pub call_max_age: Duration,
    /// TOML file with per-function overrides of retries, timeout and max age (see README).
    #[arg(long, env = "QUEUE_WORKER_FUNCTIONS_CONFIG")]
    pub functions_config: Option<PathBuf>,
    /// Read OpenFaaS Pro's retry annotations (`com.openfaas.retry.attempts`, `.codes`,
    /// `.min_wait`, `.max_wait`) from the function list of the gateway at `--gateway-url`
    /// (`GET /system/functions`): `on` or `off`; on whenever OpenFaaS's own variables configure
    /// the worker, as OpenFaaS Pro's worker always reads them.
    #[arg(long, env = "QUEUE_WORKER_FUNCTION_ANNOTATIONS", value_enum, default_value_t = Annotations::Off)]
    pub function_annotations: Annotations,
    /// How often the function list is read again.
    #[arg(long, env = "QUEUE_WORKER_ANNOTATIONS_REFRESH", default_value = "30s", value_parser = parse_duration)]
    pub annotations_refresh: Duration,
    /// Directory holding `basic-auth-user` and `basic-auth-password` (as OpenFaaS mounts its
    /// gateway's credentials; OpenFaaS: `basic_auth=true` with `secret_mount_path`): sent as
    /// basic auth when the function list is read.
    #[arg(long, env = "QUEUE_WORKER_GATEWAY_CREDENTIALS_DIR")]
    pub gateway_credentials_dir: Option<PathBuf>,
    /// Encryption at rest (`--encryption-keys-file`): queued calls opened, kept results and
    /// the dedup state's outcomes sealed.
    #[command(flatten)]
    pub encryption: EncryptionArgs,
    /// Where callbacks may go (`--callback-deny`, `--callback-allow`): checked for every
    /// address the callback host resolves to, when the worker connects.
    #[command(flatten)]
    pub callback_policy: CallbackPolicyArgs,
    /// File of Standard Webhooks secrets (`whsec_...`, one a line): every callback is signed
    /// with each (`webhook-id`, `webhook-timestamp`, `webhook-signature`). Re-read when it
    /// changes. Without it, callbacks are not signed.
    #[arg(long, env = "CALLBACK_SIGNING_SECRETS_FILE")]
    pub callback_signing_secrets_file: Option<PathBuf>,
    /// File of Standard Webhooks Ed25519 private keys (`whsk_...`, one a line): every callback
    /// also carries a `v1a` signature by each, which receivers verify with the public key
    /// (`whpk_...`, printed by `queue-worker signing-public-keys`) and without any secret.
    /// Re-read when it changes. May be used with or without the secrets file.
    #[arg(long, env = "CALLBACK_SIGNING_KEYS_FILE")]
    pub callback_signing_keys_file: Option<PathBuf>,
    /// Direct mode: function destinations refused besides the built-in ones (same notation as
    /// `--callback-deny`), checked for every address a function's host resolves to.
    #[arg(long, env = "FUNCTION_DENY", value_parser = queue_core::egress::parse_rules, action = clap::ArgAction::Append)]
    pub function_deny: Vec<Vec<queue_core::egress::Rule>>,
    /// Direct mode: if set, the only function destinations allowed (as `--callback-allow`).
    #[arg(long, env = "FUNCTION_ALLOW", value_parser = queue_core::egress::parse_rules, action = clap::ArgAction::Append)]
    pub function_allow: Vec<Vec<queue_core::egress::Rule>>,
    /// Longest a single callback POST may take.
    #[arg(long, env = "QUEUE_WORKER_CALLBACK_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub callback_timeout: Duration,
    /// Callback attempts before the worker gives up on a callback (retryable failures only).
    #[arg(long, env = "QUEUE_WORKER_CALLBACK_MAX_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub callback_max_attempts: u32,
    /// First wait between callback attempts; doubles up to `--callback-max-wait`.
    #[arg(long, env = "QUEUE_WORKER_CALLBACK_INITIAL_WAIT", default_value = "1s", value_parser = parse_duration)]
    pub callback_initial_wait: Duration,
    /// Longest wait between callback attempts.
    #[arg(long, env = "QUEUE_WORKER_CALLBACK_MAX_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub callback_max_wait: Duration,
    /// Directory of the worker's dedup state (sled). One worker process per directory.
    #[arg(
        long,
        env = "QUEUE_WORKER_STATE_DIR",
        default_value = "./data/queue-worker"
    )]
    pub state_dir: PathBuf,
    /// How long the worker remembers a finished call, to avoid invoking a redelivery again.
    /// Keep it at least as long as the stream's max age.
    #[arg(long, env = "QUEUE_WORKER_DEDUP_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub dedup_retention: Duration,
    /// Memory sled may use for its page cache.
    #[arg(long, env = "QUEUE_WORKER_STATE_CACHE_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub state_cache_bytes: u64,
    /// On SIGTERM/SIGINT, how long in-flight calls may run before they are handed back.
    #[arg(long, env = "QUEUE_WORKER_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Address of the worker's `/metrics` (Prometheus) and `/healthz` endpoint.
    #[arg(
        long,
        env = "QUEUE_WORKER_METRICS_LISTEN",
        default_value = "0.0.0.0:8091"
    )]
    pub metrics_listen: std::net::SocketAddr,
    /// PEM file of the certificate chain (leaf first) the metrics endpoint serves HTTPS with
    /// (with `--metrics-tls-key`). Without it the endpoint serves plain HTTP.
    #[arg(
        long,
        env = "QUEUE_WORKER_METRICS_TLS_CERT",
        value_name = "FILE",
        requires = "metrics_tls_key"
    )]
    pub metrics_tls_cert: Option<PathBuf>,
    /// PEM file of that certificate's private key (with `--metrics-tls-cert`).
    #[arg(
        long,
        env = "QUEUE_WORKER_METRICS_TLS_KEY",
        value_name = "FILE",
        requires = "metrics_tls_cert"
    )]
    pub metrics_tls_key: Option<PathBuf>,
    /// Fault injection for crash tests: abort the process after a call's result is stored and
    /// before its callback and ack. Never set this in production.
    #[arg(long, env = "QUEUE_WORKER_FAULT_CRASH_AFTER_STORE", hide = true)]
    pub fault_crash_after_store: bool,
}

/// Commands besides running the worker.
#[derive(Debug, Clone, Subcommand)]
pub enum WorkerCommand {
    /// Dead letters: list, show, replay, purge.
    Dlq {
        /// What to do.
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Prints the public key (`whpk_...`) of each private key of the signing keys file, one a
    /// line in file order: what receivers verify `v1a` signatures with. Prints no secret.
    SigningPublicKeys {
        /// The keys file (default: `--callback-signing-keys-file`).
        file: Option<PathBuf>,
    },
}

/// Which dead letters a command applies to: by sequence (`--seq 30`) and by call id
/// (`--call-id job-1`), typed apart, since a call id may be digits.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DlqSelection {
    /// Dead-letter sequence (repeatable, or comma-separated).
    #[arg(long = "seq", value_name = "SEQ", value_delimiter = ',')]
    pub sequences: Vec<u64>,
    /// Call id (repeatable, or comma-separated).
    #[arg(long = "call-id", value_name = "CALL_ID", value_delimiter = ',')]
    pub call_ids: Vec<String>,
}

impl DlqSelection {
    /// The typed selectors.
    pub fn selectors(&self) -> Vec<queue_core::backend::DeadLetterSelector> {
        use queue_core::backend::DeadLetterSelector;
        self.sequences
            .iter()
            .map(|s| DeadLetterSelector::Sequence(*s))
            .chain(
                self.call_ids
                    .iter()
                    .cloned()
                    .map(DeadLetterSelector::CallId),
            )
            .collect()
    }
}

/// Dead-letter commands. Dead letters are named by `--seq` (their sequence) or `--call-id`.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqAction {
    /// List dead letters, oldest first (metadata only, never bodies).
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show dead letters in full metadata, as JSON.
    #[command(group(clap::ArgGroup::new("which").args(["sequences", "call_ids"]).multiple(true).required(true)))]
    Show {
        /// Which.
        #[command(flatten)]
        select: DlqSelection,
    },
    /// Put dead letters back on the work queue with the same call id, and remove them here.
    #[command(group(clap::ArgGroup::new("which").args(["sequences", "call_ids", "all"]).multiple(true).required(true)))]
    Replay {
        /// Which.
        #[command(flatten)]
        select: DlqSelection,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["sequences", "call_ids"])]
        all: bool,
    },
    /// Delete dead letters.
    #[command(group(clap::ArgGroup::new("which").args(["sequences", "call_ids", "all"]).multiple(true).required(true)))]
    Purge {
        /// Which.
        #[command(flatten)]
        select: DlqSelection,
        /// Every dead letter.
        #[arg(long, conflicts_with_all = ["sequences", "call_ids"])]
        all: bool,
    },
}

impl WorkerConfig {
    /// Checks relations between settings that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.ack_wait < Duration::from_secs(1) {
            return Err("--ack-wait must be at least 1s".into());
        }
        if self.retry_initial_wait > self.retry_max_wait {
            return Err("--retry-initial-wait must not exceed --retry-max-wait".into());
        }
        if self.callback_initial_wait > self.callback_max_wait {
            return Err("--callback-initial-wait must not exceed --callback-max-wait".into());
        }
        if !self.fair_scheduling && self.queues.iter().any(|q| q != DEFAULT_QUEUE) {
            return Err(
                "--queues needs --fair-scheduling true (named queues are served lane by lane)"
                    .into(),
            );
        }
        if !self.status_interval.is_zero()
            && (self.status_interval < Duration::from_millis(100)
                || self.status_interval > queue_core::backend::status::MAX_STATUS_INTERVAL)
        {
            return Err("--status-interval must be 0s (off) or from 100ms to 20s".into());
        }
        if self.lane_census_interval < Duration::from_millis(100) {
            return Err("--lane-census-interval must be at least 100ms".into());
        }
        if self.invoke_mode == InvokeMode::Gateway {
            let url = url::Url::parse(&self.gateway_url)
                .map_err(|e| format!("--gateway-url {:?}: {e}", redact_url(&self.gateway_url)))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(format!(
                    "--gateway-url {:?} is not http(s)",
                    redact_url(&self.gateway_url)
                ));
            }
        }
        Ok(())
    }

    /// The function retry policy.
    pub fn retry_policy(&self) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy {
            max_attempts: self.retry_max_attempts,
            initial_wait: self.retry_initial_wait,
            max_wait: self.retry_max_wait,
            codes: self.retry_codes.clone(),
            backoff: self.retry_backoff,
        }
    }

    /// How long an idle lane consumer lives: `--lane-idle`, at least twice the longest call.
    pub fn lane_idle(&self) -> Duration {
        self.lane_idle.max(self.upstream_timeout.saturating_mul(2))
    }

    /// The weight of a namespace (`None`: the default one) under fair scheduling.
    pub fn namespace_weight(&self, namespace: Option<&str>) -> u32 {
        let name = namespace.unwrap_or(&self.default_namespace);
        self.namespace_weights
            .iter()
            .find(|(ns, _)| ns == name)
            .map_or(1, |(_, w)| *w)
    }

    /// How often an in-progress heartbeat is sent while a call is handled.
    pub fn progress_interval(&self) -> Duration {
        self.ack_wait / 3
    }
}

/// The queue of functions that name none.
pub const DEFAULT_QUEUE: &str = "default";

/// Whether `name` can name a queue: 1 to 64 lower-case letters, digits and `-`.
pub fn is_queue_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// One name of `--queues`.
pub fn parse_queue_name(raw: &str) -> Result<String, String> {
    let name = raw.trim().to_ascii_lowercase();
    if is_queue_name(&name) {
        Ok(name)
    } else {
        Err(format!(
            "{raw:?} is not a queue name (1 to 64 letters, digits and -)"
        ))
    }
}

/// One `namespace=weight` of `--namespace-weights` (a weight from 1 to 1000).
pub fn parse_namespace_weight(raw: &str) -> Result<(String, u32), String> {
    let (ns, weight) = raw
        .trim()
        .split_once('=')
        .ok_or_else(|| format!("{raw:?} is not namespace=weight, e.g. team-a=3"))?;
    let weight: u32 = weight
        .trim()
        .parse()
        .ok()
        .filter(|w| (1..=1000).contains(w))
        .ok_or_else(|| format!("the weight in {raw:?} is not a whole number from 1 to 1000"))?;
    let ns = ns.trim();
    if ns.is_empty() {
        return Err(format!("{raw:?} names no namespace"));
    }
    Ok((ns.to_owned(), weight))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings from a command line alone (the OpenFaaS variables: `crate::openfaas`).
    fn parse(cli: &[&str]) -> WorkerConfig {
        WorkerConfig::try_parse_from(std::iter::once("queue-worker").chain(cli.iter().copied()))
            .unwrap()
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("60").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("2MB").unwrap(), 2_000_000);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("1 parsec").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }

    #[test]
    fn defaults_are_sane() {
        let c = parse(&[]);
        assert_eq!(c.max_inflight, 50);
        assert_eq!(c.adaptive_concurrency, Adaptive::On);
        assert_eq!(c.ack_wait, Duration::from_secs(30));
        assert_eq!(c.nats.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.invoke_mode, InvokeMode::Gateway);
        assert!(c.validate().is_ok());
        assert_eq!(c.progress_interval(), Duration::from_secs(10));
    }

    #[test]
    fn dlq_commands_parse_with_global_nats_flags() {
        let c = parse(&["dlq", "replay", "--all", "--nats-url", "nats://x:1"]);
        assert_eq!(c.nats.nats_url, "nats://x:1");
        assert!(matches!(
            c.command,
            Some(WorkerCommand::Dlq {
                action: DlqAction::Replay { all: true, .. }
            })
        ));
        assert!(WorkerConfig::try_parse_from(["queue-worker", "dlq", "purge"]).is_err());
        let c = parse(&["dlq", "purge", "--seq", "30", "--call-id", "30,job"]);
        let Some(WorkerCommand::Dlq {
            action: DlqAction::Purge { select, all: false },
        }) = c.command
        else {
            panic!("not a purge: {:?}", c.command);
        };
        use queue_core::backend::DeadLetterSelector::{CallId, Sequence};
        assert_eq!(
            select.selectors(),
            [Sequence(30), CallId("30".into()), CallId("job".into())]
        );
        for bad in [
            &["dlq", "show"][..],
            &["dlq", "replay", "30"][..],
            &["dlq", "replay", "--all", "--seq", "1"][..],
            &["dlq", "purge", "--seq", "x"][..],
        ] {
            let args = std::iter::once("queue-worker").chain(bad.iter().copied());
            assert!(WorkerConfig::try_parse_from(args).is_err(), "{bad:?}");
        }
        assert!(parse(&[]).command.is_none());
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = WorkerConfig::try_parse_from(["queue-worker", "--ack-wait", "forever"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected e.g. 30s"), "{err}");
        assert!(WorkerConfig::try_parse_from(["queue-worker", "--max-inflight", "0"]).is_err());
        let c = parse(&["--ack-wait", "100ms"]);
        assert!(c.validate().unwrap_err().contains("ack-wait"));
    }

    #[test]
    fn egress_lists_parse_and_bad_entries_are_clear_errors() {
        use queue_core::egress::Rule;
        let c = parse(&[
            "--callback-deny",
            "127.0.0.0/8,::1,*.internal.example,:25",
            "--callback-allow",
            "hooks.example.com",
            "--function-deny",
            "10.0.0.0/8",
        ]);
        assert_eq!(c.callback_policy.callback_deny.concat().len(), 4);
        assert_eq!(
            c.callback_policy.callback_allow.concat(),
            [Rule::Host("hooks.example.com".into())]
        );
        assert_eq!(
            c.function_deny.concat(),
            [Rule::Net("10.0.0.0/8".parse().unwrap())]
        );
        assert!(c.function_allow.is_empty());
        // Repeated flags add up; empty entries (an empty variable, a trailing comma) are none.
        let c = parse(&[
            "--callback-deny",
            "10.0.0.0/8,",
            "--callback-deny",
            "",
            "--callback-deny",
            "::1",
        ]);
        assert_eq!(c.callback_policy.callback_deny.concat().len(), 2);
        let err = WorkerConfig::try_parse_from(["queue-worker", "--callback-deny", "10.0.0.0/33"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("CIDR block"), "{err}");
    }
}
