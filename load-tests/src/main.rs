//! `load-tests`: developer tools for the async path.
//!
//! - `function`: an echo function on a fixed address, to stand in for the
//!   OpenFaaS gateway a worker invokes (`/function/{name}`).
//! - `receiver`: a callback receiver on a fixed address that prints one line
//!   per callback.
//! - `bench`: a self-contained benchmark of gateway + worker on loopback
//!   against raw HTTP and raw JetStream baselines (see `load_tests::bench`).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::builder::RangedU64ValueParser;
use clap::{Parser, Subcommand};
use load_tests::bench::{self, BenchOptions, Scenario};
use load_tests::sut::Backend;
use load_tests::{CallbackReceiver, RecordedCallback, StubBehavior, StubFunction};
use queue_worker::config::parse_duration;
use queue_worker::signal::shutdown_signal;

/// Longest body the receiver prints.
const MAX_PRINTED_BODY: usize = 200;

/// Developer tools for the async path: an echo function, a callback receiver
/// and a self-contained benchmark.
#[derive(Debug, Parser)]
#[command(name = "load-tests", version)]
struct Cli {
    /// Log filter for stderr in `tracing` syntax (`warn`, `info`,
    /// `gateway_plugin=debug`).
    #[arg(long, global = true, env = "LOAD_TESTS_LOG", default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve an echo function on a fixed address until Ctrl-C/SIGTERM: any
    /// request (e.g. `POST /function/{name}`) is answered with its own body.
    Function {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// How long each request is held before it is answered.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        delay: Duration,
        /// Status code of every answer.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..=599))]
        status: u16,
    },
    /// Receive callbacks on a fixed address (any path) until Ctrl-C/SIGTERM,
    /// printing one line per callback.
    Receiver {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8082")]
        listen: SocketAddr,
    },
    /// Benchmark gateway + worker on loopback against raw HTTP and raw
    /// JetStream baselines, with a private nats-server. Exits non-zero if a
    /// call was refused, lost or returned a bad result.
    Bench(BenchArgs),
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// A named benchmark whose options the flags below override:
    /// `throughput`, `latency-at-rate`, `long-running`.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Requests per phase [default: 5000].
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=bench::MAX_CALLS as u64))]
    calls: Option<usize>,
    /// Concurrent client tasks of the closed loops (every phase without
    /// --rate, baseline_js_publish with it) [default: 64].
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(1..=bench::MAX_CONCURRENCY as u64))]
    concurrency: Option<usize>,
    /// Open loop: send baseline_http and accept requests on a fixed schedule
    /// of this many per second, measuring latency from each request's
    /// intended send time. Without it, every phase is a closed loop.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// The worker's --max-inflight [default: 256].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    max_inflight: Option<u32>,
    /// Size of each request body and published message [default: 64].
    #[arg(long, value_parser = RangedU64ValueParser::<usize>::new().range(0..=bench::MAX_BODY_BYTES as u64))]
    body_bytes: Option<usize>,
    /// How long the stub function holds each call [default: 0s].
    #[arg(long, value_parser = parse_duration)]
    function_delay: Option<Duration>,
    /// Hard limit on the whole run; exceeding it aborts with an error
    /// [default: 5m].
    #[arg(long, value_parser = parse_duration)]
    time_limit: Option<Duration>,
    /// How long to wait for outstanding callbacks after the last submit;
    /// calls without one are then reported as lost [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    callback_timeout: Option<Duration>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// The system under test: `jetstream` runs the `gateway-plugin` and
    /// `queue-worker` binaries as child processes on a private nats-server.
    #[arg(long, value_enum, default_value_t = Backend::JetStream)]
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
        Command::Function {
            listen,
            delay,
            status,
        } => serve_function(listen, delay, status).await,
        Command::Receiver { listen } => serve_receiver(listen).await,
        Command::Bench(args) => run_bench(args).await,
    }
}

async fn serve_function(
    listen: SocketAddr,
    delay: Duration,
    status: u16,
) -> anyhow::Result<ExitCode> {
    let behavior = StubBehavior {
        delay,
        status,
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

async fn run_bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let base = args
        .scenario
        .map_or_else(BenchOptions::default, Scenario::options);
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
    };
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
