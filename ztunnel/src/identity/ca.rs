//! The built-in Certificate Authority used in standalone mode and tests: an ECDSA P-256 root
//! that signs workload CSRs for identities of its own trust domain.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::cert::{parse_pem_certs, WorkloadCertificate};
use super::{csr, Identity};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("CSR signature does not verify")]
    BadCsrSignature,
    #[error("CSR must carry exactly the SAN {requested}, it has {found:?}")]
    IdentityMismatch {
        requested: Identity,
        found: Vec<String>,
    },
    #[error("identity {identity} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("CA storage {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
    #[error("signing failed: {0}")]
    Signing(String),
}

#[derive(Clone, Debug)]
pub struct CaOptions {
    pub trust_domain: String,
    /// Where `root-cert.pem` / `root-key.pem` live; `None` keeps the root in memory only.
    pub dir: Option<PathBuf>,
    /// Validity granted when a request asks for none (zero).
    pub default_ttl: Duration,
    /// Upper bound on any workload certificate's validity.
    pub max_ttl: Duration,
    pub root_ttl: Duration,
    /// Leaf `notBefore` is set this far in the past so peers with slightly slow clocks
    /// accept a certificate the moment it is issued.
    pub backdate: Duration,
}

impl CaOptions {
    pub fn new(trust_domain: &str) -> Self {
        CaOptions {
            trust_domain: trust_domain.to_string(),
            dir: None,
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
            root_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
            backdate: Duration::from_secs(60),
        }
    }
}

/// A TLS server certificate for the CA's own endpoint, in PEM.
pub struct ServerCertPem {
    /// Leaf first, then the root.
    pub chain: Vec<String>,
    pub key: String,
}

