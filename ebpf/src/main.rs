//! The capture program: one TC ingress classifier, attached to the host side of each
//! pod's interface and to the node's other links.
//!
//! For each TCP packet it parses the header, looks up its addresses, and lets
//! [`decide`] (in `ztunnel-ebpf-common`, where the steps are documented and
//! table-tested) choose, answering its questions through [`Kernel`]: whether a ztunnel
//! socket owns the flow (then the packet is assigned to it), whether a SYN goes to
//! ztunnel's transparent listener (15001 outbound, 15008 for HBONE, 15006 for other
//! inbound), whether a packet of a captured flow has lost its socket (ztunnel died: drop,
//! fail closed), or whether the packet is not ztunnel's to take (flows opened before
//! enrollment, other traffic). Then it acts on the verdict.
//!
//! Taken packets get the capture mark, which policy routing turns into local delivery;
//! only SYNs are also `bpf_sk_assign`ed (`Take` in `decide` says why).
//!
//! Living beside the CNI: a packet the program does not take gets the neutral verdict
//! (`VERDICT_CONTINUE`: `TCX_NEXT` / `TC_ACT_UNSPEC`), so the CNI's own programs and tc
//! filters after ours run exactly as they would without ztunnel. Only packets assigned to
//! a ztunnel socket (`TC_ACT_OK`) or dropped to fail closed (`TC_ACT_SHOT`) end the chain.
#![no_std]
#![no_main]

mod captured_sockets;
mod dns;
mod last_hop;
mod sockets;
mod sockmap;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use sockets::{assign_listener, take_existing, Taken};
use ztunnel_ebpf_common::{
    decide::{decide, decide_on_bridge, decide_unparsed, End, Facts, Lookups, Take, Verdict},
    dns::DNS_PORT,
    last_hop::LAST_HOP_COUNTERS,
    parse::{self, Reader, L4},
    sockmap::{SockKey, SockmapCounters, SockmapSettings},
    FlowKey, IfaceInfo, PodCounters, PodInfo, PodKey, Settings, DROP_REASONS, DROP_UNPARSED,
    IFACE_BRIDGE, IFACE_BRIDGE_PORT, IFACE_L3, IFACE_PEER_NETNS, SETTINGS_LOG_FLOWS,
    VERDICT_CONTINUE,
};

/// Defines one static per map of `ztunnel_ebpf_common::with_map_names!`, named from that
/// list (a map missing here fails to compile; a test checks the built object).
macro_rules! capture_maps {
    ($($(#[$doc:meta])* $id:ident = $name:tt,)*) => {
        $(capture_maps!(@map $id $name);)*
    };
    (@map PODS $name:tt) => {
        #[map(name = $name)]
        static PODS: HashMap<PodKey, PodInfo> = HashMap::pinned(16384, 0);
    };
    (@map SETTINGS $name:tt) => {
        #[map(name = $name)]
        static SETTINGS: Array<Settings> = Array::pinned(1, 0);
    };
    (@map EXCLUDED_PORTS $name:tt) => {
        #[map(name = $name)]
        static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);
    };
    (@map NODE_ADDRS $name:tt) => {
        #[map(name = $name)]
        static NODE_ADDRS: HashMap<PodKey, u8> = HashMap::pinned(256, 0);
    };
    (@map CAPTURED_FLOWS $name:tt) => {
        #[map(name = $name)]
        static CAPTURED_FLOWS: LruHashMap<FlowKey, u8> = LruHashMap::pinned(65536, 0);
    };
    (@map COUNTERS $name:tt) => {
        #[map(name = $name)]
        static COUNTERS: PerCpuHashMap<PodKey, PodCounters> = PerCpuHashMap::pinned(16384, 0);
    };
    (@map IFACES $name:tt) => {
        #[map(name = $name)]
        static IFACES: HashMap<u32, IfaceInfo> = HashMap::pinned(16384, 0);
    };
    (@map SOCKS $name:tt) => {
        #[map(name = $name)]
        static SOCKS: SockHash<SockKey> = SockHash::pinned(131072, 0);
    };
    (@map SOCK_CFG $name:tt) => {
        #[map(name = $name)]
        static SOCK_CFG: Array<SockmapSettings> = Array::pinned(1, 0);
    };
    (@map SYN_SEQ $name:tt) => {
        #[map(name = $name)]
        static SYN_SEQ: LruHashMap<FlowKey, u32> = LruHashMap::pinned(65536, 0);
    };
    (@map SOCK_PEND $name:tt) => {
        #[map(name = $name)]
        static SOCK_PEND: LruHashMap<SockKey, u8> = LruHashMap::pinned(16384, 0);
    };
    (@map SOCK_EXCL $name:tt) => {
        #[map(name = $name)]
        static SOCK_EXCL: HashMap<u16, u8> = HashMap::pinned(256, 0);
    };
    (@map SOCK_COUNTERS $name:tt) => {
        #[map(name = $name)]
        static SOCK_COUNTERS: PerCpuArray<SockmapCounters> = PerCpuArray::pinned(1, 0);
    };
    (@map DROPS $name:tt) => {
        #[map(name = $name)]
        static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(DROP_REASONS, 0);
    };
    (@map SCRATCH $name:tt) => {
        /// Per-packet working memory, one per CPU (a program runs to completion on its
        /// CPU); nothing in it outlives the packet, so it is not pinned.
        #[map(name = $name)]
        static SCRATCH: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);
    };
    // BTF maps, defined in `sockmap` and `captured_sockets` (socket storage needs BTF).
    (@map SOCK_STATE $name:tt) => {};
    (@map CAPTURED_SOCKETS $name:tt) => {};
    (@map LAST_HOP $name:tt) => {
        #[map(name = $name)]
        static LAST_HOP: LruHashMap<FlowKey, u8> = LruHashMap::pinned(65536, 0);
    };
    (@map LAST_HOP_EVENTS $name:tt) => {
        /// 256 KiB (a power-of-two number of pages, as the kernel requires): room for
        /// about 5,900 questions of 36 bytes and their 8-byte headers. When it is full
        /// the SYN is dropped unasked and its retransmission asks again.
        #[map(name = $name)]
        static LAST_HOP_EVENTS: RingBuf = RingBuf::pinned(1 << 18, 0);
    };
    (@map LAST_HOP_COUNT $name:tt) => {
        #[map(name = $name)]
        static LAST_HOP_COUNT: PerCpuArray<u64> = PerCpuArray::pinned(LAST_HOP_COUNTERS, 0);
    };
}
ztunnel_ebpf_common::with_map_names!(capture_maps);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const TCP_STATE_LISTEN: u32 = 10;

