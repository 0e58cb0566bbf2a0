//! What kube-proxy (iptables or nftables mode) leaves in a node's netfilter for Services,
//! written with `nft` so that tests meet the node's NAT as pods do:
//!
//! - a ClusterIP: `VIP:port` DNATed to one endpoint, in PREROUTING (pods) and OUTPUT (the
//!   node's own processes), as `KUBE-SERVICES` / `KUBE-SVC-*` / `KUBE-SEP-*` do;
//! - a NodePort: the node's own addresses at `port` DNATed to one endpoint, the packet
//!   marked `0x4000` (`KUBE-MARK-MASQ`) and masqueraded on its way out
//!   (`KUBE-POSTROUTING`), so the endpoint sees the node's address as the source, as with
//!   `externalTrafficPolicy: Cluster`.
//!
//! One endpoint per Service keeps the tests deterministic; kube-proxy's random choice
//! among several changes nothing of what the node's stack does with each packet.

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::netns::Netns;

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
pub const MASQUERADE_MARK: u32 = 0x4000;

/// A Service as kube-proxy programs it on one node.
#[derive(Clone, Copy, Debug)]
pub enum Service {
    /// Connections to `vip` go to `endpoint`.
    ClusterIp {
        vip: SocketAddrV4,
        endpoint: SocketAddrV4,
    },
    /// Connections to any of the node's addresses at `port` go to `endpoint`, masqueraded.
    NodePort { port: u16, endpoint: SocketAddrV4 },
}

/// The nft ruleset for `services` (IPv4), in its own table.
pub fn rules(services: &[Service]) -> String {
    let (mut pre, mut out) = (String::new(), String::new());
    for s in services {
        match *s {
            Service::ClusterIp { vip, endpoint } => {
                let r = format!(
                    "\t\tip daddr {} tcp dport {} counter dnat to {endpoint} comment \"KUBE-SVC\"\n",
                    vip.ip(),
                    vip.port()
                );
                pre.push_str(&r);
                out.push_str(&r);
            }
            Service::NodePort { port, endpoint } => {
                pre.push_str(&format!(
                    "\t\tfib daddr type local tcp dport {port} counter meta mark set mark or {MASQUERADE_MARK:#x} dnat to {endpoint} comment \"KUBE-NODEPORTS\"\n"
                ));
            }
        }
    }
    format!(
        "table ip kube-proxy {{\n\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{pre}\t}}\n\
         \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n{out}\t}}\n\
         \tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark and {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} counter masquerade comment \"KUBE-POSTROUTING\"\n\t}}\n\
         }}\n"
    )
}

/// kubeadm's default Service range.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";

/// Installs [`rules`] in `ns` (the node). A ClusterIP called from the node itself is
/// routed before OUTPUT's DNAT, by the node's default route; the testbed's nodes have
/// none, so the Service range gets the route a default one would give it (the uplink).
pub fn install(ns: &Netns, services: &[Service]) -> anyhow::Result<()> {
    ns.ip(&[
        "route",
        "replace",
        SERVICE_CIDR,
        "dev",
        crate::layout::UPLINK,
    ])?;
    crate::firewall::nft_apply(ns, &rules(services))
}

/// A ClusterIP in the testbed's Service range ([`SERVICE_CIDR`]).
pub fn vip(last: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, last), port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_ip_is_natted_for_pods_and_the_node_a_node_port_is_also_masqueraded() {
        let ep = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080);
        let r = rules(&[
            Service::ClusterIp {
                vip: vip(10, 80),
                endpoint: ep,
            },
            Service::NodePort {
                port: 30080,
                endpoint: ep,
            },
        ]);
        assert_eq!(r.matches("ip daddr 10.96.0.10 tcp dport 80").count(), 2);
        assert!(r.contains("fib daddr type local tcp dport 30080"));
        assert!(r.contains("mark or 0x4000 dnat to 10.1.0.2:8080"));
        assert!(r.contains("== 0x4000 counter masquerade"));
    }
}
