//! Large request bodies and results by reference: a blob store that streams both ways.
//!
//! A body or result above the inline threshold is stored here and the queued envelope carries
//! a reference to it (the integration into the gateway and the worker is not done yet: this
//! module is the store alone). Two implementations of one contract, [`BlobStore`]:
//!
//! - [`jetstream::JetStreamBlobs`]: a JetStream object-store bucket named after the calls
//!   stream (`<stream>-blobs`, [`jetstream::bucket_name`]), file storage, created by
//!   [`jetstream::JetStreamBlobs::ensure`] (the gateway's upkeep) or opened by
//!   [`jetstream::JetStreamBlobs::open`].
//! - [`files::FileBlobs`]: one file per blob in a directory (the embedded backend, beside its
//!   sled database), written to a temporary file, fsynced, renamed, the directory fsynced.
//!
//! # What is stored
//!
//! A blob is cut into chunks of [`CHUNK_BYTES`] of plaintext (the last one shorter, an empty
//! blob one empty chunk). Each chunk is stored as a *record*:
//!
//! - encryption off: the plaintext, then the SHA-256 of (`blob chunk`, the key, the chunk's
//!   index, whether it is the last, the plaintext): 32 bytes;
//! - encryption on ([`Sealing`]): the chunk sealed with the same keys as inline payloads
//!   ([`Purpose::Blob`]), bound to the key, the chunk's index and whether it is the last one,
//!   so chunks cannot be moved to another blob, reordered, or cut off at a chunk boundary.
//!
//! Every record but the last has the same size, so a byte range maps to a record range
//! without an index (files: a seek; JetStream: a sparse index of chunk sequences every
//! [`jetstream::INDEX_STRIDE`] chunks, kept in the object's metadata).
//!
//! Beside the records: the plaintext length, the SHA-256 of the whole plaintext (sealed when
//! encryption is on: a digest in clear would let anyone confirm a guess of the content), the
//! creation time, the record format.
//!
//! # Integrity
//!
//! Every record read is checked (its digest or its seal) before any of its bytes is yielded,
//! range reads included: a corrupted chunk is never passed on. A full read also checks the
//! whole SHA-256 and the length at the end and yields [`BlobError::Integrity`] as its last item
//! on a mismatch. A range read checks the records it touches (not the whole digest, which needs
//! every byte).
//!
//! # Memory
//!
//! A put holds at most one chunk plus one item of its source; a read one record. Nothing grows
//! with the size of a blob (the JetStream index: one sequence number per
//! [`jetstream::INDEX_STRIDE`] chunks, 16 bytes of text per 4 MiB).
//!
//! # Lifecycle
//!
//! [`BlobStore::delete`] is idempotent. A put that fails ([`BlobError::TooLarge`],
//! [`BlobError::Interrupted`], a store error) or whose future is dropped leaves nothing
//! stored (a dropped JetStream put purges its chunks from a spawned task). What a crash leaves
//! (temporary files, chunks without an object) and blobs whose call is gone are removed by
//! [`sweep`].
//!
//! # Owners
//!
//! A put may name the namespace of its call ([`PutOptions::namespace`]); it is kept in clear
//! beside the blob and listed, so the bytes a namespace holds are a sum over
//! [`BlobStore::list`] ([`stored_bytes_by_namespace`]) with no record read (the gateway's
//! stored-bytes quota).

pub mod files;
pub mod jetstream;
pub mod shared;

pub use shared::{AnyBlobs, SharedBlobs};

use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use crate::call_id::valid_call_id;
use crate::sealing::{Keyring, Purpose, Sealing};

/// Plaintext bytes of every chunk but the last: the unit of digests, sealing and ranges.
pub const CHUNK_BYTES: usize = 128 * 1024;

/// Longest blob key, in bytes. Any call id of up to 64 characters fits, whatever its
/// characters, also with an answer's tag ([`BlobKey::for_answer`]); one of only letters,
/// digits and `-` fits up to 191 (all of them, since call ids are at most 128 bytes).
pub const MAX_KEY_LEN: usize = 216;

/// Longest tag of an answer's key ([`BlobKey::for_answer`]), in hex digits.
pub const MAX_TAG_LEN: usize = 16;

/// Bytes a record adds to its chunk when encryption is off.
const DIGEST_LEN: usize = 32;

/// What a blob is to its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlobRole {
    /// The call's request body.
    Request,
    /// The function's response body (the kept result).
    Result,
}

impl BlobRole {
    /// The key suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Result => "result",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "request" => Some(Self::Request),
            "result" => Some(Self::Result),
            _ => None,
        }
    }
}

