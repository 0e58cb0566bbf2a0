use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::identity::ca::{CaOptions, CertificateAuthority};

/// Test fixtures shared with the HBONE and pool tests.
pub(crate) fn test_ca() -> CertificateAuthority {
    CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap()
}

pub(crate) fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

pub(crate) fn cert(ca: &CertificateAuthority, sa: &str) -> WorkloadCertificate {
    ca.issue_workload_cert(&id(sa), Duration::from_secs(3600))
        .unwrap()
}

fn dst() -> SocketAddr {
    "127.0.0.1:15008".parse().unwrap()
}

type Outcome = (
    Result<ClientTlsStream<TlsIo<tokio::io::DuplexStream>>, TlsError>,
    Result<(ServerTlsStream<TlsIo<tokio::io::DuplexStream>>, Identity), TlsError>,
);

async fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
    let (c, s) = tokio::io::duplex(64 * 1024);
    tokio::join!(connect(client, dst(), c), accept(server, s))
}

#[tokio::test]
async fn mtls_with_expected_identity() {
    let ca = test_ca();
    let client = client_config(&cert(&ca, "sleep"), &[id("other"), id("httpbin")]).unwrap();
    let server = server_config(&cert(&ca, "httpbin")).unwrap();
    let (c, s) = handshake(client, server).await;
    let mut c = c.unwrap();
    let (mut s, peer) = s.unwrap();
    assert_eq!(peer, id("sleep"));
    let conn = c.get_ref().1;
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(peer_identity(conn).unwrap(), id("httpbin"));
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn only_aes_gcm_suites_offered() {
    let names: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
    assert_eq!(
        names,
        [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        ]
    );
}

#[tokio::test]
async fn client_rejects_wrong_server_identity() {
    let ca = test_ca();
    let client = client_config(&cert(&ca, "sleep"), &[id("httpbin")]).unwrap();
    let server = server_config(&cert(&ca, "impostor")).unwrap();
    let (c, s) = handshake(client, server).await;
    let err = c.unwrap_err().to_string();
    assert!(err.contains("NotValidForName"), "{err}");
    assert!(s.is_err());
}

#[tokio::test]
async fn client_rejects_untrusted_server_root() {
    let ca = test_ca();
    let rogue = test_ca();
    let client = client_config(&cert(&ca, "sleep"), &[id("httpbin")]).unwrap();
    let server = server_config(&cert(&rogue, "httpbin")).unwrap();
    let (c, _) = handshake(client, server).await;
    let err = c.unwrap_err().to_string();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
}

#[tokio::test]
async fn server_rejects_untrusted_client_root() {
    let ca = test_ca();
    let rogue = test_ca();
    // The rogue client trusts the real root, so only the server's check can fail.
    let mut rogue_cert = cert(&rogue, "sleep");
    rogue_cert.roots = vec![ca.root_cert_der()];
    let client = client_config(&rogue_cert, &[id("httpbin")]).unwrap();
    let server = server_config(&cert(&ca, "httpbin")).unwrap();
    let (_, s) = handshake(client, server).await;
    let err = s.unwrap_err().to_string();
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_certificates_rejected_both_ways() {
    let ca = test_ca();
    let now = time::OffsetDateTime::now_utc();
    let expired = |sa: &str| {
        ca.issue_with_validity(
            &id(sa),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        )
    };
    // Expired server.
    let client = client_config(&cert(&ca, "sleep"), &[id("httpbin")]).unwrap();
    let server = server_config(&expired("httpbin")).unwrap();
    let (c, _) = handshake(client, server).await;
    let err = c.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("expired"), "{err}");
    // Expired client.
    let client = client_config(&expired("sleep"), &[id("httpbin")]).unwrap();
    let server = server_config(&cert(&ca, "httpbin")).unwrap();
    let (_, s) = handshake(client, server).await;
    let err = s.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn server_requires_client_certificate() {
    let ca = test_ca();
    let server_cert = cert(&ca, "httpbin");
    let verifier = verifier::MeshServerVerifier::new(
        root_store(&server_cert).unwrap(),
        vec![id("httpbin")],
        provider().signature_verification_algorithms,
    );
    let mut anon = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    anon.alpn_protocols = vec![ALPN_H2.to_vec()];
    let (_, s) = handshake(Arc::new(anon), server_config(&server_cert).unwrap()).await;
    let err = s.unwrap_err().to_string();
    assert!(
        err.contains("NoCertificatesPresented") || err.contains("certificate"),
        "{err}"
    );
}
