//! Faults, load and upgrades (the fast versions): ztunnel killed mid-transfer, a peer's
//! ztunnel restarting, the control plane going away, many concurrent connections, a new
//! ztunnel taking over from a running one under load.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztunnel_tests::sniffer::{self, Sniffer};
use ztunnel_tests::traffic::{connect, echo_round_trip, echoes, EchoServer, Load};
use ztunnel_tests::ztunnel::{capture_counter, local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Node, Pod, Testbed};

const T: Duration = Duration::from_secs(5);

struct Pair {
    tb: Testbed,
    a: Node,
    b: Node,
    client: Pod,
    server: Pod,
    config: std::path::PathBuf,
    _echo: EchoServer,
}

fn pair() -> Pair {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let echo = EchoServer::start(&server.netns, 8080).unwrap();
    let config = tb
        .write_config(
            "workloads.yaml",
            &local_config(
                &[
                    WorkloadSpec::mesh(&client, "default", "client"),
                    WorkloadSpec::mesh(&server, "default", "server"),
                ],
                "",
            ),
        )
        .unwrap();
    Pair {
        tb,
        a,
        b,
        client,
        server,
        config,
        _echo: echo,
    }
}

fn dst(p: &Pair) -> SocketAddr {
    SocketAddr::new(p.server.ip.into(), 8080)
}

fn works(p: &Pair) -> bool {
    echoes(&p.client.netns, dst(p))
}

fn fds(z: &Ztunnel) -> usize {
    ztunnel_tests::procstat::fds(z.pid)
}

