//! A drop-in for OpenFaaS's queue worker: the `queue-worker` binary started with exactly the
//! environment OpenFaaS's own Helm charts give their queue worker (faas-netes: the CE worker of
//! `chart/openfaas`, its Pro JetStream worker, and the dedicated-queue `chart/queue-worker`, each
//! with the chart's default values) becomes ready against a real nats-server and runs a call.
//!
//! Only addresses differ from what the charts render: NATS is the test's server (the charts'
//! `nats.external` values, or `nats.host`/`nats.port`), and the gateway is the stub function
//! (`gateway_url`; the CE chart renders an address without a port, so there `--gateway-url` on
//! the command line supplies it, as a flag wins over any variable). The metrics port is a flag
//! too: the charts render none.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{DEADLINE, call, nats_args, stream_args};
use test_support::nats_server::NatsServer;
use test_support::stub::{CallbackReceiver, StubBehavior, StubFunction};

/// One chart's rendering: its environment (with `{nats_port}` and `{gateway}` standing for the
/// test's addresses), the stream and consumer the worker must use, and notes its log must carry.
struct Chart {
    env: &'static [(&'static str, &'static str)],
    /// Flags besides `--metrics-listen`.
    flags: &'static [&'static str],
    stream: &'static str,
    consumer: &'static str,
    notes: &'static [&'static str],
}

/// `chart/openfaas/templates/queueworker-ce-dep.yaml` with `nats.external.enabled=true`
/// (`clusterName` left empty) and the chart's defaults (`basic_auth: true`,
/// `functionNamespace: openfaas-fn`, `queueWorker.ackWait: 60s`, no `maxInflight`, so `1`).
const CE: Chart = Chart {
    env: &[
        ("faas_nats_address", "127.0.0.1"),
        ("faas_nats_port", "{nats_port}"),
        ("faas_nats_cluster_name", ""),
        ("faas_nats_channel", "faas-request"),
        ("faas_nats_queue_group", "faas"),
        ("faas_gateway_address", "gateway.openfaas.svc.cluster.local"),
        ("faas_function_suffix", ".openfaas-fn.svc.cluster.local"),
        ("ack_wait", "60s"),
        ("max_inflight", "1"),
        // The chart mounts the gateway's basic-auth secret here ({secrets}: the test's copy).
        ("secret_mount_path", "{secrets}"),
        ("basic_auth", "true"),
    ],
    flags: &["--gateway-url", "{gateway}"],
    stream: "faas-async",
    consumer: "faas",
    notes: &["faas_nats_channel=\"faas-request\" is a NATS Streaming channel"],
};

/// `chart/openfaas/templates/queueworker-dep.yaml` (`openfaasPro: true`) with
/// `nats.external.enabled=true` and the chart's defaults (`queueWorkerPro.backoff` unset, so
/// `""`; `gateway.upstreamTimeout: 1m`; `nats.streamReplication: 1`).
const PRO: Chart = Chart {
    env: &[
        ("nats_host", "127.0.0.1"),
        ("nats_port", "{nats_port}"),
        ("nats_stream", "faas-request"),
        ("nats_durable", "faas-workers"),
        ("default_function_name", "openfaas-fn"),
        ("max_inflight", "50"),
        ("scaling_mode", "static"),
        ("consumer_inactive_threshold", "30s"),
        ("gateway_url", "{gateway}"),
        ("tls_insecure", "false"),
        ("debug", "false"),
        ("log_encoding", "console"),
        ("nats_stream_replicas", "1"),
        ("ack_wait", "60s"),
        ("limiter_enabled", "true"),
        ("upstream_timeout", "1m"),
        ("max_retry_attempts", "100"),
        ("max_retry_wait", "120s"),
        ("initial_retry_wait", "10s"),
        ("retry_http_codes", "408,429,500,502,503,504"),
        ("backoff", ""),
    ],
    flags: &[],
    stream: "faas-request",
    consumer: "faas-workers",
    notes: &["consumer_inactive_threshold=30s", "nats_stream_replicas=1"],
};

