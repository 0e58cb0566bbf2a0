//! The testbed's network layouts and the fake CNI's programs, on their own (no ztunnel):
//! pods reach each other in every layout, over IPv4 and IPv6, on one node and across
//! nodes, with full-size segments; the overlay hides pod traffic from the wire; the
//! fake CNI's filters and TCX counter do what they say and leave nothing behind.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use ztunnel_tests::cni::{
    self, FilterAction, Hook, Position, TcxCounter, U32Filter, U32Match, ICMP, ICMPV6, TCP, UDP,
};
use ztunnel_tests::firewall;
use ztunnel_tests::layout::{self, VXLAN_PORT};
use ztunnel_tests::sniffer::Sniffer;
use ztunnel_tests::traffic::{
    bulk_echo, connect, echo_round_trip, echoes, eventually, ping, EchoServer,
};
use ztunnel_tests::{require_root, Interconnect, Layout, Node, Pod, Testbed};

const T: Duration = Duration::from_secs(5);

struct Bed {
    tb: Testbed,
    a: Node,
    b: Node,
    /// `client` and `near` on node a, `far` on node b.
    client: Pod,
    near: Pod,
    far: Pod,
    _near_echo: EchoServer,
    far_echo: EchoServer,
}

/// Two nodes; `client` and `near` on node a, `far` on node b; echo servers on 8080 in
/// `near` and `far`.
fn bed(layout: Layout) -> Bed {
    let mut tb = Testbed::with_layout(layout).unwrap();
    let a = tb.add_node("a").unwrap();
    let b = tb.add_node("b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let near = tb.add_pod(&a, "near").unwrap();
    let far = tb.add_pod(&b, "far").unwrap();
    let near_echo = EchoServer::start(&near.netns, 8080).unwrap();
    let far_echo = EchoServer::start(&far.netns, 8080).unwrap();
    Bed {
        tb,
        a,
        b,
        client,
        near,
        far,
        _near_echo: near_echo,
        far_echo,
    }
}

/// Echoes `msg` from `from` to `to:8080`, returning what came back.
fn round_trip(from: &Pod, to: &Pod, v6: bool, msg: &[u8]) -> Vec<u8> {
    let dst = SocketAddr::new(to.addr(v6), 8080);
    let mut s = connect(&from.netns, dst, T).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
    echo_round_trip(&mut s, msg).unwrap_or_else(|e| panic!("echo via {dst}: {e}"))
}

/// Sends 4 MiB to `to:8080` while reading the echo back.
fn bulk(from: &Pod, to: &Pod, v6: bool) {
    let dst = SocketAddr::new(to.addr(v6), 8080);
    bulk_echo(&from.netns, dst, 4 << 20, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("4 MiB via {dst}: {e}"));
}

fn check_layout(layout: Layout) -> Bed {
    let bed = bed(layout);
    let name = layout.name();
    assert_eq!(bed.tb.layout(), layout);

    // Devices as the layout says.
    for n in [&bed.a, &bed.b] {
        assert_eq!(n.uplink(), "eth0");
        assert!(layout::link(&n.netns, n.uplink()).unwrap().up);
        assert_eq!(n.bridge().is_some(), layout.bridge().is_some());
        if let Some(br) = n.bridge() {
            let l = layout::link(&n.netns, br).unwrap();
            assert!(l.up, "{name}: {br} up");
            assert_eq!(
                l.mac,
                layout::bridge_mac(n.index),
                "kept as ports were added"
            );
            assert_eq!(l.mtu, layout.pod_mtu());
            // As on a kubeadm node: bridged frames go through iptables and conntrack.
            for key in firewall::BR_NF_SYSCTLS {
                let path = format!("/proc/sys/{}", key.replace('.', "/"));
                let v = n.netns.run(move || std::fs::read_to_string(path));
                assert_eq!(v.unwrap().trim(), "1", "{name}: {key}");
            }
            let rules = firewall::ruleset(&n.netns).unwrap();
            assert!(rules.contains("policy drop"), "{name}: {rules}");
            assert!(rules.contains("ct state established,related"), "{name}");
        }
        if let Some(vx) = n.vxlan() {
            let l = layout::link(&n.netns, vx).unwrap();
            assert_eq!(l.mtu, 1450, "{name}: {vx} MTU (the kernel's default)");
            assert_eq!(l.mac, layout::vxlan_mac(n.index));
        } else {
            assert!(layout::link(&n.netns, "flannel.1").is_err());
        }
        if let Some(tun) = n.tunnel() {
            let l = layout::link(&n.netns, tun).unwrap();
            assert_eq!(l.mtu, 1480, "{name}: {tun} MTU (Calico's IPIP MTU)");
            assert!(l.up);
            assert_eq!(l.mac, "", "{name}: {tun} is an L3 device");
        } else {
            assert!(layout::link(&n.netns, "tunl0").is_err());
        }
    }
    for p in [&bed.client, &bed.near, &bed.far] {
        let node = if p.node == "a" { &bed.a } else { &bed.b };
        let host = layout::link(&node.netns, &p.host_if).unwrap();
        let inside = layout::link(&p.netns, "eth0").unwrap();
        assert_eq!(host.mtu, layout.pod_mtu(), "{name}: {} MTU", p.host_if);
        assert_eq!(inside.mtu, layout.pod_mtu(), "{name}: pod eth0 MTU");
        assert_eq!(host.master.as_deref(), layout.bridge(), "{name}: master");
    }

    // Connectivity, the server seeing the client's own address.
    for v6 in [false, true] {
        for to in [&bed.far, &bed.near] {
            let msg = format!("{name} v6={v6} to {}", to.name);
            assert_eq!(
                round_trip(&bed.client, to, v6, msg.as_bytes()),
                msg.as_bytes()
            );
        }
        let (peer, local) = bed.far_echo.next_accepted(T).unwrap();
        assert_eq!(peer.ip(), bed.client.addr(v6), "{name}: no NAT");
        assert_eq!(local.ip(), bed.far.addr(v6));
    }

    // Bridged frames between pods of one node went through the FORWARD chain (br_netfilter
    // at work), and were accepted by its rules.
    if layout.bridge().is_some() {
        for family in ["ip", "ip6"] {
            let n = firewall::forward_accepted(&bed.a.netns, family).unwrap();
            assert!(n > 0, "{name}: nothing went through {family} FORWARD");
        }
    }

    // What crosses the wire between the nodes.
    let vx_before = n_packets(&bed.a, layout);
    let sniff = Sniffer::start(&bed.a.netns, bed.a.uplink()).unwrap();
    for v6 in [false, true] {
        assert_eq!(
            round_trip(&bed.client, &bed.far, v6, b"on the wire"),
            b"on the wire"
        );
    }
    let cap = sniff.finish();
    let tcp_8080 = cap
        .tcp()
        .iter()
        .filter(|(s, d, _)| *s == 8080 || *d == 8080)
        .count();
    match layout.nodes {
        Interconnect::Vxlan => {
            assert_eq!(cap.tcp().len(), 0, "{name}: plain TCP on the wire");
            assert!(cap.udp_to(VXLAN_PORT) > 0, "{name}: no VXLAN on the wire");
            assert!(
                n_packets(&bed.a, layout) > vx_before,
                "{name}: flannel.1 idle"
            );
            assert!(n_packets(&bed.b, layout) > 0);
        }
        Interconnect::Ipip => {
            assert_eq!(cap.tcp().len(), 0, "{name}: plain TCP on the wire");
            assert!(cap.ipip() > 0, "{name}: no IPIP on the wire");
            let inner = cap.decapsulated();
            assert!(
                inner.contains_plaintext(b"on the wire"),
                "{name}: the pods' TCP inside the tunnel"
            );
            assert_eq!(cap.udp_to(VXLAN_PORT), 0);
        }
        Interconnect::Direct => {
            assert!(tcp_8080 > 0, "{name}: pod TCP not seen on the wire");
            assert_eq!(cap.udp_to(VXLAN_PORT), 0);
            assert_eq!(cap.ipip(), 0);
        }
    }

    // Full-size segments both ways (a black-holed one would stall the transfer), and
    // no node had to tell a pod its packets were too big (path MTU discovery would
    // otherwise hide a pod MTU larger than the overlay's).
    let too_big = |n: &Node| layout::icmp_too_big_sent(&n.netns).unwrap();
    let before = (too_big(&bed.a), too_big(&bed.b));
    for v6 in [false, true] {
        bulk(&bed.client, &bed.far, v6);
        bulk(&bed.far, &bed.near, v6);
        bulk(&bed.client, &bed.near, v6);
    }
    let icmp = |n: &Node| {
        n.netns.run(|| {
            let t = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
            t.lines()
                .filter(|l| l.starts_with("IcmpMsg"))
                .collect::<Vec<_>>()
                .join(" / ")
        })
    };
    assert_eq!(
        (too_big(&bed.a), too_big(&bed.b)),
        before,
        "{name}: ICMP too big (node a: {}; node b: {})",
        icmp(&bed.a),
        icmp(&bed.b)
    );

    // Same node: bridged pods talk at layer 2 (the frame carries the client's own MAC);
    // routed ones through the node (the host-side veth's MAC).
    let sniff = Sniffer::start(&bed.near.netns, "eth0").unwrap();
    assert!(echoes(
        &bed.client.netns,
        SocketAddr::new(bed.near.addr(false), 8080)
    ));
    let cap = sniff.finish();
    let client_ip = bed.client.ip.octets();
    let src_macs: Vec<[u8; 6]> = cap
        .frames
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == [0x08, 0x00] && f[26..30] == client_ip)
        .map(|f| f[6..12].try_into().unwrap())
        .collect();
    assert!(
        !src_macs.is_empty(),
        "{name}: nothing from the client reached near"
    );
    let expected = match layout.bridge() {
        Some(_) => layout::link(&bed.client.netns, "eth0").unwrap().mac,
        None => layout::link(&bed.a.netns, &bed.near.host_if).unwrap().mac,
    };
    for m in src_macs {
        assert_eq!(mac(&m), expected, "{name}: source MAC of same-node frames");
    }
    bed
}

