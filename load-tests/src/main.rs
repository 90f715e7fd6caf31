//! `load-tests`: developer tools for the async path.
//!
//! - `function`: an echo function on a fixed address, to stand in for the
//!   OpenFaaS gateway a worker invokes (`/function/{name}`).
//! - `receiver`: a callback receiver on a fixed address that prints one line
//!   per callback.
//! - `bench` (also the default without a subcommand): the load test, against
//!   a system it starts itself (`--self-contained`, the default) or an
//!   existing deployment (`--gateway-url`), with raw HTTP and raw JetStream
//!   baselines measured in the same run (see `load_tests::bench`).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::builder::RangedU64ValueParser;
use clap::{Parser, Subcommand};
use load_tests::bench::{self, BenchOptions, ExternalTarget, Scenario};
use load_tests::sut::Backend;
use load_tests::{CallbackReceiver, FaultMix, RecordedCallback, StubBehavior, StubFunction};
use queue_core::settings::parse_duration;
use queue_core::signal::shutdown_signal;

/// Longest body the receiver prints.
const MAX_PRINTED_BODY: usize = 200;

/// Load tests for the async path: a benchmark that checks every callback
/// (the default command), an echo function and a callback receiver.
#[derive(Debug, Parser)]
#[command(name = "load-tests", version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Log filter for stderr in `tracing` syntax (`warn`, `info`,
    /// `gateway_plugin=debug`).
    #[arg(long, global = true, env = "LOAD_TESTS_LOG", default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand: `bench` with these arguments.
    #[command(flatten)]
    bench: BenchArgs,
}

/// Faults a stub function injects, as shares of attempts (0 to 1).
#[derive(Debug, clap::Args)]
struct FaultArgs {
    /// Share of attempts answered `429` with `Retry-After: 1`.
    #[arg(long = "fault-429", env = "LOAD_TESTS_FAULT_429", value_parser = parse_share)]
    too_many_requests: Option<f64>,
    /// Share of attempts answered `503`.
    #[arg(long = "fault-503", env = "LOAD_TESTS_FAULT_503", value_parser = parse_share)]
    unavailable: Option<f64>,
    /// Share of attempts answered `500`.
    #[arg(long = "fault-500", env = "LOAD_TESTS_FAULT_500", value_parser = parse_share)]
    internal_error: Option<f64>,
    /// Share of attempts never answered (held until the caller gives up).
    #[arg(long = "fault-hang", env = "LOAD_TESTS_FAULT_HANG", value_parser = parse_share)]
    hang: Option<f64>,
}

impl FaultArgs {
    /// The mix, each share unset taken from `base`.
    fn over(&self, base: FaultMix) -> FaultMix {
        FaultMix {
            too_many_requests: self.too_many_requests.unwrap_or(base.too_many_requests),
            unavailable: self.unavailable.unwrap_or(base.unavailable),
            internal_error: self.internal_error.unwrap_or(base.internal_error),
            hang: self.hang.unwrap_or(base.hang),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve an echo function on a fixed address until Ctrl-C/SIGTERM: any
    /// request (e.g. `POST /function/{name}`) is answered with its own body.
    /// Its answers carry when it was invoked and when it answered, which is
    /// how `bench --gateway-url` splits end-to-end time when this is the
    /// function it calls.
    Function(FunctionArgs),
    /// Receive callbacks on a fixed address (any path) until Ctrl-C/SIGTERM,
    /// printing one line per callback.
    Receiver {
        /// Address to listen on.
        #[arg(
            long,
            env = "LOAD_TESTS_RECEIVER_LISTEN",
            default_value = "127.0.0.1:8082"
        )]
        listen: SocketAddr,
    },
    /// Load the async path and check every callback, with raw HTTP and raw
    /// JetStream baselines measured in the same run. Exits non-zero if a call
    /// was refused, lost, duplicated or returned a bad result.
    Bench(Box<BenchArgs>),
    /// How long a call waits behind another function's backlog: for each layout (arrival
    /// order, fair scheduling, fair across namespaces, priorities) a fresh system, a backlog
    /// for one function, and a probe call every second while it drains. Exits non-zero if a
    /// call was lost or duplicated.
    Fairness(FairnessArgs),
    /// One large body, echoed back as an equally large result, through each backend: upload
    /// rate, round trip, result read, digests, and the processes' peak memory over idle, next
    /// to a raw file copy and a raw object-store put/get of the same bytes. Exits non-zero if a
    /// digest differs or the result could not be read.
    Large(LargeArgs),
}

