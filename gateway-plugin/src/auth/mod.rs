//! Authentication and authorization: one layer in front of every route.
//!
//! Every route of [`crate::routes::routes`] declares a [`Permission`]; the router puts
//! [`crate::authorize::authorize`] in front of each route whose permission is not public. It finds who is
//! calling ([`Authenticator::authenticate`]: OpenFaaS basic auth, a token of the tokens file, a
//! JWT), works out the scope the request needs (the function's namespace, a call's recorded
//! namespace, or every namespace for queue-wide views) and lets the request through only if the
//! caller holds it: `401` with `WWW-Authenticate` without valid credentials, `403` `forbidden`
//! naming the missing scope, `404` for a call of a namespace the caller may not read (the answer
//! an unknown id gets: ids do not leak).
//!
//! With no authenticator configured, the router adds no layer at all (every route is open, as
//! before; the gateway warns at start) and the accept path does no extra work.

pub mod basic;
pub mod jwks;
pub mod jwt;
pub mod policy;
pub mod scope;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use queue_core::settings::parse_duration;

pub use scope::{Action, Needed, Scopes};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Open to anyone (`/healthz`, `/readyz`, `/openapi.json`).
    Public,
    /// `invoke:<namespace of the function in the path>`.
    Invoke,
    /// `read:<namespace of the call's function>` (from the call's record).
    Read,
    /// `cancel:<namespace of the call's function>` (from the call's record).
    Cancel,
    /// `DELETE /async-function/{name}`: `cancel:<namespace of the call>` when `{name}` is the
    /// id of a call with a record (OpenFaaS Pro's cancel, answered as [`Permission::Cancel`]),
    /// else `invoke:<namespace of the function {name}>` (open with `--public invoke`).
    CancelOrInvoke,
    /// `admin:<namespace of the function {name} in the path>`.
    AdminFunction,
    /// `admin:` of at least one namespace: the admin views and operations (dead letters, queue
    /// stats, dashboard), each filtered to the caller's admin namespaces (`crate::tenancy`);
    /// `admin:*` sees the whole queue.
    Admin,
    /// `/metrics`: `admin:*`, or open with `--public metrics`.
    Metrics,
}

/// Routes the operator opens explicitly (`--public`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PublicRoute {
    /// `/async-function/...` (OpenFaaS's default: functions do their own auth).
    Invoke,
    /// `/metrics` (for a Prometheus that scrapes without a token).
    Metrics,
}

/// The authentication settings: flags and environment variables, shared by `gateway-plugin`
/// and `faas-async`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// OpenFaaS basic auth: the user and password in `basic-auth-user` and
    /// `basic-auth-password` under `--secret-mount-path`; that identity holds every scope.
    #[arg(long, env = "basic_auth", action = clap::ArgAction::SetTrue)]
    pub basic_auth: bool,
    /// Directory of the basic-auth files (OpenFaaS's `secret_mount_path`).
    #[arg(long, env = "secret_mount_path", default_value = "/var/secrets")]
    pub secret_mount_path: PathBuf,
    /// API tokens: one a line, `name sha256-hex scope...`; reread when it changes or on SIGHUP.
    #[arg(long, env = "AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// JWT bearer tokens: the signing keys (a JWKS document), read from this file.
    #[arg(long, env = "AUTH_JWKS_FILE", conflicts_with = "jwks_url")]
    pub jwks_file: Option<PathBuf>,
    /// JWT bearer tokens: the signing keys (a JWKS document) fetched from this URL (`https`;
    /// plain `http` only to a loopback address), cached, fetched again every `--jwks-refresh`
    /// and, at most every 30 s, for a token naming an unknown `kid`.
    #[arg(long, env = "AUTH_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// How often the keys of `--jwks-url` are fetched again (sooner when the answer's
    /// `Cache-Control: max-age` is shorter, but not below 30 s).
    #[arg(long, env = "AUTH_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub jwks_refresh: Duration,
    /// PEM file of the CA certificates trusted for `--jwks-url` (a private IdP), instead of
    /// the system's.
    #[arg(long, env = "AUTH_JWKS_CA", value_name = "FILE")]
    pub jwks_ca: Option<PathBuf>,
    /// Scopes for JWTs by their claims (groups, roles, ...): a TOML file of rules, each an
    /// optional issuer, a claim condition and the scopes it adds to the token's own; reread
    /// when it changes or on SIGHUP.
    #[arg(long, env = "AUTH_POLICY_FILE", value_name = "FILE")]
    pub auth_policy_file: Option<PathBuf>,
    /// The accepted JWT `iss` (required with `--jwks-file` or `--jwks-url`).
    #[arg(long, env = "AUTH_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The accepted JWT `aud` (required with `--jwks-file` or `--jwks-url`).
    #[arg(long, env = "AUTH_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on JWT `exp` and `nbf`.
    #[arg(long, env = "AUTH_JWT_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,
    /// Routes open without credentials although an authenticator is configured
    /// (comma-separated: `invoke`, `metrics`).
    #[arg(
        long = "public",
        env = "AUTH_PUBLIC",
        value_delimiter = ',',
        value_enum
    )]
    pub public: Vec<PublicRoute>,
}

