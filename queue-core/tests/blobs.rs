//! The blob store contract, written once and run against both implementations:
//! `files_store::*` on a temporary directory, `jetstream_store::*` on a private nats-server.
//! A backend-specific test at the end says why it is specific.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use queue_core::blobs::files::FileBlobs;
use queue_core::blobs::jetstream::{BucketSettings, JetStreamBlobs};
use queue_core::blobs::{
    BlobError, BlobKey, BlobRole, BlobStore, ByteRange, CHUNK_BYTES, PutOptions,
    stored_bytes_by_namespace, sweep,
};
use queue_core::sealing::{Keyring, Sealing};
use test_support::NatsServer;

const DEADLINE: Duration = Duration::from_secs(30);
const MIB: u64 = 1024 * 1024;
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// What a case needs of a backend besides the store.
trait Backend: Sized {
    type Store: BlobStore + Clone;
    fn start() -> impl Future<Output = Self>;
    fn store(&self) -> &Self::Store;
    /// Another handle on the same storage, sealing with `sealing`.
    fn with_sealing(&self, sealing: Sealing) -> impl Future<Output = Self::Store>;
    /// Everything stored, blobs or not (files in the directory, messages in the stream).
    fn residue(&self) -> impl Future<Output = u64>;
    /// The stored bytes of every record of `key`, concatenated.
    fn raw(&self, key: &BlobKey) -> impl Future<Output = Vec<u8>>;
    /// Rewrites the stored whole-blob digest of `key` with another one.
    fn tamper_digest(&self, key: &BlobKey) -> impl Future<Output = ()>;
    /// Leaves what a put interrupted by a crash leaves.
    fn crash_leftover(&self) -> impl Future<Output = ()>;
}

struct Files {
    dir: tempfile::TempDir,
    store: FileBlobs,
}

impl Backend for Files {
    type Store = FileBlobs;

    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = FileBlobs::open(dir.path().join("blobs"), Sealing::off())
            .await
            .unwrap();
        Self { dir, store }
    }

    fn store(&self) -> &FileBlobs {
        &self.store
    }

    async fn with_sealing(&self, sealing: Sealing) -> FileBlobs {
        FileBlobs::open(self.dir.path().join("blobs"), sealing)
            .await
            .unwrap()
    }

    async fn residue(&self) -> u64 {
        std::fs::read_dir(self.store.dir()).unwrap().count() as u64
    }

    async fn raw(&self, key: &BlobKey) -> Vec<u8> {
        std::fs::read(self.store.path_of(key)).unwrap()[queue_core::blobs::files::HEADER_LEN..]
            .to_vec()
    }

    async fn tamper_digest(&self, key: &BlobKey) {
        let path = self.store.path_of(key);
        let mut bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let at = text.find("\"sha256\":\"").unwrap() + 10;
        bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
        std::fs::write(&path, bytes).unwrap();
    }

    async fn crash_leftover(&self) {
        let path = self.store.dir().join(".tmp-0123456789abcdef");
        let file = std::fs::File::create(&path).unwrap();
        std::io::Write::write_all(&mut &file, &[7; 1000]).unwrap();
        file.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
            .unwrap();
    }
}

struct Js {
    _nats: NatsServer,
    js: async_nats::jetstream::Context,
    store: JetStreamBlobs,
}

const SETTINGS: BucketSettings = BucketSettings {
    replicas: 1,
    max_bytes: 0,
};

impl Backend for Js {
    type Store = JetStreamBlobs;

    async fn start() -> Self {
        let nats = NatsServer::start().await.unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let store = JetStreamBlobs::ensure(&js, "calls", SETTINGS, Sealing::off())
            .await
            .unwrap();
        Self {
            _nats: nats,
            js,
            store,
        }
    }

    fn store(&self) -> &JetStreamBlobs {
        &self.store
    }

