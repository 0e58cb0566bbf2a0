//! Enrollment under attack and failure, on the `ptp` layout (the pods' gateway address on
//! every host-side veth, as kindnet and GKE have it):
//! - one address, one pod: a pod that adds an enrolled pod's address to its own interface
//!   changes nothing for the owner; its packets with that address are dropped; the conflict
//!   is visible (`/debug/capture`, `ztunnel debug capture`, metrics, the log);
//! - never open: a pod this node should enroll but cannot (here: its address is held by two
//!   namespaces before ztunnel starts, so no owner is known) is reported (readiness, debug,
//!   metric, log) and nothing of it moves: the servers never see a byte, in either
//!   direction, until it can be enrolled.
//!
//! Runs in both attachment modes (`TC_ATTACH=legacy`, as `cargo xtask test` sets it for its
//! second pass).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use ztunnel_tests::sniffer::Sniffer;
use ztunnel_tests::traffic::{connect, echo_round_trip, eventually, EchoServer};
use ztunnel_tests::ztunnel::{binary, capture_counter, local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{layout, require_root, Layout, Node, Pod, Testbed};

const T: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(1500);

fn admin(node: &Node, port: u16, path: &str) -> (u16, String) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    ztunnel_tests::http::get(&node.netns, addr, path).unwrap()
}

fn debug_capture(node: &Node) -> Value {
    serde_json::from_str(&admin(node, 15000, "/debug/capture").1).unwrap()
}

/// A metric's value from 15020 (0 if absent).
fn metric(node: &Node, name: &str) -> f64 {
    let text = admin(node, 15020, "/metrics").1;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// `ztunnel debug capture` run in the node, as an operator would.
fn debug_cli(node: &Node) -> String {
    let out = node
        .netns
        .command(binary())
        .unwrap()
        .args(["debug", "capture"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn echoes(from: &Pod, to: SocketAddr, msg: &[u8]) -> bool {
    match connect(&from.netns, to, SHORT) {
        Ok(mut s) => echo_round_trip(&mut s, msg).ok().as_deref() == Some(msg),
        Err(_) => false,
    }
}

/// Connects from `from` with `source` as its address (one it does not own, or holds
/// under dispute); true if the connection was established.
fn connect_from(from: &Pod, source: IpAddr, dst: SocketAddr) -> bool {
    from.netns
        .run(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&SocketAddr::new(source, 0).into())?;
            s.connect_timeout(&dst.into(), SHORT)
        })
        .is_ok()
}

/// Frames on a capture whose IPv4 source is `ip`.
fn frames_from(cap: &ztunnel_tests::sniffer::Capture, ip: std::net::Ipv4Addr) -> usize {
    cap.frames
        .iter()
        .filter(|f| f.len() > 34 && f[12..14] == [0x08, 0x00] && f[26..30] == ip.octets())
        .count()
}

fn start(tb: &Testbed, node: &Node, config: &std::path::Path) -> Ztunnel {
    tb.start_ztunnel(node, config, &[]).unwrap()
}

/// Two nodes in `layout`: on node a the victim and the claimant (both enrolled, echo on
/// 8080 in the victim), on node b an enrolled echo server; both ztunnels ready.
struct ClaimBed {
    tb: Testbed,
    a: Node,
    victim: Pod,
    claimant: Pod,
    server: Pod,
    server_echo: EchoServer,
    _victim_echo: EchoServer,
    za: Ztunnel,
    _zb: Ztunnel,
}

fn claim_bed(layout: Layout) -> ClaimBed {
    let mut tb = Testbed::with_layout(layout).unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let victim = tb.add_pod(&a, "victim").unwrap();
    let claimant = tb.add_pod(&a, "claimant").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let server_echo = EchoServer::start(&server.netns, 8080).unwrap();
    let victim_echo = EchoServer::start(&victim.netns, 8080).unwrap();
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&victim, "default", "victim"),
            WorkloadSpec::mesh(&claimant, "default", "claimant"),
            WorkloadSpec::mesh(&server, "default", "server"),
        ],
        "",
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    let za = start(&tb, &a, &config);
    let zb = start(&tb, &b, &config);
    eventually("ready", T * 4, || {
        admin(&a, 15021, "/healthz/ready").0 == 200
    });
    ClaimBed {
        tb,
        a,
        victim,
        claimant,
        server,
        server_echo,
        _victim_echo: victim_echo,
        za,
        _zb: zb,
    }
}

