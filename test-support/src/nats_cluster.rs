//! A JetStream cluster of private `nats-server` processes on loopback, for tests and the
//! `cluster` load test: each node has its own client, route and monitoring ports and its own
//! store directory, and can be killed and restarted on its own.
//!
//! Readiness is always a condition, never a pause: a node is up once its monitoring endpoint
//! answers `/healthz?js-enabled-only=true`, the cluster once every node names the same
//! JetStream meta leader (`/jsz`), and a restarted node once its full `/healthz` answers 200
//! (meta leader known, every stream and consumer it holds current).

use std::time::Duration;

use async_nats::jetstream;
use tokio::time::Instant;

use crate::error::HarnessError;
use crate::nats_server::{NatsServer, Readiness, SPAWN_ATTEMPTS, monitor_get, port_was_taken};

/// How long the cluster, a leader election or a catch-up may take (generous: a loaded 2-core
/// machine runs three servers next to the system under test).
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(90);
/// How often cluster conditions are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Upper bound for one JetStream API request of a poll.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The cluster's name (`--cluster_name`).
pub const CLUSTER_NAME: &str = "faas-async-test";

/// A cluster of `nats-server` processes with JetStream; see the [module docs](self).
///
/// Node `i` has the server name `n{i}` (what stream info reports as `cluster.leader`).
/// Dropping it kills every process and removes their directories.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes (3 for replicated streams) with routes to each other and waits
    /// until a JetStream meta leader is elected and every node is healthy.
    pub async fn start(size: usize) -> Result<Self, HarnessError> {
        Self::start_with_args(size, &[]).await
    }

    /// Like [`NatsCluster::start`], passing `extra` arguments to every `nats-server` (e.g.
    /// `["--user", "u", "--pass", "p"]`); they are kept for restarts.
    pub async fn start_with_args(size: usize, extra: &[&str]) -> Result<Self, HarnessError> {
        if size == 0 {
            return Err(HarnessError::Cluster("a cluster needs a node".into()));
        }
        let mut attempt = 1;
        loop {
            match Self::try_start(size, extra).await {
                Err(err) if attempt < SPAWN_ATTEMPTS && port_was_taken(&err) => attempt += 1,
                result => return result,
            }
        }
    }

    async fn try_start(size: usize, extra: &[&str]) -> Result<Self, HarnessError> {
        // Client, route and monitoring port per node, all held open while picked so none
        // repeats.
        let ports = free_ports(3 * size)?;
        let (client, rest) = ports.split_at(size);
        let (route, monitor) = rest.split_at(size);
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let routes = (0..size)
                .filter(|&j| j != i)
                .map(|j| format!("nats://127.0.0.1:{}", route[j]))
                .collect::<Vec<_>>()
                .join(",");
            let mut args = vec![
                "--server_name".to_owned(),
                server_name(i),
                "-m".to_owned(),
                monitor[i].to_string(),
                "--cluster_name".to_owned(),
                CLUSTER_NAME.to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{}", route[i]),
            ];
            if !routes.is_empty() {
                args.extend(["--routes".to_owned(), routes]);
            }
            args.extend(extra.iter().map(|&arg| arg.to_owned()));
            nodes.push(NatsServer::unstarted(
                crate::nats_server::nats_server_binary()?,
                args,
                client[i],
                Some(monitor[i]),
                // A restarted node is ready once it caught up.
                Readiness::Healthz {
                    js_enabled_only: false,
                },
            )?);
        }
        // Every node first (a lone node has no JetStream quorum), then wait for each.
        let mut log_starts = Vec::with_capacity(size);
        for node in &mut nodes {
            log_starts.push(node.spawn_process()?);
        }
        for (node, log_start) in nodes.iter_mut().zip(log_starts) {
            node.wait_ready(
                log_start,
                Readiness::Healthz {
                    js_enabled_only: true,
                },
            )
            .await?;
        }
        let cluster = Self { nodes };
        cluster.wait_meta_leader().await?;
        for node in &cluster.nodes {
            cluster
                .wait_for(&format!("node {} healthy", node.port()), || async {
                    let port = node.monitor_port().unwrap_or_default();
                    match monitor_get(port, "/healthz").await {
                        Ok((200, _)) => Ok(Some(())),
                        Ok((status, body)) => Err(format!("{status} {}", body.trim())),
                        Err(e) => Err(e),
                    }
                })
                .await?;
        }
        Ok(cluster)
    }

    /// How many nodes it has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &NatsServer {
        &self.nodes[i]
    }

    /// Every node's client URL, comma-separated (`nats://127.0.0.1:P0,nats://...`): what
    /// `--nats-url` takes.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node whose server name is `name` (`n0`, `n1`, ...).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| server_name(i) == name)
    }

    /// SIGKILLs node `i` and waits for it to exit.
    pub async fn kill(&mut self, i: usize) {
        self.nodes[i].stop().await;
    }

    /// Starts node `i` again on its ports and store, and waits until it caught up (its full
    /// `/healthz` answers 200).
    pub async fn restart(&mut self, i: usize) -> Result<(), HarnessError> {
        self.nodes[i].restart().await
    }

    /// The meta leader every running node names, once they agree.
    pub async fn wait_meta_leader(&self) -> Result<String, HarnessError> {
        self.wait_for("a JetStream meta leader", || async {
            let mut leaders = Vec::new();
            for node in self.nodes.iter().filter(|node| node.is_running()) {
                let port = node.monitor_port().unwrap_or_default();
                let (status, body) = monitor_get(port, "/jsz").await?;
                if status != 200 {
                    return Err(format!("/jsz answered {status}"));
                }
                let jsz: serde_json::Value =
                    serde_json::from_str(&body).map_err(|e| format!("/jsz: {e}"))?;
                let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
                leaders.push(leader.to_owned());
            }
            Ok(match leaders.first() {
                Some(first) if !first.is_empty() && leaders.iter().all(|l| l == first) => {
                    Some(first.clone())
                }
                _ => None,
            })
        })
        .await
    }

    /// A JetStream context on a connection to the running nodes.
    pub async fn jetstream(&self) -> Result<jetstream::Context, HarnessError> {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(NatsServer::url)
            .collect();
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(REQUEST_TIMEOUT)
            .connect(urls)
            .await
            .map_err(|e| HarnessError::Cluster(format!("connecting to the cluster: {e}")))?;
        Ok(jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client))
    }

    /// The server name of the stream's leader (`cluster.leader` of its info); `None` while
    /// it has none.
    pub async fn stream_leader(
        js: &jetstream::Context,
        stream: &str,
    ) -> Result<Option<String>, String> {
        let info = js
            .get_stream(stream)
            .await
            .map_err(|e| format!("stream {stream}: {e}"))?
            .get_info()
            .await
            .map_err(|e| format!("stream {stream} info: {e}"))?;
        Ok(info
            .cluster
            .and_then(|cluster| cluster.leader)
            .filter(|leader| !leader.is_empty()))
    }

    /// Waits until the stream has a leader other than `not` (after `not` was killed or
    /// stepped down), and returns its name.
    pub async fn wait_stream_leader(
        &self,
        js: &jetstream::Context,
        stream: &str,
        not: Option<&str>,
    ) -> Result<String, HarnessError> {
        self.wait_for(&format!("a leader of stream {stream}"), || async {
            Ok(Self::stream_leader(js, stream)
                .await?
                .filter(|leader| Some(leader.as_str()) != not))
        })
        .await
    }

    /// Waits until the stream has a leader and every other node is a current replica.
    pub async fn wait_stream_current(
        &self,
        js: &jetstream::Context,
        stream: &str,
    ) -> Result<(), HarnessError> {
        let peers = self.nodes.len().saturating_sub(1);
        self.wait_for(
            &format!("every replica of stream {stream} current"),
            || async {
                let info = js
                    .get_stream(stream)
                    .await
                    .map_err(|e| format!("stream {stream}: {e}"))?
                    .get_info()
                    .await
                    .map_err(|e| format!("stream {stream} info: {e}"))?;
                let Some(cluster) = info.cluster else {
                    return Err("no cluster info".into());
                };
                let current = cluster.leader.is_some_and(|l| !l.is_empty())
                    && cluster.replicas.len() == peers
                    && cluster.replicas.iter().all(|r| r.current && !r.offline);
                Ok(current.then_some(()))
            },
        )
        .await
    }

    /// Asks the stream's leader to step down (JetStream elects another one).
    pub async fn step_down(js: &jetstream::Context, stream: &str) -> Result<(), String> {
        let answer: serde_json::Value = js
            .request(
                format!("STREAM.LEADER.STEPDOWN.{stream}"),
                &serde_json::json!({}),
            )
            .await
            .map_err(|e| format!("stepping down the leader of {stream}: {e}"))?;
        if answer["success"].as_bool() == Some(true) {
            Ok(())
        } else {
            Err(format!("stepping down the leader of {stream}: {answer}"))
        }
    }

    /// Polls `check` until it returns `Ok(Some(_))`, for at most [`CLUSTER_TIMEOUT`]; fails
    /// with the last error or "not yet" then.
    async fn wait_for<T, F, Fut>(&self, what: &str, check: F) -> Result<T, HarnessError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<T>, String>>,
    {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let last = match tokio::time::timeout(REQUEST_TIMEOUT * 2, check()).await {
                Ok(Ok(Some(found))) => return Ok(found),
                Ok(Ok(None)) => "not yet".to_owned(),
                Ok(Err(e)) => e,
                Err(_) => "no answer".to_owned(),
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::Cluster(format!(
                    "{what}: not after {CLUSTER_TIMEOUT:?} (last: {last})"
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// The server name of node `i`.
pub fn server_name(i: usize) -> String {
    format!("n{i}")
}

/// `n` distinct ports on 127.0.0.1 that were free a moment ago.
fn free_ports(n: usize) -> Result<Vec<u16>, HarnessError> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HarnessError::io("picking free ports", e))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HarnessError::io("picking free ports", e))
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::stream;

    use super::*;

    /// Three nodes, an R3 stream: its leader SIGKILLed, another node takes over and the
    /// stream keeps taking messages; the killed node comes back and catches up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replicated_stream_survives_its_leader_and_the_leader_rejoins() {
        let mut cluster = NatsCluster::start(3).await.unwrap();
        assert_eq!(cluster.len(), 3);
        assert_eq!(cluster.urls().split(',').count(), 3);
        let leader = cluster.wait_meta_leader().await.unwrap();
        assert!(cluster.index_of(&leader).is_some(), "{leader}");

        let js = cluster.jetstream().await.unwrap();
        js.create_stream(stream::Config {
            name: "R3".into(),
            subjects: vec!["r3.>".into()],
            storage: stream::StorageType::File,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
        for _ in 0..10 {
            js.publish("r3.a", "x".into()).await.unwrap().await.unwrap();
        }
        cluster.wait_stream_current(&js, "R3").await.unwrap();
        let first = cluster.wait_stream_leader(&js, "R3", None).await.unwrap();
        let killed = cluster.index_of(&first).unwrap();

        cluster.kill(killed).await;
        assert!(!cluster.node(killed).is_running());
        let js = cluster.jetstream().await.unwrap();
        let second = cluster
            .wait_stream_leader(&js, "R3", Some(&first))
            .await
            .unwrap();
        assert_ne!(first, second);
        js.publish("r3.a", "after".into())
            .await
            .unwrap()
            .await
            .unwrap();

        cluster.restart(killed).await.unwrap();
        cluster.wait_stream_current(&js, "R3").await.unwrap();
        let mut info = js.get_stream("R3").await.unwrap();
        assert_eq!(info.info().await.unwrap().state.messages, 11);

        // A step-down moves the leadership without a kill.
        let before = NatsCluster::stream_leader(&js, "R3")
            .await
            .unwrap()
            .unwrap();
        NatsCluster::step_down(&js, "R3").await.unwrap();
        let after = cluster
            .wait_stream_leader(&js, "R3", Some(&before))
            .await
            .unwrap();
        assert_ne!(before, after);
    }
}
