//! `workloadState`: what Istio's ztunnel in node (shared) mode tells about each pod it
//! proxies — per workload UID, whether its proxy is `Up` or `Pending`, who it is, and for
//! one that is up its live connections. Here a pod is up once its traffic is captured
//! (enrolled) and pending while it is held.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::connections::{ConnectionView, Direction};
use crate::enroll::EnrollmentStatus;
use crate::state::ProxyState;

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodProxy {
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    connections: Option<PodConnections>,
    info: PodInfo,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct PodInfo {
    name: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Serialize, PartialEq, Eq, Default)]
struct PodConnections {
    inbound: Vec<ConnectionDump>,
    outbound: Vec<ConnectionDump>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct ConnectionDump {
    src: SocketAddr,
    /// Outbound: the address the pod dialled. Inbound: upstream names the service the
    /// client addressed, which the receiving side does not know here.
    original_dst: Option<String>,
    actual_dst: SocketAddr,
    protocol: &'static str,
}

pub fn workload_state(
    status: &EnrollmentStatus,
    state: &ProxyState,
    connections: &[ConnectionView],
) -> BTreeMap<String, PodProxy> {
    let info = |uid: &str| {
        let w = state.workload_by_uid(uid);
        PodInfo {
            name: w.as_ref().map(|w| w.name.clone()).unwrap_or_default(),
            namespace: w.as_ref().map(|w| w.namespace.clone()).unwrap_or_default(),
            service_account: w
                .as_ref()
                .map(|w| w.service_account.clone())
                .unwrap_or_default(),
        }
    };
    let mut out = BTreeMap::new();
    for uid in status.pending.keys() {
        out.insert(
            uid.clone(),
            PodProxy {
                state: "Pending",
                connections: None,
                info: info(uid),
            },
        );
    }
    for (uid, (ips, _)) in &status.enrolled {
        out.insert(
            uid.clone(),
            PodProxy {
                state: "Up",
                connections: Some(of_pod(ips, connections)),
                info: info(uid),
            },
        );
    }
    out
}

/// The pod's connections: outbound from one of its addresses, inbound to one.
fn of_pod(ips: &[IpAddr], connections: &[ConnectionView]) -> PodConnections {
    let mut out = PodConnections::default();
    for c in connections {
        let i = &c.info;
        let dump = |original_dst| ConnectionDump {
            src: i.src,
            original_dst,
            actual_dst: i.target,
            protocol: i.protocol,
        };
        match i.direction {
            Direction::Outbound if ips.contains(&i.src.ip()) => {
                out.outbound.push(dump(Some(i.dst.to_string())))
            }
            Direction::Inbound if ips.contains(&i.target.ip()) || ips.contains(&i.dst.ip()) => {
                out.inbound.push(dump(None))
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connections::ConnectionInfo;
    use crate::state::Workload;
    use serde_json::json;

    fn conn(direction: Direction, src: &str, dst: &str, target: &str) -> ConnectionView {
        ConnectionView {
            id: 1,
            info: ConnectionInfo {
                direction,
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                target: target.parse().unwrap(),
                src_workload: None,
                src_identity: None,
                dst_workload: None,
                dst_identity: None,
                protocol: "HBONE",
                hbone: None,
            },
            bytes_sent: 0,
            bytes_received: 0,
            age_ms: 0,
        }
    }

    #[test]
    fn up_pods_with_their_connections_pending_ones_without() {
        let mut state = ProxyState::default();
        state.upsert_workload(Workload {
            uid: "u1".into(),
            name: "client".into(),
            namespace: "default".into(),
            service_account: "client".into(),
            workload_ips: vec!["10.1.0.2".parse().unwrap()],
            ..Default::default()
        });
        let mut status = EnrollmentStatus::default();
        status.enrolled.insert(
            "u1".into(),
            (vec!["10.1.0.2".parse().unwrap()], "p2".into()),
        );
        status.pending.insert("u2".into(), "no interface".into());
        let conns = [
            conn(
                Direction::Outbound,
                "10.1.0.2:4000",
                "10.96.0.10:80",
                "10.2.0.2:8080",
            ),
            conn(
                Direction::Inbound,
                "10.3.0.2:5000",
                "10.1.0.2:8080",
                "10.1.0.2:8080",
            ),
            conn(
                Direction::Outbound,
                "10.9.0.9:4000",
                "10.96.0.10:80",
                "10.2.0.2:8080",
            ),
        ];
        let v = serde_json::to_value(workload_state(&status, &state, &conns)).unwrap();
        assert_eq!(
            v,
            json!({
                "u1": {
                    "state": "Up",
                    "connections": {
                        "inbound": [{"src": "10.3.0.2:5000", "originalDst": null,
                                     "actualDst": "10.1.0.2:8080", "protocol": "HBONE"}],
                        "outbound": [{"src": "10.1.0.2:4000", "originalDst": "10.96.0.10:80",
                                      "actualDst": "10.2.0.2:8080", "protocol": "HBONE"}],
                    },
                    "info": {"name": "client", "namespace": "default", "serviceAccount": "client"},
                },
                "u2": {
                    "state": "Pending",
                    "info": {"name": "", "namespace": "", "serviceAccount": ""},
                },
            })
        );
    }
}
