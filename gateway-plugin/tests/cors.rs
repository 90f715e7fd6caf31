//! CORS against a live gateway on a private nats-server, with an authenticator: the preflight
//! of an allowed origin is answered without credentials, the answers to that origin carry the
//! CORS headers (refusals too), another origin and a function without CORS get none, the
//! `[calls]` section opens `/async-calls/...`, and the admin routes answer no preflight and keep
//! refusing cross-site changes.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use common::{Gateway, http, sha256_hex};
use test_support::nats_server::NatsServer;

const UI: &str = "https://ui.team-a.example.org";
const OTHER: &str = "https://elsewhere.example.net";

const CORS_FILE: &str = r#"
[namespaces.team-a]
origins = ["https://ui.team-a.example.org"]
methods = ["POST", "PUT"]
headers = ["authorization", "content-type", "x-callback-url"]
max_age = "5m"

[calls]
origins = ["https://ui.team-a.example.org"]
headers = ["authorization"]
"#;

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

fn assert_no_cors(r: &reqwest::Response, what: &str) {
    let found: Vec<_> = (r.headers().keys())
        .filter(|k| k.as_str().starts_with("access-control-"))
        .collect();
    assert!(found.is_empty(), "{what}: {found:?}");
}

fn assert_cors(r: &reqwest::Response, origin: &str, what: &str) {
    assert_eq!(
        header(r, "access-control-allow-origin"),
        Some(origin),
        "{what}"
    );
    let exposed = header(r, "access-control-expose-headers").unwrap_or_default();
    assert!(exposed.contains("X-Call-Id"), "{what}: {exposed}");
    assert!(
        header(r, "access-control-allow-credentials").is_none(),
        "{what}"
    );
    assert!(
        r.headers()
            .get_all("vary")
            .iter()
            .any(|v| v.to_str().unwrap().contains("Origin")),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origins_get_cors_others_and_unlisted_functions_none() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = format!("fa_{}", uuid::Uuid::new_v4().simple());
    std::fs::write(
        dir.path().join("tokens"),
        format!(
            "ui {} invoke:team-a invoke:team-b read:team-a\n",
            sha256_hex(&token)
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("cors.toml"), CORS_FILE).unwrap();
    let gateway = Gateway::start(
        &nats.url(),
        &[
            "--auth-tokens-file",
            dir.path().join("tokens").to_str().unwrap(),
            "--cors-file",
            dir.path().join("cors.toml").to_str().unwrap(),
        ],
    )
    .await;
    let client = http();
    let url = |path: &str| format!("{}{path}", gateway.url);
    let preflight = async |path: &str, origin: &str, method: &str, headers: &str| {
        client
            .request(reqwest::Method::OPTIONS, url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
            .await
            .unwrap()
    };

    // The allowed origin: the preflight (no credentials) and the answers.
    for path in [
        "/async-function/fn.team-a",
        "/async-function/fn.team-a/",
        "/async-function/fn.team-a/deeper/path",
    ] {
        let r = preflight(path, UI, "POST", "authorization, content-type").await;
        assert_eq!(r.status(), 204, "{path}");
        assert_eq!(header(&r, "access-control-allow-origin"), Some(UI));
        assert_eq!(
            header(&r, "access-control-allow-methods"),
            Some("POST, PUT")
        );
        assert_eq!(
            header(&r, "access-control-allow-headers"),
            Some("authorization, content-type, x-callback-url")
        );
        assert_eq!(header(&r, "access-control-max-age"), Some("300"));
        assert!(header(&r, "vary").unwrap().contains("Origin"));
        assert!(header(&r, "access-control-allow-credentials").is_none());
    }
    let r = (client.post(url("/async-function/fn.team-a")))
        .header("origin", UI)
        .bearer_auth(&token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_cors(&r, UI, "accepted call");
    let call = header(&r, "x-call-id").unwrap().to_owned();
    // A refusal is readable by the page too (the token it lacks, a method not allowed here).
    let r = (client.post(url("/async-function/fn.team-a")))
        .header("origin", UI)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_cors(&r, UI, "401");
    let r = (client.delete(url("/async-function/fn.team-a")))
        .header("origin", UI)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_no_cors(&r, "DELETE is not an allowed method");

    // What the section does not allow: a method, a header; another origin.
    for (origin, method, headers) in [
        (UI, "DELETE", "authorization"),
        (UI, "POST", "authorization, x-secret"),
        (OTHER, "POST", "authorization"),
    ] {
        let r = preflight("/async-function/fn.team-a", origin, method, headers).await;
        assert_eq!(r.status(), 403, "{origin} {method} {headers}");
        assert_no_cors(&r, &format!("{origin} {method} {headers}"));
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"], "cors_not_allowed");
    }
    let r = (client.post(url("/async-function/fn.team-a")))
        .header("origin", OTHER)
        .bearer_auth(&token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_no_cors(&r, "another origin");

    // A function without a CORS section: nothing, for any origin.
    let r = preflight("/async-function/fn.team-b", UI, "POST", "authorization").await;
    assert_eq!(r.status(), 403);
    assert_no_cors(&r, "preflight of a function without CORS");
    let r = (client.post(url("/async-function/fn.team-b")))
        .header("origin", UI)
        .bearer_auth(&token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_no_cors(&r, "a function without CORS");

    // `[calls]`: the status of a call, and the 404 of an unknown one, alike.
    let r = preflight(&format!("/async-calls/{call}"), UI, "GET", "authorization").await;
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "access-control-allow-methods"), Some("GET"));
    let r = preflight(
        &format!("/async-calls/{call}"),
        UI,
        "DELETE",
        "authorization",
    )
    .await;
    assert_eq!(r.status(), 403, "DELETE not in [calls]");
    for (id, status) in [(call.as_str(), 200), ("no-such-call", 404)] {
        let r = (client.get(url(&format!("/async-calls/{id}"))))
            .header("origin", UI)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        assert_cors(&r, UI, id);
        let r = (client.get(url(&format!("/async-calls/{id}"))))
            .header("origin", OTHER)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_no_cors(&r, id);
    }

    // Not a preflight: the route's 405. The admin routes answer no preflight (those that
    // change state refuse it as cross-site), and a cross-site change is still refused.
    let r = (client.request(reqwest::Method::OPTIONS, url("/async-function/fn.team-a")))
        .header("origin", UI)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_no_cors(&r, "OPTIONS without a requested method");
    let r = (client.request(reqwest::Method::OPTIONS, url("/async-calls/x/result")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), header(&r, "allow")),
        (405, Some("OPTIONS,GET,HEAD"))
    );
    let r = preflight("/system/async/functions/fn.team-a/pause", UI, "POST", "").await;
    assert_no_cors(&r, "admin preflight");
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(
        body["error"], "cross_site_request",
        "the guard answers first"
    );
    let r = preflight("/system/async/queue", UI, "GET", "").await;
    assert_eq!(r.status(), 405);
    assert_no_cors(&r, "admin view preflight");
    let r = (client.post(url("/system/async/functions/fn.team-a/pause")))
        .header("origin", UI)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_no_cors(&r, "admin change");
    assert_eq!(
        common::queued(&nats.url()).await,
        4,
        "no preflight queued anything"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cors_file_stops_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cors.toml");
    std::fs::write(&file, "[default]\norigins = [\"*\"]\n").unwrap();
    let config = <gateway_plugin::GatewayConfig as clap::Parser>::try_parse_from([
        "gateway-plugin",
        "--nats-url",
        "nats://127.0.0.1:9",
        "--cors-file",
        file.to_str().unwrap(),
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = gateway_plugin::run(config, listener, std::future::pending())
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("cors.toml") && text.contains("`*`"), "{text}");
}

/// The CORS file is reread while the gateway runs: an origin added gets the headers, one taken
/// away none; a broken version keeps the settings in force (reported, and again on SIGHUP,
/// which the gateway survives); a change sent with SIGHUP applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cors_file_is_reread_on_change_and_on_sighup() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cors = dir.path().join("cors.toml");
    std::fs::write(&cors, CORS_FILE).unwrap();
    let gateway =
        common::GatewayProcess::start(&nats.url(), &["--cors-file", cors.to_str().unwrap()], &[])
            .await;
    let client = http();
    let fn_a = format!("{}/async-function/fn.team-a", gateway.url);
    let preflight = async |origin: &str| {
        client
            .request(reqwest::Method::OPTIONS, &fn_a)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap()
    };
    let call = async |origin: &str| {
        let r = (client.post(&fn_a))
            .header("origin", origin)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        header(&r, "access-control-allow-origin").map(str::to_owned)
    };
    assert_eq!(preflight(UI).await.status(), 204);
    assert_eq!(preflight(OTHER).await.status(), 403);

    // OTHER added, UI taken away.
    common::replace_file(&cors, &CORS_FILE.replace(UI, OTHER));
    common::eventually("the new origins apply", async || {
        preflight(OTHER).await.status() == 204
    })
    .await;
    gateway.wait_log("CORS file reloaded", 1).await;
    assert_eq!(preflight(UI).await.status(), 403);
    assert_eq!(call(OTHER).await.as_deref(), Some(OTHER));
    assert_eq!(call(UI).await, None);

    // A broken version (`*` is refused): the settings in force stay.
    common::replace_file(&cors, "[default]\norigins = [\"*\"]\n");
    gateway.wait_log("CORS file not reloaded", 1).await;
    assert!(gateway.log().contains("`*`"), "{}", gateway.log());
    assert_eq!(preflight(OTHER).await.status(), 204);
    assert_eq!(preflight(UI).await.status(), 403, "never opened up");
    gateway.hangup();
    gateway.wait_log("SIGHUP received", 1).await;
    gateway.wait_log("CORS file not reloaded", 2).await;
    assert_eq!(preflight(OTHER).await.status(), 204, "still in force");

    // Back to the first version, with SIGHUP.
    common::replace_file(&cors, CORS_FILE);
    gateway.hangup();
    common::eventually("the first version applies again", async || {
        preflight(UI).await.status() == 204
    })
    .await;
    assert_eq!(preflight(OTHER).await.status(), 403);
    assert_eq!(call(UI).await.as_deref(), Some(UI));
    gateway.stop().await;
}

/// A browser that cached the gateway's basic-auth credentials sends them with a cross-site
/// simple request (a form's POST, an image's GET) that CORS does not stop: such an invocation
/// is refused with `403 cross_site_request` (and audited), unless it comes from an origin the
/// CORS file allows for that function and method. Bearer tokens, the gateway's own origin and
/// clients that are not browsers are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_invocations_from_other_sites_are_refused() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(secrets.join("basic-auth-password"), "CSRF-PASSWORD-91a2\n").unwrap();
    let token = format!("fa_{}", uuid::Uuid::new_v4().simple());
    std::fs::write(
        dir.path().join("tokens"),
        format!("ui {} invoke:team-a invoke:team-b\n", sha256_hex(&token)),
    )
    .unwrap();
    std::fs::write(dir.path().join("cors.toml"), CORS_FILE).unwrap();
    let audit = dir.path().join("audit.log");
    let gateway = Gateway::start(
        &nats.url(),
        &[
            "--basic-auth",
            "--secret-mount-path",
            secrets.to_str().unwrap(),
            "--auth-tokens-file",
            dir.path().join("tokens").to_str().unwrap(),
            "--cors-file",
            dir.path().join("cors.toml").to_str().unwrap(),
            "--audit-log",
            audit.to_str().unwrap(),
        ],
    )
    .await;
    let client = http();
    let own_origin = gateway.url.clone();
    enum Cred<'a> {
        Basic,
        Bearer(&'a str),
    }
    let send = async |method: reqwest::Method,
                      function: &str,
                      cred: Cred<'_>,
                      headers: &[(&str, &str)]| {
        let mut r = client
            .request(method, format!("{}/async-function/{function}", gateway.url))
            .body("x");
        r = match cred {
            Cred::Basic => r.basic_auth("admin", Some("CSRF-PASSWORD-91a2")),
            Cred::Bearer(token) => r.bearer_auth(token),
        };
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        r.send().await.unwrap()
    };
    use reqwest::Method;
    let mut accepted: u64 = 0;

    // Refused: basic auth from a page of another site.
    for (method, function, headers) in [
        // A form posted from another origin.
        (
            Method::POST,
            "fn.team-a",
            vec![("origin", OTHER), ("sec-fetch-site", "cross-site")],
        ),
        // An image's GET: no Origin, but the browser says where it comes from.
        (
            Method::GET,
            "fn.team-a",
            vec![("sec-fetch-site", "cross-site")],
        ),
        (
            Method::POST,
            "fn.team-a",
            vec![("sec-fetch-site", "same-site")],
        ),
        // An Origin without Sec-Fetch-Site (an older browser).
        (Method::POST, "fn.team-a", vec![("origin", OTHER)]),
        (Method::POST, "fn.team-a", vec![("origin", "null")]),
        // The allowed origin, but for a function it is not allowed for, or another method.
        (
            Method::POST,
            "fn.team-b",
            vec![("origin", UI), ("sec-fetch-site", "cross-site")],
        ),
        (
            Method::GET,
            "fn.team-a",
            vec![("origin", UI), ("sec-fetch-site", "cross-site")],
        ),
    ] {
        let what = format!("{method} {function} {headers:?}");
        let r = send(method, function, Cred::Basic, &headers).await;
        assert_eq!(r.status(), 403, "{what}");
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"], "cross_site_request", "{what}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("bearer token"),
            "{what}: {body}"
        );
    }
    assert_eq!(
        common::queued(&nats.url()).await,
        0,
        "nothing refused was queued"
    );

    // Accepted: basic auth from no browser, from the gateway's own pages, from an allowed
    // origin; bearer tokens from anywhere.
    for (function, cred, headers) in [
        ("fn.team-a", Cred::Basic, vec![]),
        (
            "fn.team-a",
            Cred::Basic,
            vec![("sec-fetch-site", "same-origin")],
        ),
        ("fn.team-a", Cred::Basic, vec![("sec-fetch-site", "none")]),
        (
            "fn.team-a",
            Cred::Basic,
            vec![("origin", own_origin.as_str())],
        ),
        (
            "fn.team-a",
            Cred::Basic,
            vec![("origin", UI), ("sec-fetch-site", "cross-site")],
        ),
        (
            "fn.team-a",
            Cred::Bearer(&token),
            vec![("origin", OTHER), ("sec-fetch-site", "cross-site")],
        ),
        (
            "fn.team-b",
            Cred::Bearer(&token),
            vec![("sec-fetch-site", "cross-site")],
        ),
    ] {
        let what = format!("{function} {headers:?}");
        let r = send(Method::POST, function, cred, &headers).await;
        assert_eq!(r.status(), 202, "{what}");
        accepted += 1;
    }
    assert_eq!(common::queued(&nats.url()).await, accepted);

    // Each refusal is an audit line naming why, with the basic-auth subject.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let refused: Vec<_> = (lines.iter())
        .filter(|l| l["reason"] == "cross-site request with basic auth")
        .collect();
    assert_eq!(refused.len(), 7, "{lines:#?}");
    for l in refused {
        assert_eq!(
            (&l["action"], &l["subject"], &l["outcome"], &l["status"]),
            (
                &serde_json::json!("invoke"),
                &serde_json::json!("admin"),
                &serde_json::json!("denied"),
                &serde_json::json!(403)
            ),
            "{l}"
        );
    }
    gateway.shutdown().await;
}
