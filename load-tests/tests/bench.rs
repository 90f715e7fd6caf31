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
        // The fault counts every callback: warm-up callbacks would shift it.
        warmup: 0,
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
        warmup: 30,
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    // The warm-up went through and was called back, and is left out of the figures.
    assert_eq!(report.warmup.requests, 30, "{table}");
    assert_eq!(report.warmup.accepted, 30, "{table}");
    assert_eq!(report.warmup.completed, 30, "{table}");
    assert_eq!(report.accept.sent, 200, "{table}");
    assert_eq!(
        report.stub.as_ref().map(|s| s.attempts),
        Some(200),
        "{table}"
    );
    assert_eq!(report.accept.ok, 200, "{table}");
    assert_eq!(report.end_to_end.completed, 200, "{table}");
    assert_eq!(report.end_to_end.lost, 0, "{table}");
    assert_eq!(report.end_to_end.bad_results, 0, "{table}");
    // Accepts alone: the process restarted with the gateway role only, then with the worker,
    // which drained every one of them.
    let alone = report.accept_alone.as_ref().expect("measured");
    assert_eq!((alone.phase.ok, alone.completed), (200, 200), "{table}");
    assert!(report.ratios.accept_alone_vs_ceiling > Some(0.0), "{table}");
    // The embedded backend's own baselines and ceiling.
    for phase in [
        &report.baseline_embedded_publish,
        &report.baseline_embedded_pull_ack,
    ] {
        let phase = phase.as_ref().expect("measured");
        assert_eq!((phase.ok, phase.failed), (200, 0), "{table}");
        assert!(phase.rate_per_sec > 0.0, "{table}");
    }
    assert!(
        report.ratios.end_to_end_vs_embedded_ceiling > Some(0.0),
        "{table}"
    );
    assert!(table.contains("embedded backend's own ceiling"), "{table}");
    assert!(report.is_clean(), "{table}");
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["target"], "embedded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bench_completes_every_call() {
    let opts = BenchOptions {
        calls: 200,
        concurrency: 8,
        max_inflight: 32,
        time_limit: Duration::from_secs(120),
        callback_timeout: Duration::from_secs(30),
        warmup: 0,
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();

    assert_eq!(report.calls, 200);
    let publish = report.baseline_js_publish.as_ref().expect("measured");
    assert!(report.baseline_embedded_publish.is_none(), "{table}");
    let alone = report.accept_alone.as_ref().expect("measured");
    // The worker was stopped for them and drained every one once started again.
    assert_eq!(alone.completed, 200, "{table}");
    for (name, phase) in [
        ("baseline_http", &report.baseline_http),
        ("baseline_js_publish", publish),
        ("accept_alone", &alone.phase),
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
    assert!(
        report.ratios.accept_vs_baseline_js_publish > Some(0.0),
        "{table}"
    );
    // Every published message was pulled and acked.
    let pull = report.baseline_js_pull_ack.as_ref().expect("measured");
    assert_eq!(pull.ok, 200, "{:?}\n{table}", pull.first_error);
    assert!(pull.rate_per_sec > 0.0, "{table}");
    assert!(
        report.ratios.end_to_end_vs_baseline_js_pull_ack > Some(0.0),
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
    // End to end splits into queue wait, function and callback time (the stub stamps its
    // answers): each is measured, and none exceeds the whole.
    assert!(e2e.queue_wait_us.max > 0, "{table}");
    assert!(e2e.callback_time_us.max > 0, "{table}");
    assert!(e2e.queue_wait_us.p50 <= e2e.latency_us.max, "{table}");
    assert!(e2e.callback_time_us.p50 <= e2e.latency_us.max, "{table}");
    let results: Vec<(&str, u64)> = e2e.results.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    assert_eq!(results, [("200", 200)], "{table}");
    assert!(report.accept.errors.is_empty(), "{table}");

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
    let publish = report.baseline_js_publish.as_ref().expect("measured");
    for (name, phase) in [
        ("baseline_http", &report.baseline_http),
        ("baseline_js_publish", publish),
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

/// The `faults` scenario in small: a function that answers 429, 503 and 500 or hangs on a
/// third of its attempts. The worker retries, every call is still called back exactly once,
/// and the results are reported by kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_faults_are_retried_and_every_call_is_called_back_once() {
    let opts = BenchOptions {
        calls: 200,
        concurrency: 16,
        max_inflight: 64,
        time_limit: Duration::from_secs(240),
        callback_timeout: Duration::from_secs(120),
        backend: load_tests::sut::Backend::Embedded,
        warmup: 0,
        function_delay: Duration::from_millis(2),
        function_delay_p99: Some(Duration::from_millis(20)),
        faults: load_tests::FaultMix {
            too_many_requests: 0.1,
            unavailable: 0.1,
            internal_error: 0.1,
            hang: 0.03,
        },
        worker_args: [
            "--upstream-timeout=1s",
            "--retry-initial-wait=20ms",
            "--retry-max-wait=200ms",
            "--retry-max-attempts=8",
        ]
        .map(str::to_owned)
        .to_vec(),
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    let e2e = &report.end_to_end;
    assert_eq!(report.accept.ok, 200, "{table}");
    assert_eq!(e2e.completed, 200, "{table}");
    assert_eq!(e2e.lost, 0, "{table}");
    assert_eq!(e2e.duplicates, 0, "{table}");
    assert_eq!(e2e.bad_results, 0, "{table}");
    assert!(report.is_clean(), "{table}");
    // A third of 200 first attempts failing means retries (the chance of none is nil).
    let attempts = report.stub.as_ref().map_or(0, |stub| stub.attempts);
    assert!(attempts > 230, "{attempts} attempts\n{table}");
    // Every result is a success or one of the injected failures: the last status of a call
    // whose 8 attempts all failed (about 3 % of runs have one), then its error and dead-letter
    // reason (`503 timeout`, `429 dead-lettered: retries_exhausted`).
    assert_eq!(e2e.results.values().sum::<u64>(), 200, "{table}");
    let succeeded = e2e.results.get("200").copied().unwrap_or(0);
    assert!(succeeded >= 195, "{table}");
    for kind in e2e.results.keys() {
        let status = kind.split(' ').next().unwrap_or_default();
        assert!(
            ["200", "429", "503", "500"].contains(&status),
            "unexpected result {kind:?}\n{table}"
        );
        assert!(
            status == "200" || kind.contains("retries_exhausted") || kind == "503 timeout",
            "a failure other than exhausted retries: {kind:?}\n{table}"
        );
    }
    assert!(table.contains("results by kind: 200: "), "{table}");
}

/// `--gateway-url`: the harness loads a deployment it did not start (here an all-in-one
/// server the test starts) and checks every callback on its own receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_target_is_loaded_through_its_gateway_url() {
    let function = load_tests::StubFunction::start(load_tests::StubBehavior::default())
        .await
        .unwrap();
    let system = load_tests::sut::SystemUnderTest::start(&load_tests::sut::SutOptions {
        backend: load_tests::sut::Backend::Embedded,
        bin_dir: None,
        max_inflight: 32,
        function_url: function.url(),
        nats_url: String::new(),
        worker_args: Vec::new(),
        gateway_args: Vec::new(),
    })
    .await
    .expect("start the deployment");
    let opts = BenchOptions {
        calls: 100,
        concurrency: 8,
        warmup: 10,
        time_limit: Duration::from_secs(120),
        callback_timeout: Duration::from_secs(30),
        function: "external-echo".to_owned(),
        headers: vec![(
            http::HeaderName::from_static("x-tenant"),
            http::HeaderValue::from_static("research"),
        )],
        external: Some(bench::ExternalTarget {
            gateway_url: system.gateway_url.clone(),
            callback_listen: "127.0.0.1:0".parse().unwrap(),
            callback_url: None,
            nats_url: None,
        }),
        ..BenchOptions::default()
    };
    let result = bench::run(&opts).await;
    system.stop().await.expect("stop the deployment");
    let report = result.expect("bench run");
    let table = report.to_table();
    assert_eq!(report.target, "external", "{table}");
    assert_eq!(report.function, "external-echo", "{table}");
    assert_eq!(report.accept.ok, 100, "{table}");
    assert_eq!(report.end_to_end.completed, 100, "{table}");
    assert_eq!(report.warmup.completed, 10, "{table}");
    assert!(report.is_clean(), "{table}");
    // Nothing of the deployment is measured or started by the harness.
    assert!(report.baseline_js_publish.is_none(), "{table}");
    assert!(report.accept_alone.is_none(), "{table}");
    assert!(
        report.stub.is_none() && report.after_run.is_empty(),
        "{table}"
    );
    assert!(table.contains("baseline_js_publish    skipped"), "{table}");
    // The function is a stub after all, so the breakdown is there.
    assert!(report.end_to_end.queue_wait_us.max > 0, "{table}");
    // 110 calls reached the function: none was the harness's own; each carried the
    // extra header through the gateway and the queue.
    assert_eq!(function.received(), 110);
    let requests = function.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.header("x-tenant") == Some("research")),
        "{:?}",
        requests.first().map(|r| &r.headers)
    );
}

/// `--duration` ends a closed loop long before its call count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bounds_a_closed_loop() {
    let opts = BenchOptions {
        calls: 1_000_000,
        concurrency: 8,
        duration: Some(Duration::from_secs(2)),
        warmup: 0,
        time_limit: Duration::from_secs(240),
        callback_timeout: Duration::from_secs(60),
        backend: load_tests::sut::Backend::Embedded,
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    assert!(report.cut_by_duration, "{table}");
    for phase in [&report.baseline_http, &report.accept] {
        assert!(phase.sent > 0 && phase.sent < 1_000_000, "{table}");
        // Requests started within the duration end within their own timeout after it.
        assert!(phase.seconds < 2.0 + 30.0, "{table}");
    }
    assert_eq!(report.end_to_end.completed, report.accept.ok, "{table}");
    assert!(report.is_clean(), "{table}");
    assert!(table.contains("cut short by --duration"), "{table}");
}

/// The soak as a scenario, in small: the worker process is SIGKILLed and restarted while
/// calls are in flight; JetStream's redelivery still brings every call to its callback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_worker_mid_run_loses_no_call() {
    let opts = BenchOptions {
        calls: 300,
        concurrency: 16,
        max_inflight: 16,
        warmup: 0,
        // 300 calls of 100 ms, 16 at a time: about 2 s of work, interrupted by kills.
        function_delay: Duration::from_millis(100),
        kill_worker_every: Some(Duration::from_secs(1)),
        worker_args: ["--ack-wait=2s"].map(str::to_owned).to_vec(),
        time_limit: Duration::from_secs(240),
        callback_timeout: Duration::from_secs(60),
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    assert!(report.worker_kills >= 1, "{table}");
    assert_eq!(report.accept.ok, 300, "{table}");
    assert_eq!(report.end_to_end.completed, 300, "{table}");
    assert_eq!(report.end_to_end.lost, 0, "{table}");
    assert_eq!(report.end_to_end.unexpected, 0, "{table}");
    assert_eq!(report.end_to_end.bad_results, 0, "{table}");
    assert!(report.is_clean(), "{table}");
    assert!(
        table.contains("worker killed (SIGKILL) and restarted"),
        "{table}"
    );
    // Killed attempts are invoked again.
    let attempts = report.stub.as_ref().map_or(0, |stub| stub.attempts);
    assert!(attempts >= 300, "{attempts}\n{table}");
}

#[tokio::test]
async fn worker_kills_are_refused_on_the_embedded_backend() {
    let opts = BenchOptions {
        backend: load_tests::sut::Backend::Embedded,
        kill_worker_every: Some(Duration::from_secs(5)),
        ..BenchOptions::default()
    };
    let err = bench::run(&opts).await.unwrap_err();
    assert!(err.to_string().contains("kill-worker-every"), "{err}");
}

/// A small closed loop sampled every 500 ms, without the accept-alone phase (which
/// restarts the sampled worker).
fn sampled_small_run(calls: usize, backend: load_tests::sut::Backend) -> BenchOptions {
    BenchOptions {
        calls,
        sample_every: Some(Duration::from_millis(500)),
        concurrency: 8,
        max_inflight: 32,
        time_limit: Duration::from_secs(120),
        callback_timeout: Duration::from_secs(30),
        backend,
        warmup: 0,
        accept_alone: false,
        ..BenchOptions::default()
    }
}

/// A soak's options in small: shorter baselines than the calls, and the processes and their
/// stores sampled through the async path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_calls_and_samples_are_reported() {
    let opts = BenchOptions {
        baseline_calls: Some(40),
        ..sampled_small_run(300, load_tests::sut::Backend::JetStream)
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    assert!(report.is_clean(), "{table}");
    assert_eq!((report.calls, report.baseline_calls), (300, 40), "{table}");
    assert_eq!(report.baseline_http.sent, 40, "{table}");
    let publish = report.baseline_js_publish.as_ref().expect("measured");
    assert_eq!(publish.sent, 40, "{table}");
    assert_eq!(report.accept.sent, 300, "{table}");
    assert_eq!(report.end_to_end.completed, 300, "{table}");
    assert!(!report.cut_by_duration, "{table}");
    assert!(
        table.contains("300 calls per phase (40 per baseline)"),
        "{table}"
    );

    let samples = report.samples.as_ref().expect("sampled");
    assert!(!samples.seconds.is_empty(), "{table}");
    let names: Vec<&str> = samples.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "gateway RSS",
            "worker RSS",
            "nats-server RSS",
            "state dir",
            "NATS store"
        ],
        "{table}"
    );
    for series in &samples.series {
        assert_eq!(series.values.len(), samples.seconds.len(), "{table}");
        // Every process ran and every store held files through the sampled time.
        assert!(
            series.values.iter().all(|v| v.is_some_and(|v| v > 0.0)),
            "{}: {:?}\n{table}",
            series.name,
            series.values
        );
    }
    assert_eq!(samples.steady().len(), 5, "{table}");
    assert!(table.contains("samples every 0.5 s"), "{table}");
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["baseline_calls"], 40);
    assert_eq!(json["samples"]["series"][2]["name"], "nats-server RSS");
}

