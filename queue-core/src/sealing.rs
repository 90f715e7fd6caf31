//! Encryption at rest: what the system stores of a call's data (queued envelopes, kept results,
//! dead letters, the worker's completed outcomes) is sealed with an AEAD before it reaches a
//! store, and opened after it is read back.
//!
//! - The cipher is XChaCha20-Poly1305 (RustCrypto): 192-bit random nonces, so a key can seal
//!   any number of values without a nonce counter shared between processes.
//! - Keys come by id from a file ([`Keyring::from_file`]): one key a line,
//!   `<key id> <base64 of 32 random bytes>`; `#` comments and blank lines are ignored. The first
//!   key seals, every listed key opens: rotation is "add the new key second on every process,
//!   then move it first, then remove the old one once nothing it sealed is retained".
//! - Every sealed value names its key id and is bound, by associated data, to what it is for
//!   ([`Purpose`]) and to whose it is (the call id, and more where the caller adds it): a
//!   ciphertext cannot be moved to another call or another use without failing to open.
//! - What stays in clear: the sealed value's key id, and whatever the caller keeps beside it
//!   (the envelope keeps call id, function, namespace, time and body size in clear; call
//!   records hold no call data at all).
//!
//! Sealed value layout:
//!
//! ```text
//! offset  size  field
//! 0       4     magic b"FAQS"
//! 4       1     sealed-format version (1)
//! 5       1     key id length K (1..=64)
//! 6       K     key id (ASCII)
//! 6+K     24    nonce
//! 30+K    rest  ciphertext, then the 16-byte Poly1305 tag
//! ```
//!
//! Associated data: the purpose byte, the bytes 0..6+K above, then the caller's context.
//! Keys never appear in `Debug` output, errors or logs.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use chacha20poly1305::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

/// First bytes of every sealed value.
pub const SEALED_MAGIC: [u8; 4] = *b"FAQS";
const SEALED_VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Longest key id.
pub const MAX_KEY_ID_LEN: usize = 64;
const KEY_LEN: usize = 32;

/// What a sealed value is; part of its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A queued call's envelope (headers and body).
    Call = 1,
    /// A kept final response.
    Result = 2,
    /// A completed outcome in the worker's dedup state.
    WorkerState = 3,
    /// One chunk (or the digest) of a large body or result in the blob store
    /// ([`crate::blobs`]).
    Blob = 4,
}

/// Why the keys file cannot be used. Never shows key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error("cannot read the encryption keys file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `<key id> <base64 of 32 bytes>`.
    #[error("encryption keys file {path}, line {line}: {problem}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the key).
        problem: String,
    },
    /// No key in the file.
    #[error(
        "encryption keys file {path} holds no key (expected lines of \"<key id> <base64 of 32 random bytes>\")"
    )]
    Empty {
        /// The file.
        path: String,
    },
}

/// Why a sealed value did not open. A call that fails so is dead-lettered, never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a well-formed sealed value.
    #[error("malformed sealed value: {0}")]
    Malformed(&'static str),
    /// Sealed, but this process has no keys.
    #[error(
        "encrypted with key id {0:?}, but this process has no encryption keys (--encryption-keys-file)"
    )]
    NoKeys(String),
    /// Sealed with a key this process does not have.
    #[error("encrypted with key id {0:?}, which is not in this process's encryption keys file")]
    UnknownKey(String),
    /// The key is known but the value does not authenticate: tampered, or bound to another call.
    #[error("encrypted value (key id {0:?}) failed authentication: altered, or not this call's")]
    Authentication(String),
}

struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The encryption keys of a process: the first seals, all open.
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Keyring {
    /// Reads a keys file (see the module documentation).
    pub fn from_file(path: &Path) -> Result<Self, KeyFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses the text of a keys file; `path` only names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, KeyFileError> {
        let mut keys: Vec<Key> = Vec::new();
        let line_error = |line: usize, problem: String| KeyFileError::Line {
            path: path.to_owned(),
            line,
            problem,
        };
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let mut fields = content.split_whitespace();
            let (Some(id), Some(encoded), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(line_error(
                    line,
                    "expected \"<key id> <base64 of 32 random bytes>\"".to_owned(),
                ));
            };
            if !valid_key_id(id) {
                return Err(line_error(
                    line,
                    format!(
                        "key id {id:?} must be 1-{MAX_KEY_ID_LEN} characters of a-z, A-Z, 0-9, '-', '_' and '.'"
                    ),
                ));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(line_error(line, format!("key id {id:?} is listed twice")));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| line_error(line, format!("the key of {id:?} is not valid base64")))?;
            if bytes.len() != KEY_LEN {
                return Err(line_error(
                    line,
                    format!(
                        "the key of {id:?} is {} bytes; it must be {KEY_LEN} (e.g. `head -c 32 /dev/urandom | base64`)",
                        bytes.len()
                    ),
                ));
            }
            let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
                .map_err(|_| line_error(line, format!("the key of {id:?} is unusable")))?;
            keys.push(Key {
                id: id.to_owned(),
                cipher,
            });
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self { keys })
    }

    /// The id of the key that seals.
    pub fn current_id(&self) -> &str {
        self.keys.first().map_or("", |k| k.id.as_str())
    }

    /// Every key id, the current one first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// Bytes a sealed value adds to its plaintext.
    pub fn overhead(&self) -> usize {
        6 + self.current_id().len() + NONCE_LEN + TAG_LEN
    }

    /// Appends the sealed form of `plaintext` to `out`, bound to `purpose` and `context`.
    pub fn seal_append(
        &self,
        purpose: Purpose,
        context: &[u8],
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) {
        let Some(key) = self.keys.first() else {
            // A keyring is never empty (parse refuses that); nothing to seal with.
            out.extend_from_slice(plaintext);
            return;
        };
        out.reserve(self.overhead() + plaintext.len());
        let start = out.len();
        out.extend_from_slice(&SEALED_MAGIC);
        out.push(SEALED_VERSION);
        // Key ids are at most 64 bytes (checked at parse).
        out.push(u8::try_from(key.id.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(key.id.as_bytes());
        let header_end = out.len();
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        out.extend_from_slice(&nonce);
        let body_start = out.len();
        out.extend_from_slice(plaintext);
        let aad = associated_data(purpose, &out[start..header_end], context);
        let (_, body) = out.split_at_mut(body_start);
        // Encryption in place fails only for plaintexts beyond the cipher's 256 GiB limit.
        match key.cipher.encrypt_in_place_detached(&nonce, &aad, body) {
            Ok(tag) => out.extend_from_slice(&tag),
            Err(_) => {
                out.truncate(start);
                out.extend_from_slice(plaintext);
            }
        }
    }

    /// The sealed form of `plaintext`.
    pub fn seal(&self, purpose: Purpose, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        self.seal_append(purpose, context, plaintext, &mut out);
        out
    }

    /// Opens what [`Keyring::seal`] wrote with the same purpose and context.
    pub fn open(
        &self,
        purpose: Purpose,
        context: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        let parts = SealedParts::parse(sealed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == parts.key_id)
            .ok_or_else(|| OpenError::UnknownKey(parts.key_id.to_owned()))?;
        let aad = associated_data(purpose, parts.header, context);
        let mut plaintext = parts.ciphertext.to_vec();
        key.cipher
            .decrypt_in_place_detached(
                XNonce::from_slice(parts.nonce),
                &aad,
                &mut plaintext,
                Tag::from_slice(parts.tag),
            )
            .map_err(|_| OpenError::Authentication(parts.key_id.to_owned()))?;
        Ok(plaintext)
    }
}

fn associated_data(purpose: Purpose, header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(1 + header.len() + context.len());
    aad.push(purpose as u8);
    aad.extend_from_slice(header);
    aad.extend_from_slice(context);
    aad
}

/// The fields of a sealed value, borrowed.
struct SealedParts<'a> {
    header: &'a [u8],
    key_id: &'a str,
    nonce: &'a [u8],
    ciphertext: &'a [u8],
    tag: &'a [u8],
}

