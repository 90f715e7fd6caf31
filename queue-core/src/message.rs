//! The queued-call message: the versioned wire format between `gateway-plugin` and `queue-worker`.
//!
//! A queued call is one JetStream message whose payload is an *envelope*:
//!
//! ```text
//! offset  size  field
//! 0       4     magic  b"FAQC"  (faas async queued call)
//! 4       1     format version (currently 1)
//! 5       4     metadata length M, big-endian u32
//! 9       M     metadata: UTF-8 JSON, see [`CallMeta`]
//! 9+M     rest  the request body, raw bytes (never base64 inside JSON)
//! ```
//!
//! Compatibility rules:
//! - within a version, new *optional* metadata fields may be added; decoders ignore unknown fields;
//! - anything an older worker must not silently ignore (an encrypted payload with a key id, a
//!   new body location) either uses a variant of [`BodyLocation`] an older worker rejects, or
//!   bumps the version byte. A worker dead-letters versions it does not know instead of guessing.
//!
//! Version 2 is the same call sealed for encryption at rest ([`crate::sealing`]):
//!
//! ```text
//! 0       4     magic  b"FAQC"
//! 4       1     format version 2
//! 5       4     clear metadata length C, big-endian u32
//! 9       C     clear metadata: UTF-8 JSON, see [`ClearMeta`] (call id, function, namespace,
//!               received time, body size: what routing and the dead-letter list need)
//! 9+C     rest  a sealed value (`FAQS`...) whose plaintext is the whole version-1 envelope,
//!               bound to bytes 0..9+C (so the clear part cannot be swapped either)
//! ```
//!
//! A build that reads version 2 reads version 1 too: calls queued before encryption was turned
//! on still run.
//!
//! The JetStream message also carries `Nats-Msg-Id: <call id>` so a retried publish is stored once.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::blobs::BlobRef;
use crate::sealing::{self, OpenError, Purpose, Sealing};

/// First bytes of every envelope.
pub const MAGIC: [u8; 4] = *b"FAQC";
/// The envelope version of a call in clear; this build writes it without encryption keys.
pub const FORMAT_VERSION: u8 = 1;
/// The envelope version of a sealed call; this build writes it with encryption keys.
pub const SEALED_FORMAT_VERSION: u8 = 2;
const HEADER_LEN: usize = 4 + 1 + 4;

pub use crate::call_id::{MAX_CALL_ID_LEN, valid_call_id};
/// Longest function name or namespace (Kubernetes DNS label length).
pub const MAX_NAME_LEN: usize = 63;

/// Where the request body is: in the envelope, or in the blob store by reference. A worker
/// older than the `blob` variant refuses such an envelope as undecodable metadata (it
/// dead-letters it) rather than misreading it as a call with an empty body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BodyLocation {
    /// The body follows the metadata in the same envelope.
    Inline {
        /// Body length in bytes, checked on decode.
        len: u64,
    },
    /// The body is the blob `key` of the blob store ([`crate::blobs`]); nothing follows the
    /// metadata. The key is always the call's request key
    /// (`BlobKey::for_call(call_id, BlobRole::Request)`), checked on decode.
    /// Same wire form as before it carried a [`BlobRef`]: `kind`, `key`, `len`, `sha256` side
    /// by side (the envelope is sealed when encryption is on).
    Blob(BlobRef),
}

impl BodyLocation {
    /// The body's length in bytes, wherever it is.
    pub fn len(&self) -> u64 {
        match self {
            Self::Inline { len } | Self::Blob(BlobRef { len, .. }) => *len,
        }
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the body is in the blob store.
    pub fn is_blob(&self) -> bool {
        matches!(self, Self::Blob { .. })
    }
}

/// Everything about a call except its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallMeta {
    /// Unique id of the call (`X-Call-Id`).
    pub call_id: String,
    /// Function name, without namespace.
    pub function: String,
    /// Namespace from `name.namespace` addressing, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// HTTP method the client used.
    pub method: String,
    /// Raw (still percent-encoded) path after the function name: empty, `/` or `/a/b`.
    #[serde(default)]
    pub path: String,
    /// Raw query string without the leading `?`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Request headers in arrival order, hop-by-hop headers removed. Names are lower-case.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Where to POST the result, if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// When the gateway accepted the call, Unix time in nanoseconds (`X-Start-Time`).
    pub received_at_unix_nanos: u64,
    /// Where the body is.
    pub body: BodyLocation,
    /// Revision of the call record the gateway wrote before queueing the call, so the worker
    /// writes the record's next state without reading it first. Absent (older gateways,
    /// replayed dead letters with a stale one are fine too): the worker reads first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_revision: Option<u64>,
    /// Limits the client set for this call (within the gateway's caps); unset ones are the
    /// worker's settings for the function. An older worker ignores them.
    #[serde(default, skip_serializing_if = "CallOverrides::is_empty")]
    pub overrides: CallOverrides,
    /// A scheduled call (`X-Delay`, `X-Not-Before`): not to be run before this time, Unix
    /// nanoseconds. Optional, and safe for an older worker to ignore because no worker sees a
    /// scheduled call before its time: JetStream keeps it on the delayed stream until a
    /// worker's scheduler moves it onto the calls stream at its time, and the embedded queue
    /// keeps the time in its own delivery state, which older builds already honour. What an
    /// older worker does get wrong is the age: it counts from acceptance, this build from this
    /// time (upgrade the workers before the gateways, as for call ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_unix_nanos: Option<u64>,
}

