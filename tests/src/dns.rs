//! DNS in the testbed: a stand-in for the cluster's DNS server (CoreDNS) that answers
//! every A question with one fixed address, over UDP and TCP, a dead one that never
//! answers, and a pod's client.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::netns::Netns;

/// Answers every A question with `answer` (TTL 5), on port 53 of every address of `ns`.
pub struct StubDns;

impl StubDns {
    pub fn start(ns: &Netns, answer: Ipv4Addr) -> anyhow::Result<StubDns> {
        let (udp, tcp) = ns.run(|| -> std::io::Result<_> {
            Ok((
                UdpSocket::bind(("0.0.0.0", 53))?,
                TcpListener::bind(("0.0.0.0", 53))?,
            ))
        })?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, src)) = udp.recv_from(&mut buf) {
                if let Some(r) = reply(&buf[..n], answer) {
                    let _ = udp.send_to(&r, src);
                }
            }
        });
        std::thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let Ok(q) = read_framed(&mut conn) else {
                        return;
                    };
                    if let Some(r) = reply(&q, answer) {
                        let _ = write_framed(&mut conn, &r);
                    }
                });
            }
        });
        Ok(StubDns)
    }
}

fn reply(q: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    let q = Message::from_vec(q).ok()?;
    let query = q.queries.first()?.clone();
    let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    m.add_query(query.clone());
    if query.query_type() == RecordType::A {
        m.add_answer(Record::from_rdata(
            query.name().clone(),
            5,
            RData::A(A(answer)),
        ));
    }
    m.to_vec().ok()
}

fn read_framed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn write_framed(s: &mut TcpStream, m: &[u8]) -> std::io::Result<()> {
    let mut framed = (m.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(m);
    s.write_all(&framed)
}

/// The A records `server` gives for `name`, asked over TCP from inside `ns`.
pub fn resolve_tcp(ns: &Netns, server: SocketAddr, name: &str) -> anyhow::Result<Vec<IpAddr>> {
    let name = Name::from_ascii(name)?;
    ns.run(move || -> anyhow::Result<Vec<IpAddr>> {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(name, RecordType::A));
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write_framed(&mut s, &q.to_vec()?)?;
        let r = Message::from_vec(&read_framed(&mut s)?)?;
        Ok(r.answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })
            .collect())
    })
}

/// Reads every question on port 53 of `ns` (UDP, and TCP connections accepted and held,
/// the latest 1,024) and never answers: a dead or hopelessly slow upstream.
pub struct DeadDns;

impl DeadDns {
    pub fn start(ns: &Netns) -> anyhow::Result<DeadDns> {
        let (udp, tcp) = ns.run(|| -> std::io::Result<_> {
            Ok((
                UdpSocket::bind(("0.0.0.0", 53))?,
                TcpListener::bind(("0.0.0.0", 53))?,
            ))
        })?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while udp.recv_from(&mut buf).is_ok() {}
        });
        std::thread::spawn(move || {
            let mut held = std::collections::VecDeque::new();
            for conn in tcp.incoming().flatten() {
                held.push_back(conn);
                if held.len() > 1024 {
                    held.pop_front();
                }
            }
        });
        Ok(DeadDns)
    }
}

/// One question (id 0, recursion desired) for `name` of type `qtype`, encoded.
pub fn question(name: &str, qtype: RecordType) -> anyhow::Result<Vec<u8>> {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name)?, qtype));
    Ok(q.to_vec()?)
}

/// A reply's response code and A/AAAA addresses.
pub fn answers(reply: &[u8]) -> anyhow::Result<(ResponseCode, Vec<IpAddr>)> {
    let r = Message::from_vec(reply)?;
    let ips = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    Ok((r.metadata.response_code, ips))
}

/// The A records `server` gives for `name`, asked over UDP from inside `ns`, waiting at
/// most `timeout`.
pub fn resolve_udp(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<IpAddr>> {
    let mut q = question(name, RecordType::A)?;
    let id: u16 = rand_id();
    q[..2].copy_from_slice(&id.to_be_bytes());
    let s = ns.run(move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(("0.0.0.0", 0))?;
        s.connect(server)?;
        Ok(s)
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.send(&q)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = s.recv(&mut buf)?;
        if n >= 2 && buf[..2] == id.to_be_bytes() {
            let (code, ips) = answers(&buf[..n])?;
            if code != ResponseCode::NoError {
                anyhow::bail!("{code}");
            }
            return Ok(ips);
        }
    }
}

fn rand_id() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id()) as u16
}
