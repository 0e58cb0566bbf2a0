//! ztunnel beside the CNI, on every testbed layout: routed pods, pods on a bridge, nodes
//! joined directly or by a VXLAN overlay, and a "CNI" with programs of its own (legacy tc
//! filters and a TCX program). Enrolled TCP goes through ztunnel and fails closed without
//! it; everything ztunnel does not take is treated as on a node without ztunnel; a clean
//! stop leaves the CNI's programs and filters as they were.
//!
//! Runs in both attachment modes: `TC_ATTACH=legacy` (set by `cargo xtask test` for its
//! second pass) makes every ztunnel use legacy tc filters instead of TCX links.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use ztunnel_tests::cni::{
    tc_filters, tcx_programs, tcx_supported, FilterAction, Hook, Position, TcxCounter, U32Filter,
    U32Match, TCP, UDP,
};
use ztunnel_tests::layout::icmp_too_big_sent;
use ztunnel_tests::sniffer::{self, Capture, Sniffer};
use ztunnel_tests::traffic::{self, connect, echo_round_trip, EchoServer};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Interconnect, Layout, Netns, Node, Pod, Testbed};

const T: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(1500);
const PROGRAM: &str = "zt_capture";

fn legacy() -> bool {
    std::env::var("TC_ATTACH").as_deref() == Ok("legacy")
}

/// Node a: `client` and `neighbour` in the mesh, `plain` outside it; node b: `server` in
/// the mesh and `outside` outside it; echo servers on 8080 everywhere but `client`.
struct Cluster {
    tb: Testbed,
    a: Node,
    b: Node,
    client: Pod,
    neighbour: Pod,
    plain: Pod,
    server: Pod,
    outside: Pod,
    /// Echo servers of `neighbour`, `plain`, `server`, `outside`, in that order.
    servers: Vec<EchoServer>,
    config: std::path::PathBuf,
}

fn cluster(layout: Layout, extra_yaml: &str) -> Cluster {
    let mut tb = Testbed::with_layout(layout).unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let neighbour = tb.add_pod(&a, "neighbour").unwrap();
    let plain = tb.add_pod(&a, "plain").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let outside = tb.add_pod(&b, "outside").unwrap();
    let echoes = [&neighbour, &plain, &server, &outside]
        .iter()
        .map(|p| EchoServer::start(&p.netns, 8080).unwrap())
        .collect();
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&client, "default", "client"),
            WorkloadSpec::mesh(&neighbour, "default", "neighbour"),
            WorkloadSpec::plain(&plain, "default"),
            WorkloadSpec::mesh(&server, "default", "server"),
            WorkloadSpec::plain(&outside, "default"),
        ],
        extra_yaml,
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    Cluster {
        tb,
        a,
        b,
        client,
        neighbour,
        plain,
        server,
        outside,
        servers: echoes,
        config,
    }
}

impl Cluster {
    fn start(&self, node: &Node) -> Ztunnel {
        self.start_with(node, &[])
    }

    /// Starts ztunnel and waits until this run enrolled every mesh pod of the node (two
    /// on a, one on b).
    fn start_with(&self, node: &Node, extra: &[&str]) -> Ztunnel {
        let log = self.tb.dir().join(format!("ztunnel-{}.log", node.name));
        let from = std::fs::metadata(&log)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let z = self.tb.start_ztunnel(node, &self.config, extra).unwrap();
        let want = if node.name == self.a.name { 2 } else { 1 };
        ztunnel_tests::traffic::eventually("pods enrolled", T * 2, || {
            let text = z.log_text();
            text.get(from..)
                .unwrap_or("")
                .matches("workload enrolled")
                .count()
                >= want
        });
        z
    }
}

fn echoes(from: &Pod, to: SocketAddr, msg: &[u8]) -> bool {
    match connect(&from.netns, to, SHORT) {
        Ok(mut s) => echo_round_trip(&mut s, msg).ok().as_deref() == Some(msg),
        Err(_) => false,
    }
}