fn mac(b: &[u8; 6]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Packets through the node's VXLAN device (0 without one).
fn n_packets(node: &Node, layout: Layout) -> u64 {
    layout.vxlan().map_or(0, |vx| {
        let l = layout::link(&node.netns, vx).unwrap();
        l.rx_packets + l.tx_packets
    })
}

#[test]
fn routed_direct() {
    require_root!();
    let _ = check_layout(Layout::ROUTED);
}

#[test]
fn bridge_direct() {
    require_root!();
    let _ = check_layout(Layout::BRIDGE);
}

/// The reference `ptp` plugin: every host veth carries the pods' gateway as a global
/// address of the node (a `/24`, or the same `/32` on every veth).
#[test]
fn ptp_direct() {
    require_root!();
    check_ptp(Layout::PTP, "10.1.0.1/24");
}

#[test]
fn ptp32_direct() {
    require_root!();
    check_ptp(Layout::PTP_32, "10.1.0.1/32");
}

fn check_ptp(layout: Layout, gateway: &str) {
    let bed = check_layout(layout);
    for p in [&bed.client, &bed.near] {
        let addrs = layout::run(
            &bed.a.netns,
            "ip",
            &["-4", "-o", "addr", "show", "dev", &p.host_if],
        )
        .unwrap();
        assert!(addrs.contains(gateway), "{}: {addrs}", p.host_if);
    }
    assert_eq!(bed.client.gateway(false).to_string(), "10.1.0.1");
}

#[test]
fn routed_vxlan() {
    require_root!();
    let _ = check_layout(Layout::ROUTED_VXLAN);
}

#[test]
fn bridge_vxlan() {
    require_root!();
    let _ = check_layout(Layout::FLANNEL);
}

#[test]
fn routed_ipip() {
    require_root!();
    check_layout(Layout::CALICO_IPIP);
}

#[test]
fn default_layout_is_routed_direct() {
    require_root!();
    let mut tb = Testbed::with_layout(Layout::default()).unwrap();
    assert_eq!(tb.layout(), Layout::ROUTED);
    let a = tb.add_node("a").unwrap();
    let p = tb.add_pod(&a, "p").unwrap();
    assert_eq!(p.host_if, "p2");
    assert_eq!(p.ip.to_string(), "10.1.0.2");
    assert_eq!(p.ip6.to_string(), "fd00:1::2");
    assert_eq!(p.gateway(false).to_string(), "169.254.1.1");
    assert_eq!(p.gateway(true).to_string(), "fe80::1");
    assert_eq!((a.bridge(), a.vxlan()), (None, None));
}

/// The drop filter on node b's uplink blocks the matching connection only, counts what
/// it dropped, is listed, and takes its qdisc with it when removed.
#[test]
fn u32_drop_filter_blocks_only_what_it_matches() {
    require_root!();
    let bed = bed(Layout::ROUTED);
    let _other = EchoServer::start(&bed.far.netns, 8081).unwrap();
    let (ns, dev) = (&bed.b.netns, bed.b.uplink());
    let to = |port, v6| SocketAddr::new(bed.far.addr(v6), port);
    assert!(echoes(&bed.client.netns, to(8080, false)));

    let drop4 = ingress_filter(
        ns,
        dev,
        10,
        U32Match::tcp_dport(false, 8080),
        FilterAction::Drop,
    )
    .unwrap();
    assert!(drop4.added_qdisc());
    assert!(cni::has_clsact(ns, dev).unwrap());
    let listed = cni::tc_filters(ns, dev, Hook::Ingress).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].prio, listed[0].kind.as_str()), (10, "u32"));
    assert_eq!(listed[0].protocol, "ip");
    assert_eq!(listed[0].name, Some(format!("mirred:{}", drop4.sink())));
    // The priority is the filter's own.
    assert!(ingress_filter(
        ns,
        dev,
        10,
        U32Match::tcp_dport(true, 8080),
        FilterAction::Drop
    )
    .is_err());

    let blocked = connect(&bed.client.netns, to(8080, false), Duration::from_secs(1));
    assert!(blocked.is_err(), "TCP 8080 over IPv4 must be dropped");
    assert!(drop4.hits().unwrap() >= 1);
    assert!(echoes(&bed.client.netns, to(8081, false)), "other port");
    assert!(
        echoes(&bed.client.netns, to(8080, true)),
        "IPv6 is not matched"
    );

    let drop6 = ingress_filter(
        ns,
        dev,
        11,
        U32Match::tcp_dport(true, 8080),
        FilterAction::Drop,
    )
    .unwrap();
    assert!(!drop6.added_qdisc());
    assert!(connect(&bed.client.netns, to(8080, true), Duration::from_secs(1)).is_err());
    assert!(drop6.hits().unwrap() >= 1);
    assert!(echoes(&bed.client.netns, to(8081, true)));

    // The first filter goes; the qdisc stays for the second.
    drop4.remove().unwrap();
    assert!(echoes(&bed.client.netns, to(8080, false)));
    assert!(cni::has_clsact(ns, dev).unwrap());
    let listed = cni::tc_filters(ns, dev, Hook::Ingress).unwrap();
    assert_eq!(listed.iter().map(|f| f.prio).collect::<Vec<_>>(), [11]);
    drop(drop6);
    assert!(echoes(&bed.client.netns, to(8080, true)));
    assert!(cni::tc_filters(ns, dev, Hook::Ingress).unwrap().is_empty());
    assert!(
        !cni::has_clsact(ns, dev).unwrap(),
        "the qdisc we added is gone"
    );
    assert!(!sinks_left(ns), "the sinks are gone");
}

