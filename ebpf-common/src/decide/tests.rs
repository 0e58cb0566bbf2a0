//! The decision as a table: one row per case of the steps, each with the lookups the
//! program answers, the verdict and the exact questions asked (which lookups run, in
//! which order, matters too: a socket lookup assigns, `ZT_FLOWS` is an LRU).
//!
//! The node of every row: pod A (enrolled, veth ifindex 7), pod B (enrolled, veth 8),
//! pod C (not enrolled, veth 9), the uplink (ifindex 2).

use std::vec::Vec;

use super::*;
use crate::{POD_FLAG_HELD, POD_FLAG_INBOUND, POD_FLAG_OUTBOUND, SETTINGS_LOG_FLOWS};

use Ask::*;
use Listener::*;
use Take::{Assign, Mark};
use Verdict::*;

const A_VETH: u32 = 7;
const B_VETH: u32 = 8;
const C_VETH: u32 = 9;
const UPLINK: u32 = 2;

const BOTH: u32 = POD_FLAG_OUTBOUND | POD_FLAG_INBOUND;
const A: PodInfo = PodInfo {
    ifindex: A_VETH,
    flags: BOTH,
};
const B: PodInfo = PodInfo {
    ifindex: B_VETH,
    flags: BOTH,
};
/// Held: should be enrolled, cannot be (its interface unknown, or its address claimed
/// twice); written with ifindex 0.
const H: PodInfo = PodInfo {
    ifindex: 0,
    flags: POD_FLAG_HELD,
};
/// Not enrolled (also any address off the node).
const NONE: PodInfo = PodInfo {
    ifindex: 0,
    flags: 0,
};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

const SETTINGS: Settings = Settings {
    capture_mark: 0x4000,
    proxy_mark: 0x539,
    outbound_port: 15001,
    inbound_plain_port: 15006,
    inbound_hbone_port: 15008,
    flags: SETTINGS_ENABLED,
    dns_port: 15053,
    reserved: 0,
};

/// A question the decision asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    Flow,
    Reverse,
    Socket(Take),
    Excluded,
    Node,
    Listen(u16),
    PodSocket,
}

/// Answers of the lookups (bits), in the order [`Lookups`] lists them.
const NO: u8 = 0;
const CAPTURED: u8 = 1;
const REVERSE: u8 = 2;
const SOCKET: u8 = 4;
const EXCLUDED: u8 = 8;
const NODE: u8 = 16;
const LISTENING: u8 = 32;
const POD_SOCKET: u8 = 64;

/// One row: the facts, the answers to the lookups, and what must come out.
#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    facts: Facts,
    answers: u8,
    want: Verdict,
    asks: &'static [Ask],
}

/// A packet arriving on `ifindex` from `src` to `dst` (`NONE`: not enrolled).
const fn row(
    name: &'static str,
    ifindex: u32,
    src: PodInfo,
    dst: PodInfo,
    tcp_flags: u8,
    dport: u16,
    answers: u8,
) -> Row {
    let facts = Facts {
        settings: SETTINGS,
        ifindex,
        src,
        dst,
        tcp_flags,
        dport,
    };
    Row {
        name,
        facts,
        answers,
        want: Continue,
        asks: &[],
    }
}

impl Row {
    const fn settings(mut self, settings: Settings) -> Row {
        self.facts.settings = settings;
        self
    }
    const fn want(mut self, want: Verdict, asks: &'static [Ask]) -> Row {
        self.want = want;
        self.asks = asks;
        self
    }
}

/// Answers from the row; records the questions.
struct Answers<'a> {
    row: &'a Row,
    asked: Vec<Ask>,
}

impl Answers<'_> {
    fn answer(&mut self, ask: Ask, bit: u8) -> bool {
        self.asked.push(ask);
        self.row.answers & bit != 0
    }
}

