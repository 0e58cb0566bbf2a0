//! Types shared by the eBPF capture programs and ztunnel's loader.
//!
//! Everything here is `#[repr(C)]` plain data: the same bytes are written by
//! user space into BPF maps and read by the kernel programs.
#![cfg_attr(not(test), no_std)]

pub mod decide;
pub mod dns;
pub mod last_hop;
pub mod parse;
pub mod sockmap;

/// Calls `$then!` with every map of the capture program as `CONST = "name",` (each with
/// its doc comment), in the order of [`maps::ALL`]. This list is the one place the names
/// are written: [`maps`] is generated from it, and so are the program's `#[map(name = …)]`
/// attributes (which take only a literal); a test checks the built object against it.
#[macro_export]
macro_rules! with_map_names {
    ($then:ident) => {
        $then! {
            /// Enrolled pods: [`PodKey`](crate::PodKey) → [`PodInfo`](crate::PodInfo).
            PODS = "ZT_PODS",
            /// One [`Settings`](crate::Settings) value at index 0.
            SETTINGS = "ZT_SETTINGS",
            /// Destination ports never captured: port → 1.
            EXCLUDED_PORTS = "ZT_EXCL_PORTS",
            /// The node's own addresses (kubelet probes and the node itself):
            /// [`PodKey`](crate::PodKey) → 1.
            NODE_ADDRS = "ZT_NODE_ADDRS",
            /// Flows handed to a ztunnel listener: [`FlowKey`](crate::FlowKey) → 1 (LRU). A
            /// packet of such a flow that finds no ztunnel socket is dropped (fail closed),
            /// unlike a flow that predates enrollment, which is let through.
            CAPTURED_FLOWS = "ZT_FLOWS",
            /// Per-pod counters, per CPU: [`PodKey`](crate::PodKey) →
            /// [`PodCounters`](crate::PodCounters).
            COUNTERS = "ZT_COUNTERS",
            /// Interfaces whose captured packets need more than a mark: ifindex →
            /// [`IfaceInfo`](crate::IfaceInfo).
            IFACES = "ZT_IFACES",
            /// Sockmap: the accelerated sockets, [`SockKey`](crate::sockmap::SockKey) →
            /// socket; its `sk_msg` program redirects what each sends to its peer.
            SOCKS = "ZT_SOCKS",
            /// Sockmap: one [`SockmapSettings`](crate::sockmap::SockmapSettings) at index 0.
            SOCK_CFG = "ZT_SOCK_CFG",
            /// Sockmap: the sequence number of each SYN handed to the outbound listener,
            /// [`FlowKey`](crate::FlowKey) → u32 (LRU), so a pod socket is taken only if
            /// this ztunnel captured exactly its connection.
            SYN_SEQ = "ZT_SYN_SEQ",
            /// Sockmap: ztunnel's delivery sockets waiting for the pod's end,
            /// [`SockKey`](crate::sockmap::SockKey) → 1 (LRU).
            SOCK_PEND = "ZT_SOCK_PEND",
            /// Sockmap: destination or source ports never accelerated: port → 1.
            SOCK_EXCL = "ZT_SOCK_EXCL",
            /// Sockmap counters, per CPU, index 0:
            /// [`SockmapCounters`](crate::sockmap::SockmapCounters).
            SOCK_COUNTERS = "ZT_SOCK_COUNT",
            /// Packets dropped node-wide, per CPU, by reason: index [`DROP_UNPARSED`] → count.
            DROPS = "ZT_DROPS",
            /// The capture program's per-packet working memory, per CPU, index 0 (the
            /// parsed packet: kept off the stack, see `ebpf/src/main.rs`). Not pinned.
            SCRATCH = "ZT_SCRATCH",
            /// Sockmap: each accelerated socket's [`SockState`](crate::sockmap::SockState)
            /// (socket storage, a BTF map: not pinned; the programs keep it alive).
            SOCK_STATE = "ZT_SOCK_STATE",
            /// The pod sockets whose connections ztunnel captured: socket storage (a BTF
            /// map, pinned), one `u32` per socket, set to 1 by the capture program on the
            /// pod's own socket, found in the pod's namespace
            /// ([`IfaceInfo::peer_netnsid`](crate::IfaceInfo)). Unlike `ZT_FLOWS` it is
            /// not a bounded table that a flood of SYNs can empty: after a crash, a pod
            /// socket that carries it sends nothing past ztunnel.
            CAPTURED_SOCKETS = "ZT_CAPTURED_SK",
            /// The last hop: ztunnel's verdict for a forwarded connection into an enrolled
            /// pod, [`FlowKey`](crate::FlowKey) with `sport` 0 → `LAST_HOP_*` (LRU); see
            /// [`last_hop`](crate::last_hop).
            LAST_HOP = "ZT_LAST_HOP",
            /// The last hop's questions to ztunnel: a ring buffer of
            /// [`LastHopEvent`](crate::last_hop::LastHopEvent).
            LAST_HOP_EVENTS = "ZT_LAST_HOP_EV",
            /// The last hop's counters, per CPU, by `last_hop::LAST_HOP_*` index.
            LAST_HOP_COUNT = "ZT_LAST_HOP_CNT",
        }
    };
}

