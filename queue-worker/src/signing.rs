//! Signed callbacks, [Standard Webhooks]: every callback carries `webhook-id` (the call id:
//! the same on every retry and redelivery of the call's callback, so a receiver can dedup on
//! it), `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`, a
//! space-separated list of signatures of `"{id}.{timestamp}.{body}"`:
//!
//! - `v1,<base64 of HMAC-SHA256(secret, ...)>`, one per symmetric secret of
//!   `--callback-signing-secrets-file`, one `whsec_<base64>` a line (24 to 64 random bytes);
//! - `v1a,<base64 of the 64-byte Ed25519 signature>`, one per private key of
//!   `--callback-signing-keys-file`, one `whsk_<base64>` a line, for receivers that must not
//!   hold a secret: they verify with the public key, `whpk_<base64 of its 32 bytes>`
//!   ([`public_keys`], `queue-worker signing-public-keys`). A `whsk_` key is the base64 of 64
//!   bytes, the 32-byte seed then its public key (the form Standard Webhooks producers print),
//!   or of the 32-byte seed alone (what `openssl genpkey -algorithm ed25519` holds).
//!
//! In both files blank lines and `#` comments are skipped. Every listed key signs, so a key
//! rotates without a gap: add the new one, let receivers take it, remove the old one. A file
//! is looked at again at most once a second and re-read when its modification time or size
//! changed; a file that does not parse keeps the keys in use (with a warning naming the line,
//! never its content). Secrets and private keys are never logged, printed or put in errors.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use ed25519_dalek::{Signer, SigningKey};

/// The prefix of a Standard Webhooks symmetric secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// The prefix of a Standard Webhooks asymmetric (Ed25519) private key.
pub const SIGNING_KEY_PREFIX: &str = "whsk_";
/// The prefix of a Standard Webhooks asymmetric (Ed25519) public key.
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";
/// Shortest secret accepted, in bytes (the specification's range is 24 to 64).
pub const MIN_SECRET_BYTES: usize = 24;
/// Longest secret accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 64;
/// How often a file is looked at for changes, at most, in milliseconds.
const RECHECK_MS: u64 = 1000;

/// The signature headers' names.
pub const WEBHOOK_ID: &str = "webhook-id";
/// Unix seconds of the attempt.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// `v1,<base64>` and `v1a,<base64>` entries.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// The secrets file, as its errors and logs name it.
const SECRETS_FILE: &str = "callback signing secrets file";
/// The private keys file, as its errors and logs name it.
const KEYS_FILE: &str = "callback signing keys file";

/// Why a secrets or keys file cannot be used. Never carries a secret or a key.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The file cannot be read.
    #[error("cannot read the {file} {path}: {source}")]
    Read {
        /// Which file (secrets or keys).
        file: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not a secret (or a key).
    #[error("{file} {path}, line {line}: {reason}")]
    Invalid {
        /// Which file (secrets or keys).
        file: &'static str,
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What the line should be (fixed text, nothing of the line).
        reason: &'static str,
    },
    /// No secret (or key) in the file.
    #[error("{file} {path} holds no {noun}")]
    Empty {
        /// Which file (secrets or keys).
        file: &'static str,
        /// The file.
        path: String,
        /// `secret` or `key`.
        noun: &'static str,
    },
}

