//! Key and certificate signing request generation for a workload identity.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

#[derive(Debug, thiserror::Error)]
#[error("cannot create CSR for {identity}: {reason}")]
pub struct CsrError {
    identity: String,
    reason: String,
}

/// A fresh private key (kept in memory only) and a PEM CSR for it.
pub struct CsrAndKey {
    pub csr_pem: String,
    pub key: PrivateKeyDer<'static>,
}

/// Makes an ECDSA P-256 key and a CSR whose only SAN is the identity's SPIFFE URI, with an
/// empty subject, as Istio's agents do.
pub fn generate(identity: &Identity) -> Result<CsrAndKey, CsrError> {
    let fail = |e: rcgen::Error| CsrError {
        identity: identity.to_string(),
        reason: e.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity.to_string().try_into().map_err(fail)?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(fail)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(CsrAndKey { csr_pem, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_carries_spiffe_uri() {
        let id = Identity::new("cluster.local", "ns1", "sa1");
        let out = generate(&id).unwrap();
        assert!(out
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&out.csr_pem).unwrap();
        assert_eq!(
            parsed.params.subject_alt_names,
            vec![SanType::URI(id.to_string().try_into().unwrap())]
        );
    }
}
