//! Integrity under sockmap acceleration (the kernel moving bytes between an enrolled pod's
//! socket and ztunnel's): what an application would check — every byte arrives intact
//! and in order both ways, half-close and resets behave as on TCP, tiny and huge writes,
//! a slow reader, many connections — on the cross-node and the same-node paths; and that
//! it is really on (the counters of `/debug/capture`), fails closed when ztunnel is
//! killed, survives an upgrade, and stays off when switched off or excluded.
//!
//! The pods' programs here read like event-driven applications ([`Patient`]: EAGAIN means
//! "not yet"), because an accelerated socket can answer a blocking reader woken without
//! data with EAGAIN (see `ztunnel_tests::patient`); plain blocking request/response, which
//! never meets that, is tested as is.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use ztunnel_tests::patient::{echo_round_trip, echo_server, Patient};
use ztunnel_tests::sniffer::Sniffer;
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Netns, Node, Pod, Testbed};

const T: Duration = Duration::from_secs(10);
const ON: &str = "--sockmap=true";

/// Node a: client and near (same-node server); node b: server. All in the mesh; an echo
/// server on 8080 in near and server.
struct Cluster {
    tb: Testbed,
    a: Node,
    b: Node,
    client: Pod,
    near: Pod,
    server: Pod,
    config: std::path::PathBuf,
}

fn cluster() -> Cluster {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let near = tb.add_pod(&a, "near").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    echo_server(&near.netns, 8080, T).unwrap();
    echo_server(&server.netns, 8080, T).unwrap();
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&client, "default", "client"),
            WorkloadSpec::mesh(&near, "default", "near"),
            WorkloadSpec::mesh(&server, "default", "server"),
        ],
        "",
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    Cluster {
        tb,
        a,
        b,
        client,
        near,
        server,
        config,
    }
}

impl Cluster {
    fn start(&self, extra: &[&str]) -> (Ztunnel, Ztunnel) {
        (
            self.tb.start_ztunnel(&self.a, &self.config, extra).unwrap(),
            self.tb.start_ztunnel(&self.b, &self.config, extra).unwrap(),
        )
    }
    fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip.into(), 8080)
    }
    fn local(&self) -> SocketAddr {
        SocketAddr::new(self.near.ip.into(), 8080)
    }
    fn connect(&self, dst: SocketAddr) -> Patient {
        Patient::connect(&self.client.netns, dst, T).unwrap()
    }
}

/// The `sockmap` section of a node's `/debug/capture`.
fn sockmap(node: &Node) -> serde_json::Value {
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let (_, body) = ztunnel_tests::http::get(&node.netns, admin, "/debug/capture").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["sockmap"].clone()
}

fn counter(node: &Node, name: &str) -> u64 {
    sockmap(node)["counters"][name].as_u64().unwrap_or(0)
}

/// Data that shows any reordering, loss or duplication (a counter per 8 bytes).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len.div_ceil(8) as u64)
        .flat_map(|i| (i ^ seed.rotate_left(17)).to_le_bytes())
        .take(len)
        .collect()
}

/// Writes `data` in `chunk`-sized writes while reading the echo back (both directions at
/// once); the echo must be byte for byte what was sent.
fn echo_in_chunks(mut s: Patient, data: Vec<u8>, chunk: usize) {
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        for c in sent.chunks(chunk) {
            w.write_all(c)?;
        }
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back).unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(back.len(), data.len(), "echo length");
    assert!(back == data, "echo differs from what was sent");
}

