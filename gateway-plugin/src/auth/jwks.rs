//! The signing keys of `--jwks-url`: one HTTP/1.1 `GET` at a time (hyper's client half over a
//! plain socket or rustls), no redirects, a bounded answer, a deadline. `https` is required,
//! except to a loopback address (`127.0.0.1`, `::1`, `localhost`); the CA certificates are the
//! system's, or only those of `--jwks-ca` (a private IdP).
//!
//! When the keys are fetched again is [`next_refresh`]; the fetching itself (at start, periodic,
//! and at most once per [`KID_REFRESH_INTERVAL`] for a token with an unknown `kid`) is
//! [`super::jwt::JwtVerifier`]'s.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use url::Url;

use super::AuthError;

/// A token with a `kid` the keys do not have makes the gateway fetch them again at most once
/// in this interval (forged `kid`s cannot make it hammer the IdP).
pub const KID_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// A `Cache-Control: max-age` shorter than `--jwks-refresh` is honoured down to this.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);

/// One fetch, connection to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// When to fetch the keys again: after `refresh`, or sooner if the answer's `max-age` says so,
/// but not sooner than [`MIN_REFRESH`] (nor later than `refresh`).
pub fn next_refresh(refresh: Duration, max_age: Option<Duration>) -> Duration {
    match max_age {
        Some(age) => refresh.min(age.max(MIN_REFRESH)),
        None => refresh,
    }
}

/// What one fetch brought.
#[derive(Debug)]
pub struct Fetched {
    /// The document.
    pub body: Bytes,
    /// The answer's `Cache-Control: max-age`, if any.
    pub max_age: Option<Duration>,
}

/// Where the keys are and how to reach it.
pub struct RemoteJwks {
    url: Url,
    shown: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// `--jwks-refresh`.
    pub refresh: Duration,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("url", &self.shown)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

fn roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, AuthError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let bad = |message: String| {
                AuthError::Settings(format!("--jwks-ca {}: {message}", path.display()))
            };
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
            for cert in certs {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad("no certificate in the file".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system certificate rustls cannot use is skipped, as browsers do.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(AuthError::Settings(
                    "--jwks-url: no CA certificates found on this system; give the IdP's CA with --jwks-ca".into(),
                ));
            }
        }
    }
    Ok(roots)
}

impl RemoteJwks {
    /// Checks the URL and prepares TLS; nothing is fetched yet.
    pub fn new(url: &str, ca: Option<&Path>, refresh: Duration) -> Result<Self, AuthError> {
        let bad = |message: &str| AuthError::Settings(format!("--jwks-url: {message}"));
        let url = Url::parse(url).map_err(|e| bad(&format!("not a URL: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("credentials in the URL are not supported"));
        }
        let host = url.host().ok_or_else(|| bad("the URL has no host"))?;
        // Shown in logs and errors: no query (it might carry a key).
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            &url[url::Position::BeforeHost..url::Position::AfterPort],
            url.path()
        );
        let tls = match url.scheme() {
            "https" => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| bad(&e.to_string()))?
                    .with_root_certificates(roots(ca)?)
                    .with_no_client_auth();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let name = match &host {
                    url::Host::Domain(d) => ServerName::try_from((*d).to_owned())
                        .map_err(|_| bad("the host is not a valid TLS server name"))?,
                    url::Host::Ipv4(ip) => ServerName::IpAddress(std::net::IpAddr::V4(*ip).into()),
                    url::Host::Ipv6(ip) => ServerName::IpAddress(std::net::IpAddr::V6(*ip).into()),
                };
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
            "http" if is_loopback(&host) => {
                if ca.is_some() {
                    return Err(bad("--jwks-ca is for an https URL"));
                }
                None
            }
            "http" => {
                return Err(bad(
                    "must be https (plain http only to 127.0.0.1, ::1 or localhost): the keys decide who is let in",
                ));
            }
            _ => return Err(bad("must be an https URL")),
        };
        Ok(Self {
            url,
            shown,
            tls,
            refresh: refresh.max(Duration::from_secs(1)),
        })
    }