fn carrier(tb: &Testbed) -> &'static str {
    sniffer::carrier(tb.layout())
}

/// What the nodes' pods sent each other, from a capture on [`carrier`] (under IPIP there
/// must have been tunnelled packets to read).
fn on_the_carrier(tb: &Testbed, cap: Capture) -> Capture {
    if tb.layout().tunnel().is_some() {
        assert!(cap.ipip() > 0, "nothing went through the tunnel");
    }
    cap.pod_traffic(tb.layout())
}

/// Enrolled pods' TCP through ztunnel on `layout`: HBONE between the nodes (over the
/// overlay if there is one, full-size segments included), captured on the same node
/// (also between two pods of one bridge), failing closed when ztunnel is killed.
fn mesh_on(layout: Layout) {
    let c = cluster(layout, "");
    let (za, _zb) = (c.start(&c.a), c.start(&c.b));
    assert_roles(&c, layout);
    let sniff = Sniffer::start(&c.a.netns, carrier(&c.tb)).unwrap();
    let secret = b"cni-layout-secret-0123456789";
    for v6 in [false, true] {
        let dst = SocketAddr::new(c.server.addr(v6), 8080);
        assert!(
            echoes(&c.client, dst, secret),
            "{}: mesh v6={v6}",
            layout.name()
        );
    }
    // 2 MiB each way: on an overlay, segments of the full MTU must get through, and
    // without the nodes having to tell anyone the packet was too big (path MTU discovery
    // would hide a wrong MTU, at the cost of a stall and a retransmission).
    let too_big = || [&c.a, &c.b].map(|n| icmp_too_big_sent(&n.netns).unwrap());
    let before = too_big();
    let big: Vec<u8> = (0..2 << 20).map(|i| (i % 251) as u8).collect();
    let mut s = connect(
        &c.client.netns,
        SocketAddr::new(c.server.ip.into(), 8080),
        T,
    )
    .unwrap();
    assert_eq!(
        echo_round_trip(&mut s, &big).unwrap(),
        big,
        "{}",
        layout.name()
    );
    drop(s);
    assert_eq!(
        too_big(),
        before,
        "{}: a node sent packet-too-big",
        layout.name()
    );
    std::thread::sleep(Duration::from_millis(200));
    let cap = on_the_carrier(&c.tb, sniff.finish());
    assert!(
        !cap.contains_plaintext(secret),
        "{}: plaintext on the wire",
        layout.name()
    );
    assert!(
        cap.ports_with_payload().contains(&15008),
        "{}: no HBONE on {}",
        layout.name(),
        carrier(&c.tb)
    );
    assert!(
        !cap.ports_with_payload().contains(&8080),
        "{}",
        layout.name()
    );

    // Same node, also two pods on one bridge: captured, both identities logged.
    let dst = SocketAddr::new(c.neighbour.ip.into(), 8080);
    assert!(
        echoes(&c.client, dst, b"next door"),
        "{}: same node",
        layout.name()
    );
    let line = za
        .wait_for_line(&["connection complete", "sa/neighbour"], T)
        .unwrap_or_else(|e| panic!("{}: same-node connection not proxied: {e}", layout.name()));
    assert!(
        line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/client\""),
        "{line}"
    );
    // Unenrolled pods still reach each other and the mesh pods' neighbours directly.
    assert!(echoes(
        &c.plain,
        SocketAddr::new(c.outside.ip.into(), 8080),
        b"plain"
    ));

    // kill -9: nothing of the enrolled pods leaves, cross-node or next door.
    c.tb.kill(za.pid);
    for dst in [c.server.ip, c.neighbour.ip] {
        assert!(
            !echoes(&c.client, SocketAddr::new(dst.into(), 8080), b"x"),
            "{}: {dst} reached without ztunnel",
            layout.name()
        );
    }
    assert!(echoes(
        &c.plain,
        SocketAddr::new(c.outside.ip.into(), 8080),
        b"still plain"
    ));
    // A new ztunnel adopts the capture left in place.
    let _za = c.start(&c.a);
    assert!(echoes(
        &c.client,
        SocketAddr::new(c.server.ip.into(), 8080),
        b"back"
    ));
}

