//! Results kept by reference (issue 16), on JetStream: `GET /async-calls/{id}/result` streams a
//! result whose body is in the blob store with `Content-Length` and `Accept-Ranges`, answers a
//! single `Range` with `206` (an unsatisfiable one `416`, a malformed one the whole body), does
//! the same for an inline result, and refuses a body that is gone (`404`) or is not the one the
//! record names (`500`).
//!
//! The records are written as a worker writes them (`apply_event` with the encoded result,
//! through the queue's public record API) and the blob is put into the gateway's own bucket:
//! workers do not write results by reference yet, and the route under test only reads.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use common::{DEADLINE, Gateway, assert_json_error, blobs, http};
use queue_core::backend::apply_event;
use queue_core::backend::jetstream::{JetStreamOptions, JetStreamQueue};
use queue_core::blobs::jetstream::JetStreamBlobs;
use queue_core::blobs::{BlobKey, BlobRef, BlobRole, BlobStore, PutOptions};
use queue_core::records::{CallState, Event, ResultAvailability, StoredResult};
use queue_core::sealing::Sealing;
use test_support::NatsServer;
use test_support::payload::pattern;

const MIB: usize = 1024 * 1024;
/// A few chunks of the store (128 KiB each) and a short last one.
const LEN: usize = 3 * MIB + 12_345;