#[tokio::test]
async fn sampling_a_run_with_worker_kills_or_too_often_is_refused() {
    for (opts, expected) in [
        (
            BenchOptions {
                sample_every: Some(Duration::from_secs(1)),
                kill_worker_every: Some(Duration::from_secs(2)),
                ..BenchOptions::default()
            },
            "without worker kills",
        ),
        (
            BenchOptions {
                sample_every: Some(Duration::from_millis(100)),
                accept_alone: false,
                ..BenchOptions::default()
            },
            "sample-every must be at least",
        ),
        (
            BenchOptions {
                sample_every: Some(Duration::from_secs(1)),
                accept_alone: true,
                ..BenchOptions::default()
            },
            "needs --no-accept-alone",
        ),
        (
            BenchOptions {
                baseline_calls: Some(0),
                ..BenchOptions::default()
            },
            "baseline-calls must be",
        ),
    ] {
        let err = bench::run(&opts).await.unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
}

/// On the embedded backend the one process and its state are sampled, not the nats-server
/// the run starts for nothing but the JetStream baselines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_of_the_embedded_backend_are_its_process_and_state() {
    let opts = sampled_small_run(100, load_tests::sut::Backend::Embedded);
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    assert!(report.is_clean(), "{table}");
    let samples = report.samples.as_ref().expect("sampled");
    let names: Vec<&str> = samples.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["faas-async RSS", "state dir"], "{table}");
    assert!(
        samples
            .series
            .iter()
            .all(|s| !s.values.is_empty() && s.values.iter().all(|v| v.is_some_and(|v| v > 0.0))),
        "{table}"
    );
}
