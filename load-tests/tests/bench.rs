//! `load-tests bench` end to end with small numbers: a private nats-server,
//! the `gateway-plugin` and `queue-worker` binaries as child processes (built
//! by `cargo test --workspace`; with `-p load-tests` alone build them first:
//! `cargo build -p gateway-plugin -p queue-worker`), every call through to
//! its callback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly"
)]

use std::time::Duration;

use load_tests::bench::{self, BenchOptions};

/// The harness checks itself: a receiver that loses every 10th and duplicates every 7th
/// callback it records is reported as losing 20 and duplicating 26 of 200 calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_duplicating_receiver_is_reported_as_such() {
    let opts = BenchOptions {
        calls: 200,
        concurrency: 8,
        max_inflight: 32,
        time_limit: Duration::from_secs(120),
        callback_timeout: Duration::from_secs(3),
        backend: load_tests::sut::Backend::Embedded,
        receiver_fault: Some((10, 7)),
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    let e2e = &report.end_to_end;
    assert_eq!(e2e.lost, 20, "{table}");
    assert_eq!(e2e.completed, 180, "{table}");
    // Multiples of 7 up to 200 that are not multiples of 10: 28 - 2.
    assert_eq!(e2e.duplicates, 26, "{table}");
    assert!(!report.is_clean(), "a lossy run is not clean:\n{table}");
}