/// The fields of a TCP packet the decision needs. It lives in `SCRATCH`, not on the
/// stack: kernels before 6.9 allow 512 bytes of stack for a whole call chain (each frame
/// rounded up to 32 bytes), and the packet's addresses alone are 64 bytes per copy.
#[repr(C)]
pub(crate) struct Packet {
    /// The addresses and ports (network byte order), which are also the flow's key.
    flow: FlowKey,
    v6: bool,
    flags: u8,
    /// Sequence number, host byte order.
    seq: u32,
    len: u32,
}

impl Packet {
    fn src(&self) -> &PodKey {
        pod_key(&self.flow.saddr)
    }
    fn dst(&self) -> &PodKey {
        pod_key(&self.flow.daddr)
    }
}

/// An address of a packet as a `ZT_PODS` key, in place (no copy on the stack).
fn pod_key(addr: &[u8; 16]) -> &PodKey {
    // SAFETY: PodKey is a #[repr(C)] wrapper of exactly one [u8; 16].
    unsafe { &*(addr as *const [u8; 16]).cast::<PodKey>() }
}

/// What [`parse`] found.
#[derive(PartialEq, Eq)]
enum Parsed {
    /// TCP: the packet is filled in.
    Tcp,
    /// Maybe TCP, but its header cannot be read (`parse::L4::Unparsed`): only the
    /// addresses are filled in.
    Unparsed,
    /// UDP to port 53 (`ztunnel_ebpf_common::dns`): addresses and ports filled in.
    Dns,
    /// Not TCP, not IP, or UDP to another port.
    Other,
}

#[classifier]
pub fn zt_capture(ctx: TcContext) -> i32 {
    match capture(&ctx) {
        Ok(action) => action,
        // A packet the program cannot parse is not one it takes.
        Err(()) => VERDICT_CONTINUE,
    }
}

