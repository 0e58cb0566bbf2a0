//! Packets built byte by byte, each with where its TCP header is (or why it cannot be
//! found).

use std::vec;
use std::vec::Vec;

use super::*;

struct Bytes<'a>(&'a [u8]);

impl Reader for Bytes<'_> {
    fn u8_at(&mut self, offset: usize) -> Option<u8> {
        self.0.get(offset).copied()
    }
    fn u16_at(&mut self, offset: usize) -> Option<u16> {
        Some(u16::from_be_bytes([
            *self.0.get(offset)?,
            *self.0.get(offset + 1)?,
        ]))
    }
}

const TCP: [u8; 20] = [
    0x30, 0x39, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0, 0, 0, 0, 0, 0,
];

fn v4(proto: u8, frag: u16, ihl: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x40 | ihl, 0, 0, 0, 0, 0];
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    p.resize(ihl as usize * 4, 1); // options
    p.extend_from_slice(l4);
    p
}

fn v6(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 0, next, 64];
    p.extend_from_slice(&[0xfd; 32]);
    p.extend_from_slice(rest);
    p
}

/// An extension header of `units` 8-octet units (the length byte says `units - 1`).
fn ext(next: u8, units: u8) -> Vec<u8> {
    let mut h = vec![next, units - 1];
    h.resize(units as usize * 8, 0);
    h
}

fn frag(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let f = (offset << 3) | more as u16;
    let mut h = vec![next, 0];
    h.extend_from_slice(&f.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 7]);
    h
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn ipv4_table() {
    let eth = [0u8; 14];
    let rows: &[(&str, Vec<u8>, usize, L4)] = &[
        ("plain TCP", v4(6, 0, 5, &TCP), 0, L4::Tcp(20)),
        (
            "DF set is not a fragment",
            v4(6, 0x4000, 5, &TCP),
            0,
            L4::Tcp(20),
        ),
        (
            "options: the header is longer",
            v4(6, 0, 8, &TCP),
            0,
            L4::Tcp(32),
        ),
        (
            "behind Ethernet",
            cat(&[&eth, &v4(6, 0, 5, &TCP)]),
            14,
            L4::Tcp(34),
        ),
        ("UDP", v4(17, 0, 5, &TCP), 0, L4::Udp(20)),
        ("UDP with options", v4(17, 0, 6, &TCP), 0, L4::Udp(24)),
        (
            "UDP, a whole header",
            v4(17, 0, 5, &TCP[..8]),
            0,
            L4::Udp(20),
        ),
        ("UDP cut short", v4(17, 0, 5, &TCP[..7]), 0, L4::Other),
        ("UDP first fragment", v4(17, 0x2000, 5, &TCP), 0, L4::Other),
        ("UDP later fragment", v4(17, 0x0010, 5, &TCP), 0, L4::Other),
        ("UDP, IHL below 5", v4(17, 0, 4, &TCP), 0, L4::Other),
        ("ICMP fragment", v4(1, 0x2000, 5, &TCP), 0, L4::Other),
        (
            "first fragment (MF)",
            v4(6, 0x2000, 5, &TCP),
            0,
            L4::Unparsed,
        ),
        (
            "a later fragment",
            v4(6, 0x0010, 5, &TCP[..8]),
            0,
            L4::Unparsed,
        ),
        (
            "the last fragment",
            v4(6, 0x00b9, 5, &[0; 8]),
            0,
            L4::Unparsed,
        ),
        (
            "TCP cut before its flags",
            v4(6, 0, 5, &TCP[..13]),
            0,
            L4::Unparsed,
        ),
        (
            "TCP with just its flags",
            v4(6, 0, 5, &TCP[..14]),
            0,
            L4::Tcp(20),
        ),
        ("IHL below 5", v4(6, 0, 4, &TCP), 0, L4::Unparsed),
        (
            "cut inside the IP header",
            v4(6, 0, 5, &[])[..8].to_vec(),
            0,
            L4::Unparsed,
        ),
    ];
    for (name, pkt, l3, want) in rows {
        assert_eq!(ipv4(&mut Bytes(pkt), *l3), *want, "{name}");
    }
}

