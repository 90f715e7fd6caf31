//! The JetStream blob store: an object-store bucket (`<stream>-blobs`, stream
//! `OBJ_<bucket>`, file storage).
//!
//! The bucket's layout is the object store's: records on `$O.<bucket>.C.<nuid>`, one message
//! each, and the object's info (JSON, rolled up) on `$O.<bucket>.M.<base64 of the key>`, so
//! `nats object ls` shows the blobs. The put is this module's own (not the client's), so that
//! it knows the chunk subject it writes and can purge it when the put fails or is dropped,
//! keeps a few chunk acks in flight ([`PUBLISH_WINDOW`]) and notes the sequence of every
//! [`INDEX_STRIDE`]-th chunk for range reads. The object's metadata holds the layout
//! (`faas-*` entries); its `size` is the stored bytes, `faas-len` the plaintext length.
//!
//! Reads are direct gets, one record at a time (`next message on the chunk subject from
//! sequence s`): nothing is pushed ahead of the reader, so a slow reader holds one record.
//! A range read starts at the nearest indexed chunk before it and skips at most
//! `INDEX_STRIDE - 1` records.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::object_store::{self, ObjectInfo, ObjectOptions, ObjectStore};
use async_nats::jetstream::stream::{DirectGetErrorKind, StorageType, Stream as JsStream};
use base64::Engine as _;
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};

use super::{
    BlobEntry, BlobError, BlobInfo, BlobKey, BlobRead, BlobStore, ByteRange, Chunker, Codec,
    Encoding, Layout, PutOptions, RecordSource, read_stream, to_hex,
};
use crate::sealing::Sealing;

/// Every this many chunks, the put notes the chunk's stream sequence.
pub const INDEX_STRIDE: u64 = 32;
/// Chunk publishes awaiting their ack at once during a put.
pub const PUBLISH_WINDOW: usize = 4;

const META_ENCODING: &str = "faas-encoding";
const META_CHUNK: &str = "faas-chunk";
const META_OVERHEAD: &str = "faas-overhead";
const META_LEN: &str = "faas-len";
const META_SHA256: &str = "faas-sha256";
const META_CREATED: &str = "faas-created";
const META_INDEX: &str = "faas-index";
const META_NAMESPACE: &str = "faas-namespace";

/// The bucket of the calls stream `stream`.
pub fn bucket_name(stream: &str) -> String {
    format!("{stream}-blobs")
}

/// Blobs in a JetStream object-store bucket.
#[derive(Clone)]
pub struct JetStreamBlobs {
    js: Context,
    store: ObjectStore,
    stream: JsStream,
    bucket: String,
    sealing: Sealing,
}

impl std::fmt::Debug for JetStreamBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamBlobs")
            .field("bucket", &self.bucket)
            .field("sealing", &self.sealing)
            .finish_non_exhaustive()
    }
}

/// The bucket's settings: follow the calls stream's replicas; `max_bytes` 0 is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSettings {
    /// Replicas (the calls stream's `--stream-replicas`).
    pub replicas: usize,
    /// Most bytes the bucket may hold (records and infos); a put beyond fails. 0 = no limit.
    pub max_bytes: u64,
}

impl BucketSettings {
    /// The calls stream's replicas, at most `max_bytes` (0 = no limit).
    pub fn following(stream: &crate::settings::StreamArgs, max_bytes: u64) -> Self {
        Self {
            replicas: stream.stream_replicas,
            max_bytes,
        }
    }
}

