//! OpenFaaS Pro's retry annotations (issue: a true drop-in for OpenFaaS): read from a stand-in
//! OpenFaaS gateway's function list (`/system/namespaces`, `/system/functions`, behind basic
//! auth with the credentials laid out as OpenFaaS mounts them), they change the retry policy of
//! the function that carries them — and only of it — and a changed annotation applies after
//! the next refresh.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use common::{DEADLINE, InProcessWorker, Queue, call, worker_args};
use serde_json::json;

#[derive(Default)]
struct StandIn {
    /// Annotations of `flaky` in `openfaas-fn`.
    flaky: Mutex<HashMap<String, String>>,
    /// Function list requests that carried the right credentials.
    lists: AtomicUsize,
    /// Function list requests refused for want of them.
    refused: AtomicUsize,
    /// Invocations per function.
    calls: Mutex<HashMap<String, usize>>,
}

const USER: &str = "admin";
const PASSWORD: &str = "s3cret-from-a-file";

fn authorized(headers: &HeaderMap) -> bool {
    let want = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    headers
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == want.as_bytes())
}

async fn namespaces(State(s): State<Arc<StandIn>>, headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        s.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    axum::Json(json!(["openfaas-fn", "team-a"])).into_response()
}

async fn functions(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&headers) {
        s.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let list = match query.get("namespace").map(String::as_str) {
        Some("openfaas-fn") => {
            s.lists.fetch_add(1, Ordering::SeqCst);
            let flaky = s.flaky.lock().unwrap().clone();
            json!([
                {"name": "flaky", "namespace": "openfaas-fn", "replicas": 1, "annotations": flaky},
                {"name": "steady", "namespace": "openfaas-fn", "replicas": 1},
            ])
        }
        // The same name in another namespace, with other annotations: not flaky's.
        Some("team-a") => json!([
            {"name": "flaky", "namespace": "team-a", "annotations": {"com.openfaas.retry.attempts": "4"}},
        ]),
        _ => json!([]),
    };
    axum::Json(list).into_response()
}

async fn invoke(State(s): State<Arc<StandIn>>, Path(name): Path<String>) -> Response {
    *s.calls.lock().unwrap().entry(name).or_default() += 1;
    StatusCode::SERVICE_UNAVAILABLE.into_response()
}

async fn start_gateway(state: Arc<StandIn>) -> String {
    let app = axum::Router::new()
        .route("/system/namespaces", get(namespaces))
        .route("/system/functions", get(functions))
        .route("/function/{name}", post(invoke))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_from_the_gateway_change_that_functions_retries() {
    let queue = Queue::start().await;
    let state = Arc::new(StandIn::default());
    state.flaky.lock().unwrap().extend([
        ("com.openfaas.retry.attempts".to_owned(), "2".to_owned()),
        ("com.openfaas.retry.codes".to_owned(), "503".to_owned()),
        ("com.openfaas.retry.min_wait".to_owned(), "50ms".to_owned()),
        ("com.openfaas.retry.max_wait".to_owned(), "100ms".to_owned()),
        ("com.openfaas.scale.max".to_owned(), "3".to_owned()),
    ]);
    let gateway = start_gateway(state.clone()).await;
    // The credentials as OpenFaaS mounts them: one file each, with a trailing newline.
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("basic-auth-user"), format!("{USER}\n")).unwrap();
    std::fs::write(
        secrets.path().join("basic-auth-password"),
        format!("{PASSWORD}\n"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut args = worker_args(&queue.nats.url(), &gateway, &dir.path().join("state"));
    args.extend(
        [
            "--function-annotations",
            "on",
            "--gateway-credentials-dir",
            secrets.path().to_str().unwrap(),
            "--annotations-refresh",
            "300ms",
            "--retry-max-attempts",
            "5",
            "--retry-initial-wait",
            "50ms",
            "--retry-max-wait",
            "100ms",
        ]
        .map(str::to_owned),
    );
    let worker = InProcessWorker::start(&args);
    wait_for("a first function list", || {
        state.lists.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert_eq!(
        state.refused.load(Ordering::SeqCst),
        0,
        "the credentials went with the list requests"
    );

    let calls_of = |name: &str| state.calls.lock().unwrap().get(name).copied().unwrap_or(0);
    let dead = |n: usize| {
        let queue = &queue;
        async move {
            let end = Instant::now() + DEADLINE;
            loop {
                let letters = queue.dead_letters().await;
                if letters.len() >= n {
                    return letters;
                }
                assert!(Instant::now() < end, "{} dead letters", letters.len());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // Annotated: 2 attempts. Not annotated: the worker's 5.
    queue.publish(&call("flaky", None, b"x")).await;
    queue.publish(&call("steady", None, b"x")).await;
    dead(2).await;
    assert_eq!(calls_of("flaky"), 2, "com.openfaas.retry.attempts=2");
    assert_eq!(calls_of("steady"), 5, "no annotation: the worker's default");

    // The annotation changes; after the next refresh it applies.
    state
        .flaky
        .lock()
        .unwrap()
        .insert("com.openfaas.retry.attempts".to_owned(), "3".to_owned());
    let seen = state.lists.load(Ordering::SeqCst);
    wait_for("a refresh", || {
        state.lists.load(Ordering::SeqCst) >= seen + 2
    })
    .await;
    queue.publish(&call("flaky", None, b"x")).await;
    dead(3).await;
    assert_eq!(
        calls_of("flaky"),
        2 + 3,
        "com.openfaas.retry.attempts=3 after the refresh"
    );
    worker.shutdown().await;
}
