//! Istio's metric labels and the connection record, from what the proxy knows of each end.
//! Each workload's side is built once per workload version (`metrics::PeerLabels`) and
//! shared: a connection's labels are reference counts, not fresh strings.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::connections::{ConnectionInfo, Direction, Hbone};
use crate::identity::Identity;
use crate::metrics::{label, Label, PeerLabels, TcpLabels, KNOWN};
use crate::state::{Service, Workload};

/// One end of a connection, as far as it is known.
#[derive(Default)]
pub struct End<'a> {
    pub addr: Option<SocketAddr>,
    pub workload: Option<&'a Workload>,
    pub identity: Option<&'a Identity>,
}

pub struct Record<'a> {
    pub direction: Direction,
    pub src: End<'a>,
    pub dst: End<'a>,
    pub service: Option<&'a Service>,
    /// Original destination and the endpoint it is sent to.
    pub dst_addr: SocketAddr,
    pub target: SocketAddr,
    /// Set for HBONE (mutual TLS): the tunnel's address and the CONNECT's.
    pub hbone: Option<Hbone>,
}

impl<'a> Record<'a> {
    /// The record with `service` as the one the connection came through.
    pub fn through(mut self, service: Option<&'a Service>) -> Self {
        self.service = service;
        self
    }
}

impl Record<'_> {
    /// The labels of one end: the workload's (built once per workload), and the principal
    /// the connection was made with, which for a mesh end is the workload's own.
    fn end(end: &End<'_>) -> (Option<Arc<PeerLabels>>, Option<Label>) {
        let peer = end.workload.map(PeerLabels::cached);
        let principal = end.identity.map(|id| match &peer {
            Some(p) if p.identity == *id => p.principal.clone(),
            _ => label(id.to_string()),
        });
        (peer, principal)
    }

    pub fn info(&self) -> ConnectionInfo {
        let (src, src_principal) = Record::end(&self.src);
        let (dst, dst_principal) = Record::end(&self.dst);
        ConnectionInfo {
            direction: self.direction,
            src: self
                .src
                .addr
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            dst: self.dst_addr,
            target: self.target,
            src_workload: src.map(|p| p.display.clone()),
            src_identity: src_principal,
            dst_workload: dst.map(|p| p.display.clone()),
            dst_identity: dst_principal,
            protocol: if self.hbone.is_some() { "HBONE" } else { "TCP" },
            hbone: self.hbone,
        }
    }

    pub fn labels(&self) -> TcpLabels {
        let k = &*KNOWN;
        let (s, s_principal) = Record::end(&self.src);
        let (d, d_principal) = Record::end(&self.dst);
        let or_unknown = |v: Option<&Label>| v.cloned().unwrap_or_else(|| k.unknown.clone());
        let s = s.as_deref();
        let d = d.as_deref();
        TcpLabels {
            reporter: match self.direction {
                Direction::Outbound => k.source.clone(),
                Direction::Inbound => k.destination.clone(),
            },
            source_workload: or_unknown(s.map(|p| &p.workload)),
            source_canonical_service: or_unknown(s.map(|p| &p.canonical_service)),
            source_canonical_revision: or_unknown(s.map(|p| &p.canonical_revision)),
            source_workload_namespace: or_unknown(s.map(|p| &p.namespace)),
            source_principal: or_unknown(s_principal.as_ref()),
            source_app: or_unknown(s.map(|p| &p.canonical_service)),
            source_version: or_unknown(s.map(|p| &p.canonical_revision)),
            source_cluster: or_unknown(s.map(|p| &p.cluster)),
            destination_service: self
                .service
                .map_or_else(|| k.unknown.clone(), |s| label(s.hostname.as_str())),
            destination_service_namespace: self
                .service
                .map_or_else(|| k.unknown.clone(), |s| label(s.namespace.as_str())),
            destination_service_name: self
                .service
                .map_or_else(|| k.unknown.clone(), |s| label(s.name.as_str())),
            destination_workload: or_unknown(d.map(|p| &p.workload)),
            destination_canonical_service: or_unknown(d.map(|p| &p.canonical_service)),
            destination_canonical_revision: or_unknown(d.map(|p| &p.canonical_revision)),
            destination_workload_namespace: or_unknown(d.map(|p| &p.namespace)),
            destination_principal: or_unknown(d_principal.as_ref()),
            destination_app: or_unknown(d.map(|p| &p.canonical_service)),
            destination_version: or_unknown(d.map(|p| &p.canonical_revision)),
            destination_cluster: or_unknown(d.map(|p| &p.cluster)),
            request_protocol: k.tcp.clone(),
            response_flags: k.no_flags.clone(),
            connection_security_policy: if self.hbone.is_some() {
                k.mutual_tls.clone()
            } else {
                k.unknown.clone()
            },
            locality: crate::metrics::locality::Locality::of(s, d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Workload;

    fn record<'a>(src: &'a Workload, id: &'a Identity) -> Record<'a> {
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        Record {
            direction: Direction::Outbound,
            src: End {
                addr: Some(addr),
                workload: Some(src),
                identity: Some(id),
            },
            dst: End::default(),
            service: None,
            dst_addr: addr,
            target: addr,
            hbone: Some(Hbone {
                tunnel: addr,
                authority: addr,
            }),
        }
    }

    #[test]
    fn a_workloads_labels_are_built_once_and_shared() {
        let w = Workload {
            name: "sleep".into(),
            namespace: "default".into(),
            service_account: "sleep".into(),
            ..Default::default()
        };
        let id = w.identity();
        let (a, b) = (record(&w, &id).labels(), record(&w, &id).labels());
        assert!(Arc::ptr_eq(&a.source_workload, &b.source_workload));
        assert!(Arc::ptr_eq(&a.source_principal, &b.source_principal));
        assert_eq!(
            *a.source_principal,
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(*a.destination_workload, "unknown");
        assert_eq!(*a.source_canonical_revision, "latest");
        // Another identity than the workload's own (a client certificate): its own label.
        let other = Identity::new("cluster.local", "default", "other");
        assert_eq!(
            *record(&w, &other).labels().source_principal,
            "spiffe://cluster.local/ns/default/sa/other"
        );
        // A new version of the workload starts over.
        let renamed = Workload {
            workload_name: "sleep-v2".into(),
            ..w.clone()
        };
        assert_eq!(*record(&renamed, &id).labels().source_workload, "sleep-v2");
        // The cache is no part of the workload's value: a filled one equals an empty copy.
        assert_eq!(w, w.clone());
    }

    /// Upstream's locality labels: all four once an end is known, `unknown` where a
    /// side has none; none at all when nothing was identified.
    #[test]
    fn locality_labels_follow_upstream() {
        let mut w = Workload {
            name: "sleep".into(),
            namespace: "default".into(),
            ..Default::default()
        };
        w.locality.region = "eu-west1".into();
        w.locality.zone = "eu-west1-b".into();
        let id = w.identity();
        let m = crate::metrics::Metrics::new();
        m.tcp_opened.get_or_create(&record(&w, &id).labels()).inc();
        m.tcp_opened
            .get_or_create(&TcpLabels::unknown(Direction::Inbound))
            .inc();
        let text = m.encode();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let known = lines.iter().find(|l| l.contains("sleep")).unwrap();
        assert!(
            known.ends_with(
                "source_region=\"eu-west1\",source_zone=\"eu-west1-b\",\
                 destination_region=\"unknown\",destination_zone=\"unknown\"} 1"
            ),
            "{known}"
        );
        let unknown = lines.iter().find(|l| !l.contains("sleep")).unwrap();
        assert!(!unknown.contains("region"), "{unknown}");
    }
}