/// Why a string is not a blob key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not a call id ([`valid_call_id`]).
    #[error("not a call id")]
    CallId,
    /// The key would be (or is) longer than [`MAX_KEY_LEN`].
    #[error("a blob key is at most {MAX_KEY_LEN} bytes; this one is {len}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// A character outside `[A-Za-z0-9_.-]`, a bad escape, or no role suffix.
    #[error("malformed blob key")]
    Malformed,
}

/// The name of a stored blob: a call id and a role, as `<escaped call id>.<role>`, or for one
/// answer of a function (one attempt's response, [`BlobKey::for_answer`])
/// `<escaped call id>.result-<tag>`.
///
/// The escaped call id keeps ASCII letters, digits and `-`; every other byte is `_` and two
/// uppercase hex digits. A key is therefore only `[A-Za-z0-9_.-]`, has exactly one `.`, never
/// starts with `.`, and names one file in a directory (no path traversal).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey {
    key: String,
    call_id: String,
    role: BlobRole,
    tag: Option<String>,
}

impl BlobKey {
    /// The key of `call_id`'s blob in `role`.
    pub fn for_call(call_id: &str, role: BlobRole) -> Result<Self, KeyError> {
        if !valid_call_id(call_id) {
            return Err(KeyError::CallId);
        }
        let mut key = String::with_capacity(call_id.len() + 8);
        for b in call_id.bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' {
                key.push(char::from(b));
            } else {
                key.push('_');
                key.push(char::from(HEX[usize::from(b >> 4)]));
                key.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
        key.push('.');
        key.push_str(role.as_str());
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: key.len() });
        }
        Ok(Self {
            key,
            call_id: call_id.to_owned(),
            role,
            tag: None,
        })
    }

    /// The key of one answer of `call_id`'s function (role [`BlobRole::Result`]), told apart
    /// from any other answer of the same call by `tag` (1 to [`MAX_TAG_LEN`] lowercase hex
    /// digits): two workers running the same call at once never write one blob, and neither
    /// deletes the other's.
    pub fn for_answer(call_id: &str, tag: &str) -> Result<Self, KeyError> {
        if tag.is_empty()
            || tag.len() > MAX_TAG_LEN
            || !tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(KeyError::Malformed);
        }
        let mut base = Self::for_call(call_id, BlobRole::Result)?;
        base.key.push('-');
        base.key.push_str(tag);
        if base.key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong {
                len: base.key.len(),
            });
        }
        base.tag = Some(tag.to_owned());
        Ok(base)
    }

    /// A fresh answer key of `call_id`: a random tag of [`MAX_TAG_LEN`] digits.
    pub fn fresh_answer(call_id: &str) -> Result<Self, KeyError> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        Self::for_answer(call_id, &tag[..MAX_TAG_LEN])
    }

    /// Reads a key back (a file or object name), refusing anything [`BlobKey::for_call`]
    /// would not have written.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: key.len() });
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(KeyError::Malformed);
        }
        let (escaped, suffix) = key.split_once('.').ok_or(KeyError::Malformed)?;
        let (role, tag) = match suffix.split_once('-') {
            Some(("result", tag)) => (BlobRole::Result, Some(tag)),
            Some(_) => return Err(KeyError::Malformed),
            None => (BlobRole::parse(suffix).ok_or(KeyError::Malformed)?, None),
        };
        let mut call_id = Vec::with_capacity(escaped.len());
        let mut bytes = escaped.bytes();
        while let Some(b) = bytes.next() {
            if b == b'_' {
                let hi = bytes
                    .next()
                    .and_then(hex_value)
                    .ok_or(KeyError::Malformed)?;
                let lo = bytes
                    .next()
                    .and_then(hex_value)
                    .ok_or(KeyError::Malformed)?;
                let byte = (hi << 4) | lo;
                // Only what for_call escapes: one spelling per key.
                if byte.is_ascii_alphanumeric() || byte == b'-' {
                    return Err(KeyError::Malformed);
                }
                call_id.push(byte);
            } else {
                call_id.push(b);
            }
        }
        let call_id = String::from_utf8(call_id).map_err(|_| KeyError::Malformed)?;
        let parsed = match tag {
            Some(tag) => Self::for_answer(&call_id, tag)?,
            None => Self::for_call(&call_id, role)?,
        };
        if parsed.key != key {
            return Err(KeyError::Malformed);
        }
        Ok(parsed)
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The call this blob belongs to.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// What the blob is to its call.
    pub fn role(&self) -> BlobRole {
        self.role
    }

    /// The answer's tag, for a key of [`BlobKey::for_answer`].
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }
}

