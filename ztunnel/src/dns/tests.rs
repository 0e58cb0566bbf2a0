//! The proxy over real sockets on loopback: a pod (a loopback address the state names as a
//! workload) asks; a stand-in for the node's resolver, built with the same DNS library,
//! answers what the mesh does not, truncating over UDP when told to.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::*;
use crate::state::{Service, StateStore, Workload};

/// The pod's address (on loopback, so the test needs no namespaces).
const POD: &str = "127.0.0.2";

fn question(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.edns = Some(Edns::new());
    m.to_vec().unwrap()
}

fn answers(reply: &[u8]) -> (ResponseCode, Vec<IpAddr>, bool) {
    let m = Message::from_vec(reply).unwrap();
    let ips = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    (m.metadata.response_code, ips, m.metadata.truncation)
}

/// The node's resolver: `www.example.org` is 93.184.0.1; `big.example.org` has 40
/// addresses and is truncated over UDP; anything else is NXDOMAIN.
async fn upstream() -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    fn reply(q: &[u8], over_udp: bool) -> Vec<u8> {
        let q = Message::from_vec(q).unwrap();
        let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
        let query = q.queries[0].clone();
        let name = query.name().to_ascii();
        m.add_query(query.clone());
        let count = match name.as_str() {
            "www.example.org." => 1,
            "big.example.org." => 40,
            _ => 0,
        };
        if count == 0 {
            m.metadata.response_code = ResponseCode::NXDomain;
        } else if over_udp && count > 1 {
            m.metadata.truncation = true;
        } else {
            for i in 0..count {
                let rdata = RData::A(A([93, 184, 0, 1 + i as u8].into()));
                m.add_answer(Record::from_rdata(query.name().clone(), 60, rdata));
            }
        }
        m.to_vec().unwrap()
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, src) = udp.recv_from(&mut buf).await.unwrap();
            let _ = udp.send_to(&reply(&buf[..n], true), src).await;
        }
    });
    tokio::spawn(async move {
        loop {
            let (mut s, _) = tcp.accept().await.unwrap();
            tokio::spawn(async move {
                let n = s.read_u16().await.unwrap();
                let mut q = vec![0u8; usize::from(n)];
                s.read_exact(&mut q).await.unwrap();
                let r = reply(&q, false);
                s.write_all(&(r.len() as u16).to_be_bytes()).await.unwrap();
                s.write_all(&r).await.unwrap();
            });
        }
    });
    addr
}

/// An upstream address nothing listens on (the socket that held it is gone).
async fn dead_upstream() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A proxy on loopback over a state with one service and one ServiceEntry host.
async fn proxy(upstream: SocketAddr) -> SocketAddr {
    let store = Arc::new(StateStore::default());
    store.replace_all(
        [Workload {
            uid: "c//Pod/default/client".into(),
            namespace: "default".into(),
            workload_ips: vec![POD.parse().unwrap()],
            canonical_name: "client".into(),
            ..Default::default()
        }],
        [
            Service {
                name: "echo".into(),
                namespace: "default".into(),
                hostname: "echo.default.svc.cluster.local".into(),
                vips: vec!["/10.96.0.10".parse().unwrap(), "/fd00::10".parse().unwrap()],
                ..Default::default()
            },
            Service {
                name: "api".into(),
                namespace: "default".into(),
                hostname: "api.example.com".into(),
                vips: vec!["/240.240.0.1".parse().unwrap()],
                ..Default::default()
            },
        ],
        [],
    );
    let upstreams = Upstreams {
        servers: vec![upstream],
        timeout: Duration::from_secs(2),
    };
    let p = DnsProxy::new(store, upstreams, "cluster.local");
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(p.clone().serve_udp(udp, super::UdpRole::Plain));
    tokio::spawn(p.serve_tcp(tcp));
    addr
}

async fn ask_udp(proxy: SocketAddr, q: &[u8]) -> Vec<u8> {
    let s = UdpSocket::bind(format!("{POD}:0")).await.unwrap();
    s.send_to(q, proxy).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    buf.truncate(n);
    buf
}

async fn ask_tcp(proxy: SocketAddr, q: &[u8]) -> Vec<u8> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{POD}:0").parse().unwrap()).unwrap();
    let mut s: TcpStream = sock.connect(proxy).await.unwrap();
    s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(q).await.unwrap();
    let n = s.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

