//! Sockmap acceleration of the plaintext hops between enrolled pods and ztunnel: the
//! types of its maps and the decision, at a TCP socket's ESTABLISHED callback, whether the
//! socket is one end of such a hop ([`classify`]; the host tests it).
//!
//! The hops: a pod's outbound socket and the socket ztunnel accepted for it on 15001;
//! ztunnel's delivery socket and the pod's accepted socket. Both ends are sockets of the
//! same kernel (in different network namespaces), so an `sk_msg` program can move what
//! one end sends straight into the other end's receive queue, past both TCP stacks, the
//! veth and the capture program. The handshake still takes the normal path, so capture,
//! identity and authorization are unchanged; only payload is short-circuited.
//!
//! Keys. The two ends of a hop see the same 4-tuple reversed, and on the same-node path
//! the same tuple exists four times (pod A's socket, ztunnel's accepted socket, ztunnel's
//! original-source delivery socket, pod B's socket), in several namespaces; parallel
//! testbeds (and nested clusters) reuse pod addresses on one kernel. A [`SockKey`] is
//! therefore the connection as both ends agree on it — active and passive address and
//! port — plus both ends' initial sequence numbers (the handshake's randomness: two
//! connections with the same tuple in different namespaces have different ones), plus
//! which end the socket is. A socket's peer is its key with the other end.
//!
//! Which sockets (only these are put in the map; TLS sockets never are):
//! - in ztunnel's own namespace (its netns cookie is in [`SockmapSettings`]): the socket
//!   it accepted for an enrolled pod's captured outbound connection, and its delivery
//!   socket to an enrolled pod — never one on the HBONE port;
//! - in any other namespace: an enrolled pod's outbound socket whose SYN this ztunnel's
//!   capture program took with exactly this initial sequence number (`ZT_SYN_SEQ`: so a
//!   pod elsewhere that happens to have the same address is never taken), and an enrolled
//!   pod's accepted socket whose peer is a delivery socket of this ztunnel waiting in
//!   `ZT_SOCK_PEND` (ztunnel's end is established first: its ACK completes the pod's).

use crate::{FlowKey, PodInfo, PodKey, Settings, POD_FLAG_INBOUND, POD_FLAG_OUTBOUND};

/// `SockKey::side` of the end that connected.
pub const SIDE_ACTIVE: u32 = 0;
/// `SockKey::side` of the end that accepted.
pub const SIDE_PASSIVE: u32 = 1;

/// One end of a TCP connection, as both ends can compute it at their ESTABLISHED callback.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub active_addr: [u8; 16],
    pub passive_addr: [u8; 16],
    /// Host byte order.
    pub active_port: u16,
    pub passive_port: u16,
    /// The active end's initial sequence number + 1 (its `snd_una` when established).
    pub active_seq: u32,
    /// The passive end's initial sequence number + 1.
    pub passive_seq: u32,
    /// `SIDE_ACTIVE` or `SIDE_PASSIVE`: which end this socket is.
    pub side: u32,
}

impl SockKey {
    /// The other end of the same connection.
    pub fn peer(&self) -> SockKey {
        SockKey {
            side: self.side ^ 1,
            ..*self
        }
    }
}

/// A socket's path for what it sends, decided at its first send and never changed while
/// its peer lives: switching once data has flowed would let the receiver read redirected
/// bytes before earlier ones still in the TCP path.
pub const PATH_UNDECIDED: u32 = 0;
/// Sends go into the peer's receive queue.
pub const PATH_REDIRECT: u32 = 1;
/// Sends take the normal TCP path (the peer was not there at the first send).
pub const PATH_TCP: u32 = 2;

/// Per-socket state (socket storage, freed with the socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub peer: SockKey,
    /// `PATH_*`.
    pub path: u32,
    pub _pad: u32,
}

/// `SockmapSettings::flags`: put sockets in the map (`--sockmap`).
pub const SOCKMAP_ENABLED: u32 = 1;

/// Written by the loader at start (`ZT_SOCK_CFG`, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockmapSettings {
    /// Cookie of ztunnel's network namespace (`SO_NETNS_COOKIE`): sockets there are its.
    pub netns_cookie: u64,
    /// `SOCKMAP_*` bits; 0 (the initial value) puts nothing in the map.
    pub flags: u32,
    pub _pad: u32,
}

/// Sockmap counters (one copy per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockmapCounters {
    /// Pod sockets put in the map, each one end of an accelerated pod ↔ ztunnel hop.
    pub pod_sockets: u64,
    /// ztunnel's sockets put in the map (the other ends).
    pub ztunnel_sockets: u64,
    /// Sockets whose sends go straight to their peer (decided at the first send).
    pub redirected: u64,
    /// Sockets whose first send found no peer: that direction stays on TCP.
    pub fallback: u64,
    /// Sends whose peer had closed: they take the TCP path to the closed socket (reset, or
    /// dropped by capture if ztunnel is gone), as without the map.
    pub peer_gone: u64,
    /// Sockets the kernel refused to put in the map (map full, another sockmap program).
    pub insert_failed: u64,
}