/// Per-call limits a client asked for: `X-Max-Retries`, `X-Timeout`, `X-Max-Age`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallOverrides {
    /// Retries after the first attempt (`X-Max-Retries: 2`: at most 3 attempts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Longest single invocation, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Oldest the call may be when an attempt starts, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// `X-Priority`: which of the function's lanes the call is queued in (absent: normal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

impl CallOverrides {
    /// Nothing overridden.
    pub fn is_empty(&self) -> bool {
        self.max_retries.is_none()
            && self.timeout_ms.is_none()
            && self.max_age_ms.is_none()
            && self.priority.is_none()
    }
}

/// How urgent a call is (`X-Priority`). Each level of a function is a lane of its own (its own
/// subject: [`crate::backend::call_subject`]); a fair worker serves a function's lanes 4:2:1,
/// so a higher level goes first within the function's share and a lower one still progresses.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Served after the others (weight 1).
    Low,
    /// The default (weight 2).
    #[default]
    Normal,
    /// Served first (weight 4).
    High,
}

impl Priority {
    /// Every level, lowest first.
    pub const ALL: [Self; 3] = [Self::Low, Self::Normal, Self::High];

    /// `low`, `normal`, `high`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Normal => "normal",
            Self::High => "high",
        }
    }

    /// Reads `low`/`normal`/`high` (any case) or `0`/`1`/`2`.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        Self::ALL
            .into_iter()
            .find(|p| value.eq_ignore_ascii_case(p.as_str()) || value == p.digit())
    }

    /// Reads exactly `low`, `normal` or `high` (a subject token).
    pub fn of_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == token)
    }

    fn digit(self) -> &'static str {
        match self {
            Self::Low => "0",
            Self::Normal => "1",
            Self::High => "2",
        }
    }

    /// The subject token after the function's (none for normal, so normal calls keep the
    /// subject of builds without priorities).
    pub fn subject_token(self) -> Option<&'static str> {
        match self {
            Self::Normal => None,
            other => Some(other.as_str()),
        }
    }

    /// The share of a function's pulls this level gets while the others wait too.
    pub fn weight(self) -> u32 {
        match self {
            Self::Low => 1,
            Self::Normal => 2,
            Self::High => 4,
        }
    }
}

impl CallMeta {
    /// When the call was due to run, Unix nanoseconds: its not-before time when it was
    /// scheduled, else its acceptance. A call's age (for `--call-max-age`, `X-Max-Age`) and its
    /// queue wait count from here.
    pub fn due_at_unix_nanos(&self) -> u64 {
        self.not_before_unix_nanos
            .map_or(self.received_at_unix_nanos, |at| {
                at.max(self.received_at_unix_nanos)
            })
    }

    /// Rewrites the function to its canonical identity ([`canonical_function`]): a call
    /// queued by an older gateway, or by hand, is paused, configured and counted as the same
    /// function as every other call of it.
    pub fn canonicalize(&mut self, default_namespace: &str) {
        self.function.make_ascii_lowercase();
        if let Some(ns) = &mut self.namespace {
            ns.make_ascii_lowercase();
        }
        if self
            .namespace
            .as_deref()
            .is_some_and(|ns| ns.eq_ignore_ascii_case(default_namespace))
        {
            self.namespace = None;
        }
    }

    /// `name` or `name.namespace`, as the client addressed the function.
    pub fn qualified_function(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}.{ns}", self.function),
            None => self.function.clone(),
        }
    }
}

/// A decoded queued call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedCall {
    /// Metadata.
    pub meta: CallMeta,
    /// Request body (a zero-copy slice of the message payload when decoded).
    pub body: Bytes,
}

