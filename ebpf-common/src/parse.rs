//! Finding the TCP header of a packet, as a plain function the host can test.
//!
//! The capture program reads a packet through [`Reader`] (in the kernel,
//! `bpf_skb_load_bytes`) and asks [`locate`] where its TCP header is. The answer is one
//! of three, and the difference between the last two is what keeps the mesh closed:
//!
//! - [`L4::Tcp`]: the offset of a TCP header that is there in full.
//! - [`L4::Udp`]: the offset of a complete UDP header, of a packet that is not a
//!   fragment: the program looks at its port (DNS, see `dns`).
//! - [`L4::Other`]: a packet that is certainly not TCP (other UDP, ICMP, …): not
//!   ztunnel's.
//! - [`L4::Unparsed`]: a packet that may be TCP but whose TCP header the program cannot
//!   see: an IPv4 or IPv6 fragment of a TCP packet, a chain of IPv6 extension headers
//!   longer than the program walks or of a kind it cannot walk (ESP), a header cut
//!   short. To or from an enrolled pod such a packet is dropped, never passed
//!   uncaptured (`decide::decide_unparsed`): a pod could otherwise slip a connection past
//!   capture, and its policy, by adding a destination-options header to every packet
//!   (`IPV6_DSTOPTS` needs only CAP_NET_RAW) or by fragmenting.
//!
//! The layer-3 offset is the caller's: 14 on Ethernet devices, 0 on devices without a
//! MAC header (IPIP, GRE, WireGuard), where the data starts at the IP header.

/// A TCP header has its flags at byte 13; a packet must hold at least this much of it.
pub const TCP_MIN_BYTES: usize = 14;
/// A UDP header's length.
pub const UDP_HEADER_BYTES: usize = 8;
/// IPv6 extension headers walked before giving up (the packet is then unparsed). Real
/// traffic carries one or two; the bound keeps the program's loop short for the verifier.
pub const MAX_EXT_HEADERS: usize = 8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_NONE: u8 = 59;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_MH: u8 = 135;
pub const IPPROTO_HIP: u8 = 139;
pub const IPPROTO_SHIM6: u8 = 140;

/// Reads bytes of the packet at an offset from its start (`None` past its end).
pub trait Reader {
    fn u8_at(&mut self, offset: usize) -> Option<u8>;
    /// Two bytes in network order, returned in host order.
    fn u16_at(&mut self, offset: usize) -> Option<u16>;
}

/// Where the TCP header is, if the packet is TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A complete TCP header starts at this offset.
    Tcp(usize),
    /// A complete UDP header starts at this offset (a whole packet, not a fragment).
    Udp(usize),
    /// Not TCP.
    Other,
    /// Possibly TCP, but its header cannot be read (see the module documentation).
    Unparsed,
}

/// IPv4: the header at `l3`.
pub fn ipv4<R: Reader>(r: &mut R, l3: usize) -> L4 {
    let (Some(vihl), Some(proto), Some(frag)) = (r.u8_at(l3), r.u8_at(l3 + 9), r.u16_at(l3 + 6))
    else {
        return L4::Unparsed;
    };
    let fragment = frag & 0x3fff != 0;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if proto == IPPROTO_UDP {
        // A fragmented UDP datagram is not a DNS question a resolver sends (questions are
        // small): left alone, like a header that is not all there.
        if fragment || ihl < 20 {
            return L4::Other;
        }
        return udp_at(r, l3 + ihl);
    }
    if proto != IPPROTO_TCP {
        return L4::Other;
    }
    // More-fragments set or an offset: a fragment of a TCP packet. Only the first holds
    // the TCP header, and TCP does not fragment (it sets DF and follows the path MTU).
    if fragment {
        return L4::Unparsed;
    }
    if ihl < 20 {
        return L4::Unparsed;
    }
    tcp_at(r, l3 + ihl)
}

/// IPv6: the fixed header at `l3`, then its chain of extension headers.
pub fn ipv6<R: Reader>(r: &mut R, l3: usize) -> L4 {
    let Some(mut next) = r.u8_at(l3 + 6) else {
        return L4::Unparsed;
    };
    let mut off = l3 + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return tcp_at(r, off),
            IPPROTO_UDP => return udp_at(r, off),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH | IPPROTO_HIP
            | IPPROTO_SHIM6 => {
                // Next header, then the length in 8-octet units beyond the first 8.
                let (Some(n), Some(len)) = (r.u8_at(off), r.u8_at(off + 1)) else {
                    return L4::Unparsed;
                };
                next = n;
                off += (len as usize + 1) * 8;
            }
            IPPROTO_AH => {
                // AH counts its length in 4-octet units, minus 2.
                let (Some(n), Some(len)) = (r.u8_at(off), r.u8_at(off + 1)) else {
                    return L4::Unparsed;
                };
                next = n;
                off += (len as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let (Some(n), Some(frag)) = (r.u8_at(off), r.u16_at(off + 2)) else {
                    return L4::Unparsed;
                };
                // An atomic fragment (offset 0, no more fragments) is a whole packet.
                if frag & 0xfff9 != 0 {
                    // A real fragment: TCP (or a header that may lead to it) cannot be
                    // followed; anything else is not ours.
                    return match n {
                        IPPROTO_TCP | IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS
                        | IPPROTO_AH | IPPROTO_ESP | IPPROTO_FRAGMENT => L4::Unparsed,
                        _ => L4::Other,
                    };
                }
                next = n;
                off += 8;
            }
            // Encrypted: whatever is inside cannot be seen.
            IPPROTO_ESP => return L4::Unparsed,
            IPPROTO_NONE => return L4::Other,
            _ => return L4::Other,
        }
    }
    if next == IPPROTO_TCP {
        return tcp_at(r, off);
    }
    if next == IPPROTO_UDP {
        return udp_at(r, off);
    }
    // A chain longer than the bound: it may well end in TCP.
    L4::Unparsed
}

fn udp_at<R: Reader>(r: &mut R, off: usize) -> L4 {
    match r.u8_at(off + UDP_HEADER_BYTES - 1) {
        Some(_) => L4::Udp(off),
        None => L4::Other,
    }
}

fn tcp_at<R: Reader>(r: &mut R, off: usize) -> L4 {
    match r.u8_at(off + TCP_MIN_BYTES - 1) {
        Some(_) => L4::Tcp(off),
        None => L4::Unparsed,
    }
}

#[cfg(test)]
mod tests;
