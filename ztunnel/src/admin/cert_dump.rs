//! `/config_dump`'s `certificates`, in Istio's ztunnel's shape, which `istioctl
//! ztunnel-config certificates` reads: per identity its state, its chain (leaf first) and
//! the roots it trusts, each certificate as base64 of its PEM with serial and validity
//! in RFC 3339. (`/certs` keeps our own view: rotation times, last error.)

use std::time::SystemTime;

use base64::Engine;
use rustls_pki_types::CertificateDer;
use serde::Serialize;

use crate::identity::manager::SecretManager;

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertDump {
    pem: String,
    serial_number: String,
    valid_from: String,
    expiration_time: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertsDump {
    identity: String,
    /// `Available`, `Initializing`, or `Unavailable: <why>` (upstream's words).
    state: String,
    cert_chain: Vec<CertDump>,
    root_certs: Vec<CertDump>,
}

pub fn certificates(certs: &SecretManager) -> Vec<CertsDump> {
    certs
        .held()
        .into_iter()
        .map(|(identity, cert, error)| match cert {
            Some(c) if !c.is_expired() => CertsDump {
                identity,
                state: "Available".into(),
                cert_chain: c.chain.iter().map(dump_cert).collect(),
                root_certs: c.roots.iter().map(dump_cert).collect(),
            },
            _ => CertsDump {
                identity,
                state: match error {
                    Some(e) => format!("Unavailable: {e}"),
                    None => "Initializing".into(),
                },
                cert_chain: vec![],
                root_certs: vec![],
            },
        })
        .collect()
}

fn dump_cert(der: &CertificateDer<'_>) -> CertDump {
    let pem = pem::encode(&pem::Pem::new("CERTIFICATE", der.as_ref()));
    let parsed = x509_parser::parse_x509_certificate(der.as_ref()).ok();
    let time = |t: Option<SystemTime>| t.map(rfc3339).unwrap_or_default();
    let validity = parsed.as_ref().map(|(_, c)| c.validity());
    CertDump {
        pem: base64::engine::general_purpose::STANDARD.encode(pem),
        serial_number: parsed
            .as_ref()
            .map(|(_, c)| c.raw_serial_as_string())
            .unwrap_or_default(),
        valid_from: time(validity.map(|v| v.not_before.to_datetime().into())),
        expiration_time: time(validity.map(|v| v.not_after.to_datetime().into())),
    }
}

/// `2026-12-07T12:00:00Z`.
fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_dumps_as_upstream_writes_it() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["example.test".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 2);
        params.not_after = rcgen::date_time_ymd(2027, 3, 4);
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x0a, 0xbc]));
        let cert = params.self_signed(&key).unwrap();
        let d = dump_cert(cert.der());
        assert_eq!(d.valid_from, "2026-01-02T00:00:00Z");
        assert_eq!(d.expiration_time, "2027-03-04T00:00:00Z");
        assert_eq!(d.serial_number, "0a:bc");
        let pem = base64::engine::general_purpose::STANDARD
            .decode(&d.pem)
            .unwrap();
        assert!(String::from_utf8(pem)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
