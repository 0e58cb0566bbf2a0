//! Server certificate verification for mesh mTLS: the chain must lead to a mesh root and the
//! leaf's SPIFFE URI SAN must be one of the identities the destination is expected to have.
//! DNS names play no part: workloads are addressed by IP and known by SPIFFE identity.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
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