/// Receivers' libraries add padding before decoding; accept keys written either way.
fn lenient_base64() -> GeneralPurpose {
    GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// The meaningful lines of a file: 1-based number and trimmed text.
fn lines(content: &str) -> impl Iterator<Item = (usize, &str)> {
    content
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

/// Parses a secrets file's content into HMAC keys (one per secret, in file order).
pub fn parse_secrets(path: &Path, content: &str) -> Result<Vec<ring::hmac::Key>, SecretsError> {
    let engine = lenient_base64();
    let mut keys = Vec::new();
    for (line, text) in lines(content) {
        let invalid = |reason| SecretsError::Invalid {
            file: SECRETS_FILE,
            path: path.display().to_string(),
            line,
            reason,
        };
        if text.starts_with(SIGNING_KEY_PREFIX) || text.starts_with(PUBLIC_KEY_PREFIX) {
            return Err(invalid(
                "an Ed25519 key (whsk_/whpk_): private keys go in --callback-signing-keys-file",
            ));
        }
        let bad = || {
            invalid(
                "not a Standard Webhooks secret (expected whsec_ followed by the base64 of 24 to 64 random bytes)",
            )
        };
        let encoded = text.strip_prefix(SECRET_PREFIX).ok_or_else(bad)?;
        let raw = engine.decode(encoded).map_err(|_| bad())?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&raw.len()) {
            return Err(bad());
        }
        keys.push(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw));
    }
    if keys.is_empty() {
        return Err(SecretsError::Empty {
            file: SECRETS_FILE,
            path: path.display().to_string(),
            noun: "secret",
        });
    }
    Ok(keys)
}

/// Parses a keys file's content into Ed25519 signing keys (in file order). A 64-byte key's
/// second half must be the public key of its first: a key that would sign what its published
/// public key does not verify is refused.
pub fn parse_signing_keys(path: &Path, content: &str) -> Result<Vec<SigningKey>, SecretsError> {
    let engine = lenient_base64();
    let mut keys = Vec::new();
    for (line, text) in lines(content) {
        let invalid = |reason| SecretsError::Invalid {
            file: KEYS_FILE,
            path: path.display().to_string(),
            line,
            reason,
        };
        if text.starts_with(SECRET_PREFIX) {
            return Err(invalid(
                "a symmetric secret (whsec_): secrets go in --callback-signing-secrets-file",
            ));
        }
        if text.starts_with(PUBLIC_KEY_PREFIX) {
            return Err(invalid(
                "a public key (whpk_): this file holds private keys (whsk_); give public keys to receivers",
            ));
        }
        let bad = || {
            invalid(
                "not a Standard Webhooks signing key (expected whsk_ followed by the base64 of 64 bytes, the Ed25519 seed then its public key, or of the 32-byte seed alone)",
            )
        };
        let encoded = text.strip_prefix(SIGNING_KEY_PREFIX).ok_or_else(bad)?;
        let raw = engine.decode(encoded).map_err(|_| bad())?;
        let (seed, public) = match raw.len() {
            32 => (&raw[..], None),
            64 => (&raw[..32], Some(&raw[32..])),
            _ => return Err(bad()),
        };
        let seed: &[u8; 32] = seed.try_into().map_err(|_| bad())?;
        let key = SigningKey::from_bytes(seed);
        if public.is_some_and(|public| public != key.verifying_key().as_bytes()) {
            return Err(invalid(
                "the second half of the key is not the public key of its first (a damaged key?)",
            ));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(SecretsError::Empty {
            file: KEYS_FILE,
            path: path.display().to_string(),
            noun: "key",
        });
    }
    Ok(keys)
}

/// The public key of `key` as receivers configure it: `whpk_<base64 of its 32 bytes>`.
pub fn public_key(key: &SigningKey) -> String {
    let mut text = String::from(PUBLIC_KEY_PREFIX);
    STANDARD.encode_string(key.verifying_key().as_bytes(), &mut text);
    text
}

/// The public keys (`whpk_...`, in file order) of the private keys in the keys file `path`:
/// what to give receivers. What `queue-worker signing-public-keys` prints.
pub fn public_keys(path: &Path) -> Result<Vec<String>, SecretsError> {
    let content = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
        file: KEYS_FILE,
        path: path.display().to_string(),
        source,
    })?;
    Ok(parse_signing_keys(path, &content)?
        .iter()
        .map(public_key)
        .collect())
}