fn ingress_filter(
    ns: &std::sync::Arc<ztunnel_tests::Netns>,
    dev: &str,
    prio: u16,
    m: U32Match,
    action: FilterAction,
) -> anyhow::Result<U32Filter> {
    U32Filter::install(ns, dev, Hook::Ingress, prio, m, action)
}

fn sinks_left(ns: &ztunnel_tests::Netns) -> bool {
    layout::run(ns, "ip", &["-o", "link", "show"])
        .unwrap()
        .contains("ztsink")
}

/// A counting filter on a pod's host-side veth (the pod's egress) counts and passes;
/// a `clsact` that was already there stays after removal.
#[test]
fn u32_count_filter_counts_and_passes() {
    require_root!();
    let bed = bed(Layout::BRIDGE);
    let (ns, dev) = (&bed.a.netns, bed.client.host_if.as_str());
    layout::run(ns, "tc", &["qdisc", "add", "dev", dev, "clsact"]).unwrap();
    let count = ingress_filter(
        ns,
        dev,
        5,
        U32Match::tcp_dport(false, 8080),
        FilterAction::Count,
    )
    .unwrap();
    assert!(!count.added_qdisc());
    for to in [&bed.far, &bed.near] {
        assert_eq!(round_trip(&bed.client, to, false, b"counted"), b"counted");
    }
    assert!(
        count.hits().unwrap() >= 6,
        "SYN, data, FIN, … of two connections"
    );
    drop(count);
    assert!(cni::tc_filters(ns, dev, Hook::Ingress).unwrap().is_empty());
    assert!(cni::has_clsact(ns, dev).unwrap(), "not ours to remove");
    assert!(!sinks_left(ns));
}