    async fn with_sealing(&self, sealing: Sealing) -> JetStreamBlobs {
        JetStreamBlobs::open(&self.js, "calls", sealing)
            .await
            .unwrap()
    }

    async fn residue(&self) -> u64 {
        let mut stream = self.js.get_stream(self.store.stream_name()).await.unwrap();
        stream.info().await.unwrap().state.messages
    }

    async fn raw(&self, key: &BlobKey) -> Vec<u8> {
        let store = self.js.get_object_store(self.store.bucket()).await.unwrap();
        let info = store.info(key.as_str()).await.unwrap();
        let stream = self.js.get_stream(self.store.stream_name()).await.unwrap();
        let subject = format!("$O.{}.C.{}", self.store.bucket(), info.nuid);
        let mut out = Vec::new();
        let mut seq = 1;
        while let Ok(message) = stream
            .direct_get_next_for_subject(subject.as_str(), Some(seq))
            .await
        {
            out.extend_from_slice(&message.payload);
            seq = message.sequence + 1;
        }
        out
    }

    async fn tamper_digest(&self, key: &BlobKey) {
        let store = self.js.get_object_store(self.store.bucket()).await.unwrap();
        let mut info = store.info(key.as_str()).await.unwrap();
        let digest = info.metadata.get_mut("faas-sha256").unwrap();
        let first = if digest.starts_with('0') { "1" } else { "0" };
        digest.replace_range(..1, first);
        let subject = format!(
            "$O.{}.M.{}",
            self.store.bucket(),
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE, key.as_str())
        );
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        self.js
            .publish_with_headers(subject, headers, serde_json::to_vec(&info).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn crash_leftover(&self) {
        let subject = format!("$O.{}.C.crashedput0123", self.store.bucket());
        self.js
            .publish(subject, Bytes::from_static(&[7; 1000]))
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

fn key(call_id: &str, role: BlobRole) -> BlobKey {
    BlobKey::for_call(call_id, role).unwrap()
}

/// `len` deterministic pseudo-random bytes in items of `item` bytes, generated as read.
fn body(len: u64, item: usize) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + Unpin {
    futures::stream::unfold(
        (0u64, 0x9e37_79b9_7f4a_7c15u64),
        move |(sent, mut x)| async move {
            if sent >= len {
                return None;
            }
            let n = usize::try_from((len - sent).min(item as u64)).unwrap();
            let mut chunk = Vec::with_capacity(n);
            while chunk.len() < n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.extend_from_slice(&x.to_le_bytes()[..(n - chunk.len()).min(8)]);
            }
            Some((Ok(Bytes::from(chunk)), (sent + n as u64, x)))
        },
    )
    .boxed()
}

async fn collect(body: impl Stream<Item = Result<Bytes, BlobError>> + Unpin) -> Vec<u8> {
    body.map(|item| item.unwrap())
        .fold(Vec::new(), |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            all
        })
        .await
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sealing() -> Sealing {
    Sealing::with_keys(Keyring::parse(&format!("k1 {KEY}"), "keys").unwrap())
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- the cases ----

async fn round_trip_32_mib<B: Backend>(b: B) {
    let store = b.store();
    let k = key("call-32", BlobRole::Request);
    let len = 32 * MIB;
    let put = store
        .put(&k, body(len, 64 * 1024), PutOptions::at_most(64 * MIB))
        .await
        .unwrap();
    assert_eq!(put.len, len);
    assert_eq!(put.key, k);

    let read = store.get(&k, None).await.unwrap();
    assert_eq!(read.info, put);
    assert_eq!(read.range, 0..len);
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    let mut largest = 0;
    let mut items = read.body;
    while let Some(item) = items.next().await {
        let item = item.unwrap();
        largest = largest.max(item.len());
        got += item.len() as u64;
        digest.update(&item);
    }
    assert_eq!(got, len);
    assert!(largest <= CHUNK_BYTES, "a read yields a chunk at a time");
    let read_hex: String = digest
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(read_hex, put.sha256);

    let expected = collect(body(len, 1 << 20).map(|item| Ok(item.unwrap()))).await;
    assert_eq!(sha256_hex(&expected), put.sha256);
}

async fn empty_and_one_byte_blobs<B: Backend>(b: B) {
    let store = b.store();
    for (n, len) in [
        (0, 0u64),
        (1, 1),
        (2, CHUNK_BYTES as u64),
        (3, CHUNK_BYTES as u64 + 1),
    ] {
        let k = key(&format!("small-{n}"), BlobRole::Result);
        let put = store
            .put(&k, body(len, 1000), PutOptions::at_most(MIB))
            .await
            .unwrap();
        assert_eq!(put.len, len);
        let read = store.get(&k, None).await.unwrap();
        let bytes = collect(read.body).await;
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(sha256_hex(&bytes), put.sha256);
    }
}

async fn too_large_leaves_nothing<B: Backend>(b: B) {
    let store = b.store();
    let k = key("big", BlobRole::Request);
    let err = store
        .put(&k, body(3 * MIB, 64 * 1024), PutOptions::at_most(MIB))
        .await
        .unwrap_err();
    assert!(
        matches!(err, BlobError::TooLarge { limit } if limit == MIB),
        "{err}"
    );
    // An announced length above the limit is refused before reading.
    let announced = PutOptions {
        max_bytes: MIB,
        expected_len: Some(MIB + 1),
        namespace: None,
    };
    let err = store
        .put(&k, body(MIB + 1, 64 * 1024), announced)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::TooLarge { .. }), "{err}");
    assert!(store.list().await.unwrap().is_empty());
    assert!(matches!(
        store.get(&k, None).await,
        Err(BlobError::NotFound)
    ));
    eventually("nothing stored", || async { b.residue().await == 0 }).await;
}

async fn interrupted_source_leaves_nothing<B: Backend>(b: B) {
    let store = b.store();
    let k = key("cut", BlobRole::Request);
    let failing = body(MIB, 64 * 1024)
        .map(|item| Ok::<_, String>(item.unwrap()))
        .chain(futures::stream::iter([Err("connection reset".to_owned())]))
        .boxed();
    let err = store
        .put(&k, failing, PutOptions::at_most(4 * MIB))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, BlobError::Interrupted(why) if why.contains("connection reset")),
        "{err}"
    );
    // Ending short of the announced length is an interruption too.
    let short = PutOptions {
        max_bytes: 4 * MIB,
        expected_len: Some(2 * MIB),
        namespace: None,
    };
    let err = store
        .put(&k, body(MIB, 64 * 1024), short)
        .await
        .unwrap_err();
    assert!(matches!(err, BlobError::Interrupted(_)), "{err}");
    assert!(store.list().await.unwrap().is_empty());
    eventually("nothing stored", || async { b.residue().await == 0 }).await;
}

