//! The settings both binaries share (NATS connection and names, stream limits, call records,
//! logging) as plain structs, and the parsers of durations and sizes every setting uses.
//!
//! The backends take these structs as they are. With the `cli` feature the same structs are
//! also clap argument groups (flag + environment variable each), which the binaries' config
//! modules flatten into their own: one definition, so the gateway and the workers read the same
//! names, and the core itself never needs clap.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Parses a humantime duration (`500ms`, `30s`, `5m`, `1h 30m`). A bare number is seconds,
/// as OpenFaaS's Go durations are often written that way in old charts.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30s, 5m, 1h)"))
}

/// Parses a byte size: `1048576`, `512KiB`, `1MiB`, `2MB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (expected e.g. 1048576, 512KiB, 1MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// How to reach NATS. Shared by both binaries.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[cfg_attr(
        feature = "cli",
        arg(
            long,
            global = true,
            env = "NATS_URL",
            default_value = "nats://127.0.0.1:4222"
        )
    )]
    pub nats_url: String,
    /// Name of the JetStream stream holding queued calls.
    #[cfg_attr(
        feature = "cli",
        arg(
            long,
            global = true,
            env = "ASYNC_STREAM",
            default_value = "faas-async"
        )
    )]
    pub stream: String,
    /// Subject prefix: calls are published on `<prefix>.<namespace or _>.<function>`.
    #[cfg_attr(
        feature = "cli",
        arg(
            long,
            global = true,
            env = "ASYNC_SUBJECT_PREFIX",
            default_value = "faas-async"
        )
    )]
    pub subject_prefix: String,
    /// Stream receiving dead letters (undecodable messages).
    #[cfg_attr(
        feature = "cli",
        arg(
            long,
            env = "ASYNC_DEAD_LETTER_STREAM",
            default_value = "faas-async-dead"
        )
    )]
    pub dead_letter_stream: String,
    /// How long a JetStream API request or publish acknowledgement may take.
    #[cfg_attr(feature = "cli", arg(long, global = true, env = "NATS_REQUEST_TIMEOUT", default_value = "5s", value_parser = parse_duration))]
    pub nats_request_timeout: Duration,
    /// PEM file of the certificate authority (or authorities) that signed the NATS server's
    /// certificate; TLS is then required. Without it, a server that requires TLS is checked
    /// against the system's authorities.
    #[cfg_attr(
        feature = "cli",
        arg(long, global = true, env = "NATS_CA", value_name = "FILE")
    )]
    pub nats_ca: Option<PathBuf>,
    /// PEM file of the client certificate presented to a NATS server that verifies clients
    /// (with `--nats-key`; TLS is then required).
    #[cfg_attr(
        feature = "cli",
        arg(long, global = true, env = "NATS_CERT", value_name = "FILE")
    )]
    pub nats_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key (with `--nats-cert`).
    #[cfg_attr(
        feature = "cli",
        arg(long, global = true, env = "NATS_KEY", value_name = "FILE")
    )]
    pub nats_key: Option<PathBuf>,
    /// NATS credentials file (`.creds`: a user JWT and its NKey seed, as `nsc` writes it).
    #[cfg_attr(
        feature = "cli",
        arg(long, global = true, env = "NATS_CREDS", value_name = "FILE")
    )]
    pub nats_creds: Option<PathBuf>,
    /// File holding an NKey user seed (`SU...`, as `nk -gen user` writes it).
    #[cfg_attr(
        feature = "cli",
        arg(long, global = true, env = "NATS_NKEY", value_name = "FILE")
    )]
    pub nats_nkey: Option<PathBuf>,
    /// NATS user name (with `--nats-password-file`).
    #[cfg_attr(
        feature = "cli",
        arg(long, global = true, env = "NATS_USER", value_name = "USER")
    )]
    pub nats_user: Option<String>,
    /// File holding the NATS user's password (with `--nats-user`); a trailing newline is not
    /// part of it.
    #[cfg_attr(
        feature = "cli",
        arg(long, global = true, env = "NATS_PASSWORD_FILE", value_name = "FILE")
    )]
    pub nats_password_file: Option<PathBuf>,
    /// File holding the NATS authorization token; a trailing newline is not part of it.
    #[cfg_attr(
        feature = "cli",
        arg(long, global = true, env = "NATS_TOKEN_FILE", value_name = "FILE")
    )]
    pub nats_token_file: Option<PathBuf>,
}

