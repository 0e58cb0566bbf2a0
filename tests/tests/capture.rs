//! The capture programs, driven through the library inside a testbed node: what a
//! listener on 15001 sees, what is left alone, fail closed, enroll/unenroll, restart.

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::time::Duration;

use tokio::net::TcpListener;
use ztunnel::capture::{Capture, CaptureConfig, RoutingConfig, TcAttach};
use ztunnel::proxy::socket::{canonical, transparent_listener, transparent_std_listener};
use ztunnel_tests::traffic::{connect, echo_round_trip, EchoServer};
use ztunnel_tests::{require_root, Netns, Pod, Testbed};

const T: Duration = Duration::from_secs(5);

fn config(ns: &Netns) -> CaptureConfig {
    CaptureConfig {
        instance: ns.name().to_string(),
        bpffs_root: "/sys/fs/bpf".into(),
        routing: RoutingConfig {
            mark: 0x1000,
            table: 15010,
            priority: 100,
        },
        proxy_mark: 0x539,
        outbound_port: 15001,
        inbound_plain_port: 15006,
        inbound_hbone_port: 15008,
        excluded_ports: vec![9999],
        attach: tc_attach(),
        host_under_policy: false,
        dns_port: 0,
        tc_priority: 1,
        // Capture alone: the listeners here are the test's, not ztunnel's relay.
        sockmap: Default::default(),
    }
}

/// The attachment under test: `TC_ATTACH` (as for the ztunnel binary), else auto.
fn tc_attach() -> TcAttach {
    match std::env::var("TC_ATTACH").as_deref() {
        Ok("legacy") => TcAttach::Legacy,
        Ok("tcx") => TcAttach::Tcx,
        _ => TcAttach::Auto,
    }
}

enum Cmd {
    Enroll(Vec<IpAddr>, String, mpsc::Sender<()>),
    Unenroll(Vec<IpAddr>, mpsc::Sender<()>),
    Counters(mpsc::Sender<std::collections::BTreeMap<IpAddr, ztunnel::capture::Counters>>),
    /// Start a listener on 15001 (v4 and v6) that reports (peer, local) of accepted
    /// connections and closes them.
    Listen(mpsc::Sender<(SocketAddr, SocketAddr)>),
    Shutdown(mpsc::Sender<()>),
    /// Drop without cleanup, like a crash (pins stay).
    Crash(mpsc::Sender<()>),
}

/// Runs `Capture` on a thread inside the node's namespace, driven by commands.
struct NodeCapture {
    tx: tokio::sync::mpsc::UnboundedSender<Cmd>,
}

impl NodeCapture {
    fn start(ns: &Netns) -> NodeCapture {
        let cfg = config(ns);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Cmd>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let path = ns.path();
        std::thread::spawn(move || {
            let f = std::fs::File::open(path).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut cap = Capture::start(cfg).await.expect("capture start");
                ready_tx.send(()).unwrap();
                let mut listeners: Vec<tokio::task::JoinHandle<()>> = vec![];
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Cmd::Enroll(ips, ifname, done) => {
                            let name = std::ffi::CString::new(ifname.as_str()).unwrap();
                            // SAFETY: a valid C string; the thread is in the node's netns.
                            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                            cap.enroll(&ips, &ifname, index).await.unwrap();
                            done.send(()).unwrap();
                        }
                        Cmd::Unenroll(ips, done) => {
                            cap.unenroll(&ips).unwrap();
                            done.send(()).unwrap();
                        }
                        Cmd::Counters(reply) => reply.send(cap.counters()).unwrap(),
                        Cmd::Listen(report) => {
                            for addr in ["0.0.0.0:15001", "[::]:15001"] {
                                let l: TcpListener =
                                    transparent_listener(addr.parse().unwrap()).unwrap();
                                let report = report.clone();
                                listeners.push(tokio::spawn(async move {
                                    while let Ok((s, peer)) = l.accept().await {
                                        let local = s.local_addr().unwrap();
                                        let _ = report.send((canonical(peer), canonical(local)));
                                    }
                                }));
                            }
                        }
                        Cmd::Shutdown(done) => {
                            cap.shutdown().await.unwrap();
                            done.send(()).unwrap();
                            return;
                        }
                        Cmd::Crash(done) => {
                            drop(cap);
                            done.send(()).unwrap();
                            return;
                        }
                    }
                }
            });
        });
        // Loading runs the verifier, which takes seconds on a slow (emulated) machine.
        match ready_rx.recv_timeout(ztunnel_tests::scaled(Duration::from_secs(30))) {
            Ok(()) => {}
            // the thread panicked with the reason ("capture start: ..."), printed above
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("capture did not start (see above)")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("capture did not start in time"),
        }
        NodeCapture { tx }
    }

    fn send(&self, c: Cmd) {
        self.tx.send(c).unwrap();
    }

    /// Enrolls and waits until the maps are written.
    fn enroll(&self, pod: &Pod) {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Enroll(
            vec![pod.ip.into(), pod.ip6.into()],
            pod.host_if.clone(),
            tx,
        ));
        rx.recv_timeout(T).unwrap();
    }

    fn unenroll(&self, pod: &Pod) {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Unenroll(vec![pod.ip.into(), pod.ip6.into()], tx));
        rx.recv_timeout(T).unwrap();
    }

    fn listen(&self) -> mpsc::Receiver<(SocketAddr, SocketAddr)> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Listen(tx));
        std::thread::sleep(Duration::from_millis(100));
        rx
    }

    fn counters(&self) -> std::collections::BTreeMap<IpAddr, ztunnel::capture::Counters> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Counters(tx));
        rx.recv_timeout(T).unwrap()
    }

    fn shutdown(self) {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Shutdown(tx));
        rx.recv_timeout(T).unwrap();
    }

    fn crash(self) {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Crash(tx));
        rx.recv_timeout(T).unwrap();
    }
}

