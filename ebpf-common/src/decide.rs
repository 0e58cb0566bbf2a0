//! The capture program's per-packet decision, as a plain function the host can test.
//!
//! The program (`ebpf/src/main.rs`) parses a TCP packet, looks up what its addresses are
//! ([`Facts`]), and calls [`decide`], which asks for the rest through [`Lookups`] — each
//! question only when the answer matters, in this order — and returns a [`Verdict`] that
//! the program acts on (counters, `ZT_FLOWS`, the log line, the kernel's return value).
//!
//! Per TCP packet, in order:
//!
//! 0. Capture not enabled (settings not written yet) → continue. An enrolled pod's address
//!    arriving on another interface than the pod's own (`PodInfo::ifindex`, 0 = unknown)
//!    → drop (spoofed): a pod must not borrow a neighbour's identity and policy rights.
//!    Then held pods (`POD_FLAG_HELD`: should be enrolled, cannot be): from one to the
//!    node's own addresses → direct; any other packet from or to one → drop (fail closed).
//! 1. Neither source nor destination enrolled, and the flow (as opened, client → server)
//!    was never captured → continue: not ztunnel's packet.
//! 2. A non-listening socket owns the packet's exact tuple (ztunnel's accepted socket, or
//!    one of its original-source upstream sockets) → taken: a SYN is assigned to it; any
//!    other packet is only marked (see [`Take`]); a SYN-ACK also has its flow remembered
//!    (ztunnel's own connection, e.g. its delivery to a pod with the client's address:
//!    after a crash its packets are dropped like a captured flow's, never passed on).
//! 3. Not a SYN: the flow (either direction) was captured, so its socket is gone (ztunnel
//!    died, or a late packet of a closed flow) → drop (fail closed: nothing leaves in
//!    plaintext); otherwise it is a flow opened before enrollment → direct (enrolling
//!    never resets). "Captured" is asked of `ZT_FLOWS` and then, for a packet from an
//!    enrolled pod on its own interface, of the pod's own socket: `ZT_FLOWS` is an LRU
//!    that any pod can flush with a flood of SYNs, the pod socket's mark
//!    (`ZT_CAPTURED_SK`, see [`Verdict::marks_pod_socket`]) lives as long as the socket.
//! 4. A SYN: excluded destination port → direct; from an enrolled pod to anything but the
//!    node's own addresses → outbound listener; to an enrolled pod from anything but an
//!    enrolled pod → HBONE listener if the port is the HBONE port, else the plaintext
//!    inbound listener; otherwise (an enrolled pod calling its node) → direct.
//! 5. The listener took it → assigned; no listener (ztunnel stopped or restarting) → drop
//!    the SYN (fail closed); the client retransmits and gets through once ztunnel is back.
//!
//! "Continue" and "direct" both give the kernel `VERDICT_CONTINUE`; they differ in that a
//! direct packet is an enrolled pod's, counted in its counters.
//!
//! Why a packet of an existing socket is only marked: an assigned packet (`skb->sk` set)
//! skips the kernel's early demux, so every one of them took the full policy-routing lookup
//! (fib rules, then table 15010) — 2.5 % of all CPU under bulk load. Marked and unassigned,
//! it is early-demuxed to the very socket the lookup just found (same tuple, same hash)
//! and takes that socket's cached input route; the mark still routes it locally whenever
//! there is no cached route (the first packets, another interface). The lookup stays: it
//! is what tells a flow whose socket is gone (ztunnel died: step 3, drop) from one that is
//! still served. A socket closing between the two lookups changes nothing that matters:
//! the mark still delivers the packet locally, where TCP finds no socket (it drops the
//! packet or answers a reset); nothing leaves in plaintext.

use crate::{
    PodInfo, Settings, POD_FLAG_HELD, POD_FLAG_INBOUND, POD_FLAG_OUTBOUND, SETTINGS_ENABLED,
};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// What the program knows of a packet before deciding: the header's fields and the map
/// entries of its addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The `ZT_SETTINGS` value (all-zero if there is none).
    pub settings: Settings,
    /// The interface the packet arrived on (`__sk_buff.ifindex`).
    pub ifindex: u32,
    /// The `ZT_PODS` entry of the source address; all-zero if it is not enrolled.
    pub src: PodInfo,
    /// The `ZT_PODS` entry of the destination address; all-zero if it is not enrolled.
    pub dst: PodInfo,
    /// The TCP header's flags byte.
    pub tcp_flags: u8,
    /// The destination port, host byte order.
    pub dport: u16,
}