impl std::fmt::Display for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const LOWER: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(LOWER[usize::from(b >> 4)]));
        out.push(char::from(LOWER[usize::from(b & 0x0f)]));
    }
    out
}

pub(crate) fn from_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let lower = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    text.chunks(2)
        .map(|pair| Some((lower(pair[0])? << 4) | lower(pair[1])?))
        .collect()
}

/// A stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its key.
    pub key: BlobKey,
    /// Plaintext length in bytes.
    pub len: u64,
    /// SHA-256 of the plaintext, lowercase hex.
    pub sha256: String,
}

/// Where a stored body is, as a record or a dedup entry names it: the blob's key, its
/// length and its SHA-256 (checked again on every full read).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobRef {
    /// The blob's key ([`BlobKey::as_str`]).
    pub key: String,
    /// Length in bytes.
    pub len: u64,
    /// SHA-256 of the plaintext, lowercase hex.
    pub sha256: String,
}

impl From<BlobInfo> for BlobRef {
    fn from(info: BlobInfo) -> Self {
        Self {
            key: info.key.as_str().to_owned(),
            len: info.len,
            sha256: info.sha256,
        }
    }
}

/// A blob as [`BlobStore::list`] sees it (no digest: listing needs no keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobEntry {
    /// Its key.
    pub key: BlobKey,
    /// Plaintext length in bytes.
    pub len: u64,
    /// When the put finished, Unix nanoseconds.
    pub created_unix_nanos: u64,
    /// The namespace the put named ([`PutOptions::namespace`]); `None` for a blob stored
    /// without one (by a release before namespaces were kept).
    pub namespace: Option<String>,
}

/// Limits and owner of one put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOptions {
    /// Most bytes the blob may have; more is [`BlobError::TooLarge`].
    pub max_bytes: u64,
    /// The length the source announced (a `Content-Length`), if any: above `max_bytes` it is
    /// refused before anything is stored; a source that ends short of it, or goes past it, is
    /// [`BlobError::Interrupted`].
    pub expected_len: Option<u64>,
    /// The namespace of the call the blob belongs to (the default one written out), kept
    /// beside the blob in clear and listed ([`BlobEntry::namespace`]) so the stored bytes of a
    /// namespace are counted from a listing alone. At most [`MAX_NAMESPACE_LEN`] bytes of
    /// `[A-Za-z0-9_-]`, else the put is refused ([`BlobError::Backend`]) before it stores
    /// anything.
    pub namespace: Option<String>,
}

/// Longest namespace a blob may carry (a Kubernetes DNS label).
pub const MAX_NAMESPACE_LEN: usize = 63;

impl PutOptions {
    /// At most `max_bytes`, length not announced, no namespace.
    pub fn at_most(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            expected_len: None,
            namespace: None,
        }
    }

    /// The same, owned by `namespace`.
    #[must_use]
    pub fn in_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The namespace, checked (an owner that could not be stored is refused up front).
    pub(crate) fn checked_namespace(&self) -> Result<Option<&str>, BlobError> {
        match self.namespace.as_deref() {
            None => Ok(None),
            Some(ns)
                if !ns.is_empty()
                    && ns.len() <= MAX_NAMESPACE_LEN
                    && ns
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                Ok(Some(ns))
            }
            Some(_) => Err(BlobError::Backend(
                "a blob's namespace is 1 to 63 letters, digits, '-' or '_'".to_owned(),
            )),
        }
    }
}

/// Which bytes of a blob to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// From `start` to the end (`bytes=start-`).
    From(u64),
    /// `start..=last` (`bytes=start-last`); a `last` past the end means the end.
    Inclusive {
        /// First byte.
        start: u64,
        /// Last byte, included.
        last: u64,
    },
    /// The last `n` bytes (`bytes=-n`); more than the blob has means all of it.
    Suffix(u64),
}