#[test]
fn transfers_are_intact_both_ways_and_accelerated() {
    require_root!();
    let c = cluster();
    let (_za, _zb) = c.start(&[ON]);
    assert_eq!(sockmap(&c.a)["enabled"], true, "{}", sockmap(&c.a));
    let sniff = Sniffer::start(&c.a.netns, "eth0").unwrap();
    for dst in [c.remote(), c.local()] {
        // 64 MiB each way at once, in 64 KiB writes.
        echo_in_chunks(c.connect(dst), pattern(64 << 20, 1), 64 << 10);
    }
    let secret = b"sockmap-secret-payload-0123456789";
    assert_eq!(
        echo_round_trip(&mut c.connect(c.remote()), secret).unwrap(),
        secret
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !sniff.finish().contains_plaintext(secret),
        "plaintext on the wire between nodes"
    );
    // Node a: the client's three sockets (two to the remote server, one to near) and
    // near's accepted socket; node b: the server's two accepted sockets. Every one of them
    // and of ztunnel's peers sent through the map.
    assert!(
        counter(&c.a, "acceleratedConnections") >= 4,
        "{}",
        sockmap(&c.a)
    );
    assert!(
        counter(&c.b, "acceleratedConnections") >= 2,
        "{}",
        sockmap(&c.b)
    );
    assert!(counter(&c.a, "redirectedSockets") >= 8, "{}", sockmap(&c.a));
    assert_eq!(counter(&c.a, "fallbackSockets"), 0, "{}", sockmap(&c.a));
}

#[test]
fn ipv6_hops_are_accelerated_too() {
    require_root!();
    let c = cluster();
    let (_za, _zb) = c.start(&[ON]);
    for ip in [c.server.ip6, c.near.ip6] {
        let dst = SocketAddr::new(ip.into(), 8080);
        echo_in_chunks(c.connect(dst), pattern(8 << 20, 11), 65536);
    }
    // The client's two sockets and near's accepted one; the server's on node b.
    assert!(
        counter(&c.a, "acceleratedConnections") >= 3,
        "{}",
        sockmap(&c.a)
    );
    assert!(
        counter(&c.b, "acceleratedConnections") >= 1,
        "{}",
        sockmap(&c.b)
    );
    assert_eq!(counter(&c.a, "fallbackSockets"), 0, "{}", sockmap(&c.a));
}

#[test]
fn blocking_request_response_needs_no_retries() {
    require_root!();
    let c = cluster();
    let (_za, _zb) = c.start(&[ON]);
    for dst in [c.remote(), c.local()] {
        // A plain blocking client, no half-close: write a request, read the answer.
        let mut s = c
            .client
            .netns
            .run(move || TcpStream::connect_timeout(&dst, T))
            .unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        for i in 0..1000u32 {
            let req = format!("request-{i:06}");
            s.write_all(req.as_bytes()).unwrap();
            let mut back = vec![0u8; req.len()];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, req.as_bytes());
        }
    }
    assert!(counter(&c.a, "redirectedSockets") >= 6, "{}", sockmap(&c.a));
}

#[test]
fn tiny_and_huge_writes() {
    require_root!();
    let c = cluster();
    let (_za, _zb) = c.start(&[ON]);
    for dst in [c.remote(), c.local()] {
        // 20,000 one-byte writes, then one 48 MiB write.
        echo_in_chunks(c.connect(dst), pattern(20_000, 2), 1);
        echo_in_chunks(c.connect(dst), pattern(48 << 20, 3), 48 << 20);
        // One-byte ping-pong: every byte comes back before the next is sent.
        let mut s = c.connect(dst);
        for i in 0..500u32 {
            let b = [(i % 251) as u8];
            s.write_all(&b).unwrap();
            let mut r = [0u8; 1];
            s.read_exact(&mut r).unwrap();
            assert_eq!(r, b);
        }
    }
}

/// A server that reads slowly (4 KiB reads, a pause every 256 KiB) and answers with the
/// count and a checksum of what it read.
fn slow_reader(ns: &Netns, port: u16) {
    let listener = ns.run(move || TcpListener::bind(("::", port))).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let Ok(mut conn) = Patient::new(conn, Duration::from_secs(60)) else {
                continue;
            };
            std::thread::spawn(move || {
                let (mut n, mut sum) = (0u64, 0u64);
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k as u64;
                            sum = checksum(sum, &buf[..k]);
                            if n % (256 << 10) < 4096 {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                }
                let _ = conn.write_all(format!("{n} {sum}").as_bytes());
            });
        }
    });
}

fn checksum(sum: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(sum, |s, b| s.wrapping_mul(31).wrapping_add(u64::from(*b)))
}