pub struct CertificateAuthority {
    opts: CaOptions,
    root_pem: String,
    root_der: CertificateDer<'static>,
    root_not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Loads the root from `opts.dir` if both files are there, creates (and saves) one otherwise.
    pub fn new(opts: CaOptions) -> Result<Self, CaError> {
        let (root_pem, key) = match &opts.dir {
            Some(dir) => load_or_create(dir, &opts)?,
            None => create_root(&opts)?,
        };
        let signing = |e: rcgen::Error| CaError::Signing(e.to_string());
        let root_der = parse_pem_certs(&root_pem)
            .map_err(|e| CaError::Signing(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Signing("root PEM holds no certificate".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(root_der.as_ref())
            .map_err(|e| CaError::Signing(format!("root: {e}")))?;
        let root_not_after = parsed.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&root_der, key).map_err(signing)?;
        Ok(CertificateAuthority {
            opts,
            root_pem,
            root_der,
            root_not_after,
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.opts.trust_domain
    }

    pub fn max_ttl(&self) -> Duration {
        self.opts.max_ttl
    }

    pub fn root_cert_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn root_cert_der(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// Signs a workload CSR. The CSR must be well-formed, self-signed by its key, and its SANs
    /// must be exactly the requested identity's SPIFFE URI in this CA's trust domain. Nothing
    /// else from the CSR (subject, extensions) is copied: the CA decides those.
    /// Returns the PEM chain, leaf first, then the root.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        requested_ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        if identity.trust_domain != self.opts.trust_domain {
            return Err(self.foreign(identity));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => CaError::BadCsrSignature,
            other => CaError::MalformedCsr(other.to_string()),
        })?;
        let sans = &csr.params.subject_alt_names;
        let found: Vec<String> = sans.iter().map(san_to_string).collect();
        let requested_uri = identity.to_string();
        if found != [requested_uri] {
            // Say "foreign trust domain" when the CSR is for a SPIFFE ID of another domain.
            if let [SanType::URI(uri)] = sans.as_slice() {
                if let Ok(csr_id) = uri.as_str().parse::<Identity>() {
                    if csr_id.trust_domain != self.opts.trust_domain {
                        return Err(self.foreign(&csr_id));
                    }
                }
            }
            return Err(CaError::IdentityMismatch {
                requested: identity.clone(),
                found,
            });
        }
        let params = self.leaf_params(
            vec![SanType::URI(
                identity.to_string().try_into().map_err(sign_err)?,
            )],
            requested_ttl,
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(sign_err)?;
        Ok(vec![cert.pem(), self.root_pem.clone()])
    }

    /// Issues a TLS server certificate (with a fresh key) for the CA's own gRPC endpoint.
    pub fn issue_server_cert(
        &self,
        ips: &[IpAddr],
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<ServerCertPem, CaError> {
        let mut sans: Vec<SanType> = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for name in dns_names {
            sans.push(SanType::DnsName(name.clone().try_into().map_err(sign_err)?));
        }
        let params = self.leaf_params(sans, ttl, &[ExtendedKeyUsagePurpose::ServerAuth])?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        Ok(ServerCertPem {
            chain: vec![cert.pem(), self.root_pem.clone()],
            key: key.serialize_pem(),
        })
    }

    /// Key, CSR and signature in one step: for standalone mode and tests.
    pub fn issue_workload_cert(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCertificate, CaError> {
        let req = csr::generate(identity).map_err(|e| CaError::Signing(e.to_string()))?;
        let chain = self.sign_csr(&req.csr_pem, identity, ttl)?;
        WorkloadCertificate::from_ca_response(identity.clone(), &chain, req.key, &[])
            .map_err(|e| CaError::Signing(e.to_string()))
    }

    /// A certificate with an explicit validity window, e.g. an already expired one for tests.
    #[cfg(test)]
    pub(crate) fn issue_with_validity(
        &self,
        identity: &Identity,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> WorkloadCertificate {
        let req = csr::generate(identity).unwrap();
        let parsed = CertificateSigningRequestParams::from_pem(&req.csr_pem).unwrap();
        let mut params = self
            .leaf_params(
                parsed.params.subject_alt_names.clone(),
                Duration::from_secs(60),
                &[
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            )
            .unwrap();
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&parsed.public_key, &self.issuer).unwrap();
        WorkloadCertificate::new(
            identity.clone(),
            vec![cert.der().clone()],
            req.key,
            vec![self.root_der.clone()],
        )
        .unwrap()
    }

    fn leaf_params(
        &self,
        sans: Vec<SanType>,
        requested_ttl: Duration,
        ekus: &[ExtendedKeyUsagePurpose],
    ) -> Result<CertificateParams, CaError> {
        let ttl = if requested_ttl.is_zero() {
            self.opts.default_ttl
        } else {
            requested_ttl
        };
        let ttl = ttl.min(self.opts.max_ttl);
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.not_before = now - self.opts.backdate;
        // A leaf never outlives the root that vouches for it.
        params.not_after = (now + ttl).min(self.root_not_after);
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = ekus.to_vec();
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }

    fn foreign(&self, identity: &Identity) -> CaError {
        CaError::ForeignTrustDomain {
            identity: identity.clone(),
            trust_domain: self.opts.trust_domain.clone(),
        }
    }
}

fn sign_err(e: rcgen::Error) -> CaError {
    CaError::Signing(e.to_string())
}

/// The SANs a CSR asks for, to name them in a refusal; `None` if it does not parse (signing
/// it reports why) or asks for none.
pub fn requested_sans(csr_pem: &str) -> Option<Vec<String>> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).ok()?;
    let sans = &csr.params.subject_alt_names;
    (!sans.is_empty()).then(|| sans.iter().map(san_to_string).collect())
}

fn san_to_string(san: &SanType) -> String {
    match san {
        SanType::URI(s) => s.as_str().to_string(),
        SanType::DnsName(s) => format!("DNS:{}", s.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

/// 16 random bytes with the top bit clear: a positive serial, unique with high probability.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn create_root(opts: &CaOptions) -> Result<(String, KeyPair), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, opts.trust_domain.as_str());
    dn.push(DnType::CommonName, format!("{} root CA", opts.trust_domain));
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + opts.root_ttl;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(sign_err)?;
    Ok((cert.pem(), key))
}

fn load_or_create(dir: &Path, opts: &CaOptions) -> Result<(String, KeyPair), CaError> {
    let cert_path = dir.join(ROOT_CERT_FILE);
    let key_path = dir.join(ROOT_KEY_FILE);
    let storage = |path: &Path, reason: String| CaError::Storage {
        path: path.to_path_buf(),
        reason,
    };
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let cert =
                fs::read_to_string(&cert_path).map_err(|e| storage(&cert_path, e.to_string()))?;
            let key_pem =
                fs::read_to_string(&key_path).map_err(|e| storage(&key_path, e.to_string()))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| storage(&key_path, e.to_string()))?;
            Ok((cert, key))
        }
        (false, false) => {
            fs::create_dir_all(dir).map_err(|e| storage(dir, e.to_string()))?;
            let (cert, key) = create_root(opts)?;
            write_private(&key_path, &key.serialize_pem())
                .map_err(|e| storage(&key_path, e.to_string()))?;
            fs::write(&cert_path, &cert).map_err(|e| storage(&cert_path, e.to_string()))?;
            Ok((cert, key))
        }
        // Refuse to guess: a lone cert or key means someone's setup is half done.
        (true, false) => Err(storage(
            &key_path,
            "root certificate present but key missing".into(),
        )),
        (false, true) => Err(storage(
            &cert_path,
            "root key present but certificate missing".into(),
        )),
    }
}

/// The root key is the mesh's master secret: readable by its owner only.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn ca() -> CertificateAuthority {
        let mut opts = CaOptions::new("cluster.local");
        opts.max_ttl = Duration::from_secs(3600);
        CertificateAuthority::new(opts).unwrap()
    }

    #[test]
    fn signs_valid_csr() {
        let ca = ca();
        let id = Identity::new("cluster.local", "default", "sleep");
        let req = csr::generate(&id).unwrap();
        let chain = ca
            .sign_csr(&req.csr_pem, &id, Duration::from_secs(600))
            .unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.root_cert_pem());
        let cert = WorkloadCertificate::from_ca_response(id.clone(), &chain, req.key, &[]).unwrap();
        assert_eq!(cert.identity, id);
        let life = cert
            .not_after
            .duration_since(std::time::SystemTime::now())
            .unwrap();
        assert!(
            life <= Duration::from_secs(600) && life > Duration::from_secs(590),
            "{life:?}"
        );
    }

