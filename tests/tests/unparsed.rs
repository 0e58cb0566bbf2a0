//! Packets the capture program must see through or refuse: TCP behind IPv6 extension
//! headers, and fragments of TCP. Each test is an attack by an enrolled pod on a server
//! whose policy denies it, and shows it refused and the server's side never reached.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use ztunnel_tests::sniffer::Sniffer;
use ztunnel_tests::traffic::{echo_round_trip, EchoServer};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{http, raw};
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
    let pseudo = raw::pseudo_v4(m.client.ip, m.server.ip, 20 + marker.len());
    let tcp = raw::tcp_syn(&pseudo, 50000, 8080, marker);
    let ip4 = |frag: u16, body: &[u8]| raw::ipv4(m.client.ip, m.server.ip, frag, body);
    raw::send(
        &m.client.netns,
        false,
        m.server.ip.into(),
        vec![ip4(0x2000, &tcp[..8]), ip4(1, &tcp[8..])],
    );
    // IPv6: a first fragment with the whole TCP header, then the rest of the payload.
    let marker6: &[u8] = b"fragment-marker-v6-31337";
    let (s6, d6) = (m.client.ip6, m.server.ip6);
    let pseudo = raw::pseudo_v6(s6, d6, 20 + marker6.len());
    let tcp = raw::tcp_syn(&pseudo, 50000, 8080, marker6);
    // A fragment header (next header TCP, the offset and flags, an identification), then
    // the fragment.
    let ip6 = |frag: u16, body: &[u8]| {
        let mut h = vec![6, 0];
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0x56, 0x78]);
        h.extend_from_slice(body);
        raw::ipv6(s6, d6, 44, &h)
    };
    raw::send(
        &m.client.netns,
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

/// The outbound flows captured from `addr` (any family) on `z`'s node.
fn outbound_flows(z: &Ztunnel, addr: IpAddr) -> u64 {
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let (_, body) = http::get(&z.node.netns, admin, "/debug/capture").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["counters"][addr.to_string()]["outbound_flows"]
        .as_u64()
        .unwrap_or(0)
}

/// An options-style extension header (hop-by-hop, destination options, mobility and the
/// like: next header, length in 8-octet units beyond the first, then PadN to fill).
fn options_header(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// Every kind of IPv6 extension header, alone and chained, before a SYN that carries a
/// marker, sent raw by the denied client to the server. A chain that ends in TCP is
/// captured like any SYN: handed to ztunnel (counted as an outbound flow of the client),
/// so the client meets the server's policy. A chain longer than the program walks is
/// dropped and counted. No marker crosses the wire in plaintext, whatever the header.
#[test]
fn syns_behind_every_kind_of_extension_header_are_captured_or_dropped() {
    require_root!();
    let m = bed();
    let (s6, d6) = (m.client.ip6, m.server.ip6);
    use ztunnel_tests::raw::{ipv6, pseudo_v6, tcp_syn};
    const HOP: u8 = 0;
    const TCP: u8 = 6;
    const ROUTING: u8 = 43;
    const AH: u8 = 51;
    const DSTOPTS: u8 = 60;
    const MOBILITY: u8 = 135;
    // A routing header of type 0 with no segments left: the receiver skips it and reads
    // the TCP behind it.
    let routing = |next: u8| vec![next, 0, 0, 0, 0, 0, 0, 0];
    // AH: next header, length in 4-octet units minus 2 (24 bytes here), SPI, sequence, ICV.
    let ah = |next: u8| {
        let mut h = vec![next, 4, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 1];
        h.extend_from_slice(&[0; 12]);
        h
    };
    let cases: Vec<(&str, u8, Vec<u8>)> = vec![
        ("hop-by-hop", HOP, options_header(TCP)),
        ("destination options", DSTOPTS, options_header(TCP)),
        ("routing", ROUTING, routing(TCP)),
        ("authentication header", AH, ah(TCP)),
        ("mobility", MOBILITY, options_header(TCP)),
        (
            "hop-by-hop, routing, destination options",
            HOP,
            [
                options_header(ROUTING),
                routing(DSTOPTS),
                options_header(TCP),
            ]
            .concat(),
        ),
    ];
    let sniff = Sniffer::start(&m.a.netns, "eth0").unwrap();
    let mut markers = Vec::new();
    for (i, (name, first, headers)) in cases.iter().enumerate() {
        let before = outbound_flows(&m.za, m.client.ip6.into());
        let marker = format!("ext-{i}-{name}-marker").into_bytes();
        let sport = 51000 + i as u16;
        let tcp = tcp_syn(&pseudo_v6(s6, d6, 20 + marker.len()), sport, 8080, &marker);
        let packet = ipv6(s6, d6, *first, &[headers.clone(), tcp].concat());
        raw::send(&m.client.netns, true, d6.into(), vec![packet]);
        ztunnel_tests::traffic::eventually(
            &format!("{name}: the SYN is handed to ztunnel"),
            T,
            || outbound_flows(&m.za, m.client.ip6.into()) > before,
        );
        markers.push((name.to_string(), marker));
    }
    // Nine destination-options headers: more than the program walks. Dropped, counted.
    let before = dropped_unparsed(&m.za);
    let marker = b"ext-chain-too-long-marker".to_vec();
    let mut chain = Vec::new();
    for _ in 0..8 {
        chain.extend(options_header(DSTOPTS));
    }
    chain.extend(options_header(TCP));
    let tcp = tcp_syn(&pseudo_v6(s6, d6, 20 + marker.len()), 51999, 8080, &marker);
    raw::send(
        &m.client.netns,
        true,
        d6.into(),
        vec![ipv6(s6, d6, DSTOPTS, &[chain, tcp].concat())],
    );
    ztunnel_tests::traffic::eventually("the long chain is dropped and counted", T, || {
        dropped_unparsed(&m.za) > before
    });
    markers.push(("nine headers".into(), marker));
    std::thread::sleep(Duration::from_millis(300));
    let cap = sniff.finish();
    for (name, mk) in &markers {
        assert!(
            !cap.frames
                .iter()
                .any(|f| f.windows(mk.len()).any(|w| w == &mk[..])),
            "{name}: the SYN crossed the wire in plaintext"
        );
    }
    assert!(m.echo.drain().is_empty(), "the server saw a connection");
}