/// Why an envelope could not be decoded. Such a message is dead-lettered, never retried.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed header.
    #[error("message too short for an envelope ({0} bytes)")]
    TooShort(usize),
    /// Does not start with [`MAGIC`].
    #[error("not a queued-call envelope (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error(
        "unsupported envelope version {0} (this build reads versions {FORMAT_VERSION} and {SEALED_FORMAT_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// A sealed call that does not open here (no or other keys, altered).
    #[error("cannot decrypt the call: {0}")]
    Sealed(#[from] OpenError),
    /// A sealed call whose clear metadata disagrees with what it holds.
    #[error("the encrypted call does not match the call id and function stored in clear beside it")]
    ClearMismatch,
    /// Metadata length runs past the end.
    #[error("metadata length {0} exceeds the message")]
    MetadataLength(usize),
    /// Metadata is not valid JSON of the expected shape.
    #[error("invalid metadata: {0}")]
    Metadata(#[from] serde_json::Error),
    /// Body length disagrees with the metadata.
    #[error("body is {actual} bytes but metadata says {declared}")]
    BodyLength {
        /// From the metadata.
        declared: u64,
        /// Found.
        actual: usize,
    },
    /// Metadata decoded but holds values the worker must not act on.
    #[error("invalid call: {0}")]
    Invalid(#[from] InvalidCall),
}

/// A value in a call that must be refused (by the gateway with 400, by the worker as poison).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCall {
    /// Function or namespace name.
    #[error(
        "invalid function name {0:?}: use 1-63 characters of a-z, A-Z, 0-9, '-' and '_', optionally followed by .namespace"
    )]
    FunctionName(String),
    /// Path with dot segments or characters that could change which function is called.
    #[error(
        "invalid path {0:?}: '.' and '..' segments, backslashes and control characters are not allowed"
    )]
    Path(String),
    /// Call id.
    #[error("invalid call id {0:?}: use 1-128 characters of a-z, A-Z, 0-9, '-' and '_'")]
    CallId(String),
    /// Method we do not forward.
    #[error("unsupported method {0:?}")]
    Method(String),
    /// Callback URL.
    #[error("invalid callback URL: {0}")]
    CallbackUrl(String),
    /// A body by reference that is not this call's request blob, or with bytes inline too.
    #[error("invalid body reference: {0}")]
    BodyReference(&'static str),
}

/// Methods the async path accepts and forwards.
pub const METHODS: [&str; 5] = ["POST", "PUT", "PATCH", "DELETE", "GET"];

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && s.chars().all(is_name_char) && !s.starts_with('-')
}

/// A namespace token: a name that is not `_`, the subject token of "no namespace".
pub fn valid_namespace(s: &str) -> bool {
    valid_name(s) && s != "_"
}

/// Splits and checks `name` or `name.namespace`, lower-cased (function and namespace names
/// are DNS labels: `Billing` and `billing` are one function). Namespace `_` is refused: it is
/// the subject token of "no namespace".
pub fn parse_function(addressed: &str) -> Result<(String, Option<String>), InvalidCall> {
    let (name, ns) = match addressed.split_once('.') {
        Some((name, ns)) => (name, Some(ns)),
        None => (addressed, None),
    };
    if !valid_name(name) || ns.is_some_and(|ns| !valid_namespace(ns)) {
        return Err(InvalidCall::FunctionName(addressed.to_owned()));
    }
    Ok((name.to_ascii_lowercase(), ns.map(str::to_ascii_lowercase)))
}

/// The one identity of a function, used for subjects, pause, per-function settings, metrics
/// and records: [`parse_function`] (lower case, `_` refused), and the default namespace
/// written as no namespace, so `billing`, `Billing` and `billing.openfaas-fn` are one function,
/// `billing`.
pub fn canonical_function(
    addressed: &str,
    default_namespace: &str,
) -> Result<(String, Option<String>), InvalidCall> {
    let (name, ns) = parse_function(addressed)?;
    Ok((
        name,
        ns.filter(|ns| !ns.eq_ignore_ascii_case(default_namespace)),
    ))
}

/// Checks the path after the function name. It is appended to the function's URL, so it must
/// not be able to climb out of it (`/../other-function`).
pub fn validate_path(path: &str) -> Result<(), InvalidCall> {
    if path.is_empty() {
        return Ok(());
    }
    let bad = !path.starts_with('/')
        || path
            .chars()
            .any(|c| c.is_control() || c == '\\' || c == ' ')
        || path.split('/').any(|seg| {
            let lower = seg.to_ascii_lowercase();
            // Percent-encoded dots are decoded by some proxies before routing.
            let decoded = lower.replace("%2e", ".");
            decoded == "." || decoded == ".."
        })
        || path.to_ascii_lowercase().contains("%2f")
        || path.to_ascii_lowercase().contains("%5c");
    if bad {
        return Err(InvalidCall::Path(path.to_owned()));
    }
    Ok(())
}

