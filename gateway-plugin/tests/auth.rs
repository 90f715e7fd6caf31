//! Authentication and authorization against a live gateway (the real binary, a real
//! nats-server): OpenFaaS basic auth from files laid out as OpenFaaS mounts them (selected by
//! OpenFaaS's own variables), API tokens from a file, and JWTs minted by PyJWT (an independent
//! implementation) from keys generated for the run. Hostile tokens are refused, scopes hold per
//! namespace, ids of other namespaces read as unknown, and no credential reaches the log.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{DEADLINE, http};
use gateway_plugin::auth::Permission;
use queue_core::backend::jetstream::JetStreamQueue;
use test_support::nats_server::NatsServer;

const ISSUER: &str = "https://login.example.test/realms/research";
const AUDIENCE: &str = "faas-async";
const BASIC_PASSWORD: &str = "BASIC-PASSWORD-b7e1";

/// Keys, JWKS and tokens from `auth_mint.py` (PyJWT + cryptography).
fn mint() -> (serde_json::Value, HashMap<String, String>) {
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
    (minted["jwks"].clone(), tokens)
}

fn sha256_hex(token: &str) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(token.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
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
