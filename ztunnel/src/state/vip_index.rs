//! Which service a destination address stands for.
//!
//! Several services may share one VIP (a ServiceEntry per namespace for the same external
//! host, say), and a ServiceEntry may claim a whole range. The client's namespace decides
//! among them, as in Istio: services it may not see are skipped (`visibility`); one in its
//! own namespace wins; then a `canonical` one; then the first seen. An exact VIP beats any
//! range; among ranges the client's namespace wins, then the longest prefix, then
//! `canonical`.

use std::borrow::Borrow;
use std::collections::HashMap;

use super::service::{NetworkCidr, Service};
use super::workload::{NamespacedHostname, NetworkAddress};

#[derive(Debug, Clone, Default)]
pub struct VipIndex {
    /// In the order the services arrived.
    exact: HashMap<NetworkAddress, Vec<NamespacedHostname>>,
    ranges: Vec<(NetworkCidr, NamespacedHostname)>,
}

impl VipIndex {
    pub fn insert(&mut self, svc: &Service) {
        let key = svc.key();
        for vip in &svc.vips {
            let keys = self.exact.entry(vip.clone()).or_default();
            if !keys.contains(&key) {
                keys.push(key.clone());
            }
        }
        for cidr in &svc.cidr_vips {
            self.ranges.push((cidr.clone(), key.clone()));
        }
    }

    pub fn remove(&mut self, svc: &Service) {
        let key = svc.key();
        for vip in &svc.vips {
            if let Some(keys) = self.exact.get_mut(vip) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    self.exact.remove(vip);
                }
            }
        }
        self.ranges.retain(|(_, k)| *k != key);
    }

    /// The services with `addr` as an exact VIP, in arrival order.
    pub fn exact(&self, addr: &NetworkAddress) -> &[NamespacedHostname] {
        self.exact.get(addr).map_or(&[], Vec::as_slice)
    }

    /// The services with a range containing `addr`, with the range's prefix length.
    pub fn ranges<'a>(
        &'a self,
        addr: &'a NetworkAddress,
    ) -> impl Iterator<Item = (u8, &'a NamespacedHostname)> + 'a {
        self.ranges
            .iter()
            .filter(move |(c, _)| c.contains(addr))
            .map(|(c, k)| (c.cidr.prefix_len(), k))
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.ranges.is_empty()
    }
}

/// Of the services sharing an exact VIP (in arrival order), the one a client in
/// `client_ns` reaches (`None`: no client namespace known; visibility is not applied).
/// After a canonical one, one in `preferred_ns` wins over the first seen.
pub fn best_exact<S: Borrow<Service>>(
    services: impl IntoIterator<Item = S>,
    client_ns: Option<&str>,
    preferred_ns: Option<&str>,
) -> Option<S> {
    let visible = services
        .into_iter()
        .filter(|s| client_ns.is_none_or(|ns| s.borrow().visible_to(ns)));
    let mut first = None;
    let mut canonical = None;
    let mut preferred = None;
    for s in visible {
        let svc = s.borrow();
        if client_ns == Some(svc.namespace.as_str()) {
            return Some(s);
        }
        if svc.canonical && canonical.is_none() {
            canonical = Some(s);
        } else if preferred_ns == Some(svc.namespace.as_str()) && preferred.is_none() {
            preferred = Some(s);
        } else if first.is_none() {
            first = Some(s);
        }
    }
    canonical.or(preferred).or(first)
}