impl JetStreamBlobs {
    /// The bucket of the calls stream `stream`, created when missing (the gateway's upkeep).
    pub async fn ensure(
        js: &Context,
        stream: &str,
        settings: BucketSettings,
        sealing: Sealing,
    ) -> Result<Self, BlobError> {
        let bucket = bucket_name(stream);
        if let Ok(blobs) = Self::open_bucket(js, &bucket, sealing.clone()).await {
            return Ok(blobs);
        }
        let config = object_store::Config {
            bucket: bucket.clone(),
            description: Some(format!("large bodies and results of the calls in {stream}")),
            max_bytes: if settings.max_bytes == 0 {
                -1
            } else {
                i64::try_from(settings.max_bytes).unwrap_or(i64::MAX)
            },
            storage: StorageType::File,
            num_replicas: settings.replicas.max(1),
            ..Default::default()
        };
        match js.create_object_store(config).await {
            Ok(_) => Self::open_bucket(js, &bucket, sealing).await,
            // Another gateway may have created it meanwhile.
            Err(err) => Self::open_bucket(js, &bucket, sealing)
                .await
                .map_err(|_| BlobError::Backend(format!("cannot create bucket {bucket}: {err}"))),
        }
    }

    /// The existing bucket of the calls stream `stream` (the worker's side).
    pub async fn open(js: &Context, stream: &str, sealing: Sealing) -> Result<Self, BlobError> {
        Self::open_bucket(js, &bucket_name(stream), sealing).await
    }

    async fn open_bucket(js: &Context, bucket: &str, sealing: Sealing) -> Result<Self, BlobError> {
        let store = js
            .get_object_store(bucket)
            .await
            .map_err(|err| BlobError::Unavailable(format!("bucket {bucket}: {err}")))?;
        let stream = js
            .get_stream(format!("OBJ_{bucket}"))
            .await
            .map_err(|err| BlobError::Unavailable(format!("bucket {bucket}: {err}")))?;
        Ok(Self {
            js: js.clone(),
            store,
            stream,
            bucket: bucket.to_owned(),
            sealing,
        })
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The stream holding the bucket (for tests and operators).
    pub fn stream_name(&self) -> String {
        format!("OBJ_{}", self.bucket)
    }

    fn chunk_subject(&self, nuid: &str) -> String {
        format!("$O.{}.C.{nuid}", self.bucket)
    }

    fn meta_subject(&self, key: &BlobKey) -> String {
        format!(
            "$O.{}.M.{}",
            self.bucket,
            base64::engine::general_purpose::URL_SAFE.encode(key.as_str())
        )
    }

    /// The live object `key`, or `None`.
    async fn info(&self, key: &BlobKey) -> Result<Option<ObjectInfo>, BlobError> {
        match self.store.info(key.as_str()).await {
            Ok(info) if info.deleted => Ok(None),
            Ok(info) => Ok(Some(info)),
            Err(err) if err.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Err(err) if err.kind() == object_store::InfoErrorKind::TimedOut => {
                Err(BlobError::Unavailable(format!("blob info: {err}")))
            }
            Err(err) => Err(BlobError::Backend(format!("blob info: {err}"))),
        }
    }

    async fn purge_subject(&self, subject: &str) -> Result<(), BlobError> {
        self.stream
            .purge()
            .filter(subject)
            .await
            .map(|_| ())
            .map_err(|err| BlobError::Unavailable(format!("purge: {err}")))
    }

    /// The nuids of every object the bucket holds (deleted ones excluded).
    async fn live_nuids(&self) -> Result<HashSet<String>, BlobError> {
        let list = self
            .store
            .list()
            .await
            .map_err(|err| BlobError::Unavailable(format!("list blobs: {err}")))?;
        list.map_ok(|info| info.nuid)
            .try_collect()
            .await
            .map_err(|err| BlobError::Unavailable(format!("list blobs: {err}")))
    }
}

fn publish_error(err: &async_nats::jetstream::context::PublishError) -> BlobError {
    match err.kind() {
        PublishErrorKind::TimedOut
        | PublishErrorKind::BrokenPipe
        | PublishErrorKind::MaxAckPending => BlobError::Unavailable(format!("publish: {err}")),
        _ => BlobError::Backend(format!("publish: {err}")),
    }
}

/// Purges a failed (or dropped) put's chunks unless disarmed. It owns the chunk publishes
/// still awaiting their ack: a purge is handled apart from the stream's ingest, so it could
/// run before chunks already sent are stored; the acks are awaited first.
struct PurgeGuard {
    stream: JsStream,
    subject: Option<String>,
    pending: VecDeque<(u64, PublishAckFuture)>,
}

impl PurgeGuard {
    async fn purge_now(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if let Some(subject) = self.subject.take() {
            purge_after(self.stream.clone(), subject, pending).await;
        }
    }
}

async fn purge_after(
    stream: JsStream,
    subject: String,
    pending: VecDeque<(u64, PublishAckFuture)>,
) {
    for (_, ack) in pending {
        // Stored or not, the purge comes after.
        let _ = ack.await;
    }
    // A failed purge leaves chunks for remove_leftovers.
    let _ = stream.purge().filter(subject).await;
}

impl Drop for PurgeGuard {
    fn drop(&mut self) {
        let Some(subject) = self.subject.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pending = std::mem::take(&mut self.pending);
            runtime.spawn(purge_after(self.stream.clone(), subject, pending));
        }
    }
}

