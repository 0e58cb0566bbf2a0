//! Network layouts of the testbed: how pods are attached to their node, and how nodes
//! reach each other's pods. Each stands for a family of real CNIs, so that ztunnel is
//! tested beside the layouts it meets in clusters.
//!
//! Two independent choices, made when the testbed is created ([`Layout`]):
//! - [`PodAttach`]: a route per pod to its veth ([`PodAttach::Routed`]), the same with the
//!   pods' gateway address on every host-side veth ([`PodAttach::Ptp`]), or pods as ports
//!   of a bridge on one subnet ([`PodAttach::Bridge`]);
//! - [`Interconnect`]: pod ranges routed over the wire to the other node's address
//!   ([`Interconnect::Direct`]), through a VXLAN overlay ([`Interconnect::Vxlan`]), or
//!   through an L3 IP-in-IP tunnel device ([`Interconnect::Ipip`]).
//!
//! In every layout pod `k` (2-based) on node `i` has `10.i.0.k` and `fd00:i::k`, its
//! host-side veth is `p<k>` in the node namespace, and node `i`'s pod ranges are
//! `10.i.0.0/16` and `fd00:i::/64`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::netns::Netns;

mod attach;
pub(crate) use attach::attach_pod;

/// The node's interface on the wire (the switch), in every layout.
pub const UPLINK: &str = "eth0";
/// The pods' bridge in [`PodAttach::Bridge`] layouts.
pub const BRIDGE: &str = "cni0";
/// The overlay device in [`Interconnect::Vxlan`] layouts.
pub const VXLAN: &str = "flannel.1";
/// The UDP port VXLAN traffic uses on the wire (flannel's, not IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;
/// The VXLAN network identifier (flannel's `flannel.1` uses VNI 1).
pub const VXLAN_VNI: u32 = 1;

/// How a pod's veth is wired into its node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PodAttach {
    /// Calico (also kindnet, AWS VPC CNI): pod `k` on node `i` has `10.i.0.k/32` and
    /// `fd00:i::k/128`, default routes via `169.254.1.1` / `fe80::1`, which every
    /// host-side veth `p<k>` carries (with `proxy_arp`); the node has a `/32` and a
    /// `/128` route per pod to its veth.
    #[default]
    Routed,
    /// flannel and the reference `bridge` CNI plugin: the node has a Linux bridge `cni0`
    /// with `10.i.0.1/24` and `fd00:i::1/64`; pod `k` has `10.i.0.k/24` and
    /// `fd00:i::k/64`, default routes via `10.i.0.1` / `fd00:i::1`; its host-side veth
    /// `p<k>` is a port of `cni0` (no address, no route of its own). Pods on one node
    /// reach each other at layer 2 through the bridge, not through the node's IP stack.
    Bridge,
    /// The reference `ptp` CNI plugin (kindnet in kind, GKE's route-based clusters): pod
    /// `k` on node `i` has `10.i.0.k/24` and `fd00:i::k/64` (no prefix route: the subnet
    /// and the default go via the gateway), gateway `10.i.0.1` / `fd00:i::1`, which every
    /// host-side veth `p<k>` carries as a real address of the node — see [`PtpGateway`]
    /// for its prefix; the node has a `/32` and a `/128` route per pod to its veth. Unlike
    /// [`PodAttach::Routed`], the host side carries a global address, as the node's own
    /// uplink does.
    Ptp(PtpGateway),
}

/// The prefix of the gateway address on every host-side veth of a [`PodAttach::Ptp`] node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PtpGateway {
    /// `10.i.0.1/24` and `fd00:i::1/64` (each veth also gets the subnet's prefix route,
    /// which the pods' `/32` routes override).
    #[default]
    Subnet,
    /// `10.i.0.1/32` and `fd00:i::1/128`, the same on every veth (the plugin's own way,
    /// kindnet's).
    Host,
}