/// Why `signing-public-keys` printed nothing.
#[derive(Debug, thiserror::Error)]
pub enum PublicKeysError {
    /// No keys file given.
    #[error(
        "no signing keys file: give it (signing-public-keys FILE) or set --callback-signing-keys-file (CALLBACK_SIGNING_KEYS_FILE)"
    )]
    NoFile,
    /// The file cannot be used.
    #[error(transparent)]
    Keys(#[from] SecretsError),
    /// The output cannot be written.
    #[error("cannot write the public keys: {0}")]
    Write(#[from] std::io::Error),
}

/// `signing-public-keys`: writes the public key of each private key of the keys file `path`
/// to `out`, one a line. Fails without a file, or with a file that cannot be used (the error
/// names the line, never its content).
pub fn print_public_keys(
    path: Option<&Path>,
    out: &mut impl std::io::Write,
) -> Result<(), PublicKeysError> {
    let path = path.ok_or(PublicKeysError::NoFile)?;
    for key in public_keys(path)? {
        writeln!(out, "{key}")?;
    }
    Ok(())
}

/// What identifies a version of a file: modification time and size.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok(Some((meta.modified()?, meta.len())))
}

struct Loaded<K> {
    keys: Arc<[K]>,
    stamp: Stamp,
}

/// The keys of one file, re-read when it changes.
struct KeyFile<K> {
    /// `SECRETS_FILE` or `KEYS_FILE`.
    file: &'static str,
    path: PathBuf,
    parse: fn(&Path, &str) -> Result<Vec<K>, SecretsError>,
    loaded: RwLock<Loaded<K>>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the next look at the file.
    next_check: AtomicU64,
}

impl<K> KeyFile<K> {
    /// Reads the keys of `path`; fails if the file cannot be read or a line is not a key.
    fn open(
        file: &'static str,
        path: &Path,
        parse: fn(&Path, &str) -> Result<Vec<K>, SecretsError>,
    ) -> Result<Self, SecretsError> {
        let read_error = |source| SecretsError::Read {
            file,
            path: path.display().to_string(),
            source,
        };
        let stamp = stamp(path).map_err(read_error)?;
        let content = std::fs::read_to_string(path).map_err(read_error)?;
        let keys = parse(path, &content)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            parse,
            loaded: RwLock::new(Loaded {
                keys: keys.into(),
                stamp,
            }),
            epoch: Instant::now(),
            next_check: AtomicU64::new(0),
        })
    }

    fn keys(&self) -> Arc<[K]> {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .clone()
    }

    /// The keys to sign with now, after a look at the file if the last one is over a second
    /// old (one atomic load otherwise).
    fn current(&self) -> Arc<[K]> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let due = self.next_check.load(Ordering::Relaxed);
        if now >= due
            && self
                .next_check
                .compare_exchange(
                    due,
                    now.saturating_add(RECHECK_MS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            self.reload_if_changed();
        }
        self.keys()
    }

    fn reload_if_changed(&self) {
        let previous = self
            .loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .stamp;
        let file = self.file;
        let now = match stamp(&self.path) {
            Ok(now) => now,
            Err(e) => {
                if previous.is_some() {
                    tracing::warn!(path = %self.path.display(), error = %e, "{file} unreadable; signing with the keys read before");
                    self.loaded
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .stamp = None;
                }
                return;
            }
        };
        if now == previous {
            return;
        }
        let parsed = std::fs::read_to_string(&self.path)
            .map_err(|source| SecretsError::Read {
                file,
                path: self.path.display().to_string(),
                source,
            })
            .and_then(|content| (self.parse)(&self.path, &content));
        let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        // Remember this version either way: a broken file is reported once, not every second.
        loaded.stamp = now;
        match parsed {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "{file} re-read");
                loaded.keys = keys.into();
            }
            Err(e) => {
                // "callback signing secrets file not re-read", "callback signing keys file ...".
                tracing::warn!(error = %e, "{file} not re-read; signing with the keys read before");
            }
        }
    }
}

/// Signs callbacks with the secrets and private keys of their files, each re-read when it
/// changes.
pub struct CallbackSigner {
    secrets: Option<KeyFile<ring::hmac::Key>>,
    keys: Option<KeyFile<SigningKey>>,
}