impl ByteRange {
    /// The bytes of a blob of `len` bytes this range selects, as HTTP reads a range
    /// (RFC 9110 14.1.2); [`BlobError::RangeNotSatisfiable`] when it selects none.
    pub fn resolve(self, len: u64) -> Result<Range<u64>, BlobError> {
        let range = match self {
            Self::From(start) => start..len,
            Self::Inclusive { start, last } if last >= start => {
                start..last.saturating_add(1).min(len)
            }
            Self::Inclusive { .. } => return Err(BlobError::RangeNotSatisfiable { len }),
            Self::Suffix(n) => len.saturating_sub(n)..len,
        };
        if range.start >= len || range.is_empty() {
            return Err(BlobError::RangeNotSatisfiable { len });
        }
        Ok(range)
    }
}

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob is (or would grow) larger than the put's limit.
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit, bytes.
        limit: u64,
    },
    /// The source stream failed or did not deliver the length it announced.
    #[error("the body stream was interrupted: {0}")]
    Interrupted(String),
    /// No blob with this key.
    #[error("no such blob")]
    NotFound,
    /// The range selects no byte of the blob.
    #[error("range not satisfiable: the blob has {len} bytes")]
    RangeNotSatisfiable {
        /// The blob's length.
        len: u64,
    },
    /// A stored blob does not match its digest, its seal or its length.
    #[error("blob {key} failed its integrity check: {detail}")]
    Integrity {
        /// Which blob.
        key: String,
        /// What did not match.
        detail: String,
    },
    /// A sealed blob and no key to open it (encryption off, or its key retired).
    #[error("blob {key} cannot be opened: {detail}")]
    Undecryptable {
        /// Which blob.
        key: String,
        /// Why.
        detail: String,
    },
    /// The store cannot be reached now (a timeout, no connection); worth retrying.
    #[error("blob store unavailable: {0}")]
    Unavailable(String),
    /// The store failed otherwise.
    #[error("blob store: {0}")]
    Backend(String),
}

/// A blob's bytes, in order. After an `Err` the stream ends.
pub type BlobStream = BoxStream<'static, Result<Bytes, BlobError>>;

/// What [`BlobStore::get`] returns.
pub struct BlobRead {
    /// The whole blob's length and digest.
    pub info: BlobInfo,
    /// The bytes `body` yields (`0..len` for a full read).
    pub range: Range<u64>,
    /// Those bytes.
    pub body: BlobStream,
}

impl std::fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobRead")
            .field("info", &self.info)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// The blob store contract. Both implementations run `queue-core/tests/blobs.rs`.
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `body` under `key` (replacing a blob stored there), streaming: chunk by chunk,
    /// never the whole body in memory. On any error nothing is left stored under `key` for
    /// this put (a blob stored there before stays).
    fn put<S, E>(
        &self,
        key: &BlobKey,
        body: S,
        limit: PutOptions,
    ) -> impl Future<Output = Result<BlobInfo, BlobError>> + Send
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display + Send;

    /// Reads the blob (or the range of it), streaming.
    fn get(
        &self,
        key: &BlobKey,
        range: Option<ByteRange>,
    ) -> impl Future<Output = Result<BlobRead, BlobError>> + Send;

    /// Removes the blob; `Ok` when there is none.
    fn delete(&self, key: &BlobKey) -> impl Future<Output = Result<(), BlobError>> + Send;

    /// Every stored blob.
    fn list(&self) -> impl Future<Output = Result<Vec<BlobEntry>, BlobError>> + Send;

    /// Removes what interrupted puts left behind (temporary files, chunks without an object)
    /// that has not changed for `older_than`; the count removed.
    fn remove_leftovers(
        &self,
        older_than: Duration,
    ) -> impl Future<Output = Result<u64, BlobError>> + Send;
}

/// What [`sweep`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Blobs removed as orphans.
    pub orphans: u64,
    /// Leftovers of interrupted puts removed.
    pub leftovers: u64,
}

/// Removes blobs created more than `older_than` ago that `is_orphan` says no call needs any
/// more (its record expired, it was cancelled or purged), and the leftovers of interrupted
/// puts of that age. The age keeps a put whose call is being written from being swept.
pub async fn sweep<B, F, Fut>(
    store: &B,
    older_than: Duration,
    mut is_orphan: F,
) -> Result<SweepReport, BlobError>
where
    B: BlobStore,
    F: FnMut(BlobKey) -> Fut,
    Fut: Future<Output = bool>,
{
    let cutoff = crate::clock::unix_nanos_now()
        .saturating_sub(u64::try_from(older_than.as_nanos()).unwrap_or(u64::MAX));
    let mut report = SweepReport::default();
    for entry in store.list().await? {
        if entry.created_unix_nanos <= cutoff && is_orphan(entry.key.clone()).await {
            store.delete(&entry.key).await?;
            report.orphans += 1;
        }
    }
    report.leftovers = store.remove_leftovers(older_than).await?;
    Ok(report)
}