impl Lookups for Answers<'_> {
    fn flow_captured(&mut self) -> bool {
        self.answer(Flow, CAPTURED)
    }
    fn reverse_captured(&mut self) -> bool {
        self.answer(Reverse, REVERSE)
    }
    fn take_existing(&mut self, how: Take) -> bool {
        self.answer(Socket(how), SOCKET)
    }
    fn port_excluded(&mut self) -> bool {
        self.answer(Excluded, EXCLUDED)
    }
    fn dst_is_node(&mut self) -> bool {
        self.answer(Node, NODE)
    }
    fn assign_listener(&mut self, port: u16) -> bool {
        self.answer(Listen(port), LISTENING)
    }
    fn pod_socket_captured(&mut self) -> bool {
        self.answer(PodSocket, POD_SOCKET)
    }
}

/// A pod enrolled with only some of the flags.
const fn only(ifindex: u32, flags: u32) -> PodInfo {
    PodInfo { ifindex, flags }
}

const DISABLED: Settings = Settings {
    flags: 0,
    ..SETTINGS
};
const LOG_ONLY: Settings = Settings {
    flags: SETTINGS_LOG_FLOWS,
    ..SETTINGS
};
const PORTS_16K: Settings = Settings {
    inbound_hbone_port: 16008,
    inbound_plain_port: 16006,
    ..SETTINGS
};
/// The way to a listener: no socket owns the tuple, the port is not excluded, (for an
/// outbound SYN) the destination is not the node.
const TO_15001: &[Ask] = &[Socket(Assign), Excluded, Node, Listen(15001)];
const TO_15006: &[Ask] = &[Socket(Assign), Excluded, Listen(15006)];
const TO_15008: &[Ask] = &[Socket(Assign), Excluded, Listen(15008)];
/// A non-SYN without a socket, of a flow not captured either way.
const NOT_CAPTURED: &[Ask] = &[Socket(Mark), Flow, Reverse];
/// The same, from an enrolled pod on its own interface: its own socket is asked too.
const NOT_CAPTURED_POD: &[Ask] = &[Socket(Mark), Flow, Reverse, PodSocket];