#[test]
fn ipv6_table() {
    let rows: &[(&str, Vec<u8>, L4)] = &[
        ("plain TCP", v6(6, &TCP), L4::Tcp(40)),
        ("UDP", v6(17, &TCP), L4::Udp(40)),
        ("UDP cut short", v6(17, &TCP[..7]), L4::Other),
        (
            "UDP fragment",
            v6(44, &cat(&[&frag(17, 0, true), &TCP])),
            L4::Other,
        ),
        ("ICMPv6", v6(58, &TCP), L4::Other),
        ("no next header", v6(59, &[]), L4::Other),
        (
            "destination options",
            v6(60, &cat(&[&ext(6, 1), &TCP])),
            L4::Tcp(48),
        ),
        (
            "hop-by-hop, 16 bytes",
            v6(0, &cat(&[&ext(6, 2), &TCP])),
            L4::Tcp(56),
        ),
        (
            "hop-by-hop, routing, destination options",
            v6(0, &cat(&[&ext(43, 1), &ext(60, 3), &ext(6, 1), &TCP])),
            L4::Tcp(80),
        ),
        (
            "AH (length in 4-octet units)",
            v6(51, &cat(&[&[6, 4], &[0; 22], &TCP])),
            L4::Tcp(64),
        ),
        (
            "mobility header to UDP",
            v6(135, &cat(&[&ext(17, 1), &TCP])),
            L4::Udp(48),
        ),
        (
            "destination options to UDP",
            v6(60, &cat(&[&ext(17, 1), &[0; 8]])),
            L4::Udp(48),
        ),
        (
            "an atomic fragment is whole",
            v6(44, &cat(&[&frag(6, 0, false), &TCP])),
            L4::Tcp(48),
        ),
        (
            "first fragment of TCP",
            v6(44, &cat(&[&frag(6, 0, true), &TCP])),
            L4::Unparsed,
        ),
        (
            "later fragment of TCP",
            v6(44, &cat(&[&frag(6, 185, true), &[0; 8]])),
            L4::Unparsed,
        ),
        (
            "last fragment of TCP",
            v6(44, &cat(&[&frag(6, 185, false), &[0; 8]])),
            L4::Unparsed,
        ),
        (
            "fragment of a chain that may hold TCP",
            v6(44, &cat(&[&frag(60, 0, true), &ext(6, 1), &TCP])),
            L4::Unparsed,
        ),
        (
            "fragment of UDP",
            v6(44, &cat(&[&frag(17, 0, true), &[0; 8]])),
            L4::Other,
        ),
        ("ESP", v6(50, &[0; 32]), L4::Unparsed),
        ("an extension header cut short", v6(60, &[6]), L4::Unparsed),
        (
            "extension header longer than the packet",
            v6(60, &cat(&[&[6, 9], &[0; 6], &TCP])),
            L4::Unparsed,
        ),
        ("TCP cut before its flags", v6(6, &TCP[..10]), L4::Unparsed),
        (
            "cut inside the fixed header",
            v6(6, &[])[..5].to_vec(),
            L4::Unparsed,
        ),
    ];
    for (name, pkt, want) in rows {
        assert_eq!(ipv6(&mut Bytes(pkt), 0), *want, "{name}");
    }
}

#[test]
fn ipv6_chain_bound() {
    // MAX_EXT_HEADERS destination-options headers, then TCP: found.
    let mut rest = Vec::new();
    for i in 0..MAX_EXT_HEADERS {
        let next = if i + 1 == MAX_EXT_HEADERS { 6 } else { 60 };
        rest.extend(ext(next, 1));
    }
    rest.extend_from_slice(&TCP);
    let at = 40 + MAX_EXT_HEADERS * 8;
    assert_eq!(ipv6(&mut Bytes(&v6(60, &rest)), 0), L4::Tcp(at));
    // One more: past the bound, so it may be TCP the program cannot reach: unparsed.
    let mut rest = Vec::new();
    for i in 0..=MAX_EXT_HEADERS {
        let next = if i == MAX_EXT_HEADERS { 6 } else { 60 };
        rest.extend(ext(next, 1));
    }
    rest.extend_from_slice(&TCP);
    assert_eq!(ipv6(&mut Bytes(&v6(60, &rest)), 0), L4::Unparsed);
}