/// How a node reaches the pods of the other nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Interconnect {
    /// Calico without encapsulation, flannel's `host-gw`, kindnet: node `j`'s pod ranges
    /// are routed via node `j`'s address on the wire; pod packets cross the wire as they
    /// are.
    #[default]
    Direct,
    /// flannel's default `vxlan` backend: a VXLAN device `flannel.1` (VNI 1, UDP 8472,
    /// `local 192.168.0.i dev eth0`, no learning, MTU 1450 on the 1500-byte wire) with
    /// `10.i.0.0/32` and `fd00:i::/128`; node `j`'s ranges are routed
    /// `via 10.j.0.0 dev flannel.1 onlink` (and `via fd00:j::`), with permanent
    /// neighbours for those gateways at node `j`'s VXLAN MAC and a forwarding entry
    /// sending that MAC to `192.168.0.j`. Pods get MTU 1450 on both veth ends; between
    /// nodes the wire carries only UDP 8472 for pod traffic (IPv6 too, over IPv4).
    Vxlan,
    /// Calico's IPIP mode: an L3 tunnel device `tunl0` (no Ethernet header; MTU 1480)
    /// with `10.i.0.0/32` and `fd00:i::/128`; node `j`'s ranges are routed
    /// `via 192.168.0.j dev tunl0 onlink` (IPv6: `dev tunl0`). Pods get MTU 1480; between
    /// nodes the wire carries pod traffic only as IP protocol 4 (IPv6 inside: 41). See
    /// [`crate::tunnel`] for how the device is made on a kernel without `ipip`.
    Ipip,
}

/// A testbed's network layout. `Layout::default()` is the original one (routed pods,
/// direct routes between nodes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Layout {
    pub pods: PodAttach,
    pub nodes: Interconnect,
}

impl Layout {
    /// Calico-like: routed pods, direct routes (what `Testbed::new()` builds).
    pub const ROUTED: Layout = Layout {
        pods: PodAttach::Routed,
        nodes: Interconnect::Direct,
    };
    /// flannel `host-gw`-like: a bridge per node, direct routes.
    pub const BRIDGE: Layout = Layout {
        pods: PodAttach::Bridge,
        nodes: Interconnect::Direct,
    };
    /// Routed pods over a VXLAN overlay (Calico with VXLAN encapsulation).
    pub const ROUTED_VXLAN: Layout = Layout {
        pods: PodAttach::Routed,
        nodes: Interconnect::Vxlan,
    };
    /// flannel's default: a bridge per node, VXLAN between nodes.
    pub const FLANNEL: Layout = Layout {
        pods: PodAttach::Bridge,
        nodes: Interconnect::Vxlan,
    };
    /// Calico in IPIP mode: routed pods, an L3 IP-in-IP tunnel between nodes.
    pub const CALICO_IPIP: Layout = Layout {
        pods: PodAttach::Routed,
        nodes: Interconnect::Ipip,
    };
    /// The reference `ptp` plugin with the pods' `/24` gateway on every host veth.
    pub const PTP: Layout = Layout {
        pods: PodAttach::Ptp(PtpGateway::Subnet),
        nodes: Interconnect::Direct,
    };
    /// The reference `ptp` plugin as kindnet runs it: one `/32` repeated on every veth.
    pub const PTP_32: Layout = Layout {
        pods: PodAttach::Ptp(PtpGateway::Host),
        nodes: Interconnect::Direct,
    };
    /// Every layout the suites run on.
    pub const ALL: [Layout; 5] = [
        Layout::ROUTED,
        Layout::BRIDGE,
        Layout::ROUTED_VXLAN,
        Layout::FLANNEL,
        Layout::CALICO_IPIP,
    ];

    /// Every layout there is, for the layout matrix (`cargo xtask layouts`).
    pub const MATRIX: [Layout; 7] = [
        Layout::ROUTED,
        Layout::PTP,
        Layout::PTP_32,
        Layout::BRIDGE,
        Layout::ROUTED_VXLAN,
        Layout::FLANNEL,
        Layout::CALICO_IPIP,
    ];

