//! What the workers announce, in the admin queue view (issue 15), against a private
//! nats-server with a gateway and a worker in this process: a worker's adaptive limit for a
//! function that pushes back (a stub answering `429` above two calls at once) shows lowered
//! under its cap; a scheduled call is counted; an `admin:team-a` caller sees team-a's
//! functions, scheduled calls, limits and lanes only, and no worker-wide figure; a stopped
//! worker's status is withdrawn. With fair workers the view lists the lanes.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, http, sha256_hex, token};
use serde_json::Value;
use test_support::nats_server::NatsServer;
use test_support::stub::{StubBehavior, StubFunction};

struct Api {
    client: reqwest::Client,
    base: String,
    invoker: String,
}

impl Api {
    /// A gateway with three tokens: an invoker, `admin:team-a` and `admin:*`.
    async fn start(nats: &NatsServer, dir: &std::path::Path) -> (Gateway, Self, String, String) {
        let (invoker, team_a, root) = (token(), token(), token());
        let tokens = dir.join("tokens");
        std::fs::write(
            &tokens,
            format!(
                "invoker {} invoke:* read:*\nteam-a-admin {} admin:team-a\nroot {} admin:*\n",
                sha256_hex(&invoker),
                sha256_hex(&team_a),
                sha256_hex(&root),
            ),
        )
        .unwrap();
        let gateway = Gateway::start(
            &nats.url(),
            &["--auth-tokens-file", tokens.to_str().unwrap()],
        )
        .await;
        let api = Self {
            client: http(),
            base: gateway.url.clone(),
            invoker,
        };
        (gateway, api, team_a, root)
    }

    async fn queue(&self, token: &str) -> Value {
        let r = (self.client.get(format!("{}/system/async/queue", self.base)))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
    }

    async fn invoke(&self, function: &str, headers: &[(&str, &str)]) {
        let mut request = (self
            .client
            .post(format!("{}/async-function/{function}", self.base)))
        .bearer_auth(&self.invoker)
        .body("x");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 202, "{function}");
    }

    /// The queue view of `token` once `check` holds for it.
    async fn wait(&self, token: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let view = self.queue(token).await;
            if check(&view) {
                return view;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting until {what}: {view}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn row<'a>(view: &'a Value, name: &str) -> Option<&'a Value> {
    (view["functions"].as_array().unwrap().iter()).find(|f| f["function"] == name)
}

