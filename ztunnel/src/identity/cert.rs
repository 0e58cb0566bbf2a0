//! A workload's certificate, key and trust roots, as held by the node's Citadel Agent.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("no trust roots")]
    NoRoots,
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeSan,
    #[error("certificate is for {actual}, expected {expected}")]
    // Strings, not `Identity`s: keeps this error (returned on hot paths) small.
    WrongIdentity { expected: String, actual: String },
    #[error("unusable private key: {0}")]
    Key(String),
}

/// A workload's leaf certificate (plus intermediates), its private key and the mesh roots that
/// peers' certificates are verified against.
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Leaf first, then intermediates; the root is not included (peers have it).
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Built once so every TLS handshake reuses the parsed key instead of re-parsing PKCS#8.
    certified: Arc<CertifiedKey>,
}

impl std::fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl WorkloadCertificate {
    /// Assembles a certificate, checking that the leaf really carries `identity` and that the
    /// key is usable by rustls.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        if roots.is_empty() {
            return Err(CertError::NoRoots);
        }
        let parsed = parse(leaf)?;
        let actual = spiffe_identity(&parsed)?;
        if actual != identity {
            return Err(CertError::WrongIdentity {
                expected: identity.to_string(),
                actual: actual.to_string(),
            });
        }
        let not_before = to_system_time(parsed.validity().not_before.timestamp());
        let not_after = to_system_time(parsed.validity().not_after.timestamp());
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| CertError::Key(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(chain.clone(), signing_key));
        Ok(WorkloadCertificate {
            identity,
            chain,
            key,
            roots,
            not_before,
            not_after,
            certified,
        })
    }

    /// Builds from a CA answer in Istio's convention: PEM certificates, leaf first and the
    /// root last. `extra_roots` are added to the trust bundle (e.g. during a root migration).
    pub fn from_ca_response(
        identity: Identity,
        pem_chain: &[String],
        key: PrivateKeyDer<'static>,
        extra_roots: &[CertificateDer<'static>],
    ) -> Result<Self, CertError> {
        let mut certs = Vec::new();
        for pem in pem_chain {
            certs.extend(parse_pem_certs(pem)?);
        }
        if certs.is_empty() {
            return Err(CertError::EmptyChain);
        }
        let mut roots: Vec<_> = extra_roots.to_vec();
        // A single certificate is a leaf without its root: the caller must supply roots.
        if certs.len() > 1 {
            roots.insert(0, certs.pop().expect("len > 1"));
        }
        Self::new(identity, certs, key, roots)
    }

    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The chain and signing key in the form rustls presents during a handshake.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    pub fn is_expired(&self) -> bool {
        self.is_expired_at(SystemTime::now())
    }

    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Time left until expiry (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// The full validity period of the certificate.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }

    /// Serial number of the leaf (hex), handy for logs and the admin page.
    pub fn serial(&self) -> String {
        parse(&self.chain[0])
            .map(|c| c.raw_serial_as_string())
            .unwrap_or_default()
    }
}

/// The SPIFFE identity in a peer certificate's URI SAN.
pub fn identity_from_cert(der: &CertificateDer<'_>) -> Result<Identity, CertError> {
    spiffe_identity(&parse(der)?)
}

/// Seconds since the epoch, for JSON output.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// All certificates in a PEM text.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CertError> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| CertError::Parse(e.to_string()))
}

/// The first `spiffe://` URI SAN. Istio certificates carry exactly one.
fn spiffe_identity(cert: &X509Certificate<'_>) -> Result<Identity, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse(e.to_string()))?
        .ok_or(CertError::NoSpiffeSan)?;
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => uri.parse().ok(),
            _ => None,
        })
        .ok_or(CertError::NoSpiffeSan)
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{CaOptions, CertificateAuthority};

    #[test]
    fn issued_certificate_round_trips() {
        let ca = CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let cert = ca
            .issue_workload_cert(&id, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(cert.identity, id);
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.roots.len(), 1);
        assert!(!cert.is_expired());
        assert!(cert.remaining() > Duration::from_secs(3500));
        assert_eq!(identity_from_cert(&cert.chain[0]).unwrap(), id);
        assert!(!cert.serial().is_empty());
        // The root carries no SPIFFE SAN.
        assert!(matches!(
            identity_from_cert(&cert.roots[0]),
            Err(CertError::NoSpiffeSan)
        ));
    }

    #[test]
    fn rejects_chain_for_other_identity() {
        let ca = CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap();
        let id = Identity::new("cluster.local", "default", "sleep");
        let cert = ca
            .issue_workload_cert(&id, Duration::from_secs(3600))
            .unwrap();
        let other = Identity::new("cluster.local", "default", "other");
        let err = WorkloadCertificate::new(
            other,
            cert.chain.clone(),
            cert.key().clone_key(),
            cert.roots.clone(),
        )
        .unwrap_err();
        assert!(matches!(err, CertError::WrongIdentity { .. }));
    }
}