/// A pod with NET_ADMIN adds an enrolled neighbour's address to its own interface. The
/// owner keeps it; the claim is refused, reported and counted; the claimant's packets
/// with the address are dropped as spoofed; the owner's connections, both ways, go on.
#[test]
fn a_pod_claiming_an_enrolled_address_changes_nothing_for_its_owner() {
    require_root!();
    // Every field bound (`_name` keeps it alive): the testbed, the ztunnels and the
    // echo servers live until the end of the test.
    let ClaimBed {
        tb: _tb,
        a,
        victim,
        claimant,
        server,
        server_echo,
        _victim_echo,
        za,
        _zb,
    } = claim_bed(Layout::PTP);
    let to_server = SocketAddr::new(server.ip.into(), 8080);
    assert!(echoes(&victim, to_server, b"before"));

    // The claim.
    claimant
        .netns
        .ip(&["addr", "add", &format!("{}/32", victim.ip), "dev", "eth0"])
        .unwrap();
    let vip = victim.ip.to_string();
    eventually("the conflict reported", T * 2, || {
        debug_capture(&a)["addressConflicts"][&vip].is_object()
    });
    let v = debug_capture(&a);
    let c = &v["addressConflicts"][&vip];
    assert_eq!(c["owner"], victim.host_if.as_str(), "{c}");
    assert_eq!(c["refused"], serde_json::json!([claimant.host_if]), "{c}");
    let victim_if = layout::link(&a.netns, &victim.host_if).unwrap().ifindex;
    let entry = v["enrolled"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["address"] == vip.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["ifindex"], victim_if, "moved: {entry}");
    assert!(v["pendingPods"].as_object().unwrap().is_empty(), "{v}");
    let cli = debug_cli(&a);
    assert!(
        cli.contains(&format!("address conflict: {vip} of ")) && cli.contains(&claimant.host_if),
        "{cli}"
    );
    assert!(metric(&a, "ztunnel_address_claims_refused_total") >= 1.0);
    assert_eq!(metric(&a, "ztunnel_address_conflicts"), 1.0);
    za.wait_for_log("address claimed by another pod's interface", T)
        .unwrap();
    // Still ready: the owner is enrolled, nothing is pending.
    assert_eq!(admin(&a, 15021, "/healthz/ready").0, 200);

    // The claimant's packets with the victim's address: dropped, never at the server.
    server_echo.drain();
    let spoofed_before = capture_counter(&a, &victim, "dropped_spoofed").unwrap();
    let sniff = Sniffer::start(&server.netns, "eth0").unwrap();
    assert!(!connect_from(&claimant, victim.ip.into(), to_server));
    let seen = sniff.finish();
    assert_eq!(
        frames_from(&seen, victim.ip),
        0,
        "the server saw the spoofed SYN"
    );
    assert!(server_echo.drain().is_empty());
    assert!(capture_counter(&a, &victim, "dropped_spoofed").unwrap() > spoofed_before);

    // The owner keeps working, both ways, several passes after the claim.
    for round in 0..3 {
        let msg = format!("victim round {round}");
        assert!(echoes(&victim, to_server, msg.as_bytes()), "{msg}");
        assert!(
            echoes(
                &server,
                SocketAddr::new(victim.ip.into(), 8080),
                msg.as_bytes()
            ),
            "to the victim, {msg}"
        );
    }
    za.wait_for_line(
        &[
            "connection complete",
            "src.identity=\"spiffe://cluster.local/ns/default/sa/victim\"",
        ],
        T,
    )
    .unwrap();
    // The claimant's own address still works for it.
    assert!(echoes(&claimant, to_server, b"claimant's own"));
}

