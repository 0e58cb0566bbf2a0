//! The mark on a pod's own socket of a captured connection (`ZT_CAPTURED_SK`).
//!
//! `ZT_FLOWS` tells step 3 of the decision which flows were captured, but it is an LRU of
//! 65,536 entries and any enrolled pod can flush it with a flood of SYNs; after a crash,
//! a captured flow whose entry was flushed would look like one from before enrollment and
//! its packets would leave in plaintext. So the program also marks the pod's own socket:
//! socket storage, which lives exactly as long as the socket and cannot be evicted. The
//! socket is found by the kernel's own lookup in the pod's namespace, whose id (as the
//! node's namespace knows it) `ZT_IFACES` holds for each pod interface.
//!
//! The map is pinned like the others, so a restarted ztunnel's program reads the marks the
//! crashed one's wrote.

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_NO_PREALLOC},
    helpers::generated::{bpf_sk_fullsock, bpf_sk_release, bpf_sk_storage_get, bpf_skc_lookup_tcp},
    macros::btf_map,
    programs::TcContext,
};

use crate::{sockets::tuple_from, Packet, CAPTURED_FLOWS, TCP_STATE_LISTEN};

/// `ZT_FLOWS` value of a flow ztunnel opened whose pod socket carries the mark.
const FLOW_POD_MARKED: u8 = 2;

const TCP_STATE_TIME_WAIT: u32 = 6;
const TCP_STATE_NEW_SYN_RECV: u32 = 12;
/// `BPF_SK_STORAGE_GET_F_CREATE`.
const F_CREATE: u64 = 1;
/// libbpf's `LIBBPF_PIN_BY_NAME`, which aya also honours: pinned under the map's name in
/// the loader's pin directory.
const PIN_BY_NAME: usize = 1;

/// A BTF map definition of socket storage with a `pinning` field (aya-ebpf's `SkStorage`
/// has none). The field names and array lengths are what the loader reads from BTF.
#[repr(C)]
pub struct PinnedSkStorage {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const u32,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: the fields are placeholders the loader reads from BTF; nothing dereferences them.
unsafe impl Sync for PinnedSkStorage {}

#[btf_map(name = "ZT_CAPTURED_SK")]
static CAPTURED_SK: PinnedSkStorage = PinnedSkStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    max_entries: core::ptr::null(),
    map_flags: core::ptr::null(),
    pinning: core::ptr::null(),
};

/// Finds the pod's socket of `pkt`'s flow in the pod's namespace (`netnsid`, as the
/// node's namespace knows it) — the socket that sent it, or with `to_pod` the one it is
/// going to — and, with `mark`, marks it captured; returns whether it carries the mark.
/// A socket still in its handshake (a request socket), in TIME_WAIT or listening cannot
/// hold storage and is neither marked nor found marked. Not inlined: the tuple gets a
/// frame of its own.
#[inline(never)]
pub fn pod_socket(ctx: &TcContext, pkt: &Packet, netnsid: i32, mark: bool, to_pod: bool) -> bool {
    // A lookup tuple is written as the socket would receive: a packet going to the pod as
    // it is, one the pod sent reversed.
    let f = &pkt.flow;
    let (mut t, size) = if to_pod {
        tuple_from(&f.saddr, &f.daddr, f.sport, f.dport, pkt.v6)
    } else {
        tuple_from(&f.daddr, &f.saddr, f.dport, f.sport, pkt.v6)
    };
    // SAFETY: helper call with a valid context and a stack tuple of the given size; a
    // non-negative netns id names a namespace relative to the packet's device's.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            &mut t,
            size,
            netnsid as u32 as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: sk is a non-null socket returned by the lookup helper.
    let state = unsafe { (*sk).state };
    let mut marked = false;
    if state != TCP_STATE_LISTEN && state != TCP_STATE_TIME_WAIT && state != TCP_STATE_NEW_SYN_RECV
    {
        // SAFETY: sk is a referenced socket; the result shares its reference.
        let full = unsafe { bpf_sk_fullsock(sk) };
        if !full.is_null() {
            let flags = if mark { F_CREATE } else { 0 };
            let map = core::ptr::from_ref(&CAPTURED_SK).cast_mut().cast();
            // SAFETY: full is a full socket held by the lookup's reference; no initial
            // value (a created storage is zeroed).
            let st = unsafe { bpf_sk_storage_get(map, full.cast(), core::ptr::null_mut(), flags) }
                .cast::<u32>();
            if !st.is_null() {
                // SAFETY: st is this socket's storage, a u32.
                unsafe {
                    if mark {
                        *st = 1;
                    }
                    marked = *st != 0;
                }
            }
        }
    }
    // SAFETY: every socket returned by the lookup is released exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
    marked
}

/// Marks the pod's socket of a connection ztunnel delivered, once: `pkt` is the pod's
/// packet to ztunnel's socket (at the pod interface's ingress) or, with `to_pod`, one of
/// ztunnel's to the pod (at its egress: so a pod that has sent nothing yet is marked by
/// ztunnel's next packet, its FIN or reset at a crash included). The flow's `ZT_FLOWS`
/// entry, written at the pod's SYN-ACK, records that it was done, so later packets cost a
/// map lookup instead of a socket lookup in the pod's namespace. An entry flushed
/// meanwhile only means marking again.
#[inline(never)]
pub fn mark_delivered_once(ctx: &TcContext, pkt: &Packet, netnsid: i32, to_pod: bool) {
    // The flow as ztunnel opened it: ztunnel (with the client's address) → pod.
    let opened = if to_pod {
        pkt.flow
    } else {
        pkt.flow.reversed()
    };
    let entry = CAPTURED_FLOWS.get_ptr_mut(&opened);
    // SAFETY: the pointer comes from a successful lookup; a u8 written in place.
    if entry.is_some_and(|e| unsafe { *e } == FLOW_POD_MARKED) {
        return;
    }
    if pod_socket(ctx, pkt, netnsid, true, to_pod) {
        if let Some(e) = entry {
            // SAFETY: as above.
            unsafe { *e = FLOW_POD_MARKED };
        }
    }
}