impl<'a> SealedParts<'a> {
    fn parse(sealed: &'a [u8]) -> Result<Self, OpenError> {
        if sealed.get(..4) != Some(&SEALED_MAGIC[..]) {
            return Err(OpenError::Malformed("bad magic"));
        }
        match sealed.get(4) {
            Some(&SEALED_VERSION) => {}
            Some(_) => return Err(OpenError::Malformed("unknown sealed-format version")),
            None => return Err(OpenError::Malformed("truncated")),
        }
        let id_len = usize::from(*sealed.get(5).ok_or(OpenError::Malformed("truncated"))?);
        let header_end = 6 + id_len;
        let key_id = sealed
            .get(6..header_end)
            .and_then(|id| std::str::from_utf8(id).ok())
            .filter(|id| valid_key_id(id))
            .ok_or(OpenError::Malformed("bad key id"))?;
        let rest = &sealed[header_end..];
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Malformed("truncated"));
        }
        let (nonce, rest) = rest.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        Ok(Self {
            header: &sealed[..header_end],
            key_id,
            nonce,
            ciphertext,
            tag,
        })
    }
}

/// Is `stored` a sealed value (by its magic)?
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.starts_with(&SEALED_MAGIC)
}

/// The key id a sealed value names, if it is one.
pub fn sealed_key_id(stored: &[u8]) -> Option<&str> {
    SealedParts::parse(stored).ok().map(|p| p.key_id)
}

/// A process's encryption at rest: off (values stored as they are), or a [`Keyring`].
/// Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Sealing {
    keys: Option<Arc<Keyring>>,
}

impl Sealing {
    /// No encryption: values are stored in clear; sealed values read back fail to open.
    pub fn off() -> Self {
        Self::default()
    }

    /// Encryption with `keys`.
    pub fn with_keys(keys: Keyring) -> Self {
        Self {
            keys: Some(Arc::new(keys)),
        }
    }

    /// From the keys-file setting: off without a file.
    pub fn from_keys_file(path: Option<&Path>) -> Result<Self, KeyFileError> {
        match path {
            Some(path) => Ok(Self::with_keys(Keyring::from_file(path)?)),
            None => Ok(Self::off()),
        }
    }

    /// The keys, when on.
    pub fn keyring(&self) -> Option<&Keyring> {
        self.keys.as_deref()
    }

    /// Whether new values are sealed.
    pub fn is_on(&self) -> bool {
        self.keys.is_some()
    }

    /// Bytes sealing adds to a value (0 when off).
    pub fn overhead(&self) -> usize {
        self.keys.as_deref().map_or(0, Keyring::overhead)
    }

    /// `plaintext` sealed when on; untouched (not copied) when off.
    pub fn seal(&self, purpose: Purpose, context: &[u8], plaintext: bytes::Bytes) -> bytes::Bytes {
        match &self.keys {
            Some(keys) => bytes::Bytes::from(keys.seal(purpose, context, &plaintext)),
            None => plaintext,
        }
    }