impl Facts {
    /// The source is an enrolled pod whose outbound connections are captured.
    pub fn src_outbound(&self) -> bool {
        self.src.flags & POD_FLAG_OUTBOUND != 0
    }

    /// The destination is an enrolled pod whose inbound connections are captured.
    pub fn dst_inbound(&self) -> bool {
        self.dst.flags & POD_FLAG_INBOUND != 0
    }

    /// The source is a held pod (should be enrolled, cannot be).
    pub fn src_held(&self) -> bool {
        self.src.flags & POD_FLAG_HELD != 0
    }

    /// The destination is a held pod.
    pub fn dst_held(&self) -> bool {
        self.dst.flags & POD_FLAG_HELD != 0
    }

    /// A pure SYN: the first packet of a new connection (not a SYN-ACK).
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & TCP_SYN != 0 && self.tcp_flags & TCP_ACK == 0
    }

    /// A SYN-ACK: the server's answer to a SYN.
    pub fn is_syn_ack(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    }

    /// The source address is an enrolled pod's, and the packet did not come from that
    /// pod's own interface. An index of 0 means the pod's interface is unknown: then the
    /// address is believed anywhere.
    pub fn spoofed(&self) -> bool {
        self.src.flags != 0 && self.src.ifindex != 0 && self.src.ifindex != self.ifindex
    }

    /// The packet comes from an enrolled pod through that pod's own interface: the pod's
    /// socket of the flow can be looked up in the pod's namespace.
    pub fn from_own_pod(&self) -> bool {
        self.src.flags != 0 && self.src.ifindex != 0 && self.src.ifindex == self.ifindex
    }

    /// Which end's counters record a drop for lack of a ztunnel socket: the source if it
    /// is captured outbound (or held), else the destination if it is captured inbound (or
    /// held).
    pub fn charged(&self) -> Option<End> {
        if self.src_outbound() || self.src_held() {
            Some(End::Src)
        } else if self.dst_inbound() || self.dst_held() {
            Some(End::Dst)
        } else {
            None
        }
    }
}

/// One end of a packet's flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// What the decision may need beyond [`Facts`]: asked only when the answer matters, in
/// the order of the steps. Assigning is part of the socket questions because a socket
/// found by the kernel's lookup must be assigned (or not) and released before the program
/// goes on.
pub trait Lookups {
    /// The packet's flow, as it is (source → destination), is in `ZT_FLOWS`.
    fn flow_captured(&mut self) -> bool;
    /// The reverse of the packet's flow is in `ZT_FLOWS`.
    fn reverse_captured(&mut self) -> bool;
    /// A non-listening socket owns the packet's exact tuple: give the packet the capture
    /// mark and, for [`Take::Assign`], assign it to that socket. True if it was taken.
    fn take_existing(&mut self, how: Take) -> bool;
    /// The pod's own socket of the packet's flow (in the pod's namespace; the packet is
    /// [`Facts::from_own_pod`]) carries the mark of a captured connection.
    fn pod_socket_captured(&mut self) -> bool;
    /// The destination port is in `ZT_EXCL_PORTS`.
    fn port_excluded(&mut self) -> bool;
    /// The destination address is in `ZT_NODE_ADDRS`.
    fn dst_is_node(&mut self) -> bool;
    /// ztunnel listens on `port` (the packet's addresses, that port): assign the SYN to
    /// the listener (with the capture mark). True if it was assigned.
    fn assign_listener(&mut self, port: u16) -> bool;
}

/// How a packet goes to the ztunnel socket that owns its tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// `bpf_sk_assign` + the mark. For a SYN: a SYN whose tuple a closing socket still holds
    /// (TIME_WAIT reuse) goes to that socket exactly as before.
    Assign,
    /// The mark alone: the kernel's own lookup (early demux) finds the same socket, and
    /// established sockets carry a cached input route, so no routing lookup is made.
    Mark,
}

/// ztunnel's transparent listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// An enrolled pod's outbound connections (15001).
    Outbound,
    /// HBONE to an enrolled pod (15008).
    InboundHbone,
    /// Plaintext to an enrolled pod (15006).
    InboundPlain,
}

impl Listener {
    /// The listener's port (host byte order) in `settings`.
    pub fn port(self, settings: &Settings) -> u16 {
        match self {
            Listener::Outbound => settings.outbound_port,
            Listener::InboundHbone => settings.inbound_hbone_port,
            Listener::InboundPlain => settings.inbound_plain_port,
        }
    }

