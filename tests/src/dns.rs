//! DNS in the testbed: a stand-in for the cluster's DNS server (CoreDNS) that answers
//! every A question with one fixed address, or only those about the names it is given
//! (NXDOMAIN for the rest), over UDP and TCP, a dead one that never answers, and a pod's
//! clients.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::netns::Netns;

/// Answers A questions (TTL 5), on port 53 of every address of `ns`.
pub struct StubDns;

/// What the stand-in knows.
enum Answers {
    /// This address for every name.
    Every(Ipv4Addr),
    /// These names (no final dot, lowercase) only; NXDOMAIN for the rest.
    Only(Vec<(String, Ipv4Addr)>),
}

impl Answers {
    /// The A record for `name`; `None` when the name does not exist.
    fn a(&self, name: &Name) -> Option<Ipv4Addr> {
        match self {
            Answers::Every(ip) => Some(*ip),
            Answers::Only(names) => {
                let asked = name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
                names.iter().find(|(n, _)| *n == asked).map(|(_, ip)| *ip)
            }
        }
    }
}

impl StubDns {
    /// Every A question answered with `answer`.
    pub fn start(ns: &Netns, answer: Ipv4Addr) -> anyhow::Result<StubDns> {
        StubDns::serve(ns, Answers::Every(answer))
    }

    /// A questions about `names` answered with their address; any question about another
    /// name is NXDOMAIN.
    pub fn start_names(ns: &Netns, names: &[(&str, Ipv4Addr)]) -> anyhow::Result<StubDns> {
        let names = names
            .iter()
            .map(|(n, ip)| (n.trim_end_matches('.').to_ascii_lowercase(), *ip))
            .collect();
        StubDns::serve(ns, Answers::Only(names))
    }

    fn serve(ns: &Netns, answers: Answers) -> anyhow::Result<StubDns> {
        let answers = Arc::new(answers);
        let for_udp = answers.clone();
        let (udp, tcp) = bind_port_53(ns)?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, src)) = udp.recv_from(&mut buf) {
                if let Some(r) = reply(&buf[..n], &for_udp) {
                    let _ = udp.send_to(&r, src);
                }
            }
        });
        std::thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut conn) = conn else { continue };
                let answer = answers.clone();
                std::thread::spawn(move || {
                    let Ok(q) = read_framed(&mut conn) else {
                        return;
                    };
                    if let Some(r) = reply(&q, &answer) {
                        let _ = write_framed(&mut conn, &r);
                    }
                });
            }
        });
        Ok(StubDns)
    }
}

fn reply(q: &[u8], answers: &Answers) -> Option<Vec<u8>> {
    let q = Message::from_vec(q).ok()?;
    let query = q.queries.first()?.clone();
    let mut m = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    m.add_query(query.clone());
    match answers.a(query.name()) {
        None => m.metadata.response_code = ResponseCode::NXDomain,
        Some(answer) if query.query_type() == RecordType::A => {
            m.add_answer(Record::from_rdata(
                query.name().clone(),
                5,
                RData::A(A(answer)),
            ));
        }
        Some(_) => {}
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

/// The addresses (A or AAAA records, as `qtype`) `server` gives for `name`, asked over UDP
/// from inside `ns`, and the address the answer came from (a resolver only takes answers
/// from the server it asked). Fails after `timeout` without an answer.
pub fn resolve_udp(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    timeout: Duration,
) -> anyhow::Result<(Vec<IpAddr>, SocketAddr)> {
    let name = Name::from_ascii(name)?;
    ns.run(move || -> anyhow::Result<(Vec<IpAddr>, SocketAddr)> {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.metadata.id = rand_id();
        q.add_query(Query::query(name, qtype));
        let any: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let s = UdpSocket::bind(any)?;
        s.set_read_timeout(Some(timeout))?;
        s.send_to(&q.to_vec()?, server)?;
        let mut buf = vec![0u8; 4096];
        let (n, from) = s.recv_from(&mut buf)?;
        let r = Message::from_vec(&buf[..n])?;
        anyhow::ensure!(r.metadata.id == q.metadata.id, "answer to another question");
        Ok((addresses(&r), from))
    })
}

/// Reads every question on port 53 of `ns` (UDP, and TCP connections accepted and held,
/// the latest 1,024) and never answers: a dead or hopelessly slow upstream.
pub struct DeadDns;

impl DeadDns {
    pub fn start(ns: &Netns) -> anyhow::Result<DeadDns> {
        let (udp, tcp) = bind_port_53(ns)?;
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
    Ok((r.metadata.response_code, addresses(&r)))
}

/// The A and AAAA addresses of a reply's answers.
fn addresses(r: &Message) -> Vec<IpAddr> {
    r.answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// The A records `server` gives for `name`, asked over UDP from inside `ns` through a
/// connected socket, waiting at most `timeout`; an error for any response code but
/// NOERROR.
pub fn resolve_udp_a(
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

/// UDP and TCP sockets on port 53 of every address of `ns`, as a DNS server has.
fn bind_port_53(ns: &Netns) -> std::io::Result<(UdpSocket, TcpListener)> {
    ns.run(|| -> std::io::Result<_> {
        Ok((
            UdpSocket::bind(("0.0.0.0", 53))?,
            TcpListener::bind(("0.0.0.0", 53))?,
        ))
    })
}

fn rand_id() -> u16 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ std::process::id()) as u16
}