/// Deletes the blobs of `call_id` (its request body and its result), if it has any; a failure
/// is logged, never returned (the sweep removes what is left once the call's record is gone).
/// What a cancel and a dead-letter purge do.
pub async fn delete_call_blobs(blobs: &SharedBlobs, call_id: &str) {
    let store = match blobs.store().await {
        Ok(store) => store,
        Err(e) => {
            tracing::warn!(call_id, error = %e, "could not delete the call's stored bodies: the blob store is out of reach");
            return;
        }
    };
    for role in [BlobRole::Request, BlobRole::Result] {
        if let Ok(key) = BlobKey::for_call(call_id, role)
            && let Err(e) = store.delete(&key).await
        {
            tracing::warn!(key = %key, error = %e, "could not delete a stored body");
        }
    }
}

/// The plaintext bytes stored per namespace, from a listing; blobs without a namespace are
/// left out (counted by none).
pub fn stored_bytes_by_namespace(entries: &[BlobEntry]) -> std::collections::HashMap<String, u64> {
    let mut by_namespace = std::collections::HashMap::new();
    for entry in entries {
        if let Some(ns) = &entry.namespace {
            *by_namespace.entry(ns.to_ascii_lowercase()).or_insert(0u64) += entry.len;
        }
    }
    by_namespace
}

/// How a blob's records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// Plaintext and a 32-byte digest.
    Hashed,
    /// Sealed.
    Sealed,
}

impl Encoding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Hashed => "sha256-chunks",
            Self::Sealed => "sealed-chunks",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "sha256-chunks" => Some(Self::Hashed),
            "sealed-chunks" => Some(Self::Sealed),
            _ => None,
        }
    }
}

/// The layout of a stored blob: what a reader needs besides the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub encoding: Encoding,
    /// Plaintext bytes per chunk.
    pub chunk: u64,
    /// Bytes a record adds to its chunk.
    pub overhead: u64,
    /// Plaintext length.
    pub len: u64,
}

impl Layout {
    /// Number of chunks (an empty blob has one, empty).
    pub fn chunks(&self) -> u64 {
        self.len.div_ceil(self.chunk).max(1)
    }

    /// Plaintext bytes of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.chunk);
        self.len.saturating_sub(start).min(self.chunk)
    }

    /// Stored bytes of record `index`.
    pub fn record_len(&self, index: u64) -> u64 {
        self.chunk_len(index) + self.overhead
    }

    /// Stored bytes of all records.
    pub fn stored_len(&self) -> u64 {
        self.len + self.chunks().saturating_mul(self.overhead)
    }

    fn valid(&self) -> bool {
        self.chunk > 0 && self.chunk <= 64 * 1024 * 1024 && self.overhead <= 4096
    }
}

/// Encodes and checks the records of one blob.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    key: BlobKey,
    sealing: Sealing,
}

impl Codec {
    pub fn new(key: &BlobKey, sealing: &Sealing) -> Self {
        Self {
            key: key.clone(),
            sealing: sealing.clone(),
        }
    }

    /// The layout a put with this codec writes (before its length is known).
    pub fn layout(&self) -> Layout {
        match self.sealing.keyring() {
            Some(keys) => Layout {
                encoding: Encoding::Sealed,
                chunk: CHUNK_BYTES as u64,
                overhead: keys.overhead() as u64,
                len: 0,
            },
            None => Layout {
                encoding: Encoding::Hashed,
                chunk: CHUNK_BYTES as u64,
                overhead: DIGEST_LEN as u64,
                len: 0,
            },
        }
    }

    fn context(&self, index: u64, last: bool) -> Vec<u8> {
        let mut context = Vec::with_capacity(self.key.as_str().len() + 20);
        context.extend_from_slice(b"blob chunk\0");
        context.extend_from_slice(self.key.as_str().as_bytes());
        context.push(0);
        context.extend_from_slice(&index.to_be_bytes());
        context.push(u8::from(last));
        context
    }

    fn keyring(&self) -> Option<&Keyring> {
        self.sealing.keyring()
    }

    /// The record of chunk `index`.
    pub fn encode(&self, layout: &Layout, index: u64, last: bool, plain: &[u8]) -> Bytes {
        let context = self.context(index, last);
        match (layout.encoding, self.keyring()) {
            (Encoding::Sealed, Some(keys)) => {
                Bytes::from(keys.seal(Purpose::Blob, &context, plain))
            }
            _ => {
                let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                digest.update(&context);
                digest.update(plain);
                let mut out = BytesMut::with_capacity(plain.len() + DIGEST_LEN);
                out.extend_from_slice(plain);
                out.extend_from_slice(digest.finish().as_ref());
                out.freeze()
            }
        }
    }