/// The names of a NATS setting, as errors and the README give them.
pub mod nats_setting {
    /// `--nats-url`.
    pub const URL: &str = "--nats-url (NATS_URL)";
    /// `--nats-ca`.
    pub const CA: &str = "--nats-ca (NATS_CA)";
    /// `--nats-cert`.
    pub const CERT: &str = "--nats-cert (NATS_CERT)";
    /// `--nats-key`.
    pub const KEY: &str = "--nats-key (NATS_KEY)";
    /// `--nats-creds`.
    pub const CREDS: &str = "--nats-creds (NATS_CREDS)";
    /// `--nats-nkey`.
    pub const NKEY: &str = "--nats-nkey (NATS_NKEY)";
    /// `--nats-user`.
    pub const USER: &str = "--nats-user (NATS_USER)";
    /// `--nats-password-file`.
    pub const PASSWORD_FILE: &str = "--nats-password-file (NATS_PASSWORD_FILE)";
    /// `--nats-token-file`.
    pub const TOKEN_FILE: &str = "--nats-token-file (NATS_TOKEN_FILE)";
    /// Credentials written into `--nats-url`.
    pub const URL_CREDENTIALS: &str = "user:password@ or token@ in --nats-url (NATS_URL)";
    /// `--nats-user` with `--nats-password-file`.
    pub const USER_PASSWORD: &str =
        "--nats-user (NATS_USER) with --nats-password-file (NATS_PASSWORD_FILE)";
}

/// How the client proves who it is to NATS, read from the settings at start. Its `Debug`
/// never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials.
    None,
    /// User and password (`--nats-user` + `--nats-password-file`, or `user:password@` in the URL).
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A token (`--nats-token-file`, or `token@` in the URL).
    Token(String),
    /// A `.creds` file (user JWT + NKey seed), read by the client when it connects.
    CredsFile(PathBuf),
    /// An NKey user seed (`--nats-nkey`).
    NKey(String),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "None"),
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, ***)"),
            Self::Token(_) => write!(f, "Token(***)"),
            Self::CredsFile(path) => write!(f, "CredsFile({})", path.display()),
            Self::NKey(_) => write!(f, "NKey(***)"),
        }
    }
}

/// TLS to NATS as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsTls {
    /// The authorities trusted for the server's certificate (`--nats-ca`).
    pub ca: Option<PathBuf>,
    /// The client certificate and its key (`--nats-cert`, `--nats-key`).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    /// Whether the client insists on TLS (a CA or a client certificate is given). Otherwise
    /// TLS is used when the URL says `tls://` or the server requires it.
    pub fn required(&self) -> bool {
        self.ca.is_some() || self.client_cert.is_some()
    }
}

/// Everything the client needs to connect, taken from [`NatsArgs`] at start: the server
/// URLs without credentials, the credentials (secrets read from their files) and TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConnection {
    /// One URL per server, credentials removed.
    pub urls: Vec<String>,
    /// How the client authenticates.
    pub auth: NatsAuth,
    /// Which setting the credentials came from (for messages): one of [`nats_setting`], or
    /// `"no credentials"`.
    pub auth_from: &'static str,
    /// TLS settings.
    pub tls: NatsTls,
}

