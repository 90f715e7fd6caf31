//! Memory does not grow with a blob's size: a 64 MiB put and read, through both stores, keep
//! the process's peak heap within a few MiB of where it was. One test in its own binary, so
//! no other test allocates meanwhile (the allocator counts the whole process).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::convert::Infallible;

use bytes::Bytes;
use futures::StreamExt;
use queue_core::blobs::files::FileBlobs;
use queue_core::blobs::jetstream::{BucketSettings, JetStreamBlobs};
use queue_core::blobs::{BlobKey, BlobRole, BlobStore, PutOptions};
use queue_core::sealing::Sealing;
use test_support::NatsServer;

#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

const MIB: usize = 1024 * 1024;
const BLOB: usize = 64 * MIB;
/// Peak heap growth allowed during a transfer of `BLOB` bytes.
const ALLOWED: usize = 8 * MIB;

/// `BLOB` bytes in 64 KiB items, one shared buffer (so the source itself holds 64 KiB).
fn source() -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + Unpin {
    let item = Bytes::from(vec![0xa5u8; 64 * 1024]);
    futures::stream::iter((0..BLOB / item.len()).map(move |_| Ok(item.clone())))
}

async fn transfer<B: BlobStore>(store: &B, what: &str) {
    let key = BlobKey::for_call(&format!("memory-{what}"), BlobRole::Result).unwrap();
    // Warm up: connections, buffers and lazily built state, so only the transfer is measured.
    store
        .put(&key, source().take(4), PutOptions::at_most(u64::MAX))
        .await
        .unwrap();
    let mut warm = store.get(&key, None).await.unwrap().body;
    while warm.next().await.is_some() {}

    let before = ALLOCATOR.allocated();
    let info = store
        .put(&key, source(), PutOptions::at_most(u64::MAX))
        .await
        .unwrap();
    assert_eq!(info.len, BLOB as u64);
    let mut body = store.get(&key, None).await.unwrap().body;
    let mut read = 0;
    while let Some(item) = body.next().await {
        read += item.unwrap().len();
    }
    assert_eq!(read, BLOB);
    let grown = ALLOCATOR.max_allocated().saturating_sub(before);
    assert!(
        grown < ALLOWED,
        "{what}: the heap peaked {grown} bytes above its level before a {BLOB}-byte transfer"
    );
    store.delete(&key).await.unwrap();
}

#[tokio::test]
async fn a_large_blob_is_streamed_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let files = FileBlobs::open(dir.path(), Sealing::off()).await.unwrap();
    // The peak so far (setup) must not hide the transfer's: measured from here.
    let nats = NatsServer::start().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let settings = BucketSettings {
        replicas: 1,
        max_bytes: 0,
    };
    let jetstream = JetStreamBlobs::ensure(&js, "memory", settings, Sealing::off())
        .await
        .unwrap();
    assert!(
        ALLOCATOR.max_allocated() < ALLOCATOR.allocated() + ALLOWED,
        "setup peaked too high to measure anything"
    );
    transfer(&files, "files").await;
    transfer(&jetstream, "jetstream").await;
}
