//! Packets the capture program must see through or refuse: TCP behind IPv6 extension
//! headers, and fragments of TCP. Each test is an attack by an enrolled pod on a server
//! whose policy denies it, and shows it refused and the server's side never reached.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use ztunnel_tests::http;
use ztunnel_tests::sniffer::Sniffer;
use ztunnel_tests::traffic::{echo_round_trip, EchoServer};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Node, Pod, Testbed};

const T: Duration = Duration::from_secs(5);

/// Only `neighbour` (node b) may reach `server` (node b); `client` (node a) may not.
const ONLY_NEIGHBOUR: &str = "policies:\n- name: only-neighbour\n  namespace: default\n  \
    scope: Namespace\n  action: Allow\n  rules:\n  - - - principals: [\"cluster.local/ns/other/sa/neighbour\"]\n";

struct Bed {
    _tb: Testbed,
    a: Node,
    b: Node,
    client: Pod,
    server: Pod,
    neighbour: Pod,
    echo: EchoServer,
    za: Ztunnel,
    zb: Ztunnel,
}

fn bed() -> Bed {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let neighbour = tb.add_pod(&b, "neighbour").unwrap();
    let echo = EchoServer::start(&server.netns, 8080).unwrap();
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&client, "default", "client"),
            WorkloadSpec::mesh(&server, "default", "server"),
            WorkloadSpec::mesh(&neighbour, "other", "neighbour"),
        ],
        ONLY_NEIGHBOUR,
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    let za = tb.start_ztunnel(&a, &config, &[]).unwrap();
    let zb = tb.start_ztunnel(&b, &config, &[]).unwrap();
    for z in [&za, &zb] {
        z.wait_ready(T).unwrap();
    }
    Bed {
        _tb: tb,
        a,
        b,
        client,
        server,
        neighbour,
        echo,
        za,
        zb,
    }
}

/// An 8-byte options header (PadN only) for `IPV6_DSTOPTS` / `IPV6_HOPOPTS`: the kernel
/// fills in the next-header byte.
const PADN_OPTIONS: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];

/// Connects over IPv6 from `pod` with an extension header of `option` on every packet,
/// sends `msg` and reads what comes back.
fn round_trip_with(
    pod: &Pod,
    dst: SocketAddr,
    option: i32,
    msg: &'static [u8],
) -> std::io::Result<Vec<u8>> {
    pod.netns.run(move || {
        let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        // SAFETY: a valid socket and an 8-byte buffer of the given length.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                option,
                PADN_OPTIONS.as_ptr().cast(),
                PADN_OPTIONS.len() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        s.connect_timeout(&SockAddr::from(dst), T)?;
        let mut stream: std::net::TcpStream = s.into();
        stream.set_read_timeout(Some(T))?;
        echo_round_trip(&mut stream, msg)
    })
}

#[test]
fn tcp_behind_ipv6_extension_headers_is_captured_and_meets_policy() {
    require_root!();
    let m = bed();
    let dst = SocketAddr::new(m.server.ip6.into(), 8080);
    for (name, option) in [
        ("destination options", libc::IPV6_DSTOPTS),
        ("hop-by-hop", libc::IPV6_HOPOPTS),
    ] {
        // Denied identity, across nodes: refused; no plaintext on the wire.
        let sniff = Sniffer::start(&m.a.netns, "eth0").unwrap();
        let secret: &'static [u8] = b"ext-header-secret-4711";
        let got = round_trip_with(&m.client, dst, option, secret);
        assert!(
            got.map(|v| v.is_empty()).unwrap_or(true),
            "{name}: a denied connection carried data"
        );
        std::thread::sleep(Duration::from_millis(200));
        let cap = sniff.finish();
        assert!(
            !cap.frames
                .iter()
                .any(|f| f.windows(secret.len()).any(|w| w == secret)),
            "{name}: the payload crossed the wire in plaintext"
        );
        assert!(
            m.echo.drain().is_empty(),
            "{name}: the server saw a denied connection"
        );
        // The allowed identity, same node, the same header: captured and delivered.
        let ok: &'static [u8] = b"neighbour-with-options";
        assert_eq!(
            round_trip_with(&m.neighbour, dst, option, ok).unwrap(),
            ok,
            "{name}"
        );
        let (peer, _) = m.echo.next_accepted(T).unwrap();
        assert_eq!(
            ztunnel_tests::traffic::canonical(peer).ip(),
            IpAddr::from(m.neighbour.ip6)
        );
    }
    m.zb.wait_for_log("connection denied by policy", T).unwrap();
}

