//! Istio's metric labels and the connection record, from what the proxy knows of each end.

use std::net::SocketAddr;

use crate::connections::{ConnectionInfo, Direction};
use crate::identity::Identity;
use crate::metrics::TcpLabels;
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
    pub mtls: bool,
}

impl Record<'_> {
    pub fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            direction: self.direction,
            src: self
                .src
                .addr
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            dst: self.dst_addr,
            target: self.target,
            src_workload: self
                .src
                .workload
                .map(|w| format!("{}/{}", w.namespace, w.name)),
            src_identity: self.src.identity.map(|i| i.to_string()),
            dst_workload: self
                .dst
                .workload
                .map(|w| format!("{}/{}", w.namespace, w.name)),
            dst_identity: self.dst.identity.map(|i| i.to_string()),
            protocol: if self.mtls { "HBONE" } else { "TCP" },
        }
    }

    pub fn labels(&self) -> TcpLabels {
        let unknown = || "unknown".to_string();
        let wl_name = |w: Option<&Workload>| {
            w.map(|w| {
                if w.workload_name.is_empty() {
                    w.name.clone()
                } else {
                    w.workload_name.clone()
                }
            })
            .unwrap_or_else(unknown)
        };
        let canonical = |w: Option<&Workload>| {
            w.map(|w| {
                if w.canonical_name.is_empty() {
                    wl_name(Some(w))
                } else {
                    w.canonical_name.clone()
                }
            })
            .unwrap_or_else(unknown)
        };
        let revision = |w: Option<&Workload>| {
            w.map(|w| {
                if w.canonical_revision.is_empty() {
                    "latest".into()
                } else {
                    w.canonical_revision.clone()
                }
            })
            .unwrap_or_else(unknown)
        };
        let ns = |w: Option<&Workload>| w.map(|w| w.namespace.clone()).unwrap_or_else(unknown);
        let cluster = |w: Option<&Workload>| {
            w.map(|w| {
                if w.cluster_id.is_empty() {
                    "Kubernetes".into()
                } else {
                    w.cluster_id.clone()
                }
            })
            .unwrap_or_else(unknown)
        };
        let principal = |i: Option<&Identity>| i.map(|i| i.to_string()).unwrap_or_else(unknown);
        let (s, d) = (self.src.workload, self.dst.workload);
        TcpLabels {
            reporter: match self.direction {
                Direction::Outbound => "source",
                Direction::Inbound => "destination",
            }
            .into(),
            source_workload: wl_name(s),
            source_canonical_service: canonical(s),
            source_canonical_revision: revision(s),
            source_workload_namespace: ns(s),
            source_principal: principal(self.src.identity),
            source_app: canonical(s),
            source_version: revision(s),
            source_cluster: cluster(s),
            destination_service: self
                .service
                .map(|s| s.hostname.clone())
                .unwrap_or_else(unknown),
            destination_service_namespace: self
                .service
                .map(|s| s.namespace.clone())
                .unwrap_or_else(unknown),
            destination_service_name: self.service.map(|s| s.name.clone()).unwrap_or_else(unknown),
            destination_workload: wl_name(d),
            destination_canonical_service: canonical(d),
            destination_canonical_revision: revision(d),
            destination_workload_namespace: ns(d),
            destination_principal: principal(self.dst.identity),
            destination_app: canonical(d),
            destination_version: revision(d),
            destination_cluster: cluster(d),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: if self.mtls { "mutual_tls" } else { "unknown" }.into(),
        }
    }
}