#[rustfmt::skip]
const TABLE: &[Row] = &[
    // Settings: nothing before the loader has enabled capture.
    row("disabled: an enrolled pod's SYN", A_VETH, A, NONE, SYN, 80, LISTENING).settings(DISABLED)
        .want(Continue, &[]),
    row("disabled: even a spoofed one", C_VETH, A, NONE, SYN, 80, NO).settings(DISABLED)
        .want(Continue, &[]),
    row("the log bit alone does not enable", A_VETH, A, B, ACK, 80, SOCKET).settings(LOG_ONLY)
        .want(Continue, &[]),
    // Spoofing: an enrolled source address is believed only on its pod's interface.
    row("spoofed: A's address from C's veth", C_VETH, A, NONE, SYN, 80, LISTENING)
        .want(DropSpoofed, &[]),
    row("spoofed: A's address from the uplink", UPLINK, A, B, ACK, 80, SOCKET)
        .want(DropSpoofed, &[]),
    row("spoofed: even a packet of a captured flow", B_VETH, A, NONE, ACK, 80, CAPTURED | SOCKET)
        .want(DropSpoofed, &[]),
    row("spoofed: a pod enrolled for inbound only", C_VETH, only(A_VETH, POD_FLAG_INBOUND), NONE, SYN, 80, NO)
        .want(DropSpoofed, &[]),
    row("not spoofed: ifindex 0 is unknown, believed anywhere", UPLINK, only(0, BOTH), NONE, SYN, 80, LISTENING)
        .want(AssignedListener(Outbound), TO_15001),
    row("not spoofed: only the source is checked", UPLINK, NONE, A, SYN, 80, LISTENING)
        .want(AssignedListener(InboundPlain), TO_15006),
    // Held pods: never open. Whatever the interface (its own is unknown), the flow, a
    // listening ztunnel or an owning socket: dropped, but for its node's own addresses.
    row("held: its SYN to the world", C_VETH, H, NONE, SYN, 80, LISTENING | SOCKET)
        .want(DropFailClosed, &[Node]),
    row("held: its SYN seen on the uplink", UPLINK, H, NONE, SYN, 80, LISTENING)
        .want(DropFailClosed, &[Node]),
    row("held: a packet of a flow from before", C_VETH, H, NONE, ACK | PSH, 80, CAPTURED | REVERSE | SOCKET)
        .want(DropFailClosed, &[Node]),
    row("held: its SYN to an excluded port", C_VETH, H, NONE, SYN, 9100, EXCLUDED | LISTENING)
        .want(DropFailClosed, &[Node]),
    row("held: to an enrolled pod", C_VETH, H, B, SYN, 8080, LISTENING)
        .want(DropFailClosed, &[Node]),
    row("held: its reply to its node's probe passes", C_VETH, H, NONE, SYN | ACK, 8080, NODE)
        .want(Direct, &[Node]),
    row("held: its SYN to its node passes", C_VETH, H, NONE, SYN, 10250, NODE)
        .want(Direct, &[Node]),
    row("held: a SYN to it from another node", UPLINK, NONE, H, SYN, 8080, LISTENING)
        .want(DropFailClosed, &[]),
    row("held: HBONE to it from another node", UPLINK, NONE, H, SYN, 15008, LISTENING)
        .want(DropFailClosed, &[]),
    row("held: any packet to it", UPLINK, NONE, H, ACK, 8080, CAPTURED | SOCKET)
        .want(DropFailClosed, &[]),
    row("held: an enrolled pod's SYN to it", A_VETH, A, H, SYN, 8080, LISTENING)
        .want(DropFailClosed, &[]),
    row("held: an unenrolled pod's SYN to it", C_VETH, NONE, H, SYN, 8080, LISTENING)
        .want(DropFailClosed, &[]),
    row("held to held", C_VETH, H, H, SYN, 8080, NODE | LISTENING)
        .want(DropFailClosed, &[]),
    row("held: spoofing an enrolled pod is still spoofing", C_VETH, A, H, SYN, 8080, LISTENING)
        .want(DropSpoofed, &[]),
    // Unenrolled traffic: not ztunnel's, unless its flow was captured before.
    row("unenrolled: C to the world", C_VETH, NONE, NONE, ACK, 80, NO)
        .want(Continue, &[Flow]),
    row("unenrolled: C's SYN to the world", C_VETH, NONE, NONE, SYN, 80, LISTENING)
        .want(Continue, &[Flow]),
    row("unenrolled: the world to C", UPLINK, NONE, NONE, SYN, 80, LISTENING)
        .want(Continue, &[Flow]),
    row("unenrolled: only the flow as opened is remembered", C_VETH, NONE, NONE, ACK, 80, REVERSE | SOCKET)
        .want(Continue, &[Flow]),
    row("outbound only: not captured as a destination", C_VETH, NONE, only(A_VETH, POD_FLAG_OUTBOUND), SYN, 80, LISTENING)
        .want(Continue, &[Flow]),
    row("inbound only: not captured as a source", A_VETH, only(A_VETH, POD_FLAG_INBOUND), NONE, SYN, 80, LISTENING)
        .want(Continue, &[Flow]),
    row("unenrolled since: its socket takes the captured flow", C_VETH, NONE, NONE, ACK, 80, CAPTURED | SOCKET)
        .want(Marked, &[Flow, Socket(Mark)]),
    row("unenrolled since: socket gone, fail closed", C_VETH, NONE, NONE, ACK, 80, CAPTURED)
        .want(DropSocketGone, &[Flow, Socket(Mark), Flow]),
    row("unenrolled since: a SYN reusing the tuple goes direct", C_VETH, NONE, NONE, SYN, 80, CAPTURED | LISTENING)
        .want(Direct, &[Flow, Socket(Assign), Excluded]),
    // A socket owns the exact tuple: a SYN is assigned to it, anything else only marked
    // (the kernel's early demux finds the same socket and its cached route).
    row("A's packet of a captured flow", A_VETH, A, NONE, ACK | PSH, 80, SOCKET)
        .want(Marked, &[Socket(Mark)]),
    row("B's SYN-ACK to ztunnel's original-source socket: remembered", B_VETH, B, NONE, SYN | ACK, 80, SOCKET)
        .want(MarkedOpening, &[Socket(Mark)]),
    row("a SYN-ACK from afar to ztunnel's upstream socket: remembered", UPLINK, NONE, A, SYN | ACK, 80, SOCKET)
        .want(MarkedOpening, &[Socket(Mark)]),
    row("a SYN whose tuple a socket owns (TIME_WAIT reuse)", A_VETH, A, NONE, SYN, 80, SOCKET | LISTENING)
        .want(Assigned, &[Socket(Assign)]),
    row("a SYN with ECN bits is assigned too", A_VETH, A, NONE, SYN | ECE | CWR, 80, SOCKET)
        .want(Assigned, &[Socket(Assign)]),
    row("inbound packet to ztunnel's accepted socket", UPLINK, NONE, B, ACK, 80, SOCKET)
        .want(Marked, &[Socket(Mark)]),
    row("an RST to ztunnel's socket is marked", UPLINK, NONE, B, RST, 80, SOCKET)
        .want(Marked, &[Socket(Mark)]),
    row("a FIN of a captured flow is marked", A_VETH, A, NONE, FIN | ACK, 80, CAPTURED | SOCKET)
        .want(Marked, &[Socket(Mark)]),
    // Pre-enrollment flows: never reset, they finish on the direct path.
    row("pre-enrollment: A's flow goes on direct", A_VETH, A, NONE, ACK | PSH, 80, NO)
        .want(Direct, NOT_CAPTURED_POD),
    row("pre-enrollment: a flow to B goes on direct", UPLINK, NONE, B, ACK, 80, NO)
        .want(Direct, NOT_CAPTURED),
    row("pre-enrollment: B's SYN-ACK is not a SYN", B_VETH, B, NONE, SYN | ACK, 80, LISTENING)
        .want(Direct, NOT_CAPTURED_POD),
    row("pre-enrollment: FIN", A_VETH, A, NONE, FIN | ACK, 80, NO)
        .want(Direct, NOT_CAPTURED_POD),
    // A flood of SYNs emptied ZT_FLOWS, then ztunnel died: the pod's own socket says.
    row("flushed: A's captured socket, its flow gone from ZT_FLOWS", A_VETH, A, NONE, ACK | PSH, 80, POD_SOCKET)
        .want(DropSocketGone, NOT_CAPTURED_POD),
    row("flushed: B's socket of a delivered connection", B_VETH, B, NONE, ACK, 80, POD_SOCKET)
        .want(DropSocketGone, NOT_CAPTURED_POD),
    row("pod socket: not asked off the pod's interface", UPLINK, NONE, B, ACK, 80, POD_SOCKET)
        .want(Direct, NOT_CAPTURED),
    row("pod socket: not asked of a pod whose interface is unknown", UPLINK, only(0, BOTH), NONE, ACK, 80, POD_SOCKET)
        .want(Direct, NOT_CAPTURED),
    row("pod socket: ZT_FLOWS answers first", A_VETH, A, NONE, ACK, 80, CAPTURED | POD_SOCKET)
        .want(DropSocketGone, &[Socket(Mark), Flow]),
    // Fail closed: a captured flow whose socket is gone, a SYN without a listener.
    row("fail closed: A's packet of a captured flow", A_VETH, A, NONE, ACK, 80, CAPTURED)
        .want(DropSocketGone, &[Socket(Mark), Flow]),
    row("fail closed: B's reply to a captured flow", B_VETH, B, NONE, ACK | PSH, 80, REVERSE)
        .want(DropSocketGone, &[Socket(Mark), Flow, Reverse]),
    row("fail closed: an RST", UPLINK, NONE, B, RST, 80, CAPTURED)
        .want(DropSocketGone, &[Socket(Mark), Flow]),
    row("fail closed: an excluded port does not exempt a captured flow", A_VETH, A, NONE, ACK, 9100, EXCLUDED | CAPTURED)
        .want(DropSocketGone, &[Socket(Mark), Flow]),
    row("fail closed: A's SYN, no listener", A_VETH, A, NONE, SYN, 80, NO)
        .want(DropFailClosed, TO_15001),
    row("fail closed: SYN to B, no listener", UPLINK, NONE, B, SYN, 80, NO)
        .want(DropFailClosed, TO_15006),
    row("fail closed: HBONE SYN to B, no listener", UPLINK, NONE, B, SYN, 15008, NO)
        .want(DropFailClosed, TO_15008),
    // Excluded destination ports: a SYN goes direct.
    row("excluded: A's SYN to an excluded port", A_VETH, A, NONE, SYN, 9100, EXCLUDED | LISTENING)
        .want(Direct, &[Socket(Assign), Excluded]),
    row("excluded: a SYN to B's excluded port", UPLINK, NONE, B, SYN, 9100, EXCLUDED | LISTENING)
        .want(Direct, &[Socket(Assign), Excluded]),
    // The node's own addresses: an enrolled pod calling its node goes direct.
    row("A's SYN to its own node: direct", A_VETH, A, NONE, SYN, 10250, NODE | LISTENING)
        .want(Direct, &[Socket(Assign), Excluded, Node]),
    row("A to an enrolled address that is the node's: direct", A_VETH, A, B, SYN, 80, NODE | LISTENING)
        .want(Direct, &[Socket(Assign), Excluded, Node]),
    row("a SYN to B from off the node: ZT_NODE_ADDRS not asked", UPLINK, NONE, B, SYN, 80, NODE | LISTENING)
        .want(AssignedListener(InboundPlain), TO_15006),
    // Outbound: an enrolled pod's SYN to anything but its node.
    row("outbound: A's SYN to the world", A_VETH, A, NONE, SYN, 80, LISTENING)
        .want(AssignedListener(Outbound), TO_15001),
    row("outbound: A's SYN with ECN bits is a SYN", A_VETH, A, NONE, SYN | ECE | CWR, 80, LISTENING)
        .want(AssignedListener(Outbound), TO_15001),
    row("outbound: A to B, the source's side captures", A_VETH, A, B, SYN, 15008, LISTENING)
        .want(AssignedListener(Outbound), TO_15001),
    row("outbound: even to 15008 off the mesh", A_VETH, A, NONE, SYN, 15008, LISTENING)
        .want(AssignedListener(Outbound), TO_15001),
    // Inbound: 15008 for HBONE, 15006 for anything else.
    row("inbound: HBONE to B", UPLINK, NONE, B, SYN, 15008, LISTENING)
        .want(AssignedListener(InboundHbone), TO_15008),
    row("inbound: plaintext to B", UPLINK, NONE, B, SYN, 8080, LISTENING)
        .want(AssignedListener(InboundPlain), TO_15006),
    row("inbound: 15006 itself is plaintext", UPLINK, NONE, B, SYN, 15006, LISTENING)
        .want(AssignedListener(InboundPlain), TO_15006),
    row("inbound: unenrolled C to B on the same node", C_VETH, NONE, B, SYN, 80, LISTENING)
        .want(AssignedListener(InboundPlain), TO_15006),
    row("inbound: a SYN is not looked up in ZT_FLOWS", UPLINK, NONE, B, SYN, 80, CAPTURED | LISTENING)
        .want(AssignedListener(InboundPlain), TO_15006),
    row("inbound: the HBONE port follows the settings", UPLINK, NONE, B, SYN, 16008, LISTENING).settings(PORTS_16K)
        .want(AssignedListener(InboundHbone), &[Socket(Assign), Excluded, Listen(16008)]),
    row("inbound: so does the plaintext one", UPLINK, NONE, B, SYN, 15008, LISTENING).settings(PORTS_16K)
        .want(AssignedListener(InboundPlain), &[Socket(Assign), Excluded, Listen(16006)]),
];