fn capture(ctx: &TcContext) -> Result<i32, ()> {
    // SAFETY: reading a field of the context's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain lookup; the value is copied out.
    let iface = unsafe { IFACES.get(&ifindex) }.copied().unwrap_or_default();
    let pkt = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch value; nothing else uses it while the program runs.
    let pkt = unsafe { &mut *pkt };
    // Parse.
    match parse(ctx, &iface, pkt)? {
        Parsed::Tcp => {}
        Parsed::Unparsed => return Ok(unparsed(ifindex, pkt)),
        Parsed::Dns => return Ok(dns::capture(ctx, &iface, ifindex, pkt)),
        Parsed::Other => return Ok(VERDICT_CONTINUE),
    }
    // Look up what the packet's addresses are.
    let settings = SETTINGS.get(0).copied().unwrap_or_default();
    let facts = Facts {
        settings,
        ifindex,
        src: pod_info(pkt.src()),
        dst: pod_info(pkt.dst()),
        tcp_flags: pkt.flags,
        dport: u16::from_be(pkt.flow.dport),
    };
    if iface.flags & IFACE_BRIDGE != 0 {
        let mark = settings.capture_mark;
        // SAFETY: reading a field of the context's __sk_buff.
        let marked = mark != 0 && unsafe { (*ctx.skb.skb).mark } & mark == mark;
        let mut kernel = Kernel {
            ctx,
            pkt,
            mark,
            netnsid: None,
            proxy_mark: 0,
            opened: false,
        };
        return Ok(match decide_on_bridge(&facts, marked, &mut kernel) {
            Verdict::Assigned => TC_ACT_OK,
            Verdict::DropFailClosed => TC_ACT_SHOT,
            _ => VERDICT_CONTINUE,
        });
    }
    // Decide, looking up (and assigning to sockets) as the decision asks.
    let netnsid = (iface.flags & IFACE_PEER_NETNS != 0).then_some(iface.peer_netnsid);
    let mut kernel = Kernel {
        ctx,
        pkt,
        mark: settings.capture_mark,
        netnsid,
        proxy_mark: settings.proxy_mark,
        opened: false,
    };
    let verdict = decide(&facts, &mut kernel);

    // Act. Of the packets a pod sends to a ztunnel socket, only those to a socket ztunnel
    // opened (its delivery to the pod: the pod's server side) need the pod's socket
    // marked, and only once; a pod's outbound socket was marked at its SYN. Looking the
    // pod's socket up for every packet cost about 200 ns a packet.
    if let Some(netnsid) = netnsid {
        if verdict.marks_pod_socket(&facts) {
            if verdict != Verdict::Marked {
                captured_sockets::pod_socket(ctx, pkt, netnsid, true, false);
            } else if kernel.opened {
                captured_sockets::mark_delivered_once(ctx, pkt, netnsid, false);
            }
        }
    }
    if verdict.counted() {
        if facts.src_outbound() {
            count_packet(pkt.src(), pkt.len);
        }
        if facts.dst_inbound() {
            count_packet(pkt.dst(), pkt.len);
        }
    }
    Ok(match verdict {
        Verdict::Continue | Verdict::Direct => VERDICT_CONTINUE,
        Verdict::Assigned | Verdict::Marked => taken(ctx, &iface),
        Verdict::MarkedOpening => {
            remember_reverse(&pkt.flow);
            taken(ctx, &iface)
        }
        Verdict::AssignedListener(listener) => {
            let _ = CAPTURED_FLOWS.insert(&pkt.flow, &1, 0);
            let outbound = listener.is_outbound();
            if outbound {
                sockmap::remember_syn(&pkt.flow, pkt.seq);
            }
            if let Some(c) = counters(if outbound { pkt.src() } else { pkt.dst() }) {
                if outbound {
                    c.outbound_flows += 1;
                } else {
                    c.inbound_flows += 1;
                }
            }
            if settings.flags & SETTINGS_LOG_FLOWS != 0 {
                log_flow(ctx, pkt, outbound, listener.port(&settings));
            }
            taken(ctx, &iface)
        }
        Verdict::DropSpoofed => {
            if let Some(c) = counters(pkt.src()) {
                c.dropped_spoofed += 1;
            }
            TC_ACT_SHOT
        }
        Verdict::DropFailClosed | Verdict::DropSocketGone => {
            let charged = match facts.charged() {
                Some(End::Src) => Some(pkt.src()),
                Some(End::Dst) => Some(pkt.dst()),
                None => None,
            };
            if let Some(c) = charged.and_then(counters) {
                if verdict == Verdict::DropSocketGone {
                    c.dropped_socket_gone += 1;
                } else {
                    c.dropped_no_proxy += 1;
                }
            }
            TC_ACT_SHOT
        }
        Verdict::DropUnparsed => TC_ACT_SHOT,
    })
}

