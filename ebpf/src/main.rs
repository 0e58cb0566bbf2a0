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

mod sockmap;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use ztunnel_ebpf_common::{
    decide::{decide, End, Facts, Lookups, Take, Verdict},
    sockmap::{SockKey, SockmapCounters, SockmapSettings},
    FlowKey, IfaceInfo, PodCounters, PodInfo, PodKey, Settings, IFACE_BRIDGE_PORT,
    SETTINGS_LOG_FLOWS, VERDICT_CONTINUE,
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
    // A BTF map, defined in `sockmap` (socket storage needs BTF).
    (@map SOCK_STATE $name:tt) => {};
}
ztunnel_ebpf_common::with_map_names!(capture_maps);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_STATE_LISTEN: u32 = 10;

/// The fields of a TCP packet the decision needs.
struct Packet {
    v6: bool,
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// Network byte order, as in the header.
    sport: u16,
    dport: u16,
    flags: u8,
    /// Sequence number, host byte order.
    seq: u32,
    len: u32,
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
    // Parse.
    let Some(pkt) = parse(ctx)? else {
        return Ok(VERDICT_CONTINUE);
    };
    // Look up what the packet's addresses are.
    let settings = SETTINGS.get(0).copied().unwrap_or_default();
    let src = PodKey { addr: pkt.saddr };
    let dst = PodKey { addr: pkt.daddr };
    let facts = Facts {
        settings,
        // SAFETY: reading a field of the context's __sk_buff.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        src: pod_info(&src),
        dst: pod_info(&dst),
        tcp_flags: pkt.flags,
        dport: u16::from_be(pkt.dport),
    };
    let flow = FlowKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
    };
    // Decide, looking up (and assigning to sockets) as the decision asks.
    let verdict = decide(
        &facts,
        &mut Kernel {
            ctx,
            pkt: &pkt,
            flow: &flow,
            dst: &dst,
            mark: settings.capture_mark,
        },
    );

    // Act.
    if verdict.counted() {
        if facts.src_outbound() {
            count_packet(&src, &pkt);
        }
        if facts.dst_inbound() {
            count_packet(&dst, &pkt);
        }
    }
    Ok(match verdict {
        Verdict::Continue | Verdict::Direct => VERDICT_CONTINUE,
        Verdict::Assigned | Verdict::Marked => taken(ctx, facts.ifindex),
        Verdict::AssignedListener(listener) => {
            let _ = CAPTURED_FLOWS.insert(flow, 1, 0);
            let outbound = listener.is_outbound();
            if outbound {
                sockmap::remember_syn(&flow, pkt.seq);
            }
            if let Some(c) = counters(if outbound { &src } else { &dst }) {
                if outbound {
                    c.outbound_flows += 1;
                } else {
                    c.inbound_flows += 1;
                }
            }
            if settings.flags & SETTINGS_LOG_FLOWS != 0 {
                log_flow(ctx, &pkt, outbound, listener.port(&settings));
            }
            taken(ctx, facts.ifindex)
        }
        Verdict::DropSpoofed => {
            if let Some(c) = counters(&src) {
                c.dropped_spoofed += 1;
            }
            TC_ACT_SHOT
        }
        Verdict::DropFailClosed => {
            let charged = match facts.charged() {
                Some(End::Src) => Some(&src),
                Some(End::Dst) => Some(&dst),
                None => None,
            };
            if let Some(c) = charged.and_then(counters) {
                c.dropped_no_proxy += 1;
            }
            TC_ACT_SHOT
        }
    })
}

/// The answers to the decision's questions, from the maps and the kernel's socket lookup.
struct Kernel<'a> {
    ctx: &'a TcContext,
    pkt: &'a Packet,
    flow: &'a FlowKey,
    dst: &'a PodKey,
    mark: u32,
}

