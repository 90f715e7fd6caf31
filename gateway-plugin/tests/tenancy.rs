//! Admin views by namespace against a live gateway and worker on a private nats-server: with
//! functions and dead letters in team-a and team-b, an `admin:team-a` token sees, pauses,
//! replays and purges only team-a's (another namespace's dead letter reads as unknown and is
//! left alone), while `admin:*` sees both; `/metrics` stays `admin:*`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::time::{Duration, Instant};

use common::{DEADLINE, Gateway, Worker, http, sha256_hex, token};
use serde_json::{Value, json};
use test_support::nats_server::NatsServer;
use test_support::stub::{StubBehavior, StubFunction};

struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let r = (self.client.get(format!("{}{path}", self.base)))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let r = (self.client.post(format!("{}{path}", self.base)))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn invoke(&self, token: &str, function: &str) -> String {
        let r = (self
            .client
            .post(format!("{}/async-function/{function}", self.base)))
        .bearer_auth(token)
        .body("x")
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), 202, "{function}");
        r.headers()["x-call-id"].to_str().unwrap().to_owned()
    }

    /// The 200 body of `path` once `check` holds for it.
    async fn wait(
        &self,
        token: &str,
        path: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            let (status, body) = self.get(token, path).await;
            if status == 200 && check(&body) {
                return body;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting until {what}: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn functions(list: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = (list.as_array().unwrap().iter())
        .map(|e| e[key].as_str().unwrap_or("").to_owned())
        .collect();
    out.sort();
    out
}

fn call_ids(letters: &Value) -> Vec<String> {
    functions(letters, "call_id")
}

fn sequence_of(letters: &Value, call_id: &str) -> u64 {
    (letters.as_array().unwrap().iter())
        .find(|e| e["call_id"] == call_id)
        .and_then(|e| e["sequence"].as_u64())
        .unwrap_or_else(|| panic!("{call_id} not in {letters}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_views_hold_only_the_callers_namespaces() {
    let nats = NatsServer::start().await.unwrap();
    let function = StubFunction::start(StubBehavior {
        fail_first: u32::MAX,
        fail_status: 500,
        ..StubBehavior::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (invoker, team_a, root) = (token(), token(), token());
    std::fs::write(
        dir.path().join("tokens"),
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
        &[
            "--auth-tokens-file",
            dir.path().join("tokens").to_str().unwrap(),
        ],
    )
    .await;
    let worker = Worker::start_with(&nats.url(), &function.url(), &["--retry-max-attempts", "1"]);
    let api = Api {
        client: http(),
        base: gateway.url.clone(),
    };

    // Two calls per namespace fail for good: two dead letters in each.
    let a1 = api.invoke(&invoker, "fn.team-a").await;
    let a2 = api.invoke(&invoker, "fn.team-a").await;
    let b1 = api.invoke(&invoker, "fn.team-b").await;
    let b2 = api.invoke(&invoker, "fn.team-b").await;
    let all_letters = api
        .wait(
            &root,
            "/system/async/dead-letters",
            "four dead letters",
            |l| l.as_array().is_some_and(|l| l.len() == 4),
        )
        .await;

    // Pause: each admin its own namespace; another namespace is refused.
    let (status, body) = api
        .post(
            &team_a,
            "/system/async/functions/fn.team-b/pause",
            json!({}),
        )
        .await;
    assert_eq!(
        (status, body["missing_scope"].as_str()),
        (403, Some("admin:team-b")),
        "{body}"
    );
    let (status, body) = api
        .post(&root, "/system/async/functions/fn.team-b/pause", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .post(
            &team_a,
            "/system/async/functions/fn.team-a/pause",
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["paused_functions"],
        json!(["fn.team-a"]),
        "team-b's pause is not shown"
    );

    // A held call in each namespace.
    api.invoke(&invoker, "fn.team-a").await;
    api.invoke(&invoker, "fn.team-b").await;
    let everything = api
        .wait(
            &root,
            "/system/async/queue",
            "both held calls pending",
            |q| q["pending"] == 2,
        )
        .await;
    assert_eq!(
        functions(&everything["functions"], "function"),
        ["fn.team-a", "fn.team-b"]
    );
    assert_eq!(everything["paused_functions"].as_array().unwrap().len(), 2);
    assert_eq!(everything["dead_letters"], 4);
    assert!(
        everything["unacked"].is_u64() && everything["consumers"].is_u64(),
        "{everything}"
    );

    let (status, mine) = api.get(&team_a, "/system/async/queue").await;
    assert_eq!(status, 200, "{mine}");
    assert_eq!(
        functions(&mine["functions"], "function"),
        ["fn.team-a"],
        "{mine}"
    );
    assert_eq!(mine["functions"][0]["pending"], 1);
    assert_eq!(mine["functions"][0]["paused"], true);
    assert_eq!(mine["paused_functions"], json!(["fn.team-a"]));
    assert_eq!(
        (mine["pending"].as_u64(), mine["dead_letters"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(
        mine["unacked"].is_null() && mine["consumers"].is_null(),
        "queue-wide figures: {mine}"
    );

    // Dead letters: the list, and one of another namespace shown as unknown.
    let (status, letters) = api.get(&team_a, "/system/async/dead-letters").await;
    assert_eq!(status, 200);
    let mut expected = vec![a1.clone(), a2.clone()];
    expected.sort();
    assert_eq!(call_ids(&letters), expected, "{letters}");
    assert_eq!(functions(&letters, "function"), ["fn.team-a", "fn.team-a"]);
    let b1_sequence = sequence_of(&all_letters, &b1);
    let a1_sequence = sequence_of(&all_letters, &a1);
    for path in [
        format!("/system/async/dead-letters/{b1_sequence}"),
        format!("/system/async/dead-letters/call/{b1}"),
        "/system/async/dead-letters/999999".to_owned(),
    ] {
        let (status, body) = api.get(&team_a, &path).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("unknown_dead_letter")),
            "{path}"
        );
        let known = api.get(&root, &path).await.0;
        assert_eq!(
            known == 200,
            !path.ends_with("999999"),
            "{path} for admin:*"
        );
    }
    for path in [
        format!("/system/async/dead-letters/{a1_sequence}"),
        format!("/system/async/dead-letters/call/{a1}"),
    ] {
        assert_eq!(api.get(&team_a, &path).await.0, 200, "{path}");
    }

    // Live figures: team-a's functions and failures only.
    let live = api
        .wait(
            &root,
            "/system/async/stats",
            "outcomes of both namespaces",
            |s| functions(&s["functions"], "function") == ["fn.team-a", "fn.team-b"],
        )
        .await;
    assert!(
        live["recent_failures"].as_array().unwrap().len() >= 4,
        "{live}"
    );
    let (status, live) = api.get(&team_a, "/system/async/stats").await;
    assert_eq!(status, 200);
    assert_eq!(
        functions(&live["functions"], "function"),
        ["fn.team-a"],
        "{live}"
    );
    let failures = live["recent_failures"].as_array().unwrap();
    assert!(
        !failures.is_empty() && failures.iter().all(|f| f["function"] == "fn.team-a"),
        "{live}"
    );

    // Replay names a letter of each namespace: only team-a's goes back (held: paused).
    let (status, body) = api
        .post(
            &team_a,
            "/system/async/dead-letters/replay",
            json!({"sequences": [a1_sequence, b1_sequence]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(call_ids(&body["replayed"]), [a1.as_str()], "{body}");
    let (status, body) = api
        .post(
            &team_a,
            "/system/async/dead-letters/purge",
            json!({"call_ids": [b1, b2]}),
        )
        .await;
    assert_eq!((status, body["deleted"].as_u64()), (200, Some(0)), "{body}");
    // `all` is all of the caller's.
    let (status, body) = api
        .post(
            &team_a,
            "/system/async/dead-letters/purge",
            json!({"all": true}),
        )
        .await;
    assert_eq!((status, body["deleted"].as_u64()), (200, Some(1)), "{body}");
    let (_, left) = api.get(&root, "/system/async/dead-letters").await;
    let mut expected = vec![b1.clone(), b2.clone()];
    expected.sort();
    assert_eq!(call_ids(&left), expected, "team-b's letters untouched");
    let (_, mine) = api.get(&team_a, "/system/async/dead-letters").await;
    assert_eq!(mine, json!([]));
    let (_, queue) = api.get(&team_a, "/system/async/queue").await;
    assert_eq!(
        queue["functions"][0]["pending"], 2,
        "a1 replayed, held with a3: {queue}"
    );

    // The dashboard page opens for a namespace admin; /metrics stays queue-wide; no admin
    // scope at all is refused.
    assert_eq!(
        api.client
            .get(format!("{}/dashboard/", api.base))
            .bearer_auth(&team_a)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = api
        .client
        .get(format!("{}/metrics", api.base))
        .bearer_auth(&team_a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    for path in [
        "/system/async/queue",
        "/system/async/dead-letters",
        "/system/async/stats",
    ] {
        let (status, body) = api.get(&invoker, path).await;
        assert_eq!(
            (status, body["missing_scope"].as_str()),
            (403, Some("admin:<namespace>")),
            "{path}"
        );
    }

    worker.shutdown().await;
    gateway.shutdown().await;
}