impl std::fmt::Debug for CallbackSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are never printed; their number is enough to debug a rotation.
        f.debug_struct("CallbackSigner")
            .field("secrets_file", &self.secrets.as_ref().map(|s| &s.path))
            .field(
                "secrets",
                &self.secrets.as_ref().map_or(0, |s| s.keys().len()),
            )
            .field("keys_file", &self.keys.as_ref().map(|k| &k.path))
            .field("keys", &self.keys.as_ref().map_or(0, |k| k.keys().len()))
            .finish_non_exhaustive()
    }
}

impl CallbackSigner {
    /// Reads the secrets of `path` (symmetric signatures only); fails if the file cannot be
    /// read or a line is not a secret.
    pub fn open(path: &Path) -> Result<Self, SecretsError> {
        Ok(Self {
            secrets: Some(KeyFile::open(SECRETS_FILE, path, parse_secrets)?),
            keys: None,
        })
    }

    /// Reads the secrets file and the private keys file, either optional: `None` when neither
    /// is given (callbacks are not signed). Fails if a file given cannot be read or a line of
    /// it is not a secret (or key).
    pub fn from_files(
        secrets: Option<&Path>,
        keys: Option<&Path>,
    ) -> Result<Option<Self>, SecretsError> {
        let secrets = secrets
            .map(|path| KeyFile::open(SECRETS_FILE, path, parse_secrets))
            .transpose()?;
        let keys = keys
            .map(|path| KeyFile::open(KEYS_FILE, path, parse_signing_keys))
            .transpose()?;
        Ok((secrets.is_some() || keys.is_some()).then_some(Self { secrets, keys }))
    }

    /// The three Standard Webhooks headers for one attempt of the callback `msg_id` at
    /// `timestamp` (Unix seconds) with `body`: the `v1` signatures first, then the `v1a` ones,
    /// each in file order.
    pub fn headers(
        &self,
        msg_id: &str,
        timestamp: u64,
        body: &[u8],
    ) -> [(&'static str, String); 3] {
        let mut draft = self.begin(msg_id, timestamp);
        draft.update(body);
        draft.finish()
    }

    /// [`CallbackSigner::headers`] over a body given piece by piece
    /// ([`SignatureDraft::update`]): the `v1` (HMAC) signatures are computed as the pieces
    /// come; the `v1a` (Ed25519) ones need the whole message, which is kept for them only
    /// when such keys are configured.
    pub fn begin(&self, msg_id: &str, timestamp: u64) -> SignatureDraft {
        let timestamp = timestamp.to_string();
        let secrets = self.secrets.as_ref().map(KeyFile::current);
        let keys = self.keys.as_ref().map(KeyFile::current);
        let mut prefix = Vec::with_capacity(msg_id.len() + timestamp.len() + 2);
        prefix.extend_from_slice(msg_id.as_bytes());
        prefix.push(b'.');
        prefix.extend_from_slice(timestamp.as_bytes());
        prefix.push(b'.');
        let hmacs = secrets
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .map(|key| {
                let mut ctx = ring::hmac::Context::with_key(key);
                ctx.update(&prefix);
                ctx
            })
            .collect();
        let keys = keys.filter(|k| !k.is_empty());
        SignatureDraft {
            msg_id: msg_id.to_owned(),
            timestamp,
            hmacs,
            // Ed25519 signs the whole message at once (it hashes it twice): one copy, shared
            // by every key.
            message: keys.is_some().then_some(prefix),
            keys,
        }
    }
}

/// A signature being computed over a body that comes in pieces ([`CallbackSigner::begin`]).
pub struct SignatureDraft {
    msg_id: String,
    timestamp: String,
    hmacs: Vec<ring::hmac::Context>,
    keys: Option<Arc<[SigningKey]>>,
    message: Option<Vec<u8>>,
}

impl std::fmt::Debug for SignatureDraft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No key material, no body.
        f.debug_struct("SignatureDraft")
            .field("msg_id", &self.msg_id)
            .finish_non_exhaustive()
    }
}