/// Why the NATS settings cannot be used. Names settings and files, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum NatsSettingsError {
    /// `--nats-url` cannot be parsed.
    #[error(transparent)]
    Urls(#[from] NatsUrlError),
    /// Two ways to authenticate are given; the client uses one.
    #[error(
        "{first} and {second} are both set: give one way to authenticate to NATS (user and \
         password, token, NKey, or .creds file)"
    )]
    Conflict {
        /// One setting.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
    /// A setting that needs another is given alone.
    #[error("{given} is set but {missing} is not: they go together")]
    Incomplete {
        /// The setting given.
        given: &'static str,
        /// The one it needs.
        missing: &'static str,
    },
    /// A secret's file cannot be read.
    #[error("{setting}: cannot read {}: {source}", path.display())]
    Read {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold what the setting expects.
    #[error("{setting}: {}: {reason}", path.display())]
    BadFile {
        /// The setting naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong (never its content).
        reason: String,
    },
}

/// The content of a secret's file without its trailing newline (`\n` or `\r\n`, however many).
fn read_secret(setting: &'static str, path: &Path) -> Result<String, NatsSettingsError> {
    let bytes = std::fs::read(path).map_err(|source| NatsSettingsError::Read {
        setting,
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: &str| NatsSettingsError::BadFile {
        setting,
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.is_empty() {
        return Err(bad("empty"));
    }
    if secret.contains(['\n', '\r']) {
        return Err(bad("more than one line"));
    }
    Ok(secret.to_owned())
}

impl NatsArgs {
    /// Reads the connection settings: the URL list, the credentials (at most one way, secrets
    /// read from their files now) and TLS. Called once at start.
    pub fn connection(&self) -> Result<NatsConnection, NatsSettingsError> {
        use nats_setting as n;
        let NatsServers { urls, credentials } = parse_nats_urls(&self.nats_url)?;
        let mut given: Vec<&'static str> = Vec::new();
        if credentials.is_some() {
            given.push(n::URL_CREDENTIALS);
        }
        match (&self.nats_user, &self.nats_password_file) {
            (Some(_), Some(_)) => given.push(n::USER_PASSWORD),
            (Some(_), None) => {
                return Err(NatsSettingsError::Incomplete {
                    given: n::USER,
                    missing: n::PASSWORD_FILE,
                });
            }
            (None, Some(_)) => {
                return Err(NatsSettingsError::Incomplete {
                    given: n::PASSWORD_FILE,
                    missing: n::USER,
                });
            }
            (None, None) => {}
        }
        for (set, name) in [
            (self.nats_token_file.is_some(), n::TOKEN_FILE),
            (self.nats_creds.is_some(), n::CREDS),
            (self.nats_nkey.is_some(), n::NKEY),
        ] {
            if set {
                given.push(name);
            }
        }
        if let [first, second, ..] = given[..] {
            return Err(NatsSettingsError::Conflict { first, second });
        }
        let auth_from = given.first().copied().unwrap_or("no credentials");
        let auth = if let Some(credentials) = credentials {
            match credentials {
                NatsCredentials::UserPassword(user, password) => {
                    NatsAuth::UserPassword { user, password }
                }
                NatsCredentials::Token(token) => NatsAuth::Token(token),
            }
        } else if let (Some(user), Some(file)) = (&self.nats_user, &self.nats_password_file) {
            NatsAuth::UserPassword {
                user: user.clone(),
                password: read_secret(n::PASSWORD_FILE, file)?,
            }
        } else if let Some(file) = &self.nats_token_file {
            NatsAuth::Token(read_secret(n::TOKEN_FILE, file)?)
        } else if let Some(file) = &self.nats_creds {
            // The client parses it; reading it here fails at start on a missing file.
            std::fs::metadata(file).map_err(|source| NatsSettingsError::Read {
                setting: n::CREDS,
                path: file.clone(),
                source,
            })?;
            NatsAuth::CredsFile(file.clone())
        } else if let Some(file) = &self.nats_nkey {
            let seed = read_secret(n::NKEY, file)?.trim().to_owned();
            if !seed.starts_with("SU") {
                return Err(NatsSettingsError::BadFile {
                    setting: n::NKEY,
                    path: file.clone(),
                    reason: "does not hold an NKey user seed (one line starting with SU)".into(),
                });
            }
            NatsAuth::NKey(seed)
        } else {
            NatsAuth::None
        };
        let client_cert = match (&self.nats_cert, &self.nats_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (Some(_), None) => {
                return Err(NatsSettingsError::Incomplete {
                    given: n::CERT,
                    missing: n::KEY,
                });
            }
            (None, Some(_)) => {
                return Err(NatsSettingsError::Incomplete {
                    given: n::KEY,
                    missing: n::CERT,
                });
            }
            (None, None) => None,
        };
        Ok(NatsConnection {
            urls,
            auth,
            auth_from,
            tls: NatsTls {
                ca: self.nats_ca.clone(),
                client_cert,
            },
        })
    }
}

/// How the gateway creates or updates the stream. Only the gateway applies these; workers use
/// the stream as they find it.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct StreamArgs {
    /// Messages older than this are dropped by JetStream without a trace. Keep it well above
    /// the workers' `--call-max-age`, which dead-letters old calls visibly.
    #[cfg_attr(feature = "cli", arg(long, env = "ASYNC_STREAM_MAX_AGE", default_value = "7d", value_parser = parse_duration))]
    pub stream_max_age: Duration,
    /// Size limit of the stream; when full, new calls get 503 (discard-new policy). 0 = no limit.
    #[cfg_attr(feature = "cli", arg(long, env = "ASYNC_STREAM_MAX_BYTES", default_value = "0", value_parser = parse_bytes))]
    pub stream_max_bytes: u64,
    /// Replicas of the stream (3 in a JetStream cluster).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "ASYNC_STREAM_REPLICAS", default_value_t = 1)
    )]
    pub stream_replicas: usize,
    /// Window in which a publish with the same call id is stored once.
    #[cfg_attr(feature = "cli", arg(long, env = "ASYNC_STREAM_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration))]
    pub stream_duplicate_window: Duration,
}

/// Call records and kept results (`GET /async-calls/{id}`). Shared by both binaries.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct RecordArgs {
    /// JetStream key-value bucket of call records and kept results (created by the gateway).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "ASYNC_RECORDS_BUCKET", default_value = "faas-async-calls")
    )]
    pub records_bucket: String,
    /// How long a call's record and kept result live after their last change.
    #[cfg_attr(feature = "cli", arg(long, env = "ASYNC_RECORDS_RETENTION", default_value = "24h", value_parser = parse_duration))]
    pub records_retention: Duration,
    /// Largest function response kept for `GET /async-calls/{id}/result` (lowered to what the
    /// queue's message limit allows); a larger one is reported as too large, never truncated.
    #[cfg_attr(feature = "cli", arg(long, env = "ASYNC_MAX_RESULT_BYTES", default_value = "512KiB", value_parser = parse_bytes))]
    pub max_result_bytes: u64,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging. Shared by both binaries.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct LogArgs {
    /// Log format.
    #[cfg_attr(feature = "cli", arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text))]
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax (`info`, `queue_worker=debug`).
    #[cfg_attr(feature = "cli", arg(long, env = "LOG_LEVEL", default_value = "info"))]
    pub log_level: String,
}