/// Names of the maps, as both sides refer to them (generated from
/// [`crate::with_map_names!`]).
pub mod maps {
    macro_rules! names {
        ($($(#[$doc:meta])* $id:ident = $name:literal,)*) => {
            $($(#[$doc])* pub const $id: &str = $name;)*
            /// Every map the program defines, for the check that the built object has
            /// exactly these.
            pub const ALL: &[&str] = &[$($id),*];
        };
    }
    crate::with_map_names!(names);
}

/// The program's verdict for a packet it does not take: "continue". Under TCX this is
/// `TCX_NEXT` (the next program in the chain, then legacy tc filters, then the stack);
/// for a legacy direct-action cls_bpf filter, `TC_ACT_UNSPEC` (the next filter). Both are
/// -1. Any other verdict ends the chain, so the CNI's own programs would never see the
/// packet: only packets ztunnel takes (assigned to its sockets) or must drop get one.
pub const VERDICT_CONTINUE: i32 = -1;

/// Name of the TC program in the object file.
pub const CAPTURE_PROGRAM: &str = "zt_capture";
/// Name of the TC egress program of pods' interfaces (see [`last_hop`]).
pub const LAST_HOP_PROGRAM: &str = "zt_last_hop";
/// Name of the sock_ops program (sockmap: puts the hops' sockets in `ZT_SOCKS`).
pub const SOCKOPS_PROGRAM: &str = "zt_sockops";
/// Name of the sk_msg program (sockmap: redirects sends to the peer socket).
pub const SKMSG_PROGRAM: &str = "zt_skmsg";

/// An IPv4 or IPv6 address in 16 bytes, IPv4 as `::ffff:a.b.c.d` (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PodKey {
    pub addr: [u8; 16],
}

impl PodKey {
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        PodKey { addr }
    }
    pub const fn v6(octets: [u8; 16]) -> Self {
        PodKey { addr: octets }
    }
}

/// What the programs know of an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Host-side interface of the pod (informational; the address is the key).
    pub ifindex: u32,
    /// `POD_FLAG_*` bits.
    pub flags: u32,
}

/// Capture this pod's outbound connections (to 15001).
pub const POD_FLAG_OUTBOUND: u32 = 1;
/// Capture connections addressed to this pod (to 15006 / 15008).
pub const POD_FLAG_INBOUND: u32 = 2;
/// Held: a pod this node should enroll but cannot (its interface is unknown, or two
/// interfaces claim its address), written alone (`ifindex` 0). Never open: every TCP
/// packet from it is dropped on every interface the program sees (but those to the node's
/// own addresses: kubelet's probes), and every TCP packet to it, so nothing of it moves in
/// plaintext while ztunnel cannot capture it.
pub const POD_FLAG_HELD: u32 = 4;

/// Global settings written once by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Packet mark set on every assigned packet; an `ip rule fwmark` sends it to a
    /// `local` route so the kernel delivers it to the assigned socket.
    pub capture_mark: u32,
    /// `SO_MARK` ztunnel puts on its own sockets. The capture program (ingress) never
    /// needs it: the replies to ztunnel's sockets are assigned back to them by the socket
    /// lookup, whatever their mark. The last-hop program (egress) does: a SYN carrying it
    /// is ztunnel delivering a connection it authorized.
    pub proxy_mark: u32,
    pub outbound_port: u16,
    pub inbound_plain_port: u16,
    pub inbound_hbone_port: u16,
    /// `SETTINGS_*` bits. 0 (the map's initial value) means "pass everything".
    pub flags: u16,
    /// The port of ztunnel's DNS socket that enrolled pods' UDP queries to port 53 are
    /// assigned to (see [`dns`]); 0: DNS over UDP is not captured.
    pub dns_port: u16,
    /// Unused; keeps the layout free of implicit padding.
    pub reserved: u16,
}

/// `Settings::flags`: the loader has written real settings.
pub const SETTINGS_ENABLED: u16 = 1;
/// `Settings::flags`: log every captured flow (aya-log, debug level). Set only while
/// ztunnel's log filter shows those records: each one is a ring-buffer write in the packet
/// path and a wake-up of ztunnel's main thread, for a line that would be thrown away.
pub const SETTINGS_LOG_FLOWS: u16 = 2;

