//! The trust roots for the CA and xDS connections, as Istio's ztunnel takes them
//! (`CA_ROOT_CA`, `XDS_ROOT_CA`): a file of PEM certificates, `SYSTEM` for the node's own
//! trust store, or the PEM text itself.

use std::path::Path;

use anyhow::Context;

/// Where `SYSTEM` looks, in order: Debian and Ubuntu, RHEL and Fedora, Alpine and others.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

const PEM_CERT: &str = "-----BEGIN CERTIFICATE-----";

/// The PEM certificates `setting` names (`what` says which setting, for errors).
pub fn root_pem(setting: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    root_pem_from(setting, what, SYSTEM_BUNDLES)
}

fn root_pem_from(setting: &Path, what: &str, bundles: &[&str]) -> anyhow::Result<Vec<u8>> {
    let text = setting.to_string_lossy();
    let pem = if text == "SYSTEM" {
        let bundle = bundles
            .iter()
            .find(|b| Path::new(b).is_file())
            .with_context(|| {
                format!("{what}=SYSTEM: no trust store found (looked for {bundles:?})")
            })?;
        std::fs::read(bundle).with_context(|| format!("{what}=SYSTEM: reading {bundle}"))?
    } else if text.contains(PEM_CERT) {
        text.as_bytes().to_vec()
    } else {
        std::fs::read(setting).with_context(|| format!("reading {what} {}", setting.display()))?
    };
    if !String::from_utf8_lossy(&pem).contains(PEM_CERT) {
        anyhow::bail!("{what} {} holds no PEM certificate", setting.display());
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn a_file_system_or_inline_pem() {
        let dir = std::env::temp_dir().join(format!("ztunnel-roots-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("root.pem");
        std::fs::write(&file, PEM).unwrap();
        assert_eq!(
            root_pem_from(&file, "CA_ROOT_CA", &[]).unwrap(),
            PEM.as_bytes()
        );
        assert_eq!(
            root_pem_from(Path::new(PEM), "CA_ROOT_CA", &[]).unwrap(),
            PEM.as_bytes()
        );
        let bundle = file.to_str().unwrap();
        assert_eq!(
            root_pem_from(Path::new("SYSTEM"), "CA_ROOT_CA", &["/nonexistent", bundle]).unwrap(),
            PEM.as_bytes()
        );
        let err = root_pem_from(Path::new("SYSTEM"), "XDS_ROOT_CA", &["/nonexistent"]).unwrap_err();
        assert!(format!("{err:#}").contains("no trust store"), "{err:#}");
        let junk = dir.join("junk");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = root_pem_from(&junk, "CA_ROOT_CA", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("holds no PEM"), "{err:#}");
        assert!(root_pem_from(Path::new("/no/such/file"), "CA_ROOT_CA", &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