    pub fn is_outbound(self) -> bool {
        self == Listener::Outbound
    }
}

/// What the program does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not ztunnel's packet: `VERDICT_CONTINUE`, nothing counted.
    Continue,
    /// An enrolled pod's packet left on the direct path (a flow from before enrollment, an
    /// excluded port, a pod calling its own node): `VERDICT_CONTINUE`, counted.
    Direct,
    /// A SYN assigned to the socket owning its tuple: taken up the stack.
    Assigned,
    /// Any other packet of a socket owning its tuple: marked, taken up the stack, found
    /// there by the kernel's own lookup.
    Marked,
    /// A SYN-ACK to a socket owning its tuple (ztunnel's own connection being opened):
    /// marked like [`Verdict::Marked`], and the flow as ztunnel opened it (the reverse of
    /// this packet) remembered in `ZT_FLOWS`, so that step 3 drops its packets once the
    /// socket is gone.
    MarkedOpening,
    /// A SYN assigned to a listener: taken up the stack, the flow remembered in
    /// `ZT_FLOWS`.
    AssignedListener(Listener),
    /// An enrolled pod's address on a foreign interface: dropped, counted on the source.
    DropSpoofed,
    /// A SYN ztunnel should take but cannot (no listener), or a packet from or to a held
    /// pod: dropped (fail closed), counted on the [`Facts::charged`] end as
    /// `dropped_no_proxy`.
    DropFailClosed,
    /// Any other packet of a flow ztunnel captured whose socket is gone (ztunnel died, or
    /// the packet came late, after both ends closed): dropped (fail closed), counted on the
    /// [`Facts::charged`] end as `dropped_socket_gone`.
    DropSocketGone,
    /// To or from an enrolled pod, possibly TCP, but its TCP header cannot be read (a
    /// fragment, an IPv6 extension-header chain the program cannot walk, a header cut
    /// short: `parse::L4::Unparsed`): dropped, counted in `ZT_DROPS`, never passed
    /// uncaptured.
    DropUnparsed,
}

impl Verdict {
    /// The program marks the sending pod's own socket as captured (`ZT_CAPTURED_SK`): for
    /// a pod's SYN handed to the outbound listener (its socket is the connecting one), and
    /// for every other packet a pod sends to a ztunnel socket (the first one after a
    /// delivered connection is established is what marks the pod's server side; the
    /// kernel keeps no storage on a socket still in its handshake). Once marked, step 3
    /// drops the socket's packets whenever no ztunnel socket owns them, whatever
    /// `ZT_FLOWS` still holds. (The program narrows [`Verdict::Marked`] further: only a
    /// packet to a socket ztunnel opened, once per flow; an outbound pod socket was marked
    /// at its SYN.)
    pub fn marks_pod_socket(self, f: &Facts) -> bool {
        f.from_own_pod()
            && matches!(
                self,
                Verdict::AssignedListener(Listener::Outbound) | Verdict::Assigned | Verdict::Marked
            )
    }

    /// The packet is counted (packets, bytes) on its enrolled ends: it went past the
    /// address checks, whatever happened next.
    pub fn counted(self) -> bool {
        !matches!(
            self,
            Verdict::Continue | Verdict::DropSpoofed | Verdict::DropUnparsed
        )
    }
}

/// The verdict for a packet whose TCP header cannot be read (`parse::L4::Unparsed`; only
/// its addresses are known, so `f.tcp_flags` and `f.dport` are not looked at). It might
/// be the packet of a connection that would otherwise be captured, so wherever a TCP
/// packet with these addresses could be ztunnel's it is dropped: a pod must not get past
/// capture, and its policy, by fragmenting or by adding IPv6 extension headers.
pub fn decide_unparsed(f: &Facts) -> Verdict {
    if f.settings.flags & SETTINGS_ENABLED == 0 {
        return Verdict::Continue;
    }
    if f.spoofed() {
        return Verdict::DropSpoofed;
    }
    if f.src_outbound() || f.dst_inbound() {
        return Verdict::DropUnparsed;
    }
    Verdict::Continue
}

