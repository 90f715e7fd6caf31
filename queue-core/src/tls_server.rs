//! TLS for the binaries' own listeners (feature `tls-server`): a rustls server configuration
//! from two PEM files, the certificate chain (leaf first) and its private key, as the gateway's
//! `--tls-cert`/`--tls-key` and the worker's `--metrics-tls-cert`/`--metrics-tls-key` name them.
//!
//! Errors name the setting (flag and environment variable) and the file, never what the key
//! file holds. TLS 1.2 and 1.3 (rustls' safe defaults, the ring provider), no client
//! certificates, ALPN `http/1.1` (both listeners speak HTTP/1.1 only).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use tokio_rustls::TlsAcceptor;

/// The settings that name a listener's two files, for the errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSettingNames {
    /// The certificate's flag (`--tls-cert`).
    pub cert_flag: &'static str,
    /// The certificate's environment variable (`GATEWAY_TLS_CERT`).
    pub cert_env: &'static str,
    /// The key's flag (`--tls-key`).
    pub key_flag: &'static str,
    /// The key's environment variable (`GATEWAY_TLS_KEY`).
    pub key_env: &'static str,
}

/// Why a listener's certificate or key cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// A file cannot be read or holds no PEM item of the kind expected.
    #[error("{flag} ({env}): {}: {reason}", path.display())]
    File {
        /// The flag naming the file.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The certificate and key do not make a TLS configuration (a key of another certificate).
    #[error("{cert_flag} and {key_flag}: {reason}")]
    Config {
        /// The certificate's flag.
        cert_flag: &'static str,
        /// The key's flag.
        key_flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// A TLS acceptor from PEM files: `cert`, the certificate chain (leaf first), and `key`, its
/// private key (PKCS#8, PKCS#1 or SEC1). Read once, here: a file that cannot be used is an
/// error now, not at the first handshake.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    names: TlsSettingNames,
) -> Result<TlsAcceptor, TlsFileError> {
    let cert_error = |reason: String| TlsFileError::File {
        flag: names.cert_flag,
        env: names.cert_env,
        path: cert.to_owned(),
        reason,
    };
    let key_error = |reason: String| TlsFileError::File {
        flag: names.key_flag,
        env: names.key_env,
        path: key.to_owned(),
        reason,
    };
    let config_error = |reason: String| TlsFileError::Config {
        cert_flag: names.cert_flag,
        key_flag: names.key_flag,
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("no PEM certificate in it".into()));
    }
    // The parser's own error text holds no key material; keep to a fixed message anyway.
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(e) => key_error(e.to_string()),
        _ => key_error("no PEM private key in it".into()),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| config_error(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, private_key)
    .map_err(|e| config_error(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const NAMES: TlsSettingNames = TlsSettingNames {
        cert_flag: "--x-cert",
        cert_env: "X_CERT",
        key_flag: "--x-key",
        key_env: "X_KEY",
    };

    #[test]
    fn unusable_files_name_the_setting_and_not_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "secret-looking junk\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let error = acceptor(&junk, &junk, NAMES).err().unwrap().to_string();
        assert!(error.starts_with("--x-cert (X_CERT): "), "{error}");
        assert!(error.contains("no PEM certificate"), "{error}");
        let error = acceptor(&missing, &junk, NAMES).err().unwrap().to_string();
        assert!(error.starts_with("--x-cert (X_CERT): "), "{error}");
        assert!(!error.contains("secret-looking"), "{error}");
    }
}
