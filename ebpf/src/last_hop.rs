//! The last hop: a TC egress program on the host side of each pod's interface, where every
//! connection into the pod passes after the node's NAT. It judges new connections that
//! did not come through ztunnel (`ztunnel_ebpf_common::last_hop` has the steps and their
//! table test): ztunnel's own and the node's pass, forwarded ones (a Service VIP, a
//! NodePort, a hostPort) meet the verdict ztunnel cached for them, or are dropped while
//! ztunnel is asked.

use aya_ebpf::{bindings::TC_ACT_SHOT, macros::classifier, programs::TcContext};
use ztunnel_ebpf_common::{
    last_hop::{decide_last_hop, LastHopEvent, LastHopFacts, LastHopLookups, LAST_HOP_PENDING},
    FlowKey, IfaceInfo, IFACE_PEER_NETNS, VERDICT_CONTINUE,
};

use crate::{
    captured_sockets, parse, pod_info, Packet, Parsed, EXCLUDED_PORTS, IFACES, LAST_HOP,
    LAST_HOP_COUNT, LAST_HOP_EVENTS, SCRATCH, SETTINGS,
};

#[classifier]
pub fn zt_last_hop(ctx: TcContext) -> i32 {
    last_hop(&ctx).unwrap_or(VERDICT_CONTINUE)
}

fn last_hop(ctx: &TcContext) -> Result<i32, ()> {
    let pkt = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch value; nothing else uses it while the program runs.
    let pkt = unsafe { &mut *pkt };
    // Pods' interfaces always have an Ethernet header. A packet whose TCP header cannot
    // be read continues: the capture program drops such packets from and to enrolled
    // pods where they enter the node, and a fragment cannot open a connection by itself.
    if parse(ctx, &IfaceInfo::default(), pkt)? != Parsed::Tcp {
        return Ok(VERDICT_CONTINUE);
    }
    let settings = SETTINGS.get(0).copied().unwrap_or_default();
    let proxy = settings.proxy_mark;
    // SAFETY: reading fields of the context's __sk_buff.
    let (mark, sk) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.mark, skb.__bindgen_anon_2.sk)
    };
    let facts = LastHopFacts {
        settings,
        dst: pod_info(pkt.dst()),
        syn: pkt.flags & 0x12 == 0x02,
        from_ztunnel: proxy != 0 && mark & proxy == proxy,
        from_node: !sk.is_null(),
    };
    // ztunnel's own packets into a pod on a connection it delivered mark the pod's socket
    // (once), so that even a pod that has not answered yet is known as captured should
    // ztunnel die (`captured_sockets`).
    if facts.from_ztunnel && !facts.syn && facts.dst.flags != 0 {
        mark_delivered(ctx, pkt);
    }
    let verdict = decide_last_hop(&facts, &mut Maps { pkt });
    if let Some(i) = verdict.counter() {
        if let Some(n) = LAST_HOP_COUNT.get_ptr_mut(i) {
            // SAFETY: a per-CPU value: only this CPU touches it while the program runs.
            unsafe { *n += 1 };
        }
    }
    Ok(if verdict.drops() {
        TC_ACT_SHOT
    } else {
        VERDICT_CONTINUE
    })
}

/// [`captured_sockets::mark_delivered_once`] for a packet going to the pod behind this
/// interface, if `ZT_IFACES` knows the pod's namespace. Not inlined: off the main frame.
#[inline(never)]
fn mark_delivered(ctx: &TcContext, pkt: &Packet) {
    // SAFETY: reading a field of the context's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a plain lookup; the value is copied out.
    let Some(iface) = (unsafe { IFACES.get(&ifindex) }).copied() else {
        return;
    };
    if iface.flags & IFACE_PEER_NETNS != 0 {
        captured_sockets::mark_delivered_once(ctx, pkt, iface.peer_netnsid, true);
    }
}

struct Maps<'a> {
    pkt: &'a Packet,
}

impl LastHopLookups for Maps<'_> {
    fn port_excluded(&mut self) -> bool {
        EXCLUDED_PORTS
            .get_ptr(u16::from_be(self.pkt.flow.dport))
            .is_some()
    }
    fn cached(&mut self) -> u8 {
        match LAST_HOP.get_ptr(&key(&self.pkt.flow)) {
            // SAFETY: the pointer comes from a successful lookup.
            Some(v) => unsafe { *v },
            None => 0,
        }
    }
    fn ask(&mut self) -> bool {
        ask(&self.pkt.flow)
    }
}

/// The cache key of a flow: its addresses and destination port (a verdict for a source
/// without an identity does not depend on the source port).
#[inline(always)]
fn key(flow: &FlowKey) -> FlowKey {
    FlowKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: 0,
        dport: flow.dport,
    }
}

/// Records the question as asked, then queues it: in that order, so that ztunnel's answer
/// (which may come at once, from another CPU) is never overwritten by the pending mark.
/// Not inlined: the event and the key get a frame of their own (see `log_flow` in main.rs
/// on the stack budget).
#[inline(never)]
fn ask(flow: &FlowKey) -> bool {
    let Some(mut entry) = LAST_HOP_EVENTS.reserve::<LastHopEvent>(0) else {
        return false;
    };
    let _ = LAST_HOP.insert(&key(flow), &LAST_HOP_PENDING, 0);
    entry.write(LastHopEvent {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
    });
    entry.submit(0);
    true
}
