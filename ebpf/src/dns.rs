//! Enrolled pods' DNS questions over UDP: assigned to ztunnel's DNS socket, as
//! `ztunnel_ebpf_common::dns` decides (documented and table-tested there).

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, TC_ACT_OK},
    helpers::generated::{bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release},
    programs::TcContext,
};
use ztunnel_ebpf_common::{
    decide::Facts,
    dns::{decide_dns, decide_dns_on_bridge, DnsLookups, DnsVerdict},
    IfaceInfo, IFACE_BRIDGE, VERDICT_CONTINUE,
};

use crate::{counters, pod_info, sockets::tuple_from, taken, Packet, NODE_ADDRS, SETTINGS};

/// The verdict for a UDP packet to port 53. Not inlined: its facts and the lookup tuple
/// live in frames of their own, off the TCP path's (the 512-byte stack budget of older
/// kernels is for the whole chain).
#[inline(never)]
pub(crate) fn capture(ctx: &TcContext, iface: &IfaceInfo, ifindex: u32, pkt: &Packet) -> i32 {
    let settings = SETTINGS.get(0).copied().unwrap_or_default();
    let facts = Facts {
        settings,
        ifindex,
        src: pod_info(pkt.src()),
        dst: pod_info(pkt.dst()),
        tcp_flags: 0,
        dport: u16::from_be(pkt.flow.dport),
    };
    let mark = settings.capture_mark;
    let mut kernel = Kernel { ctx, pkt, mark };
    if iface.flags & IFACE_BRIDGE != 0 {
        // SAFETY: reading a field of the context's __sk_buff.
        let current = unsafe { (*ctx.skb.skb).mark };
        let marked = mark != 0 && current & mark == mark;
        return match decide_dns_on_bridge(&facts, marked, &mut kernel) {
            DnsVerdict::Assigned => TC_ACT_OK,
            DnsVerdict::Passed => {
                // The mark would deliver it locally, to no socket: let it go where the
                // pod sent it instead.
                ctx.set_mark(current & !mark);
                VERDICT_CONTINUE
            }
            DnsVerdict::Continue => VERDICT_CONTINUE,
        };
    }
    let verdict = decide_dns(&facts, &mut kernel);
    if verdict != DnsVerdict::Continue {
        if let Some(c) = counters(pkt.src()) {
            if verdict == DnsVerdict::Assigned {
                c.dns_captured += 1;
            } else {
                c.dns_passed += 1;
            }
        }
    }
    match verdict {
        DnsVerdict::Assigned => taken(ctx, iface),
        DnsVerdict::Passed | DnsVerdict::Continue => VERDICT_CONTINUE,
    }
}

struct Kernel<'a> {
    ctx: &'a TcContext,
    pkt: &'a Packet,
    mark: u32,
}

impl DnsLookups for Kernel<'_> {
    fn dst_is_node(&mut self) -> bool {
        NODE_ADDRS.get_ptr(self.pkt.dst()).is_some()
    }
    fn assign_dns(&mut self, port: u16) -> bool {
        assign_dns(self.ctx, self.pkt, port, self.mark)
    }
}

/// Assigns the datagram to ztunnel's UDP socket on `port`, bound to the wildcard address
/// (so the lookup with the packet's own destination address finds it), with the capture
/// mark that routes it locally.
#[inline(never)]
fn assign_dns(ctx: &TcContext, pkt: &Packet, port: u16, mark: u32) -> bool {
    let f = &pkt.flow;
    let (mut t, size) = tuple_from(&f.saddr, &f.daddr, f.sport, port.to_be(), pkt.v6);
    // SAFETY: helper call with a valid context and a stack tuple of the given size.
    let sk = unsafe {
        bpf_sk_lookup_udp(
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
    // SAFETY: sk is a referenced socket from the lookup helper.
    let assigned = unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) } == 0;
    // SAFETY: every socket returned by the lookup is released exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
    if assigned {
        ctx.set_mark(mark);
    }
    assigned
}