/// The queue as a worker opens it (streams and records bucket as the gateway made them).
async fn queue(nats_url: &str) -> Arc<JetStreamQueue> {
    let config =
        gateway_plugin::GatewayConfig::try_parse_from(["gateway-plugin", "--nats-url", nats_url])
            .unwrap();
    JetStreamQueue::connect(
        JetStreamOptions {
            nats: config.nats.clone(),
            manage_streams: None,
            consumer: None,
            records: config.records.clone(),
            sealing: Sealing::off(),
        },
        "large-results-test",
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap()
}

/// Records `call_id` as succeeded with `body` kept inline, or with its body at `stored`.
async fn keep_result(queue: &JetStreamQueue, call_id: &str, body: &[u8], stored: Option<&BlobRef>) {
    let now = queue_core::unix_nanos_now();
    let events = [
        Event::Accepted {
            function: "echo".into(),
            at: now,
            has_callback: false,
            not_before: None,
        },
        Event::AttemptStarted {
            function: "echo".into(),
            attempt: 1,
            at: now,
            accepted_at: now,
            limits: None,
        },
        Event::AttemptEnded {
            attempt: 1,
            status: 201,
            duration_ms: 1,
            error: None,
            next: CallState::Succeeded,
            result: Some(ResultAvailability::Stored),
        },
    ];
    let headers = vec![
        ("content-type".to_owned(), "text/html".to_owned()),
        ("x-custom".to_owned(), "kept".to_owned()),
        ("set-cookie".to_owned(), "session=1".to_owned()),
        ("content-range".to_owned(), "bytes 0-0/1".to_owned()),
    ];
    let encoded = StoredResult::encode_parts(201, &headers, body, stored).unwrap();
    let owned = apply_event(queue, call_id, None, &events, Some(Bytes::from(encoded)))
        .await
        .unwrap();
    assert_eq!(owned.record.state, CallState::Succeeded);
}

/// Puts `body` as `call_id`'s result blob; its reference.
async fn put_result_blob(store: &JetStreamBlobs, call_id: &str, body: &[u8]) -> BlobRef {
    let key = BlobKey::for_call(call_id, BlobRole::Result).unwrap();
    let chunks: Vec<Result<Bytes, std::io::Error>> = body
        .chunks(100_000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let info = store
        .put(
            &key,
            futures::stream::iter(chunks),
            PutOptions::at_most(body.len() as u64),
        )
        .await
        .unwrap();
    BlobRef::from(info)
}

async fn get(url: &str, range: Option<&str>) -> reqwest::Response {
    let mut request = http().get(url);
    if let Some(range) = range {
        request = request.header("range", range);
    }
    request.send().await.unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap_or("<not text>"))
}

/// The headers every result answer carries, inline or stored, whole or partial.
fn assert_served_as_data(response: &reqwest::Response, call_id: &str) {
    assert_eq!(
        header(response, "content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(
        header(response, "x-function-content-type"),
        Some("text/html")
    );
    assert_eq!(header(response, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(response, "content-disposition"), Some("attachment"));
    assert_eq!(
        header(response, "content-security-policy"),
        Some("sandbox; default-src 'none'; frame-ancestors 'none'")
    );
    assert_eq!(header(response, "x-function-status"), Some("201"));
    assert_eq!(header(response, "x-call-id"), Some(call_id));
    assert_eq!(header(response, "x-custom"), Some("kept"));
    assert_eq!(header(response, "set-cookie"), None);
    assert_eq!(header(response, "accept-ranges"), Some("bytes"));
}

/// A ranged answer: `206`, its `Content-Range` and `Content-Length`, exactly those bytes.
async fn assert_partial(
    response: reqwest::Response,
    call_id: &str,
    whole: &[u8],
    start: usize,
    end: usize,
) {
    assert_eq!(response.status(), 206, "{:?}", response.headers());
    assert_served_as_data(&response, call_id);
    assert_eq!(
        header(&response, "content-range"),
        Some(format!("bytes {start}-{}/{}", end - 1, whole.len()).as_str())
    );
    assert_eq!(response.content_length(), Some((end - start) as u64));
    let got = response.bytes().await.unwrap();
    assert!(got[..] == whole[start..end], "bytes {start}..{end} differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_in_the_blob_store_is_streamed_whole_or_by_range() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let queue = queue(&nats.url()).await;
    let store = blobs(&nats.url()).await;
    let result_url = |id: &str| format!("{}/async-calls/{id}/result", gateway.url);

    let body = pattern(LEN, 1);
    let id = "large-result";
    let blob = put_result_blob(&store, id, &body).await;
    assert_eq!(blob.len, LEN as u64);
    keep_result(&queue, id, &[], Some(&blob)).await;
    let url = result_url(id);

    // Whole.
    let whole = get(&url, None).await;
    assert_eq!(whole.status(), 200);
    assert_served_as_data(&whole, id);
    assert_eq!(header(&whole, "content-range"), None);
    assert_eq!(whole.content_length(), Some(LEN as u64));
    let got = whole.bytes().await.unwrap();
    assert_eq!(got.len(), LEN);
    assert!(got[..] == body[..], "the streamed body differs");

    // Ranges: inside one chunk, across a chunk boundary, a suffix, to the end.
    assert_partial(get(&url, Some("bytes=100-199")).await, id, &body, 100, 200).await;
    let boundary = 128 * 1024;
    assert_partial(
        get(
            &url,
            Some(&format!("bytes={}-{}", boundary - 7, 2 * boundary + 6)),
        )
        .await,
        id,
        &body,
        boundary - 7,
        2 * boundary + 7,
    )
    .await;
    assert_partial(get(&url, Some("bytes=-10")).await, id, &body, LEN - 10, LEN).await;
    assert_partial(
        get(&url, Some("bytes=3000000-")).await,
        id,
        &body,
        3_000_000,
        LEN,
    )
    .await;
    // A last byte past the end means the end.
    assert_partial(
        get(&url, Some(&format!("bytes={}-99999999", LEN - 3))).await,
        id,
        &body,
        LEN - 3,
        LEN,
    )
    .await;

    // Unsatisfiable: 416 with the length, a JSON error.
    for unsatisfiable in [
        "bytes=5000000-",
        "bytes=-0",
        &format!("bytes={LEN}-{}", LEN + 5),
    ] {
        let refused = get(&url, Some(unsatisfiable)).await;
        assert_eq!(
            header(&refused, "content-range"),
            Some(format!("bytes */{LEN}").as_str()),
            "{unsatisfiable}"
        );
        assert_eq!(header(&refused, "x-call-id"), Some(id));
        assert_json_error(refused, 416, "range_not_satisfiable").await;
    }

    // Malformed, several ranges, or conditional: ignored, the whole body.
    for ignored in [
        "bytes=1-2,5-6",
        "bytes=9-3",
        "bytes=abc",
        "items=0-9",
        "bytes=-",
    ] {
        let response = get(&url, Some(ignored)).await;
        assert_eq!(response.status(), 200, "{ignored}");
        assert_eq!(response.content_length(), Some(LEN as u64), "{ignored}");
        let got = response.bytes().await.unwrap();
        assert!(got[..] == body[..], "{ignored}: the body differs");
    }
    let conditional = http()
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", "\"some-etag\"")
        .send()
        .await
        .unwrap();
    assert_eq!(conditional.status(), 200);
    assert_eq!(conditional.content_length(), Some(LEN as u64));
    drop(conditional);

    // HEAD: the same headers, no body.
    let head = http().head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        header(&head, "content-length"),
        Some(LEN.to_string().as_str())
    );
    assert_eq!(header(&head, "accept-ranges"), Some("bytes"));
    assert!(head.bytes().await.unwrap().is_empty());

    // The record's JSON is unchanged by where the body is.
    let record = http()
        .get(format!("{}/async-calls/{id}", gateway.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(record["result"], "stored");

    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_inline_result_answers_the_same_ranges() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let queue = queue(&nats.url()).await;
    let body = pattern(1000, 2);
    let id = "inline-result";
    keep_result(&queue, id, &body, None).await;
    let url = format!("{}/async-calls/{id}/result", gateway.url);

    let whole = get(&url, None).await;
    assert_eq!(whole.status(), 200);
    assert_served_as_data(&whole, id);
    assert_eq!(header(&whole, "content-range"), None);
    assert_eq!(whole.content_length(), Some(1000));
    assert!(whole.bytes().await.unwrap()[..] == body[..]);

    assert_partial(get(&url, Some("bytes=100-199")).await, id, &body, 100, 200).await;
    assert_partial(get(&url, Some("bytes=-10")).await, id, &body, 990, 1000).await;
    assert_partial(get(&url, Some("bytes=999-")).await, id, &body, 999, 1000).await;
    let refused = get(&url, Some("bytes=5000000-")).await;
    assert_eq!(header(&refused, "content-range"), Some("bytes */1000"));
    assert_json_error(refused, 416, "range_not_satisfiable").await;
    let ignored = get(&url, Some("bytes=0-1,3-4")).await;
    assert_eq!(ignored.status(), 200);
    assert!(ignored.bytes().await.unwrap()[..] == body[..]);

    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stored_body_that_is_gone_or_not_the_one_named_is_refused() {
    let nats = NatsServer::start().await.unwrap();
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let queue = queue(&nats.url()).await;
    let store = blobs(&nats.url()).await;
    let result_url = |id: &str| format!("{}/async-calls/{id}/result", gateway.url);

    // The blob was deleted (swept, or its call purged): the result is no longer kept.
    let gone = "deleted-blob";
    let blob = put_result_blob(&store, gone, &pattern(200_000, 3)).await;
    keep_result(&queue, gone, &[], Some(&blob)).await;
    assert_eq!(get(&result_url(gone), None).await.status(), 200);
    store
        .delete(&BlobKey::for_call(gone, BlobRole::Result).unwrap())
        .await
        .unwrap();
    for range in [None, Some("bytes=0-9")] {
        let response = get(&result_url(gone), range).await;
        assert_eq!(header(&response, "x-call-id"), Some(gone));
        assert_json_error(response, 404, "result_expired").await;
    }

    // The record names another digest, or another length, than the stored blob has.
    let body = pattern(300_000, 4);
    let digest = "digest-differs";
    let mut wrong = put_result_blob(&store, digest, &body).await;
    wrong.sha256 = "00".repeat(32);
    keep_result(&queue, digest, &[], Some(&wrong)).await;
    let length = "length-differs";
    let mut short = put_result_blob(&store, length, &body).await;
    short.len -= 1;
    keep_result(&queue, length, &[], Some(&short)).await;
    for id in [digest, length] {
        for range in [None, Some("bytes=0-9"), Some("bytes=299999-")] {
            assert_json_error(get(&result_url(id), range).await, 500, "result_unreadable").await;
        }
    }

    // A reference that is no blob key at all.
    let bad_key = "bad-key";
    let mut bad = put_result_blob(&store, bad_key, &body).await;
    bad.key = "../../etc/passwd".into();
    keep_result(&queue, bad_key, &[], Some(&bad)).await;
    assert_json_error(
        get(&result_url(bad_key), None).await,
        500,
        "result_unreadable",
    )
    .await;

    gateway.shutdown().await;

    // A gateway without a blob store (served on the same records) cannot serve a stored body.
    let config = gateway_plugin::GatewayConfig::try_parse_from([
        "gateway-plugin",
        "--nats-url",
        &nats.url(),
    ])
    .unwrap();
    let settings = config.http_settings();
    assert!(settings.blobs.is_none());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(gateway_plugin::serve(
        queue.clone(),
        settings,
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let kept = "kept-without-store";
    let blob = put_result_blob(&store, kept, &body).await;
    keep_result(&queue, kept, &[], Some(&blob)).await;
    let response = get(&format!("{url}/async-calls/{kept}/result"), None).await;
    assert_json_error(response, 500, "result_unreadable").await;
    // An inline result is still served there.
    keep_result(&queue, "inline-without-store", b"small", None).await;
    let response = get(
        &format!("{url}/async-calls/inline-without-store/result"),
        Some("bytes=1-2"),
    )
    .await;
    assert_eq!(response.status(), 206);
    assert_eq!(response.bytes().await.unwrap().as_ref(), b"ma");
    drop(stop);
    tokio::time::timeout(DEADLINE, served)
        .await
        .expect("the second gateway did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_stored_body_without_its_key_is_undecryptable_not_an_outage() {
    let nats = NatsServer::start().await.unwrap();
    // The gateway has no keys; the body was sealed by a worker that has one.
    let gateway = Gateway::start(&nats.url(), &[]).await;
    let queue = queue(&nats.url()).await;
    blobs(&nats.url()).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let keys = queue_core::sealing::Keyring::parse(
        "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "test keys",
    )
    .unwrap();
    let sealed = JetStreamBlobs::open(&js, "faas-async", Sealing::with_keys(keys))
        .await
        .unwrap();
    let id = "sealed-body";
    let blob = put_result_blob(&sealed, id, &pattern(200_000, 5)).await;
    keep_result(&queue, id, &[], Some(&blob)).await;
    let url = format!("{}/async-calls/{id}/result", gateway.url);
    for range in [None, Some("bytes=0-9")] {
        assert_json_error(get(&url, range).await, 500, "result_undecryptable").await;
    }
    gateway.shutdown().await;
}