/// Of the services whose ranges contain an address (each with the prefix length of its
/// range), the one a client in `client_ns` reaches.
pub fn best_range<S: Borrow<Service>>(
    services: impl IntoIterator<Item = (u8, S)>,
    client_ns: Option<&str>,
) -> Option<S> {
    let rank = |len: u8, s: &Service| (client_ns == Some(s.namespace.as_str()), len, s.canonical);
    let mut best: Option<(u8, S)> = None;
    for (len, s) in services {
        let svc = s.borrow();
        if client_ns.is_some_and(|ns| !svc.visible_to(ns)) {
            continue;
        }
        // Strictly better only: the first seen wins ties.
        if best
            .as_ref()
            .is_none_or(|(bl, b)| rank(len, svc) > rank(*bl, b.borrow()))
        {
            best = Some((len, s));
        }
    }
    best.map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::service::Visibility;

    fn svc(ns: &str, host: &str, canonical: bool, visibility: Visibility) -> Service {
        Service {
            name: host.into(),
            namespace: ns.into(),
            hostname: host.into(),
            canonical,
            visibility,
            ..Default::default()
        }
    }

    #[test]
    fn the_clients_namespace_then_canonical_then_the_first_seen() {
        use Visibility::*;
        let a = svc("a", "x.com", false, Public);
        let b = svc("b", "x.com", true, Public);
        let c = svc("c", "x.com", false, Namespace);
        let all = [&a, &b, &c];
        let cases: &[(Option<&str>, Option<&str>)] = &[
            (Some("a"), Some("a")),
            (Some("c"), Some("c")),
            // c is scoped to its namespace: nobody else sees it; b is canonical.
            (Some("d"), Some("b")),
            (None, Some("b")),
        ];
        for (client, want) in cases {
            let got = best_exact(all.iter().copied(), *client, None).map(|s| s.namespace.as_str());
            assert_eq!(got, *want, "client {client:?}");
        }
        // Without a canonical one, the first seen.
        assert_eq!(
            best_exact([&a, &c], Some("d"), None).map(|s| &s.namespace),
            Some(&"a".to_string())
        );
        // Only a namespace-scoped service, from elsewhere: none.
        assert!(best_exact([&c], Some("d"), None).is_none());
        // A preferred namespace beats the first seen, not a canonical service.
        let e = svc("e", "x.com", false, Public);
        let got = best_exact([&a, &e], Some("d"), Some("e")).map(|s| s.namespace.as_str());
        assert_eq!(got, Some("e"));
        let got = best_exact([&a, &b, &e], Some("d"), Some("e")).map(|s| s.namespace.as_str());
        assert_eq!(got, Some("b"));
    }

    #[test]
    fn ranges_rank_namespace_then_prefix_then_canonical() {
        use Visibility::*;
        let wide_here = svc("here", "wide", false, Public);
        let narrow_there = svc("there", "narrow", false, Public);
        let narrow_canonical = svc("other", "canon", true, Public);
        let scoped = svc("secret", "scoped", false, Namespace);
        let all = || {
            [
                (16, &wide_here),
                (24, &narrow_there),
                (24, &narrow_canonical),
                (32, &scoped),
            ]
        };
        let host = |c: Option<&str>| best_range(all(), c).map(|s| s.hostname.clone());
        assert_eq!(host(Some("here")).as_deref(), Some("wide"));
        assert_eq!(host(Some("elsewhere")).as_deref(), Some("canon"));
        assert_eq!(host(Some("secret")).as_deref(), Some("scoped"));
        assert_eq!(host(None).as_deref(), Some("scoped"));
        // Equal in every way: the first seen.
        let twin = svc("there", "twin", false, Public);
        let got = best_range([(24, &narrow_there), (24, &twin)], None);
        assert_eq!(got.map(|s| s.hostname.as_str()), Some("narrow"));
    }

    #[test]
    fn the_index_follows_inserts_and_removes() {
        let mut idx = VipIndex::default();
        let mut s = svc("a", "x.com", false, Visibility::Public);
        s.vips = vec!["/10.96.0.1".parse().unwrap()];
        s.cidr_vips = vec!["/10.97.0.0/24".parse().unwrap()];
        idx.insert(&s);
        let vip: NetworkAddress = "/10.96.0.1".parse().unwrap();
        let inside: NetworkAddress = "/10.97.0.200".parse().unwrap();
        let other_net: NetworkAddress = "net1/10.97.0.200".parse().unwrap();
        assert_eq!(idx.exact(&vip), [s.key()]);
        assert_eq!(idx.ranges(&inside).count(), 1);
        assert_eq!(idx.ranges(&other_net).count(), 0);
        idx.remove(&s);
        assert!(idx.is_empty());
    }
}