async fn dropped_put_leaves_nothing<B: Backend>(b: B) {
    let store = b.store().clone();
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, Infallible>>(4);
    let k = key("dropped", BlobRole::Request);
    let put = tokio::spawn(async move { store.put(&k, rx, PutOptions::at_most(64 * MIB)).await });
    let mut tx = tx;
    for _ in 0..4 {
        futures::SinkExt::send(&mut tx, Ok(Bytes::from(vec![1u8; CHUNK_BYTES])))
            .await
            .unwrap();
    }
    eventually("the put to store something", || async {
        b.residue().await > 0
    })
    .await;
    // The client went away: the put's task is dropped mid-body.
    put.abort();
    assert!(put.await.unwrap_err().is_cancelled());
    drop(tx);
    eventually("nothing stored", || async { b.residue().await == 0 }).await;
    assert!(b.store().list().await.unwrap().is_empty());
}

async fn range_reads<B: Backend>(b: B) {
    let store = b.store();
    let k = key("ranged", BlobRole::Result);
    // More chunks than the JetStream index stride, and a short last chunk.
    let len = 9 * MIB + 123;
    store
        .put(&k, body(len, 100_000), PutOptions::at_most(16 * MIB))
        .await
        .unwrap();
    let all = collect(body(len, 1 << 20).map(|item| Ok(item.unwrap()))).await;
    let chunk = CHUNK_BYTES as u64;
    let cases = [
        (ByteRange::Inclusive { start: 0, last: 99 }, 0..100),
        (ByteRange::From(0), 0..len),
        (
            ByteRange::Inclusive {
                start: chunk - 10,
                last: chunk + 9,
            },
            chunk - 10..chunk + 10,
        ),
        (
            ByteRange::Inclusive {
                start: 5 * MIB + 7,
                last: 7 * MIB,
            },
            5 * MIB + 7..7 * MIB + 1,
        ),
        (ByteRange::From(len - 1), len - 1..len),
        (ByteRange::Suffix(200), len - 200..len),
        (
            ByteRange::Inclusive {
                start: len - 5,
                last: len + 1000,
            },
            len - 5..len,
        ),
    ];
    for (range, want) in cases {
        let read = store.get(&k, Some(range)).await.unwrap();
        assert_eq!(read.range, want, "{range:?}");
        assert_eq!(read.info.len, len);
        let got = collect(read.body).await;
        let (s, e) = (
            usize::try_from(want.start).unwrap(),
            usize::try_from(want.end).unwrap(),
        );
        assert!(got == all[s..e], "{range:?}: wrong bytes");
    }
    for past in [
        ByteRange::From(len),
        ByteRange::Inclusive {
            start: len + 10,
            last: len + 20,
        },
    ] {
        let err = store.get(&k, Some(past)).await.unwrap_err();
        assert!(
            matches!(err, BlobError::RangeNotSatisfiable { len: l } if l == len),
            "{err}"
        );
    }
}

