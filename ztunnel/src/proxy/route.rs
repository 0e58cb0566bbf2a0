//! Where an outbound connection goes, decided from the state alone: a pure function of
//! the snapshot, the client's address and the original destination, so every case is a
//! line of a table test and the executor (`outbound`) only carries the plan out.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::state::{
    NetworkAddress, ProxyState, Service, Target, Unresolved, Upstream, WaypointHop, Workload,
};

/// The plan for one outbound connection.
#[derive(Debug, Clone)]
pub enum Route {
    /// Both ends in the mesh, the destination on another node: HBONE to its node.
    Hbone { src: Arc<Workload>, up: Upstream },
    /// Both ends in the mesh on this node: the same checks as HBONE, delivered directly.
    SameNode { src: Arc<Workload>, up: Upstream },
    /// The destination is behind a waypoint: HBONE to the waypoint, asking it for the
    /// original destination (`dst`: the service VIP and port, or the workload's address
    /// and port). `service`: the service dialed, if it was one.
    Waypoint {
        src: Arc<Workload>,
        hop: WaypointHop,
        dst: SocketAddr,
        service: Option<Arc<Service>>,
    },
    /// Not a mesh-to-mesh connection: plain TCP to `target` with the client's address.
    /// `src` is the client's workload if it is one of this node's mesh pods; `up` the
    /// destination if the state knows it (a workload outside the mesh).
    Passthrough {
        src: Option<Arc<Workload>>,
        up: Option<Upstream>,
        target: SocketAddr,
    },
    /// The picked endpoint is known by hostname only: look it up, then
    /// [`Planner::to_endpoint`] says how to reach the address found.
    Lookup {
        src: Option<Arc<Workload>>,
        endpoint: Unresolved,
    },
    /// Refused before anything is dialed.
    Refuse(Refusal),
}

/// Why a connection is refused before it is dialed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The original destination is one of ztunnel's own listeners on this node: it
    /// would loop through capture forever.
    #[error("destination is ztunnel's own listener")]
    OwnListener,
    /// A service VIP with nothing to send the connection to.
    #[error("{0}")]
    NoEndpoint(String),
    /// The destination's waypoint cannot be reached through the state; going direct
    /// instead would skip its policies.
    #[error("{0}")]
    NoWaypoint(String),
}

impl Refusal {
    /// A short stable name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Refusal::OwnListener => "own_listener",
            Refusal::NoEndpoint(_) => "no_endpoint",
            Refusal::NoWaypoint(_) => "no_waypoint",
        }
    }
}

/// What the planner needs besides the state.
pub struct Planner<'a> {
    /// This node's name: which mesh workloads are ours.
    pub node: &'a str,
    /// ztunnel's listener ports.
    pub listen_ports: &'a [u16],
    /// Whether an address is one of this node's (a destination there on a listener
    /// port is ztunnel itself).
    pub is_local: &'a dyn Fn(SocketAddr) -> bool,
}