/// A packet that may be TCP but whose TCP header cannot be read: dropped if it is to or
/// from an enrolled pod (see `decide_unparsed`), else left alone.
#[inline(never)]
fn unparsed(ifindex: u32, pkt: &Packet) -> i32 {
    let facts = Facts {
        settings: SETTINGS.get(0).copied().unwrap_or_default(),
        ifindex,
        src: pod_info(pkt.src()),
        dst: pod_info(pkt.dst()),
        tcp_flags: 0,
        dport: 0,
    };
    match decide_unparsed(&facts) {
        Verdict::DropUnparsed => {
            if let Some(n) = DROPS.get_ptr_mut(DROP_UNPARSED) {
                // SAFETY: a per-CPU value: only this CPU touches it while the program runs.
                unsafe { *n += 1 };
            }
            TC_ACT_SHOT
        }
        Verdict::DropSpoofed => {
            if let Some(c) = counters(pkt.src()) {
                c.dropped_spoofed += 1;
            }
            TC_ACT_SHOT
        }
        _ => VERDICT_CONTINUE,
    }
}

/// The answers to the decision's questions, from the maps and the kernel's socket lookup.
struct Kernel<'a> {
    ctx: &'a TcContext,
    pkt: &'a Packet,
    mark: u32,
    /// The namespace of the arrival interface's peer (a pod's), if it is a pod's veth.
    netnsid: Option<i32>,
    /// `SO_MARK` of the sockets ztunnel opens.
    proxy_mark: u32,
    /// Set by `take_existing`: the socket that took the packet is one ztunnel opened.
    opened: bool,
}

impl Lookups for Kernel<'_> {
    fn flow_captured(&mut self) -> bool {
        CAPTURED_FLOWS.get_ptr(&self.pkt.flow).is_some()
    }
    fn reverse_captured(&mut self) -> bool {
        reverse_captured(&self.pkt.flow)
    }
    fn take_existing(&mut self, how: Take) -> bool {
        let taken = take_existing(self.ctx, self.pkt, self.mark, how, self.proxy_mark);
        self.opened = taken == Taken::Opened;
        taken != Taken::No
    }
    fn port_excluded(&mut self) -> bool {
        EXCLUDED_PORTS
            .get_ptr(u16::from_be(self.pkt.flow.dport))
            .is_some()
    }
    fn dst_is_node(&mut self) -> bool {
        NODE_ADDRS.get_ptr(self.pkt.dst()).is_some()
    }
    fn assign_listener(&mut self, port: u16) -> bool {
        assign_listener(self.ctx, self.pkt, port, self.mark)
    }
    fn pod_socket_captured(&mut self) -> bool {
        self.netnsid
            .is_some_and(|n| captured_sockets::pod_socket(self.ctx, self.pkt, n, false, false))
    }
}

/// The verdict for a packet assigned to a ztunnel socket: it goes up the node's stack
/// now. On a bridge port that needs the frame addressed to the bridge itself: one for
/// another pod on the same bridge would otherwise be switched to it at layer 2, past
/// ztunnel (and past the assignment).
fn taken(ctx: &TcContext, iface: &IfaceInfo) -> i32 {
    if iface.flags & IFACE_BRIDGE_PORT != 0 {
        let dst: [u8; 6] = ctx.load(0).unwrap_or([0; 6]);
        if dst != iface.bridge_mac && ctx.store(0, &iface.bridge_mac, 0).is_err() {
            // Left as it was, the frame would bypass ztunnel: never let it out.
            return TC_ACT_SHOT;
        }
    }
    TC_ACT_OK
}

/// One debug line per captured flow, for `RUST_LOG=ztunnel_capture=debug`. Never inlined:
/// the record is built in a frame of its own, only when the log is on, instead of in the
/// main frame of every packet (kernels before 6.9 allow 512 bytes of stack for the whole
/// call chain, each frame rounded up to 32).
#[inline(never)]
fn log_flow(ctx: &TcContext, pkt: &Packet, outbound: bool, listen_port: u16) {
    let direction = if outbound { "outbound" } else { "inbound" };
    debug!(
        ctx,
        "{} flow {:i}:{} -> {:i}:{} to listener {}",
        direction,
        pkt.flow.saddr,
        u16::from_be(pkt.flow.sport),
        pkt.flow.daddr,
        u16::from_be(pkt.flow.dport),
        listen_port
    );
}

/// Reads the packet for `parse::ipv4` / `parse::ipv6`.
struct Skb<'a>(&'a TcContext);

impl Reader for Skb<'_> {
    fn u8_at(&mut self, offset: usize) -> Option<u8> {
        self.0.load(offset).ok()
    }
    fn u16_at(&mut self, offset: usize) -> Option<u16> {
        self.0.load::<u16>(offset).ok().map(u16::from_be)
    }
}