/// A pod this node should enroll but cannot: its address is held by two namespaces when
/// ztunnel starts, so no owner is known. Readiness, `/debug/capture`, the CLI, a metric
/// and the log say so; no byte of it moves either way (the servers' namespaces never see
/// a packet of it); once one namespace alone holds the address it is enrolled and works.
#[test]
fn a_pod_that_cannot_be_enrolled_never_passes_plaintext() {
    require_root!();
    let mut tb = Testbed::with_layout(Layout::PTP).unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let held = tb.add_pod(&a, "held").unwrap();
    let twin = tb.add_pod(&a, "twin").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let outside = tb.add_pod(&b, "outside").unwrap();
    let held_echo = EchoServer::start(&held.netns, 8080).unwrap();
    let server_echo = EchoServer::start(&server.netns, 8080).unwrap();
    let outside_echo = EchoServer::start(&outside.netns, 8080).unwrap();
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&held, "default", "held"),
            WorkloadSpec::plain(&twin, "default"),
            WorkloadSpec::mesh(&server, "default", "server"),
            WorkloadSpec::plain(&outside, "default"),
        ],
        "",
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    // Before any ztunnel: a second namespace holds the pod's address too.
    twin.netns
        .ip(&["addr", "add", &format!("{}/32", held.ip), "dev", "eth0"])
        .unwrap();
    let za = start(&tb, &a, &config);
    let _zb = start(&tb, &b, &config);
    za.wait_for_log("not enrolled, held", T).unwrap();

    // Visible everywhere an operator looks.
    let (code, body) = admin(&a, 15021, "/healthz/ready");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("held: its traffic is dropped") && body.contains("claimed by 2 interfaces"),
        "{body}"
    );
    let v = debug_capture(&a);
    let hip = held.ip.to_string();
    let why = v["pendingPods"].as_object().unwrap();
    assert!(
        why.values().any(|w| w.as_str().unwrap().contains(&hip)),
        "{v}"
    );
    let entry = v["enrolled"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["address"] == hip.as_str())
        .cloned()
        .unwrap();
    assert_eq!(entry["held"], true, "{entry}");
    assert_eq!(v["addressConflicts"][&hip]["owner"], Value::Null);
    let cli = debug_cli(&a);
    assert!(
        cli.contains("not enrolled (held, its traffic dropped)"),
        "{cli}"
    );
    assert_eq!(metric(&a, "ztunnel_workloads_not_enrolled"), 1.0);

    // Nothing leaves: to a mesh pod and to a plain one on the other node, nor from the
    // twin using the address; their interfaces never see a packet from it.
    let sniff_server = Sniffer::start(&server.netns, "eth0").unwrap();
    let sniff_outside = Sniffer::start(&outside.netns, "eth0").unwrap();
    let sniff_wire = Sniffer::start(&a.netns, "eth0").unwrap();
    let secret = b"held-pod-secret-0123456789";
    for dst in [server.ip, outside.ip] {
        assert!(
            !echoes(&held, SocketAddr::new(dst.into(), 8080), secret),
            "{dst}"
        );
    }
    assert!(!connect_from(
        &twin,
        held.ip.into(),
        SocketAddr::new(outside.ip.into(), 8080)
    ));
    let (on_server, on_outside, wire) = (
        sniff_server.finish(),
        sniff_outside.finish(),
        sniff_wire.finish(),
    );
    assert_eq!(
        frames_from(&on_server, held.ip),
        0,
        "the server saw the held pod"
    );
    assert_eq!(
        frames_from(&on_outside, held.ip),
        0,
        "outside saw the held pod"
    );
    assert_eq!(frames_from(&wire, held.ip), 0, "the held pod on the wire");
    assert!(!wire.contains_plaintext(secret), "plaintext on the wire");
    assert!(server_echo.drain().is_empty() && outside_echo.drain().is_empty());

    // Nothing enters: plaintext from a plain pod, HBONE from a mesh pod's ztunnel.
    let sniff_held = Sniffer::start(&held.netns, "eth0").unwrap();
    assert!(!echoes(
        &outside,
        SocketAddr::new(held.ip.into(), 8080),
        secret
    ));
    assert!(!echoes(
        &server,
        SocketAddr::new(held.ip.into(), 8080),
        secret
    ));
    let inside = sniff_held.finish();
    for from in [outside.ip, server.ip, b.ip] {
        assert_eq!(frames_from(&inside, from), 0, "{from} reached the held pod");
    }
    assert!(!inside.contains_plaintext(secret));
    assert!(
        held_echo.drain().is_empty(),
        "the held pod accepted a connection"
    );
    assert!(capture_counter(&a, &held, "dropped_no_proxy").unwrap() > 0);

    // The twin lets go: enrolled, ready, and its traffic goes through ztunnel.
    twin.netns
        .ip(&["addr", "del", &format!("{}/32", held.ip), "dev", "eth0"])
        .unwrap();
    eventually("ready", T * 2, || {
        admin(&a, 15021, "/healthz/ready").0 == 200
    });
    assert!(echoes(
        &held,
        SocketAddr::new(server.ip.into(), 8080),
        b"enrolled now"
    ));
    za.wait_for_line(
        &[
            "connection complete",
            "src.identity=\"spiffe://cluster.local/ns/default/sa/held\"",
        ],
        T,
    )
    .unwrap();
    assert!(echoes(
        &outside,
        SocketAddr::new(held.ip.into(), 8080),
        b"plain in"
    ));
}

