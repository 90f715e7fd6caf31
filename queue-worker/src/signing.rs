//! Signed callbacks, [Standard Webhooks] v1: every callback carries `webhook-id` (the call id:
//! the same on every retry and redelivery of the call's callback, so a receiver can dedup on
//! it), `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`, one
//! `v1,<base64 of HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>` per configured secret,
//! separated by spaces.
//!
//! Secrets come from a file (`--callback-signing-secrets-file`), one `whsec_<base64>` a line
//! (24 to 64 random bytes; blank lines and `#` comments are skipped). Every listed secret signs,
//! so a key rotates without a gap: add the new secret, let receivers take it, remove the old
//! one. The file is looked at again at most once a second and re-read when its modification
//! time or size changed; a file that does not parse keeps the secrets in use (with a warning
//! naming the line, never its content). Secrets are never logged, printed or put in errors.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// The prefix of a Standard Webhooks symmetric secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Shortest secret accepted, in bytes (the specification's range is 24 to 64).
pub const MIN_SECRET_BYTES: usize = 24;
/// Longest secret accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 64;
/// How often the file is looked at for changes, at most, in milliseconds.
const RECHECK_MS: u64 = 1000;

/// The signature headers' names.
pub const WEBHOOK_ID: &str = "webhook-id";
/// Unix seconds of the attempt.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// `v1,<base64>` entries.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Why the secrets file cannot be used. Never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The file cannot be read.
    #[error("cannot read the callback signing secrets file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not a secret.
    #[error(
        "callback signing secrets file {path}, line {line}: not a Standard Webhooks secret (expected whsec_ followed by the base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes)"
    )]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
    /// No secret in the file.
    #[error("callback signing secrets file {path} holds no secret")]
    Empty {
        /// The file.
        path: String,
    },
}

/// Parses a secrets file's content into HMAC keys (one per secret, in file order).
pub fn parse_secrets(path: &Path, content: &str) -> Result<Vec<ring::hmac::Key>, SecretsError> {
    // Receivers' libraries add padding before decoding; accept secrets written either way.
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let mut keys = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let invalid = || SecretsError::Invalid {
            path: path.display().to_string(),
            line: i + 1,
        };
        let encoded = line.strip_prefix(SECRET_PREFIX).ok_or_else(invalid)?;
        let raw = engine.decode(encoded).map_err(|_| invalid())?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&raw.len()) {
            return Err(invalid());
        }
        keys.push(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw));
    }
    if keys.is_empty() {
        return Err(SecretsError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(keys)
}

/// What identifies a version of the file: modification time and size.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok(Some((meta.modified()?, meta.len())))
}

#[derive(Clone)]
struct Loaded {
    keys: Arc<[ring::hmac::Key]>,
    stamp: Stamp,
}

/// Signs callbacks with the secrets of a file, re-read when it changes.
pub struct CallbackSigner {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the next look at the file.
    next_check: AtomicU64,
}

impl std::fmt::Debug for CallbackSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are never printed; their number is enough to debug a rotation.
        f.debug_struct("CallbackSigner")
            .field("path", &self.path)
            .field("secrets", &self.keys().len())
            .finish_non_exhaustive()
    }
}

impl CallbackSigner {
    /// Reads the secrets of `path`; fails if the file cannot be read or a line is not a secret.
    pub fn open(path: &Path) -> Result<Self, SecretsError> {
        let read_error = |source| SecretsError::Read {
            path: path.display().to_string(),
            source,
        };
        let stamp = stamp(path).map_err(read_error)?;
        let content = std::fs::read_to_string(path).map_err(read_error)?;
        let keys = parse_secrets(path, &content)?;
        Ok(Self {
            path: path.to_owned(),
            loaded: RwLock::new(Loaded {
                keys: keys.into(),
                stamp,
            }),
            epoch: Instant::now(),
            next_check: AtomicU64::new(0),
        })
    }

    fn keys(&self) -> Arc<[ring::hmac::Key]> {
        self.loaded
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .clone()
    }

    /// The keys to sign with now, after a look at the file if the last one is over a second
    /// old (one atomic load otherwise).
    fn current(&self) -> Arc<[ring::hmac::Key]> {
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
        let now = match stamp(&self.path) {
            Ok(now) => now,
            Err(e) => {
                if previous.is_some() {
                    tracing::warn!(path = %self.path.display(), error = %e, "callback signing secrets file unreadable; signing with the secrets read before");
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
                path: self.path.display().to_string(),
                source,
            })
            .and_then(|content| parse_secrets(&self.path, &content));
        let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        // Remember this version either way: a broken file is reported once, not every second.
        loaded.stamp = now;
        match parsed {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), secrets = keys.len(), "callback signing secrets re-read");
                loaded.keys = keys.into();
            }
            Err(e) => {
                tracing::warn!(error = %e, "callback signing secrets not re-read; signing with the secrets read before");
            }
        }
    }

    /// The three Standard Webhooks headers for one attempt of the callback `msg_id` at
    /// `timestamp` (Unix seconds) with `body`.
    pub fn headers(
        &self,
        msg_id: &str,
        timestamp: u64,
        body: &[u8],
    ) -> [(&'static str, String); 3] {
        let timestamp = timestamp.to_string();
        let keys = self.current();
        let mut signature = String::with_capacity(keys.len() * 48);
        for key in keys.iter() {
            let mut ctx = ring::hmac::Context::with_key(key);
            ctx.update(msg_id.as_bytes());
            ctx.update(b".");
            ctx.update(timestamp.as_bytes());
            ctx.update(b".");
            ctx.update(body);
            if !signature.is_empty() {
                signature.push(' ');
            }
            signature.push_str("v1,");
            STANDARD.encode_string(ctx.sign().as_ref(), &mut signature);
        }
        [
            (WEBHOOK_ID, msg_id.to_owned()),
            (WEBHOOK_TIMESTAMP, timestamp),
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

    fn signer_with(content: &str) -> (tempfile::TempDir, CallbackSigner) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(&path, content).unwrap();
        let signer = CallbackSigner::open(&path).unwrap();
        (dir, signer)
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
    fn bad_files_are_refused_without_showing_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        let short = format!("whsec_{}", STANDARD.encode([1u8; 8]));
        for (content, line) in [
            (format!("{SPEC_SECRET}\nsecret-without-prefix\n"), Some(2)),
            ("whsec_not base64!\n".to_owned(), Some(1)),
            (format!("{short}\n"), Some(1)),
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
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_old_secrets() {
        let (dir, signer) = signer_with(&format!("{SPEC_SECRET}\n"));
        let path = dir.path().join("secrets");
        let sig = |s: &CallbackSigner| s.headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)[2].1.clone();
        assert_eq!(sig(&signer), SPEC_SIGNATURE);
        let new = format!("whsec_{}", STANDARD.encode([9u8; 40]));
        std::fs::write(&path, format!("{new}\n")).unwrap();
        // Due at once (as if a second had passed).
        signer.next_check.store(0, Ordering::Relaxed);
        let rotated = sig(&signer);
        assert_ne!(rotated, SPEC_SIGNATURE);
        assert_eq!(rotated.split(' ').count(), 1);
        std::fs::write(&path, "garbage that is longer than before\n").unwrap();
        signer.next_check.store(0, Ordering::Relaxed);
        assert_eq!(
            sig(&signer),
            rotated,
            "a broken file keeps the secrets in use"
        );
        assert!(!format!("{signer:?}").contains("whsec_"));
    }
}