/// Finds the packet's addresses and TCP header. The family comes from `skb->protocol`,
/// which the kernel sets on every device; the IP header is past the Ethernet header,
/// except on devices without one (`IFACE_L3`: IPIP, GRE, WireGuard).
fn parse(ctx: &TcContext, iface: &IfaceInfo, pkt: &mut Packet) -> Result<Parsed, ()> {
    let l3 = if iface.flags & IFACE_L3 != 0 {
        0
    } else {
        ETH_HDR_LEN
    };
    // SAFETY: reading a field of the context's __sk_buff (a __be16 in a u32).
    let proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let l4 = match proto {
        ETH_P_IP => {
            let l4 = parse::ipv4(&mut Skb(ctx), l3);
            if l4 == L4::Other {
                return Ok(Parsed::Other);
            }
            let s: [u8; 4] = ctx.load(l3 + 12).map_err(|_| ())?;
            let d: [u8; 4] = ctx.load(l3 + 16).map_err(|_| ())?;
            pkt.flow.saddr = PodKey::v4(s).addr;
            pkt.flow.daddr = PodKey::v4(d).addr;
            pkt.v6 = false;
            l4
        }
        ETH_P_IPV6 => {
            let l4 = parse::ipv6(&mut Skb(ctx), l3);
            if l4 == L4::Other {
                return Ok(Parsed::Other);
            }
            pkt.flow.saddr = ctx.load(l3 + 8).map_err(|_| ())?;
            pkt.flow.daddr = ctx.load(l3 + 24).map_err(|_| ())?;
            pkt.v6 = true;
            l4
        }
        _ => return Ok(Parsed::Other),
    };
    let l4 = match l4 {
        L4::Tcp(l4) => l4,
        L4::Udp(l4) => {
            // Only DNS questions are ztunnel's; every other datagram (VXLAN on an uplink
            // included) stops here, having cost the address reads above and this one.
            let dport: u16 = ctx.load(l4 + 2).map_err(|_| ())?;
            if u16::from_be(dport) != DNS_PORT {
                return Ok(Parsed::Other);
            }
            pkt.flow.sport = ctx.load(l4).map_err(|_| ())?;
            pkt.flow.dport = dport;
            pkt.flags = 0;
            pkt.seq = 0;
            pkt.len = ctx.len();
            return Ok(Parsed::Dns);
        }
        _ => return Ok(Parsed::Unparsed),
    };
    // `parse` checked that the header holds its flags (byte 13).
    pkt.flow.sport = ctx.load(l4).map_err(|_| ())?;
    pkt.flow.dport = ctx.load(l4 + 2).map_err(|_| ())?;
    pkt.flags = ctx.load(l4 + 13).map_err(|_| ())?;
    pkt.seq = u32::from_be(ctx.load(l4 + 4).map_err(|_| ())?);
    pkt.len = ctx.len();
    Ok(Parsed::Tcp)
}

/// The enrolled pod owning `key`, or an all-zero info (not enrolled).
fn pod_info(key: &PodKey) -> PodInfo {
    match PODS.get_ptr(key) {
        // SAFETY: the pointer comes from a successful map lookup.
        Some(info) => unsafe { *info },
        None => PodInfo {
            ifindex: 0,
            flags: 0,
        },
    }
}

/// The reverse of `flow` is in `ZT_FLOWS`. Not inlined: the reversed key gets a frame
/// of its own.
#[inline(never)]
fn reverse_captured(flow: &FlowKey) -> bool {
    CAPTURED_FLOWS.get_ptr(&flow.reversed()).is_some()
}

/// Remembers in `ZT_FLOWS` the flow whose reverse `flow` is (a connection ztunnel opened,
/// answered by this SYN-ACK). Not inlined, like `reverse_captured`.
#[inline(never)]
fn remember_reverse(flow: &FlowKey) {
    let _ = CAPTURED_FLOWS.insert(&flow.reversed(), &1, 0);
}

/// The counters of `pod` on this CPU, created on first use. Not inlined: the new entry's
/// zeroes get a frame of their own, off the main one.
#[inline(never)]
fn counters(pod: &PodKey) -> Option<&'static mut PodCounters> {
    let ptr = match COUNTERS.get_ptr_mut(pod) {
        Some(p) => p,
        None => {
            let _ = COUNTERS.insert(pod, PodCounters::default(), 0);
            COUNTERS.get_ptr_mut(pod)?
        }
    };
    // SAFETY: a per-CPU value: only this CPU touches it while the program runs.
    Some(unsafe { &mut *ptr })
}

fn count_packet(pod: &PodKey, len: u32) {
    if let Some(c) = counters(pod) {
        c.packets += 1;
        c.bytes += len as u64;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
