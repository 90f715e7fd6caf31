//! JWT bearer tokens (OIDC access tokens) validated against a JWKS: read from a file
//! (`--jwks-file`, offline) or fetched from the issuer (`--jwks-url`, cached): RS256 (and the
//! other RSA algorithms), ES256/ES384, EdDSA (Ed25519).
//!
//! - Each key's algorithm is fixed when the file is read (from the key's `alg`, else its type
//!   and curve), never taken from the token: an `HS256` token "signed" with an RSA public key
//!   is refused, and so is `alg: none`. Symmetric (`oct`) keys are refused at start.
//! - A token names its key with `kid`; a token without one, or with one the keys do not have,
//!   is refused. With `--jwks-url`, an unknown `kid` first makes the gateway fetch the keys
//!   again (the issuer may have rotated them), at most once per
//!   [`super::jwks::KID_REFRESH_INTERVAL`]; the keys are also fetched again every
//!   `--jwks-refresh` ([`follow`]), and the last good ones stay in force while the issuer
//!   cannot be reached.
//! - `iss` and `aud` must be the configured ones, `exp` must be there and not past; `nbf`, when
//!   there, must not be ahead; both with a small leeway for clock skew.
//! - Scopes come from `scope` (space-separated) or `scp` (an array, or one string), and from
//!   the rules of the policy file ([`super::policy`]) that hold for the token's claims.
//! - A token that verified is remembered, by the SHA-256 of the whole token, until its `exp`
//!   and for at most [`VERIFIED_TTL`]: a client that sends the same token with every call pays
//!   for one signature check a minute, not one per call (an RS256 check is ~250 µs of CPU, an
//!   ES256 one more). New keys in force (a `--jwks-url` fetch) forget every remembered token,
//!   and so does a new version of the policy file (the scopes it granted may have changed);
//!   failures are never remembered.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::{KID_REFRESH_INTERVAL, RemoteJwks, next_refresh};
use super::policy::PolicyFile;
use super::scope::Scopes;
use super::{AuthError, Denied};

/// What a JWT must satisfy besides its signature.
#[derive(Debug, Clone)]
pub struct JwtRules {
    /// The one accepted `iss`.
    pub issuer: String,
    /// The one accepted `aud` (a token may name several; one must be this).
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// The keys of a JWKS document, each with its one algorithm.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, (DecodingKey, Validation)>,
}

/// Where the keys come from.
#[derive(Debug)]
enum Source {
    /// `--jwks-file`: read once, at start.
    File,
    /// `--jwks-url`: fetched, then refreshed.
    Remote(Box<Remote>),
}

#[derive(Debug)]
struct Remote {
    jwks: RemoteJwks,
    /// When a token's unknown `kid` last made the gateway fetch the keys (held during that
    /// fetch, so that concurrent unknown `kid`s wait for it instead of fetching too).
    last_kid_fetch: tokio::sync::Mutex<Option<Instant>>,
}