/// `Settings::flags`: connections from the node's own sockets (kubelet's probes,
/// hostNetwork pods) to enrolled pods meet the pod's policy at the last hop like any
/// other source, instead of being exempt (`--host-probes policy`).
pub const SETTINGS_HOST_UNDER_POLICY: u16 = 4;

/// What the program needs to know about an interface beyond its index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// MAC address of the bridge this interface is a port of (with `IFACE_BRIDGE_PORT`).
    pub bridge_mac: [u8; 6],
    /// `IFACE_*` bits.
    pub flags: u16,
    /// With `IFACE_PEER_NETNS`: the id, in the node's namespace, of the namespace holding
    /// this veth's peer (the pod's), as `bpf_skc_lookup_tcp` takes it to find the pod's
    /// own socket of a flow.
    pub peer_netnsid: i32,
}

/// `IfaceInfo::flags`: the interface is a port of a Linux bridge (a bridge CNI's pod
/// veth). A packet the program assigns there must go up the node's IP stack, but a frame
/// addressed to another port's MAC (a pod on the same bridge) would be switched at layer 2
/// past ztunnel: the program rewrites its destination MAC to the bridge's own, so the
/// bridge passes it up.
pub const IFACE_BRIDGE_PORT: u16 = 1;
/// `IfaceInfo::flags`: the interface has no MAC header (IPIP `tunl0`, GRE, WireGuard:
/// `ARPHRD_NONE` and the tunnel types). At TC its packets start at the IP header, so the
/// program reads them from offset 0 instead of past an Ethernet header.
pub const IFACE_L3: u16 = 2;
/// `IfaceInfo::flags`: `peer_netnsid` is the namespace of this veth's peer (a pod's
/// interface), where the program looks up the pod's own sockets.
pub const IFACE_PEER_NETNS: u16 = 8;

/// `ZT_DROPS` index: packets to or from an enrolled pod that may be TCP but whose TCP
/// header the program cannot read (fragments, IPv6 extension-header chains it cannot walk,
/// headers cut short; see [`parse`]).
pub const DROP_UNPARSED: u32 = 0;
/// Entries of `ZT_DROPS`.
pub const DROP_REASONS: u32 = 1;

/// `IfaceInfo::flags`: the interface is a bridge's own device (`bridge_mac` is its MAC).
/// There the program only gives back to a SYN taken at a port the socket br_netfilter
/// took from it ([`decide::decide_on_bridge`]); everything else was decided at the port.
pub const IFACE_BRIDGE: u16 = 4;

/// A TCP flow as seen from the packet that opened it (client → server).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in network byte order.
    pub sport: u16,
    pub dport: u16,
}

impl FlowKey {
    /// The same flow seen from the other end (a reply's packet, or the flow a reply
    /// answers).
    #[inline(always)]
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// Per-pod counters (one copy per CPU; user space sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// Connections this pod opened that were handed to ztunnel's outbound listener.
    pub outbound_flows: u64,
    /// Connections to this pod handed to ztunnel's inbound listeners.
    pub inbound_flows: u64,
    /// Packets (and bytes) of this pod's TCP seen by the capture program, either direction.
    pub packets: u64,
    pub bytes: u64,
    /// SYNs dropped because no ztunnel listener was there (fail closed), and packets from
    /// or to a held pod.
    pub dropped_no_proxy: u64,
    /// Packets carrying this pod's address that arrived on another interface than its
    /// own veth (another pod spoofing it): dropped.
    pub dropped_spoofed: u64,
    /// Other packets of captured flows whose ztunnel socket is gone (ztunnel died, or they
    /// came late, after the flow closed): dropped.
    pub dropped_socket_gone: u64,
    /// This pod's DNS questions over UDP handed to ztunnel's DNS proxy.
    pub dns_captured: u64,
    /// This pod's DNS questions over UDP that found no ztunnel DNS socket (ztunnel down)
    /// and went on to the server the pod asked (DNS fails open, see [`dns`]).
    pub dns_passed: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all types are #[repr(C)] plain old data without padding-sensitive invariants.
    unsafe impl aya::Pod for super::PodKey {}
    unsafe impl aya::Pod for super::PodInfo {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::PodCounters {}
    unsafe impl aya::Pod for super::IfaceInfo {}
    unsafe impl aya::Pod for super::sockmap::SockKey {}
    unsafe impl aya::Pod for super::sockmap::SockmapSettings {}
    unsafe impl aya::Pod for super::sockmap::SockmapCounters {}
    unsafe impl aya::Pod for super::last_hop::LastHopEvent {}
}