/// The verdict for a packet, asking `look` for what the facts do not say (see the module
/// documentation for the steps).
pub fn decide<L: Lookups>(f: &Facts, look: &mut L) -> Verdict {
    // 0. Nothing to do before the loader has written the settings; then, anti-spoofing.
    if f.settings.flags & SETTINGS_ENABLED == 0 {
        return Verdict::Continue;
    }
    if f.spoofed() {
        return Verdict::DropSpoofed;
    }
    // Held pods: ztunnel cannot capture them (or cannot tell which interface is theirs),
    // so nothing of theirs moves, whatever the flow and whichever interface it is seen
    // on; only their node may still talk to them (probes: the replies are the pod's).
    if f.src_held() && !f.dst_held() && look.dst_is_node() {
        return Verdict::Direct;
    }
    if f.src_held() || f.dst_held() {
        return Verdict::DropFailClosed;
    }
    let src_out = f.src_outbound();
    let dst_in = f.dst_inbound();
    // 1. Not an enrolled pod's traffic, but it may still belong to a flow captured before
    //    the pod was unenrolled: that flow keeps going through ztunnel.
    if !src_out && !dst_in && !look.flow_captured() {
        return Verdict::Continue;
    }
    // 2. A ztunnel socket already owns this flow (also the replies to its own
    //    original-source connections).
    if f.is_syn() {
        if look.take_existing(Take::Assign) {
            return Verdict::Assigned;
        }
    } else if look.take_existing(Take::Mark) {
        // A SYN-ACK to a ztunnel socket answers one of ztunnel's own connections (its
        // delivery to a pod, with the client's address; a dial upstream): remembered, so
        // that once the socket is gone the flow's packets are dropped, not passed on.
        return if f.is_syn_ack() {
            Verdict::MarkedOpening
        } else {
            Verdict::Marked
        };
    }
    // 3. Ours but its socket is gone: never let it out in plaintext. Else a flow from
    //    before enrollment: let it finish on the direct path.
    if !f.is_syn() {
        if look.flow_captured()
            || look.reverse_captured()
            || (f.from_own_pod() && look.pod_socket_captured())
        {
            return Verdict::DropSocketGone;
        }
        return Verdict::Direct;
    }
    // 4. A new connection.
    if look.port_excluded() {
        return Verdict::Direct;
    }
    let Some(listener) = listener_for(f, || look.dst_is_node()) else {
        // An enrolled pod calling its own node (kubelet, node-local agents): direct.
        return Verdict::Direct;
    };
    // 5. Fail closed when ztunnel is not listening (stopped, crashed, restarting).
    if look.assign_listener(listener.port(&f.settings)) {
        Verdict::AssignedListener(listener)
    } else {
        Verdict::DropFailClosed
    }
}

/// Step 4's listener for a new connection of an enrolled pod: outbound for one it opens
/// (unless to its own node: `None`, direct), else by port for one it receives. Asks
/// `dst_is_node` only for an outbound one.
pub fn listener_for(f: &Facts, dst_is_node: impl FnOnce() -> bool) -> Option<Listener> {
    let (src_out, dst_in) = (f.src_outbound(), f.dst_inbound());
    if src_out && !dst_is_node() {
        Some(Listener::Outbound)
    } else if dst_in && !src_out {
        Some(if f.dport == f.settings.inbound_hbone_port {
            Listener::InboundHbone
        } else {
            Listener::InboundPlain
        })
    } else {
        None
    }
}

/// The verdict on a bridge's own device, which sees what the bridge passes up from its
/// ports. A SYN the program assigned at a port (it carries the capture mark) may have lost
/// that assignment on the way: br_netfilter's bridge PREROUTING hook (with
/// `bridge-nf-call-iptables=1`, as kubeadm requires) orphans every IP packet. It is
/// assigned again, to the socket owning its tuple (as [`Take::Assign`] at the port) or
/// else to the listener of [`listener_for`]: [`Verdict::Assigned`]; failing both it is
/// dropped ([`Verdict::DropFailClosed`]: the port took it, it must not go anywhere else).
/// Everything else was decided at the port: [`Verdict::Continue`] (packets taken there
/// without assignment are found by the kernel's own lookup). Nothing is counted here.
pub fn decide_on_bridge<L: Lookups>(f: &Facts, marked: bool, look: &mut L) -> Verdict {
    if f.settings.flags & SETTINGS_ENABLED == 0 || !marked || !f.is_syn() {
        return Verdict::Continue;
    }
    if look.take_existing(Take::Assign) {
        return Verdict::Assigned;
    }
    match listener_for(f, || look.dst_is_node()) {
        Some(l) if look.assign_listener(l.port(&f.settings)) => Verdict::Assigned,
        _ => Verdict::DropFailClosed,
    }
}

#[cfg(test)]
mod tests;