/// Authentication settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the tokens file is wrong.
    #[error("{path}, line {line}: {message}")]
    TokensFile {
        /// The file.
        path: PathBuf,
        /// Line number (from 1).
        line: usize,
        /// What is wrong (never the line itself: it might hold a token).
        message: String,
    },
    /// The basic-auth files are unusable.
    #[error("basic auth: {0}")]
    BasicAuth(String),
    /// The JWKS file is unusable.
    #[error("JWKS {path}: {message}")]
    Jwks {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The policy file is unusable.
    #[error("policy file {path}: {message}")]
    Policy {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
    /// Settings that do not go together.
    #[error("{0}")]
    Settings(String),
}

impl AuthError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The basic-auth user, the token's name, or the JWT's `sub`.
    pub subject: String,
    /// `basic`, `token` or `jwt`.
    pub method: &'static str,
    /// What it may do.
    pub scopes: Scopes,
}

/// Why there is no principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No credentials.
    Missing,
    /// Credentials that are not valid (a fixed phrase for the log, never the credentials).
    Invalid(&'static str),
    /// Credentials that cannot be checked yet (the JWT keys of `--jwks-url` not fetched yet):
    /// `503`, not `401`, so a client does not take its token for a bad one.
    Unavailable(&'static str),
}

/// Where the JWT signing keys come from.
enum KeysFrom<'a> {
    File(&'a Path),
    Url(&'a str),
}

/// The configured authenticators.
#[derive(Debug)]
pub struct Authenticator {
    basic: Option<basic::BasicAuth>,
    tokens: Option<tokens::TokenStore>,
    jwt: Option<jwt::JwtVerifier>,
    public_invoke: bool,
    public_metrics: bool,
}

impl Authenticator {
    /// The authenticators `args` configure, or `None` when there are none (everything open).
    pub fn from_args(args: &AuthArgs) -> Result<Option<Self>, AuthError> {
        let basic = match args.basic_auth {
            true => Some(basic::BasicAuth::load(&args.secret_mount_path)?),
            false => None,
        };
        let tokens = match &args.auth_tokens_file {
            Some(path) => Some(tokens::TokenStore::load(path)?),
            None => None,
        };
        let keys = match (&args.jwks_file, &args.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(AuthError::Settings(
                    "give --jwks-file or --jwks-url, not both".into(),
                ));
            }
            (Some(path), None) => Some(KeysFrom::File(path)),
            (None, Some(url)) => Some(KeysFrom::Url(url)),
            (None, None) => None,
        };
        if args.jwks_ca.is_some() && args.jwks_url.is_none() {
            return Err(AuthError::Settings("--jwks-ca is for --jwks-url".into()));
        }
        let jwt = match (keys, &args.jwt_issuer, &args.jwt_audience) {
            (Some(keys), Some(issuer), Some(audience)) => {
                let rules = jwt::JwtRules {
                    issuer: issuer.clone(),
                    audience: audience.clone(),
                    leeway: args.jwt_leeway,
                };
                let verifier = match keys {
                    KeysFrom::File(path) => jwt::JwtVerifier::load(path, &rules)?,
                    KeysFrom::Url(url) => jwt::JwtVerifier::remote(
                        jwks::RemoteJwks::new(url, args.jwks_ca.as_deref(), args.jwks_refresh)?,
                        &rules,
                    ),
                };
                let policy = match &args.auth_policy_file {
                    Some(path) => Some(policy::Policy::load(path, issuer)?),
                    None => None,
                };
                Some(verifier.with_policy(policy))
            }
            (Some(_), _, _) => {
                return Err(AuthError::Settings(
                    "--jwks-file or --jwks-url needs --jwt-issuer and --jwt-audience: a JWT is accepted only for this issuer and audience".into(),
                ));
            }
            (None, None, None) => {
                if args.auth_policy_file.is_some() {
                    return Err(AuthError::Settings(
                        "--auth-policy-file maps JWT claims to scopes: it needs --jwks-file or --jwks-url, --jwt-issuer and --jwt-audience".into(),
                    ));
                }
                None
            }
            (None, _, _) => {
                return Err(AuthError::Settings(
                    "--jwt-issuer and --jwt-audience need --jwks-file or --jwks-url (the keys)"
                        .into(),
                ));
            }
        };
        if basic.is_none() && tokens.is_none() && jwt.is_none() {
            if !args.public.is_empty() {
                tracing::warn!("--public has no effect: no authenticator is configured");
            }
            return Ok(None);
        }
        Ok(Some(Self {
            basic,
            tokens,
            jwt,
            public_invoke: args.public.contains(&PublicRoute::Invoke),
            public_metrics: args.public.contains(&PublicRoute::Metrics),
        }))
    }

    /// Whether a route with `permission` is open without credentials.
    pub fn is_public(&self, permission: Permission) -> bool {
        match permission {
            Permission::Public => true,
            Permission::Invoke => self.public_invoke,
            Permission::Metrics => self.public_metrics,
            // Never: a cancel needs credentials; the authorization layer lets the invocation
            // form through without any when invocation is public.
            Permission::CancelOrInvoke => false,
            _ => false,
        }
    }

    /// The files to reread while the gateway runs (the tokens file, the policy file), for
    /// [`crate::reload::watch`].
    pub fn watched(&self) -> Vec<Arc<dyn crate::reload::Watched>> {
        let mut files = Vec::new();
        if let Some(tokens) = &self.tokens {
            files.push(tokens.watched());
        }
        if let Some(policy) = self.jwt.as_ref().and_then(jwt::JwtVerifier::policy) {
            files.push(policy as Arc<dyn crate::reload::Watched>);
        }
        files
    }

    /// `Err` with the reason while credentials cannot be checked yet (the keys of
    /// `--jwks-url` not fetched yet); `/readyz` says so.
    /// The authenticators configured, as `/readyz` names them (`basic`, `tokens`, `jwt`).
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        if self.basic.is_some() {
            kinds.push("basic");
        }
        if self.tokens.is_some() {
            kinds.push("tokens");
        }
        if self.jwt.is_some() {
            kinds.push("jwt");
        }
        kinds
    }

    pub fn ready(&self) -> Result<(), String> {
        self.jwt.as_ref().map_or(Ok(()), jwt::JwtVerifier::ready)
    }

    /// Who sent a request with `headers`.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Denied> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(Denied::Missing);
        };
        let value = value
            .to_str()
            .map_err(|_| Denied::Invalid("unreadable Authorization header"))?;
        let (scheme, credentials) = value
            .split_once(' ')
            .ok_or(Denied::Invalid("malformed Authorization header"))?;
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let basic = self
                .basic
                .as_ref()
                .ok_or(Denied::Invalid("basic auth is not enabled"))?;
            return match basic.check(credentials) {
                Some(user) => Ok(Principal {
                    subject: user.to_owned(),
                    method: "basic",
                    scopes: Scopes::everything(),
                }),
                None => Err(Denied::Invalid("wrong user or password")),
            };
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Denied::Invalid("unsupported authorization scheme"));
        }
        if let Some((name, scopes)) = self.tokens.as_ref().and_then(|t| t.lookup(credentials)) {
            return Ok(Principal {
                subject: name,
                method: "token",
                scopes,
            });
        }
        match &self.jwt {
            Some(jwt) if credentials.bytes().filter(|b| *b == b'.').count() == 2 => {
                let (subject, scopes) = jwt.verify(credentials).await?;
                Ok(Principal {
                    subject,
                    method: "jwt",
                    scopes,
                })
            }
            _ => Err(Denied::Invalid("unknown token")),
        }
    }

    pub(crate) fn challenge(&self, denied: Denied) -> Vec<HeaderValue> {
        let mut out = Vec::with_capacity(2);
        if self.tokens.is_some() || self.jwt.is_some() {
            out.push(HeaderValue::from_static(match denied {
                Denied::Missing => "Bearer realm=\"faas-async\"",
                Denied::Invalid(_) | Denied::Unavailable(_) => {
                    "Bearer realm=\"faas-async\", error=\"invalid_token\""
                }
            }));
        }
        if self.basic.is_some() {
            out.push(HeaderValue::from_static(
                "Basic realm=\"faas-async\", charset=\"UTF-8\"",
            ));
        }
        out
    }
}

/// With `--jwks-url`: fetches the JWT signing keys and keeps them fresh, until `stop`.
pub async fn follow_jwks(auth: Arc<Authenticator>, stop: tokio_util::sync::CancellationToken) {
    if let Some(verifier) = &auth.jwt {
        jwt::follow(verifier, stop).await;
    }
}