/// Where callbacks may go ([`crate::egress`]). Shared by both binaries: the gateway refuses a
/// callback URL the policy refuses as written (`400 callback_not_allowed`), the worker checks it
/// again and every address it resolves to when it connects. Give both the same lists.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CallbackPolicyArgs {
    /// Callback destinations refused besides the built-in ones (link-local, metadata,
    /// unspecified, multicast, broadcast), comma-separated: addresses or CIDR blocks
    /// (`127.0.0.0/8`), host names (`name`, `*.suffix`) and ports (`:25`, `:8000-8999`).
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "CALLBACK_DENY", value_parser = crate::egress::parse_rules, action = clap::ArgAction::Append)
    )]
    pub callback_deny: Vec<Vec<crate::egress::Rule>>,
    /// If set, the only callback destinations allowed (same notation as `--callback-deny`,
    /// which still wins): with ports, the port must be one of them; with names or blocks, the
    /// host must be one of the names or resolve only into the blocks.
    #[cfg_attr(
        feature = "cli",
        arg(long, env = "CALLBACK_ALLOW", value_parser = crate::egress::parse_rules, action = clap::ArgAction::Append)
    )]
    pub callback_allow: Vec<Vec<crate::egress::Rule>>,
}

impl CallbackPolicyArgs {
    /// The policy these lists make.
    pub fn policy(&self) -> crate::egress::EgressPolicy {
        crate::egress::EgressPolicy::new(
            &self.callback_deny.concat(),
            &self.callback_allow.concat(),
        )
    }
}

/// Encryption at rest ([`crate::sealing`]). Give every gateway and worker the same file: the
/// gateway seals queued calls, the worker opens them and seals kept results and its completed
/// outcomes, the gateway opens results for `GET /async-calls/{id}/result`.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct EncryptionArgs {
    /// File of encryption keys, one a line: `<key id> <base64 of 32 random bytes>`; the first
    /// seals, every listed key opens (rotation). Without it nothing is encrypted.
    #[cfg_attr(feature = "cli", arg(long, env = "ENCRYPTION_KEYS_FILE"))]
    pub encryption_keys_file: Option<std::path::PathBuf>,
}

impl EncryptionArgs {
    /// Reads the keys file, if one is set (an unreadable or malformed file is an error at
    /// start, naming the line but never a key).
    pub fn sealing(&self) -> Result<crate::sealing::Sealing, crate::sealing::KeyFileError> {
        crate::sealing::Sealing::from_keys_file(self.encryption_keys_file.as_deref())
    }
}

