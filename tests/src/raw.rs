//! Hand-built packets sent from inside a pod through a raw socket, for attacks the
//! kernel's own TCP would never make: fragments, IPv6 extension headers it will not add, a
//! flood of SYNs without sockets behind them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::Netns;

/// The Internet checksum of `parts` (ones' complement sum of 16-bit words).
pub fn checksum(parts: &[&[u8]]) -> u16 {
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

/// The IPv4 pseudo-header of a TCP segment of `tcp_len` bytes.
pub fn pseudo_v4(s: Ipv4Addr, d: Ipv4Addr, tcp_len: usize) -> Vec<u8> {
    [
        &s.octets()[..],
        &d.octets()[..],
        &[0, 6],
        &(tcp_len as u16).to_be_bytes(),
    ]
    .concat()
}

/// The IPv6 pseudo-header of a TCP segment of `tcp_len` bytes.
pub fn pseudo_v6(s: Ipv6Addr, d: Ipv6Addr, tcp_len: usize) -> Vec<u8> {
    [
        &s.octets()[..],
        &d.octets()[..],
        &(tcp_len as u32).to_be_bytes(),
        &[0, 0, 0, 6],
    ]
    .concat()
}

/// A TCP SYN from `sport` to `dport` carrying `payload`, its checksum over `pseudo`.
pub fn tcp_syn(pseudo: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&[
        0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    tcp.extend_from_slice(payload);
    let sum = checksum(&[pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    tcp
}

/// An IPv4 packet of protocol TCP around `body`, with the fragment field `frag` (flags and
/// offset as on the wire). The kernel fills in the header checksum.
pub fn ipv4(s: Ipv4Addr, d: Ipv4Addr, frag: u16, body: &[u8]) -> Vec<u8> {
    let total = (20 + body.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, 6, 0, 0]);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(body);
    h
}

/// An IPv6 packet whose first next-header is `next`, with `body` (extension headers and
/// what follows them) as its payload.
pub fn ipv6(s: Ipv6Addr, d: Ipv6Addr, next: u8, body: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(body);
    h
}

/// Sends raw IP packets (headers included) from inside `ns`.
pub fn send(ns: &Netns, v6: bool, dst: IpAddr, packets: Vec<Vec<u8>>) {
    ns.run(move || {
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))).unwrap();
        let to = SockAddr::from(SocketAddr::new(dst, 0));
        for p in packets {
            s.send_to(&p, &to).unwrap();
        }
    });
}

/// Sends `count` SYNs from `src` (an address of a pod in `ns`) to port 80 of addresses
/// in 198.18.0.0/15 (reserved for benchmarks, never routed), each a flow of its own:
/// every one that capture hands to ztunnel takes a `ZT_FLOWS` entry.
pub fn syn_flood(ns: &Netns, src: Ipv4Addr, count: u32) {
    ns.run(move || {
        let s = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .unwrap();
        for i in 0..count {
            let dst = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i / 50_000);
            let sport = 10_000 + (i % 50_000) as u16;
            let tcp = tcp_syn(&pseudo_v4(src, dst, 20), sport, 80, &[]);
            let to = SockAddr::from(SocketAddr::new(dst.into(), 0));
            // A full socket buffer is not an error worth stopping for: the flood goes on.
            let _ = s.send_to(&ipv4(src, dst, 0x4000, &tcp), &to);
        }
    });
}
