//! Endpoints known by hostname only (a ServiceEntry with `resolution: DNS` whose endpoint,
//! or host, is a name): the state cannot say where they are, so the connection looks the
//! name up when it is made (`dns::OnDemand`) and [`Unresolved::found`] picks the address from
//! what came back. Everything here is pure; the lookup itself is the caller's.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::seq::IndexedRandom;
use rand::Rng;

use super::resolve::{ResolveError, Upstream};
use super::service::{IpFamilies, Service};
use super::workload::Workload;

/// A picked endpoint whose address is a hostname still to be looked up.
#[derive(Debug, Clone)]
pub struct Unresolved {
    pub workload: Arc<Workload>,
    /// The target port on the endpoint.
    pub port: u16,
    /// The service whose VIP was dialed.
    pub service: Option<Arc<Service>>,
    /// The address the client dialed: its IP family is preferred.
    pub dialed: IpAddr,
}

impl Unresolved {
    pub fn hostname(&self) -> &str {
        &self.workload.hostname
    }

    /// The endpoint at one of the addresses the lookup `found` (see [`pick_address`]).
    pub fn found(self, found: &[IpAddr], rng: &mut impl Rng) -> Result<Upstream, ResolveError> {
        let families = self
            .service
            .as_ref()
            .map_or(IpFamilies::Automatic, |s| s.ip_families);
        let Some(ip) = pick_address(found, families, self.dialed, rng) else {
            return Err(self.failed(if found.is_empty() {
                "no address".to_string()
            } else {
                format!("no address the service allows ({families:?}) among {found:?}")
            }));
        };
        Ok(Upstream {
            address: SocketAddr::new(ip, self.port),
            workload: self.workload,
            service: self.service,
        })
    }

    /// The refusal for a lookup that gave nothing usable.
    pub fn failed(&self, error: impl Into<String>) -> ResolveError {
        ResolveError::Dns {
            hostname: self.hostname().to_string(),
            error: error.into(),
        }
    }
}

/// The address to dial among those a lookup found: one the service's IP families allow, of
/// the dialed address's family when there is one (a v4-only client or network cannot use a
/// v6 answer), at random among equals so that a name with several addresses spreads its
/// connections as DNS round robin would.
pub fn pick_address(
    found: &[IpAddr],
    families: IpFamilies,
    dialed: IpAddr,
    rng: &mut impl Rng,
) -> Option<IpAddr> {
    let allowed: Vec<IpAddr> = found
        .iter()
        .map(|ip| ip.to_canonical())
        .filter(|ip| families.accepts(*ip))
        .collect();
    let same_family: Vec<IpAddr> = allowed
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == dialed.to_canonical().is_ipv4())
        .collect();
    same_family
        .choose(rng)
        .or_else(|| allowed.choose(rng))
        .copied()
}

/// Whether `name` can be looked up: DNS labels (letters, digits, `-`, `_`) of 1 to 63
/// characters, at most 253 in all, a final dot allowed. Checked when the record arrives,
/// so a name no lookup could answer is reported where it came from rather than as a
/// failed lookup on every connection.
pub fn check_hostname(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(label_ok) {
        return Err(format!("{name:?} is not a hostname that can be looked up"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn picks_an_allowed_address_of_the_dialed_family() {
        use IpFamilies::*;
        let v4 = "10.96.0.1";
        let v6 = "fd00::1";
        // (found, families, dialed, the only acceptable picks)
        let table: &[(&[&str], IpFamilies, &str, &[&str])] = &[
            (&["192.0.2.1"], Automatic, v4, &["192.0.2.1"]),
            (&["2001:db8::1", "192.0.2.1"], Automatic, v4, &["192.0.2.1"]),
            (
                &["2001:db8::1", "192.0.2.1"],
                Automatic,
                v6,
                &["2001:db8::1"],
            ),
            // only the other family: used, as a dual-stack pod's address would be
            (&["2001:db8::1"], Automatic, v4, &["2001:db8::1"]),
            // ...unless the service forbids it
            (&["2001:db8::1"], Ipv4Only, v4, &[]),
            (
                &["2001:db8::1", "192.0.2.1"],
                Ipv6Only,
                v4,
                &["2001:db8::1"],
            ),
            // a v4-mapped answer is a v4 address
            (&["::ffff:192.0.2.7"], Ipv4Only, v4, &["192.0.2.7"]),
            // several of one family: any of them
            (
                &["192.0.2.1", "192.0.2.2", "2001:db8::1"],
                Dual,
                v4,
                &["192.0.2.1", "192.0.2.2"],
            ),
            (&[], Automatic, v4, &[]),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (found, families, dialed, want) in table {
            let want = ips(want);
            for _ in 0..8 {
                let got = pick_address(&ips(found), *families, dialed.parse().unwrap(), &mut rng);
                match got {
                    Some(ip) => assert!(want.contains(&ip), "{found:?} {families:?}: {ip}"),
                    None => assert!(want.is_empty(), "{found:?} {families:?}: none"),
                }
            }
        }
    }

    #[test]
    fn several_addresses_all_get_connections() {
        let found = ips(&["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let dialed = "10.96.0.1".parse().unwrap();
            seen.extend(pick_address(
                &found,
                IpFamilies::Automatic,
                dialed,
                &mut rng,
            ));
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn lookup_failures_name_the_hostname() {
        let w = Workload {
            uid: "Kubernetes/networking.istio.io/ServiceEntry/default/ext/ext.example.com".into(),
            hostname: "ext.example.com".into(),
            ..Default::default()
        };
        let lookup = Unresolved {
            workload: Arc::new(w),
            port: 443,
            service: None,
            dialed: "240.240.0.1".parse().unwrap(),
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let up = lookup
            .clone()
            .found(&ips(&["192.0.2.9"]), &mut rng)
            .unwrap();
        assert_eq!(up.address, "192.0.2.9:443".parse().unwrap());
        let e = lookup.found(&[], &mut rng).unwrap_err().to_string();
        assert_eq!(e, "could not resolve ext.example.com: no address");
    }

    #[test]
    fn hostnames_that_can_be_looked_up() {
        for ok in [
            "ext.example.com",
            "ext.example.com.",
            "a",
            "_svc.x-y.io",
            "db1",
        ] {
            assert_eq!(check_hostname(ok), Ok(()), "{ok}");
        }
        let long = format!("{}.com", "a".repeat(64));
        for bad in [
            "",
            ".",
            "a..b",
            "a b",
            "a/b",
            "*.example.com",
            "10.0.0.1:80",
            &long,
        ] {
            assert!(check_hostname(bad).is_err(), "{bad:?}");
        }
    }
}