fn names(list: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = (list.as_array().unwrap().iter())
        .map(|e| e[key].as_str().unwrap_or("").to_owned())
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_view_shows_limits_scheduled_calls_and_workers_by_namespace() {
    let nats = NatsServer::start().await.unwrap();
    // Two calls at once; a third is refused with 429 (retried by the worker).
    let function = StubFunction::start(StubBehavior {
        delay: Duration::from_millis(300),
        capacity: Some(2),
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (gateway, api, team_a, root) = Api::start(&nats, dir.path()).await;
    let worker = Worker::start_with(
        &nats.url(),
        &function.url(),
        &[
            "--max-inflight",
            "8",
            "--status-interval",
            "200ms",
            "--retry-max-attempts",
            "50",
        ],
    );

    // The worker announces itself before it ran anything.
    let view = api
        .wait(&root, "the worker announced itself", |v| {
            v["workers"].as_array().is_some_and(|w| w.len() == 1)
        })
        .await;
    let announced = &view["workers"][0];
    assert_eq!(announced["consumer"], "faas-async-workers");
    assert_eq!(announced["max_inflight"], 8);
    assert_eq!(announced["fair_scheduling"], false);
    assert_eq!(announced["adaptive_concurrency"], true);
    assert_eq!(view["lanes"], Value::Null, "no worker pulls by lane");
    assert_eq!(view["scheduled"], 0);

    // A burst that the function pushes back on: the limit comes down under the cap.
    for _ in 0..12 {
        api.invoke("fn.team-a", &[]).await;
    }
    api.invoke("fn.team-b", &[]).await;
    let view = api
        .wait(&root, "team-a's limit is lowered, team-b's tracked", |v| {
            let lowered = row(v, "fn.team-a")
                .is_some_and(|f| f["concurrency"]["limit"].as_u64().is_some_and(|l| l < 8));
            lowered && row(v, "fn.team-b").is_some_and(|f| f["concurrency"].is_object())
        })
        .await;
    let a = row(&view, "fn.team-a").unwrap();
    assert_eq!(a["concurrency"]["cap"], 8, "{a}");
    assert_eq!(a["concurrency"]["workers"], 1, "{a}");
    let per_worker = &view["workers"][0]["functions"];
    assert_eq!(names(per_worker, "function"), ["fn.team-a", "fn.team-b"]);

    // A scheduled call is counted, in its function's row too.
    api.invoke("fn.team-b", &[("X-Delay", "1h")]).await;
    let view = api
        .wait(&root, "the scheduled call is counted", |v| {
            v["scheduled"] == 1
        })
        .await;
    assert_eq!(row(&view, "fn.team-b").unwrap()["scheduled"], 1);

    // team-a's admin: its functions, scheduled calls and limits only, no worker-wide figure.
    let mine = api
        .wait(&team_a, "team-a's calls are done", |v| v["pending"] == 0)
        .await;
    assert_eq!(
        names(&mine["functions"], "function"),
        ["fn.team-a"],
        "{mine}"
    );
    assert_eq!(
        mine["scheduled"], 0,
        "team-b's scheduled call is not counted"
    );
    assert_eq!(row(&mine, "fn.team-a").unwrap()["scheduled"], 0);
    let limit = row(&mine, "fn.team-a").unwrap()["concurrency"]["limit"].as_u64();
    assert!(limit.is_some_and(|l| l < 8), "{mine}");
    let seen = &mine["workers"][0];
    assert_eq!(
        names(&seen["functions"], "function"),
        ["fn.team-a"],
        "{seen}"
    );
    for hidden in ["max_inflight", "in_flight", "functions_omitted"] {
        assert_eq!(seen[hidden], Value::Null, "{hidden}: {seen}");
    }
    assert_eq!(mine["unacked"], Value::Null);

    // A worker that stops withdraws its status.
    worker.shutdown().await;
    api.wait(&root, "the stopped worker is gone", |v| {
        v["workers"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_fair_workers_the_queue_view_lists_the_lanes() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (gateway, api, team_a, root) = Api::start(&nats, dir.path()).await;
    let worker = Worker::start_with(
        &nats.url(),
        &function.url(),
        &["--fair-scheduling", "true", "--status-interval", "200ms"],
    );
    api.wait(&root, "the fair worker announced itself", |v| {
        v["workers"][0]["fair_scheduling"] == true && v["lanes"].is_array()
    })
    .await;

    // Held calls (the functions are paused) stay in their lanes, delivered or waiting.
    for paused in ["fn.team-a", "fn.team-b"] {
        let r = (api.client)
            .post(format!(
                "{}/system/async/functions/{paused}/pause",
                api.base
            ))
            .bearer_auth(&root)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..3 {
        api.invoke("fn.team-a", &[("X-Priority", "high")]).await;
    }
    api.invoke("fn.team-b", &[]).await;
    let lane_total = |v: &Value, function: &str, priority: &str| -> Option<u64> {
        (v["lanes"].as_array()?.iter())
            .find(|l| l["function"] == function && l["priority"] == priority)
            .map(|l| l["pending"].as_u64().unwrap() + l["unacked"].as_u64().unwrap())
    };
    let view = api
        .wait(&root, "both lanes hold their calls", |v| {
            lane_total(v, "fn.team-a", "high") == Some(3)
                && lane_total(v, "fn.team-b", "normal") == Some(1)
        })
        .await;
    let lane = (view["lanes"].as_array().unwrap().iter())
        .find(|l| l["function"] == "fn.team-a")
        .unwrap();
    assert_eq!(lane["consumer"], "faas-async-workers");
    let mine = api.queue(&team_a).await;
    assert_eq!(names(&mine["lanes"], "function"), ["fn.team-a"], "{mine}");
    assert_eq!(function.count(), 0, "paused: nothing invoked");

    worker.shutdown().await;
    gateway.shutdown().await;
}
