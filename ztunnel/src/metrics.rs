//! Prometheus metrics: Istio's standard TCP metrics with Istio's label names, plus
//! ztunnel's own (pool, CA, capture).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub mod locality;
pub mod process;
pub mod runtime;
pub mod workload_manager;
pub mod xds;

/// A label value shared by every connection that carries it: cloning it is a reference
/// count, not an allocation.
pub type Label = std::sync::Arc<String>;

pub fn label(s: impl Into<String>) -> Label {
    std::sync::Arc::new(s.into())
}

/// The label values every connection uses, allocated once.
pub struct Known {
    pub unknown: Label,
    pub tcp: Label,
    pub source: Label,
    pub destination: Label,
    pub mutual_tls: Label,
    pub no_flags: Label,
    pub deny: Label,
    pub connect: Label,
}

pub static KNOWN: std::sync::LazyLock<Known> = std::sync::LazyLock::new(|| Known {
    unknown: label("unknown"),
    tcp: label("tcp"),
    source: label("source"),
    destination: label("destination"),
    mutual_tls: label("mutual_tls"),
    no_flags: label("-"),
    deny: label("DENY"),
    connect: label("CONNECT"),
});

impl Known {
    /// Istio's `response_flags` value.
    pub fn flags(&self, flags: &str) -> Label {
        match flags {
            "DENY" => self.deny.clone(),
            "CONNECT" => self.connect.clone(),
            "-" => self.no_flags.clone(),
            other => label(other),
        }
    }
}

/// A workload's side of Istio's labels (and of the access log), built once per workload
/// version (`Workload::labels`) instead of once per connection.
#[derive(Debug)]
pub struct PeerLabels {
    pub workload: Label,
    pub canonical_service: Label,
    pub canonical_revision: Label,
    pub namespace: Label,
    pub cluster: Label,
    /// Its locality's region and zone (`unknown` when unset), for `istio_tcp_*`.
    pub region: Label,
    pub zone: Label,
    /// Its own identity, and that as a `source_principal`/`destination_principal`.
    pub identity: crate::identity::Identity,
    pub principal: Label,
    /// `namespace/name`, as the access log names it.
    pub display: Label,
}

impl PeerLabels {
    pub fn of(w: &crate::state::Workload) -> Self {
        let workload = if w.workload_name.is_empty() {
            &w.name
        } else {
            &w.workload_name
        };
        let canonical = if w.canonical_name.is_empty() {
            workload
        } else {
            &w.canonical_name
        };
        let revision = if w.canonical_revision.is_empty() {
            "latest"
        } else {
            &w.canonical_revision
        };
        let cluster = if w.cluster_id.is_empty() {
            "Kubernetes"
        } else {
            &w.cluster_id
        };
        let identity = w.identity();
        let or_unknown = |s: &str| match s {
            "" => KNOWN.unknown.clone(),
            s => label(s),
        };
        PeerLabels {
            region: or_unknown(&w.locality.region),
            zone: or_unknown(&w.locality.zone),
            workload: label(workload.as_str()),
            canonical_service: label(canonical.as_str()),
            canonical_revision: label(revision),
            namespace: label(w.namespace.as_str()),
            cluster: label(cluster),
            principal: label(identity.to_string()),
            identity,
            display: label(format!("{}/{}", w.namespace, w.name)),
        }
    }

    /// The labels of `w`, built on first use.
    pub fn cached(w: &crate::state::Workload) -> std::sync::Arc<PeerLabels> {
        w.labels
            .get_or_init(|| std::sync::Arc::new(PeerLabels::of(w)))
            .clone()
    }
}

/// Istio's labels for `istio_tcp_*` (the names dashboards and Kiali query by).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Label,
    pub source_workload: Label,
    pub source_canonical_service: Label,
    pub source_canonical_revision: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub source_cluster: Label,
    pub destination_service: Label,
    pub destination_service_namespace: Label,
    pub destination_service_name: Label,
    pub destination_workload: Label,
    pub destination_canonical_service: Label,
    pub destination_canonical_revision: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_cluster: Label,
    pub request_protocol: Label,
    pub response_flags: Label,
    pub connection_security_policy: Label,
    /// `source_region`, `source_zone`, `destination_region`, `destination_zone`, when
    /// either end is known. Must stay the last field.
    #[prometheus(flatten)]
    pub locality: locality::Locality,
}