/// The same small run against the embedded queue (the all-in-one server's backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bench_on_the_embedded_queue_completes_every_call() {
    let opts = BenchOptions {
        calls: 200,
        concurrency: 8,
        max_inflight: 32,
        time_limit: Duration::from_secs(120),
        callback_timeout: Duration::from_secs(30),
        backend: load_tests::sut::Backend::Embedded,
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    assert_eq!(report.accept.ok, 200, "{table}");
    assert_eq!(report.end_to_end.completed, 200, "{table}");
    assert_eq!(report.end_to_end.lost, 0, "{table}");
    assert_eq!(report.end_to_end.bad_results, 0, "{table}");
    assert!(report.is_clean(), "{table}");
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["backend"], "embedded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bench_completes_every_call() {
    let opts = BenchOptions {
        calls: 200,
        concurrency: 8,
        max_inflight: 32,
        time_limit: Duration::from_secs(120),
        callback_timeout: Duration::from_secs(30),
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();

    assert_eq!(report.calls, 200);
    for (name, phase) in [
        ("baseline_http", &report.baseline_http),
        ("baseline_js_publish", &report.baseline_js_publish),
        ("accept", &report.accept),
    ] {
        assert_eq!(phase.sent, 200, "{name}\n{table}");
        assert_eq!(phase.ok, 200, "{name}: {:?}\n{table}", phase.first_error);
        assert_eq!(phase.failed, 0, "{name}\n{table}");
        assert!(phase.rate_per_sec > 0.0, "{name}\n{table}");
        assert!(phase.latency_us.p50 > 0, "{name}\n{table}");
        assert!(
            phase.latency_us.p50 <= phase.latency_us.p99,
            "{name}\n{table}"
        );
        assert!(
            phase.latency_us.p99 <= phase.latency_us.max,
            "{name}\n{table}"
        );
    }

    let e2e = &report.end_to_end;
    assert_eq!(e2e.lost, 0, "{table}");
    assert_eq!(e2e.completed, 200, "{table}");
    assert_eq!(e2e.duplicates, 0, "{table}");
    assert_eq!(e2e.bad_results, 0, "{table}");
    assert!(e2e.rate_per_sec > 0.0, "{table}");
    // A call completes after it was accepted.
    assert!(
        e2e.latency_us.max >= report.accept.latency_us.p50,
        "{table}"
    );
    assert!(report.ratios.accept_vs_baseline_http > 0.0, "{table}");
    assert!(report.ratios.end_to_end_vs_baseline_http > 0.0, "{table}");
    assert!(report.ratios.accept_vs_baseline_js_publish > 0.0, "{table}");
    // Every published message was pulled and acked.
    let pull = &report.baseline_js_pull_ack;
    assert_eq!(pull.ok, 200, "{:?}\n{table}", pull.first_error);
    assert!(pull.rate_per_sec > 0.0, "{table}");
    assert!(
        report.ratios.end_to_end_vs_baseline_js_pull_ack > 0.0,
        "{table}"
    );
    assert!(report.is_clean(), "{table}");

    // Both processes are measured, idle and after the run.
    for usages in [&report.idle, &report.after_run] {
        let names: Vec<&str> = usages.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["gateway", "worker"], "{table}");
        assert!(usages.iter().all(|u| u.peak_rss_kib > 0), "{table}");
    }
    for (idle, run) in report.idle.iter().zip(&report.after_run) {
        assert!(run.peak_rss_kib >= idle.peak_rss_kib, "{table}");
        assert!(run.cpu_seconds >= idle.cpu_seconds, "{table}");
    }
    assert!(report.cpu_us_per_call > 0.0, "{table}");
    assert_eq!(e2e.unexpected, 0, "{table}");
    assert_eq!(e2e.bad_headers, 0, "{table}");
    assert!(e2e.function_time_us.max > 0, "{table}");

    // The JSON form carries the same figures.
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["load_model"], "closed");
    assert!(json["rate"].is_null());
    assert_eq!(json["end_to_end"]["completed"], 200);
    assert_eq!(json["accept"]["ok"], 200);
    assert!(json["ratios"]["accept_vs_baseline_http"].as_f64().unwrap() > 0.0);
    assert!(table.contains("end_to_end"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_open_loop_bench_completes_every_call() {
    let opts = BenchOptions {
        calls: 200,
        rate: Some(200.0),
        concurrency: 8,
        max_inflight: 32,
        time_limit: Duration::from_secs(120),
        callback_timeout: Duration::from_secs(30),
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();

    assert_eq!(report.load_model, bench::LoadModel::Open, "{table}");
    assert!(table.contains("open loop at 200 req/s"), "{table}");
    for (name, phase) in [
        ("baseline_http", &report.baseline_http),
        ("baseline_js_publish", &report.baseline_js_publish),
        ("accept", &report.accept),
    ] {
        assert_eq!(phase.sent, 200, "{name}\n{table}");
        assert_eq!(phase.ok, 200, "{name}: {:?}\n{table}", phase.first_error);
        assert!(phase.latency_us.p50 > 0, "{name}\n{table}");
    }
    // 200 requests at 200/s take about a second to send.
    for (name, phase) in [
        ("baseline_http", &report.baseline_http),
        ("accept", &report.accept),
    ] {
        assert!(phase.seconds >= 0.99, "{name}\n{table}");
        assert!(phase.rate_per_sec <= 205.0, "{name}\n{table}");
    }
    let e2e = &report.end_to_end;
    assert_eq!(e2e.lost, 0, "{table}");
    assert_eq!(e2e.completed, 200, "{table}");
    assert_eq!(e2e.duplicates, 0, "{table}");
    assert_eq!(e2e.bad_results, 0, "{table}");
    assert!(report.is_clean(), "{table}");

    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["load_model"], "open");
    assert_eq!(json["rate"], 200.0);
    assert_eq!(json["end_to_end"]["lost"], 0);
}

#[tokio::test]
async fn closed_loop_is_the_default_and_reported_as_such() {
    let opts = BenchOptions::default();
    assert_eq!(opts.load_model(), bench::LoadModel::Closed);
    assert_eq!(
        serde_json::to_value(bench::LoadModel::Closed).unwrap(),
        "closed"
    );
}

#[tokio::test]
async fn an_open_loop_longer_than_the_time_limit_is_refused() {
    let opts = BenchOptions {
        calls: 1000,
        rate: Some(10.0),
        time_limit: Duration::from_secs(60),
        ..BenchOptions::default()
    };
    let err = bench::run(&opts).await.unwrap_err();
    assert!(err.to_string().contains("time-limit"), "{err}");
}

#[tokio::test]
async fn out_of_bounds_options_are_refused_before_starting_anything() {
    let opts = BenchOptions {
        concurrency: 0,
        ..BenchOptions::default()
    };
    let err = bench::run(&opts).await.unwrap_err();
    assert!(err.to_string().contains("concurrency"), "{err}");
}

#[tokio::test]
async fn missing_binaries_are_reported_with_the_build_command() {
    let empty = tempfile::tempdir().unwrap();
    let opts = BenchOptions {
        calls: 1,
        bin_dir: Some(empty.path().to_path_buf()),
        time_limit: Duration::from_secs(60),
        ..BenchOptions::default()
    };
    let err = bench::run(&opts).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("cargo build --release --workspace"),
        "{message}"
    );
    assert!(message.contains("gateway-plugin"), "{message}");
}
