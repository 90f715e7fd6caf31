//! The gateway serving HTTPS (`--tls-cert`/`--tls-key`, a certificate made in the test): a call
//! is accepted over TLS; plain HTTP and a client that does not trust the authority get nothing;
//! a connection that never says hello is closed at the header deadline; a key that is no key
//! stops the gateway at start.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::DEADLINE;
use gateway_plugin::GatewayConfig;
use test_support::TestPki;
use test_support::nats_server::NatsServer;
use tokio::io::AsyncReadExt;

/// An HTTPS client trusting `ca` (PEM file).
fn https_client(ca: &std::path::Path) -> reqwest::Client {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    // reqwest is built without a default provider: the product's clients install ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_serves_https_and_only_https() {
    let nats = NatsServer::start().await.unwrap();
    let pki = TestPki::generate().unwrap();
    let (cert, key) = (
        pki.server_cert().display().to_string(),
        pki.server_key().display().to_string(),
    );
    let config = GatewayConfig::try_parse_from([
        "gateway-plugin",
        "--nats-url",
        &nats.url(),
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--header-read-timeout",
        "1s",
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(gateway_plugin::run(config, listener, async move {
        let _ = rx.await;
    }));

    let client = https_client(&pki.ca());
    let base = format!("https://127.0.0.1:{}", addr.port());
    let end = Instant::now() + DEADLINE;
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < end, "the HTTPS gateway never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = client
        .post(format!("{base}/async-function/echo"))
        .body("over HTTPS")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(common::queued(&nats.url()).await, 1);

    // Plain HTTP on the TLS port: no HTTP answer.
    let plain = common::http()
        .get(format!("http://127.0.0.1:{}/readyz", addr.port()))
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    // A client that does not trust the authority: the handshake fails.
    let other = TestPki::generate().unwrap();
    assert!(
        https_client(&other.ca())
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_err()
    );
    // A connection that never says hello is closed at the header deadline.
    let began = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(DEADLINE, silent.read(&mut buf))
        .await
        .expect("a silent connection was held past the deadline")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );

    drop(tx);
    tokio::time::timeout(DEADLINE, gateway)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_bad_certificate_or_key_stops_the_gateway_at_start() {
    let pki = TestPki::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key\n").unwrap();
    let cases = [
        (
            pki.server_cert(),
            junk.clone(),
            "--tls-key (GATEWAY_TLS_KEY)",
        ),
        (
            junk.clone(),
            pki.server_key(),
            "--tls-cert (GATEWAY_TLS_CERT)",
        ),
        // The key of another certificate.
        (
            pki.server_cert(),
            pki.client_key(),
            "--tls-cert and --tls-key",
        ),
    ];
    for (cert, key, named) in cases {
        let config = GatewayConfig::try_parse_from([
            "gateway-plugin",
            // Nothing listens there: the check comes before any connection.
            "--nats-url",
            "nats://127.0.0.1:1",
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
        ])
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let result = tokio::time::timeout(
            DEADLINE,
            gateway_plugin::run(config, listener, std::future::pending()),
        )
        .await
        .expect("the gateway started with an unusable certificate");
        let error = result.unwrap_err().to_string();
        assert!(error.contains(named), "{error}");
    }
}