#[derive(Debug, clap::Args)]
struct LargeArgs {
    /// Bytes of the body (and of the result): `256MiB`, `1GiB`.
    #[arg(long, env = "LOAD_TESTS_SIZE", default_value = "256MiB", value_parser = parse_size)]
    size: usize,
    /// The backends to run, comma-separated.
    #[arg(
        long,
        env = "LOAD_TESTS_BACKENDS",
        value_delimiter = ',',
        default_value = "jetstream,embedded"
    )]
    backends: Vec<load_tests::sut::Backend>,
    /// Where the `gateway-plugin`, `queue-worker` and `faas-async` binaries are.
    #[arg(long, env = "LOAD_TESTS_BIN_DIR")]
    bin_dir: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct FairnessArgs {
    /// Calls queued for the busy function.
    #[arg(long, env = "LOAD_TESTS_BACKLOG", default_value_t = 10_000)]
    backlog: usize,
    /// How long the function holds every call.
    #[arg(long, env = "LOAD_TESTS_FUNCTION_DELAY", default_value = "50ms", value_parser = parse_duration)]
    function_delay: Duration,
    /// One probe call this often.
    #[arg(long, env = "LOAD_TESTS_PROBE_EVERY", default_value = "1s", value_parser = parse_duration)]
    probe_every: Duration,
    /// Probe calls at least.
    #[arg(long, env = "LOAD_TESTS_MIN_PROBES", default_value_t = 10)]
    min_probes: usize,
    /// The worker's `--max-inflight`.
    #[arg(long, env = "LOAD_TESTS_MAX_INFLIGHT", default_value_t = 50)]
    max_inflight: u32,
    /// The layouts to run, comma-separated [default: all].
    #[arg(long, env = "LOAD_TESTS_LAYOUTS", value_delimiter = ',')]
    layouts: Vec<load_tests::fairness::Layout>,
    /// Where the `gateway-plugin` and `queue-worker` binaries are.
    #[arg(long, env = "LOAD_TESTS_BIN_DIR")]
    bin_dir: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct FunctionArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "LOAD_TESTS_FUNCTION_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    listen: SocketAddr,
    /// How long each request is held before it is answered (the median when
    /// --delay-p99 is given).
    #[arg(long, env = "LOAD_TESTS_FUNCTION_DELAY", default_value = "0ms", value_parser = parse_duration)]
    delay: Duration,
    /// Draw each request's time from a log-normal distribution with median
    /// --delay and this 99th percentile.
    #[arg(long, env = "LOAD_TESTS_FUNCTION_DELAY_P99", value_parser = parse_duration)]
    delay_p99: Option<Duration>,
    /// Status code of every answer.
    #[arg(long, env = "LOAD_TESTS_FUNCTION_STATUS", default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..=599))]
    status: u16,
    /// Answer this many bytes instead of echoing the request body.
    #[arg(long, env = "LOAD_TESTS_FUNCTION_RESPONSE_BYTES", value_parser = RangedU64ValueParser::<usize>::new().range(0..=bench::MAX_BODY_BYTES as u64))]
    response_bytes: Option<usize>,
    #[command(flatten)]
    faults: FaultArgs,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// A named benchmark whose options the flags below override.
    #[arg(long, env = "LOAD_TESTS_SCENARIO", value_enum)]
    scenario: Option<Scenario>,
    /// Start the system under test (nats-server, gateway, worker, stub
    /// function) as local processes and tear it down after: the default
    /// without --gateway-url.
    #[arg(
        long,
        env = "LOAD_TESTS_SELF_CONTAINED",
        conflicts_with = "gateway_url"
    )]
    self_contained: bool,
    /// Load an existing deployment through this gateway URL instead; needs
    /// --callback-listen. The stub-function and worker flags do not apply.
    #[arg(long, env = "LOAD_TESTS_GATEWAY_URL", requires = "callback_listen")]
    gateway_url: Option<String>,
    /// With --gateway-url: where the callback receiver listens.
    #[arg(long, env = "LOAD_TESTS_CALLBACK_LISTEN", requires = "gateway_url")]
    callback_listen: Option<SocketAddr>,
    /// With --gateway-url: the X-Callback-Url the workers reach the receiver
    /// at [default: http://<callback-listen>/callback].
    #[arg(long, env = "LOAD_TESTS_CALLBACK_URL", requires = "gateway_url")]
    callback_url: Option<String>,
    /// With --gateway-url: the deployment's NATS, for the JetStream baselines
    /// (a stream LOAD_TESTS_BASELINE is created there and deleted); without
    /// it they are skipped.
    #[arg(long, env = "LOAD_TESTS_NATS_URL", requires = "gateway_url")]
    nats_url: Option<String>,
    /// An extra header on every submitted call, `Name: value`, repeatable
    /// (e.g. `Authorization: Bearer ...`); never printed.
    #[arg(long = "header", env = "LOAD_TESTS_HEADER", value_parser = parse_header)]
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// The function the calls go to [default: bench].
    #[arg(long, env = "LOAD_TESTS_FUNCTION")]
    function: Option<String>,
    /// Requests sent before each measured phase and left out of its figures
    /// (warm-up calls must be called back too) [default: 200; 0 for
    /// long-running].
    #[arg(long, env = "LOAD_TESTS_WARMUP", value_parser = RangedU64ValueParser::<usize>::new().range(0..=bench::MAX_CALLS as u64))]
    warmup: Option<usize>,
    /// Stop sending a phase's requests after this long, even if fewer than
    /// --calls were sent.
    #[arg(long, env = "LOAD_TESTS_DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Requests per phase [default: 5000].
    #[arg(long, env = "LOAD_TESTS_CALLS", value_parser = RangedU64ValueParser::<usize>::new().range(1..=bench::MAX_CALLS as u64))]
    calls: Option<usize>,
    /// Requests per baseline phase (raw HTTP, JetStream publish and pull+ack), when fewer than
    /// --calls are enough for them: a soak of a million calls need not run its baselines
    /// as long [default: --calls].
    #[arg(long, env = "LOAD_TESTS_BASELINE_CALLS", value_parser = RangedU64ValueParser::<usize>::new().range(1..=bench::MAX_CALLS as u64))]
    baseline_calls: Option<usize>,
    /// Sample the resident memory of every process of the system under test (and of its
    /// nats-server) and the sizes of their stores this often through the async path, and
    /// print the series with each one's range after the warm-up (the first quarter of the
    /// sampled time); at least 500ms, with --no-accept-alone or --rate, without worker kills
    /// [default: off].
    #[arg(long, env = "LOAD_TESTS_SAMPLE_EVERY", value_parser = parse_duration)]
    sample_every: Option<Duration>,
    /// Concurrent client tasks of the closed loops (every phase without
    /// --rate, baseline_js_publish with it) [default: 64].
    #[arg(long, env = "LOAD_TESTS_CONCURRENCY", value_parser = RangedU64ValueParser::<usize>::new().range(1..=bench::MAX_CONCURRENCY as u64))]
    concurrency: Option<usize>,
    /// Open loop: send baseline_http and accept requests on a fixed schedule
    /// of this many per second, measuring latency from each request's
    /// intended send time. Without it, every phase is a closed loop.
    #[arg(long, env = "LOAD_TESTS_RATE", value_parser = parse_rate)]
    rate: Option<f64>,
    /// The worker's --max-inflight [default: 256].
    #[arg(long, env = "LOAD_TESTS_MAX_INFLIGHT", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_inflight: Option<u32>,
    /// Size of each request body and published message [default: 64].
    #[arg(long, env = "LOAD_TESTS_BODY_BYTES", value_parser = RangedU64ValueParser::<usize>::new().range(0..=bench::MAX_BODY_BYTES as u64))]
    body_bytes: Option<usize>,
    /// How long the stub function holds each call; the median when
    /// --function-delay-p99 is given [default: 0s].
    #[arg(long, env = "LOAD_TESTS_FUNCTION_DELAY", value_parser = parse_duration)]
    function_delay: Option<Duration>,
    /// Draw the stub function's time per attempt from a log-normal
    /// distribution with median --function-delay and this 99th percentile.
    #[arg(long, env = "LOAD_TESTS_FUNCTION_DELAY_P99", value_parser = parse_duration)]
    function_delay_p99: Option<Duration>,
    /// The stub function answers this many bytes instead of echoing the body.
    #[arg(long, env = "LOAD_TESTS_RESPONSE_BYTES", value_parser = RangedU64ValueParser::<usize>::new().range(0..=bench::MAX_BODY_BYTES as u64))]
    response_bytes: Option<usize>,
    #[command(flatten)]
    faults: FaultArgs,
    /// SIGKILL the worker process this often while callbacks are awaited, and
    /// start it again (jetstream backend only) [default: 4s for the faults
    /// scenario on jetstream, else never].
    #[arg(long, env = "LOAD_TESTS_KILL_WORKER_EVERY", value_parser = parse_duration)]
    kill_worker_every: Option<Duration>,
    /// Leave out the accept-alone phase (accepts measured with the worker stopped, then
    /// drained) that closed loops against a started system run before the end-to-end phase.
    #[arg(long, env = "LOAD_TESTS_NO_ACCEPT_ALONE")]
    no_accept_alone: bool,
    /// Run the gateway in front mode (`--upstream-gateway`, the stub function as the OpenFaaS
    /// gateway) and, before the async path, measure synchronous calls straight to the stub
    /// against the same calls through the gateway [default: on for the front-mode scenario].
    #[arg(long, env = "LOAD_TESTS_FRONT_MODE")]
    front_mode: bool,
    /// The stub function takes this many calls at once and answers `429` to any more; the
    /// worker's concurrency limit for it is read from its metrics every 250 ms and printed
    /// [default: 3 for the adaptive scenario].
    #[arg(long, env = "LOAD_TESTS_FUNCTION_CAPACITY", value_parser = RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    function_capacity: Option<usize>,
    /// An extra argument for the worker process, repeatable
    /// (`--worker-arg=--upstream-timeout=2s`).
    #[arg(
        long = "worker-arg",
        env = "LOAD_TESTS_WORKER_ARG",
        allow_hyphen_values = true
    )]
    worker_args: Vec<String>,
    /// An extra argument for the gateway process (JetStream backend), repeatable
    /// (`--gateway-arg=--encryption-keys-file=keys`). On the embedded backend the one process
    /// takes `--worker-arg`.
    #[arg(
        long = "gateway-arg",
        env = "LOAD_TESTS_GATEWAY_ARG",
        allow_hyphen_values = true
    )]
    gateway_args: Vec<String>,
    /// Hard limit on the whole run; exceeding it aborts with an error
    /// [default: 5m].
    #[arg(long, env = "LOAD_TESTS_TIME_LIMIT", value_parser = parse_duration)]
    time_limit: Option<Duration>,
    /// How long to wait for outstanding callbacks after the last submit,
    /// counted from the last callback seen; calls without one are then
    /// reported as lost [default: 60s].
    #[arg(long, env = "LOAD_TESTS_CALLBACK_TIMEOUT", value_parser = parse_duration)]
    callback_timeout: Option<Duration>,
    /// Print one JSON object instead of the table.
    #[arg(long, env = "LOAD_TESTS_JSON")]
    json: bool,
    /// The system under test: `jetstream` runs the `gateway-plugin` and
    /// `queue-worker` binaries as child processes on a private nats-server.
    #[arg(long, env = "LOAD_TESTS_BACKEND", value_enum, default_value_t = Backend::JetStream)]
    backend: Backend,
    /// Directory of the `gateway-plugin` and `queue-worker` binaries; by
    /// default the directory of this executable (build them with
    /// `cargo build --release --workspace`).
    #[arg(long, env = "LOAD_TESTS_BIN_DIR")]
    bin_dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .with_context(|| format!("invalid --log-level {:?}", cli.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))?;

    match cli.command {
        Some(Command::Function(args)) => serve_function(args).await,
        Some(Command::Receiver { listen }) => serve_receiver(listen).await,
        Some(Command::Bench(args)) => run_bench(*args).await,
        Some(Command::Fairness(args)) => run_fairness(args).await,
        Some(Command::Large(args)) => run_large(args).await,
        None => run_bench(cli.bench).await,
    }
}

