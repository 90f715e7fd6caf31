//! `load-tests --scenario cluster` in small: three nats-server nodes with R3 streams and
//! records bucket, the `gateway-plugin` and `queue-worker` binaries given the three URLs (built
//! by `cargo test --workspace`; with `-p load-tests` alone build them first: `cargo build -p
//! gateway-plugin -p queue-worker`), an open loop of calls while the calls stream's leader and
//! then the records bucket's leader are SIGKILLed and restarted. No accepted call may be lost;
//! refusals during the fail-over are counted; a probe after the faults goes through whole.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails loudly"
)]

use std::time::Duration;

use load_tests::bench::{self, BenchOptions, ClusterOptions, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_and_records_leaders_under_load_loses_no_accepted_call() {
    let opts = BenchOptions {
        calls: 1_500,
        rate: Some(100.0),
        concurrency: 8,
        max_inflight: 64,
        warmup: 20,
        cluster: Some(ClusterOptions {
            first_fault_after: Duration::from_secs(2),
            down_for: Duration::from_secs(3),
            pause: Duration::from_secs(1),
            probe_calls: 30,
            ..ClusterOptions::default()
        }),
        time_limit: Duration::from_secs(300),
        callback_timeout: Duration::from_secs(60),
        ..BenchOptions::default()
    };
    let report = bench::run(&opts).await.expect("bench run");
    let table = report.to_table();
    eprintln!("{table}");
    let cluster = report.cluster.as_ref().expect("a cluster report");
    assert_eq!(cluster.nodes, 3, "{table}");
    assert_eq!(cluster.replicas, 3, "{table}");
    let targets: Vec<&str> = cluster.faults.iter().map(|f| f.target.as_str()).collect();
    assert_eq!(targets, ["calls stream", "records bucket"], "{table}");
    for fault in &cluster.faults {
        assert_ne!(fault.node, fault.new_leader, "{table}");
        assert!(fault.leader_elected_after_seconds > 0.0, "{table}");
        assert!(fault.down_seconds >= 3.0, "{table}");
    }
    // The first kill came while calls were being submitted (15 s of them).
    assert!(cluster.faults[0].killed_at_seconds < 15.0, "{table}");

    let e2e = &report.end_to_end;
    assert!(report.accept.ok > 0, "{table}");
    assert_eq!(report.accept.ok + cluster.refused, 1_500, "{table}");
    assert_eq!(e2e.completed, report.accept.ok, "{table}");
    assert_eq!(e2e.lost, 0, "{table}");
    assert_eq!(e2e.unexpected, 0, "{table}");
    assert_eq!(e2e.bad_results, 0, "{table}");
    assert_eq!(e2e.bad_headers, 0, "{table}");
    assert_eq!(cluster.probe_accepted, 30, "{table}");
    assert_eq!(cluster.probe_completed, 30, "{table}");
    assert!(report.is_clean(), "{table}");
    assert!(table.contains("SIGKILL calls stream leader"), "{table}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["cluster"]["faults"].as_array().map(Vec::len), Some(2));
}

#[test]
fn the_cluster_scenario_is_three_nodes_and_three_replicas_and_bad_clusters_are_refused() {
    let opts = Scenario::Cluster.options();
    assert!(opts.validate().is_ok(), "{opts:?}");
    let cluster = opts.cluster.clone().unwrap();
    assert_eq!((cluster.nodes, cluster.replicas), (3, 3));
    assert!(opts.rate.is_some(), "the faults come under a steady load");
    for bad in [
        ClusterOptions {
            nodes: 1,
            replicas: 1,
            ..cluster.clone()
        },
        ClusterOptions {
            replicas: 4,
            ..cluster.clone()
        },
        ClusterOptions {
            probe_calls: 0,
            ..cluster
        },
    ] {
        let opts = BenchOptions {
            cluster: Some(bad),
            ..opts.clone()
        };
        assert!(
            matches!(opts.validate(), Err(bench::BenchError::Options(_))),
            "{opts:?}"
        );
    }
    let embedded = BenchOptions {
        backend: load_tests::sut::Backend::Embedded,
        ..opts
    };
    assert!(embedded.validate().is_err());
}