/// Why `id` is not a call id ([`valid_call_id`]), in words for an error body.
pub fn call_id_problem(id: &str) -> Option<String> {
    if id.is_empty() {
        return Some("X-Call-Id is empty".to_owned());
    }
    if id.len() > MAX_CALL_ID_LEN {
        return Some(format!(
            "X-Call-Id is {} bytes long; at most {MAX_CALL_ID_LEN} are accepted",
            id.len()
        ));
    }
    id.bytes().position(|b| !b.is_ascii_graphic()).map(|at| {
        format!(
            "X-Call-Id has a character other than visible ASCII (! to ~) at byte {at}; \
             spaces, control characters and non-ASCII text are not accepted"
        )
    })
}

/// Parses a callback URL: absolute, http or https, with a host.
pub fn parse_callback_url(raw: &str) -> Result<url::Url, InvalidCall> {
    let url = url::Url::parse(raw).map_err(|e| InvalidCall::CallbackUrl(e.to_string()))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(InvalidCall::CallbackUrl(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(InvalidCall::CallbackUrl("URL has no host".to_owned()));
    }
    Ok(url)
}

impl QueuedCall {
    /// Checks everything the worker relies on to build URLs.
    pub fn validate(&self) -> Result<(), InvalidCall> {
        let m = &self.meta;
        if !valid_call_id(&m.call_id) {
            return Err(InvalidCall::CallId(m.call_id.clone()));
        }
        if !valid_name(&m.function)
            || m.namespace
                .as_deref()
                .is_some_and(|ns| !valid_namespace(ns))
        {
            return Err(InvalidCall::FunctionName(m.qualified_function()));
        }
        if !METHODS.contains(&m.method.as_str()) {
            return Err(InvalidCall::Method(m.method.clone()));
        }
        validate_path(&m.path)?;
        if let Some(cb) = &m.callback_url {
            parse_callback_url(cb)?;
        }
        if let BodyLocation::Blob(BlobRef { key, sha256, .. }) = &m.body {
            let expected =
                crate::blobs::BlobKey::for_call(&m.call_id, crate::blobs::BlobRole::Request)
                    .map_err(|_| InvalidCall::BodyReference("the call id has no blob key"))?;
            if key != expected.as_str() {
                return Err(InvalidCall::BodyReference("not this call's request blob"));
            }
            if sha256.len() != 64
                || !sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(InvalidCall::BodyReference(
                    "the digest is not 64 hex digits",
                ));
            }
            if !self.body.is_empty() {
                return Err(InvalidCall::BodyReference(
                    "a stored body with bytes inline",
                ));
            }
        }
        Ok(())
    }

    /// The body's length in bytes, inline or stored.
    pub fn body_len(&self) -> u64 {
        match &self.meta.body {
            BodyLocation::Inline { .. } => self.body.len() as u64,
            BodyLocation::Blob(BlobRef { len, .. }) => *len,
        }
    }

    /// Metadata JSON with the body's real length written in (an inline body's; a stored
    /// body's reference is kept as it is).
    fn meta_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        if self.meta.body.is_blob() {
            return serde_json::to_vec(&self.meta);
        }
        let mut meta = self.meta.clone();
        meta.body = BodyLocation::Inline {
            len: self.body.len() as u64,
        };
        serde_json::to_vec(&meta)
    }

    /// Length of the encoded envelope.
    pub fn encoded_len(&self) -> Result<usize, serde_json::Error> {
        Ok(HEADER_LEN + self.meta_json()?.len() + self.body.len())
    }

    /// Encodes the envelope. The body's length is written into the metadata.
    pub fn encode(&self) -> Result<Bytes, serde_json::Error> {
        let json = self.meta_json()?;
        let meta_len = u32::try_from(json.len()).map_err(|_| {
            serde_json::Error::io(std::io::Error::other("metadata larger than 4 GiB"))
        })?;
        let mut buf = BytesMut::with_capacity(HEADER_LEN + json.len() + self.body.len());
        buf.put_slice(&MAGIC);
        buf.put_u8(FORMAT_VERSION);
        buf.put_u32(meta_len);
        buf.put_slice(&json);
        buf.put_slice(&self.body);
        Ok(buf.freeze())
    }

    /// The envelope, sealed when `sealing` has keys (version 2), in clear when it has none
    /// (version 1).
    pub fn encode_with(&self, sealing: &Sealing) -> Result<Bytes, serde_json::Error> {
        let Some(keys) = sealing.keyring() else {
            return self.encode();
        };
        let inner = self.encode()?;
        let clear = serde_json::to_vec(&ClearMeta {
            call_id: self.meta.call_id.clone(),
            function: self.meta.function.clone(),
            namespace: self.meta.namespace.clone(),
            received_at_unix_nanos: self.meta.received_at_unix_nanos,
            body_bytes: self.body_len(),
            not_before_unix_nanos: self.meta.not_before_unix_nanos,
        })?;
        let clear_len = u32::try_from(clear.len()).map_err(|_| {
            serde_json::Error::io(std::io::Error::other("metadata larger than 4 GiB"))
        })?;
        let mut head = Vec::with_capacity(HEADER_LEN + clear.len());
        head.extend_from_slice(&MAGIC);
        head.push(SEALED_FORMAT_VERSION);
        head.extend_from_slice(&clear_len.to_be_bytes());
        head.extend_from_slice(&clear);
        let mut out = Vec::with_capacity(head.len() + keys.overhead() + inner.len());
        out.extend_from_slice(&head);
        keys.seal_append(Purpose::Call, &head, &inner, &mut out);
        Ok(Bytes::from(out))
    }

    /// Decodes and validates an envelope of either version: a sealed one is opened with
    /// `sealing`'s keys. The body of a version-1 envelope is a zero-copy slice of `payload`.
    pub fn open(payload: &Bytes, sealing: &Sealing) -> Result<Self, DecodeError> {
        match envelope_version(payload)? {
            FORMAT_VERSION => Self::decode_clear(payload),
            _ => {
                let (clear, clear_end) = clear_meta(payload)?;
                let sealed = &payload[clear_end..];
                if !sealing::is_sealed(sealed) {
                    return Err(OpenError::Malformed("version 2 without a sealed value").into());
                }
                let inner = sealing.open(Purpose::Call, &payload[..clear_end], sealed)?;
                let call = Self::decode_clear(&Bytes::from(inner.into_owned()))?;
                if call.meta.call_id != clear.call_id
                    || call.meta.function != clear.function
                    || call.meta.namespace != clear.namespace
                    || call.meta.not_before_unix_nanos != clear.not_before_unix_nanos
                {
                    return Err(DecodeError::ClearMismatch);
                }
                Ok(call)
            }
        }
    }

    /// Decodes and validates an envelope without encryption keys: a sealed one fails with
    /// [`DecodeError::Sealed`].
    pub fn decode(payload: &Bytes) -> Result<Self, DecodeError> {
        Self::open(payload, &Sealing::off())
    }

    fn decode_clear(payload: &Bytes) -> Result<Self, DecodeError> {
        if envelope_version(payload)? != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(payload[4]));
        }
        let meta_len =
            u32::from_be_bytes([payload[5], payload[6], payload[7], payload[8]]) as usize;
        let meta_end = HEADER_LEN
            .checked_add(meta_len)
            .filter(|end| *end <= payload.len())
            .ok_or(DecodeError::MetadataLength(meta_len))?;
        let meta: CallMeta = serde_json::from_slice(&payload[HEADER_LEN..meta_end])?;
        let body = payload.slice(meta_end..);
        // A stored body: `validate` refuses bytes after the metadata.
        if let BodyLocation::Inline { len } = meta.body
            && len != body.len() as u64
        {
            return Err(DecodeError::BodyLength {
                declared: len,
                actual: body.len(),
            });
        }
        let call = Self { meta, body };
        call.validate()?;
        Ok(call)
    }
}