/// `chart/queue-worker/templates/deployment.yaml` with the chart's defaults (`queueName: ""`,
/// one partition, `nats.stream.name: custom-request`, `nats.consumer.durableName:
/// custom-workers`, `ackWait: 30s`, `maxInflight: 1`, no `backoff`).
const DEDICATED_QUEUE: Chart = Chart {
    env: &[
        ("nats_host", "127.0.0.1"),
        ("nats_port", "{nats_port}"),
        ("nats_stream", "custom-request"),
        ("nats_durable", "custom-workers"),
        ("queue_name", ""),
        ("queue_partitions", "1"),
        ("filter_partition", "0"),
        ("max_inflight", "1"),
        ("scaling_mode", "static"),
        ("consumer_inactive_threshold", "30s"),
        ("gateway_url", "{gateway}"),
        ("tls_insecure", "false"),
        ("debug", "false"),
        ("log_encoding", "console"),
        ("nats_stream_replicas", "1"),
        ("ack_wait", "30s"),
        ("limiter_enabled", "true"),
        ("upstream_timeout", "1m"),
        ("max_retry_attempts", "100"),
        ("max_retry_wait", "120s"),
        ("initial_retry_wait", "10s"),
        ("retry_http_codes", "408,429,500,502,503,504"),
        ("backoff", ""),
    ],
    flags: &[],
    stream: "custom-request",
    consumer: "custom-workers",
    notes: &["consumer_inactive_threshold=30s"],
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the binary with the chart's environment and nothing else, waits for `/readyz`, runs
/// one call through it and checks the log names the variables without effect here.
async fn a_worker_from_the_chart_runs(chart: &Chart) {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        status: 200,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let receiver = CallbackReceiver::start().await.unwrap();
    // The streams, as a gateway given the same variables makes them (it reads nats_stream).
    let mut args = nats_args(&nats.url());
    args.stream = chart.stream.into();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let max_payload = client.server_info().max_payload;
    queue_core::backend::nats::ensure_streams(&js, &args, &stream_args(), max_payload)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    // The gateway's credentials, as OpenFaaS mounts them (basic-auth-user, basic-auth-password).
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(secrets.join("basic-auth-password"), "from-the-secret\n").unwrap();
    let fill = |s: &str| {
        s.replace("{nats_port}", &nats.port().to_string())
            .replace("{gateway}", &function.url())
            .replace("{secrets}", &secrets.display().to_string())
    };
    let log_path = dir.path().join("worker.log");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_queue-worker"));
    command
        .env_clear()
        .envs(chart.env.iter().map(|(k, v)| (*k, fill(v))))
        .args(["--metrics-listen", &metrics])
        .args(chart.flags.iter().map(|f| fill(f)))
        // The default state directory, ./data/queue-worker, is made here.
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .kill_on_drop(true);
    let mut worker = command.spawn().unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let http = queue_worker::invoke::http_client("openfaas-values-test").unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = worker.try_wait().unwrap() {
            panic!("the worker exited ({status}):\n{}", log());
        }
        if let Ok(r) = http.get(format!("http://{metrics}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < end, "never ready:\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let queued = call("figlet", Some(&receiver.url()), b"hello");
    let id = queued.meta.call_id.clone();
    queue_core::backend::nats::publish_call(
        &client,
        &js,
        queue_core::backend::call_subject(&args.subject_prefix, &queued),
        &queued,
        &queue_core::sealing::Sealing::off(),
        max_payload,
    )
    .await
    .unwrap();
    assert!(
        receiver
            .wait_for_call_ids(std::slice::from_ref(&id), DEADLINE)
            .await,
        "no callback:\n{}",
        log()
    );
    let requests = function.requests();
    let invoked: Vec<_> = requests
        .iter()
        .filter(|r| r.path_and_query.starts_with("/function/"))
        .collect();
    assert_eq!(invoked.len(), 1);
    assert_eq!(invoked[0].path_and_query, "/function/figlet");
    // As OpenFaaS Pro's worker does, it reads the functions' annotations from the gateway,
    // with the gateway's credentials where the chart gives them.
    let end = Instant::now() + DEADLINE;
    let listed = loop {
        let listed: Vec<_> = function
            .requests()
            .into_iter()
            .filter(|r| r.path_and_query.starts_with("/system/"))
            .collect();
        if !listed.is_empty() {
            break listed;
        }
        assert!(Instant::now() < end, "no function list asked:\n{}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if chart.env.contains(&("basic_auth", "true")) {
        assert!(
            listed.iter().all(|r| r
                .header("authorization")
                .is_some_and(|v| v.starts_with("Basic "))),
            "{listed:?}"
        );
    }

    // The consumer (bound at the first pull) is the one the chart names, on its stream.
    let consumer = js
        .get_stream(chart.stream)
        .await
        .unwrap()
        .consumer_info(chart.consumer)
        .await;
    assert!(consumer.is_ok(), "{consumer:?}\n{}", log());

    let log = log();
    for note in chart.notes {
        assert!(log.contains(note), "{note:?} not in the log:\n{log}");
    }
    worker.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openfaas_ce_chart_environment_starts_a_working_worker() {
    a_worker_from_the_chart_runs(&CE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openfaas_pro_chart_environment_starts_a_working_worker() {
    a_worker_from_the_chart_runs(&PRO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedicated_queue_chart_environment_starts_a_working_worker() {
    a_worker_from_the_chart_runs(&DEDICATED_QUEUE).await;
}