    /// The chunk of record `index`, checked.
    pub fn decode(&self, layout: &Layout, index: u64, stored: &Bytes) -> Result<Bytes, BlobError> {
        let last = index + 1 == layout.chunks();
        let want = layout.chunk_len(index);
        let context = self.context(index, last);
        let plain = match layout.encoding {
            Encoding::Hashed => {
                let Some(split) = stored.len().checked_sub(DIGEST_LEN) else {
                    return Err(self.integrity(format!("chunk {index} is truncated")));
                };
                let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
                digest.update(&context);
                digest.update(&stored[..split]);
                if digest.finish().as_ref() != &stored[split..] {
                    return Err(self.integrity(format!("chunk {index} does not match its digest")));
                }
                stored.slice(..split)
            }
            Encoding::Sealed => {
                let Some(keys) = self.keyring() else {
                    return Err(self.undecryptable("encryption is off".to_owned()));
                };
                match keys.open(Purpose::Blob, &context, stored) {
                    Ok(plain) => Bytes::from(plain),
                    Err(crate::sealing::OpenError::UnknownKey(id)) => {
                        return Err(self.undecryptable(format!("no key {id}")));
                    }
                    Err(err) => return Err(self.integrity(format!("chunk {index}: {err}"))),
                }
            }
        };
        if plain.len() as u64 != want {
            return Err(self.integrity(format!(
                "chunk {index} has {} bytes, {want} expected",
                plain.len()
            )));
        }
        Ok(plain)
    }

    /// The stored form of the whole digest: hex in clear, or the hex of its sealed form.
    pub fn seal_digest(&self, layout: &Layout, digest: &[u8]) -> String {
        match (layout.encoding, self.keyring()) {
            (Encoding::Sealed, Some(keys)) => {
                to_hex(&keys.seal(Purpose::Blob, &self.digest_context(layout), digest))
            }
            _ => to_hex(digest),
        }
    }

    /// The whole digest (raw bytes) from its stored form.
    pub fn open_digest(&self, layout: &Layout, stored: &str) -> Result<Vec<u8>, BlobError> {
        let raw = from_hex(stored).ok_or_else(|| self.integrity("bad digest".to_owned()))?;
        let digest = match layout.encoding {
            Encoding::Hashed => raw,
            Encoding::Sealed => {
                let Some(keys) = self.keyring() else {
                    return Err(self.undecryptable("encryption is off".to_owned()));
                };
                match keys.open(Purpose::Blob, &self.digest_context(layout), &raw) {
                    Ok(digest) => digest,
                    Err(crate::sealing::OpenError::UnknownKey(id)) => {
                        return Err(self.undecryptable(format!("no key {id}")));
                    }
                    Err(err) => return Err(self.integrity(format!("digest: {err}"))),
                }
            }
        };
        if digest.len() != DIGEST_LEN {
            return Err(self.integrity("bad digest".to_owned()));
        }
        Ok(digest)
    }

    fn digest_context(&self, layout: &Layout) -> Vec<u8> {
        let mut context = Vec::with_capacity(self.key.as_str().len() + 24);
        context.extend_from_slice(b"blob digest\0");
        context.extend_from_slice(self.key.as_str().as_bytes());
        context.push(0);
        context.extend_from_slice(&layout.len.to_be_bytes());
        context
    }

    pub fn integrity(&self, detail: String) -> BlobError {
        BlobError::Integrity {
            key: self.key.as_str().to_owned(),
            detail,
        }
    }

    fn undecryptable(&self, detail: String) -> BlobError {
        BlobError::Undecryptable {
            key: self.key.as_str().to_owned(),
            detail,
        }
    }
}

/// One chunk of a put.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub index: u64,
    pub last: bool,
    pub data: Bytes,
}

/// Cuts a put's source into chunks of [`CHUNK_BYTES`], counting against the limit, with one
/// item of lookahead so the last chunk is known as the last.
pub(crate) struct Chunker<S> {
    source: S,
    max_bytes: u64,
    expected_len: Option<u64>,
    buf: BytesMut,
    total: u64,
    index: u64,
    ended: bool,
    finished: bool,
    digest: ring::digest::Context,
}

