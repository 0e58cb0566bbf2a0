//! Fields of istiod's resources that this proxy receives but does not implement. They
//! are not dropped silently: each one, the first time a resource carries it, is logged by
//! name with the resource that carried it, and counted in
//! `ztunnel_xds_ignored_fields_total{field}` every time.
//!
//! Not listed, because there is nothing for a node proxy to do with them (Istio's ztunnel
//! does not read them either): `Service.ingress_use_waypoint` (it tells ingress gateways
//! to send through the service's waypoint) and `Port.app_protocol` (a hint for L7
//! proxies).

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::proto::istio::security as spb;
use crate::proto::istio::workload as wpb;

/// Counted here, registered with the node's metrics (`metrics::Metrics::new`).
pub static IGNORED: std::sync::LazyLock<Family<FieldLabels, Counter>> =
    std::sync::LazyLock::new(Family::default);

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct FieldLabels {
    pub field: String,
}

static WARNED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

/// The fields of `w` that are set and not implemented.
pub fn workload_fields(w: &wpb::Workload) -> Vec<&'static str> {
    [
        ("Workload.network_gateway", w.network_gateway.is_some()),
        (
            "Workload.application_tunnel",
            w.application_tunnel.is_some(),
        ),
        ("Workload.native_tunnel", w.native_tunnel),
        ("Workload.extensions", !w.extensions.is_empty()),
    ]
    .into_iter()
    .filter_map(|(f, set)| set.then_some(f))
    .collect()
}

/// The fields of `s` that are set and not implemented.
pub fn service_fields(s: &wpb::Service) -> Vec<&'static str> {
    [("Service.extensions", !s.extensions.is_empty())]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect()
}

/// The fields of `a` that are set and not implemented (extensions carry nothing istiod
/// defines for ztunnel today; a rule's meaning never depends on them).
pub fn policy_fields(a: &spb::Authorization) -> Vec<&'static str> {
    let in_matches = a
        .rules
        .iter()
        .flat_map(|r| &r.clauses)
        .flat_map(|c| &c.matches)
        .any(|m| !m.extensions.is_empty());
    [
        ("Authorization.extensions", !a.extensions.is_empty()),
        ("Match.extensions", in_matches),
    ]
    .into_iter()
    .filter_map(|(f, set)| set.then_some(f))
    .collect()
}

/// Counts `fields` of the resource `what` and warns about each the first time.
pub fn report(what: &str, fields: &[&'static str]) {
    if fields.is_empty() {
        return;
    }
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    let warned = warned.get_or_insert_with(HashSet::new);
    for f in fields {
        IGNORED
            .get_or_create(&FieldLabels {
                field: f.to_string(),
            })
            .inc();
        if warned.insert(f) {
            tracing::warn!(
                field = f,
                resource = what,
                "istiod sent a field this proxy does not implement: ignored (further ones are counted in ztunnel_xds_ignored_fields_total)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_fields_are_named_and_counted() {
        let s = wpb::Service {
            extensions: vec![Default::default()],
            ingress_use_waypoint: true,
            ..Default::default()
        };
        let fields = service_fields(&s);
        assert_eq!(fields, ["Service.extensions"]);
        let count = |f: &str| {
            IGNORED
                .get_or_create(&FieldLabels { field: f.into() })
                .get()
        };
        let before = count("Service.extensions");
        report("default/echo", &fields);
        report("default/echo", &fields);
        assert_eq!(count("Service.extensions"), before + 2);
        assert!(service_fields(&wpb::Service::default()).is_empty());
        assert!(workload_fields(&wpb::Workload::default()).is_empty());
        let w = wpb::Workload {
            network_gateway: Some(wpb::GatewayAddress::default()),
            ..Default::default()
        };
        assert_eq!(workload_fields(&w), ["Workload.network_gateway"]);
        let p = spb::Authorization {
            rules: vec![spb::Rule {
                clauses: vec![spb::Clause {
                    matches: vec![spb::Match {
                        extensions: vec![Default::default()],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        assert_eq!(policy_fields(&p), ["Match.extensions"]);
        assert!(policy_fields(&spb::Authorization::default()).is_empty());
    }
}