impl TcpLabels {
    /// An attempt refused before either end was identified: only the reporter is known.
    pub fn unknown(direction: crate::connections::Direction) -> Self {
        let k = &*KNOWN;
        let u = || k.unknown.clone();
        TcpLabels {
            reporter: match direction {
                crate::connections::Direction::Outbound => k.source.clone(),
                crate::connections::Direction::Inbound => k.destination.clone(),
            },
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_service: u(),
            destination_service_namespace: u(),
            destination_service_name: u(),
            destination_workload: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_cluster: u(),
            request_protocol: k.tcp.clone(),
            response_flags: k.no_flags.clone(),
            connection_security_policy: u(),
            locality: locality::Locality(None),
        }
    }
}

/// `ztunnel_connections_total`: every attempt, by how it ended and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub direction: &'static str,
    /// `ok`, `denied`, `failed`, `closed`, `aborted`.
    pub outcome: &'static str,
    /// `-`, or the reason's name (`policy_denied`, `upstream_connect`, …).
    pub reason: &'static str,
}

/// `istio_tcp_sockets_open`'s only label, as upstream: `source` for the outbound
/// listener, `destination` for the inbound ones.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SocketLabels {
    pub reporter: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub pod_ip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub component: String,
    pub tag: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    /// Connections that failed to establish or were refused (Istio's
    /// `istio_tcp_connections_failed`: policy denials, dial, TLS and tunnel failures).
    pub tcp_failed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    /// Accepted sockets whose handler still runs, by reporter (Istio's
    /// `istio_tcp_sockets_open`).
    pub sockets_open: Family<SocketLabels, Gauge>,
    /// `istio_xds_*`, counted by the xDS client.
    pub xds: xds::XdsMetrics,
    /// `workload_manager_*`: enrollment in the terms of upstream's in-pod proxies.
    pub workload_manager: workload_manager::WorkloadManagerMetrics,
    /// `tokio_*`: the data-path threads' runtimes.
    pub runtimes: runtime::Runtimes,
    /// Every connection attempt by outcome and reason.
    pub connections: Family<AttemptLabels, Counter>,
    /// HBONE (HTTP/2 over mTLS) connections the data-path threads' pools established to
    /// other nodes...
    pub pool_connections_opened: Counter,
    /// ...and those the pools hold now (one closed by the peer until the pool notices).
    pub pool_connections_active: Gauge,
    /// Certificate requests to the CA by result (ok / error), counted by the secret
    /// manager whichever CA it uses.
    pub ca_requests: Family<ResultLabels, Counter>,
    /// Authorization decisions (allow / deny).
    pub authz_decisions: Family<ResultLabels, Counter>,
    /// The eBPF counters, copied from the per-CPU maps at scrape time.
    pub capture_outbound_flows: Family<PodLabels, Gauge>,
    pub capture_inbound_flows: Family<PodLabels, Gauge>,
    pub capture_packets: Family<PodLabels, Gauge>,
    pub capture_bytes: Family<PodLabels, Gauge>,
    pub capture_dropped: Family<PodLabels, Gauge>,
    pub capture_spoofed: Family<PodLabels, Gauge>,
    pub capture_socket_gone: Family<PodLabels, Gauge>,
    pub capture_dns_captured: Family<PodLabels, Gauge>,
    pub capture_dns_passed: Family<PodLabels, Gauge>,
    /// Workloads this node should capture but cannot (held: their traffic is dropped).
    pub workloads_not_enrolled: Gauge,
    /// Pod addresses more than one interface claims now, and the claims refused so far.
    pub address_conflicts: Gauge,
    pub address_claims_refused: Counter,
    /// Node-wide: packets to or from enrolled pods whose TCP header the program could not
    /// read (fragments, IPv6 extension-header chains), dropped.
    pub capture_unparsed: Gauge,
    /// The last hop into enrolled pods: SYNs it judged, by verdict, copied from its
    /// per-CPU counters at scrape time.
    pub last_hop_syns: Family<ResultLabels, Gauge>,
    /// Sockmap acceleration, copied from its per-CPU counters at scrape time.
    pub sockmap_enabled: Gauge,
    pub sockmap_accelerated: Gauge,
    pub sockmap_fallback: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_failed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            sockets_open: Family::default(),
            xds: Default::default(),
            workload_manager: Default::default(),
            runtimes: Default::default(),
            connections: Family::default(),
            pool_connections_opened: Counter::default(),
            pool_connections_active: Gauge::default(),
            ca_requests: Family::default(),
            authz_decisions: Family::default(),
            capture_outbound_flows: Family::default(),
            capture_inbound_flows: Family::default(),
            capture_packets: Family::default(),
            capture_bytes: Family::default(),
            capture_dropped: Family::default(),
            capture_spoofed: Family::default(),
            capture_socket_gone: Family::default(),
            capture_dns_captured: Family::default(),
            capture_dns_passed: Family::default(),
            workloads_not_enrolled: Gauge::default(),
            address_conflicts: Gauge::default(),
            address_claims_refused: Counter::default(),
            capture_unparsed: Gauge::default(),
            last_hop_syns: Family::default(),
            sockmap_enabled: Gauge::default(),
            sockmap_accelerated: Gauge::default(),
            sockmap_fallback: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register_collector(Box::new(process::ProcessMetrics));
        m.workload_manager
            .register(registry.sub_registry_with_prefix("workload_manager"));
        registry
            .sub_registry_with_prefix("tokio")
            .register_collector(Box::new(m.runtimes.clone()));
        // prometheus-client appends `_total` to counters.
        let istio = registry.sub_registry_with_prefix("istio");
        crate::dns::metrics::register(istio);
        // Istio's build gauge: the Istio release this proxy stands in for.
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel".into(),
                tag: crate::config::istio_names::istio_version(),
            })
            .set(1);
        istio.register("build", "Istio component build info", build);
        istio.register(
            "tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "TCP connections that failed to establish or were refused",
            m.tcp_failed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "Bytes sent to the destination",
            m.tcp_sent.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "Bytes received from the destination",
            m.tcp_received.clone(),
        );
        istio.register(
            "tcp_sockets_open",
            "Accepted TCP sockets still being handled",
            m.sockets_open.clone(),
        );
        m.xds.register(istio);
        let zt = registry.sub_registry_with_prefix("ztunnel");
        zt.register(
            "xds_ignored_fields",
            "Fields of istiod's resources this proxy does not implement, by field, each time a resource carried one",
            crate::xds::ignored::IGNORED.clone(),
        );
        zt.register(
            "connections",
            "Connection attempts by how they ended (ok, denied, failed, closed, aborted) and why",
            m.connections.clone(),
        );
        zt.register(
            "pool_connections_opened",
            "HBONE connections opened by the pool",
            m.pool_connections_opened.clone(),
        );
        zt.register(
            "pool_connections_active",
            "HBONE connections in the pool",
            m.pool_connections_active.clone(),
        );
        zt.register(
            "ca_requests",
            "Certificate requests to the CA",
            m.ca_requests.clone(),
        );
        zt.register(
            "authorization_decisions",
            "L4 authorization decisions",
            m.authz_decisions.clone(),
        );
        zt.register(
            "capture_outbound_flows",
            "Outbound connections captured per pod address",
            m.capture_outbound_flows.clone(),
        );
        zt.register(
            "capture_inbound_flows",
            "Inbound connections captured per pod address",
            m.capture_inbound_flows.clone(),
        );
        zt.register(
            "capture_packets",
            "Packets of enrolled pods seen by the capture program",
            m.capture_packets.clone(),
        );
        zt.register(
            "capture_bytes",
            "Bytes of enrolled pods seen by the capture program",
            m.capture_bytes.clone(),
        );
        zt.register(
            "capture_dropped_no_proxy",
            "SYNs dropped because ztunnel was not listening (fail closed), and packets from or to a held pod",
            m.capture_dropped.clone(),
        );
        zt.register(
            "capture_dropped_socket_gone",
            "Other packets of captured flows whose ztunnel socket is gone (ztunnel died, or late packets of a closed flow), dropped",
            m.capture_socket_gone.clone(),
        );
        zt.register(
            "capture_dns_captured",
            "DNS questions over UDP from enrolled pods handed to the DNS proxy",
            m.capture_dns_captured.clone(),
        );
        zt.register(
            "capture_dns_passed",
            "DNS questions over UDP from enrolled pods that found no DNS proxy (ztunnel down) and went to the server asked (DNS fails open)",
            m.capture_dns_passed.clone(),
        );
        zt.register(
            "capture_dropped_spoofed",
            "Packets with an enrolled pod's address from another interface (spoofing), dropped",
            m.capture_spoofed.clone(),
        );
        zt.register(
            "workloads_not_enrolled",
            "Workloads this node should capture but cannot (held: their TCP is dropped); /debug/capture says why",
            m.workloads_not_enrolled.clone(),
        );
        zt.register(
            "address_conflicts",
            "Pod addresses claimed by more than one pod interface now",
            m.address_conflicts.clone(),
        );
        zt.register(
            "address_claims_refused",
            "Claims of a pod's address by another interface, refused (the owner keeps it)",
            m.address_claims_refused.clone(),
        );
        zt.register(
            "capture_dropped_unparsed",
            "Packets to or from enrolled pods that may be TCP but whose TCP header could not be read (IP fragments, IPv6 extension-header chains it cannot walk, cut-short headers), dropped",
            m.capture_unparsed.clone(),
        );
        zt.register(
            "last_hop_syns",
            "New connections into enrolled pods that did not come through ztunnel, judged at the pod's interface after the node's NAT (Service VIP, NodePort, hostPort), by result: allowed and denied by a cached policy verdict, from_node (the node's own, exempt), asked (dropped while ztunnel was asked) and waiting (dropped while an answer was pending)",
            m.last_hop_syns.clone(),
        );
        zt.register(
            "sockmap_enabled",
            "1 if the pod-ztunnel hops are accelerated with sockmap",
            m.sockmap_enabled.clone(),
        );
        zt.register(
            "sockmap_accelerated_connections",
            "Pod-ztunnel hops accelerated with sockmap (pod sockets put in the map), since the maps were created",
            m.sockmap_accelerated.clone(),
        );
        zt.register(
            "sockmap_fallback_sockets",
            "Sockets in the map whose first send found no peer, so that direction stayed on TCP",
            m.sockmap_fallback.clone(),
        );
        zt.register(
            "limit_hits",
            "Work refused because a limit was reached (connections, handshakes, streams), by limit",
            crate::limits::HITS.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The pool's counters (each data-path thread's pool counts into the same ones).
    pub fn pool(&self) -> crate::pool::PoolMetrics {
        crate::pool::PoolMetrics {
            opened: self.pool_connections_opened.clone(),
            active: self.pool_connections_active.clone(),
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn set_last_hop(&self, c: &crate::capture::last_hop::LastHopCounters) {
        for (result, n) in [
            ("allowed", c.allowed),
            ("from_node", c.from_node),
            ("denied", c.denied),
            ("asked", c.asked),
            ("waiting", c.waiting),
        ] {
            self.last_hop_syns
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .set(n as i64);
        }
    }

    pub fn set_sockmap(&self, v: &crate::capture::sockmap::SockmapView) {
        self.sockmap_enabled.set(i64::from(v.enabled));
        self.sockmap_accelerated
            .set(v.counters.accelerated_connections as i64);
        self.sockmap_fallback
            .set(v.counters.fallback_sockets as i64);
    }

    /// Enrollment's gauges, and the refused claims (a running total kept by the
    /// enroller) at scrape time.
    pub fn set_enrollment(&self, status: &crate::enroll::EnrollmentStatus, claims_refused: u64) {
        self.workloads_not_enrolled.set(status.pending.len() as i64);
        self.workload_manager.set(
            status.enrolled.len(),
            status.pending.len(),
            status.started,
            status.stopped,
        );
        self.address_conflicts.set(status.conflicts.len() as i64);
        let seen = self.address_claims_refused.get();
        if claims_refused > seen {
            self.address_claims_refused.inc_by(claims_refused - seen);
        }
    }

    pub fn set_capture(
        &self,
        counters: &std::collections::BTreeMap<std::net::IpAddr, crate::capture::Counters>,
    ) {
        for (ip, c) in counters {
            let l = PodLabels {
                pod_ip: ip.to_string(),
            };
            self.capture_outbound_flows
                .get_or_create(&l)
                .set(c.outbound_flows as i64);
            self.capture_inbound_flows
                .get_or_create(&l)
                .set(c.inbound_flows as i64);
            self.capture_packets.get_or_create(&l).set(c.packets as i64);
            self.capture_bytes.get_or_create(&l).set(c.bytes as i64);
            self.capture_dropped
                .get_or_create(&l)
                .set(c.dropped_no_proxy as i64);
            self.capture_spoofed
                .get_or_create(&l)
                .set(c.dropped_spoofed as i64);
            self.capture_socket_gone
                .get_or_create(&l)
                .set(c.dropped_socket_gone as i64);
            self.capture_dns_captured
                .get_or_create(&l)
                .set(c.dns_captured as i64);
            self.capture_dns_passed
                .get_or_create(&l)
                .set(c.dns_passed as i64);
        }
    }
}

#[cfg(test)]
mod tests;
