//! The DNS proxy's metrics under Istio's names and labels (`istio_dns_requests_total`,
//! `istio_dns_upstream_requests_total`, `istio_dns_upstream_failures_total`,
//! `istio_dns_upstream_request_duration_seconds`), and `istio_on_demand_dns_total` (the
//! lookups of endpoints known by hostname only), registered with the node's metrics.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

use crate::state::Workload;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    request_query_type: String,
    request_protocol: String,
    source_canonical_service: String,
    source_canonical_revision: String,
}

impl DnsLabels {
    pub fn new(qtype: &str, tcp: bool, source: Option<&Workload>) -> Self {
        let known = |s: &str| {
            if s.is_empty() {
                "unknown".to_string()
            } else {
                s.to_string()
            }
        };
        DnsLabels {
            request_query_type: known(qtype),
            request_protocol: if tcp { "tcp" } else { "udp" }.into(),
            source_canonical_service: known(source.map_or("", |w| &w.canonical_name)),
            source_canonical_revision: known(source.map_or("", |w| &w.canonical_revision)),
        }
    }
}

/// `istio_on_demand_dns_total`'s labels, as upstream's: who connected, and the hostname
/// looked up.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OnDemandLabels {
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    hostname: String,
}

impl OnDemandLabels {
    pub fn new(source: Option<&Workload>, hostname: &str) -> Self {
        let known = |s: &str| {
            if s.is_empty() {
                "unknown".to_string()
            } else {
                s.to_string()
            }
        };
        let field = |f: fn(&Workload) -> &str| known(source.map_or("", f));
        OnDemandLabels {
            source_workload: field(|w| &w.workload_name),
            source_canonical_service: field(|w| &w.canonical_name),
            source_canonical_revision: field(|w| &w.canonical_revision),
            source_workload_namespace: field(|w| &w.namespace),
            source_principal: source.map_or_else(|| "unknown".into(), |w| w.identity().to_string()),
            source_app: field(|w| &w.canonical_name),
            source_version: field(|w| &w.canonical_revision),
            source_cluster: field(|w| &w.cluster_id),
            hostname: known(hostname),
        }
    }
}

pub struct DnsMetrics {
    pub requests: Family<DnsLabels, Counter>,
    pub upstream_requests: Family<DnsLabels, Counter>,
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: Family<DnsLabels, Histogram>,
    pub on_demand: Family<OnDemandLabels, Counter>,
}

pub static DNS: LazyLock<DnsMetrics> = LazyLock::new(|| DnsMetrics {
    requests: Family::default(),
    upstream_requests: Family::default(),
    upstream_failures: Family::default(),
    upstream_duration: Family::new_with_constructor(|| {
        Histogram::new([0.0005, 0.001, 0.01, 0.1, 1.0, 5.0])
    }),
    on_demand: Family::default(),
});

/// Registers the families in `istio` (the registry with Istio's prefix).
pub fn register(istio: &mut prometheus_client::registry::Registry) {
    istio.register(
        "dns_requests",
        "DNS questions from enrolled pods",
        DNS.requests.clone(),
    );
    istio.register(
        "dns_upstream_requests",
        "DNS questions forwarded to the node's resolvers",
        DNS.upstream_requests.clone(),
    );
    istio.register(
        "dns_upstream_failures",
        "DNS questions the node's resolvers did not answer",
        DNS.upstream_failures.clone(),
    );
    istio.register_with_unit(
        "dns_upstream_request_duration",
        "Time the node's resolvers took to answer",
        prometheus_client::registry::Unit::Seconds,
        DNS.upstream_duration.clone(),
    );
    istio.register(
        "on_demand_dns",
        "Connections whose endpoint, known by hostname only, was looked up",
        DNS.on_demand.clone(),
    );
}