/// An OpenFaaS variable's value, trimmed; `None` when it is not set or empty (the charts render
/// an unset value as `""`, which OpenFaaS reads as not set).
pub fn openfaas_value(lookup: impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// One setting OpenFaaS names twice (the CE worker's name `ce`, the Pro worker's `pro`): the
/// one set with its name, or an error naming both when both are set to different values.
pub fn openfaas_either(
    lookup: impl Fn(&str) -> Option<String>,
    ce: &'static str,
    pro: &'static str,
) -> Result<Option<(&'static str, String)>, String> {
    match (openfaas_value(&lookup, ce), openfaas_value(&lookup, pro)) {
        (Some(a), Some(b)) if a != b => Err(format!(
            "{ce}={a:?} and {pro}={b:?} are the same setting (OpenFaaS CE's and Pro's name) \
             with different values: set one"
        )),
        (Some(a), _) => Ok(Some((ce, a))),
        (None, Some(b)) => Ok(Some((pro, b))),
        (None, None) => Ok(None),
    }
}

/// A port number as OpenFaaS reads one (1 to 65535), or an error naming the variable.
pub fn openfaas_port(name: &str, value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{name}={value:?} is not a port number (1 to 65535)"))
}

/// The NATS URL from OpenFaaS's variables, if any is set: the host from `faas_nats_address`
/// (CE) or `nats_host` (Pro), the port from `faas_nats_port` or `nats_port`; either alone
/// takes OpenFaaS's default for the other (`nats`, `4222`). Both binaries use it. A port that
/// is not one, or a CE and a Pro name set to different values, is an error naming them.
pub fn openfaas_nats_url(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    let host = openfaas_either(&lookup, "faas_nats_address", "nats_host")?;
    let port = openfaas_either(&lookup, "faas_nats_port", "nats_port")?;
    if host.is_none() && port.is_none() {
        return Ok(None);
    }
    let port = match port {
        Some((name, value)) => openfaas_port(name, &value)?,
        None => 4222,
    };
    let host = host.map_or_else(|| "nats".to_owned(), |(_, host)| host);
    // An IPv6 address is written in brackets in a URL.
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(Some(format!("nats://{host}:{port}")))
}

/// Splits one URL into the part before its credentials, the credentials (`user:password` or
/// `token`, without the `@`), and the rest (`@host:port/...`). No credentials: `None`.
fn split_userinfo(one: &str) -> Option<(&str, &str, &str)> {
    let authority_start = one.find("://").map_or(0, |i| i + 3);
    let rest = &one[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_len].rfind('@')?;
    Some((&one[..authority_start], &rest[..at], &rest[at..]))
}

/// `url` (or a comma-separated list of URLs, as `--nats-url` takes) fit to log or print: the
/// credentials of each (`user:password@`, `token@`) replaced by `***`. Every URL a binary logs
/// or prints goes through this.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| match split_userinfo(one) {
            Some((before, _, after)) => format!("{before}***{after}"),
            None => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Credentials given in a NATS URL.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsCredentials {
    /// `user:password@`.
    UserPassword(String, String),
    /// `token@`.
    Token(String),
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPassword(user, _) => write!(f, "UserPassword({user:?}, ***)"),
            Self::Token(_) => write!(f, "Token(***)"),
        }
    }
}

/// `--nats-url` without credentials, and the first credentials it carried. The client is
/// given the credentials as options, never inside a URL it could log.
pub fn split_nats_credentials(urls: &str) -> (String, Option<NatsCredentials>) {
    let mut credentials = None;
    let clean = urls
        .split(',')
        .map(|one| match split_userinfo(one) {
            Some((before, userinfo, after)) => {
                if credentials.is_none() {
                    credentials = Some(match userinfo.split_once(':') {
                        Some((user, password)) => {
                            NatsCredentials::UserPassword(user.to_owned(), password.to_owned())
                        }
                        None => NatsCredentials::Token(userinfo.to_owned()),
                    });
                }
                format!("{before}{}", &after[1..])
            }
            None => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",");
    (clean, credentials)
}

/// Why `--nats-url` cannot be used. Every URL it names is redacted ([`redact_url`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NatsUrlError {
    /// Nothing but commas and spaces.
    #[error("the NATS URL list is empty")]
    Empty,
    /// An entry between two commas is empty (`a,,b`, a trailing comma).
    #[error("entry {index} of the NATS URL list is empty (a stray comma?)")]
    EmptyEntry {
        /// Position in the list, from 1.
        index: usize,
    },
    /// An entry is not a NATS server URL.
    #[error("entry {index} of the NATS URL list, {url:?}: {reason}")]
    Invalid {
        /// Position in the list, from 1.
        index: usize,
        /// The entry, credentials redacted.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two entries carry different credentials; the client authenticates with one set.
    #[error(
        "entry {index} of the NATS URL list, {url:?}, carries other credentials than an \
         earlier entry: the client authenticates to every server with one set (give them on \
         one entry, or the same on each)"
    )]
    MixedCredentials {
        /// Position in the list, from 1.
        index: usize,
        /// The entry, credentials redacted.
        url: String,
    },
}

/// `--nats-url` taken apart: the server URLs without credentials, and the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsServers {
    /// One URL per server (`nats://host:port`, `tls://host:port`, ...), credentials removed,
    /// spaces around each trimmed.
    pub urls: Vec<String>,
    /// The credentials the list carried (the same on every entry that had any).
    pub credentials: Option<NatsCredentials>,
}

