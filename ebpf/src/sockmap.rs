//! Sockmap acceleration of the pod ↔ ztunnel hops (see `ztunnel_ebpf_common::sockmap`
//! for which sockets and why these keys).
//!
//! `zt_sockops` (cgroup sock_ops) runs at every TCP socket's ESTABLISHED callback — before
//! any data can flow on it — and puts the ends of the hops in `ZT_SOCKS` with their
//! peer's key in the socket's storage. `zt_skmsg` (attached to `ZT_SOCKS`) runs on each
//! send of those sockets: at the first one it decides the socket's path for good — into
//! the peer's receive queue if the peer is in the map, else TCP — so a direction never
//! switches paths once bytes have flowed on it. A peer that later leaves the map has
//! closed: the sends then go the TCP way to a closed socket (reset), or, ztunnel being
//! gone, to the capture program, which drops them (fail closed).

use aya_ebpf::{
    bindings::{
        bpf_sock_ops, sk_action, BPF_ANY, BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_storage_get},
    macros::{btf_map, sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use ztunnel_ebpf_common::{
    sockmap::{
        classify, End, Established, SockKey, SockLookups, SockState, SockmapCounters,
        PATH_REDIRECT, PATH_TCP, PATH_UNDECIDED, SIDE_ACTIVE,
    },
    FlowKey, PodKey,
};

use crate::{pod_info, SETTINGS, SOCKS, SOCK_CFG, SOCK_COUNTERS, SOCK_EXCL, SOCK_PEND, SYN_SEQ};

/// Socket storage needs a BTF map definition (the kernel wants the value's type), so it is
/// the one map not in the legacy `maps` section; it is not pinned: the programs hold it.
#[btf_map(name = "ZT_SOCK_STATE")]
static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sock_ops]
pub fn zt_sockops(ctx: SockOpsContext) -> u32 {
    on_established(&ctx);
    // sock_ops programs return 1 ("ok") whatever they did.
    1
}

#[sk_msg]
pub fn zt_skmsg(ctx: SkMsgContext) -> u32 {
    on_send(&ctx)
}

/// Called by the capture program for each SYN it hands to the outbound listener.
pub fn remember_syn(flow: &FlowKey, seq: u32) {
    if SOCK_CFG.get(0).is_some_and(|c| c.flags != 0) {
        let _ = SYN_SEQ.insert(flow, &seq, 0);
    }
}

fn state_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&SOCK_STATE).cast_mut().cast()
}

struct Maps;

impl SockLookups for Maps {
    fn syn_seq(&mut self, flow: &FlowKey) -> Option<u32> {
        // SAFETY: a plain lookup; the value is copied out.
        SYN_SEQ.get_ptr(flow).map(|p| unsafe { *p })
    }
    fn pending(&mut self, key: &SockKey) -> bool {
        SOCK_PEND.get_ptr(key).is_some()
    }
    fn port_excluded(&mut self, port: u16) -> bool {
        SOCK_EXCL.get_ptr(&port).is_some()
    }
}

