//! Mesh mTLS: TLS 1.3 only, AES-GCM suites only, ALPN `h2`, both sides presenting a workload
//! certificate chained to the mesh roots. Identities are SPIFFE URI SANs; the client checks
//! the server's against the destination's expected identities, and hands the client's to the
//! server so policy can authorize it.

mod read_ahead;
mod verifier;

pub use read_ahead::ReadAhead;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::crypto::{ring, CryptoProvider};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::identity::cert::{identity_from_cert, CertError};
use crate::identity::{Identity, WorkloadCertificate};

pub use tokio_rustls::{
    client::TlsStream as ClientTlsStream, server::TlsStream as ServerTlsStream,
};

/// How much of the socket one read takes in under TLS. rustls reads in 4 KiB steps, at most
/// a record (~16 KiB) at a time, which made a receiving ztunnel pay a `recvfrom` per few KiB
/// of tunnel data (10 per write to the pod under bulk load, 1.2 with this). The
/// buffer is per HBONE connection, not per stream, and its pages are mostly touched only as
/// data flows: 10,000 concurrent streams (at least 100 connections) raised the soak's
/// peak RSS by 6 / 2 MiB.
const READ_AHEAD: usize = 256 * 1024;

/// What TLS runs over: the connection, read ahead once the handshake is done.
pub type TlsIo<IO> = ReadAhead<IO>;

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake failed: {0}")]
    Handshake(#[from] io::Error),
    #[error("peer presented no usable SPIFFE identity: {0}")]
    PeerIdentity(String),
}

/// The ring provider restricted to the two suites Istio's data plane allows.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = ring::default_provider();
            p.cipher_suites = vec![
                ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ];
            Arc::new(p)
        })
        .clone()
}

fn root_store(cert: &WorkloadCertificate) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for root in &cert.roots {
        roots
            .add(root.clone())
            .map_err(|e| TlsError::Config(format!("bad root: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A client config presenting `cert` and accepting only servers whose chain leads to the mesh
/// roots and whose SPIFFE identity is one of `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    expected: &[Identity],
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = verifier::MeshServerVerifier::new(
        root_store(cert)?,
        expected.to_vec(),
        provider.signature_verification_algorithms,
    );
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Resumption would skip the identity check above on a later connection that shares the
    // session cache; connections are long-lived and pooled, so full handshakes cost little.
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// A server config presenting `cert` and requiring a client certificate chained to the mesh
/// roots, naming an identity of `cert`'s trust domain. Which client identities are *allowed*
/// is policy's business, not TLS's.
pub fn server_config(cert: &WorkloadCertificate) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let chain = WebPkiClientVerifier::builder_with_provider(root_store(cert)?, provider.clone())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let client_verifier = Arc::new(verifier::MeshClientVerifier::new(
        chain,
        cert.identity.trust_domain.clone(),
    ));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.certified_key())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session tickets, for the same reason the client disables resumption.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The SPIFFE identity in the peer's (already verified) certificate.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Identity, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| TlsError::PeerIdentity("no certificate".into()))?;
    identity_from_cert(leaf).map_err(|e: CertError| TlsError::PeerIdentity(e.to_string()))
}

/// Client handshake to a mesh destination. No SNI is sent: the name is the destination IP.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    dst: SocketAddr,
    io: IO,
) -> Result<ClientTlsStream<TlsIo<IO>>, TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::IpAddress(dst.ip().into());
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, ReadAhead::new(io))
        .await?;
    stream.get_mut().0.enable(READ_AHEAD);
    Ok(stream)
}

/// Server handshake; returns the stream and the client's verified identity.
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    io: IO,
) -> Result<(ServerTlsStream<TlsIo<IO>>, Identity), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = tokio_rustls::TlsAcceptor::from(config)
        .accept(ReadAhead::new(io))
        .await?;
    let peer = peer_identity(stream.get_ref().1)?;
    // Only now: a client that never completes the handshake costs no buffer.
    stream.get_mut().0.enable(READ_AHEAD);
    Ok((stream, peer))
}

#[cfg(test)]
pub(crate) mod tests;