#[test]
fn table() {
    let mut failed = Vec::new();
    for row in TABLE {
        let mut answers = Answers {
            row,
            asked: Vec::new(),
        };
        let got = decide(&row.facts, &mut answers);
        if got != row.want || answers.asked != row.asks {
            failed.push(std::format!(
                "{}: got {got:?} asking {:?}, want {:?} asking {:?}",
                row.name,
                answers.asked,
                row.want,
                row.asks
            ));
        }
    }
    assert!(failed.is_empty(), "\n{}", failed.join("\n"));
}

#[test]
fn names_are_unique() {
    let mut names: Vec<&str> = TABLE.iter().map(|r| r.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), TABLE.len());
}

#[test]
fn counting() {
    for v in [
        Direct,
        Assigned,
        Marked,
        MarkedOpening,
        AssignedListener(Outbound),
        DropFailClosed,
        DropSocketGone,
    ] {
        assert!(v.counted(), "{v:?}");
    }
    for v in [Continue, DropSpoofed] {
        assert!(!v.counted(), "{v:?}");
    }
    let facts = |src, dst| Facts {
        src,
        dst,
        ..row("", A_VETH, NONE, NONE, SYN, 80, NO).facts
    };
    assert_eq!(facts(A, B).charged(), Some(End::Src));
    assert_eq!(facts(NONE, B).charged(), Some(End::Dst));
    assert_eq!(
        facts(only(A_VETH, POD_FLAG_INBOUND), B).charged(),
        Some(End::Dst)
    );
    assert_eq!(
        facts(A, only(B_VETH, POD_FLAG_OUTBOUND)).charged(),
        Some(End::Src)
    );
    assert_eq!(facts(NONE, only(B_VETH, POD_FLAG_OUTBOUND)).charged(), None);
    assert_eq!(facts(NONE, NONE).charged(), None);
    assert_eq!(facts(H, NONE).charged(), Some(End::Src));
    assert_eq!(facts(NONE, H).charged(), Some(End::Dst));
    assert_eq!(facts(A, H).charged(), Some(End::Src));
    assert!(
        !facts(H, NONE).spoofed(),
        "a held pod's interface is unknown"
    );
}

