//! Enrolled pods' DNS over UDP: the capture program's decision for a UDP packet to port
//! 53, as a plain function the host can test.
//!
//! A question an enrolled pod sends over UDP to port 53 of any address, from its own
//! interface, is assigned (`bpf_sk_lookup_udp` + `bpf_sk_assign`, with the capture mark
//! that policy routing turns into local delivery) to ztunnel's transparent DNS socket on
//! `Settings::dns_port`. The socket reads where the question was going
//! (`IP_ORIGDSTADDR`) and ztunnel answers from that address and port, so the pod's
//! resolver sees the reply of the server it asked. DNS over TCP needs nothing here: it is
//! a TCP connection like any other, captured to the outbound listener.
//!
//! **Fail open.** With no DNS socket (ztunnel stopped, crashed, restarting) the question
//! goes on to the server the pod asked ([`DnsVerdict::Passed`], counted), unlike TCP,
//! which fails closed. DNS is not where the mesh enforces anything: every connection the
//! pod then opens is captured and authorized (or dropped) as usual, whoever told it the
//! address. Failing closed would take every enrolled pod's name resolution down for as
//! long as ztunnel is down (each lookup waits out its resolver's 5 s timeout); failing
//! open, only names that only the mesh knows (ServiceEntry hosts with auto-allocated
//! VIPs) stop resolving for that time.
//!
//! Not captured: a pod that is not enrolled (or held), a packet that did not come from
//! the pod's own interface (another pod spoofing its address gets no answers meant for
//! it), fragmented datagrams (`parse` leaves them alone; questions are small), and
//! questions to the node's own addresses — as a TCP connection to its node is not. A
//! resolver on the node (NodeLocal DNSCache, which in its iptables mode also takes the
//! cluster DNS's address onto a local interface) holds port 53 of that address, and the
//! answer could not leave from there: the pod's resolver would wait out its timeout. Left
//! alone, it is answered by that resolver.

use crate::{decide::Facts, SETTINGS_ENABLED};

/// The port DNS questions are captured on.
pub const DNS_PORT: u16 = 53;

/// What the program does with a UDP packet to port 53.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsVerdict {
    /// Not captured: `VERDICT_CONTINUE`, nothing counted.
    Continue,
    /// Assigned to ztunnel's DNS socket (marked): taken up the stack, counted on the pod
    /// as `dns_captured`.
    Assigned,
    /// Should be captured, but ztunnel has no DNS socket: `VERDICT_CONTINUE` (on a
    /// bridge's own device, with the capture mark taken off again), counted on the pod as
    /// `dns_passed`.
    Passed,
}

/// The one question the DNS decision asks beyond [`Facts`].
pub trait DnsLookups {
    /// The destination address is in `ZT_NODE_ADDRS`.
    fn dst_is_node(&mut self) -> bool;
    /// ztunnel has a UDP socket on `port` (the packet's addresses, that port): assign the
    /// packet to it, with the capture mark. True if it was assigned.
    fn assign_dns(&mut self, port: u16) -> bool;
}

/// The verdict for a UDP packet on an interface other than a bridge's own device.
/// `f.dport` is the UDP destination port; `f.tcp_flags` is not looked at.
pub fn decide_dns<L: DnsLookups>(f: &Facts, look: &mut L) -> DnsVerdict {
    if !capturing(f) || !f.from_own_pod() || !f.src_outbound() || look.dst_is_node() {
        return DnsVerdict::Continue;
    }
    assign(f, look)
}

/// The verdict on a bridge's own device, for a UDP packet: one the program assigned at a
/// port carries the capture mark, and br_netfilter took its socket away on the way up
/// (see `decide::decide_on_bridge`): it is assigned again. If the DNS socket went in
/// between, [`DnsVerdict::Passed`]: the program takes the mark off and the question goes
/// where the pod sent it, as at the port.
pub fn decide_dns_on_bridge<L: DnsLookups>(f: &Facts, marked: bool, look: &mut L) -> DnsVerdict {
    if !capturing(f) || !marked {
        return DnsVerdict::Continue;
    }
    assign(f, look)
}

fn capturing(f: &Facts) -> bool {
    f.settings.flags & SETTINGS_ENABLED != 0 && f.settings.dns_port != 0 && f.dport == DNS_PORT
}

fn assign<L: DnsLookups>(f: &Facts, look: &mut L) -> DnsVerdict {
    if look.assign_dns(f.settings.dns_port) {
        DnsVerdict::Assigned
    } else {
        DnsVerdict::Passed
    }
}

#[cfg(test)]
mod tests;