fn layout_of(info: &ObjectInfo) -> Option<(Layout, Vec<u64>, u64)> {
    let meta = &info.metadata;
    let number = |name: &str| meta.get(name)?.parse::<u64>().ok();
    let layout = Layout {
        encoding: Encoding::parse(meta.get(META_ENCODING)?)?,
        chunk: number(META_CHUNK)?,
        overhead: number(META_OVERHEAD)?,
        len: number(META_LEN)?,
    };
    let index = meta
        .get(META_INDEX)?
        .split(',')
        .map(|seq| seq.parse::<u64>().ok())
        .collect::<Option<Vec<u64>>>()?;
    let created = number(META_CREATED).unwrap_or(0);
    let indexed = layout.chunks().div_ceil(INDEX_STRIDE);
    (layout.valid() && index.len() as u64 == indexed).then_some((layout, index, created))
}

struct JsRecords {
    stream: JsStream,
    subject: String,
    /// The sequence to look from for the next record.
    next_seq: u64,
    /// The chunk index of the next record on the subject.
    at: u64,
    codec: Codec,
}

impl JsRecords {
    async fn next_message(&mut self) -> Result<Bytes, BlobError> {
        match self
            .stream
            .direct_get_next_for_subject(self.subject.as_str(), Some(self.next_seq))
            .await
        {
            Ok(message) => {
                self.next_seq = message.sequence + 1;
                self.at += 1;
                Ok(message.payload)
            }
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => Err(self
                .codec
                .integrity(format!("chunk {} is missing", self.at))),
            Err(err) if err.kind() == DirectGetErrorKind::TimedOut => {
                Err(BlobError::Unavailable(format!("read blob: {err}")))
            }
            Err(err) => Err(BlobError::Backend(format!("read blob: {err}"))),
        }
    }
}

impl RecordSource for JsRecords {
    async fn record(&mut self, index: u64, len: u64) -> Result<Bytes, BlobError> {
        while self.at < index {
            self.next_message().await?;
        }
        let payload = self.next_message().await?;
        if payload.len() as u64 != len {
            return Err(self.codec.integrity(format!(
                "chunk {index} has {} stored bytes, {len} expected",
                payload.len()
            )));
        }
        Ok(payload)
    }
}