/// Which verdicts mark the sending pod's socket: what a pod sends to ztunnel, from its own
/// interface; never a packet seen elsewhere, dropped, or left on the direct path.
#[test]
fn marking_pod_sockets() {
    let facts = |ifindex, src| row("", ifindex, src, NONE, ACK, 80, NO).facts;
    let own = facts(A_VETH, A);
    for v in [Marked, Assigned, AssignedListener(Outbound)] {
        assert!(v.marks_pod_socket(&own), "{v:?}");
    }
    for v in [
        Continue,
        Direct,
        MarkedOpening,
        AssignedListener(InboundPlain),
        AssignedListener(InboundHbone),
        DropFailClosed,
        DropSocketGone,
        DropSpoofed,
        DropUnparsed,
    ] {
        assert!(!v.marks_pod_socket(&own), "{v:?}");
    }
    assert!(
        !Marked.marks_pod_socket(&facts(UPLINK, NONE)),
        "not a pod's"
    );
    assert!(
        !Marked.marks_pod_socket(&facts(UPLINK, only(0, BOTH))),
        "interface unknown"
    );
    assert!(
        !Marked.marks_pod_socket(&facts(C_VETH, NONE)),
        "not enrolled"
    );
}

#[test]
fn listener_ports() {
    assert_eq!(Outbound.port(&SETTINGS), 15001);
    assert_eq!(InboundPlain.port(&SETTINGS), 15006);
    assert_eq!(InboundHbone.port(&SETTINGS), 15008);
    assert!(Outbound.is_outbound() && !InboundHbone.is_outbound() && !InboundPlain.is_outbound());
}

