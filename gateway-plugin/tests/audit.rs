//! The audit log against a live gateway on a private nats-server: a line for each refusal
//! (401, 403, and the 404 of another namespace's call), each cancel, each dead-letter purge and
//! each result read, with its fields; the client address as a trusted proxy tells it; the
//! client's `X-Request-Id` kept and echoed; no credential, body or query string in any line; a
//! file that cannot be opened stops the gateway at start.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use clap::Parser;
use common::{Gateway, http, sha256_hex, token};
use serde_json::Value;
use test_support::nats_server::NatsServer;

const PASSWORD: &str = "AUDIT-PASSWORD-4c1d";
const BODY_MARKER: &str = "AUDIT-BODY-MARKER-77e0";
const QUERY_MARKER: &str = "AUDIT-QUERY-MARKER-2b9f";

/// Every line of the audit log, parsed (each must be one JSON object).
fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The one line of `action` with `status`.
fn line<'a>(all: &'a [Value], action: &str, status: u16) -> &'a Value {
    let found: Vec<&Value> = all
        .iter()
        .filter(|l| l["action"] == action && l["status"] == status)
        .collect();
    assert_eq!(found.len(), 1, "{action} {status} in {all:#?}");
    found[0]
}

fn assert_time(line: &Value) {
    let time = line["time"].as_str().unwrap();
    humantime::parse_rfc3339(time).unwrap_or_else(|e| panic!("{time}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_cancels_purges_and_result_reads_are_audited_without_secrets() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(secrets.join("basic-auth-password"), format!("{PASSWORD}\n")).unwrap();
    let team_a = token();
    let team_b = token();
    std::fs::write(
        dir.path().join("tokens"),
        format!(
            "team-a-bot {} invoke:team-a read:team-a cancel:team-a\nteam-b-bot {} invoke:team-b read:team-b\n",
            sha256_hex(&team_a),
            sha256_hex(&team_b)
        ),
    )
    .unwrap();
    let audit = dir.path().join("audit.log");
    let gateway = Gateway::start(
        &nats.url(),
        &[
            "--basic-auth",
            "--secret-mount-path",
            secrets.to_str().unwrap(),
            "--auth-tokens-file",
            dir.path().join("tokens").to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
            "--trusted-proxies",
            "127.0.0.1",
        ],
    )
    .await;
    let client = http();
    let url = |path: &str| format!("{}{path}", gateway.url);

    // Accepted invocations are not audited (only refusals are, on the hot path).
    let accepted = client
        .post(url(&format!(
            "/async-function/fn.team-a/p?q={QUERY_MARKER}"
        )))
        .bearer_auth(&team_a)
        .body(BODY_MARKER)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let call = accepted.headers()["x-call-id"].to_str().unwrap().to_owned();
    assert!(lines(&audit).is_empty(), "{:#?}", lines(&audit));

    // A refusal: no credentials, wrong password, another namespace, another namespace's call.
    let r = client
        .post(url(&format!("/async-function/fn.team-a?q={QUERY_MARKER}")))
        .header("x-forwarded-for", "198.51.100.7")
        .body(BODY_MARKER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let echoed = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let r = client
        .post(url("/system/async/functions/fn.team-a/pause"))
        .basic_auth("admin", Some("wrong-password"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .post(url("/async-function/fn.team-a"))
        .bearer_auth(&team_b)
        .body(BODY_MARKER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client
        .get(url(&format!("/async-calls/{call}/result")))
        .bearer_auth(&team_b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another namespace's call is unknown");

    let all = lines(&audit);
    let denied = line(&all, "invoke", 401);
    assert_eq!(denied["outcome"], "denied");
    assert!(denied["subject"].is_null());
    assert_eq!(denied["namespace"], "team-a");
    assert_eq!(denied["resource"], "fn.team-a");
    assert_eq!(denied["reason"], "no credentials");
    assert_eq!(denied["client"], "198.51.100.7", "told by a trusted proxy");
    assert_eq!(denied["peer"], "127.0.0.1");
    assert_eq!(denied["request_id"], echoed.as_str());
    assert_eq!(denied["method"], "POST");
    assert_time(denied);
    let wrong = line(&all, "function.pause", 401);
    assert_eq!(wrong["outcome"], "denied");
    assert_eq!(wrong["resource"], "fn.team-a");
    let forbidden = line(&all, "invoke", 403);
    assert_eq!(forbidden["subject"], "team-b-bot");
    assert_eq!(forbidden["auth_method"], "token");
    assert_eq!(forbidden["namespace"], "team-a");
    assert_eq!(forbidden["reason"], "missing scope");
    let hidden = line(&all, "call.result", 404);
    assert_eq!(
        hidden["outcome"], "denied",
        "the 404 of another namespace's call"
    );
    assert_eq!(hidden["subject"], "team-b-bot");
    assert_eq!(hidden["resource"], call.as_str());
    assert_eq!(hidden["namespace"], "team-a");

    // A result read (the call has not run: 202) and a cancel, by the namespace's own token.
    let r = client
        .get(url(&format!("/async-calls/{call}/result?q={QUERY_MARKER}")))
        .bearer_auth(&team_a)
        .header("x-request-id", "read-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-request-id"], "read-1");
    let r = client
        .delete(url(&format!("/async-calls/{call}")))
        .bearer_auth(&team_a)
        .header("x-request-id", "cancel-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A dead-letter purge, by the basic-auth administrator.
    let r = client
        .post(url("/system/async/dead-letters/purge"))
        .basic_auth("admin", Some(PASSWORD))
        .header("content-type", "application/json")
        .body(r#"{"all": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(url("/system/async/dead-letters/replay"))
        .basic_auth("admin", Some(PASSWORD))
        .header("content-type", "application/json")
        .body(r#"{"sequences": [7], "call_ids": ["job-9"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let all = lines(&audit);
    let read = line(&all, "call.result", 202);
    assert_eq!(read["outcome"], "ok");
    assert_eq!(read["subject"], "team-a-bot");
    assert_eq!(read["resource"], call.as_str());
    assert_eq!(read["namespace"], "team-a");
    assert_eq!(read["request_id"], "read-1");
    assert_eq!(read["client"], "127.0.0.1");
    let cancel = line(&all, "call.cancel", 200);
    assert_eq!(cancel["outcome"], "ok");
    assert_eq!(cancel["subject"], "team-a-bot");
    assert_eq!(cancel["resource"], call.as_str());
    assert_eq!(cancel["namespace"], "team-a");
    assert_eq!(cancel["request_id"], "cancel-1");
    assert_eq!(cancel["method"], "DELETE");
    assert_time(cancel);
    let purge = line(&all, "dead_letters.purge", 200);
    assert_eq!(purge["outcome"], "ok");
    assert_eq!(purge["subject"], "admin");
    assert_eq!(purge["auth_method"], "basic");
    assert_eq!(purge["namespace"], "*");
    assert_eq!(purge["resource"], "all");
    let replay = line(&all, "dead_letters.replay", 200);
    assert_eq!(replay["resource"], "sequences=7 call_ids=job-9");
    // Reads that are not of results, and accepted calls, are not audited.
    assert!(
        all.iter()
            .all(|l| l["status"] != 202 || l["action"] != "invoke"),
        "{all:#?}"
    );

    // No credential, body or query string in any line.
    let text = std::fs::read_to_string(&audit).unwrap();
    for secret in [
        team_a.as_str(),
        team_b.as_str(),
        PASSWORD,
        "wrong-password",
        BODY_MARKER,
        QUERY_MARKER,
    ] {
        assert!(!text.contains(secret), "{secret} in the audit log:\n{text}");
    }
    for l in &all {
        let object = l.as_object().unwrap();
        for key in [
            "time",
            "request_id",
            "subject",
            "action",
            "namespace",
            "resource",
            "outcome",
            "status",
            "client",
        ] {
            assert!(object.contains_key(key), "{key} missing in {l}");
        }
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_log_that_cannot_be_opened_stops_the_gateway_at_start() {
    // No NATS server at all: the file is checked before connecting.
    let config = gateway_plugin::GatewayConfig::try_parse_from([
        "gateway-plugin",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--audit-log",
        "/nonexistent-directory/audit.log",
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(
        common::DEADLINE,
        gateway_plugin::run(config, listener, std::future::pending()),
    )
    .await
    .expect("the gateway kept running");
    let error = result
        .expect_err("an unusable audit log is refused")
        .to_string();
    assert!(
        error.contains("/nonexistent-directory/audit.log"),
        "{error}"
    );
}

/// `429` answers are audit lines too: a rate limit and a pending-calls quota, each with the
/// namespace, the subject, the outcome `limited` and the code as the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_quota_refusals_are_audited() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bot = token();
    std::fs::write(
        dir.path().join("tokens"),
        format!(
            "team-bot {} invoke:team-a invoke:team-q\n",
            sha256_hex(&bot)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("quotas.toml"),
        "pending_refresh = \"100ms\"\n[namespaces.team-a]\nrate = 0.01\nburst = 1\n[namespaces.team-q]\nmax_pending = 1\n",
    )
    .unwrap();
    let audit = dir.path().join("audit.log");
    let gateway = Gateway::start(
        &nats.url(),
        &[
            "--auth-tokens-file",
            dir.path().join("tokens").to_str().unwrap(),
            "--quotas-file",
            dir.path().join("quotas.toml").to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    )
    .await;
    let client = http();
    let post = async |function: &str| {
        client
            .post(format!("{}/async-function/{function}", gateway.url))
            .bearer_auth(&bot)
            .body(BODY_MARKER)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(post("fn.team-a").await, 202);
    assert_eq!(post("fn.team-a").await, 429);
    // The first call of team-q is pending (no worker): once the gateway has read it, the cap.
    assert_eq!(post("fn.team-q").await, 202);
    common::eventually("the pending cap refuses", async || {
        post("fn.team-q").await == 429
    })
    .await;

    let all = lines(&audit);
    let limited: Vec<&Value> = all.iter().filter(|l| l["status"] == 429).collect();
    assert_eq!(limited.len(), 2, "{all:#?}");
    for (l, namespace, reason) in [
        (limited[0], "team-a", "rate_limited"),
        (limited[1], "team-q", "quota_exceeded"),
    ] {
        assert_time(l);
        assert_eq!(l["action"], "invoke", "{l}");
        assert_eq!(l["namespace"], namespace, "{l}");
        assert_eq!(l["resource"], format!("fn.{namespace}"), "{l}");
        assert_eq!(l["subject"], "team-bot", "{l}");
        assert_eq!(l["auth_method"], "token", "{l}");
        assert_eq!(l["outcome"], "limited", "{l}");
        assert_eq!(l["reason"], reason, "{l}");
    }
    assert!(
        all.iter().all(|l| l["status"] == 429),
        "accepted calls are not written: {all:#?}"
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !text.contains(&bot) && !text.contains(BODY_MARKER),
        "{text}"
    );
    gateway.shutdown().await;
}

/// Without an authenticator the lines name the namespace where it is known without another
/// record read: a cancel's and a result read's (from the record the handler reads), a
/// rate-limited call's (from its path, subject `null`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_authenticator_lines_name_the_namespace() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("quotas.toml"),
        "[namespaces.team-a]\nrate = 0.01\nburst = 2\n",
    )
    .unwrap();
    let audit = dir.path().join("audit.log");
    let gateway = Gateway::start(
        &nats.url(),
        &[
            "--quotas-file",
            dir.path().join("quotas.toml").to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    )
    .await;
    let client = http();
    let url = |path: &str| format!("{}{path}", gateway.url);
    let mut calls = Vec::new();
    for _ in 0..2 {
        let r = client
            .post(url("/async-function/fn.team-a"))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        calls.push(r.headers()["x-call-id"].to_str().unwrap().to_owned());
    }
    let r = client
        .post(url("/async-function/fn.team-a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let r = client
        .get(url(&format!("/async-calls/{}/result", calls[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "not run yet");
    let r = client
        .delete(url(&format!("/async-calls/{}", calls[1])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // An unknown call: no record, no namespace.
    let r = client
        .delete(url("/async-calls/no-such-call"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // OpenFaaS Pro's cancel of the other call, team-a's rate spent: a cancel queues nothing and
    // is not held to the quotas; a DELETE invocation of the function is an invocation, and is.
    let r = client
        .delete(url(&format!("/async-function/{}", calls[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = client
        .delete(url("/async-function/fn.team-a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);

    let all = lines(&audit);
    assert_eq!(all.len(), 6, "{all:#?}");
    let limited_delete: Vec<&Value> = (all.iter())
        .filter(|l| l["action"] == "invoke" && l["status"] == 429 && l["method"] == "DELETE")
        .collect();
    assert_eq!(limited_delete.len(), 1, "{all:#?}");
    assert_eq!(limited_delete[0]["resource"], "fn.team-a");
    let pro = line(&all, "call.cancel", 202);
    assert_eq!(
        (&pro["namespace"], &pro["resource"], &pro["route"]),
        (
            &Value::from("team-a"),
            &Value::from(calls[0].as_str()),
            &Value::from("/async-function/{name}")
        ),
        "{pro}"
    );
    let all: Vec<Value> = all
        .into_iter()
        .filter(|l| l["method"] != "DELETE" || l["route"] != "/async-function/{name}")
        .collect();
    let limited = line(&all, "invoke", 429);
    assert_eq!(
        (
            &limited["namespace"],
            &limited["subject"],
            &limited["outcome"],
            &limited["reason"]
        ),
        (
            &Value::from("team-a"),
            &Value::Null,
            &Value::from("limited"),
            &Value::from("rate_limited")
        ),
        "{limited}"
    );
    for (action, status, call) in [
        ("call.result", 202, &calls[0]),
        ("call.cancel", 200, &calls[1]),
    ] {
        let l = line(&all, action, status);
        assert_eq!(l["namespace"], "team-a", "{l}");
        assert_eq!(l["resource"], call.as_str(), "{l}");
        assert!(l["subject"].is_null(), "{l}");
        assert_eq!(l["outcome"], "ok", "{l}");
    }
    let unknown = line(&all, "call.cancel", 404);
    assert!(unknown["namespace"].is_null(), "{unknown}");
    gateway.shutdown().await;
}

/// OpenFaaS Pro's cancel, `DELETE /async-function/{call_id}`, is audited as the cancel it is
/// (`call.cancel`, the call's id and namespace, whether it passed or was refused), and a
/// `DELETE` invocation of a function as every other invocation (its refusals only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openfaas_pro_cancel_is_audited_as_a_cancel() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (team_a, team_b) = (token(), token());
    std::fs::write(
        dir.path().join("tokens"),
        format!(
            "team-a-bot {} invoke:team-a cancel:team-a\nteam-b-bot {} invoke:team-b cancel:team-b\n",
            sha256_hex(&team_a),
            sha256_hex(&team_b)
        ),
    )
    .unwrap();
    let audit = dir.path().join("audit.log");
    let gateway = Gateway::start(
        &nats.url(),
        &[
            "--auth-tokens-file",
            dir.path().join("tokens").to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    )
    .await;
    let client = http();
    let url = |path: &str| format!("{}{path}", gateway.url);
    let delete = |path: String, token: &str| {
        client
            .delete(url(&path))
            .bearer_auth(token)
            .header("x-request-id", "pro-cancel")
            .send()
    };
    let mut calls = Vec::new();
    for _ in 0..2 {
        let r = (client.post(url("/async-function/fn.team-a")))
            .bearer_auth(&team_a)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        calls.push(r.headers()["x-call-id"].to_str().unwrap().to_owned());
    }
    let r = delete(format!("/async-function/{}", calls[0]), &team_a)
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = delete(format!("/async-function/{}", calls[1]), &team_b)
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another namespace's call is unknown");
    let r = delete("/async-function/fn.team-a".into(), &team_a)
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "an invocation");
    assert!(r.headers()["x-call-id"] != calls[0].as_str());
    let r = delete("/async-function/fn.team-a".into(), &team_b)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let all = lines(&audit);
    assert_eq!(
        all.len(),
        3,
        "the accepted invocation is not audited: {all:#?}"
    );
    for (status, outcome, subject, call) in [
        (202, "ok", "team-a-bot", &calls[0]),
        (404, "denied", "team-b-bot", &calls[1]),
    ] {
        let l = line(&all, "call.cancel", status);
        assert_eq!(l["outcome"], outcome, "{l}");
        assert_eq!(l["subject"], subject, "{l}");
        assert_eq!(l["resource"], call.as_str(), "{l}");
        assert_eq!(l["namespace"], "team-a", "{l}");
        assert_eq!(l["route"], "/async-function/{name}", "{l}");
        assert_eq!(l["method"], "DELETE", "{l}");
        assert_eq!(l["request_id"], "pro-cancel", "{l}");
    }
    let refused = line(&all, "invoke", 403);
    assert_eq!(refused["resource"], "fn.team-a");
    assert_eq!(refused["subject"], "team-b-bot");
    assert_eq!(refused["reason"], "missing scope");
    gateway.shutdown().await;
}