/// Sends `frame` out of `ifname` inside the pod, as a pod with CAP_NET_RAW may.
fn send_raw(pod: &Pod, ifname: &str, frame: Vec<u8>) {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    pod.netns.run(move || {
        // SAFETY: plain socket/sendto/close syscalls on buffers we own.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
            sll.sll_halen = 6;
            let n = libc::sendto(
                fd,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                n,
                frame.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
            libc::close(fd);
        }
    });
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// An ARP reply saying `ip` is at `lladdr`, from Ethernet source `src` to `dst`.
fn arp_reply(
    dst: [u8; 6],
    src: [u8; 6],
    lladdr: [u8; 6],
    ip: std::net::Ipv4Addr,
    to: std::net::Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&lladdr);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&to.octets());
    f
}

/// The node's neighbour entry for `ip` on `dev`: (MAC, states).
fn neighbour(node: &Node, dev: &str, ip: &str) -> (String, String) {
    let out = layout::run(&node.netns, "ip", &["-j", "neigh", "show", ip, "dev", dev]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    (
        v[0]["lladdr"].as_str().unwrap_or("").to_string(),
        v[0]["state"].to_string(),
    )
}

/// The bridge port a MAC is forwarded to.
fn fdb_port(node: &Node, mac: &str) -> Option<String> {
    let out = layout::run(&node.netns, "bridge", &["-j", "fdb", "show", "br", "cni0"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()?
        .iter()
        .find(|e| e["mac"] == mac && e["master"] == "cni0")
        .and_then(|e| e["ifname"].as_str().map(str::to_string))
}

/// On a bridge, a claimant that answers ARP for an enrolled pod's address (and sends from
/// its MAC) gains nothing: the node's neighbour entry and the bridge's forwarding entry
/// stay pinned to the owner, whose connections go on both ways.
#[test]
fn on_a_bridge_a_claimant_answering_arp_gains_nothing() {
    require_root!();
    // Every field bound (`_name` keeps it alive): the testbed, the ztunnels and the
    // echo servers live until the end of the test.
    let ClaimBed {
        tb: _tb,
        a,
        victim,
        claimant,
        server,
        server_echo: _server_echo,
        _victim_echo,
        za: _za,
        _zb,
    } = claim_bed(Layout::BRIDGE);
    let victim_mac = layout::link(&victim.netns, "eth0").unwrap().mac;
    let claimant_mac = layout::link(&claimant.netns, "eth0").unwrap().mac;
    let vip = victim.ip.to_string();
    eventually("the victim's MAC pinned", T, || {
        neighbour(&a, "cni0", &vip).0 == victim_mac
            && fdb_port(&a, &victim_mac).as_deref() == Some(victim.host_if.as_str())
    });
    assert!(neighbour(&a, "cni0", &vip).1.contains("PERMANENT"));
    let to_victim = SocketAddr::new(victim.ip.into(), 8080);
    assert!(echoes(&server, to_victim, b"before"));

    // The claimant answers ARP for the victim's address, over and over (past the
    // neighbour table's lock time), and sends from the victim's MAC.
    let bridge = parse_mac(&layout::bridge_mac(a.index));
    let (mine, theirs) = (parse_mac(&claimant_mac), parse_mac(&victim_mac));
    let gateway = std::net::Ipv4Addr::new(10, a.index, 0, 1);
    for _ in 0..6 {
        send_raw(
            &claimant,
            "eth0",
            arp_reply(bridge, mine, mine, victim.ip, gateway),
        );
        send_raw(
            &claimant,
            "eth0",
            arp_reply(bridge, theirs, mine, victim.ip, gateway),
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(neighbour(&a, "cni0", &vip).0, victim_mac, "neighbour moved");
    assert_eq!(
        fdb_port(&a, &victim_mac).as_deref(),
        Some(victim.host_if.as_str()),
        "the victim's MAC learnt on the claimant's port"
    );
    for round in 0..3 {
        let msg = format!("after the claim {round}");
        assert!(echoes(&server, to_victim, msg.as_bytes()), "{msg}");
        assert!(echoes(
            &victim,
            SocketAddr::new(server.ip.into(), 8080),
            msg.as_bytes()
        ));
    }
}