/// The TCX counter on node b's uplink sees TCP, UDP and ICMP by protocol, passes them
/// on, is listed at TCX ingress, and leaves nothing when dropped.
#[test]
fn tcx_counter_counts_by_protocol() {
    require_root!();
    let bed = bed(Layout::ROUTED);
    let (ns, dev) = (&bed.b.netns, bed.b.uplink());
    let c = TcxCounter::attach(ns, dev, Hook::Ingress, Position::Tail).unwrap();
    assert_eq!(
        cni::tcx_prog_ids(ns, dev, Hook::Ingress).unwrap(),
        [c.prog_id()]
    );
    assert_eq!(
        cni::tcx_programs(ns, dev, Hook::Ingress).unwrap(),
        [(c.prog_id(), cni::COUNTER_NAME.to_string())]
    );
    assert_eq!(c.ifindex(), cni::ifindex(ns, dev).unwrap());

    let tcp0 = c.count(TCP);
    for v6 in [false, true] {
        assert_eq!(round_trip(&bed.client, &bed.far, v6, b"tcp"), b"tcp");
    }
    assert!(c.count(TCP) >= tcp0 + 6, "TCP: {}", c.count(TCP));

    let server = bed.far.netns.run(|| UdpSocket::bind(("::", 5353))).unwrap();
    server.set_read_timeout(Some(T)).unwrap();
    let udp0 = c.count(UDP);
    let far4 = SocketAddr::new(bed.far.addr(false), 5353);
    let far6 = SocketAddr::new(bed.far.addr(true), 5353);
    bed.client.netns.run(move || {
        let s = UdpSocket::bind(("::", 0)).unwrap();
        for _ in 0..5 {
            s.send_to(b"udp", far4).unwrap();
            s.send_to(b"udp", far6).unwrap();
        }
    });
    let mut buf = [0u8; 16];
    for _ in 0..10 {
        server.recv_from(&mut buf).expect("UDP datagram passed on");
    }
    assert!(c.count(UDP) >= udp0 + 10, "UDP: {}", c.count(UDP));

    let (icmp0, icmp60) = (c.count(ICMP), c.count(ICMPV6));
    assert!(ping(&bed.client.netns, bed.far.addr(false), T).unwrap());
    assert!(ping(&bed.client.netns, bed.far.addr(true), T).unwrap());
    assert!(c.count(ICMP) > icmp0, "ICMP");
    assert!(c.count(ICMPV6) > icmp60, "ICMPv6");

    drop(c);
    // Detached once every copy of the link's fd is closed: a process another test thread
    // is spawning holds one from its fork until its exec.
    eventually("the counter detached", T, || {
        cni::tcx_prog_ids(ns, dev, Hook::Ingress)
            .unwrap()
            .is_empty()
    });
    assert!(echoes(
        &bed.client.netns,
        SocketAddr::new(bed.far.addr(false), 8080)
    ));
}

