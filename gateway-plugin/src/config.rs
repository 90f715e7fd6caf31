//! `gateway-plugin` settings: every setting a flag and an environment variable. The NATS, stream
//! and log settings are the ones `queue-worker` defines, so both binaries read the same names.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use queue_core::settings::{
    CallbackPolicyArgs, LogArgs, NatsArgs, RecordArgs, StreamArgs, parse_bytes, parse_duration,
};

/// `gateway-plugin` settings.
#[derive(Debug, Clone, Parser)]
#[command(name = "gateway-plugin", version, about, args_override_self = true)]
pub struct GatewayConfig {
    /// NATS connection and stream names.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// How the stream is created or updated at start.
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// Call records.
    #[command(flatten)]
    pub records: RecordArgs,
    /// Where callbacks may go (checked at enqueue; the workers check again at delivery).
    #[command(flatten)]
    pub callback_policy: CallbackPolicyArgs,
    /// Authentication and authorization.
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
    /// Encryption at rest (`--encryption-keys-file`): queued calls sealed, kept results opened.
    #[command(flatten)]
    pub encryption: queue_core::settings::EncryptionArgs,
    /// The audit log, quotas and rate limits.
    #[command(flatten)]
    pub controls: ControlArgs,
    /// Caps on the limits a call may set for itself (`X-Max-Retries`, `X-Timeout`, `X-Max-Age`).
    #[command(flatten)]
    pub call_limits: crate::overrides::CallLimitArgs,
    /// Front mode: every other request passed to the OpenFaaS gateway.
    #[command(flatten)]
    pub upstream: crate::upstream::UpstreamArgs,
    /// Address to listen on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Largest request body accepted (413 above it, the limit in the answer). Default: as
    /// large as the NATS server's max_payload allows; larger values (GiB too) are taken, and
    /// bodies above `--inline-body-bytes` go to the blob store.
    #[arg(long, env = "GATEWAY_MAX_BODY_BYTES", value_parser = parse_bytes)]
    pub max_body_bytes: Option<u64>,
    /// Largest body queued inside the call's message; a larger one is streamed into the blob
    /// store (the JetStream object-store bucket `<stream>-blobs`) and the call carries a
    /// reference. Lowered to what the NATS message limit leaves room for.
    #[arg(long, env = "GATEWAY_INLINE_BODY_BYTES", default_value = "256KiB", value_parser = parse_bytes)]
    pub inline_body_bytes: u64,
    /// `Retry-After` sent with 503 answers when the queue cannot take a call.
    #[arg(long, env = "GATEWAY_RETRY_AFTER", default_value = "5s", value_parser = parse_duration)]
    pub retry_after: Duration,
    /// On SIGTERM/SIGINT, how long requests in progress may take before the server stops.
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Proxies (addresses or CIDR blocks, comma-separated) whose `X-Forwarded-For`,
    /// `X-Forwarded-Host`, `Forwarded` and `X-Real-Ip` are passed to functions. From any other
    /// peer they are dropped, and `X-Forwarded-For` is the peer's address.
    #[arg(long, env = "GATEWAY_TRUSTED_PROXIES", value_delimiter = ',', value_parser = crate::peer::parse_ip_block)]
    pub trusted_proxies: Vec<crate::peer::IpBlock>,
    /// The workers' default namespace (`--default-namespace` of queue-worker; keep them
    /// equal): `fn.{it}` and `fn` are one function, for pause, settings and metrics alike.
    #[arg(long, env = "GATEWAY_DEFAULT_NAMESPACE", default_value = "openfaas-fn")]
    pub default_namespace: String,
    /// A request's headers must arrive within this time, or the connection is closed (an idle
    /// kept-alive connection too): a client sending headers a byte at a time holds no slot.
    #[arg(long, env = "GATEWAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this time after its headers, or the request
    /// fails (`400 unreadable_body`) and the connection is closed.
    #[arg(long, env = "GATEWAY_BODY_READ_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,
    /// Connections open at once; one more is answered `503` and closed at once.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// PEM file of the certificate chain (leaf first) to serve HTTPS with (with `--tls-key`).
    /// Without it the gateway serves plain HTTP.
    #[arg(
        long,
        env = "GATEWAY_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the certificate's private key (with `--tls-cert`).
    #[arg(
        long,
        env = "GATEWAY_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
}