async fn serve_function(args: FunctionArgs) -> anyhow::Result<ExitCode> {
    let FunctionArgs {
        listen,
        delay,
        delay_p99,
        status,
        response_bytes,
        faults,
    } = args;
    let faults = faults.over(FaultMix::default());
    faults.validate().map_err(anyhow::Error::msg)?;
    if delay_p99.is_some_and(|p99| delay.is_zero() || p99 < delay) {
        anyhow::bail!("--delay-p99 needs a --delay above 0 (the median) and not above it");
    }
    let behavior = StubBehavior {
        delay,
        delay_p99,
        status,
        response_bytes,
        faults,
        ..StubBehavior::default()
    };
    let function = StubFunction::start_on(listen, behavior)
        .await
        .with_context(|| format!("starting the echo function on {listen}"))?;
    // It runs for as long as it is left running: keep no history.
    function.set_recording(false);
    writeln!(
        std::io::stdout().lock(),
        "echo function listening on {url}: serves {url}/function/{{name}} (any method and path), \
         answering {status} with the request body after {delay}; Ctrl-C to stop",
        url = function.url(),
        delay = humantime::format_duration(delay),
    )?;
    shutdown_signal().await;
    Ok(ExitCode::SUCCESS)
}

async fn serve_receiver(listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let receiver = CallbackReceiver::start_on(listen)
        .await
        .with_context(|| format!("starting the callback receiver on {listen}"))?;
    writeln!(
        std::io::stdout().lock(),
        "callback receiver listening on {} (any path); one line per callback; Ctrl-C to stop",
        receiver.url(),
    )?;
    tokio::select! {
        result = print_callbacks(&receiver) => result,
        () = shutdown_signal() => Ok(ExitCode::SUCCESS),
    }
}