/// What the host side carries does not decide: the enrolled pods' veths are pods'
/// interfaces (ptp: with the gateway address on them), the uplink (its peer in the
/// testbed's switch, as kind's is in the host) is the node's.
fn assert_roles(c: &Cluster, layout: Layout) {
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let v: serde_json::Value = serde_json::from_str(
        &ztunnel_tests::http::get(&c.a.netns, admin, "/debug/capture")
            .unwrap()
            .1,
    )
    .unwrap();
    let role = |name: &str| {
        v["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .map(|i| {
                (
                    i["role"].as_str().unwrap_or("").to_string(),
                    i["attached"] == true,
                )
            })
    };
    for p in [&c.client, &c.neighbour] {
        assert_eq!(
            role(&p.host_if),
            Some(("pod".to_string(), true)),
            "{}: {}",
            layout.name(),
            p.host_if
        );
    }
    assert_eq!(role(layout.uplink()), Some(("node".to_string(), true)));
    assert!(v["pendingPods"].as_object().unwrap().is_empty(), "{v}");
}

#[test]
fn mesh_on_routed_pods() {
    require_root!();
    mesh_on(Layout::ROUTED);
}

/// The reference `ptp` plugin (kindnet, GKE): the pods' `/24` gateway on every host veth.
#[test]
fn mesh_on_ptp_pods() {
    require_root!();
    mesh_on(Layout::PTP);
}

/// The same with one `/32` repeated on every host veth, as kindnet has it.
#[test]
fn mesh_on_ptp_pods_with_a_repeated_gateway() {
    require_root!();
    mesh_on(Layout::PTP_32);
}

#[test]
fn mesh_on_a_bridge() {
    require_root!();
    mesh_on(Layout::BRIDGE);
}

#[test]
fn mesh_on_routed_pods_over_vxlan() {
    require_root!();
    mesh_on(Layout::ROUTED_VXLAN);
}

#[test]
fn mesh_on_flannel_bridge_and_vxlan() {
    require_root!();
    mesh_on(Layout::FLANNEL);
}

/// Calico IPIP: cross-node traffic arrives on `tunl0`, an L3 device whose packets have no
/// Ethernet header; HBONE to the server's node must be captured there.
#[test]
fn mesh_on_calico_ipip() {
    require_root!();
    mesh_on(Layout::CALICO_IPIP);
}

/// Plaintext from a pod outside the mesh on the other node, to an enrolled pod: captured
/// on arrival (uplink, overlay or tunnel) and put through the destination's policy at
/// 15006, which here admits only the `client` identity. The enrolled pod's server never
/// sees the connection; `client`, next door, still gets through.
fn plaintext_from_another_node_meets_inbound_policy(layout: Layout) {
    let policy = "policies:\n- name: only-client\n  namespace: default\n  scope: Namespace\n  action: Allow\n  \
                  rules:\n  - - - principals: [\"cluster.local/ns/default/sa/client\"]\n";
    let c = cluster(layout, policy);
    let (za, _zb) = (c.start(&c.a), c.start(&c.b));
    let name = layout.name();
    let sniff = Sniffer::start(&c.a.netns, layout.uplink()).unwrap();
    let seen_before = c.servers[0].drain();
    for v6 in [false, true] {
        let dst = SocketAddr::new(c.neighbour.addr(v6), 8080);
        assert!(
            !echoes(&c.outside, dst, b"plaintext from afar"),
            "{name}: plaintext from another node reached {dst} past the policy"
        );
    }
    let line = za
        .wait_for_line(&["denied by policy", "neighbour"], T)
        .unwrap_or_else(|e| panic!("{name}: the plaintext was never put to the policy: {e}"));
    assert!(!line.contains("sa/client"), "{line}");
    let seen: Vec<_> = seen_before
        .into_iter()
        .chain(c.servers[0].drain())
        .filter(|(peer, _)| [c.outside.addr(false), c.outside.addr(true)].contains(&peer.ip()))
        .collect();
    assert!(seen.is_empty(), "{name}: the server accepted {seen:?}");
    // It did come from the other node, over the interconnect.
    let wire = sniff.finish();
    match layout.nodes {
        Interconnect::Ipip => assert!(wire.ipip() > 0, "{name}: not through the tunnel"),
        Interconnect::Vxlan => assert!(wire.udp_to(ztunnel_tests::layout::VXLAN_PORT) > 0),
        Interconnect::Direct => assert!(!wire.tcp().is_empty()),
    }
    // The policy admits the identity it names.
    assert!(
        echoes(
            &c.client,
            SocketAddr::new(c.neighbour.ip.into(), 8080),
            b"allowed"
        ),
        "{name}: client denied"
    );
}