async fn tampered_digest_fails_at_the_end<B: Backend>(b: B) {
    let store = b.store();
    let k = key("tampered", BlobRole::Result);
    store
        .put(&k, body(MIB, 64 * 1024), PutOptions::at_most(MIB))
        .await
        .unwrap();
    b.tamper_digest(&k).await;
    let read = store.get(&k, None).await.unwrap();
    let items: Vec<_> = read.body.collect().await;
    let (last, before) = items.split_last().unwrap();
    assert!(before.iter().all(Result::is_ok));
    assert_eq!(
        before
            .iter()
            .map(|i| i.as_ref().unwrap().len())
            .sum::<usize>() as u64,
        MIB
    );
    assert!(matches!(last, Err(BlobError::Integrity { .. })), "{last:?}");
}

async fn delete_then_get_is_not_found<B: Backend>(b: B) {
    let store = b.store();
    let k = key("gone", BlobRole::Request);
    store
        .put(&k, body(300_000, 64 * 1024), PutOptions::at_most(MIB))
        .await
        .unwrap();
    store.delete(&k).await.unwrap();
    assert!(matches!(
        store.get(&k, None).await,
        Err(BlobError::NotFound)
    ));
    store.delete(&k).await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
    eventually("nothing stored", || async { b.residue().await == 0 }).await;
}

async fn put_replaces_and_keeps_one_copy<B: Backend>(b: B) {
    let store = b.store();
    let k = key("twice", BlobRole::Result);
    store
        .put(&k, body(MIB, 64 * 1024), PutOptions::at_most(MIB))
        .await
        .unwrap();
    let second = store
        .put(&k, body(1000, 64), PutOptions::at_most(MIB))
        .await
        .unwrap();
    let read = store.get(&k, None).await.unwrap();
    assert_eq!(read.info, second);
    assert_eq!(collect(read.body).await.len(), 1000);
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    store.delete(&k).await.unwrap();
    eventually("nothing stored", || async { b.residue().await == 0 }).await;
}

