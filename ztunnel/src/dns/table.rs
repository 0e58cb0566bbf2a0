//! What the mesh answers for a name: the addresses of the service of that hostname (a
//! Kubernetes service, a ServiceEntry host with its VIPs, auto-allocated ones included, or
//! a wildcard host), as the asking pod may see it.

use std::net::IpAddr;
use std::sync::Arc;

use super::names;
use crate::state::{ProxyState, Service, Workload};

/// The mesh's answer to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The service `hostname` has these addresses of the family asked (empty: the name
    /// exists, without an address of that family — NODATA).
    Found { hostname: String, ips: Vec<IpAddr> },
    /// Not a mesh name for this client: the node's resolvers answer.
    NotMesh,
}

/// Looks `qname` (lowercase, no final dot) up for `client`, for an A (`v6` false) or AAAA
/// question.
pub fn lookup(
    state: &ProxyState,
    client: Option<&Workload>,
    qname: &str,
    v6: bool,
    cluster_domain: &str,
) -> Lookup {
    let ns = client.map(|w| w.namespace.as_str());
    let service = names::candidates(qname, ns, cluster_domain)
        .into_iter()
        .find_map(|h| state.service_by_hostname(&h, ns))
        .or_else(|| names::wildcards(qname).find_map(|h| state.service_by_hostname(&h, ns)));
    // `service_by_hostname` skips services the client may not see (`visibility`): such a
    // name is not the mesh's to answer (the cluster's DNS may know it for other reasons).
    let Some(svc) = service else {
        return Lookup::NotMesh;
    };
    Lookup::Found {
        hostname: svc.hostname.clone(),
        ips: addresses(&svc, state, v6),
    }
}

/// One name the DNS proxy answers: what `/config_dump` (`dns`) and `ztunnel debug dns` show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub hostname: String,
    pub namespace: String,
    /// IPv4 then IPv6: the VIPs, or a headless service's endpoints.
    pub addresses: Vec<IpAddr>,
    /// `PUBLIC`, or `NAMESPACE` (answered only to its own namespace's pods).
    pub visibility: crate::state::Visibility,
}

/// Every name the DNS proxy answers from the mesh, sorted by hostname and namespace.
pub fn entries(state: &ProxyState) -> Vec<Entry> {
    let mut out: Vec<Entry> = state
        .services()
        .map(|svc| {
            let mut both = addresses(svc, state, false);
            both.extend(addresses(svc, state, true));
            Entry {
                hostname: svc.hostname.clone(),
                namespace: svc.namespace.clone(),
                addresses: both,
                visibility: svc.visibility,
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.hostname, &a.namespace).cmp(&(&b.hostname, &b.namespace)));
    out
}

/// The service's VIPs of the family asked, on this node's network. A service without a
/// VIP (headless) answers with its endpoints' addresses, as Kubernetes DNS does.
fn addresses(svc: &Arc<Service>, state: &ProxyState, v6: bool) -> Vec<IpAddr> {
    let family = |ip: &IpAddr| ip.is_ipv6() == v6;
    let vips: Vec<IpAddr> = svc
        .vips
        .iter()
        .filter(|v| v.network == state.network())
        .map(|v| v.address)
        .filter(family)
        .collect();
    if !svc.vips.is_empty() {
        return vips;
    }
    let mut ips: Vec<IpAddr> = state
        .endpoints(&svc.key())
        .iter()
        .filter(|(w, _)| w.network == state.network() && w.is_healthy())
        .flat_map(|(w, _)| w.workload_ips.clone())
        .filter(family)
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NamespacedHostname, StateStore, Visibility};

    fn svc(ns: &str, host: &str, vips: &[&str]) -> Service {
        Service {
            name: host.split('.').next().unwrap().into(),
            namespace: ns.into(),
            hostname: host.into(),
            vips: vips.iter().map(|v| v.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    fn client(ns: &str) -> Workload {
        Workload {
            uid: format!("c//Pod/{ns}/client"),
            namespace: ns.into(),
            workload_ips: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        }
    }

    fn found(ips: &[&str]) -> Vec<IpAddr> {
        ips.iter().map(|i| i.parse().unwrap()).collect()
    }

    #[test]
    fn services_entries_wildcards_and_visibility() {
        let store = StateStore::default();
        let headless_key = NamespacedHostname::new("default", "db.default.svc.cluster.local");
        let backend = Workload {
            uid: "c//Pod/default/db-0".into(),
            namespace: "default".into(),
            workload_ips: found(&["10.0.0.9", "fd00::9"]),
            services: [(headless_key, Default::default())].into(),
            ..Default::default()
        };
        store.replace_all(
            [backend],
            [
                svc(
                    "default",
                    "echo.default.svc.cluster.local",
                    &["/10.96.0.10", "/fd00::10"],
                ),
                svc("default", "db.default.svc.cluster.local", &[]),
                svc("other", "api.example.com", &["/240.240.0.1"]),
                svc("other", "*.wild.example.com", &["/240.240.0.2"]),
                Service {
                    visibility: Visibility::Namespace,
                    ..svc("secret", "hidden.example.com", &["/240.240.0.3"])
                },
            ],
            [],
        );
        let state = store.snapshot();
        let c = client("default");
        let ask = |q: &str, v6: bool| lookup(&state, Some(&c), q, v6, "cluster.local");
        let ips = |q: &str, v6: bool| match ask(q, v6) {
            Lookup::Found { ips, .. } => Some(ips),
            Lookup::NotMesh => None,
        };
        // Each form the pod's resolver sends for `echo`, `echo.default`, `echo.default.svc`.
        for q in [
            "echo.default.svc.cluster.local",
            "echo.default.default.svc.cluster.local",
            "echo.default.svc.default.svc.cluster.local",
        ] {
            assert_eq!(ips(q, false), Some(found(&["10.96.0.10"])), "{q}");
        }
        assert_eq!(
            ips("echo.default.svc.cluster.local", true),
            Some(found(&["fd00::10"]))
        );
        // A ServiceEntry host, as asked and behind a search domain.
        assert_eq!(ips("api.example.com", false), Some(found(&["240.240.0.1"])));
        assert_eq!(
            ips("api.example.com.default.svc.cluster.local", false),
            Some(found(&["240.240.0.1"]))
        );
        // NODATA: the name exists, no IPv6.
        assert_eq!(ips("api.example.com", true), Some(vec![]));
        assert_eq!(
            ips("x.y.wild.example.com", false),
            Some(found(&["240.240.0.2"]))
        );
        // Headless: the endpoints.
        assert_eq!(
            ips("db.default.svc.cluster.local", true),
            Some(found(&["fd00::9"]))
        );
        // Not the mesh's: other names, and a service scoped to another namespace.
        assert_eq!(ask("www.example.org", false), Lookup::NotMesh);
        assert_eq!(ask("hidden.example.com", false), Lookup::NotMesh);
        let insider = client("secret");
        assert!(matches!(
            lookup(
                &state,
                Some(&insider),
                "hidden.example.com",
                false,
                "cluster.local"
            ),
            Lookup::Found { .. }
        ));
    }
}