#[test]
fn a_slow_reader_gets_everything() {
    require_root!();
    let c = cluster();
    slow_reader(&c.server.netns, 9090);
    slow_reader(&c.near.netns, 9090);
    let (_za, _zb) = c.start(&[ON]);
    for ip in [c.server.ip, c.near.ip] {
        let data = pattern(24 << 20, 4);
        let dst = SocketAddr::new(ip.into(), 9090);
        let mut s = Patient::connect(&c.client.netns, dst, Duration::from_secs(60)).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert_eq!(
            answer,
            format!("{} {}", data.len(), checksum(0, &data)),
            "to {ip}"
        );
    }
}

/// A server that reads 4 bytes, then resets the connection (SO_LINGER 0).
fn resetter(ns: &Netns, port: u16) {
    let listener = ns.run(move || TcpListener::bind(("::", port))).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let Ok(mut p) = Patient::new(conn, T) else {
                continue;
            };
            let mut b = [0u8; 4];
            let _ = p.read_exact(&mut b);
            let _ = socket2::SockRef::from(p.get_ref()).set_linger(Some(Duration::ZERO));
        }
    });
}

#[test]
fn half_close_and_resets_behave_as_on_tcp() {
    require_root!();
    let c = cluster();
    resetter(&c.server.netns, 9191);
    resetter(&c.near.netns, 9191);
    let (_za, _zb) = c.start(&[ON]);
    for (dst, ip) in [(c.remote(), c.server.ip), (c.local(), c.near.ip)] {
        // Half-close: the client stops sending and still reads the whole answer.
        let mut s = c.connect(dst);
        s.write_all(b"first half").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"first half");

        // The server resets: the client's read ends (reset or end of stream), promptly.
        let mut s = c.connect(SocketAddr::new(ip.into(), 9191));
        s.write_all(b"boom").unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("after the server's reset the client read {other:?}"),
        }

        // The client resets mid-stream; the next connection is served as usual.
        let mut s = c.connect(dst);
        s.write_all(&pattern(1 << 20, 5)).unwrap();
        socket2::SockRef::from(s.get_ref())
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        assert_eq!(
            echo_round_trip(&mut c.connect(dst), b"after").unwrap(),
            b"after"
        );
    }
}

