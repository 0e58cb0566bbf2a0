//! Every rule of [`tunnelled_source`] as a row: who the peer is, what it claimed, what
//! the destination node makes of it.

use std::sync::Arc;

use super::*;
use crate::state::{
    GatewayAddress, NamespacedHostname, NetworkMode, Protocol, Service, StateStore,
};

/// This node's own address in these rows (loopback is the node's too).
const NODE: &str = "192.168.0.2";
/// Another node's address: where tunnels come from.
const TUNNEL: &str = "192.168.0.3:40000";

fn workload(name: &str, ip: &str) -> Workload {
    Workload {
        uid: format!("c//Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        workload_ips: vec![ip.parse().unwrap()],
        protocol: Protocol::HBONE,
        node: "node-b".into(),
        ..Default::default()
    }
}

/// client (10.1.0.2) and neighbour (10.1.0.3) elsewhere; server (10.2.0.2, backs the
/// service `api` whose waypoint is the service `wp-svc`, instance `wp2`), guarded
/// (10.2.0.5, its own waypoint `wp` at 10.2.0.9); `host` a host-network workload with the
/// client's identity at the node's address.
fn state() -> Arc<ProxyState> {
    let s = StateStore::default();
    let api = NamespacedHostname::new("default", "api.default.svc.cluster.local");
    let wp_svc = NamespacedHostname::new("default", "wp-svc.default.svc.cluster.local");
    let svc = |name: &str, vip: &str, waypoint: Option<&str>| Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        vips: vec![crate::state::NetworkAddress::new("", vip.parse().unwrap())],
        waypoint: waypoint.map(|d| GatewayAddress {
            destination: d.parse().unwrap(),
            hbone_mtls_port: 15008,
        }),
        ..Default::default()
    };
    s.replace_all(
        [
            workload("client", "10.1.0.2"),
            workload("neighbour", "10.1.0.3"),
            Workload {
                services: [(api, Default::default())].into(),
                ..workload("server", "10.2.0.2")
            },
            Workload {
                waypoint: Some(GatewayAddress {
                    destination: "/10.2.0.9".parse().unwrap(),
                    hbone_mtls_port: 15008,
                }),
                ..workload("guarded", "10.2.0.5")
            },
            workload("wp", "10.2.0.9"),
            Workload {
                services: [(wp_svc, Default::default())].into(),
                ..workload("wp2", "10.2.0.10")
            },
            Workload {
                service_account: "client".into(),
                network_mode: NetworkMode::HostNetwork,
                ..workload("host", NODE)
            },
        ],
        [
            svc(
                "api",
                "10.96.0.1",
                Some("default/wp-svc.default.svc.cluster.local"),
            ),
            svc("wp-svc", "10.96.0.2", None),
        ],
        [],
    );
    s.snapshot()
}

fn is_node(ip: IpAddr) -> bool {
    ip.is_loopback() || ip == NODE.parse::<IpAddr>().unwrap()
}

/// Rows: destination | the peer's service account | `forwarded: for=` |
/// `ztunnel-source-port` (`-`: not sent) | the source believed, or the refusal's reason.
#[test]
fn claims_are_believed_only_when_consistent() {
    let state = state();
    let rows = [
        // No claim: the tunnel's real peer, the port left to the node.
        "server | client | - | - | 192.168.0.3:0",
        "server | client | - | 4000 | forwarded_port_without_address",
        // A node proxy tunnelling its own pod's connection.
        "server | client | 10.1.0.2 | 4000 | 10.1.0.2:4000",
        "server | client | 10.1.0.2 | - | 10.1.0.2:0",
        "server | client | ::ffff:10.1.0.2 | - | 10.1.0.2:0",
        // Someone else's address, or nobody's.
        "server | client | 10.1.0.3 | 4000 | forwarded_not_the_peer",
        "server | client | 10.9.9.9 | - | forwarded_not_the_peer",
        // A host-network workload with the peer's identity at the node's address: no help.
        "server | client | 192.168.0.2 | - | forwarded_node_address",
        // Never unspecified, multicast, broadcast, link-local, loopback or the node's own.
        "server | client | 0.0.0.0 | - | forwarded_reserved_address",
        "server | client | :: | - | forwarded_reserved_address",
        "server | client | 224.0.0.1 | - | forwarded_reserved_address",
        "server | client | 255.255.255.255 | - | forwarded_reserved_address",
        "server | client | 169.254.7.127 | - | forwarded_reserved_address",
        "server | client | fe80::1 | - | forwarded_reserved_address",
        "server | client | 127.0.0.1 | - | forwarded_node_address",
        "server | client | ::1 | - | forwarded_node_address",
        // The tunnel's own peer address is no claim beyond the truth.
        "server | client | 192.168.0.3 | 4000 | 192.168.0.3:4000",
        // A workload's own waypoint forwards anyone's connections to it...
        "guarded | wp | 10.9.9.9 | 5000 | 10.9.9.9:5000",
        "guarded | wp | 10.1.0.3 | - | 10.1.0.3:0",
        // ...and so does the waypoint of a service the destination backs...
        "server | wp2 | 10.1.0.2 | - | 10.1.0.2:0",
        // ...but no waypoint speaks for a workload it does not serve...
        "server | wp | 10.1.0.2 | - | forwarded_not_the_peer",
        "guarded | wp2 | 10.1.0.2 | - | forwarded_not_the_peer",
        // ...and not even a waypoint may name no address, or the node's.
        "guarded | wp | 0.0.0.0 | - | forwarded_reserved_address",
        "guarded | wp | 192.168.0.2 | - | forwarded_node_address",
    ];
    let tunnel: SocketAddr = TUNNEL.parse().unwrap();
    for row in rows {
        let f: Vec<&str> = row.split(" | ").collect();
        let dst = match f[0] {
            "server" => "10.2.0.2",
            _ => "10.2.0.5",
        };
        let dst = state.workload_by_ip(dst.parse().unwrap()).unwrap();
        let peer = Identity::new("cluster.local", "default", f[1]);
        let claim = Claim {
            ip: (f[2] != "-").then(|| f[2].parse().unwrap()),
            port: (f[3] != "-").then(|| f[3].parse().unwrap()),
        };
        let got = tunnelled_source(&state, &dst, &peer, tunnel, claim, &is_node);
        let got = match got {
            Ok(src) => src.to_string(),
            Err(e) => e.name().to_string(),
        };
        assert_eq!(got, f[4], "{row}");
    }
}

#[test]
fn another_trust_domain_is_not_the_same_identity() {
    let state = state();
    let server = state.workload_by_ip("10.2.0.2".parse().unwrap()).unwrap();
    let peer = Identity::new("evil.example", "default", "client");
    let claim = Claim {
        ip: Some("10.1.0.2".parse().unwrap()),
        port: None,
    };
    let tunnel: SocketAddr = TUNNEL.parse().unwrap();
    let e = tunnelled_source(&state, &server, &peer, tunnel, claim, &is_node).unwrap_err();
    assert_eq!(e.name(), "forwarded_not_the_peer");
    assert!(
        e.to_string().contains("c//Pod/default/client has identity"),
        "{e}"
    );
}