#[test]
fn killed_mid_transfer_resets_leaks_nothing_and_restart_captures_at_once() {
    require_root!();
    let p = pair();
    let za = p.tb.start_ztunnel(&p.a, &p.config, &[]).unwrap();
    let _zb = p.tb.start_ztunnel(&p.b, &p.config, &[]).unwrap();
    let mut s = connect(&p.client.netns, dst(&p), T).unwrap();
    s.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();

    let sniff = Sniffer::start(&p.a.netns, "eth0").unwrap();
    p.tb.kill(za.pid);
    // The pod keeps writing into a connection whose proxy is gone.
    let marker = b"AFTER-KILL-PLAINTEXT-MARKER";
    let mut failed = false;
    for _ in 0..20 {
        if s.write_all(marker).is_err() {
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut rest = Vec::new();
    let read = s.read_to_end(&mut rest);
    assert!(
        failed || read.is_err() || rest.is_empty(),
        "the connection must end, not carry on"
    );
    let cap = sniff.finish();
    assert!(
        !cap.contains_plaintext(marker),
        "plaintext left the node after ztunnel died"
    );

    // A new process captures again at once.
    let started = Instant::now();
    let _za = p.tb.start_ztunnel(&p.a, &p.config, &[]).unwrap();
    assert!(works(&p), "first connection after restart");
    eprintln!(
        "restart to first proxied connection: {:?}",
        started.elapsed()
    );
}

#[test]
fn peer_restart_recovers_within_a_second() {
    require_root!();
    let p = pair();
    let _za = p.tb.start_ztunnel(&p.a, &p.config, &[]).unwrap();
    let zb = p.tb.start_ztunnel(&p.b, &p.config, &[]).unwrap();
    assert!(works(&p));
    // The pool on node-a holds an HTTP/2 connection to node-b's ztunnel; restart that.
    p.tb.stop(zb.pid, T);
    let _zb = p.tb.start_ztunnel(&p.b, &p.config, &[]).unwrap();
    let started = Instant::now();
    let mut ok = false;
    while started.elapsed() < Duration::from_secs(1) {
        if works(&p) {
            ok = true;
            break;
        }
    }
    assert!(
        ok,
        "no new connection succeeded within 1 s of the peer being back"
    );
    eprintln!(
        "peer restart: first new connection after {:?}",
        started.elapsed()
    );
}

#[test]
fn control_plane_down_traffic_flows_on_cached_state() {
    require_root!();
    let mut p = pair();
    let cp_node = p.tb.add_node("cp").unwrap();
    let cp = p.tb.start_controlplane(&cp_node, &p.config, &[]).unwrap();
    for n in [p.a.clone(), p.b.clone()] {
        let mut args = cp.node_args(&n);
        args.extend(["--xds-address".to_string(), cp.url.clone()]);
        let z =
            p.tb.start_ztunnel_with(&n, &args.iter().map(String::as_str).collect::<Vec<_>>())
                .unwrap();
        z.wait_for_log("workload enrolled", Duration::from_secs(15))
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !works(&p) {
        assert!(Instant::now() < deadline, "mesh never worked");
        std::thread::sleep(Duration::from_millis(200));
    }
    p.tb.stop(cp.pid, T);
    for i in 0..10 {
        assert!(
            works(&p),
            "connection {i} failed with the control plane down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_thousand_concurrent_connections_and_no_fd_leak() {
    require_root!();
    let p = pair();
    let za = p.tb.start_ztunnel(&p.a, &p.config, &[]).unwrap();
    let zb = p.tb.start_ztunnel(&p.b, &p.config, &[]).unwrap();
    assert!(works(&p));
    std::thread::sleep(Duration::from_millis(200));
    let base = (fds(&za), fds(&zb));
    const N: usize = 1000;
    let d = dst(&p);
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        let mut s =
            connect(&p.client.netns, d, T).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.write_all(b"x").unwrap();
        conns.push(s);
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("echo on connection {i}: {e}"));
    }
    let open = (fds(&za), fds(&zb));
    assert!(
        open.0 >= base.0 + N,
        "node-a ztunnel holds the client side of each: {open:?}"
    );
    drop(conns);
    // Native speed needs well under a second; under QEMU's TCG much longer.
    let deadline = Instant::now() + ztunnel_tests::scaled(Duration::from_secs(10));
    loop {
        let now = (fds(&za), fds(&zb));
        // What may remain: the pooled HTTP/2 connections (100 streams each) until they
        // idle out — one fd per connection on each side, nothing per tunnelled stream.
        let pooled = N / 100;
        if now.0 <= base.0 + pooled && now.1 <= base.1 + pooled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fds not back to baseline: base {base:?}, now {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The server side of a captured connection: the server pod keeps writing after its
/// node's ztunnel is killed. Its socket's packets (addressed to the client pod, whose own
/// tuple ztunnel kept) must not leave the node in plaintext. The killed process's delivery
/// socket lingers a while as an orphan that takes them and resets; once it is gone they
/// are dropped because the program remembered the delivery flow at its SYN-ACK. Without
/// that, Debian's 6.1 under QEMU let them out.
#[test]
fn kill_on_the_server_side_leaks_nothing() {
    require_root!();
    let p = pair();
    let _za = p.tb.start_ztunnel(&p.a, &p.config, &[]).unwrap();
    let zb = p.tb.start_ztunnel(&p.b, &p.config, &[]).unwrap();
    let marker: &'static [u8] = b"SERVER-SIDE-PLAINTEXT-AFTER-KILL";
    let listener = p
        .server
        .netns
        .run(|| std::net::TcpListener::bind("0.0.0.0:9090"))
        .unwrap();
    let talker = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // Until the connection breaks or 3 s have passed.
        for _ in 0..60 {
            if s.write_all(marker).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut c = connect(
        &p.client.netns,
        SocketAddr::new(p.server.ip.into(), 9090),
        T,
    )
    .unwrap();
    let mut buf = vec![0u8; marker.len()];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(
        buf, marker,
        "the talker's first message came through the mesh"
    );
    let layout = p.tb.layout();
    let sniff = Sniffer::start(&p.b.netns, sniffer::carrier(layout)).unwrap();
    p.tb.kill(zb.pid);
    talker.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let cap = sniff.finish().pod_traffic(layout);
    assert!(
        !cap.contains_plaintext(marker),
        "the server's writes left its node in plaintext after ztunnel died"
    );
}

/// Upgrade of both nodes under steady load (client side: outbound listener; server side:
/// HBONE listener): the new process takes the listening sockets, the old one drains.
#[test]
fn handover_under_load_refuses_and_resets_nothing() {
    require_root!();
    let p = pair();
    let drain = ["--drain-timeout", "3s"];
    let za = p.tb.start_ztunnel(&p.a, &p.config, &drain).unwrap();
    let zb = p.tb.start_ztunnel(&p.b, &p.config, &drain).unwrap();
    assert!(works(&p));
    // A connection opened before the upgrades stays with the old processes while they drain.
    let mut long = connect(&p.client.netns, dst(&p), T).unwrap();
    let load = Load::start(&p.client.netns, dst(&p), 2);
    std::thread::sleep(Duration::from_millis(500));
    let dropped_before = syns_dropped(&p);

    for (old, node) in [(za, &p.a), (zb, &p.b)] {
        let new = p.tb.start_ztunnel(node, &p.config, &drain).unwrap();
        new.wait_for_log("took over the running ztunnel's listeners", T)
            .unwrap();
        old.wait_for_log("a new ztunnel took over: draining", T)
            .unwrap();
        // The old process still carries what it had.
        long.write_all(b"during-drain").unwrap();
        let mut buf = [0u8; 12];
        long.read_exact(&mut buf)
            .expect("a connection of the old process keeps working while it drains");
        std::thread::sleep(Duration::from_millis(500));
        old.wait_for_log("ztunnel stopped", Duration::from_secs(10))
            .unwrap();
        let status = p.tb.stop(old.pid, T).expect("old process");
        assert!(status.success(), "old ztunnel exited with {status}");
        // The long connection was cut at the drain deadline; open the next one on the new process.
        long = connect(&p.client.netns, dst(&p), T).unwrap();
        assert_eq!(
            echo_round_trip(&mut connect(&p.client.netns, dst(&p), T).unwrap(), b"x").unwrap(),
            b"x"
        );
        drop(new); // still running: the testbed stops it at the end
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    let dropped = syns_dropped(&p) - dropped_before;
    let late: u64 = [(&p.a, &p.client), (&p.b, &p.server)]
        .iter()
        .map(|(node, pod)| capture_counter(node, pod, "dropped_socket_gone").unwrap())
        .sum();
    eprintln!(
        "handover under load: {report:?}, SYNs dropped by capture: {dropped}, late packets of closed flows dropped: {late}"
    );
    assert!(report.ok > 50, "the load ran: {report:?}");
    assert_eq!(
        report.failed(),
        0,
        "new connections refused or reset during the handovers: {report:?}"
    );
    // Capture never lacked a listener: no SYN was dropped (a client would see a 1 s stall).
    assert_eq!(dropped, 0, "SYNs dropped during the handovers");
}

/// SYNs capture dropped for want of a listener: the client pod's outbound ones on node-a
/// plus the server pod's inbound ones on node-b.
fn syns_dropped(p: &Pair) -> u64 {
    [(&p.a, &p.client), (&p.b, &p.server)]
        .iter()
        .map(|(node, pod)| capture_counter(node, pod, "dropped_no_proxy").unwrap())
        .sum()
}

#[test]
fn second_ztunnel_without_takeover_is_refused_and_harms_nothing() {
    require_root!();
    let p = pair();
    let _za = p.tb.start_ztunnel(&p.a, &p.config, &[]).unwrap();
    let _zb = p.tb.start_ztunnel(&p.b, &p.config, &[]).unwrap();
    assert!(works(&p));
    let err =
        p.tb.start_ztunnel(&p.a, &p.config, &["--takeover", "false"])
            .err()
            .expect("a second ztunnel must not start beside the first");
    assert!(
        err.to_string().contains("already running"),
        "unclear error: {err}"
    );
    assert!(works(&p), "the running ztunnel lost its capture");
}

/// A client that opens a connection to a pod's HBONE port and never speaks is cut off
/// after the handshake timeout; the node keeps serving.
#[test]
fn silent_hbone_client_is_cut_off() {
    require_root!();
    let p = pair();
    let timeout = ["--tls-handshake-timeout", "1s"];
    let _za = p.tb.start_ztunnel(&p.a, &p.config, &timeout).unwrap();
    let zb = p.tb.start_ztunnel(&p.b, &p.config, &timeout).unwrap();
    // From node-a itself (not captured), straight to the server pod's 15008 on node-b.
    let hbone = SocketAddr::new(p.server.ip.into(), 15008);
    let mut silent = connect(&p.a.netns, hbone, T).unwrap();
    zb.wait_for_log("mTLS handshake: timed out", T).unwrap();
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the server spoke first: {rest:?}");
    assert!(works(&p));
}

/// SIGTERM alone: the listeners close, live connections keep working until they end, and
/// the process exits as soon as the last one has (not at the drain deadline).
#[test]
fn sigterm_drains_live_connections_then_exits() {
    require_root!();
    let p = pair();
    let za =
        p.tb.start_ztunnel(&p.a, &p.config, &["--drain-timeout", "20s"])
            .unwrap();
    let _zb = p.tb.start_ztunnel(&p.b, &p.config, &[]).unwrap();
    let mut long = connect(&p.client.netns, dst(&p), T).unwrap();
    long.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    long.read_exact(&mut buf).unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(za.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    za.wait_for_log("SIGTERM: draining", T).unwrap();
    long.write_all(b"during").unwrap();
    long.read_exact(&mut buf)
        .expect("a live connection keeps working while ztunnel drains");
    assert_eq!(&buf, b"during");
    drop(long);
    za.wait_for_log("ztunnel stopped", Duration::from_secs(10))
        .expect("exits once its last connection ended, well before the 20 s deadline");
    assert!(
        !za.log_text().contains("drain timeout"),
        "the drain should not have needed its deadline"
    );
}

/// Which end of a connection a flood-then-kill attack aims at.
#[derive(Clone, Copy, Debug)]
enum Victim {
    /// The client's connection, captured by its node's outbound listener.
    Client,
    /// The server's connection, delivered by its node's ztunnel.
    Server,
    /// The same, but neither end has sent a byte before the kill: the server pod has not
    /// sent a single packet to ztunnel's socket, so only ztunnel's own packets to it (its
    /// FIN at the kill) can have marked its socket.
    SilentServer,
}

/// The attack on `ZT_FLOWS` as a bounded table: a pod on the victim's node floods it with
/// captured SYNs (far more flows than its 65,536 entries), then that node's ztunnel is
/// killed. The victim pod does not hear ztunnel's reset (a firewall in its namespace drops
/// it, as a lost segment would), so it goes on sending into the connection: its segments
/// find no ztunnel socket and no `ZT_FLOWS` entry. The mark on its own socket still says
/// the connection was captured: nothing leaves in plaintext, and the drops are counted.
fn flood_then_kill_leaks_nothing(victim: Victim) {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let (node, flooder_node) = match victim {
        Victim::Client => (&a, &a),
        Victim::Server | Victim::SilentServer => (&b, &b),
    };
    let flooder = tb.add_pod(flooder_node, "flooder").unwrap();
    let config = tb
        .write_config(
            "workloads.yaml",
            &local_config(
                &[
                    WorkloadSpec::mesh(&client, "default", "client"),
                    WorkloadSpec::mesh(&server, "default", "server"),
                    WorkloadSpec::mesh(&flooder, "default", "flooder"),
                ],
                "",
            ),
        )
        .unwrap();
    let za = tb.start_ztunnel(&a, &config, &[]).unwrap();
    let zb = tb.start_ztunnel(&b, &config, &[]).unwrap();
    let (z, victim_pod, peer_ip) = match victim {
        Victim::Client => (&za, &client, server.ip),
        Victim::Server | Victim::SilentServer => (&zb, &server, client.ip),
    };
    let marker: &'static [u8] = b"FLOODED-THEN-KILLED-PLAINTEXT";
    // The server accepts, answers once, then (server side) keeps talking.
    let listener = server
        .netns
        .run(|| std::net::TcpListener::bind("0.0.0.0:9090"))
        .unwrap();
    let talks = matches!(victim, Victim::Server);
    let silent = matches!(victim, Victim::SilentServer);
    let (go, killed) = std::sync::mpsc::channel::<()>();
    let (accepted, was_accepted) = std::sync::mpsc::channel::<()>();
    let server_side = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = accepted.send(());
        if silent {
            // Nothing until its node's ztunnel is dead and its orphaned socket gone (it
            // gives up on its unanswered FIN), then talk.
            let _ = killed.recv();
            std::thread::sleep(Duration::from_secs(3));
            talk(&mut s, marker);
            return;
        }
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        if talks {
            s.write_all(marker).unwrap();
            // Then again once its node's ztunnel is dead.
            let _ = killed.recv();
            talk(&mut s, marker);
        } else {
            // Hold the connection open while the client talks.
            let _ = s.read_to_end(&mut Vec::new());
        }
    });
    let mut c = connect(&client.netns, SocketAddr::new(server.ip.into(), 9090), T).unwrap();
    was_accepted
        .recv_timeout(T)
        .expect("the server pod accepted the delivered connection");
    if !silent {
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello", "the connection works through the mesh");
    }
    if matches!(victim, Victim::Server) {
        let mut first = vec![0u8; marker.len()];
        c.read_exact(&mut first).unwrap();
    }
    // The victim never hears that its peer (ztunnel) went away.
    ztunnel_tests::firewall::nft_apply(
        &victim_pod.netns,
        &format!(
            "table inet deaf {{\n chain input {{\n type filter hook input priority 0;\n \
             ip saddr {peer_ip} tcp flags & (fin | rst) != 0 drop\n }}\n}}\n"
        ),
    )
    .unwrap();
    // The flood: four times the table's size, every SYN captured.
    let flows_before = capture_counter(node, &flooder, "outbound_flows").unwrap();
    ztunnel_tests::raw::syn_flood(&flooder.netns, flooder.ip, 4 * 65_536);
    let flooded = capture_counter(node, &flooder, "outbound_flows").unwrap() - flows_before;
    assert!(
        flooded > 65_536,
        "the flood filled ZT_FLOWS several times over ({flooded} SYNs captured)"
    );
    if silent {
        // The killed ztunnel's sockets, orphaned, give up after one retransmission of
        // their unanswered FIN (the kernel's default is 8), so the server's first segment
        // finds no socket at all, only the mark ztunnel's FIN left on the server's own.
        node.netns
            .sysctl("net/ipv4/tcp_orphan_retries", "1")
            .unwrap();
    }
    let layout = tb.layout();
    let sniff = Sniffer::start(&node.netns, sniffer::carrier(layout)).unwrap();
    let dropped_before = capture_counter(node, victim_pod, "dropped_socket_gone").unwrap();
    tb.kill(z.pid);
    let _ = go.send(());
    if matches!(victim, Victim::Client) {
        talk(&mut c, marker);
    }
    drop(c);
    let _ = server_side.join();
    std::thread::sleep(Duration::from_millis(200));
    let cap = sniff.finish().pod_traffic(layout);
    assert!(
        !cap.contains_plaintext(marker),
        "{victim:?}: after a flood and a kill, the victim's segments left the node in plaintext"
    );
    // The counters are pinned: a new ztunnel shows what the program dropped meanwhile.
    let _z = tb.start_ztunnel(node, &config, &[]).unwrap();
    let dropped = capture_counter(node, victim_pod, "dropped_socket_gone").unwrap();
    assert!(
        dropped > dropped_before,
        "{victim:?}: the victim's segments are counted as dropped (socket gone)"
    );
}

/// Writes `marker` every 50 ms for 2 s, or until the connection fails.
fn talk(s: &mut std::net::TcpStream, marker: &[u8]) {
    for _ in 0..40 {
        if s.write_all(marker).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn flood_then_kill_on_the_client_side_leaks_nothing() {
    require_root!();
    flood_then_kill_leaks_nothing(Victim::Client);
}

#[test]
fn flood_then_kill_on_the_server_side_leaks_nothing() {
    require_root!();
    flood_then_kill_leaks_nothing(Victim::Server);
}

#[test]
fn flood_then_kill_of_a_silent_server_leaks_nothing() {
    require_root!();
    flood_then_kill_leaks_nothing(Victim::SilentServer);
}
