//! Certificate verification for mesh mTLS. Servers: the chain must lead to a mesh root and
//! the leaf's SPIFFE URI SAN must be one of the identities the destination is expected to
//! have. Clients: the chain must lead to a mesh root and the identity be of our trust
//! domain. DNS names play no part: workloads are addressed by IP and known by SPIFFE identity.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::cert::identity_from_cert;
use crate::identity::Identity;

#[derive(Debug)]
pub(super) struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
}

impl MeshServerVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        expected: Vec<Identity>,
        algs: WebPkiSupportedAlgorithms,
    ) -> Self {
        MeshServerVerifier {
            roots,
            expected,
            algs,
        }
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // Chain, validity period and serverAuth usage, via webpki.
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let actual = identity_from_cert(end_entity).map_err(|e| {
            tracing::warn!(error = %e, "server certificate has no SPIFFE identity");
            Error::InvalidCertificate(CertificateError::NotValidForName)
        })?;
        if !self.expected.contains(&actual) {
            tracing::warn!(%actual, expected = ?self.expected.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "server identity is not one the destination may have");
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Unreachable with a TLS 1.3-only config, but correct if it ever is reached.
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client certificate verification: webpki's chain check to the mesh roots, then the leaf's
/// SPIFFE identity must belong to our trust domain. A certificate that chains to a root we
/// share with another mesh but names that mesh's trust domain is not one of our workloads
/// (namespace-only policies would otherwise match it).
#[derive(Debug)]
pub(super) struct MeshClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl MeshClientVerifier {
    pub(super) fn new(chain: Arc<dyn ClientCertVerifier>, trust_domain: String) -> Self {
        MeshClientVerifier {
            chain,
            trust_domain,
        }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let client = identity_from_cert(end_entity).map_err(|e| {
            tracing::info!(error = %e, "client certificate has no SPIFFE identity: refused");
            Error::InvalidCertificate(CertificateError::NotValidForName)
        })?;
        if client.trust_domain != self.trust_domain {
            tracing::info!(%client, trust_domain = %self.trust_domain,
                "client identity from a foreign trust domain: refused");
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