/// Prints the callbacks as they arrive; returns only on an output error.
async fn print_callbacks(receiver: &CallbackReceiver) -> anyhow::Result<ExitCode> {
    loop {
        let callbacks = receiver.next_callbacks().await;
        let mut out = std::io::stdout().lock();
        for callback in &callbacks {
            writeln!(out, "{}", describe(callback)).context("writing to stdout")?;
        }
    }
}

/// One line about a callback: call id, function status, duration, body.
fn describe(callback: &RecordedCallback) -> String {
    let header = |name| callback.header(name).unwrap_or("-");
    let body = match std::str::from_utf8(&callback.body) {
        Ok(text) if text.len() <= MAX_PRINTED_BODY => format!(" body={text:?}"),
        Ok(_) => String::from(" body=<not shown: longer than 200 bytes>"),
        Err(_) => String::from(" body=<not shown: not UTF-8>"),
    };
    let error = callback
        .header("x-function-error")
        .map(|error| format!(" error={error}"))
        .unwrap_or_default();
    let duration = callback
        .header("x-duration-seconds")
        .map_or_else(|| "-".to_owned(), |seconds| format!("{seconds}s"));
    format!(
        "callback call_id={} function={} status={} duration={duration} bytes={}{error}{body}",
        header("x-call-id"),
        header("x-function-name"),
        header("x-function-status"),
        callback.body.len(),
    )
}