async fn keys_are_checked<B: Backend>(b: B) {
    // A key is a checked type: whatever reaches a store is one file or object name.
    for bad in [
        "../x.result",
        "a/b.request",
        ".request",
        "x.body",
        "x",
        "x.result/..",
    ] {
        assert!(BlobKey::parse(bad).is_err(), "{bad}");
    }
    let odd = key("../../etc/passwd", BlobRole::Request);
    let store = b.store();
    store
        .put(&odd, body(10, 10), PutOptions::at_most(10))
        .await
        .unwrap();
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key.call_id(), "../../etc/passwd");
    assert_eq!(listed[0].key.role(), BlobRole::Request);
    assert_eq!(
        collect(store.get(&odd, None).await.unwrap().body)
            .await
            .len(),
        10
    );
}

async fn list_and_sweep<B: Backend>(b: B) {
    let store = b.store();
    for (id, len) in [("keep", 10u64), ("orphan", 20), ("also-keep", 30)] {
        store
            .put(
                &key(id, BlobRole::Result),
                body(len, 64),
                PutOptions::at_most(MIB),
            )
            .await
            .unwrap();
    }
    let listed = store.list().await.unwrap();
    let summary: Vec<(String, u64)> = listed
        .iter()
        .map(|e| (e.key.call_id().to_owned(), e.len))
        .collect();
    assert_eq!(
        summary,
        [
            ("also-keep".to_owned(), 30),
            ("keep".to_owned(), 10),
            ("orphan".to_owned(), 20)
        ]
    );
    let now = queue_core::unix_nanos_now();
    assert!(
        listed
            .iter()
            .all(|e| e.created_unix_nanos <= now && e.created_unix_nanos > now - 600_000_000_000)
    );

    b.crash_leftover().await;
    // Young blobs are never swept, whatever the predicate says.
    let report = sweep(store, Duration::from_secs(3600), |_| async { true })
        .await
        .unwrap();
    assert_eq!(report.orphans, 0);
    assert_eq!(store.list().await.unwrap().len(), 3);

    let report = sweep(store, Duration::ZERO, |k: BlobKey| async move {
        k.call_id() == "orphan"
    })
    .await
    .unwrap();
    assert_eq!(report.orphans, 1);
    assert_eq!(report.leftovers, 1);
    let left: Vec<String> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key.call_id().to_owned())
        .collect();
    assert_eq!(left, ["also-keep", "keep"]);
    for id in ["keep", "also-keep"] {
        store.delete(&key(id, BlobRole::Result)).await.unwrap();
    }
    eventually("nothing stored", || async { b.residue().await == 0 }).await;
}