#[tokio::test]
async fn mesh_names_are_answered_and_the_rest_forwarded() {
    let p = proxy(upstream().await).await;
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    // A service, in the forms the pod's search domains produce.
    for name in [
        "echo.default.svc.cluster.local.",
        "echo.default.default.svc.cluster.local.",
    ] {
        let r = ask_udp(p, &question(name, RecordType::A)).await;
        assert_eq!(
            answers(&r),
            (ResponseCode::NoError, vec![ip("10.96.0.10")], false),
            "{name}"
        );
    }
    let r = ask_tcp(
        p,
        &question("echo.default.svc.cluster.local.", RecordType::AAAA),
    )
    .await;
    assert_eq!(
        answers(&r),
        (ResponseCode::NoError, vec![ip("fd00::10")], false)
    );
    // A ServiceEntry host: its VIP; no IPv6 address is NODATA, not NXDOMAIN.
    let r = ask_udp(p, &question("api.example.com.", RecordType::A)).await;
    assert_eq!(answers(&r).1, vec![ip("240.240.0.1")]);
    let r = ask_udp(p, &question("api.example.com.", RecordType::AAAA)).await;
    assert_eq!(answers(&r), (ResponseCode::NoError, vec![], false));
    // Not the mesh's: the node's resolver answers, NXDOMAIN included.
    let r = ask_udp(p, &question("www.example.org.", RecordType::A)).await;
    assert_eq!(answers(&r).1, vec![ip("93.184.0.1")]);
    let r = ask_udp(p, &question("nope.example.org.", RecordType::A)).await;
    assert_eq!(answers(&r).0, ResponseCode::NXDomain);
    // Truncated over UDP upstream: asked again over TCP, the whole answer (about 670
    // bytes) relayed to a client that takes that much over UDP (EDNS, 1232 bytes)...
    let mut big = Message::from_vec(&question("big.example.org.", RecordType::A)).unwrap();
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(1232);
    big.edns = Some(edns);
    let r = ask_udp(p, &big.to_vec().unwrap()).await;
    let (code, ips, tc) = answers(&r);
    assert_eq!((code, ips.len(), tc), (ResponseCode::NoError, 40, false));
    // ...truncated for one that takes the plain 512 bytes, so it asks again over TCP...
    let plain = question("big.example.org.", RecordType::A);
    let r = ask_udp(p, &plain).await;
    assert!(r.len() <= 512, "{} bytes over UDP", r.len());
    let (code, ips, tc) = answers(&r);
    assert_eq!((code, ips.len(), tc), (ResponseCode::NoError, 0, true));
    // ...where it gets all of it.
    let r = ask_tcp(p, &plain).await;
    let (code, ips, tc) = answers(&r);
    assert_eq!((code, ips.len(), tc), (ResponseCode::NoError, 40, false));
    // Counted as Istio counts them.
    let labels = metrics::DnsLabels::new(
        "a",
        false,
        Some(&Workload {
            canonical_name: "client".into(),
            ..Default::default()
        }),
    );
    assert!(metrics::DNS.requests.get_or_create(&labels).get() >= 5);
    assert!(metrics::DNS.upstream_requests.get_or_create(&labels).get() >= 3);
}

#[tokio::test]
async fn bad_input_gets_formerr_or_nothing_and_a_dead_upstream_servfail() {
    let p = proxy(dead_upstream().await).await;
    // A readable header with garbage after it: FORMERR with its id.
    let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 20]);
    let r = ask_udp(p, &junk).await;
    let m = Message::from_vec(&r).unwrap();
    assert_eq!(
        (m.metadata.id, m.metadata.response_code),
        (0x1234, ResponseCode::FormErr)
    );
    // Shorter than a header: no answer; the proxy still serves the next question.
    let s = UdpSocket::bind(format!("{POD}:0")).await.unwrap();
    s.send_to(&[1, 2, 3], p).await.unwrap();
    let r = ask_udp(
        p,
        &question("echo.default.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(answers(&r).1.len(), 1);
    // The node's resolver is gone: SERVFAIL, so the pod moves on.
    let r = ask_udp(p, &question("www.example.org.", RecordType::A)).await;
    assert_eq!(answers(&r).0, ResponseCode::ServFail);
}

#[tokio::test]
async fn one_source_cannot_hold_every_tcp_place() {
    let p = proxy(dead_upstream().await).await;
    // The pod holds its whole share with silent connections...
    let mut held = Vec::new();
    for _ in 0..super::server::MAX_TCP_PER_SOURCE {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{POD}:0").parse().unwrap()).unwrap();
        held.push(sock.connect(p).await.unwrap());
    }
    // ...so its next one is closed at once, unanswered,
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{POD}:0").parse().unwrap()).unwrap();
    let mut extra = sock.connect(p).await.unwrap();
    let q = question("echo.default.svc.cluster.local.", RecordType::A);
    let _ = extra.write_all(&(q.len() as u16).to_be_bytes()).await;
    let _ = extra.write_all(&q).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.read_u16()).await;
    assert!(matches!(closed, Ok(Err(_))), "closed without an answer");
    // ...while another source is still answered over TCP.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut s = other.connect(p).await.unwrap();
    s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(&q).await.unwrap();
    let n = s.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(answers(&buf).1.len(), 1);
    drop(held);
}