    /// The URL as logs show it (without its query).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Fetches the document once. The error is a sentence for the log (never the body).
    pub async fn fetch(&self) -> Result<Fetched, String> {
        tokio::time::timeout(FETCH_TIMEOUT, self.fetch_unbounded())
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no complete answer within {}",
                    humantime::format_duration(FETCH_TIMEOUT)
                ))
            })
    }

    async fn fetch_unbounded(&self) -> Result<Fetched, String> {
        let port = self.url.port_or_known_default().ok_or("no port")?;
        let tcp = match self.url.host() {
            Some(url::Host::Domain(d)) => TcpStream::connect((d, port)).await,
            Some(url::Host::Ipv4(ip)) => TcpStream::connect((ip, port)).await,
            Some(url::Host::Ipv6(ip)) => TcpStream::connect((ip, port)).await,
            None => return Err("no host".into()),
        }
        .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.exchange(tcp).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                self.exchange(tls).await
            }
        }
    }

    async fn exchange<S>(&self, io: S) -> Result<Fetched, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        // Ends with the exchange, whichever way it ends.
        let _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(connection));
        let request =
            hyper::Request::get(&self.url[url::Position::BeforePath..url::Position::AfterQuery])
                .header(
                    header::HOST,
                    &self.url[url::Position::BeforeHost..url::Position::AfterPort],
                )
                .header(header::ACCEPT, "application/jwk-set+json, application/json")
                .header(
                    header::USER_AGENT,
                    concat!("faas-async-gateway/", env!("CARGO_PKG_VERSION")),
                )
                .body(Empty::<Bytes>::new())
                .map_err(|e| format!("request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(format!(
                "answered {} (redirects are not followed)",
                response.status()
            ));
        }
        let max_age = response
            .headers()
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|directive| {
                let (name, value) = directive.trim().split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("max-age")
                    .then(|| value.trim().trim_matches('"').parse::<u64>().ok())
                    .flatten()
            })
            .map(Duration::from_secs);
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("answer unreadable or above {MAX_JWKS_BYTES} bytes: {e}"))?
            .to_bytes();
        Ok(Fetched { body, max_age })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_honours_a_shorter_max_age_down_to_the_floor() {
        let five = Duration::from_secs(300);
        assert_eq!(next_refresh(five, None), five);
        assert_eq!(next_refresh(five, Some(Duration::from_secs(3600))), five);
        assert_eq!(
            next_refresh(five, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(next_refresh(five, Some(Duration::ZERO)), MIN_REFRESH);
        let short = Duration::from_secs(2);
        assert_eq!(next_refresh(short, Some(Duration::ZERO)), short);
    }

    #[test]
    fn urls_must_be_https_unless_loopback() {
        let r = Duration::from_secs(60);
        for ok in [
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/k",
        ] {
            assert!(RemoteJwks::new(ok, None, r).is_ok(), "{ok}");
        }
        for bad in [
            "http://login.example.org/jwks",
            "http://10.0.0.1/jwks",
            "ftp://127.0.0.1/jwks",
            "https://user:pw@login.example.org/jwks",
            "not a url",
        ] {
            let e = RemoteJwks::new(bad, None, r).unwrap_err().to_string();
            assert!(!e.contains("pw@"), "{e}");
        }
        let ca = tempfile_path("not a certificate");
        assert!(RemoteJwks::new("https://login.example.org/k", Some(&ca), r).is_err());
        let _ = std::fs::remove_file(ca);
        let shown = RemoteJwks::new("http://127.0.0.1:1/k?key=secret", None, r).unwrap();
        assert_eq!(shown.shown(), "http://127.0.0.1:1/k");
    }

    fn tempfile_path(text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("jwks-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        path
    }
}