impl SignatureDraft {
    /// The next piece of the body.
    pub fn update(&mut self, piece: &[u8]) {
        for ctx in &mut self.hmacs {
            ctx.update(piece);
        }
        if let Some(message) = &mut self.message {
            message.extend_from_slice(piece);
        }
    }

    /// The three headers.
    pub fn finish(self) -> [(&'static str, String); 3] {
        let keys = self.keys.as_deref().unwrap_or(&[]);
        let mut signature = String::with_capacity(self.hmacs.len() * 48 + keys.len() * 94);
        for ctx in self.hmacs {
            if !signature.is_empty() {
                signature.push(' ');
            }
            signature.push_str("v1,");
            STANDARD.encode_string(ctx.sign().as_ref(), &mut signature);
        }
        if let Some(message) = &self.message {
            for key in keys {
                if !signature.is_empty() {
                    signature.push(' ');
                }
                signature.push_str("v1a,");
                STANDARD.encode_string(key.sign(message).to_bytes(), &mut signature);
            }
        }
        [
            (WEBHOOK_ID, self.msg_id),
            (WEBHOOK_TIMESTAMP, self.timestamp),
            (WEBHOOK_SIGNATURE, signature),
        ]
    }
}

/// Unix seconds now.
pub fn unix_seconds_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    // The example of the Standard Webhooks specification (and of its reference libraries).
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: u64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    // RFC 8032, section 7.1, test 1: an Ed25519 seed and its public key.
    const RFC_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// `whsk_` with the seed alone (32 bytes) and with the seed and public key (64 bytes).
    fn rfc_keys() -> (String, String) {
        let seed = hex(RFC_SEED);
        let mut full = seed.clone();
        full.extend(hex(RFC_PUBLIC));
        (
            format!("whsk_{}", STANDARD.encode(&seed)),
            format!("whsk_{}", STANDARD.encode(&full)),
        )
    }