/// Chain order: head, tail, before/after a program; every counter sees every packet
/// (each returns TCX_NEXT); egress works too.
#[test]
fn tcx_chain_order_and_neutral_verdict() {
    require_root!();
    let bed = bed(Layout::BRIDGE);
    let (ns, dev) = (&bed.a.netns, bed.client.host_if.as_str());
    let first = TcxCounter::attach(ns, dev, Hook::Ingress, Position::Tail).unwrap();
    let head = TcxCounter::attach(ns, dev, Hook::Ingress, Position::Head).unwrap();
    let tail = TcxCounter::attach(ns, dev, Hook::Ingress, Position::Tail).unwrap();
    let after =
        TcxCounter::attach(ns, dev, Hook::Ingress, Position::After(head.prog_id())).unwrap();
    let before =
        TcxCounter::attach(ns, dev, Hook::Ingress, Position::Before(tail.prog_id())).unwrap();
    let egress = TcxCounter::attach(ns, dev, Hook::Egress, Position::Head).unwrap();
    let ids = |h| cni::tcx_prog_ids(ns, dev, h).unwrap();
    let order: Vec<u32> = [&head, &after, &first, &before, &tail]
        .iter()
        .map(|c| c.prog_id())
        .collect();
    assert_eq!(ids(Hook::Ingress), order);
    assert_eq!(ids(Hook::Egress), [egress.prog_id()]);

    for v6 in [false, true] {
        assert_eq!(round_trip(&bed.client, &bed.far, v6, b"chain"), b"chain");
        assert_eq!(round_trip(&bed.client, &bed.near, v6, b"chain"), b"chain");
    }
    // Every program in the chain ran for every packet (the last ACKs may still be on
    // their way when the echo returns).
    eventually("every counter saw every packet", T, || {
        let n = head.count(TCP);
        n >= 12
            && [&after, &first, &before, &tail]
                .iter()
                .all(|c| c.count(TCP) == n)
    });
    assert!(egress.count(TCP) >= 12, "replies towards the pod");

    // A link goes when its last file descriptor closes. A process another test forks
    // holds a copy of every descriptor until it execs (they are close-on-exec), so the
    // detach is awaited, not assumed immediate.
    drop(head);
    eventually("the head's link gone", T, || {
        ids(Hook::Ingress) == order[1..]
    });
    drop((after, first, before, tail, egress));
    eventually("every link gone", T, || {
        ids(Hook::Ingress).is_empty() && ids(Hook::Egress).is_empty()
    });
}

/// Under VXLAN the uplink sees only the overlay's UDP, the VXLAN device the pods' TCP.
#[test]
fn tcx_counters_on_the_overlay() {
    require_root!();
    let bed = bed(Layout::FLANNEL);
    let ns = &bed.b.netns;
    let wire = TcxCounter::attach(ns, bed.b.uplink(), Hook::Ingress, Position::Head).unwrap();
    let overlay =
        TcxCounter::attach(ns, bed.b.vxlan().unwrap(), Hook::Ingress, Position::Head).unwrap();
    let bridge = TcxCounter::attach(ns, &bed.far.host_if, Hook::Egress, Position::Head).unwrap();
    for v6 in [false, true] {
        assert_eq!(
            round_trip(&bed.client, &bed.far, v6, b"overlay"),
            b"overlay"
        );
    }
    assert_eq!(wire.count(TCP), 0);
    assert!(wire.count(UDP) >= 6);
    assert!(overlay.count(TCP) >= 6);
    assert!(bridge.count(TCP) >= 6, "towards the pod through cni0");
}