/// Longest a verified token is remembered (never past its `exp`).
pub const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Most tokens remembered; when full, all are forgotten (valid tokens cannot be forged, so this
/// only bounds memory).
const VERIFIED_MAX: usize = 10_000;

/// A token that verified: who it is, what it may do, until when.
#[derive(Debug, Clone)]
struct Verified {
    subject: String,
    scopes: Scopes,
    until: Instant,
    /// The version of the policy file its scopes were granted by.
    policy: u64,
}

/// Verifies JWTs against the keys of a JWKS file or URL.
pub struct JwtVerifier {
    rules: JwtRules,
    keys: RwLock<Arc<KeySet>>,
    source: Source,
    policy: Option<Arc<PolicyFile>>,
    /// Tokens that verified, by the SHA-256 of the token.
    verified: std::sync::Mutex<HashMap<[u8; 32], Verified>>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.current();
        let mut kids: Vec<_> = keys.keys.keys().collect();
        kids.sort();
        f.debug_struct("JwtVerifier")
            .field("kids", &kids)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The one algorithm of a key, from its type, curve and (if given) `alg`.
fn algorithm_of(
    params: &AlgorithmParameters,
    declared: Option<KeyAlgorithm>,
) -> Result<Algorithm, String> {
    let from_type = match params {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref other => return Err(format!("unsupported curve {other:?}")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => Algorithm::EdDSA,
            ref other => return Err(format!("unsupported curve {other:?}")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "symmetric (oct) keys are not accepted: use RSA, EC or Ed25519 keys".into(),
            );
        }
        _ => return Err("unsupported key type".into()),
    };
    let Some(declared) = declared else {
        return Ok(from_type);
    };
    let alg = match declared {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        other => {
            return Err(format!(
                "algorithm {other:?} is not accepted for signatures"
            ));
        }
    };
    if alg.family() != from_type.family() || (from_type != Algorithm::RS256 && alg != from_type) {
        return Err(format!("alg {alg:?} does not fit the key"));
    }
    Ok(alg)
}

impl KeySet {
    /// The signature keys of a JWKS document (an error names the key, never its material).
    fn parse(text: &str, rules: &JwtRules) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                return Err("every key needs a \"kid\"".into());
            };
            if matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            ) {
                tracing::debug!(kid, "JWKS key not for signatures; skipped");
                continue;
            }
            let alg = algorithm_of(&jwk.algorithm, jwk.common.key_algorithm)
                .map_err(|m| format!("key {kid:?}: {m}"))?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
            let mut validation = Validation::new(alg);
            validation.set_issuer(&[&rules.issuer]);
            validation.set_audience(&[&rules.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.validate_aud = true;
            validation.leeway = rules.leeway.as_secs();
            if keys.insert(kid.clone(), (key, validation)).is_some() {
                return Err(format!("kid {kid:?} appears twice"));
            }
        }
        if keys.is_empty() {
            return Err("no signature keys".into());
        }
        Ok(Self { keys })
    }

    fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

impl JwtVerifier {
    /// Reads the JWKS file.
    pub fn load(path: &Path, rules: &JwtRules) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::io(path, e))?;
        let keys = KeySet::parse(&text, rules).map_err(|message| AuthError::Jwks {
            path: path.to_owned(),
            message,
        })?;
        Ok(Self {
            rules: rules.clone(),
            keys: RwLock::new(Arc::new(keys)),
            source: Source::File,
            policy: None,
            verified: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Keys from `remote`: none until [`follow`] has fetched them (JWTs are answered `503`
    /// and [`Self::ready`] says why until then).
    pub fn remote(remote: RemoteJwks, rules: &JwtRules) -> Self {
        Self {
            rules: rules.clone(),
            keys: RwLock::new(Arc::new(KeySet::default())),
            source: Source::Remote(Box::new(Remote {
                jwks: remote,
                last_kid_fetch: tokio::sync::Mutex::new(None),
            })),
            policy: None,
            verified: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Grants scopes by claims too, from `policy`'s rules (the version in force).
    pub fn with_policy(mut self, policy: Option<PolicyFile>) -> Self {
        self.policy = policy.map(Arc::new);
        self
    }

    /// The policy file, for [`crate::reload::watch`].
    pub fn policy(&self) -> Option<Arc<PolicyFile>> {
        self.policy.clone()
    }

    /// The version of the policy file in force (0 without one).
    fn policy_generation(&self) -> u64 {
        self.policy.as_ref().map_or(0, |p| p.generation())
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `Err` with the reason while there are no keys yet (`--jwks-url` not fetched yet).
    pub fn ready(&self) -> Result<(), String> {
        match &self.source {
            Source::Remote(remote) if self.current().keys.is_empty() => Err(format!(
                "the JWT signing keys have not been fetched yet from {}",
                remote.jwks.shown()
            )),
            _ => Ok(()),
        }
    }

    /// Fetches the keys of `--jwks-url` once and puts them in force; returns the answer's
    /// `max-age`. A document that does not parse leaves the keys in force as they were.
    async fn fetch(
        &self,
        remote: &RemoteJwks,
        why: &'static str,
    ) -> Result<Option<Duration>, String> {
        let fetched = remote.fetch().await?;
        let text = std::str::from_utf8(&fetched.body).map_err(|_| "not UTF-8 text".to_owned())?;
        let keys = KeySet::parse(text, &self.rules)?;
        let before = self.current();
        if before.kids() != keys.kids() {
            tracing::info!(url = remote.shown(), why, kids = ?keys.kids(), "JWT signing keys fetched");
        } else {
            tracing::debug!(
                url = remote.shown(),
                why,
                "JWT signing keys fetched, unchanged"
            );
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        // A key may have been withdrawn: what it verified is checked again.
        self.remembered().clear();
        Ok(fetched.max_age)
    }

    /// For a token whose `kid` the keys do not have: fetches the keys again, unless that was
    /// done for an unknown `kid` less than [`KID_REFRESH_INTERVAL`] ago. Whether `kid` is
    /// known afterwards.
    async fn fetch_for_unknown_kid(&self, kid: &str) -> bool {
        let Source::Remote(remote) = &self.source else {
            return false;
        };
        let mut last = remote.last_kid_fetch.lock().await;
        // Another request may have fetched them while this one waited.
        if self.current().keys.contains_key(kid) {
            return true;
        }
        if last.is_some_and(|at| at.elapsed() < KID_REFRESH_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        if let Err(e) = self
            .fetch(&remote.jwks, "a token names an unknown kid")
            .await
        {
            tracing::warn!(url = remote.jwks.shown(), error = %e, "JWT signing keys not fetched again; the keys in force stay");
            return false;
        }
        self.current().keys.contains_key(kid)
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Verified>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The subject and scopes of a valid token; else why it is refused (a fixed phrase,
    /// never anything of the token). A token that verified within [`VERIFIED_TTL`] (and is
    /// not past its `exp`) is not checked again.
    pub async fn verify(&self, token: &str) -> Result<(String, Scopes), Denied> {
        let digest = super::tokens::sha256(token.as_bytes());
        let now = Instant::now();
        // Read before the check: scopes granted by an older policy are never remembered as
        // the new one's.
        let policy = self.policy_generation();
        {
            let mut remembered = self.remembered();
            match remembered.get(&digest) {
                Some(v) if v.until > now && v.policy == policy => {
                    return Ok((v.subject.clone(), v.scopes.clone()));
                }
                Some(_) => {
                    remembered.remove(&digest);
                }
                None => {}
            }
        }
        let (subject, scopes, exp) = self.check(token).await?;
        // Until `exp` (no leeway: stricter than the check), at most the TTL.
        let left = exp
            .and_then(|exp| {
                let now_unix = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_secs();
                exp.checked_sub(now_unix)
            })
            .map_or(Duration::ZERO, Duration::from_secs);
        let keep = left.min(VERIFIED_TTL);
        if !keep.is_zero() {
            let mut remembered = self.remembered();
            if remembered.len() >= VERIFIED_MAX {
                remembered.clear();
            }
            remembered.insert(
                digest,
                Verified {
                    subject: subject.clone(),
                    scopes: scopes.clone(),
                    until: now + keep,
                    policy,
                },
            );
        }
        Ok((subject, scopes))
    }

    /// Checks a token's signature and claims: its subject, scopes and `exp`.
    async fn check(&self, token: &str) -> Result<(String, Scopes, Option<u64>), Denied> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Denied::Invalid("malformed or alg none"))?;
        let kid = header.kid.ok_or(Denied::Invalid("no kid"))?;
        let mut keys = self.current();
        if keys.keys.is_empty() {
            return Err(Denied::Unavailable(
                "the JWT signing keys are not loaded yet",
            ));
        }
        if !keys.keys.contains_key(&kid) {
            if !self.fetch_for_unknown_kid(&kid).await {
                return Err(Denied::Invalid("unknown kid"));
            }
            keys = self.current();
        }
        let (key, validation) = keys.keys.get(&kid).ok_or(Denied::Invalid("unknown kid"))?;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, key, validation).map_err(|e| {
                Denied::Invalid(match e.kind() {
                    ErrorKind::InvalidAlgorithm => "algorithm not allowed for this key",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not valid yet",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::MissingRequiredClaim(_) => "missing exp, iss or aud",
                    _ => "invalid token",
                })
            })?;
        let claims = data.claims;
        let words = |text: &str| Scopes::parse_lenient(text.split_whitespace());
        let mut scopes = match (claims.get("scope"), claims.get("scp")) {
            (Some(Value::String(scope)), _) => words(scope),
            (_, Some(Value::Array(list))) => {
                Scopes::parse_lenient(list.iter().filter_map(Value::as_str))
            }
            (_, Some(Value::String(one))) => words(one),
            _ => Scopes::default(),
        };
        if let Some(policy) = &self.policy {
            let issuer = claims.get("iss").and_then(Value::as_str);
            policy.current().grant(issuer, &claims, &mut scopes);
        }
        let subject = match claims.get("sub").and_then(Value::as_str) {
            Some(sub) => sub.to_owned(),
            None => format!("jwt:{kid}"),
        };
        let exp = claims.get("exp").and_then(Value::as_u64);
        Ok((subject, scopes, exp))
    }
}

/// With `--jwks-url`: fetches the keys at once, then every `--jwks-refresh` (sooner if the
/// answer's `max-age` says so), until `stop`. A failed fetch is retried with a backoff
/// (1 s doubling up to a minute, at most `--jwks-refresh`); the keys in force stay.
pub async fn follow(verifier: &JwtVerifier, stop: tokio_util::sync::CancellationToken) {
    let Source::Remote(remote) = &verifier.source else {
        return;
    };
    let remote = &remote.jwks;
    const FIRST_BACKOFF: Duration = Duration::from_secs(1);
    let max_backoff = remote.refresh.min(Duration::from_secs(60));
    let mut backoff = FIRST_BACKOFF;
    loop {
        let why = match verifier.ready() {
            Ok(()) => "periodic refresh",
            Err(_) => "start",
        };
        let wait = match verifier.fetch(remote, why).await {
            Ok(max_age) => {
                backoff = FIRST_BACKOFF;
                next_refresh(remote.refresh, max_age)
            }
            Err(e) => {
                let retry = humantime::format_duration(backoff).to_string();
                if verifier.ready().is_ok() {
                    tracing::warn!(url = remote.shown(), error = %e, retry, "JWT signing keys not fetched again; the keys fetched before stay in force");
                } else {
                    tracing::error!(url = remote.shown(), error = %e, retry, "JWT signing keys not fetched: JWTs are answered 503 and /readyz is not ready until they are");
                }
                let wait = backoff;
                backoff = (backoff * 2).min(max_backoff);
                wait
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