    #[test]
    fn caps_ttl() {
        let ca = ca();
        let id = Identity::new("cluster.local", "default", "sleep");
        let cert = ca
            .issue_workload_cert(&id, Duration::from_secs(100 * 3600))
            .unwrap();
        assert!(cert.remaining() <= Duration::from_secs(3600));
        assert!(cert.remaining() > Duration::from_secs(3500));
    }

    #[test]
    fn rejects_malformed_csr() {
        let ca = ca();
        let id = Identity::new("cluster.local", "default", "sleep");
        for bad in [
            "",
            "not a pem",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let err = ca.sign_csr(bad, &id, Duration::ZERO).unwrap_err();
            assert!(matches!(err, CaError::MalformedCsr(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn rejects_tampered_csr() {
        let ca = ca();
        let id = Identity::new("cluster.local", "default", "sleep");
        let req = csr::generate(&id).unwrap();
        let mut der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(req.csr_pem.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        // Flip a bit in the signature (the last bytes of the DER).
        let n = der.len();
        der[n - 3] ^= 0x01;
        let pem = pem_encode_csr(&der);
        let err = ca.sign_csr(&pem, &id, Duration::ZERO).unwrap_err();
        assert!(
            matches!(err, CaError::BadCsrSignature | CaError::MalformedCsr(_)),
            "{err}"
        );
    }

    #[test]
    fn rejects_mismatched_identity() {
        let ca = ca();
        let asked = Identity::new("cluster.local", "default", "sleep");
        let other = Identity::new("cluster.local", "default", "admin");
        let req = csr::generate(&other).unwrap();
        let err = ca
            .sign_csr(&req.csr_pem, &asked, Duration::ZERO)
            .unwrap_err();
        assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
    }

    #[test]
    fn rejects_extra_sans() {
        let ca = ca();
        let id = Identity::new("cluster.local", "default", "sleep");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(id.to_string().try_into().unwrap()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ];
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = ca.sign_csr(&pem, &id, Duration::ZERO).unwrap_err();
        assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
    }

    #[test]
    fn rejects_foreign_trust_domain() {
        let ca = ca();
        let foreign = Identity::new("evil.org", "default", "sleep");
        let req = csr::generate(&foreign).unwrap();
        let err = ca
            .sign_csr(&req.csr_pem, &foreign, Duration::ZERO)
            .unwrap_err();
        assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
        // Asking for a local identity with a CSR for a foreign one is also named as such.
        let local = Identity::new("cluster.local", "default", "sleep");
        let err = ca
            .sign_csr(&req.csr_pem, &local, Duration::ZERO)
            .unwrap_err();
        assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
    }

    #[test]
    fn persists_root_in_dir() {
        let dir = std::env::temp_dir().join(format!("ztunnel-ca-test-{}", rand::random::<u64>()));
        let mut opts = CaOptions::new("cluster.local");
        opts.dir = Some(dir.clone());
        let first = CertificateAuthority::new(opts.clone()).unwrap();
        let second = CertificateAuthority::new(opts.clone()).unwrap();
        assert_eq!(first.root_cert_pem(), second.root_cert_pem());
        // A certificate from the reloaded CA chains to the original root.
        let id = Identity::new("cluster.local", "default", "sleep");
        let cert = second
            .issue_workload_cert(&id, Duration::from_secs(60))
            .unwrap();
        assert_eq!(cert.roots[0], first.root_cert_der());
        fs::remove_file(dir.join(ROOT_KEY_FILE)).unwrap();
        assert!(matches!(
            CertificateAuthority::new(opts),
            Err(CaError::Storage { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn issues_server_cert() {
        let ca = ca();
        let out = ca
            .issue_server_cert(
                &["127.0.0.1".parse().unwrap()],
                &["istiod.istio-system.svc".to_string()],
                Duration::from_secs(3600),
            )
            .unwrap();
        assert_eq!(out.chain.len(), 2);
        assert!(out.key.contains("PRIVATE KEY"));
        let der = parse_pem_certs(&out.chain[0]).unwrap().remove(0);
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 2);
    }

    fn pem_encode_csr(der: &[u8]) -> String {
        let b64 = base64_encode(der);
        let body: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            body.join("\n")
        )
    }

    fn base64_encode(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