struct Bed {
    tb: Testbed,
    client: Pod,
    other: Pod,
    server: Pod,
    echo: EchoServer,
}

/// Two nodes; `client` and `other` (never enrolled) on node a, `server` on node b
/// running an echo server on 8080.
fn bed() -> Bed {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("a").unwrap();
    let b = tb.add_node("b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let other = tb.add_pod(&a, "other").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let echo = EchoServer::start(&server.netns, 8080).unwrap();
    Bed {
        tb,
        client,
        other,
        server,
        echo,
    }
}

fn node_a(b: &Bed) -> &Netns {
    &b.tb.nodes()[0].netns
}

#[test]
fn outbound_connection_reaches_listener_with_original_destination() {
    require_root!();
    let b = bed();
    let cap = NodeCapture::start(node_a(&b));
    cap.enroll(&b.client);
    let seen = cap.listen();
    for v6 in [false, true] {
        let dst = SocketAddr::new(b.server.addr(v6), 8080);
        let s = connect(&b.client.netns, dst, T).expect("connect through capture");
        let (peer, local) = seen.recv_timeout(T).expect("listener saw the connection");
        assert_eq!(local, dst, "local address must be the original destination");
        assert_eq!(
            peer,
            canonical(s.local_addr().unwrap()),
            "peer must be the pod"
        );
        assert!(
            b.echo.drain().is_empty(),
            "the server must not have been reached directly"
        );
    }
    let counters = cap.counters();
    let c = counters
        .get(&IpAddr::from(b.client.ip))
        .expect("client counters");
    assert_eq!(c.outbound_flows, 1);
    assert!(c.packets >= 1 && c.bytes > 0);
    assert_eq!(
        counters
            .get(&IpAddr::from(b.client.ip6))
            .unwrap()
            .outbound_flows,
        1
    );
    cap.shutdown();
}

#[test]
fn unenrolled_pod_excluded_port_and_own_node_are_not_captured() {
    require_root!();
    let b = bed();
    let cap = NodeCapture::start(node_a(&b));
    cap.enroll(&b.client);
    let seen = cap.listen();
    // A pod that is not enrolled goes straight to the server.
    let mut s = connect(&b.other.netns, SocketAddr::new(b.server.ip.into(), 8080), T).unwrap();
    assert_eq!(echo_round_trip(&mut s, b"direct").unwrap(), b"direct");
    let (peer, _) = b.echo.next_accepted(T).unwrap();
    assert_eq!(peer.ip(), IpAddr::from(b.other.ip));

    // An excluded destination port is not captured (nobody listens: refused, not captured).
    let r = connect(
        &b.client.netns,
        SocketAddr::new(b.server.ip.into(), 9999),
        T,
    );
    assert!(r.is_err());
    // The pod's own node (kubelet-style traffic) is not captured.
    let node = &b.tb.nodes()[0];
    let node_srv = EchoServer::start(&node.netns, 10250).unwrap();
    let mut s = connect(&b.client.netns, SocketAddr::new(node.ip.into(), 10250), T).unwrap();
    assert_eq!(echo_round_trip(&mut s, b"probe").unwrap(), b"probe");
    assert!(node_srv.next_accepted(T).is_some());
    assert!(
        seen.try_recv().is_err(),
        "nothing may have reached the capture listener"
    );
    cap.shutdown();
}

#[test]
fn enrolling_keeps_established_connections_and_unenrolling_restores_direct_path() {
    require_root!();
    let b = bed();
    let cap = NodeCapture::start(node_a(&b));
    let seen = cap.listen();
    let dst = SocketAddr::new(b.server.ip.into(), 8080);
    let mut before = connect(&b.client.netns, dst, T).unwrap();
    b.echo.next_accepted(T).unwrap();
    cap.enroll(&b.client);
    // The connection opened before enrollment still works, directly.
    assert_eq!(
        echo_round_trip(&mut before, b"still here").unwrap(),
        b"still here"
    );
    // New connections are captured.
    let _s = connect(&b.client.netns, dst, T).unwrap();
    assert_eq!(seen.recv_timeout(T).unwrap().1, dst);
    // After unenrolling, new connections go direct again.
    cap.unenroll(&b.client);
    let mut s = connect(&b.client.netns, dst, T).unwrap();
    assert_eq!(echo_round_trip(&mut s, b"direct").unwrap(), b"direct");
    assert_eq!(
        b.echo.next_accepted(T).unwrap().0.ip(),
        IpAddr::from(b.client.ip)
    );
    cap.shutdown();
}

#[test]
fn fails_closed_without_listener_and_after_crash_then_recovers_on_restart() {
    require_root!();
    let b = bed();
    let cap = NodeCapture::start(node_a(&b));
    cap.enroll(&b.client);
    let dst = SocketAddr::new(b.server.ip.into(), 8080);
    let short = Duration::from_millis(1500);
    // No listener on 15001: the SYN is dropped, nothing reaches the server.
    assert!(connect(&b.client.netns, dst, short).is_err());
    assert!(b.echo.drain().is_empty(), "plaintext reached the server");
    // Crash: pinned programs stay, still closed.
    cap.crash();
    assert!(connect(&b.client.netns, dst, short).is_err());
    assert!(
        b.echo.drain().is_empty(),
        "plaintext reached the server after a crash"
    );
    // A new instance adopts the pinned state (the pod is still enrolled) and captures.
    let cap = NodeCapture::start(node_a(&b));
    let seen = cap.listen();
    let _s = connect(&b.client.netns, dst, T).expect("captured again after restart");
    assert_eq!(seen.recv_timeout(T).unwrap().1, dst);
    // Clean stop removes everything: direct path again.
    cap.shutdown();
    let mut s = connect(&b.client.netns, dst, T).unwrap();
    assert_eq!(echo_round_trip(&mut s, b"x").unwrap(), b"x");
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/ztunnel/{}", node_a(&b).name())).exists());
}

#[test]
fn inbound_connections_to_enrolled_pod_go_to_inbound_listeners() {
    require_root!();
    let b = bed();
    // Capture on node b, where the server lives; the client (node a) is not enrolled.
    let node_b = b.tb.nodes()[1].netns.clone();
    let cap = NodeCapture::start(&node_b);
    cap.enroll(&b.server);
    let (tx, seen) = mpsc::channel();
    for port in [15006u16, 15008] {
        let l = node_b
            .run(move || transparent_std_listener(SocketAddr::from(([0, 0, 0, 0], port))))
            .unwrap();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let _ = tx.send((port, canonical(c.local_addr().unwrap())));
            }
        });
    }
    for (dport, want) in [(8080u16, 15006u16), (15008, 15008)] {
        let dst = SocketAddr::new(b.server.ip.into(), dport);
        let _s = connect(&b.client.netns, dst, T).expect("inbound connect");
        let (port, local) = seen.recv_timeout(T).expect("inbound listener saw it");
        assert_eq!((port, local), (want, dst));
    }
    assert!(b.echo.drain().is_empty());
    cap.shutdown();
}