/// Parses `--nats-url`: one server URL or a comma-separated list (`nats://a:4222,nats://b:4222`,
/// spaces allowed around the commas). Each entry is `[scheme://][user:password@|token@]host[:port]`
/// with the scheme `nats` (the default), `tls` (TLS required for that server), `ws` or `wss`.
/// Credentials are taken out of the URLs (see [`split_nats_credentials`]); an error names the
/// bad entry by position and redacted URL, never a password or token.
pub fn parse_nats_urls(list: &str) -> Result<NatsServers, NatsUrlError> {
    if list.split(',').all(|entry| entry.trim().is_empty()) {
        return Err(NatsUrlError::Empty);
    }
    let mut urls = Vec::new();
    let mut credentials: Option<NatsCredentials> = None;
    for (i, entry) in list.split(',').enumerate() {
        let index = i + 1;
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(NatsUrlError::EmptyEntry { index });
        }
        let invalid = |reason: String| NatsUrlError::Invalid {
            index,
            url: redact_url(entry),
            reason,
        };
        if split_userinfo(entry).is_some_and(|(_, userinfo, _)| userinfo.is_empty()) {
            return Err(invalid("empty credentials before the @".into()));
        }
        let (clean, entry_credentials) = split_nats_credentials(entry);
        match (&credentials, entry_credentials) {
            (_, None) => {}
            (None, Some(found)) => credentials = Some(found),
            (Some(known), Some(found)) if *known == found => {}
            (Some(_), Some(_)) => {
                return Err(NatsUrlError::MixedCredentials {
                    index,
                    url: redact_url(entry),
                });
            }
        }
        // As the NATS client reads it: no scheme means nats://.
        let with_scheme = if clean.contains("://") {
            clean.clone()
        } else {
            format!("nats://{clean}")
        };
        let url = url::Url::parse(&with_scheme).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(invalid(format!(
                "scheme {:?} is not one of nats, tls, ws, wss",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host".into()));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "a NATS URL has no path, query or fragment (separate servers with commas)".into(),
            ));
        }
        urls.push(clean);
    }
    Ok(NatsServers { urls, credentials })
}

/// The argument list a binary parses: program name, then `leading` flags (derived from OpenFaaS
/// variables), then the real command line, which wins because later flags override earlier ones.
pub fn with_leading_args(
    real_args: impl IntoIterator<Item = OsString>,
    leading: Vec<OsString>,
) -> Vec<OsString> {
    let mut real = real_args.into_iter();
    let mut out: Vec<OsString> = real.next().into_iter().collect();
    out.extend(leading);
    out.extend(real);
    out
}

#[cfg(test)]
impl NatsArgs {
    /// Settings for `url` with short names and no security, for this crate's unit tests.
    pub(crate) fn for_tests(url: &str) -> Self {
        Self {
            nats_url: url.into(),
            stream: "s".into(),
            subject_prefix: "p".into(),
            dead_letter_stream: "d".into(),
            nats_request_timeout: Duration::from_secs(5),
            nats_ca: None,
            nats_cert: None,
            nats_key: None,
            nats_creds: None,
            nats_nkey: None,
            nats_user: None,
            nats_password_file: None,
            nats_token_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats_args(url: &str) -> NatsArgs {
        NatsArgs::for_tests(url)
    }

    #[test]
    fn secrets_are_read_from_files_without_their_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret pw\r\n").unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok3n\n").unwrap();

        let mut args = nats_args("nats://n1:4222");
        args.nats_user = Some("alice".into());
        args.nats_password_file = Some(password);
        let connection = args.connection().unwrap();
        assert_eq!(
            connection.auth,
            NatsAuth::UserPassword {
                user: "alice".into(),
                password: "s3cret pw".into()
            }
        );
        assert!(!format!("{connection:?}").contains("s3cret"));
        assert!(!connection.tls.required());

        let mut args = nats_args("nats://n1:4222");
        args.nats_token_file = Some(token);
        let connection = args.connection().unwrap();
        assert_eq!(connection.auth, NatsAuth::Token("tok3n".into()));
        assert!(!format!("{connection:?}").contains("tok3n"));

        // Credentials in the URL are passed on, and the URL keeps none.
        let connection = nats_args("nats://bob:pw9@n1:4222,nats://n2:4222")
            .connection()
            .unwrap();
        assert_eq!(connection.urls, ["nats://n1:4222", "nats://n2:4222"]);
        assert_eq!(
            connection.auth,
            NatsAuth::UserPassword {
                user: "bob".into(),
                password: "pw9".into()
            }
        );
        let mut args = nats_args("nats://n1:4222");
        args.nats_ca = Some(dir.path().join("ca.pem"));
        assert!(args.connection().unwrap().tls.required());
    }