    /// The layout named `name`, as [`Layout::name`] spells it (`ptp+direct`), or by the
    /// CNI it stands for: `routed` (Calico), `ptp` and `ptp32` (kindnet, GKE), `bridge`
    /// (flannel host-gw), `routed-vxlan` (Calico VXLAN), `flannel`, `ipip` (Calico IPIP).
    pub fn parse(name: &str) -> Option<Layout> {
        let by_alias = match name {
            "routed" | "calico" => Some(Layout::ROUTED),
            "ptp" | "kindnet" | "gke" => Some(Layout::PTP),
            "ptp32" => Some(Layout::PTP_32),
            "bridge" | "host-gw" => Some(Layout::BRIDGE),
            "routed-vxlan" | "calico-vxlan" => Some(Layout::ROUTED_VXLAN),
            "flannel" => Some(Layout::FLANNEL),
            "ipip" | "calico-ipip" => Some(Layout::CALICO_IPIP),
            _ => None,
        };
        by_alias.or_else(|| Layout::MATRIX.into_iter().find(|l| l.name() == name))
    }

    /// The layout of [`crate::Testbed::new`]: `TESTBED_LAYOUT` when set (so that every
    /// suite can be run on every layout), else [`Layout::ROUTED`]. An unknown name panics
    /// with the list of known ones rather than quietly testing the default.
    pub fn from_env() -> Layout {
        match std::env::var("TESTBED_LAYOUT") {
            Ok(name) if !name.is_empty() => Layout::parse(&name).unwrap_or_else(|| {
                let known: Vec<String> = Layout::MATRIX.iter().map(|l| l.name()).collect();
                panic!(
                    "TESTBED_LAYOUT={name}: unknown layout (known: {})",
                    known.join(", ")
                )
            }),
            _ => Layout::ROUTED,
        }
    }

    /// The node's interface on the wire: always `eth0`.
    pub fn uplink(&self) -> &'static str {
        UPLINK
    }

    /// The pods' bridge (`cni0`), if pods are bridged.
    pub fn bridge(&self) -> Option<&'static str> {
        (self.pods == PodAttach::Bridge).then_some(BRIDGE)
    }

    /// The overlay device (`flannel.1`), if nodes are joined by VXLAN.
    pub fn vxlan(&self) -> Option<&'static str> {
        (self.nodes == Interconnect::Vxlan).then_some(VXLAN)
    }

    /// The L3 tunnel device (`tunl0`), if nodes are joined by IPIP.
    pub fn tunnel(&self) -> Option<&'static str> {
        (self.nodes == Interconnect::Ipip).then_some(crate::tunnel::DEVICE)
    }

    /// The MTU of both ends of a pod's veth: 1450 under VXLAN, 1480 under IPIP, else 1500.
    pub fn pod_mtu(&self) -> u32 {
        match self.nodes {
            Interconnect::Direct => 1500,
            Interconnect::Vxlan => 1450,
            Interconnect::Ipip => crate::tunnel::MTU,
        }
    }

    /// A short name for messages: `routed+direct`, `bridge+vxlan`, ….
    pub fn name(&self) -> String {
        let p = match self.pods {
            PodAttach::Routed => "routed",
            PodAttach::Bridge => "bridge",
            PodAttach::Ptp(PtpGateway::Subnet) => "ptp",
            PodAttach::Ptp(PtpGateway::Host) => "ptp32",
        };
        let n = match self.nodes {
            Interconnect::Direct => "direct",
            Interconnect::Vxlan => "vxlan",
            Interconnect::Ipip => "ipip",
        };
        format!("{p}+{n}")
    }

    /// The default gateway of pods on node `index`.
    pub fn pod_gateway(&self, index: u8, v6: bool) -> IpAddr {
        match (self.pods, v6) {
            (PodAttach::Routed, false) => Ipv4Addr::new(169, 254, 1, 1).into(),
            (PodAttach::Routed, true) => Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1).into(),
            (PodAttach::Bridge | PodAttach::Ptp(_), false) => Ipv4Addr::new(10, index, 0, 1).into(),
            (PodAttach::Bridge | PodAttach::Ptp(_), true) => {
                Ipv6Addr::new(0xfd00, index as u16, 0, 0, 0, 0, 0, 1).into()
            }
        }
    }

    /// The prefix lengths of a pod's own addresses (IPv4, IPv6).
    pub fn pod_prefix_len(&self) -> (u8, u8) {
        match self.pods {
            PodAttach::Routed => (32, 128),
            PodAttach::Bridge | PodAttach::Ptp(_) => (24, 64),
        }
    }
}