impl<S, E> Chunker<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    /// Refuses at once a source whose announced length is above the limit.
    pub fn new(source: S, limit: &PutOptions) -> Result<Self, BlobError> {
        if limit.expected_len.is_some_and(|len| len > limit.max_bytes) {
            return Err(BlobError::TooLarge {
                limit: limit.max_bytes,
            });
        }
        Ok(Self {
            source,
            max_bytes: limit.max_bytes,
            expected_len: limit.expected_len,
            buf: BytesMut::with_capacity(CHUNK_BYTES),
            total: 0,
            index: 0,
            ended: false,
            finished: false,
            digest: ring::digest::Context::new(&ring::digest::SHA256),
        })
    }

    /// The next chunk; `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Chunk>, BlobError> {
        if self.finished {
            return Ok(None);
        }
        while !self.ended && self.buf.len() <= CHUNK_BYTES {
            match self.source.next().await {
                Some(Ok(item)) => {
                    self.total += item.len() as u64;
                    if self.total > self.max_bytes {
                        return Err(BlobError::TooLarge {
                            limit: self.max_bytes,
                        });
                    }
                    if let Some(expected) = self.expected_len
                        && self.total > expected
                    {
                        return Err(BlobError::Interrupted(format!(
                            "more than the {expected} bytes announced"
                        )));
                    }
                    self.buf.extend_from_slice(&item);
                }
                Some(Err(err)) => return Err(BlobError::Interrupted(err.to_string())),
                None => {
                    if let Some(expected) = self.expected_len
                        && self.total != expected
                    {
                        return Err(BlobError::Interrupted(format!(
                            "ended after {} of the {expected} bytes announced",
                            self.total
                        )));
                    }
                    self.ended = true;
                }
            }
        }
        let (data, last) = if self.buf.len() > CHUNK_BYTES {
            (self.buf.split_to(CHUNK_BYTES).freeze(), false)
        } else {
            self.finished = true;
            (self.buf.split().freeze(), true)
        };
        self.digest.update(&data);
        let chunk = Chunk {
            index: self.index,
            last,
            data,
        };
        self.index += 1;
        Ok(Some(chunk))
    }

    /// Plaintext bytes so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The SHA-256 of everything chunked (call after the last chunk).
    pub fn digest(&self) -> Vec<u8> {
        self.digest.clone().finish().as_ref().to_vec()
    }
}

/// Where a read takes its records from, in order.
pub(crate) trait RecordSource: Send + 'static {
    /// Record `index` (every call asks for the one after the previous), `len` stored bytes.
    fn record(
        &mut self,
        index: u64,
        len: u64,
    ) -> impl Future<Output = Result<Bytes, BlobError>> + Send;
}

struct ReadState<R> {
    source: R,
    codec: Codec,
    layout: Layout,
    range: Range<u64>,
    next: u64,
    last: u64,
    digest: Option<(ring::digest::Context, Vec<u8>)>,
    done: bool,
}