async fn run_large(args: LargeArgs) -> anyhow::Result<ExitCode> {
    let opts = load_tests::large::LargeOptions {
        size: args.size,
        backends: args.backends,
        bin_dir: args.bin_dir,
        ..load_tests::large::LargeOptions::default()
    };
    let report = load_tests::large::run(&opts)
        .await
        .context("large run failed")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.to_table())?;
    }
    drop(out);
    if report.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("large: a digest differed or the result was not read");
        Ok(ExitCode::FAILURE)
    }
}

async fn run_fairness(args: FairnessArgs) -> anyhow::Result<ExitCode> {
    use load_tests::fairness::{FairnessOptions, Layout};
    let opts = FairnessOptions {
        backlog: args.backlog,
        delay: args.function_delay,
        probe_every: args.probe_every,
        min_probes: args.min_probes,
        max_inflight: args.max_inflight,
        bin_dir: args.bin_dir,
        layouts: if args.layouts.is_empty() {
            Layout::ALL.to_vec()
        } else {
            args.layouts
        },
        ..FairnessOptions::default()
    };
    let report = load_tests::fairness::run(&opts)
        .await
        .context("fairness run failed")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.to_table())?;
    }
    drop(out);
    if report.is_clean() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("fairness: a call was lost or called back twice");
        Ok(ExitCode::FAILURE)
    }
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let base = args
        .scenario
        .map_or_else(BenchOptions::default, Scenario::options);
    let external_target = args.gateway_url.is_some();
    let opts = BenchOptions {
        calls: args.calls.unwrap_or(base.calls),
        concurrency: args.concurrency.unwrap_or(base.concurrency),
        rate: args.rate.or(base.rate),
        max_inflight: args.max_inflight.unwrap_or(base.max_inflight),
        body_bytes: args.body_bytes.unwrap_or(base.body_bytes),
        function_delay: args.function_delay.unwrap_or(base.function_delay),
        time_limit: args.time_limit.unwrap_or(base.time_limit),
        callback_timeout: args.callback_timeout.unwrap_or(base.callback_timeout),
        backend: args.backend,
        bin_dir: args.bin_dir,
        receiver_fault: None,
        warmup: args.warmup.unwrap_or(base.warmup),
        duration: args.duration.or(base.duration),
        function: args.function.unwrap_or(base.function),
        function_delay_p99: args.function_delay_p99.or(base.function_delay_p99),
        response_bytes: args.response_bytes.or(base.response_bytes),
        faults: args.faults.over(base.faults),
        worker_args: if args.worker_args.is_empty() {
            base.worker_args
        } else {
            args.worker_args
        },
        gateway_args: args.gateway_args,
        external: args.gateway_url.map(|gateway_url| ExternalTarget {
            gateway_url,
            // clap requires it with --gateway-url.
            callback_listen: args
                .callback_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            callback_url: args.callback_url,
            nats_url: args.nats_url,
        }),
        // A preset's kills apply where there is a worker process of its own to kill.
        headers: args.headers,
        accept_alone: base.accept_alone && !args.no_accept_alone,
        kill_worker_every: args.kill_worker_every.or(base
            .kill_worker_every
            .filter(|_| args.backend == Backend::JetStream && !external_target)),
        // The cluster and its faults come with `--scenario cluster`.
        cluster: base.cluster,
        front_mode: base.front_mode || args.front_mode,
        function_capacity: args.function_capacity.or(base.function_capacity),
        baseline_calls: args.baseline_calls.or(base.baseline_calls),
        sample_every: args.sample_every.or(base.sample_every),
    };
    // The self-contained system is the default; the flag only says so.
    let _ = args.self_contained;
    let report = bench::run(&opts).await.context("bench failed")?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report.to_table())?;
    }
    drop(out);
    if report.is_clean() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "bench: not every call completed cleanly: {} refused, {} lost, {} duplicated, \
         {} unexpected callbacks, {} bad results, {} bad headers",
        report.accept.failed,
        report.end_to_end.lost,
        report.end_to_end.duplicates,
        report.end_to_end.unexpected,
        report.end_to_end.bad_results,
        report.end_to_end.bad_headers
    );
    Ok(ExitCode::FAILURE)
}