/// Node `index`'s VXLAN MAC (fixed, so other nodes need not read it back).
pub fn vxlan_mac(index: u8) -> String {
    format!("02:00:0b:00:00:{index:02x}")
}

/// `cni0`'s MAC on node `index`: set explicitly, or the bridge would take the lowest
/// port's MAC and change it as pods come and go (stale gateway neighbours in the pods).
pub fn bridge_mac(index: u8) -> String {
    format!("02:00:0a:00:00:{index:02x}")
}

/// Devices a node needs before any pod or other node: the bridge, the VXLAN device.
pub(crate) fn prepare_node(ns: &Netns, index: u8, layout: Layout) -> anyhow::Result<()> {
    if layout.pods == PodAttach::Bridge {
        // As kubeadm, kube-proxy and flannel leave a bridged node: br_netfilter on, FORWARD
        // rules with conntrack.
        crate::firewall::kube_bridge_node(ns)?;
        ns.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ns.ip(&["link", "set", BRIDGE, "address", &bridge_mac(index)])?;
        if layout.pod_mtu() != 1500 {
            ns.ip(&["link", "set", BRIDGE, "mtu", &layout.pod_mtu().to_string()])?;
        }
        ns.ip(&["addr", "add", &format!("10.{index}.0.1/24"), "dev", BRIDGE])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("fd00:{index}::1/64"),
            "dev",
            BRIDGE,
            "nodad",
        ])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
    }
    if layout.nodes == Interconnect::Vxlan {
        ns.ip(&[
            "link",
            "add",
            VXLAN,
            "address",
            &vxlan_mac(index),
            "type",
            "vxlan",
            "id",
            &VXLAN_VNI.to_string(),
            "local",
            &format!("192.168.0.{index}"),
            "dev",
            UPLINK,
            "dstport",
            &VXLAN_PORT.to_string(),
            "nolearning",
        ])?;
        ns.ip(&["addr", "add", &format!("10.{index}.0.0/32"), "dev", VXLAN])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("fd00:{index}::/128"),
            "dev",
            VXLAN,
            "nodad",
        ])?;
        ns.ip(&["link", "set", VXLAN, "up"])?;
    }
    Ok(())
}

/// Node `index`'s end of the IPIP tunnel, in an [`Interconnect::Ipip`] layout: `tunl0`
/// with the node's tunnel addresses. The device lives as long as the returned relay.
pub(crate) fn start_tunnel(
    ns: &Netns,
    index: u8,
    layout: Layout,
) -> anyhow::Result<Option<crate::tunnel::Relay>> {
    let Some(dev) = layout.tunnel() else {
        return Ok(None);
    };
    let relay = crate::tunnel::Relay::start(ns, index)?;
    ns.ip(&["addr", "add", &format!("10.{index}.0.0/32"), "dev", dev])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("fd00:{index}::/128"),
        "dev",
        dev,
        "nodad",
    ])?;
    Ok(Some(relay))
}