impl GatewayConfig {
    /// The HTTP front's settings.
    pub fn http_settings(&self) -> crate::HttpSettings {
        crate::HttpSettings {
            max_body_bytes: self.max_body_bytes,
            inline_body_bytes: self.inline_body_bytes,
            blobs: None,
            retry_after: self.retry_after,
            shutdown_grace: self.shutdown_grace,
            trusted_proxies: crate::peer::TrustedProxies(self.trusted_proxies.clone()),
            default_namespace: self.default_namespace.clone(),
            callback_policy: self.callback_policy.policy(),
            auth: self.auth.clone(),
            controls: self.controls.clone(),
            call_limits: self.call_limits.clone(),
            upstream: self.upstream.clone(),
        }
    }

    /// What one client may hold: connections, and how long headers and bodies may take.
    pub fn connection_limits(&self) -> crate::connections::ConnectionLimits {
        crate::connections::ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            body_read_timeout: self.body_read_timeout,
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
        }
    }
}

/// The audit log's, the quotas' and the CORS settings: flags and environment variables, shared by
/// `gateway-plugin` and `faas-async`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ControlArgs {
    /// Audit log: JSON lines appended to this file (admin changes, cancels, result reads,
    /// authentication and authorization refusals). Without it, the lines are `info` events of
    /// the `tracing` target `audit`.
    #[arg(long, env = "AUDIT_LOG_FILE", value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Quotas and rate limits per namespace and per subject (TOML): a rate with a burst on the
    /// async routes (`429 rate_limited`), a cap on pending calls (`429 quota_exceeded`).
    /// Without it, no limits.
    #[arg(long, env = "QUOTAS_FILE", value_name = "FILE")]
    pub quotas_file: Option<PathBuf>,
    /// CORS per function, per namespace, by default, and for `/async-calls/...` (TOML): the
    /// origins, methods and headers a browser page may use. Without it, no CORS (no route
    /// allows another origin). Read at start.
    #[arg(long, env = "CORS_FILE", value_name = "FILE")]
    pub cors_file: Option<PathBuf>,
}

