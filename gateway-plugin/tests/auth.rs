//! Authentication and authorization against a live gateway (the real binary, a real
//! nats-server): OpenFaaS basic auth from files laid out as OpenFaaS mounts them (selected by
//! OpenFaaS's own variables), API tokens from a file, and JWTs minted by PyJWT (an independent
//! implementation) from keys generated for the run. Hostile tokens are refused, scopes hold per
//! namespace, ids of other namespaces read as unknown, and no credential reaches the log. The
//! route table test walks every method of every route against every credential case, with the
//! keys from a file and from a URL.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{DEADLINE, http, sha256_hex};
use gateway_plugin::auth::Permission;
use queue_core::backend::jetstream::JetStreamQueue;
use test_support::nats_server::NatsServer;

const ISSUER: &str = "https://login.example.test/realms/research";
const AUDIENCE: &str = "faas-async";
const BASIC_PASSWORD: &str = "BASIC-PASSWORD-b7e1";

/// Keys, JWKS and tokens from `auth_mint.py` (PyJWT + cryptography).
fn mint() -> (serde_json::Value, HashMap<String, String>) {
    let (minted, tokens) = mint_all();
    (minted["jwks"].clone(), tokens)
}

/// Everything `auth_mint.py` made: `jwks`, `jwks_rotated`, `jwks_successor_only`, and the tokens.
fn mint_all() -> (serde_json::Value, HashMap<String, String>) {
    let python = test_support::tools_python().expect("the test tools' Python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/auth_mint.py");
    let mut child = std::process::Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            serde_json::json!({"issuer": ISSUER, "audience": AUDIENCE})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the minter failed (are PyJWT and cryptography installed? ./scripts/install-tools.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens = serde_json::from_value(minted["tokens"].clone()).unwrap();
    (minted, tokens)
}

fn random_token() -> String {
    format!(
        "fa_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

struct Live {
    base: String,
    child: tokio::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Live {
    /// The gateway binary with every authenticator; basic auth through OpenFaaS's variables.
    async fn start(nats: &NatsServer, jwks: &serde_json::Value, tokens_file: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::fs::write(secrets.join("basic-auth-user"), "admin\n").unwrap();
        std::fs::write(
            secrets.join("basic-auth-password"),
            format!("{BASIC_PASSWORD}\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
        std::fs::write(dir.path().join("tokens"), tokens_file).unwrap();
        let log = dir.path().join("gateway.log");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway-plugin"))
            .args([
                "--nats-url",
                &nats.url(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("basic_auth", "true")
            .env("secret_mount_path", &secrets)
            .env("AUTH_TOKENS_FILE", dir.path().join("tokens"))
            .env("AUTH_JWKS_FILE", dir.path().join("jwks.json"))
            .env("AUTH_JWT_ISSUER", ISSUER)
            .env("AUTH_JWT_AUDIENCE", AUDIENCE)
            .env("LOG_LEVEL", "debug")
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let live = Self {
            base: format!("http://127.0.0.1:{port}"),
            child,
            log,
            _dir: dir,
        };
        let client = http();
        let end = Instant::now() + DEADLINE;
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", live.base)).send().await
                && r.status() == 200
            {
                break;
            }
            assert!(
                Instant::now() < end,
                "gateway never became ready:\n{}",
                std::fs::read_to_string(&live.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        live
    }

    fn tokens_path(&self) -> std::path::PathBuf {
        self._dir.path().join("tokens")
    }

    async fn stop(mut self) -> String {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().await.unwrap();
        assert!(status.success(), "gateway exited with {status}");
        std::fs::read_to_string(&self.log).unwrap()
    }
}

#[derive(Clone, Copy, Debug)]
enum Cred<'a> {
    None,
    Bearer(&'a str),
    Basic(&'a str, &'a str),
}

async fn send(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    cred: Cred<'_>,
) -> reqwest::Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let request = client.request(method, url).body("payload");
    let request = match cred {
        Cred::None => request,
        Cred::Bearer(token) => request.bearer_auth(token),
        Cred::Basic(user, password) => request.basic_auth(user, Some(password)),
    };
    request.send().await.unwrap()
}

async fn expect_401(response: reqwest::Response, what: &str) {
    assert_eq!(response.status(), 401, "{what}");
    let challenges: Vec<_> = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert!(
        challenges.iter().any(|c| c.starts_with("Bearer"))
            && challenges.iter().any(|c| c.starts_with("Basic")),
        "{what}: challenges {challenges:?}"
    );
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "unauthorized", "{what}: {body}");
}

async fn expect_403(response: reqwest::Response, scope: &str, what: &str) {
    assert_eq!(response.status(), 403, "{what}");
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "forbidden", "{what}: {body}");
    assert_eq!(body["missing_scope"], scope, "{what}: {body}");
}

fn call_id(response: &reqwest::Response) -> String {
    response.headers()["x-call-id"].to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authenticators_scopes_and_hostile_tokens_on_a_live_gateway() {
    let nats = NatsServer::start().await.unwrap();
    let (jwks, jwt) = mint();
    let team_a_admin = random_token();
    let ci_bot = random_token();
    let tokens_file = format!(
        "# name  sha256  scopes\nci-bot {}  invoke:team-a read:team-a\nteam-a-admin {} admin:team-a\n",
        sha256_hex(&ci_bot),
        sha256_hex(&team_a_admin)
    );
    let live = Live::start(&nats, &jwks, &tokens_file).await;
    let client = http();
    let url = |path: &str| format!("{}{path}", live.base);
    let fn_a = url("/async-function/fn.team-a/x");

    // Credentials refused with 401 on every protected route kind.
    let hostile = [
        "expired",
        "not_yet",
        "no_exp",
        "wrong_issuer",
        "wrong_audience",
        "unknown_kid",
        "no_kid",
        "unknown_key_known_kid",
        "tampered",
        "alg_none",
        "hs256_public_key",
    ];
    for (method, path) in [
        ("POST", "/async-function/fn.team-a/x"),
        ("GET", "/async-calls/some-call"),
        ("DELETE", "/async-calls/some-call"),
        ("GET", "/system/async/queue"),
        ("POST", "/system/async/functions/fn.team-a/pause"),
        ("GET", "/metrics"),
        ("GET", "/dashboard/"),
    ] {
        let u = url(path);
        expect_401(
            send(&client, method, &u, Cred::None).await,
            &format!("{method} {path} none"),
        )
        .await;
        expect_401(
            send(&client, method, &u, Cred::Basic("admin", "wrong")).await,
            &format!("{method} {path} wrong password"),
        )
        .await;
        expect_401(
            send(&client, method, &u, Cred::Bearer("not-a-known-token")).await,
            &format!("{method} {path} unknown token"),
        )
        .await;
        for case in hostile {
            expect_401(
                send(&client, method, &u, Cred::Bearer(&jwt[case])).await,
                &format!("{method} {path} {case}"),
            )
            .await;
        }
    }
    assert_eq!(
        common::queued(&nats.url()).await,
        0,
        "nothing refused was queued"
    );

    // Health is public.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            send(&client, "GET", &url(path), Cred::None).await.status(),
            200
        );
    }

    // Invoke: per namespace, from the JWT's scope claim or its scp array, or a token's scopes.
    for cred in [
        Cred::Bearer(&jwt["valid_rs256"]),
        Cred::Bearer(&jwt["valid_es256_scp"]),
        Cred::Bearer(&ci_bot),
        Cred::Basic("admin", BASIC_PASSWORD),
    ] {
        assert_eq!(
            send(&client, "POST", &fn_a, cred).await.status(),
            202,
            "{cred:?}"
        );
    }
    for (cred, what) in [
        (Cred::Bearer(&jwt["team_b"]), "team-b token"),
        (Cred::Bearer(&jwt["no_scope"]), "no scope"),
        (
            Cred::Bearer(&jwt["valid_eddsa_admin"]),
            "admin is not invoke",
        ),
        (Cred::Bearer(&team_a_admin), "admin:team-a is not invoke"),
    ] {
        expect_403(
            send(&client, "POST", &fn_a, cred).await,
            "invoke:team-a",
            what,
        )
        .await;
    }
    expect_403(
        send(
            &client,
            "POST",
            &url("/async-function/fn"),
            Cred::Bearer(&jwt["valid_rs256"]),
        )
        .await,
        "invoke:openfaas-fn",
        "the default namespace is a namespace",
    )
    .await;

    // Read and cancel: the call's recorded namespace; other namespaces' ids read as unknown.
    let a = send(&client, "POST", &fn_a, Cred::Bearer(&jwt["valid_rs256"])).await;
    let a = call_id(&a);
    let b = send(
        &client,
        "POST",
        &url("/async-function/fn.team-b"),
        Cred::Bearer(&jwt["team_b"]),
    )
    .await;
    assert_eq!(b.status(), 202);
    let b = call_id(&b);
    let rs = Cred::Bearer(&jwt["valid_rs256"]);
    let team_b = Cred::Bearer(&jwt["team_b"]);
    assert_eq!(
        send(&client, "GET", &url(&format!("/async-calls/{a}")), rs)
            .await
            .status(),
        200
    );
    assert_eq!(
        send(&client, "GET", &url(&format!("/async-calls/{b}")), team_b)
            .await
            .status(),
        200
    );
    for (id, cred) in [(&b, rs), (&a, team_b), (&"no-such-call".to_owned(), rs)] {
        common::assert_json_error(
            send(&client, "GET", &url(&format!("/async-calls/{id}")), cred).await,
            404,
            "unknown_call",
        )
        .await;
        common::assert_json_error(
            send(
                &client,
                "GET",
                &url(&format!("/async-calls/{id}/result")),
                cred,
            )
            .await,
            404,
            "unknown_call",
        )
        .await;
    }
    // team_b holds no cancel scope at all; the ES256 token neither.
    expect_403(
        send(
            &client,
            "DELETE",
            &url(&format!("/async-calls/{b}")),
            team_b,
        )
        .await,
        "cancel:<namespace of the call>",
        "no cancel scope",
    )
    .await;
    common::assert_json_error(
        send(&client, "DELETE", &url(&format!("/async-calls/{b}")), rs).await,
        404,
        "unknown_call",
    )
    .await;
    assert_eq!(
        send(&client, "DELETE", &url(&format!("/async-calls/{a}")), rs)
            .await
            .status(),
        200
    );

    // Admin: the admin views need admin of some namespace (and hold only those: tests/tenancy.rs);
    // /metrics needs admin:*; a function's pause needs admin of its namespace.
    let admin = Cred::Bearer(&jwt["valid_eddsa_admin"]);
    let ns_admin = Cred::Bearer(&team_a_admin);
    for path in [
        "/system/async/queue",
        "/system/async/dead-letters",
        "/metrics",
        "/dashboard/",
    ] {
        assert_eq!(
            send(&client, "GET", &url(path), admin).await.status(),
            200,
            "{path}"
        );
        assert_eq!(
            send(
                &client,
                "GET",
                &url(path),
                Cred::Basic("admin", BASIC_PASSWORD)
            )
            .await
            .status(),
            200,
            "{path} basic"
        );
        if path == "/metrics" {
            expect_403(
                send(&client, "GET", &url(path), ns_admin).await,
                "admin:*",
                path,
            )
            .await;
        } else {
            assert_eq!(
                send(&client, "GET", &url(path), ns_admin).await.status(),
                200,
                "{path} admin:team-a"
            );
            expect_403(
                send(&client, "GET", &url(path), rs).await,
                "admin:<namespace>",
                path,
            )
            .await;
        }
    }
    let pause_a = url("/system/async/functions/fn.team-a/pause");
    assert_eq!(
        send(&client, "POST", &pause_a, ns_admin).await.status(),
        200
    );
    expect_403(
        send(
            &client,
            "POST",
            &url("/system/async/functions/fn.team-b/pause"),
            ns_admin,
        )
        .await,
        "admin:team-b",
        "pause in another namespace",
    )
    .await;
    expect_403(
        send(&client, "POST", &pause_a, rs).await,
        "admin:team-a",
        "no admin",
    )
    .await;

    // The tokens file is reread when it changes.
    let late = random_token();
    assert_eq!(
        send(&client, "POST", &fn_a, Cred::Bearer(&late))
            .await
            .status(),
        401
    );
    std::fs::write(
        live.tokens_path(),
        format!("{tokens_file}late {} invoke:team-a\n", sha256_hex(&late)),
    )
    .unwrap();
    let end = Instant::now() + DEADLINE;
    while send(&client, "POST", &fn_a, Cred::Bearer(&late))
        .await
        .status()
        != 202
    {
        assert!(
            Instant::now() < end,
            "the changed tokens file was never reread"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken file keeps the last good table in force.
    std::fs::write(live.tokens_path(), "late not-a-hash invoke:team-a\n").unwrap();
    let logs = live.log.clone();
    let end = Instant::now() + DEADLINE;
    while !std::fs::read_to_string(&logs)
        .unwrap()
        .contains("tokens file not reloaded")
    {
        assert!(
            Instant::now() < end,
            "the broken tokens file was not reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        send(&client, "POST", &fn_a, Cred::Bearer(&late))
            .await
            .status(),
        202
    );

    let logs = live.stop().await;
    assert!(
        logs.contains("authentication refused"),
        "denials are logged:\n{logs}"
    );
    let mut secrets: Vec<&str> = jwt.values().map(String::as_str).collect();
    secrets.extend([BASIC_PASSWORD, &ci_bot, &team_a_admin, &late]);
    for secret in secrets {
        // A JWT's signature part is what makes it a credential.
        let tail = secret.rsplit('.').next().unwrap_or(secret);
        assert!(
            tail.len() < 8 || !logs.contains(tail),
            "a credential leaked into the log:\n{logs}"
        );
    }
}

/// Every route of the table, without credentials, on a gateway with an authenticator: `401`
/// unless its permission is public. A route added without going through the table is caught
/// by the unit test of `routes.rs`; one in the table cannot lack a permission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_in_the_table_is_behind_its_permission() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "").unwrap();
    let tokens = tokens.display().to_string();
    let gateway = common::Gateway::start(&nats.url(), &["--auth-tokens-file", &tokens]).await;
    let client = http();
    let routes = gateway_plugin::routes::routes::<JetStreamQueue>();
    assert!(routes.len() >= 20, "the table lists every route");
    for route in &routes {
        let path = route
            .path
            .replace("{name}", "fn.team-a")
            .replace("{call_id}", "some-call")
            .replace("{sequence}", "1")
            .replace("{*path}", "deeper/path");
        for method in route.methods {
            let r = send(
                &client,
                method.as_str(),
                &format!("{}{path}", gateway.url),
                Cred::None,
            )
            .await;
            let public = route.permission == Permission::Public;
            assert_eq!(
                r.status() == 401,
                !public,
                "{} {} ({:?}) answered {}",
                method.as_str(),
                route.path,
                route.permission,
                r.status()
            );
        }
    }
    gateway.shutdown().await;
}

/// `/readyz` says whether the gateway is open: with no authenticator it names none and warns
/// (besides the start-up log); with one it lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_whether_anyone_is_authenticated() {
    let nats = NatsServer::start().await.unwrap();
    let client = http();
    let readyz = |url: String| {
        let client = client.clone();
        async move {
            let r = client.get(format!("{url}/readyz")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            serde_json::from_slice::<serde_json::Value>(&r.bytes().await.unwrap()).unwrap()
        }
    };
    let open = common::Gateway::start(&nats.url(), &[]).await;
    let body = readyz(open.url.clone()).await;
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(body["authentication"], "none", "{body}");
    assert!(
        body["warning"].as_str().unwrap().contains("open to anyone"),
        "{body}"
    );
    open.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "").unwrap();
    let tokens = tokens.display().to_string();
    let guarded = common::Gateway::start(&nats.url(), &["--auth-tokens-file", &tokens]).await;
    let body = readyz(guarded.url.clone()).await;
    assert_eq!(
        body["authentication"],
        serde_json::json!(["tokens"]),
        "{body}"
    );
    assert!(body.get("warning").is_none(), "{body}");
    guarded.shutdown().await;
}

/// The issuer's JWKS endpoint on 127.0.0.1 (plain HTTP, or HTTPS with a test CA): counts the
/// fetches, answers `500` while `failing`, serves whatever `jwks` holds, and can be stopped.
struct Idp {
    url: String,
    jwks: std::sync::Arc<std::sync::Mutex<serde_json::Value>>,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    server: tokio::task::JoinHandle<()>,
}

impl Idp {
    async fn start(jwks: serde_json::Value, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let jwks = Arc::new(std::sync::Mutex::new(jwks));
        let fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (j, f, d) = (jwks.clone(), fetches.clone(), failing.clone());
        let app = axum::Router::new().route(
            "/realms/research/certs",
            axum::routing::get(move || {
                let (j, f, d) = (j.clone(), f.clone(), d.clone());
                async move {
                    use axum::response::IntoResponse;
                    f.fetch_add(1, Ordering::SeqCst);
                    if d.load(Ordering::SeqCst) {
                        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down")
                            .into_response();
                    }
                    let body = j.lock().unwrap().to_string();
                    (
                        [
                            ("content-type", "application/jwk-set+json"),
                            ("cache-control", "public, max-age=3600"),
                        ],
                        body,
                    )
                        .into_response()
                }
            }),
        );
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            url: format!("{scheme}://127.0.0.1:{port}/realms/research/certs"),
            jwks,
            fetches,
            failing,
            server,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn serve(&self, jwks: &serde_json::Value) {
        *self.jwks.lock().unwrap() = jwks.clone();
    }

    fn fail(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A token naming a `kid` nobody published (its signature is never looked at).
fn forged_kid(i: usize) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": format!("forged-{i}")})),
        b64(
            serde_json::json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": exp, "scope": "*"})
        ),
    )
}

fn jwt_args(url: &str) -> Vec<&str> {
    vec![
        "--jwks-url",
        url,
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
    ]
}

/// `--jwks-url`: not ready (and JWTs answered 503) until the keys are fetched; a key rotated in
/// at the issuer is accepted after one fetch; a flood of unknown `kid`s makes at most one fetch
/// per interval; with the issuer gone, the keys fetched before still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwks_from_a_url_rotation_flood_and_outage() {
    let nats = NatsServer::start().await.unwrap();
    let (minted, jwt) = mint_all();
    let idp = Idp::start(minted["jwks"].clone(), None).await;
    idp.fail(true);
    let gateway = common::Gateway::launch(&nats.url(), &jwt_args(&idp.url)).await;
    let client = http();
    let fn_a = format!("{}/async-function/fn.team-a/x", gateway.url);
    let valid = Cred::Bearer(&jwt["valid_rs256"]);

    // The issuer fails: not ready, and a JWT cannot be checked yet (503, not a 401 that would
    // make the client drop a good token). Other refusals are as usual.
    assert!(gateway.wait_ready(false).await);
    let ready = client
        .get(format!("{}/readyz", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = serde_json::from_slice(&ready.bytes().await.unwrap()).unwrap();
    assert!(
        body["reason"].as_str().unwrap().contains("signing keys"),
        "{body}"
    );
    let r = send(&client, "POST", &fn_a, valid).await;
    assert!(r.headers().contains_key("retry-after"));
    common::assert_json_error(r, 503, "auth_unavailable").await;
    assert_eq!(send(&client, "POST", &fn_a, Cred::None).await.status(), 401);

    // The issuer answers: fetched on the next retry of the backoff.
    idp.fail(false);
    assert!(gateway.wait_ready(true).await, "keys never fetched");
    assert_eq!(send(&client, "POST", &fn_a, valid).await.status(), 202);
    let fetched = idp.fetches();

    // Rotation at the issuer: a token signed with the new key makes one fetch, and passes.
    idp.serve(&minted["jwks_rotated"]);
    let rotated = Cred::Bearer(&jwt["rotated"]);
    assert_eq!(send(&client, "POST", &fn_a, rotated).await.status(), 202);
    assert_eq!(idp.fetches(), fetched + 1, "one fetch for the new kid");

    // A flood of unknown kids right after: no fetch at all (one per 30 s at most).
    let flood: Vec<String> = (0..40).map(forged_kid).collect();
    let answers = futures::future::join_all(
        flood
            .iter()
            .map(|t| send(&client, "POST", &fn_a, Cred::Bearer(t))),
    )
    .await;
    assert!(answers.iter().all(|r| r.status() == 401));
    assert_eq!(
        send(&client, "POST", &fn_a, Cred::Bearer(&jwt["unknown_kid"]))
            .await
            .status(),
        401
    );
    assert_eq!(
        idp.fetches(),
        fetched + 1,
        "forged kids made the gateway fetch"
    );

    // Another gateway whose first unknown kids come all at once: exactly one fetch for them.
    let second = common::Gateway::start(&nats.url(), &jwt_args(&idp.url)).await;
    let fetched = idp.fetches();
    let second_fn = format!("{}/async-function/fn.team-a/x", second.url);
    let answers = futures::future::join_all(
        flood
            .iter()
            .map(|t| send(&client, "POST", &second_fn, Cred::Bearer(t))),
    )
    .await;
    assert!(answers.iter().all(|r| r.status() == 401));
    assert_eq!(
        idp.fetches(),
        fetched + 1,
        "one fetch for a burst of unknown kids"
    );
    second.shutdown().await;

    // The issuer goes away: the keys fetched before keep working, and the gateway stays ready.
    idp.server.abort();
    let _ = idp.server.await;
    for cred in [valid, rotated] {
        assert_eq!(send(&client, "POST", &fn_a, cred).await.status(), 202);
    }
    assert!(gateway.wait_ready(true).await);
    gateway.shutdown().await;
}

/// `--jwks-url` over HTTPS from a private CA (`--jwks-ca`), refreshed every `--jwks-refresh`: a
/// key the issuer withdrew stops working without any token asking for a fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwks_over_https_with_a_private_ca_is_refreshed() {
    let nats = NatsServer::start().await.unwrap();
    let (minted, jwt) = mint_all();
    let pki = test_support::TestPki::generate().unwrap();
    let acceptor = queue_core::tls_server::acceptor(
        &pki.server_cert(),
        &pki.server_key(),
        gateway_plugin::connections::TLS_SETTINGS,
    )
    .unwrap();
    let idp = Idp::start(minted["jwks_rotated"].clone(), Some(acceptor)).await;
    let ca = pki.ca().display().to_string();
    let mut args = jwt_args(&idp.url);
    args.extend(["--jwks-ca", &ca, "--jwks-refresh", "1s"]);
    let gateway = common::Gateway::start(&nats.url(), &args).await;
    let client = http();
    let fn_a = format!("{}/async-function/fn.team-a/x", gateway.url);
    let old = Cred::Bearer(&jwt["valid_rs256"]);
    let new = Cred::Bearer(&jwt["rotated"]);
    assert_eq!(send(&client, "POST", &fn_a, old).await.status(), 202);
    assert_eq!(send(&client, "POST", &fn_a, new).await.status(), 202);

    // The issuer withdraws the old key: the periodic refresh drops it (the old kid is still
    // known until then, so no token asks for the fetch).
    idp.serve(&minted["jwks_successor_only"]);
    let end = Instant::now() + DEADLINE;
    while send(&client, "POST", &fn_a, old).await.status() != 401 {
        assert!(Instant::now() < end, "the withdrawn key was never dropped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(send(&client, "POST", &fn_a, new).await.status(), 202);
    assert!(idp.fetches() >= 2);
    gateway.shutdown().await;
}

/// The README's policy file, for the test issuer.
fn readme_policy() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme.find("# /etc/faas-async/policy.toml").unwrap();
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end].replace("https://login.example.org/realms/research", ISSUER)
}

/// `--auth-policy-file`: scopes from groups and roles claims (PyJWT tokens without a scope
/// claim), added to the token's own; a member gets them, a non-member a 403; a malformed file
/// stops the gateway naming the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_file_maps_claims_to_scopes() {
    let nats = NatsServer::start().await.unwrap();
    let (jwks, jwt) = mint();
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, readme_policy()).unwrap();
    let (jwks_path, policy) = (
        jwks_path.display().to_string(),
        policy.display().to_string(),
    );
    let args = [
        "--jwks-file",
        &jwks_path,
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--auth-policy-file",
        &policy,
    ];
    let gateway = common::Gateway::start(&nats.url(), &args).await;
    let client = http();
    let url = |path: &str| format!("{}{path}", gateway.url);
    let member = Cred::Bearer(&jwt["group_member"]);

    // The group's scopes: invoke, read, admin of team-a; nothing of team-b, nothing queue-wide.
    let r = send(&client, "POST", &url("/async-function/fn.team-a"), member).await;
    assert_eq!(r.status(), 202);
    let call = call_id(&r);
    let record = url(&format!("/async-calls/{call}"));
    assert_eq!(send(&client, "GET", &record, member).await.status(), 200);
    assert_eq!(
        send(
            &client,
            "POST",
            &url("/system/async/functions/fn.team-a/pause"),
            member
        )
        .await
        .status(),
        200
    );
    expect_403(
        send(&client, "POST", &url("/async-function/fn.team-b"), member).await,
        "invoke:team-b",
        "the member's group is team-a's",
    )
    .await;
    // Admin views are the member's namespaces' (filtered); the queue-wide metrics are not.
    assert_eq!(
        send(&client, "GET", &url("/system/async/queue"), member)
            .await
            .status(),
        200
    );
    expect_403(
        send(&client, "GET", &url("/metrics"), member).await,
        "admin:*",
        "admin:team-a is not queue-wide",
    )
    .await;

    // A member of another group: no scope at all for team-a.
    let other = Cred::Bearer(&jwt["group_other"]);
    expect_403(
        send(&client, "POST", &url("/async-function/fn.team-a"), other).await,
        "invoke:team-a",
        "not a member",
    )
    .await;
    common::assert_json_error(send(&client, "GET", &record, other).await, 403, "forbidden").await;

    // A realm role, nested in realm_access.roles, for this issuer: read everywhere, no invoke.
    let auditor = Cred::Bearer(&jwt["role_reader"]);
    assert_eq!(send(&client, "GET", &record, auditor).await.status(), 200);
    expect_403(
        send(&client, "POST", &url("/async-function/fn.team-a"), auditor).await,
        "invoke:team-a",
        "the auditor only reads",
    )
    .await;

    // `equals` on a custom claim, added to the token's own scope claim (read:team-a).
    let genomics = Cred::Bearer(&jwt["department"]);
    let r = send(
        &client,
        "POST",
        &url("/async-function/fn.genomics"),
        genomics,
    )
    .await;
    assert_eq!(r.status(), 202);
    let own = url(&format!("/async-calls/{}", call_id(&r)));
    assert_eq!(send(&client, "GET", &own, genomics).await.status(), 200);
    assert_eq!(
        send(&client, "GET", &record, genomics).await.status(),
        200,
        "the token's own scope stays"
    );

    // Tokens with their own scopes and no matching rule are as before.
    assert_eq!(
        send(
            &client,
            "POST",
            &url("/async-function/fn.team-a"),
            Cred::Bearer(&jwt["valid_rs256"])
        )
        .await
        .status(),
        202
    );
    gateway.shutdown().await;

    // A malformed file stops the gateway: the error names the file and the line.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nclaim = \"groups\"\ncontains = \"team-a-admins\"\nscopes = [\"invoke:team-a\", \"write:team-a\"]\n",
    )
    .unwrap();
    let bad = bad.display().to_string();
    let mut config_args = vec!["gateway-plugin"];
    config_args.extend(args);
    config_args.extend(["--auth-policy-file", &bad]);
    let config =
        <gateway_plugin::GatewayConfig as clap::Parser>::try_parse_from(config_args).unwrap();
    let e = gateway_plugin::auth::Authenticator::from_args(&config.auth)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&bad) && e.contains("line 4") && e.contains("write:team-a"),
        "{e}"
    );
}

/// A verified token is remembered (one signature check a minute, not one per call), but never
/// past its `exp`: with no leeway, the same token is refused once it expires, though it was
/// accepted (and remembered) a moment before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_token_is_refused_once_it_expires() {
    let nats = NatsServer::start().await.unwrap();
    let (jwks, jwt) = mint();
    let minted = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let jwks_path = jwks_path.display().to_string();
    let args = [
        "--jwks-file",
        &jwks_path,
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--jwt-leeway",
        "0s",
    ];
    let gateway = common::Gateway::start(&nats.url(), &args).await;
    let client = http();
    let url = format!("{}/async-function/fn.team-a", gateway.url);
    let short = Cred::Bearer(&jwt["short_lived"]);
    for _ in 0..3 {
        let r = send(&client, "POST", &url, short).await;
        assert_eq!(r.status(), 202, "valid for 10 s, and then remembered");
    }
    // Past its exp (10 s after minting, whole seconds): refused although remembered.
    while minted.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = send(&client, "POST", &url, short).await;
    assert_eq!(
        r.status(),
        401,
        "an expired token, remembered or not, is refused"
    );
    // A fresh token still passes.
    let r = send(&client, "POST", &url, Cred::Bearer(&jwt["valid_rs256"])).await;
    assert_eq!(r.status(), 202);
    gateway.shutdown().await;
}

/// The policy file is reread while the gateway runs: a rule added applies (to a token already
/// verified and remembered, too), a broken version keeps the rules in force (reported once, and
/// again on SIGHUP, which the gateway survives), and a rule taken away on SIGHUP stops applying.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_policy_file_is_reread_on_change_and_on_sighup() {
    let nats = NatsServer::start().await.unwrap();
    let (jwks, jwt) = mint();
    let dir = tempfile::tempdir().unwrap();
    let jwks_path = dir.path().join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "# no rules yet\n").unwrap();
    let gateway = common::GatewayProcess::start(
        &nats.url(),
        &[
            "--jwks-file",
            jwks_path.to_str().unwrap(),
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
            "--auth-policy-file",
            policy.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let client = http();
    let fn_a = format!("{}/async-function/fn.team-a", gateway.url);
    let member = Cred::Bearer(&jwt["group_member"]);
    let status = async || send(&client, "POST", &fn_a, member).await.status();

    // No rule: the member's token (no scope claim) verifies, and is remembered, without scopes.
    assert_eq!(status().await, 403);
    common::replace_file(&policy, &readme_policy());
    common::eventually("the new rule applies", async || status().await == 202).await;
    gateway.wait_log("policy file reloaded", 1).await;

    // A broken version: the rules in force stay, the error names the line, reported once.
    common::replace_file(
        &policy,
        "[[rule]]\nclaim = \"groups\"\ncontains = \"team-a-admins\"\nscopes = [\"invoke:team-a\", \"write:team-a\"]\n",
    );
    gateway.wait_log("policy file not reloaded", 1).await;
    assert!(gateway.log().contains("line 4"), "{}", gateway.log());
    assert_eq!(status().await, 202, "the last good rules stay in force");
    // SIGHUP rereads it at once: reported again, still in force, the gateway still up.
    gateway.hangup();
    gateway.wait_log("SIGHUP received", 1).await;
    gateway.wait_log("policy file not reloaded", 2).await;
    assert_eq!(
        gateway.log().matches("policy file not reloaded").count(),
        2,
        "reported once per version (and once per SIGHUP), not every second"
    );
    assert_eq!(status().await, 202);

    // The group's rule narrowed to reading: invoking stops at once, remembered token or not.
    common::replace_file(
        &policy,
        "[[rule]]\nclaim = \"groups\"\ncontains = \"team-a-admins\"\nscopes = [\"read:team-a\"]\n",
    );
    gateway.hangup();
    common::eventually("the narrowed rule applies", async || status().await == 403).await;
    let logs = gateway.stop().await;
    let signature = jwt["group_member"].rsplit('.').next().unwrap();
    assert!(!logs.contains(signature), "a token leaked into the log");
}

/// What a request of the route table must be answered.
#[derive(Clone)]
enum Want {
    /// `401` `unauthorized`, with the Bearer and the Basic challenges.
    Unauthorized,
    /// `403` `forbidden`, naming the missing scope.
    Forbidden(String),
    /// A JSON error: its status and code.
    Error(u16, &'static str),
    /// A handler's answer: its status, and what it must show (said, then checked).
    Answer(u16, &'static str, Check),
}

type Check = std::sync::Arc<dyn Fn(&Answer) -> bool + Send + Sync>;

fn answer(
    status: u16,
    shows: &'static str,
    check: impl Fn(&Answer) -> bool + Send + Sync + 'static,
) -> Want {
    Want::Answer(status, shows, std::sync::Arc::new(check))
}

/// What the gateway answered.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// Where a credential case stands: refused by authentication, or an authenticated caller
/// short of the scope, of another namespace, or with what the route needs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Standing {
    Refused,
    NoScope,
    OtherNamespace,
    Valid,
}

/// The credential cases of issue 11's table (the unknown key twice: a `kid` nobody published,
/// and a stranger's key under a published `kid`).
const CASES: [(&str, Standing); 12] = [
    ("no credentials", Standing::Refused),
    ("wrong password", Standing::Refused),
    ("unknown token", Standing::Refused),
    ("expired JWT", Standing::Refused),
    ("JWT for another audience", Standing::Refused),
    (
        "JWT signed by an unknown key (unknown kid)",
        Standing::Refused,
    ),
    (
        "JWT signed by an unknown key (known kid)",
        Standing::Refused,
    ),
    ("alg: none", Standing::Refused),
    ("HS256 signed with the public key", Standing::Refused),
    ("valid token without the scope", Standing::NoScope),
    (
        "valid token for another namespace",
        Standing::OtherNamespace,
    ),
    ("valid token", Standing::Valid),
];

/// The ids the table's requests name: calls of team-a made by the test, dead letters of
/// team-a and team-b stored by it.
struct TableIds {
    /// Read (record, result): never cancelled.
    read_call: String,
    /// Cancelled by `DELETE /async-calls/{id}`.
    cancel_call: String,
    /// Cancelled by `DELETE /async-function/{id}` (OpenFaaS Pro's cancel).
    pro_cancel_call: String,
    /// The sequence of dead letter `dl-show` (team-a), shown and listed, never changed.
    show_sequence: u64,
}

/// One request of the table: a route of the table with its parameters filled in, and what
/// it must be answered by a caller with what the route needs (`valid`) and, on the admin
/// views, by an admin of another namespace (`other`).
struct Target {
    method: &'static str,
    route: &'static str,
    permission: Permission,
    /// The permission the request is decided by: the route's, but for
    /// `DELETE /async-function/{name}`, a cancel's or an invocation's.
    acts_as: Permission,
    path: String,
    json_body: Option<serde_json::Value>,
    /// For a CORS preflight: the method it asks for.
    preflight: Option<&'static str>,
    valid: Want,
    other: Option<Want>,
}

const TABLE_ORIGIN: &str = "https://ui.team-a.example.test";

fn is_array_of_ids(value: &serde_json::Value, ids: &[&str]) -> bool {
    value.as_array().is_some_and(|list| {
        let mut got: Vec<&str> = list.iter().filter_map(|e| e["call_id"].as_str()).collect();
        got.sort_unstable();
        got == ids
    })
}

/// The table's requests for `method` on `route`: one, or for `DELETE /async-function/{name}`
/// two: the name of a function (an invocation) and the id of a call (OpenFaaS Pro's cancel).
fn targets(
    route: &gateway_plugin::routes::Route<JetStreamQueue>,
    method: &'static str,
    ids: &TableIds,
) -> Vec<Target> {
    let mut function = target(route, method, ids);
    if route.permission != Permission::CancelOrInvoke {
        return vec![function];
    }
    function.acts_as = Permission::Invoke;
    let id = ids.pro_cancel_call.clone();
    let call = Target {
        path: format!("/async-function/{id}"),
        acts_as: Permission::Cancel,
        valid: answer(202, "the cancelled record and its X-Call-Id", move |a| {
            let r = a.json();
            r["call_id"] == id.as_str() && r["state"] == "cancelled" && a.header("x-call-id") == id
        }),
        ..target(route, method, ids)
    };
    vec![function, call]
}

/// The table's request for `method` on `route`, with what it must be answered. A route this
/// does not know fails the test: a new route gets its row here.
fn target(
    route: &gateway_plugin::routes::Route<JetStreamQueue>,
    method: &'static str,
    ids: &TableIds,
) -> Target {
    let mut path = route
        .path
        .replace("{name}", "fn.team-a")
        .replace("{*path}", "deeper/path")
        .replace("{sequence}", &ids.show_sequence.to_string());
    let call = match (method, route.path) {
        (_, "/system/async/dead-letters/call/{call_id}") => "dl-show",
        ("DELETE", _) => ids.cancel_call.as_str(),
        _ => ids.read_call.as_str(),
    };
    path = path.replace("{call_id}", call);
    let read_call = ids.read_call.clone();
    let mut json_body = None;
    let mut other = None;
    let preflight =
        (method == "OPTIONS").then_some(match route.path.starts_with("/async-calls/") {
            true => "GET",
            false => "POST",
        });
    let valid = match (method, route.path) {
        ("OPTIONS", _) => answer(204, "the CORS preflight's headers", |a| {
            a.header("access-control-allow-origin") == TABLE_ORIGIN
        }),
        (_, p) if p.starts_with("/async-function/") => answer(202, "an X-Call-Id, no body", |a| {
            !a.header("x-call-id").is_empty() && a.body.is_empty()
        }),
        ("GET", "/async-calls/{call_id}") => answer(200, "the queued call's record", move |a| {
            let r = a.json();
            r["call_id"] == read_call.as_str() && r["state"] == "queued"
        }),
        ("DELETE", "/async-calls/{call_id}") => {
            let id = ids.cancel_call.clone();
            answer(200, "the cancelled record", move |a| {
                let r = a.json();
                r["call_id"] == id.as_str() && r["state"] == "cancelled"
            })
        }
        ("GET", "/async-calls/{call_id}/result") => {
            answer(202, "not finished yet", |a| a.json()["state"] == "queued")
        }
        ("GET", "/system/async/queue") => {
            other = Some(answer(
                200,
                "team-b's dead letter, no team-a function",
                |a| {
                    let q = a.json();
                    q["dead_letters"] == 1
                        && q["unacked"].is_null()
                        && q["functions"].as_array().is_some_and(|f| {
                            f.iter().all(|f| {
                                f["function"]
                                    .as_str()
                                    .is_some_and(|n| n.ends_with(".team-b"))
                            })
                        })
                },
            ));
            answer(200, "team-a's functions and dead letters only", |a| {
                let q = a.json();
                q["dead_letters"]
                    .as_u64()
                    .is_some_and(|n| (1..=3).contains(&n))
                    && q["unacked"].is_null()
                    && q["functions"].as_array().is_some_and(|f| {
                        !f.is_empty()
                            && f.iter().all(|f| {
                                f["function"]
                                    .as_str()
                                    .is_some_and(|n| n.ends_with(".team-a"))
                            })
                    })
            })
        }
        ("GET", "/system/async/stats") => {
            let live = |a: &Answer| a.json()["functions"].is_array();
            other = Some(answer(200, "the live figures", live));
            answer(200, "the live figures", live)
        }
        ("GET", "/dashboard") => {
            let moved = |a: &Answer| a.header("location") == "/dashboard/";
            other = Some(answer(308, "a redirect to /dashboard/", moved));
            answer(308, "a redirect to /dashboard/", moved)
        }
        ("GET", "/dashboard/") => {
            let page = |a: &Answer| a.header("content-type").starts_with("text/html");
            other = Some(answer(200, "the page", page));
            answer(200, "the page", page)
        }
        ("GET", "/system/async/dead-letters") => {
            other = Some(answer(200, "team-b's dead letter alone", |a| {
                is_array_of_ids(&a.json(), &["dl-b"])
            }));
            answer(200, "team-a's dead letters alone", |a| {
                let list = a.json();
                let ids: Vec<&str> = (list.as_array().into_iter().flatten())
                    .filter_map(|e| e["call_id"].as_str())
                    .collect();
                ids.contains(&"dl-show") && !ids.contains(&"dl-b")
            })
        }
        ("POST", "/system/async/dead-letters/replay") => {
            json_body = Some(serde_json::json!({"call_ids": ["dl-replay"]}));
            other = Some(answer(200, "nothing replayed", |a| {
                is_array_of_ids(&a.json()["replayed"], &[])
            }));
            answer(200, "dl-replay replayed", |a| {
                is_array_of_ids(&a.json()["replayed"], &["dl-replay"])
            })
        }
        ("POST", "/system/async/dead-letters/purge") => {
            json_body = Some(serde_json::json!({"call_ids": ["dl-purge"]}));
            other = Some(answer(200, "nothing purged", |a| a.json()["deleted"] == 0));
            answer(200, "dl-purge purged", |a| a.json()["deleted"] == 1)
        }
        (
            "GET",
            "/system/async/dead-letters/{sequence}" | "/system/async/dead-letters/call/{call_id}",
        ) => {
            other = Some(Want::Error(404, "unknown_dead_letter"));
            answer(200, "dead letter dl-show", |a| {
                a.json()["call_id"] == "dl-show"
            })
        }
        ("POST", "/system/async/functions/{name}/pause") => answer(200, "fn.team-a paused", |a| {
            let r = a.json();
            r["function"] == "fn.team-a" && r["paused"] == true
        }),
        ("POST", "/system/async/functions/{name}/resume") => {
            answer(200, "fn.team-a resumed", |a| {
                let r = a.json();
                r["function"] == "fn.team-a" && r["paused"] == false
            })
        }
        ("GET", "/metrics") => answer(200, "Prometheus text", |a| {
            a.header("content-type").starts_with("text/plain")
                && std::str::from_utf8(&a.body).is_ok_and(|t| t.contains("# TYPE "))
        }),
        ("GET", "/healthz") => answer(200, "status ok", |a| a.json()["status"] == "ok"),
        ("GET", "/readyz") => answer(200, "status ready", |a| a.json()["status"] == "ready"),
        ("GET", "/openapi.json") => answer(200, "the OpenAPI document", |a| {
            a.json()["openapi"] == "3.0.3"
        }),
        (method, path) => panic!("the route table test has no row for {method} {path}: add one"),
    };
    Target {
        method,
        route: route.path,
        permission: route.permission,
        acts_as: route.permission,
        path,
        json_body,
        preflight,
        valid,
        other,
    }
}

/// What `standing` must get on `target`: `401` for every refused credential, else by the
/// route's permission (public routes answer alike whoever asks; a call of another namespace
/// is unknown; the admin views hold only the caller's namespaces).
fn expected(target: &Target, standing: Standing) -> Want {
    use Permission::*;
    if target.acts_as == Public {
        return target.valid.clone();
    }
    let forbidden = |scope: &str| Want::Forbidden(scope.to_owned());
    match (standing, target.acts_as) {
        (Standing::Refused, _) => Want::Unauthorized,
        (Standing::Valid, _) => target.valid.clone(),
        (Standing::NoScope | Standing::OtherNamespace, Invoke) => forbidden("invoke:team-a"),
        (Standing::NoScope | Standing::OtherNamespace, AdminFunction) => forbidden("admin:team-a"),
        (Standing::NoScope | Standing::OtherNamespace, Metrics) => forbidden("admin:*"),
        (Standing::NoScope, Read) => forbidden("read:<namespace of the call>"),
        (Standing::NoScope, Cancel) => forbidden("cancel:<namespace of the call>"),
        (Standing::OtherNamespace, Read | Cancel) => Want::Error(404, "unknown_call"),
        (Standing::NoScope, Admin) => forbidden("admin:<namespace>"),
        (Standing::OtherNamespace, Admin) => target.other.clone().unwrap_or_else(|| {
            panic!(
                "{} {}: no answer for another namespace's admin",
                target.method, target.route
            )
        }),
        (_, permission) => panic!("no expectation for {permission:?}"),
    }
}

/// The credential of case `case` on a route with `permission` (the `index`-th request: the
/// valid token's algorithm goes round RS256, ES256, EdDSA).
fn credential<'a>(
    case: usize,
    permission: Permission,
    index: usize,
    jwt: &'a HashMap<String, String>,
    unknown: &'a str,
) -> Cred<'a> {
    let token = |name: &str| Cred::Bearer(&jwt[name]);
    match case {
        0 => Cred::None,
        1 => Cred::Basic("admin", "wrong"),
        2 => Cred::Bearer(unknown),
        3 => token("expired"),
        4 => token("wrong_audience"),
        5 => token("unknown_kid"),
        6 => token("unknown_key_known_kid"),
        7 => token("alg_none"),
        8 => token("hs256_public_key"),
        9 => token(match permission {
            Permission::Invoke | Permission::Public | Permission::CancelOrInvoke => {
                "table_a_no_invoke"
            }
            Permission::Read => "table_a_no_read",
            Permission::Cancel => "table_a_no_cancel",
            Permission::Admin | Permission::AdminFunction => "table_a_no_admin",
            // admin:team-a is not admin:*.
            Permission::Metrics => "table_a_rs256",
        }),
        10 => token("table_b"),
        _ => match permission {
            Permission::Metrics => token("table_root"),
            _ => token(["table_a_rs256", "table_a_es256", "table_a_eddsa"][index % 3]),
        },
    }
}

async fn check(want: &Want, response: reqwest::Response, what: &str) {
    match want {
        Want::Unauthorized => expect_401(response, what).await,
        Want::Forbidden(scope) => expect_403(response, scope, what).await,
        Want::Error(status, code) => {
            let got = response.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or_default();
            assert_eq!(
                (got, &body["error"]),
                (*status, &serde_json::json!(code)),
                "{what}: {body}"
            );
        }
        Want::Answer(status, shows, check) => {
            let answer = Answer {
                status: response.status().as_u16(),
                headers: response.headers().clone(),
                body: response.bytes().await.unwrap(),
            };
            assert!(
                answer.status == *status && check(&answer),
                "{what}: expected {status} with {shows}, got {} {:?}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
}

/// Stores a dead letter of `function` (`name.namespace`) with `call_id` through the queue's
/// own dead-letter operation, as a worker would; returns its sequence.
async fn store_dead_letter(
    queue: &JetStreamQueue,
    config: &gateway_plugin::GatewayConfig,
    function: &str,
    call_id: &str,
    sequence: u64,
) -> u64 {
    use queue_core::backend::{CallQueue, DeadLetter, DeadLetterReason};
    let (name, namespace) = function.split_once('.').unwrap();
    let call = queue_core::message::QueuedCall {
        meta: queue_core::message::CallMeta {
            call_id: call_id.to_owned(),
            function: name.to_owned(),
            namespace: Some(namespace.to_owned()),
            method: "POST".into(),
            path: String::new(),
            query: None,
            headers: Vec::new(),
            callback_url: None,
            received_at_unix_nanos: queue_core::unix_nanos_now(),
            body: queue_core::message::BodyLocation::Inline { len: 4 },
            record_revision: None,
            overrides: Default::default(),
            not_before_unix_nanos: None,
        },
        body: bytes::Bytes::from_static(b"body"),
    };
    let subject = queue_core::backend::call_subject(&config.nats.subject_prefix, &call);
    queue
        .dead_letter(
            call.encode().unwrap(),
            &DeadLetter {
                reason: DeadLetterReason::RetriesExhausted,
                detail: "failed in the test",
                original_subject: &subject,
                stream_sequence: sequence,
                call_id: Some(call_id),
                received_at_unix_nanos: Some(call.meta.received_at_unix_nanos),
                last_status: Some(500),
                attempts: 1,
            },
        )
        .await
        .unwrap();
    let letters = queue.dead_letters().await.unwrap();
    letters
        .iter()
        .find(|e| e.call_id.as_deref() == Some(call_id))
        .map(|e| e.sequence)
        .unwrap()
}

/// Where the table's gateway gets the JWT signing keys.
#[derive(Clone, Copy, Debug)]
enum KeysFrom {
    File,
    Url,
}

/// Issue 11's table: every route of the table (each method) × every credential case, each
/// answered `401` / `403` / `404` / the handler's own answer as the route's permission says,
/// on a gateway with basic auth, a tokens file and JWTs (keys from a file or a URL).
async fn route_table_with_keys_from(keys: KeysFrom) {
    use futures::StreamExt;
    let nats = NatsServer::start().await.unwrap();
    let (minted, jwt) = mint_all();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("basic-auth-user"), "admin\n").unwrap();
    std::fs::write(
        secrets.join("basic-auth-password"),
        format!("{BASIC_PASSWORD}\n"),
    )
    .unwrap();
    let bot = random_token();
    std::fs::write(
        dir.path().join("tokens"),
        format!("ci-bot {} invoke:team-a\n", sha256_hex(&bot)),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("cors.toml"),
        format!(
            "[namespaces.team-a]\norigins = [\"{TABLE_ORIGIN}\"]\nmethods = [\"POST\", \"PUT\", \"PATCH\", \"DELETE\", \"GET\"]\n\
             [calls]\norigins = [\"{TABLE_ORIGIN}\"]\nmethods = [\"GET\", \"DELETE\"]\n"
        ),
    )
    .unwrap();
    let jwks_file = dir.path().join("jwks.json");
    std::fs::write(&jwks_file, minted["jwks"].to_string()).unwrap();
    let idp = match keys {
        KeysFrom::Url => Some(Idp::start(minted["jwks"].clone(), None).await),
        KeysFrom::File => None,
    };
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (secrets, tokens, cors, jwks_file) = (
        path("secrets"),
        path("tokens"),
        path("cors.toml"),
        jwks_file.display().to_string(),
    );
    let mut args = vec![
        "--basic-auth",
        "--secret-mount-path",
        &secrets,
        "--auth-tokens-file",
        &tokens,
        "--cors-file",
        &cors,
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
    ];
    match &idp {
        Some(idp) => args.extend(["--jwks-url", &idp.url]),
        None => args.extend(["--jwks-file", &jwks_file]),
    }
    let gateway = common::Gateway::start(&nats.url(), &args).await;
    let client = http();
    let admin = Cred::Basic("admin", BASIC_PASSWORD);

    // What the requests name: calls of team-a, dead letters of team-a and team-b.
    let mut calls = Vec::new();
    for _ in 0..3 {
        let r = send(
            &client,
            "POST",
            &format!("{}/async-function/fn.team-a", gateway.url),
            admin,
        )
        .await;
        assert_eq!(r.status(), 202);
        calls.push(call_id(&r));
    }
    let config = <gateway_plugin::GatewayConfig as clap::Parser>::try_parse_from([
        "gateway-plugin",
        "--nats-url",
        &nats.url(),
    ])
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let queue = JetStreamQueue::connect(
        queue_core::backend::jetstream::JetStreamOptions {
            nats: config.nats.clone(),
            manage_streams: None,
            consumer: None,
            records: config.records.clone(),
            sealing: queue_core::sealing::Sealing::off(),
        },
        "route-table",
        stop.clone(),
    )
    .await
    .unwrap();
    let show_sequence = store_dead_letter(&queue, &config, "fn.team-a", "dl-show", 1).await;
    store_dead_letter(&queue, &config, "fn.team-a", "dl-replay", 2).await;
    store_dead_letter(&queue, &config, "fn.team-a", "dl-purge", 3).await;
    store_dead_letter(&queue, &config, "fn.team-b", "dl-b", 4).await;
    let ids = TableIds {
        read_call: calls[0].clone(),
        cancel_call: calls[1].clone(),
        pro_cancel_call: calls[2].clone(),
        show_sequence,
    };

    let routes = gateway_plugin::routes::routes::<JetStreamQueue>();
    let targets: Vec<Target> = routes
        .iter()
        .flat_map(|route| {
            route
                .methods
                .iter()
                .flat_map(|m| targets(route, m.as_str(), &ids))
        })
        .collect();
    assert!(
        targets.len() >= 30,
        "every method of every route: {}",
        targets.len()
    );
    let unknown = random_token();
    let requests = targets
        .iter()
        .enumerate()
        .flat_map(|(index, target)| (0..CASES.len()).map(move |case| (index, target, case)));
    let started = Instant::now();
    futures::stream::iter(requests)
        .for_each_concurrent(16, |(index, target, case)| {
            let (client, jwt, unknown, base) = (&client, &jwt, &unknown, &gateway.url);
            async move {
                let (name, standing) = CASES[case];
                let cred = credential(case, target.acts_as, index, jwt, unknown);
                let method = reqwest::Method::from_bytes(target.method.as_bytes()).unwrap();
                let mut request = client.request(method, format!("{base}{}", target.path));
                request = match &target.json_body {
                    Some(body) => request
                        .header("content-type", "application/json")
                        .body(body.to_string()),
                    None => match target.preflight {
                        Some(asked) => request
                            .header("origin", TABLE_ORIGIN)
                            .header("access-control-request-method", asked),
                        None => request.body("payload"),
                    },
                };
                request = match cred {
                    Cred::None => request,
                    Cred::Bearer(token) => request.bearer_auth(token),
                    Cred::Basic(user, password) => request.basic_auth(user, Some(password)),
                };
                let response = request.send().await.unwrap();
                let what = format!(
                    "{keys:?}: {} {} ({:?} as {:?}) as {name}",
                    target.method, target.path, target.permission, target.acts_as
                );
                check(&expected(target, standing), response, &what).await;
            }
        })
        .await;
    let took = started.elapsed();

    // Nothing refused was queued: the calls made above, one per invocation of the table.
    let invocations = targets
        .iter()
        .filter(|t| t.acts_as == Permission::Invoke)
        .count() as u64;
    assert_eq!(
        common::queued(&nats.url()).await,
        3 + invocations + 1,
        "the replayed dead letter is queued again"
    );
    eprintln!(
        "{keys:?}: {} requests in {took:?}",
        targets.len() * CASES.len()
    );
    stop.cancel();
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_times_every_credential_with_jwks_from_a_file() {
    route_table_with_keys_from(KeysFrom::File).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_times_every_credential_with_jwks_from_a_url() {
    route_table_with_keys_from(KeysFrom::Url).await;
}

/// `--public invoke` opens every invocation, a `DELETE` one included (credentials are not
/// looked at, as on the other async routes), but never OpenFaaS Pro's cancel: a
/// `DELETE /async-function/{call_id}` still needs `cancel:` of the call's namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_invoke_opens_delete_invocations_not_the_pro_cancel() {
    let nats = NatsServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let canceller = random_token();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!("canceller {} cancel:team-a\n", sha256_hex(&canceller)),
    )
    .unwrap();
    let tokens = tokens.display().to_string();
    let gateway = common::Gateway::start(
        &nats.url(),
        &["--auth-tokens-file", &tokens, "--public", "invoke"],
    )
    .await;
    let client = http();
    let url = |path: &str| format!("{}{path}", gateway.url);
    let r = send(
        &client,
        "POST",
        &url("/async-function/fn.team-a"),
        Cred::None,
    )
    .await;
    assert_eq!(r.status(), 202);
    let call = call_id(&r);
    for cred in [Cred::None, Cred::Bearer("not-a-known-token")] {
        let r = send(&client, "DELETE", &url("/async-function/fn.team-a"), cred).await;
        assert_eq!(r.status(), 202, "{cred:?}");
        assert_ne!(call_id(&r), call);
    }
    let pro = url(&format!("/async-function/{call}"));
    common::assert_json_error(
        send(&client, "DELETE", &pro, Cred::None).await,
        401,
        "unauthorized",
    )
    .await;
    let r = send(&client, "DELETE", &pro, Cred::Bearer(&canceller)).await;
    assert_eq!(r.status(), 202);
    let record: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(record["state"], "cancelled", "{record}");
    assert_eq!(
        common::queued(&nats.url()).await,
        3,
        "the cancel queued nothing"
    );
    gateway.shutdown().await;
}