/// Makes node `to`'s pods reachable from the node in `on`.
pub(crate) fn route_pods(
    on: &Netns,
    to_index: u8,
    to_ip: Ipv4Addr,
    to_ip6: Ipv6Addr,
    layout: Layout,
) -> anyhow::Result<()> {
    let (net4, net6) = (
        format!("10.{to_index}.0.0/16"),
        format!("fd00:{to_index}::/64"),
    );
    match layout.nodes {
        Interconnect::Direct => {
            on.ip(&["route", "add", &net4, "via", &to_ip.to_string()])?;
            on.ip(&["-6", "route", "add", &net6, "via", &to_ip6.to_string()])
        }
        Interconnect::Vxlan => {
            let mac = vxlan_mac(to_index);
            let (gw4, gw6) = (format!("10.{to_index}.0.0"), format!("fd00:{to_index}::"));
            for gw in [&gw4, &gw6] {
                on.ip(&[
                    "neigh",
                    "add",
                    gw,
                    "lladdr",
                    &mac,
                    "dev",
                    VXLAN,
                    "nud",
                    "permanent",
                ])?;
            }
            run(
                on,
                "bridge",
                &[
                    "fdb",
                    "add",
                    &mac,
                    "dev",
                    VXLAN,
                    "dst",
                    &to_ip.to_string(),
                    "self",
                    "permanent",
                ],
            )?;
            on.ip(&["route", "add", &net4, "via", &gw4, "dev", VXLAN, "onlink"])?;
            on.ip(&[
                "-6", "route", "add", &net6, "via", &gw6, "dev", VXLAN, "onlink",
            ])
        }
        Interconnect::Ipip => {
            let dev = crate::tunnel::DEVICE;
            let gw = to_ip.to_string();
            on.ip(&["route", "add", &net4, "via", &gw, "dev", dev, "onlink"])?;
            on.ip(&["-6", "route", "add", &net6, "dev", dev])
        }
    }
}

/// What `ip -s -j link show` says about one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub mtu: u32,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The bridge (or other master) it is a port of.
    pub master: Option<String>,
    /// Administratively up.
    pub up: bool,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Reads interface `dev` inside `ns`.
pub fn link(ns: &Netns, dev: &str) -> anyhow::Result<LinkInfo> {
    let out = run(ns, "ip", &["-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let l = &v[0];
    let stat = |dir: &str| l["stats64"][dir]["packets"].as_u64().unwrap_or(0);
    Ok(LinkInfo {
        ifindex: l["ifindex"].as_u64().unwrap_or(0) as u32,
        mtu: l["mtu"].as_u64().unwrap_or(0) as u32,
        mac: l["address"].as_str().unwrap_or("").to_string(),
        master: l["master"].as_str().map(str::to_string),
        up: l["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        rx_packets: stat("rx"),
        tx_packets: stat("tx"),
    })
}

/// ICMP errors the namespace sent that tell a sender its packet was too big: IPv4
/// "destination unreachable" (all codes, among them "fragmentation needed") plus ICMPv6
/// "packet too big". A node whose pods' MTU exceeds its overlay's sends them.
pub fn icmp_too_big_sent(ns: &Netns) -> anyhow::Result<u64> {
    let (snmp, snmp6) = ns.run(|| {
        // /proc/thread-self/net: the namespace of this thread, not of the process.
        let r = |f| std::fs::read_to_string(format!("/proc/thread-self/net/{f}"));
        (r("snmp"), r("snmp6"))
    });
    let (snmp, snmp6) = (snmp?, snmp6?);
    let mut lines = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
    let v4 = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "OutDestUnreachs")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .unwrap_or(0);
    let v6 = snmp6
        .lines()
        .filter_map(|l| l.split_once(char::is_whitespace))
        .find(|(n, _)| *n == "Icmp6OutPktTooBigs")
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(v4 + v6)
}

/// Runs `program args…` inside `ns` (entered with `setns`), failing with its stderr.
pub fn run(ns: &Netns, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = ns
        .command(program)?
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("running {program} (is iproute2 installed?): {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_parses_back_from_its_name() {
        for l in Layout::MATRIX {
            assert_eq!(Layout::parse(&l.name()), Some(l), "{}", l.name());
        }
        assert_eq!(Layout::parse("kindnet"), Some(Layout::PTP));
        assert_eq!(Layout::parse("ipip"), Some(Layout::CALICO_IPIP));
        assert_eq!(Layout::parse("ptp+ipip"), None);
        assert_eq!(Layout::parse("nonsense"), None);
    }
}