impl BlobStore for JetStreamBlobs {
    async fn put<S, E>(
        &self,
        key: &BlobKey,
        body: S,
        limit: PutOptions,
    ) -> Result<BlobInfo, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display + Send,
    {
        let namespace = limit.checked_namespace()?.map(str::to_owned);
        let mut chunker = Chunker::new(body, &limit)?;
        let codec = Codec::new(key, &self.sealing);
        let mut layout = codec.layout();
        let previous = self.info(key).await?;
        let nuid = uuid::Uuid::new_v4().simple().to_string();
        let subject = self.chunk_subject(&nuid);
        let mut guard = PurgeGuard {
            stream: self.stream.clone(),
            subject: Some(subject.clone()),
            pending: VecDeque::new(),
        };
        let written = async {
            let mut index = Vec::new();
            let mut stored = 0u64;
            let mut chunks = 0u64;
            let mut note = |chunk: u64, ack: async_nats::jetstream::publish::PublishAck| {
                if chunk.is_multiple_of(INDEX_STRIDE) {
                    index.push(ack.sequence.to_string());
                }
            };
            while let Some(chunk) = chunker.next().await? {
                let record = codec.encode(&layout, chunk.index, chunk.last, &chunk.data);
                stored += record.len() as u64;
                chunks += 1;
                let ack = self
                    .js
                    .publish(subject.clone(), record)
                    .await
                    .map_err(|err| publish_error(&err))?;
                guard.pending.push_back((chunk.index, ack));
                if guard.pending.len() >= PUBLISH_WINDOW
                    && let Some((chunk, ack)) = guard.pending.pop_front()
                {
                    note(chunk, ack.await.map_err(|err| publish_error(&err))?);
                }
            }
            while let Some((chunk, ack)) = guard.pending.pop_front() {
                note(chunk, ack.await.map_err(|err| publish_error(&err))?);
            }
            Ok::<_, BlobError>((index.join(","), stored, chunks))
        };
        let (index, stored, chunks) = match written.await {
            Ok(written) => written,
            Err(err) => {
                guard.purge_now().await;
                return Err(err);
            }
        };
        layout.len = chunker.total();
        let digest = chunker.digest();
        let created = crate::clock::unix_nanos_now();
        let mut metadata = HashMap::from([
            (
                META_ENCODING.to_owned(),
                layout.encoding.as_str().to_owned(),
            ),
            (META_CHUNK.to_owned(), layout.chunk.to_string()),
            (META_OVERHEAD.to_owned(), layout.overhead.to_string()),
            (META_LEN.to_owned(), layout.len.to_string()),
            (META_SHA256.to_owned(), codec.seal_digest(&layout, &digest)),
            (META_CREATED.to_owned(), created.to_string()),
            (META_INDEX.to_owned(), index),
        ]);
        if let Some(namespace) = namespace {
            metadata.insert(META_NAMESPACE.to_owned(), namespace);
        }
        let info = ObjectInfo {
            name: key.as_str().to_owned(),
            description: None,
            metadata,
            headers: None,
            options: Some(ObjectOptions {
                link: None,
                max_chunk_size: usize::try_from(layout.chunk + layout.overhead).ok(),
            }),
            bucket: self.bucket.clone(),
            nuid: nuid.clone(),
            size: usize::try_from(stored).unwrap_or(usize::MAX),
            chunks: usize::try_from(chunks).unwrap_or(usize::MAX),
            modified: Some(time::OffsetDateTime::now_utc()),
            digest: None,
            deleted: false,
        };
        let payload = serde_json::to_vec(&info)
            .map_err(|err| BlobError::Backend(format!("cannot encode an object info: {err}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_ROLLUP, "sub");
        let published = async {
            self.js
                .publish_with_headers(self.meta_subject(key), headers, payload.into())
                .await
                .map_err(|err| publish_error(&err))?
                .await
                .map_err(|err| publish_error(&err))
        };
        if let Err(err) = published.await {
            // The info may still have been stored (a lost ack): then the object is whole and
            // its chunks must stay. Only purge when it is not there.
            match self.info(key).await {
                Ok(Some(info)) if info.nuid == nuid => {
                    guard.subject = None;
                }
                _ => guard.purge_now().await,
            }
            return Err(err);
        }
        guard.subject = None;
        if let Some(previous) = previous {
            // A failure leaves the old chunks to remove_leftovers.
            let _ = self
                .purge_subject(&self.chunk_subject(&previous.nuid))
                .await;
        }
        Ok(BlobInfo {
            key: key.clone(),
            len: layout.len,
            sha256: to_hex(&digest),
        })
    }

    async fn get(&self, key: &BlobKey, range: Option<ByteRange>) -> Result<BlobRead, BlobError> {
        let codec = Codec::new(key, &self.sealing);
        let info = self.info(key).await?.ok_or(BlobError::NotFound)?;
        let (layout, index, _) =
            layout_of(&info).ok_or_else(|| codec.integrity("unknown layout".to_owned()))?;
        let stored_digest = info
            .metadata
            .get(META_SHA256)
            .ok_or_else(|| codec.integrity("no digest".to_owned()))?;
        let digest = codec.open_digest(&layout, stored_digest)?;
        let blob = BlobInfo {
            key: key.clone(),
            len: layout.len,
            sha256: to_hex(&digest),
        };
        let (span, whole) = match range {
            None => (0..layout.len, Some(digest)),
            Some(range) => (range.resolve(layout.len)?, None),
        };
        let first = if span.is_empty() {
            0
        } else {
            span.start / layout.chunk
        };
        let base = first / INDEX_STRIDE;
        let start_seq = usize::try_from(base)
            .ok()
            .and_then(|base| index.get(base))
            .copied()
            .ok_or_else(|| codec.integrity("index too short".to_owned()))?;
        let records = JsRecords {
            stream: self.stream.clone(),
            subject: self.chunk_subject(&info.nuid),
            next_seq: start_seq,
            at: base * INDEX_STRIDE,
            codec: codec.clone(),
        };
        let body = read_stream(records, codec, layout, span.clone(), whole);
        Ok(BlobRead {
            info: blob,
            range: span,
            body,
        })
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        let Some(info) = self.info(key).await? else {
            return Ok(());
        };
        // The info first: a crash in between leaves chunks without an object, which
        // remove_leftovers finds; never an object without its chunks.
        self.purge_subject(&self.meta_subject(key)).await?;
        self.purge_subject(&self.chunk_subject(&info.nuid)).await
    }

    async fn list(&self) -> Result<Vec<BlobEntry>, BlobError> {
        let list = self
            .store
            .list()
            .await
            .map_err(|err| BlobError::Unavailable(format!("list blobs: {err}")))?;
        let infos: Vec<ObjectInfo> = list
            .try_collect()
            .await
            .map_err(|err| BlobError::Unavailable(format!("list blobs: {err}")))?;
        let mut entries: Vec<BlobEntry> = infos
            .into_iter()
            .filter_map(|info| {
                let key = BlobKey::parse(&info.name).ok()?;
                let (len, created) = match layout_of(&info) {
                    Some((layout, _, created)) => (layout.len, created),
                    None => (0, 0),
                };
                let namespace = info.metadata.get(META_NAMESPACE).cloned();
                Some(BlobEntry {
                    key,
                    len,
                    created_unix_nanos: created,
                    namespace,
                })
            })
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    async fn remove_leftovers(&self, older_than: Duration) -> Result<u64, BlobError> {
        let prefix = format!("$O.{}.C.", self.bucket);
        let live = self.live_nuids().await?;
        let mut subjects = self
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|err| BlobError::Unavailable(format!("blob subjects: {err}")))?;
        let mut candidates = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, _) =
                item.map_err(|err| BlobError::Unavailable(format!("blob subjects: {err}")))?;
            let Some(nuid) = subject.strip_prefix(&prefix) else {
                continue;
            };
            if !live.contains(nuid) {
                candidates.push((subject.clone(), nuid.to_owned()));
            }
        }
        let cutoff = time::OffsetDateTime::now_utc() - older_than;
        let mut stale = Vec::new();
        for (subject, nuid) in candidates {
            match self
                .stream
                .direct_get_last_for_subject(subject.as_str())
                .await
            {
                Ok(last) if last.time <= cutoff => stale.push((subject, nuid)),
                Ok(_) => {}
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => {}
                Err(err) => return Err(BlobError::Unavailable(format!("blob subjects: {err}"))),
            }
        }
        if stale.is_empty() {
            return Ok(0);
        }
        // A put that finished meanwhile has an object now: keep its chunks.
        let live = self.live_nuids().await?;
        let mut removed = 0;
        for (subject, nuid) in stale {
            if !live.contains(&nuid) {
                self.purge_subject(&subject).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