/// The stream of a read: records `range` needs, checked, cut to the range; for a full read
/// (`whole_digest` given) the digest checked at the end.
pub(crate) fn read_stream<R: RecordSource>(
    source: R,
    codec: Codec,
    layout: Layout,
    range: Range<u64>,
    whole_digest: Option<Vec<u8>>,
) -> BlobStream {
    let chunk = layout.chunk;
    let (first, last) = if range.is_empty() {
        (0, 0)
    } else {
        (range.start / chunk, (range.end - 1) / chunk)
    };
    let state = ReadState {
        source,
        codec,
        layout,
        range,
        next: first,
        last,
        digest: whole_digest.map(|want| (ring::digest::Context::new(&ring::digest::SHA256), want)),
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if state.done {
                return None;
            }
            if state.next > state.last {
                state.done = true;
                let (digest, want) = state.digest.take()?;
                if digest.finish().as_ref() == want.as_slice() {
                    return None;
                }
                let err = state
                    .codec
                    .integrity("the blob does not match its digest".to_owned());
                return Some((Err(err), state));
            }
            let index = state.next;
            state.next += 1;
            let stored = match state
                .source
                .record(index, state.layout.record_len(index))
                .await
            {
                Ok(stored) => stored,
                Err(err) => {
                    state.done = true;
                    return Some((Err(err), state));
                }
            };
            let plain = match state.codec.decode(&state.layout, index, &stored) {
                Ok(plain) => plain,
                Err(err) => {
                    state.done = true;
                    return Some((Err(err), state));
                }
            };
            if let Some((digest, _)) = state.digest.as_mut() {
                digest.update(&plain);
            }
            let chunk_start = index * state.layout.chunk;
            let from = state.range.start.saturating_sub(chunk_start);
            let to = (state.range.end - chunk_start).min(plain.len() as u64);
            // Both within the chunk: from < to <= chunk length.
            let part = plain.slice(usize_of(from)..usize_of(to));
            if !part.is_empty() {
                return Some((Ok(part), state));
            }
        }
    })
    .boxed()
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_what_is_not_theirs() {
        let key =
            BlobKey::for_call("0190a8b2-7c1e-7d3a-9f00-1234567890ab", BlobRole::Request).unwrap();
        assert_eq!(key.as_str(), "0190a8b2-7c1e-7d3a-9f00-1234567890ab.request");
        assert_eq!(BlobKey::parse(key.as_str()).unwrap(), key);

        let odd = BlobKey::for_call("../etc/passwd", BlobRole::Result).unwrap();
        assert_eq!(odd.as_str(), "_2E_2E_2Fetc_2Fpasswd.result");
        assert_eq!(
            BlobKey::parse(odd.as_str()).unwrap().call_id(),
            "../etc/passwd"
        );

        for bad in [
            "",
            ".result",
            "a",
            "a.b",
            "a.request.result",
            "../x.result",
            "a/b.result",
            "a_2.result",
            "a_2G.result",
            "a_41.result",
            "a_2e.result",
            "x.request\0",
        ] {
            assert!(BlobKey::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            BlobKey::parse(&format!("{}.result", "a".repeat(MAX_KEY_LEN))),
            Err(KeyError::TooLong {
                len: MAX_KEY_LEN + 7
            })
        );
        assert_eq!(
            BlobKey::for_call("", BlobRole::Result),
            Err(KeyError::CallId)
        );
        assert!(matches!(
            BlobKey::for_call(&"/".repeat(100), BlobRole::Result),
            Err(KeyError::TooLong { .. })
        ));
        assert!(BlobKey::for_call(&"/".repeat(64), BlobRole::Request).is_ok());
        assert!(BlobKey::for_call(&"a".repeat(128), BlobRole::Request).is_ok());
    }

    #[test]
    fn answer_keys_carry_their_tag_and_every_call_id_fits() {
        let key = BlobKey::for_answer("job-1", "0a1b2c3d4e5f6789").unwrap();
        assert_eq!(key.as_str(), "job-1.result-0a1b2c3d4e5f6789");
        assert_eq!(
            (key.role(), key.tag()),
            (BlobRole::Result, Some("0a1b2c3d4e5f6789"))
        );
        let parsed = BlobKey::parse(key.as_str()).unwrap();
        assert_eq!(parsed, key);
        assert_eq!(parsed.call_id(), "job-1");
        assert_ne!(
            BlobKey::fresh_answer("job-1").unwrap(),
            BlobKey::fresh_answer("job-1").unwrap(),
            "two answers of one call never share a key"
        );
        // The longest escaped id (64 characters, each escaped) and the longest tag fit; so
        // does any id of letters, digits and '-' up to 128.
        let widest = BlobKey::fresh_answer(&"/".repeat(64)).unwrap();
        assert!(widest.as_str().len() <= MAX_KEY_LEN);
        assert!(BlobKey::fresh_answer(&"a".repeat(128)).is_ok());
        for tag in ["", "0A1B", "xyz", "0123456789abcdef0", "-1"] {
            assert_eq!(
                BlobKey::for_answer("job-1", tag),
                Err(KeyError::Malformed),
                "{tag:?}"
            );
        }
        for bad in [
            "job-1.result-",
            "job-1.result-XYZ",
            "job-1.request-abc",
            "job-1.results-abc",
            "job-1.result-abc-def",
            "job-1.result-0123456789abcdef0",
        ] {
            assert!(BlobKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ranges_resolve_as_http_reads_them() {
        assert_eq!(ByteRange::From(0).resolve(10).unwrap(), 0..10);
        assert_eq!(ByteRange::From(9).resolve(10).unwrap(), 9..10);
        assert!(ByteRange::From(10).resolve(10).is_err());
        let span = ByteRange::Inclusive { start: 2, last: 4 };
        assert_eq!(span.resolve(10).unwrap(), 2..5);
        let past = ByteRange::Inclusive { start: 2, last: 99 };
        assert_eq!(past.resolve(10).unwrap(), 2..10);
        assert!(
            ByteRange::Inclusive { start: 5, last: 4 }
                .resolve(10)
                .is_err()
        );
        assert_eq!(ByteRange::Suffix(3).resolve(10).unwrap(), 7..10);
        assert_eq!(ByteRange::Suffix(30).resolve(10).unwrap(), 0..10);
        assert!(ByteRange::Suffix(0).resolve(10).is_err());
        assert!(ByteRange::From(0).resolve(0).is_err());
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "0001abff");
        assert_eq!(from_hex("0001abff").unwrap(), bytes);
        assert!(from_hex("0g").is_none());
        assert!(from_hex("abc").is_none());
    }
}
