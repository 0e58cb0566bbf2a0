//! What `ZT_IFACES` tells the capture program about interfaces beyond their index: which
//! are bridges, which are bridge ports (and their bridge's MAC), which have no MAC header,
//! and in which namespace a veth's peer (a pod's interface) is.

use std::collections::{BTreeMap, BTreeSet};

use ztunnel_ebpf_common::{IfaceInfo, IFACE_BRIDGE, IFACE_BRIDGE_PORT, IFACE_L3, IFACE_PEER_NETNS};

use super::interfaces::{self, Role};

/// What the program must know of attached link `l` beyond its index, if anything: that it
/// is a port of a bridge with MAC `bridge_mac`, that it has no MAC header, that its peer
/// is in another namespace (where the program finds a pod's own sockets).
fn iface_info(l: &interfaces::Link, bridge_mac: Option<[u8; 6]>) -> Option<IfaceInfo> {
    let mut info = IfaceInfo::default();
    if let Some(mac) = bridge_mac {
        info.bridge_mac = mac;
        info.flags |= IFACE_BRIDGE_PORT;
    }
    if l.l3 {
        info.flags |= IFACE_L3;
    }
    if let Some(nsid) = l.peer_netnsid.filter(|_| l.has_peer_namespace()) {
        info.flags |= IFACE_PEER_NETNS;
        info.peer_netnsid = nsid;
    }
    (info.flags != 0).then_some(info)
}

/// What `ZT_IFACES` must say about `links`: each bridge (its MAC, [`IFACE_BRIDGE`]) and
/// each attached link that needs more than its index ([`iface_info`]).
pub(super) fn iface_infos(links: &[interfaces::Link]) -> BTreeMap<u32, IfaceInfo> {
    // Whether a veth is a pod's or the node's does not matter here (both are attached).
    let role = |l: &interfaces::Link| Role::of(l, &BTreeSet::new());
    let bridge_mac = |index: u32| {
        links
            .iter()
            .find(|b| b.index == index && role(b) == Role::Bridge)
            .and_then(|b| b.mac)
    };
    let mut out = BTreeMap::new();
    for l in links {
        let info = match role(l) {
            Role::Bridge => l.mac.map(|bridge_mac| IfaceInfo {
                bridge_mac,
                flags: IFACE_BRIDGE,
                peer_netnsid: 0,
            }),
            role if role.attached() => iface_info(l, l.master.and_then(bridge_mac)),
            _ => None,
        };
        if let Some(info) = info {
            out.insert(l.index, info);
        }
    }
    out
}

#[cfg(test)]
mod iface_tests {
    use super::*;

    fn link(name: &str, index: u32, kind: &str, master: Option<u32>, mac: u8) -> interfaces::Link {
        interfaces::Link {
            name: name.into(),
            index,
            kind: Some(kind.into()),
            master,
            peer_netnsid: (kind == "veth").then_some(1),
            peer_index: None,
            mac: Some([2, 0, 0, 0, 0, mac]),
            loopback: false,
            l3: false,
        }
    }

    /// The bridge and its pod ports are listed, each with the bridge's MAC; every veth with
    /// its peer's namespace; other links are not.
    #[test]
    fn bridges_and_their_ports() {
        let links = [
            link("cni0", 3, "bridge", None, 0xb),
            link("p2", 4, "veth", Some(3), 0x4),
            link("p3", 5, "veth", Some(9), 0x5),
            link("flannel.1", 6, "vxlan", None, 0x6),
            link("p4", 7, "veth", None, 0x7),
        ];
        let mac = [2, 0, 0, 0, 0, 0xb];
        let want = BTreeMap::from([
            (
                3,
                IfaceInfo {
                    bridge_mac: mac,
                    flags: IFACE_BRIDGE,
                    peer_netnsid: 0,
                },
            ),
            (
                4,
                IfaceInfo {
                    bridge_mac: mac,
                    flags: IFACE_BRIDGE_PORT | IFACE_PEER_NETNS,
                    peer_netnsid: 1,
                },
            ),
            (
                5,
                IfaceInfo {
                    bridge_mac: [0; 6],
                    flags: IFACE_PEER_NETNS,
                    peer_netnsid: 1,
                },
            ),
            (
                7,
                IfaceInfo {
                    bridge_mac: [0; 6],
                    flags: IFACE_PEER_NETNS,
                    peer_netnsid: 1,
                },
            ),
        ]);
        assert_eq!(iface_infos(&links), want);
    }
}
