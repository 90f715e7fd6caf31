//! JWT bearer tokens (OIDC access tokens) validated offline against a JWKS file
//! (`--jwks-file`): RS256 (and the other RSA algorithms), ES256/ES384, EdDSA (Ed25519).
//!
//! - Each key's algorithm is fixed when the file is read (from the key's `alg`, else its type
//!   and curve), never taken from the token: an `HS256` token "signed" with an RSA public key
//!   is refused, and so is `alg: none`. Symmetric (`oct`) keys are refused at start.
//! - A token names its key with `kid`; a token without one, or with one the file does not
//!   have, is refused.
//! - `iss` and `aud` must be the configured ones, `exp` must be there and not past; `nbf`, when
//!   there, must not be ahead; both with a small leeway for clock skew.
//! - Scopes come from `scope` (space-separated) or `scp` (an array, or one string).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::AuthError;
use super::scope::Scopes;

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

/// The keys of a JWKS file, each with its one algorithm.
pub struct JwtVerifier {
    keys: HashMap<String, (DecodingKey, Validation)>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScpClaim {
    List(Vec<String>),
    One(String),
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<ScpClaim>,
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

impl JwtVerifier {
    /// Reads the JWKS file.
    pub fn load(path: &Path, rules: &JwtRules) -> Result<Self, AuthError> {
        let bad = |message: String| AuthError::Jwks {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::io(path, e))?;
        let set: JwkSet =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a JWKS: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                return Err(bad("every key needs a \"kid\"".into()));
            };
            if matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            ) {
                tracing::info!(kid, "JWKS key not for signatures; skipped");
                continue;
            }
            let alg = algorithm_of(&jwk.algorithm, jwk.common.key_algorithm)
                .map_err(|m| bad(format!("key {kid:?}: {m}")))?;
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("key {kid:?}: {e}")))?;
            let mut validation = Validation::new(alg);
            validation.set_issuer(&[&rules.issuer]);
            validation.set_audience(&[&rules.audience]);
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.validate_aud = true;
            validation.leeway = rules.leeway.as_secs();
            if keys.insert(kid.clone(), (key, validation)).is_some() {
                return Err(bad(format!("kid {kid:?} appears twice")));
            }
        }
        if keys.is_empty() {
            return Err(bad("no signature keys".into()));
        }
        Ok(Self { keys })
    }

    /// The subject and scopes of a valid token; else why it is refused (a fixed phrase,
    /// never anything of the token).
    pub fn verify(&self, token: &str) -> Result<(String, Scopes), &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed or alg none")?;
        let kid = header.kid.ok_or("no kid")?;
        let (key, validation) = self.keys.get(&kid).ok_or("unknown kid")?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                ErrorKind::InvalidAlgorithm => "algorithm not allowed for this key",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not valid yet",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::MissingRequiredClaim(_) => "missing exp, iss or aud",
                _ => "invalid token",
            })?;
        let claims = data.claims;
        let scopes = match (&claims.scope, &claims.scp) {
            (Some(scope), _) => Scopes::parse_lenient(scope.split_whitespace()),
            (None, Some(ScpClaim::List(list))) => {
                Scopes::parse_lenient(list.iter().map(String::as_str))
            }
            (None, Some(ScpClaim::One(one))) => Scopes::parse_lenient(one.split_whitespace()),
            (None, None) => Scopes::default(),
        };
        Ok((claims.sub.unwrap_or_else(|| format!("jwt:{kid}")), scopes))
    }
}