    /// Opens a stored value: a sealed one with the keys, anything else (written before
    /// encryption was turned on) as it is.
    pub fn open<'a>(
        &self,
        purpose: Purpose,
        context: &[u8],
        stored: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, OpenError> {
        if !is_sealed(stored) {
            return Ok(Cow::Borrowed(stored));
        }
        match &self.keys {
            Some(keys) => keys.open(purpose, context, stored).map(Cow::Owned),
            None => Err(OpenError::NoKeys(
                sealed_key_id(stored).unwrap_or("?").to_owned(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn ring(text: &str) -> Keyring {
        Keyring::parse(text, "keys").unwrap()
    }

    #[test]
    fn seals_and_opens_bound_to_purpose_and_context() {
        let keys = ring(&format!("# current first\nk1 {K1}\n\nk2 {K2}\n"));
        assert_eq!(keys.current_id(), "k1");
        let sealed = keys.seal(Purpose::Result, b"call-1", b"secret marker");
        assert!(is_sealed(&sealed));
        assert_eq!(sealed.len(), b"secret marker".len() + keys.overhead());
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            keys.open(Purpose::Result, b"call-1", &sealed).unwrap(),
            b"secret marker"
        );
        assert_eq!(
            keys.open(Purpose::Result, b"call-2", &sealed),
            Err(OpenError::Authentication("k1".into()))
        );
        assert_eq!(
            keys.open(Purpose::Call, b"call-1", &sealed),
            Err(OpenError::Authentication("k1".into()))
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 20;
        tampered[last] ^= 1;
        assert!(matches!(
            keys.open(Purpose::Result, b"call-1", &tampered),
            Err(OpenError::Authentication(_))
        ));
        // Two seals of one value differ (random nonces).
        assert_ne!(
            sealed,
            keys.seal(Purpose::Result, b"call-1", b"secret marker")
        );
    }

    #[test]
    fn rotation_opens_with_any_listed_key_and_seals_with_the_first() {
        let old = ring(&format!("k1 {K1}\n"));
        let sealed_old = old.seal(Purpose::Call, b"c", b"queued under k1");
        let rotated = ring(&format!("k2 {K2}\nk1 {K1}\n"));
        assert_eq!(
            rotated.open(Purpose::Call, b"c", &sealed_old).unwrap(),
            b"queued under k1"
        );
        let sealed_new = rotated.seal(Purpose::Call, b"c", b"x");
        assert_eq!(sealed_key_id(&sealed_new), Some("k2"));
        assert_eq!(
            old.open(Purpose::Call, b"c", &sealed_new),
            Err(OpenError::UnknownKey("k2".into()))
        );
        let retired = ring(&format!("k2 {K2}\n"));
        assert_eq!(
            retired.open(Purpose::Call, b"c", &sealed_old),
            Err(OpenError::UnknownKey("k1".into()))
        );
    }

    #[test]
    fn sealing_off_stores_in_clear_and_refuses_sealed_values() {
        let off = Sealing::off();
        assert_eq!(
            off.seal(Purpose::Result, b"c", bytes::Bytes::from_static(b"plain")),
            &b"plain"[..]
        );
        assert_eq!(
            &*off.open(Purpose::Result, b"c", b"plain").unwrap(),
            b"plain"
        );
        let sealed = ring(&format!("k1 {K1}")).seal(Purpose::Result, b"c", b"x");
        assert_eq!(
            off.open(Purpose::Result, b"c", &sealed),
            Err(OpenError::NoKeys("k1".into()))
        );
        let on = Sealing::with_keys(ring(&format!("k1 {K1}")));
        assert_eq!(
            &*on.open(Purpose::Result, b"c", b"old plain").unwrap(),
            b"old plain"
        );
    }

    #[test]
    fn malformed_sealed_values_are_errors_not_panics() {
        let keys = ring(&format!("k1 {K1}"));
        let sealed = keys.seal(Purpose::Result, b"c", b"value");
        for cut in 0..sealed.len() {
            let _ = keys.open(Purpose::Result, b"c", &sealed[..cut]);
        }
        assert_eq!(
            keys.open(Purpose::Result, b"c", b"FAQS"),
            Err(OpenError::Malformed("truncated"))
        );
        assert_eq!(
            keys.open(Purpose::Result, b"c", b"FAQS\x09"),
            Err(OpenError::Malformed("unknown sealed-format version"))
        );
        assert_eq!(
            keys.open(Purpose::Result, b"c", b"FAQS\x01\x05k1"),
            Err(OpenError::Malformed("bad key id"))
        );
    }

    #[test]
    fn key_file_errors_name_the_line_and_never_the_key() {
        let cases = [
            (format!("k1 {K1} extra"), "line 1"),
            ("k1".to_owned(), "expected"),
            (format!("bad/id {K1}"), "key id \"bad/id\""),
            ("k1 not-base64!!".to_owned(), "not valid base64"),
            ("k1 c2hvcnQ=".to_owned(), "is 5 bytes"),
            (format!("k1 {K1}\nk1 {K2}"), "listed twice"),
        ];
        for (text, expected) in cases {
            let err = Keyring::parse(&text, "/etc/keys").unwrap_err().to_string();
            assert!(
                err.contains(expected),
                "{err:?} should contain {expected:?}"
            );
            assert!(
                !err.contains(K1) && !err.contains(K2),
                "{err:?} shows a key"
            );
        }
        assert!(matches!(
            Keyring::parse("# only a comment\n\n", "/etc/keys"),
            Err(KeyFileError::Empty { .. })
        ));
        let debug = format!("{:?}", ring(&format!("k1 {K1}")));
        assert!(debug.contains("k1") && !debug.contains(K1), "{debug}");
    }
}
