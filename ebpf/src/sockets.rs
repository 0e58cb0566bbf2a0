//! The kernel's socket lookups the decision asks for: whether a ztunnel socket owns a
//! packet's exact tuple (and taking the packet to it), and assigning a SYN to one of
//! ztunnel's transparent listeners.

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::generated::{bpf_sk_assign, bpf_sk_fullsock, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use ztunnel_ebpf_common::decide::Take;

use crate::{Packet, TCP_STATE_LISTEN};

/// Builds the lookup tuple for `pkt`, with the destination port replaced by `dport`.
/// Built as nine words, every one of them defined: zeroing the union first would be a
/// call to `memset` (one more frame on the verifier's stack budget, see `log_flow`), and
/// writing only one variant leaves bytes the compiler may fill from an unset register,
/// which the verifier refuses.
#[inline(always)]
fn tuple(pkt: &Packet, dport: u16) -> (bpf_sock_tuple, u32) {
    let f = &pkt.flow;
    tuple_from(&f.saddr, &f.daddr, f.sport, dport, pkt.v6)
}

/// A lookup tuple of these addresses and ports (network byte order), as [`tuple`].
#[inline(always)]
pub(crate) fn tuple_from(
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    sport: u16,
    dport: u16,
    v6: bool,
) -> (bpf_sock_tuple, u32) {
    // Both ports in one word, at the same bytes as in the struct.
    let ports = u32::from(sport) | (u32::from(dport) << 16);
    let (s, d) = (words(saddr), words(daddr));
    let (w, size): ([u32; 9], u32) = if v6 {
        ([s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], ports], 36)
    } else {
        // IPv4 is saddr, daddr, ports: the last word of each mapped address.
        ([s[3], d[3], ports, 0, 0, 0, 0, 0, 0], 12)
    };
    // SAFETY: bpf_sock_tuple is 36 bytes of plain data, 4-aligned, like [u32; 9].
    (
        unsafe { core::mem::transmute::<[u32; 9], bpf_sock_tuple>(w) },
        size,
    )
}

/// An IPv6 address as the four 32-bit words of `bpf_sock_tuple` (bytes kept in order).
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// What [`take_existing`] did with a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// No non-listening socket owns the tuple.
    No,
    /// Taken to a socket ztunnel accepted.
    Accepted,
    /// Taken to a socket ztunnel opened (it carries the proxy mark).
    Opened,
}

/// Takes the packet to a non-listening socket of exactly its flow, if one exists: marked,
/// and assigned to it if `how` says so (see [`Take`] for why most packets are not); says
/// whether that socket is one ztunnel opened (`SO_MARK` = `proxy_mark`). At most five
/// arguments: a BPF call takes no more.
#[inline(never)]
pub(crate) fn take_existing(
    ctx: &TcContext,
    pkt: &Packet,
    mark: u32,
    how: Take,
    proxy_mark: u32,
) -> Taken {
    let (mut t, size) = tuple(pkt, pkt.flow.dport);
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
        return Taken::No;
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
    let mut result = if taken { Taken::Accepted } else { Taken::No };
    if taken && proxy_mark != 0 {
        // SAFETY: sk is a referenced socket; the result shares its reference.
        let full = unsafe { bpf_sk_fullsock(sk) };
        // SAFETY: a non-null full socket's fields are readable.
        if !full.is_null() && unsafe { (*full).mark } == proxy_mark {
            result = Taken::Opened;
        }
    }
    // SAFETY: every socket returned by the lookup is released exactly once.
    unsafe { bpf_sk_release(sk as *mut _) };
    result
}

/// Assigns a SYN to ztunnel's transparent listener on `port`. Not inlined, like
/// `take_existing`: its tuple lives in a frame of its own.
#[inline(never)]
pub(crate) fn assign_listener(ctx: &TcContext, pkt: &Packet, port: u16, mark: u32) -> bool {
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