#[test]
fn plaintext_over_the_wire_meets_inbound_policy() {
    require_root!();
    plaintext_from_another_node_meets_inbound_policy(Layout::ROUTED);
}

#[test]
fn plaintext_over_vxlan_to_a_bridge_meets_inbound_policy() {
    require_root!();
    plaintext_from_another_node_meets_inbound_policy(Layout::FLANNEL);
}

/// Over an L3 tunnel (no Ethernet header on `tunl0`): before the program parsed such
/// devices, the plaintext reached the pod past ztunnel.
#[test]
fn plaintext_over_an_ipip_tunnel_meets_inbound_policy() {
    require_root!();
    plaintext_from_another_node_meets_inbound_policy(Layout::CALICO_IPIP);
}

/// Same-node policy on a bridge: the destination's policy sees the source identity.
#[test]
fn policy_applies_between_pods_of_one_bridge() {
    require_root!();
    let policy = "policies:\n- name: only-server\n  namespace: default\n  scope: Namespace\n  action: Allow\n  \
                  rules:\n  - - - principals: [\"cluster.local/ns/default/sa/server\"]\n";
    let c = cluster(Layout::BRIDGE, policy);
    let za = c.start(&c.a);
    let dst = SocketAddr::new(c.neighbour.ip.into(), 8080);
    assert!(
        !echoes(&c.client, dst, b"denied"),
        "policy bypassed on the bridge"
    );
    za.wait_for_line(&["denied by policy", "sa/client", "neighbour"], T)
        .expect("the refused connection is logged with the source identity");
}

/// The identities of the interface's TCX ingress programs, in chain order.
fn tcx_chain(ns: &Netns, dev: &str) -> Vec<String> {
    tcx_programs(ns, dev, Hook::Ingress)
        .unwrap()
        .into_iter()
        .map(|(_, name)| name)
        .collect()
}