impl Planner<'_> {
    /// Plans the connection `peer` opened to `dst`.
    pub fn plan(&self, state: &ProxyState, peer: SocketAddr, dst: SocketAddr) -> Route {
        if self.listen_ports.contains(&dst.port()) && (self.is_local)(dst) {
            return Route::Refuse(Refusal::OwnListener);
        }
        let src = state
            .workload_by_ip(peer.ip())
            .filter(|w| w.node == self.node && w.in_mesh());
        // Before resolving endpoints: behind a waypoint, picking the endpoint is its job.
        if let Some(src) = &src {
            if let Some(gw) = state.waypoint_for(src, dst) {
                let addr = NetworkAddress::new(&src.network, dst.ip().to_canonical());
                return match state.waypoint(&gw, dst.ip()) {
                    Ok(hop) => Route::Waypoint {
                        src: src.clone(),
                        hop,
                        dst,
                        service: state.destination_service(&addr, Some(&src.namespace)),
                    },
                    Err(e) => Route::Refuse(Refusal::NoWaypoint(e.to_string())),
                };
            }
        }
        match state.resolve_from(src.as_deref(), dst) {
            Ok(Some(Target::Hostname(endpoint))) => Route::Lookup { src, endpoint },
            Ok(Some(Target::Address(up))) => self.to_endpoint(src, Some(up), dst),
            Ok(None) => self.to_endpoint(src, None, dst),
            // Known to the mesh but not servable: refused, never sent elsewhere.
            Err(e) => Route::Refuse(Refusal::NoEndpoint(e.to_string())),
        }
    }

    /// How to reach the endpoint `up` (the state's, or one whose hostname was looked up),
    /// or, with none, the address dialed.
    pub fn to_endpoint(
        &self,
        src: Option<Arc<Workload>>,
        up: Option<Upstream>,
        dst: SocketAddr,
    ) -> Route {
        match (src, up) {
            (Some(src), Some(up)) if up.in_mesh() => {
                if up.workload.node == self.node {
                    Route::SameNode { src, up }
                } else {
                    Route::Hbone { src, up }
                }
            }
            (src, up) => {
                let target = up.as_ref().map(|u| u.address).unwrap_or(dst);
                Route::Passthrough { src, up, target }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{GatewayAddress, NamespacedHostname, Protocol, StateStore};

    fn workload(name: &str, ip: &str, node: &str, protocol: Protocol) -> Workload {
        let svc = NamespacedHostname::new("default", "web.default.svc.cluster.local");
        Workload {
            uid: format!("c//Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            service_account: name.into(),
            workload_ips: vec![ip.parse().unwrap()],
            protocol,
            node: node.into(),
            services: if name.starts_with("web") {
                [(svc, [(80, 8080)].into_iter().collect())].into()
            } else {
                Default::default()
            },
            ..Default::default()
        }
    }

    fn service(name: &str, vip: &str) -> Service {
        Service {
            name: name.into(),
            namespace: "default".into(),
            hostname: format!("{name}.default.svc.cluster.local"),
            vips: vec![NetworkAddress::new("", vip.parse().unwrap())],
            ports: [(80, 8080)].into_iter().collect(),
            ..Default::default()
        }
    }

    fn waypoint(destination: &str) -> Option<GatewayAddress> {
        Some(GatewayAddress {
            destination: destination.parse().unwrap(),
            hbone_mtls_port: 15008,
        })
    }

    /// node-a: client (mesh), legacy (TCP); node-b: web (mesh, behind VIP 10.96.0.1),
    /// outside (TCP); an empty service at 10.96.0.2. Waypoints: the service `api`
    /// (10.96.0.3, endpoint web-api) has the waypoint service `wp` (10.96.0.8, one TCP
    /// instance on node-b); the workload `guarded` has `wp` by address; `watched` has the
    /// mesh pod `neighbour` of node-a as its waypoint; `lost` (10.96.0.4) names a
    /// waypoint nobody defined.
    fn state() -> Arc<ProxyState> {
        let s = StateStore::default();
        let wp_svc = NamespacedHostname::new("default", "wp.default.svc.cluster.local");
        s.replace_all(
            [
                workload("client", "10.1.0.2", "node-a", Protocol::HBONE),
                workload("neighbour", "10.1.0.3", "node-a", Protocol::HBONE),
                workload("legacy", "10.1.0.4", "node-a", Protocol::TCP),
                workload("web", "10.2.0.2", "node-b", Protocol::HBONE),
                workload("outside", "10.2.0.3", "node-b", Protocol::TCP),
                Workload {
                    services: [(wp_svc, Default::default())].into(),
                    ..workload("wp", "10.2.0.9", "node-b", Protocol::TCP)
                },
                Workload {
                    waypoint: waypoint("10.2.0.9"),
                    ..workload("guarded", "10.2.0.5", "node-b", Protocol::HBONE)
                },
                Workload {
                    waypoint: waypoint("/10.1.0.3"),
                    ..workload("watched", "10.2.0.6", "node-b", Protocol::HBONE)
                },
                Workload {
                    services: [(
                        NamespacedHostname::new("default", "api.default.svc.cluster.local"),
                        Default::default(),
                    )]
                    .into(),
                    ..workload("web-api", "10.2.0.7", "node-b", Protocol::HBONE)
                },
                hostname_only("ext-dns", "api.example.com", Protocol::TCP),
                hostname_only("mesh-dns", "vm.example.com", Protocol::HBONE),
            ],
            [
                service("web", "10.96.0.1"),
                service("empty", "10.96.0.2"),
                Service {
                    waypoint: waypoint("default/wp.default.svc.cluster.local"),
                    ..service("api", "10.96.0.3")
                },
                Service {
                    waypoint: waypoint("default/nope.default.svc.cluster.local"),
                    ..service("lost", "10.96.0.4")
                },
                service("wp", "10.96.0.8"),
                service("ext", "240.240.0.1"),
                service("mesh", "240.240.0.2"),
            ],
            [],
        );
        s.snapshot()
    }

    /// A ServiceEntry endpoint known by name only, the one endpoint of service `svc`
    /// (the workload's name up to `-dns`).
    fn hostname_only(name: &str, hostname: &str, protocol: Protocol) -> Workload {
        let svc = name.trim_end_matches("-dns");
        Workload {
            workload_ips: vec![],
            hostname: hostname.into(),
            node: String::new(),
            services: [(
                NamespacedHostname::new("default", &format!("{svc}.default.svc.cluster.local")),
                Default::default(),
            )]
            .into(),
            ..workload(name, "0.0.0.0", "", protocol)
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The plan, as one line: kind, source workload, target.
    fn plan(peer: &str, dst: &str) -> String {
        let is_local = |a: SocketAddr| a.ip().to_string() == "192.168.0.1";
        let p = Planner {
            node: "node-a",
            listen_ports: &[15001, 15006, 15008],
            is_local: &is_local,
        };
        let name = |w: &Option<Arc<Workload>>| w.as_ref().map_or("-".into(), |w| w.name.clone());
        match p.plan(&state(), sa(peer), sa(dst)) {
            Route::Hbone { src, up } => format!("hbone {} {}", src.name, up.address),
            Route::SameNode { src, up } => format!("same-node {} {}", src.name, up.address),
            Route::Waypoint { src, hop, dst, .. } => {
                format!(
                    "waypoint {} {} {} {dst}",
                    src.name, hop.workload.name, hop.address
                )
            }
            Route::Passthrough { src, up, target } => format!(
                "passthrough {} {} {target}",
                name(&Some(src).flatten()),
                up.map_or("-".into(), |u| u.workload.name.clone())
            ),
            Route::Lookup { src, endpoint } => {
                format!(
                    "lookup {} {} {}",
                    name(&src),
                    endpoint.hostname(),
                    endpoint.port
                )
            }
            Route::Refuse(r) => format!("refuse {}", r.name()),
        }
    }

    #[test]
    fn every_route() {
        let table = [
            // mesh → mesh on another node, by workload address and by service VIP
            (
                "10.1.0.2:40000",
                "10.2.0.2:8080",
                "hbone client 10.2.0.2:8080",
            ),
            (
                "10.1.0.2:40000",
                "10.96.0.1:80",
                "hbone client 10.2.0.2:8080",
            ),
            // mesh → mesh on this node
            (
                "10.1.0.2:40000",
                "10.1.0.3:8080",
                "same-node client 10.1.0.3:8080",
            ),
            // mesh → outside the mesh (known TCP workload, unknown address)
            (
                "10.1.0.2:40000",
                "10.2.0.3:80",
                "passthrough client outside 10.2.0.3:80",
            ),
            (
                "10.1.0.2:40000",
                "8.8.8.8:53",
                "passthrough client - 8.8.8.8:53",
            ),
            // a client that is no mesh pod of this node is never given an identity
            (
                "10.1.0.4:40000",
                "10.2.0.2:8080",
                "passthrough - web 10.2.0.2:8080",
            ),
            (
                "10.2.0.2:40000",
                "10.1.0.3:8080",
                "passthrough - neighbour 10.1.0.3:8080",
            ),
            // ztunnel's own listener on this node: a loop
            ("10.1.0.2:40000", "192.168.0.1:15001", "refuse own_listener"),
            // the same port elsewhere is just a port
            (
                "10.1.0.2:40000",
                "10.2.0.3:15001",
                "passthrough client outside 10.2.0.3:15001",
            ),
            // a VIP with no endpoint, or a port the service does not serve
            ("10.1.0.2:40000", "10.96.0.2:80", "refuse no_endpoint"),
            ("10.1.0.2:40000", "10.96.0.1:81", "refuse no_endpoint"),
            // a service with a waypoint (by hostname): to the waypoint's instance, asking
            // for the VIP; the endpoint addressed directly has none of its own
            (
                "10.1.0.2:40000",
                "10.96.0.3:80",
                "waypoint client wp 10.2.0.9:15008 10.96.0.3:80",
            ),
            (
                "10.1.0.2:40000",
                "10.2.0.7:8080",
                "hbone client 10.2.0.7:8080",
            ),
            // a workload with a waypoint of its own (by address): asking for the pod
            (
                "10.1.0.2:40000",
                "10.2.0.5:8080",
                "waypoint client wp 10.2.0.9:15008 10.2.0.5:8080",
            ),
            // the waypoint's own traffic is never sent back to it
            (
                "10.1.0.2:40000",
                "10.2.0.6:8080",
                "waypoint client neighbour 10.1.0.3:15008 10.2.0.6:8080",
            ),
            (
                "10.1.0.3:40000",
                "10.2.0.6:8080",
                "hbone neighbour 10.2.0.6:8080",
            ),
            // a waypoint that cannot be found refuses; never the direct path
            ("10.1.0.2:40000", "10.96.0.4:80", "refuse no_waypoint"),
            // clients outside the mesh are not this node's to send anywhere
            (
                "10.1.0.4:40000",
                "10.96.0.3:80",
                "passthrough - web-api 10.2.0.7:8080",
            ),
            // an endpoint known by hostname only: looked up first, whoever the client
            (
                "10.1.0.2:40000",
                "240.240.0.1:80",
                "lookup client api.example.com 8080",
            ),
            (
                "10.1.0.4:40000",
                "240.240.0.1:80",
                "lookup - api.example.com 8080",
            ),
        ];
        for (peer, dst, want) in table {
            assert_eq!(plan(peer, dst), want, "{peer} -> {dst}");
        }
    }

    /// Once the name is looked up, the endpoint is reached as one with that address would
    /// be: HBONE for a mesh endpoint, plaintext for the rest.
    #[test]
    fn after_a_lookup() {
        let is_local = |_: SocketAddr| false;
        let p = Planner {
            node: "node-a",
            listen_ports: &[15001],
            is_local: &is_local,
        };
        let state = state();
        let client = state.workload_by_ip("10.1.0.2".parse().unwrap());
        let mut rng = rand::rng();
        let found = ["2001:db8::5".parse().unwrap(), "192.0.2.5".parse().unwrap()];
        for (vip, src, want) in [
            (
                "240.240.0.1:80",
                client.clone(),
                "passthrough 192.0.2.5:8080",
            ),
            ("240.240.0.2:80", client.clone(), "hbone 192.0.2.5:8080"),
            // no mesh client: no identity to tunnel with
            ("240.240.0.2:80", None, "passthrough 192.0.2.5:8080"),
        ] {
            let route = p.plan(&state, sa("10.1.0.2:40000"), sa(vip));
            let Route::Lookup { endpoint, .. } = route else {
                panic!("{vip}: {route:?}");
            };
            let up = endpoint.found(&found, &mut rng).unwrap();
            let got = match p.to_endpoint(src, Some(up), sa(vip)) {
                Route::Hbone { up, .. } => format!("hbone {}", up.address),
                Route::Passthrough { target, .. } => format!("passthrough {target}"),
                other => format!("{other:?}"),
            };
            assert_eq!(got, want, "{vip}");
        }
    }
}