/// The namespace a put names is listed with the blob (sealed or not), summed per namespace,
/// replaced with the blob, and a namespace that could not be stored is refused before
/// anything is.
async fn namespaces_are_listed_and_summed<B: Backend>(b: B) {
    let sealed = b.with_sealing(sealing()).await;
    for (store, id, len, ns) in [
        (b.store(), "a1", 300_000u64, Some("team-a")),
        (b.store(), "a2", 5, Some("Team-A")),
        (&sealed, "b1", 7, Some("team-b")),
        (b.store(), "none", 11, None),
    ] {
        let mut options = PutOptions::at_most(MIB);
        options.namespace = ns.map(str::to_owned);
        store
            .put(&key(id, BlobRole::Result), body(len, 4096), options)
            .await
            .unwrap();
    }
    let listed = b.store().list().await.unwrap();
    let owners: Vec<(&str, Option<&str>)> = listed
        .iter()
        .map(|e| (e.key.call_id(), e.namespace.as_deref()))
        .collect();
    assert_eq!(
        owners,
        [
            ("a1", Some("team-a")),
            ("a2", Some("Team-A")),
            ("b1", Some("team-b")),
            ("none", None)
        ]
    );
    let sums = stored_bytes_by_namespace(&listed);
    assert_eq!(sums.len(), 2, "{sums:?}");
    assert_eq!(sums["team-a"], 300_005);
    assert_eq!(sums["team-b"], 7);

    // A put over a blob carries its own owner.
    b.store()
        .put(
            &key("a1", BlobRole::Result),
            body(3, 64),
            PutOptions::at_most(MIB).in_namespace("team-c"),
        )
        .await
        .unwrap();
    let sums = stored_bytes_by_namespace(&b.store().list().await.unwrap());
    assert_eq!(sums["team-a"], 5);
    assert_eq!(sums["team-c"], 3);

    for bad in ["", "a.b", "../x", "ns with space", &"n".repeat(64)] {
        let err = b
            .store()
            .put(
                &key("bad", BlobRole::Request),
                body(10, 64),
                PutOptions::at_most(MIB).in_namespace(bad),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Backend(_)), "{bad:?}: {err}");
    }
    assert_eq!(
        b.store().list().await.unwrap().len(),
        4,
        "nothing more stored"
    );
    for id in ["a1", "a2", "b1", "none"] {
        b.store().delete(&key(id, BlobRole::Result)).await.unwrap();
    }
    eventually("nothing stored", || async { b.residue().await == 0 }).await;
}

async fn sealed_blobs_hold_no_plaintext<B: Backend>(b: B) {
    let sealed = b.with_sealing(sealing()).await;
    let k = key("secret", BlobRole::Request);
    let marker = b"SECRET-MARKER-0123456789";
    let mut plain = Vec::new();
    while plain.len() < 3 * CHUNK_BYTES {
        plain.extend_from_slice(marker);
    }
    let items = plain
        .chunks(10_000)
        .map(|c| Ok::<_, Infallible>(Bytes::copy_from_slice(c)))
        .collect::<Vec<_>>();
    let put = sealed
        .put(&k, futures::stream::iter(items), PutOptions::at_most(MIB))
        .await
        .unwrap();
    assert_eq!(put.sha256, sha256_hex(&plain));
    let raw = b.raw(&k).await;
    assert!(raw.len() > plain.len());
    assert!(!raw.windows(marker.len()).any(|w| w == marker));
    assert!(!String::from_utf8_lossy(&raw).contains(&put.sha256));

    let read = sealed.get(&k, None).await.unwrap();
    assert_eq!(read.info.sha256, put.sha256);
    assert!(collect(read.body).await == plain);
    let range = ByteRange::Inclusive {
        start: CHUNK_BYTES as u64 - 3,
        last: CHUNK_BYTES as u64 + 3,
    };
    let read = sealed.get(&k, Some(range)).await.unwrap();
    let s = CHUNK_BYTES - 3;
    assert!(collect(read.body).await == plain[s..s + 7]);

    // Without the keys it does not open; with them, a blob stored in clear still reads.
    let err = b.store().get(&k, None).await.unwrap_err();
    assert!(matches!(err, BlobError::Undecryptable { .. }), "{err}");
    let clear = key("clear", BlobRole::Request);
    b.store()
        .put(&clear, body(5000, 100), PutOptions::at_most(MIB))
        .await
        .unwrap();
    assert_eq!(
        collect(sealed.get(&clear, None).await.unwrap().body)
            .await
            .len(),
        5000
    );
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod files_store {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(<super::Files as super::Backend>::start().await).await;
                }
            )*
        }
        mod jetstream_store {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(<super::Js as super::Backend>::start().await).await;
                }
            )*
        }
    };
}

cases!(
    round_trip_32_mib,
    empty_and_one_byte_blobs,
    too_large_leaves_nothing,
    interrupted_source_leaves_nothing,
    dropped_put_leaves_nothing,
    range_reads,
    tampered_digest_fails_at_the_end,
    delete_then_get_is_not_found,
    put_replaces_and_keeps_one_copy,
    keys_are_checked,
    list_and_sweep,
    namespaces_are_listed_and_summed,
    sealed_blobs_hold_no_plaintext,
);