impl Lookups for Kernel<'_> {
    fn flow_captured(&mut self) -> bool {
        is_captured(self.flow)
    }
    fn reverse_captured(&mut self) -> bool {
        is_captured(&reversed(self.flow))
    }
    fn take_existing(&mut self, how: Take) -> bool {
        take_existing(self.ctx, self.pkt, self.mark, how)
    }
    fn port_excluded(&mut self) -> bool {
        EXCLUDED_PORTS
            .get_ptr(u16::from_be(self.pkt.dport))
            .is_some()
    }
    fn dst_is_node(&mut self) -> bool {
        NODE_ADDRS.get_ptr(self.dst).is_some()
    }
    fn assign_listener(&mut self, port: u16) -> bool {
        assign_listener(self.ctx, self.pkt, port, self.mark)
    }
}

/// The verdict for a packet assigned to a ztunnel socket: it goes up the node's stack
/// now. On a bridge port that needs the frame addressed to the bridge itself: one for
/// another pod on the same bridge would otherwise be switched to it at layer 2, past
/// ztunnel (and past the assignment).
fn taken(ctx: &TcContext, ifindex: u32) -> i32 {
    // SAFETY: a plain lookup; the value is copied out.
    if let Some(iface) = unsafe { IFACES.get(&ifindex) } {
        if iface.flags & IFACE_BRIDGE_PORT != 0 {
            let dst: [u8; 6] = ctx.load(0).unwrap_or([0; 6]);
            if dst != iface.bridge_mac && ctx.store(0, &iface.bridge_mac, 0).is_err() {
                // Left as it was, the frame would bypass ztunnel: never let it out.
                return TC_ACT_SHOT;
            }
        }
    }
    TC_ACT_OK
}

/// One debug line per captured flow, for `RUST_LOG=ztunnel_capture=debug`.
fn log_flow(ctx: &TcContext, pkt: &Packet, outbound: bool, listen_port: u16) {
    let direction = if outbound { "outbound" } else { "inbound" };
    debug!(
        ctx,
        "{} flow {:i}:{} -> {:i}:{} to listener {}",
        direction,
        pkt.saddr,
        u16::from_be(pkt.sport),
        pkt.daddr,
        u16::from_be(pkt.dport),
        listen_port
    );
}

fn parse(ctx: &TcContext) -> Result<Option<Packet>, ()> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    let (v6, saddr, daddr, l4) = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HDR_LEN).map_err(|_| ())?;
            let proto: u8 = ctx.load(ETH_HDR_LEN + 9).map_err(|_| ())?;
            if proto != IPPROTO_TCP {
                return Ok(None);
            }
            // Fragments other than the first carry no TCP header.
            let frag: u16 = u16::from_be(ctx.load(ETH_HDR_LEN + 6).map_err(|_| ())?);
            if frag & 0x1fff != 0 {
                return Ok(None);
            }
            let s: [u8; 4] = ctx.load(ETH_HDR_LEN + 12).map_err(|_| ())?;
            let d: [u8; 4] = ctx.load(ETH_HDR_LEN + 16).map_err(|_| ())?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Ok(None);
            }
            (
                false,
                PodKey::v4(s).addr,
                PodKey::v4(d).addr,
                ETH_HDR_LEN + ihl,
            )
        }
        ETH_P_IPV6 => {
            let next: u8 = ctx.load(ETH_HDR_LEN + 6).map_err(|_| ())?;
            if next != IPPROTO_TCP {
                // Extension headers are not followed: such packets are left alone.
                return Ok(None);
            }
            let s: [u8; 16] = ctx.load(ETH_HDR_LEN + 8).map_err(|_| ())?;
            let d: [u8; 16] = ctx.load(ETH_HDR_LEN + 24).map_err(|_| ())?;
            (true, s, d, ETH_HDR_LEN + 40)
        }
        _ => return Ok(None),
    };
    let sport: u16 = ctx.load(l4).map_err(|_| ())?;
    let dport: u16 = ctx.load(l4 + 2).map_err(|_| ())?;
    let flags: u8 = ctx.load(l4 + 13).map_err(|_| ())?;
    let seq = u32::from_be(ctx.load(l4 + 4).map_err(|_| ())?);
    Ok(Some(Packet {
        v6,
        saddr,
        daddr,
        sport,
        dport,
        flags,
        seq,
        len: ctx.len(),
    }))
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

