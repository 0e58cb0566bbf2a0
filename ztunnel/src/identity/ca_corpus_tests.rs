//! Replays the fuzz seed corpus of the CA's CSR handling (`fuzz/corpus/ca_sign_csr`)
//! through `CertificateAuthority::sign_csr` exactly as `fuzz/fuzz_targets/ca_sign_csr.rs`
//! does, so plain `cargo test` covers it; also writes those seeds.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};

use super::ca::{CaOptions, CertificateAuthority};
use super::cert::{identity_from_cert, parse_pem_certs};
use super::{csr, Identity};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/ca_sign_csr")
}

/// The identity the seed CSRs are made for (the fuzz target asks for it too).
fn fuzz_identity() -> Identity {
    Identity::new("cluster.local", "default", "fuzz")
}

/// The target's input convention: PEM text as is, anything else is DER to wrap in PEM.
fn input_to_pem(data: &[u8]) -> String {
    if data.starts_with(b"-----BEGIN") {
        return String::from_utf8_lossy(data).into_owned();
    }
    let b64 = base64(data);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

/// Standard base64 with padding (no dependency for a test helper).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn ca_sign_csr_corpus_replays() {
    let ca = CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap();
    let dir = corpus_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut signed = 0;
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let pem = input_to_pem(&data);
        match ca.sign_csr(&pem, &fuzz_identity(), Duration::from_secs(3600)) {
            Ok(chain) => {
                let leaf = parse_pem_certs(&chain[0]).unwrap().remove(0);
                assert_eq!(identity_from_cert(&leaf).unwrap(), fuzz_identity());
                signed += 1;
            }
            Err(e) => eprintln!("{}: {e}", path.display()),
        }
    }
    // The PEM and the DER form of the valid CSR.
    assert!(signed >= 2, "only {signed} seeds were signed");
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (raw, enc) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
    ] {
        assert_eq!(base64(raw.as_bytes()), enc);
    }
}

/// Run: `cargo test -p ztunnel --lib write_ca_seeds -- --ignored`.
#[test]
#[ignore = "rewrites fuzz/corpus/ca_sign_csr"]
fn write_ca_seeds() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let valid = csr::generate(&fuzz_identity()).unwrap().csr_pem;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(valid.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer| d.as_ref().to_vec())
        .unwrap();
    let other = csr::generate(&Identity::new("cluster.local", "default", "admin"))
        .unwrap()
        .csr_pem;
    let foreign = csr::generate(&Identity::new("evil.example", "default", "fuzz"))
        .unwrap()
        .csr_pem;
    // Extra SANs next to the right one, and a subject the CA must not copy.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "istiod.istio-system.svc");
    params.subject_alt_names = vec![
        SanType::URI(fuzz_identity().to_string().try_into().unwrap()),
        SanType::DnsName("istiod.istio-system.svc".try_into().unwrap()),
        SanType::IpAddress("10.0.0.1".parse().unwrap()),
    ];
    let extra = params.serialize_request(&key).unwrap().pem().unwrap();
    for (name, bytes) in [
        ("valid.pem", valid.into_bytes()),
        ("valid.der", der),
        ("other-identity.pem", other.into_bytes()),
        ("foreign-trust-domain.pem", foreign.into_bytes()),
        ("extra-sans.pem", extra.into_bytes()),
    ] {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