/// What a sealed envelope keeps in clear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearMeta {
    /// The call id.
    pub call_id: String,
    /// Function name, without namespace.
    pub function: String,
    /// Namespace, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// When the gateway accepted the call, Unix nanoseconds.
    pub received_at_unix_nanos: u64,
    /// Request body size.
    pub body_bytes: u64,
    /// Not to be run before this time (a scheduled call), Unix nanoseconds: in clear so the
    /// scheduler needs no keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_unix_nanos: Option<u64>,
}

/// What can be told of an envelope without its keys: enough to list it as a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeSummary {
    /// The call id.
    pub call_id: String,
    /// `name` or `name.namespace`.
    pub function: String,
    /// When the gateway accepted the call, Unix nanoseconds.
    pub received_at_unix_nanos: u64,
    /// Request body size.
    pub body_bytes: u64,
    /// The id of the key it is sealed with, if sealed.
    pub key_id: Option<String>,
    /// Not to be run before this time (a scheduled call), Unix nanoseconds.
    pub not_before_unix_nanos: Option<u64>,
}

impl EnvelopeSummary {
    /// Reads the summary of either version (a sealed envelope is not opened).
    pub fn of(payload: &Bytes) -> Result<Self, DecodeError> {
        if envelope_version(payload)? == FORMAT_VERSION {
            let call = QueuedCall::decode_clear(payload)?;
            let body_bytes = call.body_len();
            return Ok(Self {
                function: call.meta.qualified_function(),
                call_id: call.meta.call_id,
                received_at_unix_nanos: call.meta.received_at_unix_nanos,
                body_bytes,
                key_id: None,
                not_before_unix_nanos: call.meta.not_before_unix_nanos,
            });
        }
        let (clear, clear_end) = clear_meta(payload)?;
        let function = match &clear.namespace {
            Some(ns) => format!("{}.{ns}", clear.function),
            None => clear.function.clone(),
        };
        Ok(Self {
            call_id: clear.call_id,
            function,
            received_at_unix_nanos: clear.received_at_unix_nanos,
            body_bytes: clear.body_bytes,
            key_id: sealing::sealed_key_id(&payload[clear_end..]).map(str::to_owned),
            not_before_unix_nanos: clear.not_before_unix_nanos,
        })
    }
}