#[test]
fn a_pod_spoofing_an_enrolled_neighbours_address_is_dropped() {
    require_root!();
    let b = bed();
    let cap = NodeCapture::start(node_a(&b));
    cap.enroll(&b.client);
    let seen = cap.listen();
    // `other` (same node, not enrolled) claims the client's address and uses it.
    b.other
        .netns
        .ip(&["addr", "add", &format!("{}/32", b.client.ip), "dev", "eth0"])
        .unwrap();
    let client_ip = b.client.ip;
    let dst = SocketAddr::new(b.server.ip.into(), 8080);
    let r = b.other.netns.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::new(client_ip.into(), 0).into())?;
        s.connect_timeout(&dst.into(), Duration::from_millis(1500))
    });
    assert!(r.is_err(), "a spoofed connection must not get through");
    assert!(
        seen.try_recv().is_err(),
        "ztunnel must not accept it as the client"
    );
    assert!(
        b.echo.drain().is_empty(),
        "nor may it reach the server directly"
    );
    let c = cap.counters()[&IpAddr::from(b.client.ip)];
    assert!(c.dropped_spoofed >= 1, "{c:?}");
    // The real client still works.
    let _s = connect(&b.client.netns, dst, T).unwrap();
    assert_eq!(seen.recv_timeout(T).unwrap().1, dst);
    cap.shutdown();
}

/// A map left pinned by a build with another layout (here `ZT_DROPS` as an array of 4-byte
/// values) is replaced, not reused: the new program loads and its counters read.
#[test]
fn a_pinned_map_of_another_layout_is_replaced() {
    require_root!();
    let mut tb = Testbed::new().unwrap();
    let node = tb.add_node("node").unwrap();
    let cfg = config(&node.netns);
    let maps = cfg
        .bpffs_root
        .join("ztunnel")
        .join(&cfg.instance)
        .join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let stale = maps.join("ZT_DROPS");
    ztunnel_tests::cni::pin_array_map(&stale, 4, 1).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg2 = cfg.clone();
    let capture = node.netns.run(move || {
        rt.block_on(async move { Capture::start(cfg2).await.map(|c| c.dropped_unparsed()) })
    });
    assert_eq!(capture.unwrap(), 0);
    let _ = std::fs::remove_dir_all(cfg.bpffs_root.join("ztunnel").join(&cfg.instance));
}