/// A `--header`: `Name: value`. The error never repeats the value (it may be a secret).
fn parse_header(text: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| "expected `Name: value`".to_owned())?;
    let name = http::HeaderName::try_from(name.trim())
        .map_err(|_| format!("{:?} is not a valid header name", name.trim()))?;
    let mut value = http::HeaderValue::try_from(value.trim())
        .map_err(|_| format!("the value of {name} is not a valid header value"))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// A share of attempts: a number from 0 to 1.
fn parse_share(value: &str) -> Result<f64, String> {
    let share: f64 = value
        .parse()
        .map_err(|e| format!("not a number from 0 to 1: {e}"))?;
    if (0.0..=1.0).contains(&share) {
        Ok(share)
    } else {
        Err(format!("must be from 0 to 1, not {share}"))
    }
}

/// A `--rate`: a positive, finite number of requests per second up to
/// [`bench::MAX_RATE`].
fn parse_rate(value: &str) -> Result<f64, String> {
    let rate: f64 = value
        .parse()
        .map_err(|e| format!("not a number of requests per second: {e}"))?;
    if rate.is_finite() && rate > 0.0 && rate <= bench::MAX_RATE {
        Ok(rate)
    } else {
        Err(format!(
            "must be above 0 and at most {}, not {rate}",
            bench::MAX_RATE
        ))
    }
}

/// A size such as `256MiB` (the product's byte syntax), at least 1 byte.
fn parse_size(value: &str) -> Result<usize, String> {
    let bytes = queue_core::settings::parse_bytes(value)?;
    match usize::try_from(bytes) {
        Ok(0) => Err("a size of at least 1 byte".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{value} does not fit in memory here")),
    }
}