/// The version byte of an envelope this build reads.
fn envelope_version(payload: &[u8]) -> Result<u8, DecodeError> {
    if payload.len() < HEADER_LEN {
        return Err(DecodeError::TooShort(payload.len()));
    }
    if payload[..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    match payload[4] {
        v @ (FORMAT_VERSION | SEALED_FORMAT_VERSION) => Ok(v),
        v => Err(DecodeError::UnsupportedVersion(v)),
    }
}

/// The clear metadata of a version-2 envelope and where it ends.
fn clear_meta(payload: &[u8]) -> Result<(ClearMeta, usize), DecodeError> {
    let len = u32::from_be_bytes([payload[5], payload[6], payload[7], payload[8]]) as usize;
    let end = HEADER_LEN
        .checked_add(len)
        .filter(|end| *end <= payload.len())
        .ok_or(DecodeError::MetadataLength(len))?;
    let clear: ClearMeta = serde_json::from_slice(&payload[HEADER_LEN..end])?;
    if !valid_call_id(&clear.call_id) {
        return Err(InvalidCall::CallId(clear.call_id).into());
    }
    Ok((clear, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QueuedCall {
        QueuedCall {
            meta: CallMeta {
                call_id: "0192a7c4-1b2c-7d3e-8f40-123456789abc".into(),
                function: "figlet".into(),
                namespace: Some("team-a".into()),
                method: "POST".into(),
                path: "/render/x".into(),
                query: Some("a=1&b=%20".into()),
                headers: vec![
                    ("content-type".into(), "text/plain".into()),
                    ("x-multi".into(), "1".into()),
                    ("x-multi".into(), "2".into()),
                ],
                callback_url: Some("http://127.0.0.1:9/cb".into()),
                received_at_unix_nanos: 1_700_000_000_000_000_000,
                body: BodyLocation::Inline { len: 0 },
                record_revision: None,
                overrides: Default::default(),
                not_before_unix_nanos: None,
            },
            body: Bytes::from_static(b"\x00\xffbinary body, not base64"),
        }
    }

    #[test]
    fn round_trips_and_keeps_the_body_raw() {
        let call = sample();
        let encoded = call.encode().unwrap();
        assert_eq!(encoded.len(), call.encoded_len().unwrap());
        // The raw body is the tail of the envelope: no base64 inflation.
        assert!(encoded.ends_with(&call.body));
        let decoded = QueuedCall::decode(&encoded).unwrap();
        assert_eq!(decoded.body, call.body);
        assert_eq!(decoded.meta.headers, call.meta.headers);
        assert_eq!(
            decoded.meta.body,
            BodyLocation::Inline {
                len: call.body.len() as u64
            }
        );
        assert_eq!(decoded.meta.qualified_function(), "figlet.team-a");
    }

    #[test]
    fn rejects_garbage_and_unknown_versions() {
        assert!(matches!(
            QueuedCall::decode(&Bytes::from_static(b"hi")),
            Err(DecodeError::TooShort(2))
        ));
        assert!(matches!(
            QueuedCall::decode(&Bytes::from_static(b"{\"json\": true}")),
            Err(DecodeError::BadMagic)
        ));
        let mut v3 = sample().encode().unwrap().to_vec();
        v3[4] = 3;
        assert!(matches!(
            QueuedCall::decode(&Bytes::from(v3)),
            Err(DecodeError::UnsupportedVersion(3))
        ));
        // A version-1 envelope relabelled as version 2 is not a sealed call.
        let mut relabelled = sample().encode().unwrap().to_vec();
        relabelled[4] = 2;
        assert!(QueuedCall::decode(&Bytes::from(relabelled)).is_err());
        let mut long = sample().encode().unwrap().to_vec();
        long[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            QueuedCall::decode(&Bytes::from(long)),
            Err(DecodeError::MetadataLength(_))
        ));
        let mut truncated = sample().encode().unwrap().to_vec();
        truncated.pop();
        assert!(matches!(
            QueuedCall::decode(&Bytes::from(truncated)),
            Err(DecodeError::BodyLength { .. })
        ));
    }

    #[test]
    fn rejects_unknown_body_locations() {
        let call = sample();
        let mut meta = serde_json::to_value(&call.meta).unwrap();
        meta["body"] = serde_json::json!({"kind": "object_store", "key": "x"});
        let json = serde_json::to_vec(&meta).unwrap();
        let mut buf = MAGIC.to_vec();
        buf.push(FORMAT_VERSION);
        buf.extend_from_slice(&u32::try_from(json.len()).unwrap().to_be_bytes());
        buf.extend_from_slice(&json);
        assert!(matches!(
            QueuedCall::decode(&Bytes::from(buf)),
            Err(DecodeError::Metadata(_))
        ));
    }

    fn blob_call() -> QueuedCall {
        let mut call = sample();
        call.body = Bytes::new();
        call.meta.body = BodyLocation::Blob(BlobRef {
            key: format!("{}.request", call.meta.call_id),
            len: 300 * 1024 * 1024,
            sha256: "ab".repeat(32),
        });
        call
    }

    #[test]
    fn bodies_by_reference_round_trip_in_clear_and_sealed() {
        let call = blob_call();
        assert_eq!(call.body_len(), 300 * 1024 * 1024);
        let clear = call.encode().unwrap();
        assert_eq!(clear.len(), call.encoded_len().unwrap());
        assert_eq!(QueuedCall::decode(&clear).unwrap(), call);
        let text = String::from_utf8_lossy(&clear).into_owned();
        assert!(text.contains(r#""body":{"kind":"blob","key":"#), "{text}");
        let sealing = keys(K1);
        let sealed = call.encode_with(&sealing).unwrap();
        assert_eq!(QueuedCall::open(&sealed, &sealing).unwrap(), call);
        let summary = EnvelopeSummary::of(&sealed).unwrap();
        assert_eq!(summary.body_bytes, 300 * 1024 * 1024);
        assert_eq!(
            EnvelopeSummary::of(&clear).unwrap().body_bytes,
            300 * 1024 * 1024
        );
    }

    #[test]
    fn bodies_by_reference_name_their_own_call_and_nothing_inline() {
        type Change = fn(&mut QueuedCall);
        let cases: [(&str, Change); 4] = [
            ("another call's blob", |call| {
                if let BodyLocation::Blob(BlobRef { key, .. }) = &mut call.meta.body {
                    *key = "other.request".into();
                }
            }),
            ("the result blob", |call| {
                if let BodyLocation::Blob(BlobRef { key, .. }) = &mut call.meta.body {
                    *key = key.replace(".request", ".result");
                }
            }),
            ("a digest that is not hex", |call| {
                if let BodyLocation::Blob(BlobRef { sha256, .. }) = &mut call.meta.body {
                    *sha256 = "AB".repeat(32);
                }
            }),
            ("bytes inline too", |call| {
                call.body = Bytes::from_static(b"x");
            }),
        ];
        for (what, change) in cases {
            let mut call = blob_call();
            change(&mut call);
            assert!(
                matches!(call.validate(), Err(InvalidCall::BodyReference(_))),
                "{what}"
            );
            assert!(
                matches!(
                    QueuedCall::decode(&call.encode().unwrap()),
                    Err(DecodeError::Invalid(InvalidCall::BodyReference(_)))
                ),
                "{what}"
            );
        }
    }

    #[test]
    fn hand_made_envelopes_with_dangerous_values_are_invalid() {
        let mut call = sample();
        call.meta.path = "/../admin".into();
        let encoded = call.encode().unwrap();
        assert!(matches!(
            QueuedCall::decode(&encoded),
            Err(DecodeError::Invalid(InvalidCall::Path(_)))
        ));
        let mut call = sample();
        call.meta.function = "a/b".into();
        assert!(call.validate().is_err());
        let mut call = sample();
        call.meta.method = "CONNECT".into();
        assert!(call.validate().is_err());
    }

    #[test]
    fn one_identity_per_function() {
        for same in [
            "billing",
            "Billing",
            "billing.openfaas-fn",
            "BILLING.OpenFaaS-FN",
        ] {
            assert_eq!(
                canonical_function(same, "openfaas-fn").unwrap(),
                ("billing".into(), None),
                "{same}"
            );
        }
        assert_eq!(
            canonical_function("Billing.Team-A", "openfaas-fn").unwrap(),
            ("billing".into(), Some("team-a".into()))
        );
        assert!(canonical_function("billing._", "openfaas-fn").is_err());
        let mut meta = sample().meta;
        meta.function = "Figlet".into();
        meta.namespace = Some("OpenFaaS-FN".into());
        meta.canonicalize("openfaas-fn");
        assert_eq!(meta.qualified_function(), "figlet");
    }

    #[test]
    fn function_names() {
        assert_eq!(parse_function("fn").unwrap(), ("fn".into(), None));
        assert_eq!(
            parse_function("fn_1.openfaas-fn").unwrap(),
            ("fn_1".into(), Some("openfaas-fn".into()))
        );
        for bad in [
            "",
            ".ns",
            "fn.",
            "a.b.c",
            "-x",
            "f n",
            "f%2e",
            &"x".repeat(64),
        ] {
            assert!(parse_function(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn paths() {
        for ok in ["", "/", "/a/b", "/a%20b/", "/a.b/..c/x.."] {
            assert!(validate_path(ok).is_ok(), "{ok:?} should pass");
        }
        for bad in [
            "/..",
            "/a/../b",
            "/./a",
            "/%2e%2E/x",
            "/a%2Fb",
            "/a\\b",
            "/a\nb",
            "x",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn call_ids_and_callback_urls() {
        assert!(valid_call_id("0192a7c4-1b2c-7d3e-8f40-123456789abc"));
        assert!(valid_call_id("job_42"));
        // What OpenFaaS passes through: any visible ASCII, kept as sent.
        for good in [
            "a/b",
            "a.b",
            "order#42@team:a",
            "x=1&y=<2>",
            "~!\"'%",
            &"x".repeat(128),
        ] {
            assert!(valid_call_id(good), "{good:?}");
            assert_eq!(call_id_problem(good), None);
        }
        for bad in ["", "a b", "tab\there", "é", "nl\n", &"x".repeat(129)] {
            assert!(!valid_call_id(bad), "{bad:?}");
            assert!(call_id_problem(bad).is_some(), "{bad:?}");
        }
        assert!(parse_callback_url("https://example.com/hook?x=1").is_ok());
        for bad in [
            "not a url",
            "ftp://example.com/",
            "file:///etc/passwd",
            "/relative",
        ] {
            assert!(parse_callback_url(bad).is_err(), "{bad:?}");
        }
    }

    fn keys(text: &str) -> Sealing {
        Sealing::with_keys(crate::sealing::Keyring::parse(text, "keys").unwrap())
    }

    const K1: &str = "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "k2 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    #[test]
    fn sealed_envelopes_hide_headers_and_body_and_keep_routing_fields_in_clear() {
        let mut call = sample();
        call.body = Bytes::from_static(b"body-marker-7f3a");
        call.meta.body = BodyLocation::Inline { len: 16 };
        call.meta
            .headers
            .push(("x-secret".into(), "header-marker-9c1d".into()));
        let sealing = keys(K1);
        let sealed = call.encode_with(&sealing).unwrap();
        assert_eq!(sealed[4], SEALED_FORMAT_VERSION);
        for marker in [&b"body-marker"[..], b"header-marker", b"/render/x", b"a=1"] {
            assert!(!sealed.windows(marker.len()).any(|w| w == marker));
        }
        assert_eq!(QueuedCall::open(&sealed, &sealing).unwrap(), call);
        // Clear encoding without keys, and clear envelopes still open with keys.
        let clear = call.encode_with(&Sealing::off()).unwrap();
        assert_eq!(clear, call.encode().unwrap());
        assert_eq!(QueuedCall::open(&clear, &sealing).unwrap(), call);
        // The summary needs no keys.
        let summary = EnvelopeSummary::of(&sealed).unwrap();
        assert_eq!(summary.call_id, call.meta.call_id);
        assert_eq!(summary.function, "figlet.team-a");
        assert_eq!(summary.body_bytes, 16);
        assert_eq!(summary.key_id.as_deref(), Some("k1"));
        assert_eq!(EnvelopeSummary::of(&clear).unwrap().key_id, None);
    }

    #[test]
    fn sealed_envelopes_fail_clearly_without_their_key_or_when_altered() {
        let call = QueuedCall::decode(&sample().encode().unwrap()).unwrap();
        let sealed = call.encode_with(&keys(K1)).unwrap();
        assert!(matches!(
            QueuedCall::decode(&sealed),
            Err(DecodeError::Sealed(OpenError::NoKeys(id))) if id == "k1"
        ));
        assert!(matches!(
            QueuedCall::open(&sealed, &keys(K2)),
            Err(DecodeError::Sealed(OpenError::UnknownKey(id))) if id == "k1"
        ));
        // Rotation: k2 current, k1 still listed.
        let rotated = keys(&format!("{K2}\n{K1}"));
        assert_eq!(QueuedCall::open(&sealed, &rotated).unwrap(), call);
        // The clear part is bound: another call id in clear does not open.
        let text = String::from_utf8_lossy(&sealed).into_owned();
        assert!(text.contains(&call.meta.call_id));
        let mut swapped = sealed.to_vec();
        let at = swapped
            .windows(call.meta.call_id.len())
            .position(|w| w == call.meta.call_id.as_bytes())
            .unwrap();
        swapped[at] = if swapped[at] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            QueuedCall::open(&Bytes::from(swapped), &keys(K1)),
            Err(DecodeError::Sealed(OpenError::Authentication(_)))
        ));
        // Truncations never panic.
        for cut in 0..sealed.len() {
            assert!(QueuedCall::open(&sealed.slice(..cut), &keys(K1)).is_err());
        }
    }
}