/// On the bridge's own device: rows of (name, facts, marked, answers, verdict, questions).
/// The bridge's ifindex is not the pods' (it passes up their frames): no spoofing check.
const BRIDGE: u32 = 5;

#[test]
fn on_the_bridge() {
    #[rustfmt::skip]
    let rows: &[(Row, bool)] = &[
        (row("unmarked SYN: not taken at the port", BRIDGE, A, NONE, SYN, 80, LISTENING)
            .want(Continue, &[]), false),
        (row("marked non-SYN: found by the kernel's lookup", BRIDGE, A, B, ACK, 80, SOCKET)
            .want(Continue, &[]), true),
        (row("marked SYN-ACK", BRIDGE, A, B, SYN | ACK, 80, SOCKET).want(Continue, &[]), true),
        (row("disabled", BRIDGE, A, NONE, SYN, 80, LISTENING).settings(DISABLED)
            .want(Continue, &[]), true),
        (row("marked SYN of a socket's tuple", BRIDGE, A, B, SYN, 80, SOCKET)
            .want(Assigned, &[Socket(Assign)]), true),
        (row("outbound SYN: 15001 again", BRIDGE, A, NONE, SYN, 80, LISTENING)
            .want(Assigned, &[Socket(Assign), Node, Listen(15001)]), true),
        (row("SYN next door, to an enrolled pod: 15001 (the source's)", BRIDGE, A, B, SYN, 80, LISTENING)
            .want(Assigned, &[Socket(Assign), Node, Listen(15001)]), true),
        (row("inbound plaintext: 15006 again", BRIDGE, NONE, B, SYN, 80, LISTENING)
            .want(Assigned, &[Socket(Assign), Listen(15006)]), true),
        (row("inbound HBONE: 15008 again", BRIDGE, NONE, B, SYN, 15008, LISTENING)
            .want(Assigned, &[Socket(Assign), Listen(15008)]), true),
        (row("no listener any more: dropped", BRIDGE, A, NONE, SYN, 80, NO)
            .want(DropFailClosed, &[Socket(Assign), Node, Listen(15001)]), true),
        (row("marked but no listener fits: dropped", BRIDGE, A, NONE, SYN, 80, NODE)
            .want(DropFailClosed, &[Socket(Assign), Node]), true),
        (row("marked, neither end enrolled: dropped", BRIDGE, NONE, NONE, SYN, 80, LISTENING)
            .want(DropFailClosed, &[Socket(Assign)]), true),
    ];
    for (r, marked) in rows {
        let mut a = Answers {
            row: r,
            asked: Vec::new(),
        };
        assert_eq!(
            decide_on_bridge(&r.facts, *marked, &mut a),
            r.want,
            "{}",
            r.name
        );
        assert_eq!(a.asked, r.asks, "{}: questions", r.name);
    }
}