#[test]
fn ten_thousand_connections() {
    require_root!();
    let c = cluster();
    let (_za, _zb) = c.start(&[ON]);
    let before = counter(&c.a, "acceleratedConnections");
    let dsts = [c.remote(), c.local()];
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let dst = dsts[w % 2];
            c.client.netns.spawn(move || {
                let mut failures = vec![];
                for i in 0..1250 {
                    let msg = format!("conn-{w}-{i}").into_bytes();
                    let r = TcpStream::connect_timeout(&dst, T)
                        .and_then(|s| Patient::new(s, T))
                        .and_then(|mut s| echo_round_trip(&mut s, &msg));
                    match r {
                        Ok(v) if v == msg => {}
                        other => failures.push(format!("{dst} #{i}: {other:?}")),
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of 10,000 failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Each connection is at least its client socket's hop (same-node ones two).
    let accelerated = counter(&c.a, "acceleratedConnections") - before;
    assert!(
        accelerated >= 10_000,
        "accelerated {accelerated}: {}",
        sockmap(&c.a)
    );
}

#[test]
fn killed_ztunnel_fails_closed_with_connections_accelerated() {
    require_root!();
    let c = cluster();
    let (za, _zb) = c.start(&[ON]);
    let mut remote = c.connect(c.remote());
    let mut local = c.connect(c.local());
    for s in [&mut remote, &mut local] {
        s.write_all(b"before").unwrap();
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).unwrap();
    }
    assert!(counter(&c.a, "redirectedSockets") >= 4, "{}", sockmap(&c.a));
    // The wire between nodes, and the same-node server's own interface.
    let wire = Sniffer::start(&c.a.netns, "eth0").unwrap();
    let near_if = Sniffer::start(&c.near.netns, "eth0").unwrap();
    c.tb.kill(za.pid);
    let marker = b"AFTER-KILL-SOCKMAP-PLAINTEXT";
    for s in [remote, local] {
        let mut s = Patient::new(s.get_ref().try_clone().unwrap(), Duration::from_secs(3)).unwrap();
        let mut ended = false;
        for _ in 0..20 {
            if s.write_all(marker).is_err() {
                ended = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut rest = Vec::new();
        let read = s.read_to_end(&mut rest);
        assert!(
            ended || read.is_err() || !rest.windows(marker.len()).any(|w| w == marker),
            "the connection must not carry on without ztunnel: read {read:?}, {} bytes",
            rest.len()
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !wire.finish().contains_plaintext(marker),
        "plaintext left the node after ztunnel died"
    );
    assert!(
        !near_if.finish().contains_plaintext(marker),
        "the same-node pod received data without ztunnel"
    );
    // The next ztunnel accelerates again.
    let _za = c.tb.start_ztunnel(&c.a, &c.config, &[ON]).unwrap();
    let before = counter(&c.a, "acceleratedConnections");
    echo_in_chunks(c.connect(c.local()), pattern(1 << 20, 6), 4096);
    assert!(counter(&c.a, "acceleratedConnections") > before);
}

/// 256 KiB out and back on an open connection.
fn round(s: &mut Patient, n: u64) {
    let data = pattern(256 << 10, n);
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).unwrap();
    writer.join().unwrap().unwrap();
    assert!(back == data, "echo differs");
}

#[test]
fn upgrade_keeps_accelerated_connections_working() {
    require_root!();
    let c = cluster();
    let args = [ON, "--drain-timeout", "20s"];
    let (za, _zb) = c.start(&args);
    let mut remote = c.connect(c.remote());
    let mut local = c.connect(c.local());
    round(&mut remote, 1);
    round(&mut local, 2);
    assert!(counter(&c.a, "redirectedSockets") >= 4, "{}", sockmap(&c.a));

    let new = c.tb.start_ztunnel(&c.a, &c.config, &args).unwrap();
    new.wait_for_log("took over the running ztunnel's listeners", T)
        .unwrap();
    za.wait_for_log("a new ztunnel took over: draining", T)
        .unwrap();
    // The old process still carries its accelerated connections...
    for n in 3..6 {
        round(&mut remote, n);
        round(&mut local, n + 10);
    }
    // ...and the new one accelerates new connections.
    let before = counter(&c.a, "acceleratedConnections");
    echo_in_chunks(c.connect(c.local()), pattern(4 << 20, 7), 65536);
    echo_in_chunks(c.connect(c.remote()), pattern(4 << 20, 8), 65536);
    assert!(
        counter(&c.a, "acceleratedConnections") >= before + 3,
        "{}",
        sockmap(&c.a)
    );
    // Closing them ends the old process's drain.
    drop((remote, local));
    za.wait_for_log("ztunnel stopped", Duration::from_secs(30))
        .unwrap();
}

#[test]
fn off_by_default_or_excluded_nothing_is_accelerated_and_all_works() {
    require_root!();
    let c = cluster();
    let (_za, _zb) = c.start(&[]);
    let v = sockmap(&c.a);
    assert_eq!(v["enabled"], false, "{v}");
    assert!(
        v["offBecause"].as_str().unwrap().contains("--sockmap"),
        "{v}"
    );
    for dst in [c.remote(), c.local()] {
        echo_in_chunks(c.connect(dst), pattern(8 << 20, 9), 65536);
    }
    assert_eq!(counter(&c.a, "acceleratedConnections"), 0);
    assert_eq!(counter(&c.b, "acceleratedConnections"), 0);

    // An excluded port (a pod that splices, say) stays on the normal path.
    let c = cluster();
    let (_za, _zb) = c.start(&[ON, "--sockmap-exclude-ports", "8080"]);
    assert_eq!(sockmap(&c.a)["enabled"], true);
    echo_in_chunks(c.connect(c.local()), pattern(8 << 20, 10), 65536);
    assert_eq!(
        counter(&c.a, "acceleratedConnections"),
        0,
        "{}",
        sockmap(&c.a)
    );
}