/// The Internet checksum of `parts` (ones' complement sum of 16-bit words).
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN carrying `payload`, with its checksum over `pseudo` (the pseudo-header).
fn syn(pseudo: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut tcp = vec![
        0xc3, 0x50, 0x1f, 0x90, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];
    tcp.extend_from_slice(payload);
    let sum = checksum(&[pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

/// Sends raw IP packets (headers included) from inside `pod`.
fn send_raw(pod: &Pod, v6: bool, dst: IpAddr, packets: Vec<Vec<u8>>) {
    pod.netns.run(move || {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).unwrap();
        let to = SockAddr::from(SocketAddr::new(dst, 0));
        for p in packets {
            s.send_to(&p, &to).unwrap();
        }
    });
}

fn dropped_unparsed(z: &Ztunnel) -> u64 {
    let (_, body) = http::get(
        &z.node.netns,
        SocketAddr::from(([127, 0, 0, 1], 15020)),
        "/metrics",
    )
    .unwrap();
    body.lines()
        .find(|l| l.starts_with("ztunnel_capture_dropped_unparsed "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn fragments_of_tcp_from_an_enrolled_pod_are_dropped() {
    require_root!();
    let m = bed();
    let before = dropped_unparsed(&m.za);
    let sniff = Sniffer::start(&m.b.netns, "eth0").unwrap();
    let marker: &[u8] = b"fragment-marker-v4-31337";
    // IPv4: a tiny first fragment (8 bytes of TCP: ports and sequence number, no flags),
    // then the rest. Reassembled at the server it would be a SYN that skipped capture.
    let (s, d) = (m.client.ip.octets(), m.server.ip.octets());
    let tcp_len = 20 + marker.len();
    let pseudo = [&s[..], &d[..], &[0, 6], &(tcp_len as u16).to_be_bytes()].concat();
    let tcp = syn(&pseudo, marker);
    let ip4 = |frag: u16, body: &[u8]| {
        let total = (20 + body.len()) as u16;
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, 6, 0, 0]);
        h.extend_from_slice(&s);
        h.extend_from_slice(&d);
        h.extend_from_slice(body);
        h
    };
    send_raw(
        &m.client,
        false,
        m.server.ip.into(),
        vec![ip4(0x2000, &tcp[..8]), ip4(1, &tcp[8..])],
    );
    // IPv6: a first fragment with the whole TCP header, then the rest of the payload.
    let marker6: &[u8] = b"fragment-marker-v6-31337";
    let (s6, d6) = (m.client.ip6.octets(), m.server.ip6.octets());
    let tcp_len = 20 + marker6.len();
    let pseudo = [
        &s6[..],
        &d6[..],
        &(tcp_len as u32).to_be_bytes(),
        &[0, 0, 0, 6],
    ]
    .concat();
    let tcp = syn(&pseudo, marker6);
    let ip6 = |frag: u16, body: &[u8]| {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&((8 + body.len()) as u16).to_be_bytes());
        h.extend_from_slice(&[44, 64]);
        h.extend_from_slice(&s6);
        h.extend_from_slice(&d6);
        h.extend_from_slice(&[6, 0]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0x56, 0x78]);
        h.extend_from_slice(body);
        h
    };
    send_raw(
        &m.client,
        true,
        m.server.ip6.into(),
        vec![ip6(1, &tcp[..24]), ip6(3 << 3, &tcp[24..])],
    );
    std::thread::sleep(Duration::from_millis(300));
    let cap = sniff.finish();
    for mk in [marker, marker6] {
        assert!(
            !cap.frames
                .iter()
                .any(|f| f.windows(mk.len()).any(|w| w == mk)),
            "a fragment of an enrolled pod's TCP reached the other node: {}",
            String::from_utf8_lossy(mk)
        );
    }
    assert!(
        dropped_unparsed(&m.za) >= before + 4,
        "the four fragments are counted as dropped"
    );
    // The same pod's ordinary traffic is untouched by all this (denied by policy here,
    // so a same-node allowed pod shows the data path still works).
    let ok = ztunnel_tests::traffic::connect(
        &m.neighbour.netns,
        SocketAddr::new(m.server.ip.into(), 8080),
        T,
    );
    assert_eq!(
        echo_round_trip(&mut ok.unwrap(), b"still fine").unwrap(),
        b"still fine"
    );
}