fn is_captured(flow: &FlowKey) -> bool {
    CAPTURED_FLOWS.get_ptr(flow).is_some()
}

fn reversed(flow: &FlowKey) -> FlowKey {
    FlowKey {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
    }
}

/// Builds the lookup tuple for `pkt`, with the destination port replaced by `dport`.
fn tuple(pkt: &Packet, dport: u16) -> (bpf_sock_tuple, u32) {
    // SAFETY: bpf_sock_tuple is plain data; all-zero is a valid value.
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    if pkt.v6 {
        // SAFETY: writing the ipv6 member of the union.
        unsafe {
            t.__bindgen_anon_1.ipv6.saddr = core::mem::transmute::<[u8; 16], [u32; 4]>(pkt.saddr);
            t.__bindgen_anon_1.ipv6.daddr = core::mem::transmute::<[u8; 16], [u32; 4]>(pkt.daddr);
            t.__bindgen_anon_1.ipv6.sport = pkt.sport;
            t.__bindgen_anon_1.ipv6.dport = dport;
        }
        (t, 36)
    } else {
        let s = [pkt.saddr[12], pkt.saddr[13], pkt.saddr[14], pkt.saddr[15]];
        let d = [pkt.daddr[12], pkt.daddr[13], pkt.daddr[14], pkt.daddr[15]];
        // Writing a Copy member of a union is safe; only reads need `unsafe`.
        t.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes(s);
        t.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(d);
        t.__bindgen_anon_1.ipv4.sport = pkt.sport;
        t.__bindgen_anon_1.ipv4.dport = dport;
        (t, 12)
    }
}

/// Takes the packet to a non-listening socket of exactly its flow, if one exists: marked,
/// and assigned to it if `how` says so (see [`Take`] for why most packets are not).
fn take_existing(ctx: &TcContext, pkt: &Packet, mark: u32, how: Take) -> bool {
    let (mut t, size) = tuple(pkt, pkt.dport);
    // SAFETY: helper call with a valid context and a stack tuple of the given size.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            &mut t,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // A listener matching the tuple is a node service, not a flow of ours.
    // SAFETY: sk is a non-null socket returned by the lookup helper.
    let listening = unsafe { (*sk).state } == TCP_STATE_LISTEN;
    let taken = !listening
        && match how {
            Take::Assign => do_assign(ctx, sk, mark),
            Take::Mark => {
                ctx.set_mark(mark);
                true
            }
        };
    // SAFETY: every socket returned by the lookup is released exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
    taken
}

/// Assigns a SYN to ztunnel's transparent listener on `port`.
fn assign_listener(ctx: &TcContext, pkt: &Packet, port: u16, mark: u32) -> bool {
    let (mut t, size) = tuple(pkt, port.to_be());
    // SAFETY: as in assign_existing.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            &mut t,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: sk is non-null.
    let listening = unsafe { (*sk).state } == TCP_STATE_LISTEN;
    let assigned = listening && do_assign(ctx, sk, mark);
    // SAFETY: released exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
    assigned
}

fn do_assign(ctx: &TcContext, sk: *mut bpf_sock, mark: u32) -> bool {
    // SAFETY: sk is a referenced socket from a lookup helper.
    let rc = unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) };
    if rc != 0 {
        return false;
    }
    // Without the mark the packet takes the forwarding path and is lost.
    ctx.set_mark(mark);
    true
}

/// The counters of `pod` on this CPU, created on first use.
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

fn count_packet(pod: &PodKey, pkt: &Packet) {
    if let Some(c) = counters(pod) {
        c.packets += 1;
        c.bytes += pkt.len as u64;
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
