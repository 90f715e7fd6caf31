//! Certificates made for one test: a private certificate authority, a server certificate for
//! `127.0.0.1` and `localhost`, and a client certificate, written as PEM files to a temporary
//! directory that lives as long as the [`TestPki`]; and NKey users ([`nkey_user`]).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::error::HarnessError;

/// A certificate authority and the certificates it signed, as files.
#[derive(Debug)]
pub struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Generates a fresh authority (its own key, so two `TestPki`s never trust each other), a
    /// server certificate valid for `127.0.0.1` and `localhost`, and a client certificate.
    pub fn generate() -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("test-pki-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating the certificate directory", e))?;
        let cert_error = |e: rcgen::Error| HarnessError::Certificate(e.to_string());

        let ca_key = KeyPair::generate().map_err(cert_error)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "faas-async test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_error)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, common_name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().map_err(cert_error)?;
            let mut params = CertificateParams::new(names).map_err(cert_error)?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).map_err(cert_error)?;
            Ok::<_, HarnessError>((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "nats-server",
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            Vec::new(),
            "faas-async client",
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;

        let pki = Self { dir };
        for (path, pem) in [
            (pki.ca(), ca_cert.pem()),
            (pki.server_cert(), server_cert),
            (pki.server_key(), server_key),
            (pki.client_cert(), client_cert),
            (pki.client_key(), client_key),
        ] {
            std::fs::write(&path, pem)
                .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))?;
        }
        Ok(pki)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The authority's certificate (what a client or server trusts).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (`127.0.0.1`, `localhost`).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server certificate's key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// The client certificate.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// The client certificate's key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client-key.pem")
    }
}

/// A fresh NKey user: its seed (what the client holds, `SU...`) and its public key (what the
/// server's configuration lists, `U...`).
pub fn nkey_user() -> (String, String) {
    let pair = nkeys::KeyPair::new_user();
    // A freshly generated pair always has its seed.
    let seed = pair.seed().unwrap_or_default();
    (seed, pair.public_key())
}