// ---- specific to the files store: only there can a stored byte be flipped in place ----

#[tokio::test]
async fn corrupted_file_is_an_integrity_error() {
    let b = Files::start().await;
    let store = b.store();
    let k = key("rotten", BlobRole::Result);
    store
        .put(&k, body(MIB, 64 * 1024), PutOptions::at_most(MIB))
        .await
        .unwrap();
    let path = store.path_of(&k);
    let mut bytes = std::fs::read(&path).unwrap();
    // A byte in the second chunk.
    let at = queue_core::blobs::files::HEADER_LEN + CHUNK_BYTES + 32 + 1000;
    bytes[at] ^= 0x55;
    std::fs::write(&path, &bytes).unwrap();

    let items: Vec<_> = store.get(&k, None).await.unwrap().body.collect().await;
    assert_eq!(items.len(), 2, "the first chunk, then the error");
    assert_eq!(items[0].as_ref().unwrap().len(), CHUNK_BYTES);
    assert!(matches!(items[1], Err(BlobError::Integrity { .. })));

    // A range read checks the chunks it touches.
    let range = ByteRange::Inclusive {
        start: CHUNK_BYTES as u64 + 5,
        last: CHUNK_BYTES as u64 + 10,
    };
    let items: Vec<_> = store
        .get(&k, Some(range))
        .await
        .unwrap()
        .body
        .collect()
        .await;
    assert!(matches!(
        items.as_slice(),
        [Err(BlobError::Integrity { .. })]
    ));
    // One that does not touch it reads.
    let clean = ByteRange::Inclusive { start: 0, last: 9 };
    assert_eq!(
        collect(store.get(&k, Some(clean)).await.unwrap().body)
            .await
            .len(),
        10
    );

    // A truncated file is refused before anything is read.
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    assert!(matches!(
        store.get(&k, None).await,
        Err(BlobError::Integrity { .. })
    ));
}

// ---- specific to JetStream: a record is a message, which can be removed alone ----

#[tokio::test]
async fn a_missing_chunk_message_is_an_integrity_error() {
    let b = Js::start().await;
    let store = b.store();
    let k = key("holed", BlobRole::Result);
    store
        .put(&k, body(MIB, 64 * 1024), PutOptions::at_most(MIB))
        .await
        .unwrap();
    let object = b.js.get_object_store(store.bucket()).await.unwrap();
    let info = object.info(k.as_str()).await.unwrap();
    let stream = b.js.get_stream(store.stream_name()).await.unwrap();
    let subject = format!("$O.{}.C.{}", store.bucket(), info.nuid);
    let first = stream
        .direct_get_next_for_subject(subject.as_str(), None)
        .await
        .unwrap();
    let second = stream
        .direct_get_next_for_subject(subject.as_str(), Some(first.sequence + 1))
        .await
        .unwrap();
    stream.delete_message(second.sequence).await.unwrap();

    // The third record now comes second: its digest is bound to its index.
    let items: Vec<_> = store.get(&k, None).await.unwrap().body.collect().await;
    assert_eq!(items.len(), 2, "the first chunk, then the error");
    assert!(
        matches!(items[1], Err(BlobError::Integrity { .. })),
        "{:?}",
        items[1]
    );

    // The last one gone: missing.
    let last = stream
        .direct_get_last_for_subject(subject.as_str())
        .await
        .unwrap();
    stream.delete_message(last.sequence).await.unwrap();
    let tail = ByteRange::Suffix(10);
    let items: Vec<_> = store
        .get(&k, Some(tail))
        .await
        .unwrap()
        .body
        .collect()
        .await;
    assert!(
        matches!(items.as_slice(), [Err(BlobError::Integrity { .. })]),
        "{items:?}"
    );
}