/// The CNI's programs and filters keep acting on everything ztunnel does not take, with
/// ztunnel attached in front of them; a clean stop leaves them as they were.
fn cni_keeps_its_rules(layout: Layout) {
    let c = cluster(layout, "");
    let (na, nb) = (c.a.netns.clone(), c.b.netns.clone());
    let up = layout.uplink();
    // The CNI was there first: counters at the tail of the TCX chains (on kernels that
    // have TCX; before 6.6 a CNI has only tc filters), legacy filters at priorities next to
    // ztunnel's (1).
    let tcx = tcx_supported();
    let counter = |dev: &str| {
        tcx.then(|| TcxCounter::attach(&na, dev, Hook::Ingress, Position::Tail).unwrap())
    };
    let (on_client, on_plain, on_uplink) = (
        counter(&c.client.host_if),
        counter(&c.plain.host_if),
        counter(up),
    );
    // A counter's packets of `proto`, or `None` without TCX.
    let count = |c: &Option<TcxCounter>, proto| c.as_ref().map(|c| c.count(proto));
    let udp_drop = U32Filter::install(
        &na,
        &c.client.host_if,
        Hook::Ingress,
        2,
        U32Match::udp_dport(false, 5353),
        FilterAction::Drop,
    )
    .unwrap();
    let excluded_count = U32Filter::install(
        &na,
        &c.client.host_if,
        Hook::Ingress,
        3,
        U32Match::tcp_dport(false, 9999),
        FilterAction::Count,
    )
    .unwrap();
    let firewall = U32Filter::install(
        &na,
        up,
        Hook::Ingress,
        2,
        U32Match::tcp_dport(false, 7777),
        FilterAction::Drop,
    )
    .unwrap();
    let za = c.start_with(&c.a, &["--exclude-ports", "9999"]);
    let _zb = c.start(&c.b);

    // Position: ahead of the CNI.
    for dev in [c.client.host_if.as_str(), up] {
        let chain = if tcx { tcx_chain(&na, dev) } else { vec![] };
        let filters = tc_filters(&na, dev, Hook::Ingress).unwrap();
        if legacy() || !tcx {
            // TCX programs run before any legacy filter; among the filters ours is first.
            assert!(!chain.iter().any(|n| n == PROGRAM), "{dev}: {chain:?}");
            let first = filters.first().expect("filters");
            assert_eq!(first.prio, 1, "{dev}: {filters:?}");
            assert_eq!(first.kind, "bpf", "{dev}: {filters:?}");
        } else {
            assert_eq!(
                chain.first().map(String::as_str),
                Some(PROGRAM),
                "{dev}: {chain:?}"
            );
            assert!(
                chain.len() >= 2,
                "{dev}: the CNI's program is still attached"
            );
        }
    }

    // Captured TCP of the enrolled pod: the mesh takes it. Under TCX the chain ends at
    // ztunnel for those packets (the CNI sees the HBONE flow on the uplink instead).
    let tcp_before = count(&on_client, TCP);
    assert!(echoes(
        &c.client,
        SocketAddr::new(c.server.ip.into(), 8080),
        b"meshed"
    ));
    if let (Some(before), Some(after)) = (tcp_before, count(&on_client, TCP)) {
        if legacy() {
            assert!(after > before, "a TCX program runs before legacy filters");
        } else {
            assert_eq!(after, before, "captured packets went on down the chain");
        }
    }
    za.wait_for_line(&["connection complete", "sa/server"], T)
        .unwrap();

    // An excluded port: not taken, so the CNI's filter and program see it.
    let excluded = EchoServer::start(&c.outside.netns, 9999).unwrap();
    let (hits, tcp) = (excluded_count.hits().unwrap(), count(&on_client, TCP));
    assert!(echoes(
        &c.client,
        SocketAddr::new(c.outside.ip.into(), 9999),
        b"excluded"
    ));
    assert!(
        excluded_count.hits().unwrap() > hits,
        "the CNI's filter missed an excluded port"
    );
    assert!(
        count(&on_client, TCP) > tcp || !tcx,
        "the CNI's program missed an excluded port"
    );
    drop(excluded);

    // UDP of the enrolled pod: the CNI's drop rule still drops it, the counter counts.
    let rx = c.outside.netns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:5353").unwrap();
        s.set_read_timeout(Some(SHORT)).unwrap();
        s
    });
    let rx2 = c.outside.netns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:5354").unwrap();
        s.set_read_timeout(Some(SHORT)).unwrap();
        s
    });
    let (udp_before, drops_before) = (count(&on_client, UDP), udp_drop.hits().unwrap());
    let to = c.outside.ip;
    c.client.netns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"dropped", (to, 5353)).unwrap();
        s.send_to(b"passed", (to, 5354)).unwrap();
    });
    let mut buf = [0u8; 64];
    assert!(
        rx.recv_from(&mut buf).is_err(),
        "the CNI's UDP drop rule stopped acting"
    );
    let n = rx2.recv_from(&mut buf).unwrap().0;
    assert_eq!(&buf[..n], b"passed");
    assert!(count(&on_client, UDP) >= udp_before.map(|n| n + 2));
    assert!(udp_drop.hits().unwrap() > drops_before);

    // An unenrolled pod's TCP: the CNI's program sees it.
    let tcp = count(&on_plain, TCP);
    assert!(echoes(
        &c.plain,
        SocketAddr::new(c.outside.ip.into(), 8080),
        b"plain"
    ));
    assert!(count(&on_plain, TCP) > tcp || !tcx);

    // The node's own traffic on the uplink: the host firewall still drops 7777.
    let _closed = EchoServer::start(&na, 7777).unwrap();
    let _open = EchoServer::start(&na, 7778).unwrap();
    let (uplink_tcp, fw_hits) = (count(&on_uplink, TCP), firewall.hits().unwrap());
    assert!(!traffic::echoes(&nb, SocketAddr::new(c.a.ip.into(), 7777)));
    assert!(traffic::echoes(&nb, SocketAddr::new(c.a.ip.into(), 7778)));
    assert!(firewall.hits().unwrap() > fw_hits);
    assert!(count(&on_uplink, TCP) > uplink_tcp || !tcx);

    // A clean stop removes ztunnel's attachments and nothing else.
    let filters_before: Vec<_> = tc_filters(&na, up, Hook::Ingress)
        .unwrap()
        .into_iter()
        .filter(|f| f.kind != "bpf")
        .collect();
    let status = c.tb.stop(za.pid, Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{}", za.log_text());
    for dev in [c.client.host_if.as_str(), up] {
        if tcx {
            assert_eq!(
                tcx_chain(&na, dev),
                vec!["cni_counter".to_string()],
                "{dev}"
            );
        }
        let filters = tc_filters(&na, dev, Hook::Ingress).unwrap();
        assert!(
            filters.iter().all(|f| f.kind != "bpf"),
            "{dev}: {filters:?}"
        );
    }
    assert_eq!(
        tc_filters(&na, up, Hook::Ingress).unwrap(),
        filters_before,
        "the CNI's filters changed"
    );
    assert!(!traffic::echoes(&nb, SocketAddr::new(c.a.ip.into(), 7777)));
    drop((udp_drop, excluded_count, firewall));
}