    #[test]
    fn conflicting_or_incomplete_nats_settings_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "hunter2\n").unwrap();

        let mut args = nats_args("nats://n1:4222");
        args.nats_token_file = Some(secret.clone());
        args.nats_user = Some("alice".into());
        args.nats_password_file = Some(secret.clone());
        let e = args.connection().unwrap_err().to_string();
        assert!(
            e.contains("NATS_USER") && e.contains("NATS_TOKEN_FILE"),
            "{e}"
        );

        let mut args = nats_args("nats://tok@n1:4222");
        args.nats_creds = Some(secret.clone());
        let e = args.connection().unwrap_err().to_string();
        assert!(
            e.contains("token@ in --nats-url") && e.contains("NATS_CREDS"),
            "{e}"
        );
        assert!(!e.contains("tok@"), "{e}");

        let mut args = nats_args("nats://n1:4222");
        args.nats_user = Some("alice".into());
        let e = args.connection().unwrap_err().to_string();
        assert!(
            e.contains("NATS_USER") && e.contains("NATS_PASSWORD_FILE"),
            "{e}"
        );

        let mut args = nats_args("nats://n1:4222");
        args.nats_key = Some(secret.clone());
        let e = args.connection().unwrap_err().to_string();
        assert!(e.contains("NATS_KEY") && e.contains("NATS_CERT"), "{e}");

        // A file that is no seed: named, its content never shown.
        let mut args = nats_args("nats://n1:4222");
        args.nats_nkey = Some(secret);
        let e = args.connection().unwrap_err().to_string();
        assert!(e.contains("NATS_NKEY") && !e.contains("hunter2"), "{e}");

        let mut args = nats_args("nats://n1:4222");
        args.nats_token_file = Some(dir.path().join("missing"));
        let e = args.connection().unwrap_err().to_string();
        assert!(
            e.contains("NATS_TOKEN_FILE") && e.contains("missing"),
            "{e}"
        );

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let mut args = nats_args("nats://n1:4222");
        args.nats_token_file = Some(empty);
        let e = args.connection().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    /// CE and Pro names, each alone or together, a port without an address.
    #[test]
    fn openfaas_nats_variables_make_the_url() {
        let url = |env: &[(&str, &str)]| {
            let env: std::collections::HashMap<&str, &str> = env.iter().copied().collect();
            openfaas_nats_url(|k| env.get(k).map(|v| (*v).to_owned()))
        };
        for (env, expected) in [
            (&[][..], None),
            (
                &[("faas_nats_address", "nats.openfaas")][..],
                Some("nats://nats.openfaas:4222"),
            ),
            (
                &[("nats_host", "nats.openfaas")][..],
                Some("nats://nats.openfaas:4222"),
            ),
            (&[("faas_nats_port", "4223")][..], Some("nats://nats:4223")),
            (&[("nats_port", " 4223 ")][..], Some("nats://nats:4223")),
            (
                &[("nats_host", "n"), ("nats_port", "1")][..],
                Some("nats://n:1"),
            ),
            (
                &[("faas_nats_address", "n"), ("nats_host", "n")][..],
                Some("nats://n:4222"),
            ),
            (
                &[("faas_nats_address", ""), ("faas_nats_port", "")][..],
                None,
            ),
            (&[("nats_host", "::1")][..], Some("nats://[::1]:4222")),
        ] {
            assert_eq!(url(env).unwrap().as_deref(), expected, "{env:?}");
        }
        for (env, named) in [
            (
                &[("faas_nats_port", "x")][..],
                &["faas_nats_port", "\"x\""][..],
            ),
            (&[("nats_port", "0")][..], &["nats_port"][..]),
            (&[("nats_port", "70000")][..], &["nats_port"][..]),
            (
                &[("faas_nats_address", "a"), ("nats_host", "b")][..],
                &["faas_nats_address", "nats_host"][..],
            ),
        ] {
            let e = url(env).unwrap_err();
            assert!(named.iter().all(|n| e.contains(n)), "{env:?}: {e}");
        }
    }

    #[test]
    fn credentials_are_redacted_from_urls() {
        assert_eq!(
            redact_url("nats://alice:s3cretPW@nats-1:4222,nats://tok@nats-2:4222"),
            "nats://***@nats-1:4222,nats://***@nats-2:4222"
        );
        assert_eq!(redact_url("u:p@host:4222"), "***@host:4222");
        assert_eq!(
            redact_url("http://a:b@gw:8080/x@y?z=@"),
            "http://***@gw:8080/x@y?z=@"
        );
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("http://gw/a@b"), "http://gw/a@b");
    }

    #[test]
    fn nats_credentials_are_taken_out_of_the_url() {
        let (url, creds) = split_nats_credentials("nats://alice:s3cretPW@n1:4222,nats://n2:4222");
        assert_eq!(url, "nats://n1:4222,nats://n2:4222");
        assert_eq!(
            creds,
            Some(NatsCredentials::UserPassword(
                "alice".into(),
                "s3cretPW".into()
            ))
        );
        assert!(!format!("{creds:?}").contains("s3cretPW"));
        let (url, creds) = split_nats_credentials("tok@n1:4222");
        assert_eq!(url, "n1:4222");
        assert_eq!(creds, Some(NatsCredentials::Token("tok".into())));
        assert_eq!(
            split_nats_credentials("nats://n1:4222"),
            ("nats://n1:4222".into(), None)
        );
    }

    #[test]
    fn a_comma_separated_list_of_nats_urls_is_parsed() {
        let servers =
            parse_nats_urls("nats://127.0.0.1:4222,nats://127.0.0.1:4223, nats://127.0.0.1:4224 ")
                .unwrap();
        assert_eq!(
            servers.urls,
            [
                "nats://127.0.0.1:4222",
                "nats://127.0.0.1:4223",
                "nats://127.0.0.1:4224"
            ]
        );
        assert_eq!(servers.credentials, None);
        // TLS and WebSocket URLs, a bare host (nats:// and 4222 as the client assumes), IPv6.
        let servers =
            parse_nats_urls("tls://nats-0.nats:4222,nats-1,wss://nats-2:443,nats://[::1]:4222")
                .unwrap();
        assert_eq!(
            servers.urls,
            [
                "tls://nats-0.nats:4222",
                "nats-1",
                "wss://nats-2:443",
                "nats://[::1]:4222"
            ]
        );
        // One URL is a list of one.
        assert_eq!(
            parse_nats_urls("nats://127.0.0.1:4222").unwrap().urls,
            ["nats://127.0.0.1:4222"]
        );
    }

    #[test]
    fn credentials_in_a_list_are_taken_out_of_every_entry() {
        let servers =
            parse_nats_urls("nats://alice:s3cretPW@n1:4222,tls://alice:s3cretPW@n2:4222,n3")
                .unwrap();
        assert_eq!(servers.urls, ["nats://n1:4222", "tls://n2:4222", "n3"]);
        assert_eq!(
            servers.credentials,
            Some(NatsCredentials::UserPassword(
                "alice".into(),
                "s3cretPW".into()
            ))
        );
        assert!(!format!("{servers:?}").contains("s3cretPW"));
        let servers = parse_nats_urls("n1,tls://tok3n@n2:4222").unwrap();
        assert_eq!(servers.urls, ["n1", "tls://n2:4222"]);
        assert_eq!(
            servers.credentials,
            Some(NatsCredentials::Token("tok3n".into()))
        );
        // A password may hold ':' and '@' (the last '@' of the authority ends it).
        let servers = parse_nats_urls("nats://bob:p:a@ss@n1:4222").unwrap();
        assert_eq!(
            servers.credentials,
            Some(NatsCredentials::UserPassword("bob".into(), "p:a@ss".into()))
        );
    }

    #[test]
    fn a_bad_list_names_the_bad_entry_and_never_a_password() {
        let cases: &[(&str, &str)] = &[
            // The list as one URL used to be refused as "invalid port number".
            (
                "nats://u:s3cretPW@127.0.0.1:4222,nats://u:s3cretPW@127.0.0.1:42x3",
                "entry 2 of the NATS URL list, \"nats://***@127.0.0.1:42x3\": invalid port number",
            ),
            (
                "nats://127.0.0.1:4222,,nats://127.0.0.1:4224",
                "entry 2 of the NATS URL list is empty",
            ),
            (
                "nats://127.0.0.1:4222,",
                "entry 2 of the NATS URL list is empty",
            ),
            (" , ", "the NATS URL list is empty"),
            ("", "the NATS URL list is empty"),
            (
                "http://u:s3cretPW@n1:4222",
                "entry 1 of the NATS URL list, \"http://***@n1:4222\": scheme \"http\" is not one of",
            ),
            (
                "n1:4222,nats://s3cretPW@:4222",
                "entry 2 of the NATS URL list, \"nats://***@:4222\": ",
            ),
            ("nats://@n1:4222", "empty credentials"),
            (
                "nats://n1:4222/queue",
                "entry 1 of the NATS URL list, \"nats://n1:4222/queue\": a NATS URL has no path",
            ),
            (
                "nats://a:s3cretPW@n1,nats://a:0therPW@n2",
                "entry 2 of the NATS URL list, \"nats://***@n2\", carries other credentials",
            ),
            (
                "nats://n1:99999",
                "entry 1 of the NATS URL list, \"nats://n1:99999\": invalid port",
            ),
        ];
        for (list, expected) in cases {
            let err = parse_nats_urls(list).expect_err(list);
            let message = err.to_string();
            assert!(
                message.contains(expected),
                "{list:?}: {message:?} does not contain {expected:?}"
            );
            assert!(!message.contains("s3cretPW"), "{list:?}: {message}");
            assert!(
                !format!("{err:?}").contains("s3cretPW"),
                "{list:?}: {err:?}"
            );
        }
    }
}