/// What the sock_ops program knows of a socket that just became ESTABLISHED.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Established {
    /// It connected (`ACTIVE_ESTABLISHED_CB`) rather than accepted.
    pub active: bool,
    /// It lives in ztunnel's network namespace.
    pub ztunnel_netns: bool,
    pub local: PodKey,
    pub remote: PodKey,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    /// `snd_una` and `rcv_nxt`: the two initial sequence numbers + 1.
    pub snd_una: u32,
    pub rcv_nxt: u32,
    /// `ZT_PODS` entries of the local and remote address (all-zero: not enrolled).
    pub local_pod: PodInfo,
    pub remote_pod: PodInfo,
}

impl Established {
    /// This socket's key.
    pub fn key(&self) -> SockKey {
        if self.active {
            SockKey {
                active_addr: self.local.addr,
                passive_addr: self.remote.addr,
                active_port: self.local_port,
                passive_port: self.remote_port,
                active_seq: self.snd_una,
                passive_seq: self.rcv_nxt,
                side: SIDE_ACTIVE,
            }
        } else {
            SockKey {
                active_addr: self.remote.addr,
                passive_addr: self.local.addr,
                active_port: self.remote_port,
                passive_port: self.local_port,
                active_seq: self.rcv_nxt,
                passive_seq: self.snd_una,
                side: SIDE_PASSIVE,
            }
        }
    }

    /// The flow as the capture program recorded its SYN: client → server, ports in
    /// network byte order.
    pub fn flow(&self) -> FlowKey {
        let (c, cp, s, sp) = if self.active {
            (self.local, self.local_port, self.remote, self.remote_port)
        } else {
            (self.remote, self.remote_port, self.local, self.local_port)
        };
        FlowKey {
            saddr: c.addr,
            daddr: s.addr,
            sport: cp.to_be(),
            dport: sp.to_be(),
        }
    }
}

/// Which end of a hop a socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// ztunnel's socket (accepted for a pod's outbound connection, or its delivery socket).
    Ztunnel,
    /// The pod's socket.
    Pod,
}

/// The map lookups [`classify`] may ask for.
pub trait SockLookups {
    /// The sequence number of the SYN the capture program handed to ztunnel's outbound
    /// listener for this flow (`ZT_SYN_SEQ`), if it recorded one.
    fn syn_seq(&mut self, flow: &FlowKey) -> Option<u32>;
    /// A delivery socket of this ztunnel with this key is waiting for its peer
    /// (`ZT_SOCK_PEND`).
    fn pending(&mut self, key: &SockKey) -> bool;
    /// The port is excluded from acceleration (`--sockmap-exclude-ports`).
    fn port_excluded(&mut self, port: u16) -> bool;
}

/// Whether a newly established socket goes in the map, and as which end of a hop.
pub fn classify(
    e: &Established,
    settings: &Settings,
    sockmap: &SockmapSettings,
    l: &mut impl SockLookups,
) -> Option<End> {
    if sockmap.flags & SOCKMAP_ENABLED == 0 || settings.flags & crate::SETTINGS_ENABLED == 0 {
        return None;
    }
    // HBONE is TLS: its sockets never go in the map (the sk_msg program would see
    // ciphertext records, and a TLS library reading them expects the TCP stream).
    let hbone = settings.inbound_hbone_port;
    if e.local_port == hbone || e.remote_port == hbone {
        return None;
    }
    if l.port_excluded(e.local_port) || l.port_excluded(e.remote_port) {
        return None;
    }
    let outbound = |p: &PodInfo| p.flags & POD_FLAG_OUTBOUND != 0;
    let inbound = |p: &PodInfo| p.flags & POD_FLAG_INBOUND != 0;
    let key = e.key();
    match (e.ztunnel_netns, e.active) {
        // ztunnel accepted a pod's captured outbound connection (transparently: the local
        // address is the original destination).
        (true, false) => (outbound(&e.remote_pod)
            && l.syn_seq(&e.flow()) == Some(e.rcv_nxt.wrapping_sub(1)))
        .then_some(End::Ztunnel),
        // ztunnel's delivery socket to an enrolled pod (inbound, or the same-node path).
        (true, true) => inbound(&e.remote_pod).then_some(End::Ztunnel),
        // A pod's outbound socket whose SYN this ztunnel took, with this very sequence.
        (false, true) => (outbound(&e.local_pod)
            && l.syn_seq(&e.flow()) == Some(e.snd_una.wrapping_sub(1)))
        .then_some(End::Pod),
        // A pod's socket accepting one of this ztunnel's delivery connections.
        (false, false) => (inbound(&e.local_pod) && l.pending(&key.peer())).then_some(End::Pod),
    }
}

#[cfg(test)]
mod tests;