fn on_established(ctx: &SockOpsContext) {
    let active = match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => true,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => false,
        _ => return,
    };
    let Some(cfg) = SOCK_CFG.get(0).copied() else {
        return;
    };
    if cfg.flags == 0 {
        return;
    }
    let (local, remote) = match ctx.family() {
        AF_INET => (
            PodKey::v4(ctx.local_ip4().to_ne_bytes()),
            PodKey::v4(ctx.remote_ip4().to_ne_bytes()),
        ),
        // SAFETY: reading fields of the context.
        AF_INET6 => unsafe {
            (
                v6(&raw const (*ctx.ops).local_ip6),
                v6(&raw const (*ctx.ops).remote_ip6),
            )
        },
        _ => return,
    };
    // SAFETY: reading fields of the context.
    let (snd_una, rcv_nxt, sk) = unsafe {
        let ops = &*ctx.ops;
        (ops.snd_una, ops.rcv_nxt, ops.__bindgen_anon_2.sk)
    };
    if sk.is_null() {
        return;
    }
    // SAFETY: the helper reads the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let e = Established {
        active,
        ztunnel_netns: netns == cfg.netns_cookie,
        local,
        remote,
        local_port: ctx.local_port() as u16,
        // The context holds the remote port in network order, in the upper half.
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        snd_una,
        rcv_nxt,
        local_pod: pod_info(&local),
        remote_pod: pod_info(&remote),
    };
    let settings = SETTINGS.get(0).copied().unwrap_or_default();
    let Some(end) = classify(&e, &settings, &cfg, &mut Maps) else {
        return;
    };
    let key = e.key();
    let mut init = SockState {
        peer: key.peer(),
        path: PATH_UNDECIDED,
        _pad: 0,
    };
    // SAFETY: sk is the context's non-null full socket; init lives on the stack.
    let st = unsafe {
        bpf_sk_storage_get(
            state_map(),
            sk.cast(),
            core::ptr::from_mut(&mut init).cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<SockState>();
    if st.is_null() {
        count(|c| c.insert_failed += 1);
        return;
    }
    // SAFETY: st is this socket's storage; a storage left by an earlier use of the
    // socket (none expected) is overwritten.
    unsafe { *st = init };
    let mut k = key;
    // SAFETY: the context outlives the call.
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    if SOCKS.update(&mut k, ops, BPF_ANY.into()).is_err() {
        // SAFETY: as above.
        unsafe { (*st).path = PATH_TCP };
        count(|c| c.insert_failed += 1);
        return;
    }
    match end {
        End::Ztunnel => {
            count(|c| c.ztunnel_sockets += 1);
            if key.side == SIDE_ACTIVE {
                // The pod's end is established next (by this socket's ACK) and is taken
                // only if it finds this one waiting.
                let _ = SOCK_PEND.insert(&key, &1, 0);
            }
        }
        End::Pod => {
            count(|c| c.pod_sockets += 1);
            let _ = SOCK_PEND.remove(&key.peer());
        }
    }
}

fn on_send(ctx: &SkMsgContext) -> u32 {
    // SAFETY: reading the context's socket pointer.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return sk_action::SK_PASS;
    }
    // SAFETY: lookup only (no create flag, no value).
    let st = unsafe { bpf_sk_storage_get(state_map(), sk.cast(), core::ptr::null_mut(), 0) }
        .cast::<SockState>();
    if st.is_null() {
        return sk_action::SK_PASS;
    }
    // SAFETY: the socket's own storage; sends on one socket are serialized by its lock.
    let st = unsafe { &mut *st };
    if st.path == PATH_TCP {
        return sk_action::SK_PASS;
    }
    let mut peer = st.peer;
    let rc = SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS.into());
    if rc == sk_action::SK_PASS as i64 {
        if st.path == PATH_UNDECIDED {
            st.path = PATH_REDIRECT;
            count(|c| c.redirected += 1);
        }
        return sk_action::SK_PASS;
    }
    if st.path == PATH_UNDECIDED {
        count(|c| c.fallback += 1);
    } else {
        count(|c| c.peer_gone += 1);
    }
    st.path = PATH_TCP;
    sk_action::SK_PASS
}

/// An IPv6 address from the context, a word at a time: the verifier refuses a copy of the
/// array (a load from a context pointer that was moved) and wants each load at a constant
/// offset from the context itself.
///
/// # Safety
/// `words` points into the program's context.
unsafe fn v6(words: *const [u32; 4]) -> PodKey {
    let w = words.cast::<u32>();
    // SAFETY: four in-bounds reads of the context (the caller's promise).
    let a = unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    };
    // SAFETY: 16 bytes either way; the words hold the address in network order.
    PodKey::v6(unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(a) })
}

fn count(f: impl FnOnce(&mut SockmapCounters)) {
    if let Some(c) = SOCK_COUNTERS.get_ptr_mut(0) {
        // SAFETY: a per-CPU value: only this CPU touches it while the program runs.
        f(unsafe { &mut *c });
    }
}
