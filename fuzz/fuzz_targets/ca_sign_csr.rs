//! The built-in CA's CSR handling (`identity::ca::CertificateAuthority::sign_csr`) on
//! arbitrary input: text starting with `-----BEGIN` is passed as PEM, anything else is taken
//! as DER and wrapped in a `CERTIFICATE REQUEST` PEM block (so the fuzzer reaches the
//! ASN.1 parser without having to learn base64).
//!
//! Oracle: no panic; a certificate that is issued names exactly the requested identity,
//! whatever the CSR asked for. Replayed by the unit test `identity::ca_corpus_tests` — keep
//! the two in step.
#![no_main]

use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use ztunnel::identity::ca::{CaOptions, CertificateAuthority};
use ztunnel::identity::cert::{identity_from_cert, parse_pem_certs};
use ztunnel::identity::Identity;

// Key generation is slow: one CA for the whole run.
static CA: LazyLock<CertificateAuthority> =
    LazyLock::new(|| CertificateAuthority::new(CaOptions::new("cluster.local")).expect("CA"));
/// The identity the seed CSRs are made for.
static IDENTITY: LazyLock<Identity> =
    LazyLock::new(|| Identity::new("cluster.local", "default", "fuzz"));

fuzz_target!(|data: &[u8]| {
    let pem = if data.starts_with(b"-----BEGIN") {
        String::from_utf8_lossy(data).into_owned()
    } else {
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        // 64-column lines, as RFC 7468 writers produce.
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).expect("base64 is ASCII"))
            .collect();
        let body = lines.join("\n");
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
    };
    if let Ok(chain) = CA.sign_csr(&pem, &IDENTITY, Duration::from_secs(3600)) {
        let leaf = parse_pem_certs(&chain[0]).expect("issued PEM").remove(0);
        assert_eq!(identity_from_cert(&leaf).expect("issued SAN"), *IDENTITY);
    }
});