    fn signer_with(content: &str) -> (tempfile::TempDir, CallbackSigner) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(&path, content).unwrap();
        let signer = CallbackSigner::open(&path).unwrap();
        (dir, signer)
    }

    fn key_signer_with(secrets: Option<&str>, keys: &str) -> (tempfile::TempDir, CallbackSigner) {
        let dir = tempfile::tempdir().unwrap();
        let keys_path = dir.path().join("keys");
        std::fs::write(&keys_path, keys).unwrap();
        let secrets_path = dir.path().join("secrets");
        if let Some(secrets) = secrets {
            std::fs::write(&secrets_path, secrets).unwrap();
        }
        let signer = CallbackSigner::from_files(
            secrets.map(|_| secrets_path.as_path()),
            Some(keys_path.as_path()),
        )
        .unwrap()
        .unwrap();
        (dir, signer)
    }

    fn verifies(public: &str, signature: &str, message: &[u8]) -> bool {
        let public: [u8; 32] = STANDARD
            .decode(public.strip_prefix(PUBLIC_KEY_PREFIX).unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let signature: [u8; 64] = STANDARD
            .decode(signature.strip_prefix("v1a,").unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        ed25519_dalek::VerifyingKey::from_bytes(&public)
            .unwrap()
            .verify_strict(message, &ed25519_dalek::Signature::from_bytes(&signature))
            .is_ok()
    }

    #[test]
    fn signs_the_specification_example() {
        let (_dir, signer) = signer_with(&format!("# comment\n\n  {SPEC_SECRET}  \n"));
        let [id, ts, sig] = signer.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        assert_eq!(id, (WEBHOOK_ID, SPEC_ID.to_owned()));
        assert_eq!(ts, (WEBHOOK_TIMESTAMP, SPEC_TIMESTAMP.to_string()));
        assert_eq!(sig, (WEBHOOK_SIGNATURE, SPEC_SIGNATURE.to_owned()));
    }

    #[test]
    fn every_secret_signs_in_file_order() {
        let other = format!("whsec_{}", STANDARD.encode([7u8; 32]));
        let (_dir, signer) = signer_with(&format!("{other}\n{SPEC_SECRET}\n"));
        let [_, _, (_, sig)] = signer.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts[0].starts_with("v1,") && parts[0] != SPEC_SIGNATURE);
        assert_eq!(parts[1], SPEC_SIGNATURE);
    }

    #[test]
    fn both_key_forms_give_the_rfc_public_key_and_the_same_signature() {
        let (short, full) = rfc_keys();
        let (dir, signer) = key_signer_with(None, &format!("{short}\n{full}\n"));
        let expected = format!("whpk_{}", STANDARD.encode(hex(RFC_PUBLIC)));
        assert_eq!(
            public_keys(&dir.path().join("keys")).unwrap(),
            [expected.clone(), expected.clone()]
        );
        let [_, _, (_, sig)] = signer.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        // Ed25519 is deterministic: one seed, one signature.
        assert_eq!(parts[0], parts[1]);
        assert_eq!(parts[0].len(), "v1a,".len() + 88, "{}", parts[0]);
        let message = [SPEC_ID.as_bytes(), b".1614265330.", SPEC_BODY].concat();
        assert!(verifies(&expected, parts[0], &message));
        let tampered = [SPEC_ID.as_bytes(), b".1614265331.", SPEC_BODY].concat();
        assert!(!verifies(&expected, parts[0], &tampered));
    }

    #[test]
    fn secrets_and_keys_sign_together_v1_first() {
        let (short, _) = rfc_keys();
        let other = SigningKey::from_bytes(&[3u8; 32]);
        let other_key = format!("whsk_{}", STANDARD.encode(other.as_bytes()));
        let (_dir, signer) = key_signer_with(
            Some(&format!("{SPEC_SECRET}\n")),
            &format!("{short}\n{other_key}\n"),
        );
        let [_, _, (_, sig)] = signer.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY);
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 3, "{sig}");
        assert_eq!(parts[0], SPEC_SIGNATURE);
        let message = [SPEC_ID.as_bytes(), b".1614265330.", SPEC_BODY].concat();
        let rfc_public = format!("whpk_{}", STANDARD.encode(hex(RFC_PUBLIC)));
        assert!(verifies(&rfc_public, parts[1], &message));
        assert!(!verifies(&rfc_public, parts[2], &message));
        assert!(verifies(&public_key(&other), parts[2], &message));
        let debug = format!("{signer:?}");
        assert!(
            debug.contains("keys: 2") && debug.contains("secrets: 1"),
            "{debug}"
        );
        assert!(
            !debug.contains("whsk_") && !debug.contains("whsec_"),
            "{debug}"
        );
    }

    #[test]
    fn bad_files_are_refused_without_showing_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        let short = format!("whsec_{}", STANDARD.encode([1u8; 8]));
        for (content, line) in [
            (format!("{SPEC_SECRET}\nsecret-without-prefix\n"), Some(2)),
            ("whsec_not base64!\n".to_owned(), Some(1)),
            (format!("{short}\n"), Some(1)),
            (format!("{}\n", rfc_keys().0), Some(1)),
            ("# only a comment\n\n".to_owned(), None),
        ] {
            std::fs::write(&path, &content).unwrap();
            let err = CallbackSigner::open(&path).unwrap_err();
            let text = err.to_string();
            match line {
                Some(n) => assert!(
                    matches!(err, SecretsError::Invalid { line, .. } if line == n),
                    "{text}"
                ),
                None => assert!(matches!(err, SecretsError::Empty { .. }), "{text}"),
            }
            for secret_part in [
                "MfKQ9r8G",
                "secret-without-prefix",
                "not base64",
                &short[6..],
                &rfc_keys().0[5..20],
            ] {
                assert!(!text.contains(secret_part), "{text}");
            }
        }
        assert!(matches!(
            CallbackSigner::open(&dir.path().join("missing")),
            Err(SecretsError::Read { .. })
        ));
    }

    #[test]
    fn bad_key_files_are_refused_without_showing_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let (short, full) = rfc_keys();
        // A 64-byte key whose public half belongs to another seed.
        let mut mismatched = hex(RFC_SEED);
        mismatched.extend(
            SigningKey::from_bytes(&[5u8; 32])
                .verifying_key()
                .as_bytes(),
        );
        let mismatched = format!("whsk_{}", STANDARD.encode(&mismatched));
        let public = format!("whpk_{}", STANDARD.encode(hex(RFC_PUBLIC)));
        let truncated = full[..full.len() - 8].to_owned();
        for (content, line, reason) in [
            (format!("{short}\n{mismatched}\n"), 2, "not the public key"),
            (format!("{public}\n"), 1, "a public key"),
            (
                format!("{SPEC_SECRET}\n"),
                1,
                "--callback-signing-secrets-file",
            ),
            (
                format!("{truncated}\n"),
                1,
                "not a Standard Webhooks signing key",
            ),
            (
                "whsk_!!!\n".to_owned(),
                1,
                "not a Standard Webhooks signing key",
            ),
        ] {
            std::fs::write(&path, &content).unwrap();
            let err = CallbackSigner::from_files(None, Some(&path)).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, SecretsError::Invalid { line: l, .. } if l == line),
                "{text}"
            );
            assert!(text.contains(reason), "{text}");
            assert!(text.starts_with("callback signing keys file "), "{text}");
            for key_part in [&short[5..20], &full[5..20], &public[5..20], "MfKQ9r8G"] {
                assert!(!text.contains(key_part), "{text}");
            }
        }
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(matches!(
            public_keys(&path),
            Err(SecretsError::Empty { noun: "key", .. })
        ));
        assert!(CallbackSigner::from_files(None, None).unwrap().is_none());
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_old_secrets() {
        let (dir, signer) = signer_with(&format!("{SPEC_SECRET}\n"));
        let path = dir.path().join("secrets");
        let due_now = |s: &CallbackSigner| {
            s.secrets
                .as_ref()
                .unwrap()
                .next_check
                .store(0, Ordering::Relaxed);
        };
        let sig = |s: &CallbackSigner| s.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)[2].1.clone();
        assert_eq!(sig(&signer), SPEC_SIGNATURE);
        let new = format!("whsec_{}", STANDARD.encode([9u8; 40]));
        std::fs::write(&path, format!("{new}\n")).unwrap();
        // Due at once (as if a second had passed).
        due_now(&signer);
        let rotated = sig(&signer);
        assert_ne!(rotated, SPEC_SIGNATURE);
        assert_eq!(rotated.split(' ').count(), 1);
        std::fs::write(&path, "garbage that is longer than before\n").unwrap();
        due_now(&signer);
        assert_eq!(
            sig(&signer),
            rotated,
            "a broken file keeps the secrets in use"
        );
        assert!(!format!("{signer:?}").contains("whsec_"));
    }

    #[test]
    fn a_changed_keys_file_is_read_again() {
        let (short, _) = rfc_keys();
        let other = format!("whsk_{}", STANDARD.encode([4u8; 32]));
        let (dir, signer) = key_signer_with(None, &format!("{short}\n{other}\n"));
        let path = dir.path().join("keys");
        let sig = |s: &CallbackSigner| s.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)[2].1.clone();
        let both = sig(&signer);
        assert_eq!(both.split(' ').count(), 2);
        std::fs::write(&path, format!("# rotated\n{other}\n")).unwrap();
        signer
            .keys
            .as_ref()
            .unwrap()
            .next_check
            .store(0, Ordering::Relaxed);
        let rotated = sig(&signer);
        assert_eq!(rotated, both.split(' ').nth(1).unwrap());
    }
}