/// Flags derived from OpenFaaS's variables, for the settings whose own variable is not set:
/// the NATS address (`faas_nats_address`/`faas_nats_port` as OpenFaaS's gateway reads them, or
/// the Pro worker's `nats_host`/`nats_port`; either part alone takes OpenFaaS's default for the
/// other, `nats` or `4222`), and the stream the Pro worker names, `nats_stream`, with its
/// `nats_stream_replicas` (the gateway creates the stream), so one set of variables serves the
/// gateway and the workers; and `faas_gateway_address` / `faas_gateway_port` as front mode's
/// upstream (with the worker's meaning: either alone takes OpenFaaS's default for the other,
/// `gateway` or `8080`) when `UPSTREAM_GATEWAY_URL` is not set. They go before the real
/// command line, which wins. A value that cannot be used is an error naming the variable.
pub fn openfaas_compat_args(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<OsString>, String> {
    use queue_core::settings::{openfaas_nats_url, openfaas_value};
    let ours = |name: &str| openfaas_value(&lookup, name).is_some();
    let mut args: Vec<OsString> = Vec::new();
    if let Some(url) = openfaas_nats_url(&lookup)?
        && !ours("NATS_URL")
    {
        args.push(format!("--nats-url={url}").into());
    }
    if let Some(stream) = openfaas_value(&lookup, "nats_stream")
        && !ours("ASYNC_STREAM")
    {
        args.push(format!("--stream={stream}").into());
    }
    if let Some(replicas) = openfaas_value(&lookup, "nats_stream_replicas") {
        match replicas.parse::<usize>() {
            Ok(n @ 1..=5) if !ours("ASYNC_STREAM_REPLICAS") => {
                args.push(format!("--stream-replicas={n}").into());
            }
            Ok(1..=5) => {}
            _ => {
                return Err(format!(
                    "nats_stream_replicas={replicas:?} is not a number of replicas (1 to 5)"
                ));
            }
        }
    }
    if let Some(url) = queue_core::settings::openfaas_gateway_url(&lookup)
        && !ours("UPSTREAM_GATEWAY_URL")
    {
        args.push(format!("--upstream-gateway={url}").into());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue_core::settings::with_leading_args;
    use std::collections::HashMap;

    fn parse(env: &[(&str, &str)], cli: &[&str]) -> GatewayConfig {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let real = std::iter::once("gateway-plugin")
            .chain(cli.iter().copied())
            .map(OsString::from);
        GatewayConfig::try_parse_from(with_leading_args(
            real,
            openfaas_compat_args(|k| env.get(k).cloned()).unwrap(),
        ))
        .unwrap()
    }

    #[test]
    fn defaults() {
        let c = parse(&[], &[]);
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.nats.stream, "faas-async");
        assert_eq!(c.stream.stream_max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.max_body_bytes, None);
        assert_eq!(c.retry_after, Duration::from_secs(5));
    }

    #[test]
    fn openfaas_gateway_variables_select_nats() {
        let c = parse(
            &[("faas_nats_address", "nats"), ("faas_nats_port", "4222")],
            &[],
        );
        assert_eq!(c.nats.nats_url, "nats://nats:4222");
        let c = parse(
            &[("faas_nats_address", "nats")],
            &["--nats-url", "nats://other:1"],
        );
        assert_eq!(c.nats.nats_url, "nats://other:1");
        // The Pro worker's names, a port without an address, the stream and its replicas.
        let c = parse(
            &[
                ("nats_port", "4223"),
                ("nats_stream", "faas-request"),
                ("nats_stream_replicas", "3"),
            ],
            &[],
        );
        assert_eq!(c.nats.nats_url, "nats://nats:4223");
        assert_eq!(c.nats.stream, "faas-request");
        assert_eq!(c.stream.stream_replicas, 3);
        for (env, named) in [
            (&[("nats_stream_replicas", "0")][..], "nats_stream_replicas"),
            (&[("nats_port", "x")][..], "nats_port"),
            (
                &[("nats_host", "a"), ("faas_nats_address", "b")][..],
                "nats_host",
            ),
        ] {
            let env: HashMap<&str, &str> = env.iter().copied().collect();
            let e = openfaas_compat_args(|k| env.get(k).map(|v| (*v).to_owned())).unwrap_err();
            assert!(e.contains(named), "{e}");
        }
    }

    #[test]
    fn front_mode_settings_and_openfaas_gateway_variables() {
        let c = parse(&[], &[]);
        assert_eq!(c.upstream.upstream_gateway, None, "off by default");
        assert_eq!(c.upstream.upstream_connect_timeout, Duration::from_secs(5));
        assert_eq!(
            c.upstream.upstream_response_timeout,
            Duration::from_secs(75)
        );
        let url = |c: &GatewayConfig| {
            c.upstream
                .upstream_gateway
                .as_ref()
                .map(ToString::to_string)
        };
        let c = parse(&[("faas_gateway_address", "gateway.openfaas")], &[]);
        assert_eq!(url(&c).as_deref(), Some("http://gateway.openfaas:8080"));
        let c = parse(&[("faas_gateway_port", "8081")], &[]);
        assert_eq!(url(&c).as_deref(), Some("http://gateway:8081"));
        let c = parse(
            &[("faas_gateway_address", "gw"), ("faas_gateway_port", "9")],
            &[
                "--upstream-connect-timeout",
                "250ms",
                "--upstream-response-timeout",
                "2m",
            ],
        );
        assert_eq!(url(&c).as_deref(), Some("http://gw:9"));
        assert_eq!(
            c.upstream.upstream_connect_timeout,
            Duration::from_millis(250)
        );
        assert_eq!(
            c.upstream.upstream_response_timeout,
            Duration::from_secs(120)
        );
        // Our own variable (here as the flag the environment would give) wins.
        let c = parse(
            &[
                ("faas_gateway_address", "gw"),
                ("UPSTREAM_GATEWAY_URL", "http://ours:1"),
            ],
            &[],
        );
        assert_eq!(url(&c), None, "left to UPSTREAM_GATEWAY_URL, read by clap");
        let c = parse(
            &[("faas_gateway_address", "gw")],
            &["--upstream-gateway", "http://ours:1/"],
        );
        assert_eq!(url(&c).as_deref(), Some("http://ours:1"));
        let err =
            GatewayConfig::try_parse_from(["gateway-plugin", "--upstream-gateway", "https://gw"])
                .unwrap_err()
                .to_string();
        assert!(err.contains("https is not supported"), "{err}");
    }

    #[test]
    fn auth_flags_parse() {
        let c = parse(&[], &[]);
        assert!(!c.auth.basic_auth);
        assert_eq!(
            c.auth.secret_mount_path,
            std::path::Path::new("/var/secrets")
        );
        assert!(c.auth.public.is_empty());
        let c = parse(
            &[],
            &[
                "--basic-auth",
                "--secret-mount-path",
                "/run/secrets",
                "--auth-tokens-file",
                "/etc/tokens",
                "--public",
                "invoke,metrics",
                "--jwt-leeway",
                "10s",
            ],
        );
        assert!(c.auth.basic_auth);
        assert_eq!(
            c.auth.secret_mount_path,
            std::path::Path::new("/run/secrets")
        );
        assert_eq!(
            c.auth.auth_tokens_file.as_deref(),
            Some(std::path::Path::new("/etc/tokens"))
        );
        assert_eq!(
            c.auth.public,
            [
                crate::auth::PublicRoute::Invoke,
                crate::auth::PublicRoute::Metrics
            ]
        );
        assert_eq!(c.auth.jwt_leeway, Duration::from_secs(10));
        assert_eq!(c.auth.jwks_refresh, Duration::from_secs(300));
        let c = parse(
            &[],
            &[
                "--jwks-url",
                "https://login.example.org/realms/r/certs",
                "--jwks-refresh",
                "1m",
                "--jwks-ca",
                "/etc/faas-async/idp-ca.pem",
                "--auth-policy-file",
                "/etc/faas-async/policy.toml",
            ],
        );
        assert_eq!(
            c.auth.auth_policy_file.as_deref(),
            Some(std::path::Path::new("/etc/faas-async/policy.toml"))
        );
        assert_eq!(
            c.auth.jwks_url.as_deref(),
            Some("https://login.example.org/realms/r/certs")
        );
        assert_eq!(c.auth.jwks_refresh, Duration::from_secs(60));
        assert_eq!(
            c.auth.jwks_ca.as_deref(),
            Some(std::path::Path::new("/etc/faas-async/idp-ca.pem"))
        );
        assert!(
            GatewayConfig::try_parse_from([
                "gateway-plugin",
                "--jwks-url",
                "https://a/k",
                "--jwks-file",
                "/k.json"
            ])
            .is_err(),
            "one source of keys"
        );
        assert_eq!(c.controls.audit_log, None);
        assert_eq!(c.controls.quotas_file, None);
        let c = parse(
            &[],
            &[
                "--audit-log",
                "/var/log/faas-async/audit.log",
                "--quotas-file",
                "/etc/faas-async/quotas.toml",
            ],
        );
        assert_eq!(
            c.controls.quotas_file.as_deref(),
            Some(std::path::Path::new("/etc/faas-async/quotas.toml"))
        );
        assert_eq!(
            c.controls.audit_log.as_deref(),
            Some(std::path::Path::new("/var/log/faas-async/audit.log"))
        );
        assert!(
            GatewayConfig::try_parse_from(["gateway-plugin", "--public", "dashboard"]).is_err()
        );
    }

    #[test]
    fn sizes_and_durations_parse() {
        let c = parse(&[], &["--max-body-bytes", "256KiB", "--retry-after", "2s"]);
        assert_eq!(c.max_body_bytes, Some(256 * 1024));
        assert_eq!(c.retry_after, Duration::from_secs(2));
        assert!(
            GatewayConfig::try_parse_from(["gateway-plugin", "--max-body-bytes", "lots"]).is_err()
        );
    }
}
