//! The last hop into an enrolled pod: what the program at the egress of a pod's host-side
//! interface does with a connection that reaches the pod without having gone through
//! ztunnel.
//!
//! Capture at ingress sees a packet before the node's NAT: a connection from a pod
//! outside the mesh to a Service VIP, a NodePort or a hostPort is addressed to something
//! that is not an enrolled pod, and is only turned into one by kube-proxy's DNAT on its
//! way through the node. The egress of the pod's own interface is the one place every
//! connection into the pod passes after all NAT, so that is where the rest is judged.
//!
//! A new connection (a SYN) to an enrolled pod arriving there is, in order:
//!
//! 1. from a ztunnel socket (it carries the proxy mark) → continue: ztunnel delivers what
//!    it authorized;
//! 2. to an excluded port → continue (as at ingress);
//! 3. from a socket of the node itself (kubelet's probes, hostNetwork pods) → continue,
//!    unless the settings put the node's connections under policy
//!    ([`crate::SETTINGS_HOST_UNDER_POLICY`]); the same rule as Istio's, which exempts
//!    connections from the node (SNATed there to 169.254.7.127) from the proxy;
//! 4. otherwise it was forwarded (through a Service VIP, a NodePort, a hostPort): judged by
//!    ztunnel's policy for its source as the pod sees it, after NAT. The verdict for (source
//!    address, pod address, port) is cached in `ZT_LAST_HOP` by ztunnel: allowed →
//!    continue, denied → drop; none yet → drop the SYN and ask ztunnel (an event on
//!    `ZT_LAST_HOP_EV`), once per key, which answers in the cache; the client's
//!    retransmitted SYN then meets the verdict. Without ztunnel nothing is answered and
//!    every such SYN is dropped: fail closed.
//!
//! Packets other than a SYN continue: a connection exists only if its SYN passed.
//! Held pods (should be enrolled, cannot be) get no connection but the node's.

use crate::{PodInfo, Settings, POD_FLAG_HELD, POD_FLAG_INBOUND, SETTINGS_ENABLED};

/// `ZT_LAST_HOP` values: ztunnel's verdict for a key, or that one was asked for.
pub const LAST_HOP_PENDING: u8 = 1;
pub const LAST_HOP_ALLOW: u8 = 2;
pub const LAST_HOP_DENY: u8 = 3;

/// `ZT_LAST_HOP_COUNT` indices (per CPU).
pub const LAST_HOP_ALLOWED: u32 = 0;
pub const LAST_HOP_FROM_NODE: u32 = 1;
pub const LAST_HOP_DENIED: u32 = 2;
pub const LAST_HOP_ASKED: u32 = 3;
/// SYNs dropped while waiting for a verdict already asked for (or that could not be
/// asked for: the event queue was full).
pub const LAST_HOP_WAITING: u32 = 4;
pub const LAST_HOP_COUNTERS: u32 = 5;

/// A question to ztunnel: may `saddr` connect to `daddr:dport`? Addresses as in
/// [`crate::PodKey`], ports in network byte order (`sport` only for the log line).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastHopEvent {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
}

/// What the program knows of a packet at the last hop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastHopFacts {
    pub settings: Settings,
    /// The `ZT_PODS` entry of the destination address (all-zero: not enrolled).
    pub dst: PodInfo,
    /// A pure SYN.
    pub syn: bool,
    /// `skb->mark` has every bit of the proxy mark (a ztunnel socket sent it).
    pub from_ztunnel: bool,
    /// `skb->sk` is set: a socket of this node sent it (not forwarded).
    pub from_node: bool,
}

/// What the decision may look up, only when it matters.
pub trait LastHopLookups {
    /// The destination port is in `ZT_EXCL_PORTS`.
    fn port_excluded(&mut self) -> bool;
    /// The `ZT_LAST_HOP` entry for the packet's key (0: none).
    fn cached(&mut self) -> u8;
    /// Records `LAST_HOP_PENDING` and queues the question; false if the queue was full
    /// (the entry is then not recorded, so the next SYN asks again).
    fn ask(&mut self) -> bool;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastHopVerdict {
    /// Not a new connection to an enrolled pod, ztunnel's own, or an excluded port.
    Continue,
    /// From the node's own sockets, let through by the host rule.
    FromNode,
    /// Forwarded, and ztunnel's policy allows it.
    Allowed,
    /// Forwarded, and ztunnel's policy denies it: dropped.
    Denied,
    /// Forwarded, no verdict yet: dropped, ztunnel asked.
    Asked,
    /// Forwarded, no verdict yet and already asked (or the queue was full): dropped.
    Waiting,
}

impl LastHopVerdict {
    /// Whether the program drops the packet.
    pub fn drops(self) -> bool {
        matches!(
            self,
            LastHopVerdict::Denied | LastHopVerdict::Asked | LastHopVerdict::Waiting
        )
    }

    /// The `ZT_LAST_HOP_COUNT` index to count it in, if any.
    pub fn counter(self) -> Option<u32> {
        match self {
            LastHopVerdict::Continue => None,
            LastHopVerdict::FromNode => Some(LAST_HOP_FROM_NODE),
            LastHopVerdict::Allowed => Some(LAST_HOP_ALLOWED),
            LastHopVerdict::Denied => Some(LAST_HOP_DENIED),
            LastHopVerdict::Asked => Some(LAST_HOP_ASKED),
            LastHopVerdict::Waiting => Some(LAST_HOP_WAITING),
        }
    }
}

/// The verdict at the last hop (see the module documentation for the steps).
pub fn decide_last_hop<L: LastHopLookups>(f: &LastHopFacts, look: &mut L) -> LastHopVerdict {
    let s = &f.settings;
    let enrolled = f.dst.flags & (POD_FLAG_INBOUND | POD_FLAG_HELD) != 0;
    if s.flags & SETTINGS_ENABLED == 0 || !f.syn || !enrolled {
        return LastHopVerdict::Continue;
    }
    if f.from_ztunnel || look.port_excluded() {
        return LastHopVerdict::Continue;
    }
    let node_exempt = s.flags & crate::SETTINGS_HOST_UNDER_POLICY == 0;
    if f.from_node && (node_exempt || f.dst.flags & POD_FLAG_HELD != 0) {
        return LastHopVerdict::FromNode;
    }
    if f.dst.flags & POD_FLAG_HELD != 0 {
        // Nothing to ask: ztunnel cannot serve a held pod.
        return LastHopVerdict::Denied;
    }
    match look.cached() {
        LAST_HOP_ALLOW => LastHopVerdict::Allowed,
        LAST_HOP_DENY => LastHopVerdict::Denied,
        LAST_HOP_PENDING => LastHopVerdict::Waiting,
        _ if look.ask() => LastHopVerdict::Asked,
        _ => LastHopVerdict::Waiting,
    }
}

#[cfg(test)]
mod tests;