#[test]
fn unparsed() {
    let f = |ifindex, src, dst, settings| Facts {
        settings,
        ..row("", ifindex, src, dst, 0, 0, NO).facts
    };
    let rows = [
        (
            "from an enrolled pod",
            f(A_VETH, A, NONE, SETTINGS),
            DropUnparsed,
        ),
        (
            "to an enrolled pod",
            f(UPLINK, NONE, B, SETTINGS),
            DropUnparsed,
        ),
        (
            "between enrolled pods",
            f(A_VETH, A, B, SETTINGS),
            DropUnparsed,
        ),
        (
            "spoofed: still a spoof",
            f(C_VETH, A, NONE, SETTINGS),
            DropSpoofed,
        ),
        (
            "unenrolled both ends",
            f(C_VETH, NONE, NONE, SETTINGS),
            Continue,
        ),
        (
            "outbound-only destination",
            f(C_VETH, NONE, only(B_VETH, POD_FLAG_OUTBOUND), SETTINGS),
            Continue,
        ),
        (
            "inbound-only source",
            f(A_VETH, only(A_VETH, POD_FLAG_INBOUND), NONE, SETTINGS),
            Continue,
        ),
        ("capture disabled", f(A_VETH, A, B, DISABLED), Continue),
    ];
    for (name, facts, want) in rows {
        assert_eq!(decide_unparsed(&facts), want, "{name}");
    }
    assert!(!DropUnparsed.counted());
}