#[test]
fn cni_rules_keep_acting_on_routed_pods() {
    require_root!();
    cni_keeps_its_rules(Layout::ROUTED);
}

#[test]
fn cni_rules_keep_acting_on_a_bridge() {
    require_root!();
    cni_keeps_its_rules(Layout::BRIDGE);
}

/// A CNI that attaches at the head after ztunnel (as any later loader may): a restarted
/// ztunnel adopts its link and puts it back in front (TCX); a legacy filter is adopted at
/// its priority and handle, one filter, not two.
#[test]
fn restart_adopts_and_stays_in_front() {
    require_root!();
    let c = cluster(Layout::ROUTED, "");
    let na = c.a.netns.clone();
    let za = c.start(&c.a);
    let _zb = c.start(&c.b);
    let dev = c.client.host_if.clone();
    let tcx = tcx_supported();
    let _late = tcx.then(|| TcxCounter::attach(&na, &dev, Hook::Ingress, Position::Head).unwrap());
    c.tb.kill(za.pid);
    let za = c.start(&c.a);
    za.wait_for_log("adopted", T).unwrap();
    if legacy() || !tcx {
        let ours: Vec<_> = tc_filters(&na, &dev, Hook::Ingress)
            .unwrap()
            .into_iter()
            .filter(|f| f.kind == "bpf")
            .collect();
        assert_eq!(ours.len(), 1, "{ours:?}");
    } else {
        let chain = tcx_chain(&na, &dev);
        assert_eq!(chain, vec![PROGRAM.to_string(), "cni_counter".into()]);
    }
    assert!(echoes(
        &c.client,
        SocketAddr::new(c.server.ip.into(), 8080),
        b"adopted"
    ));
}
