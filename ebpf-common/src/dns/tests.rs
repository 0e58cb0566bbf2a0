//! The DNS decision as a table: who asks, from where, whether ztunnel's DNS socket is
//! there, and whether the socket was asked for at all (asking assigns).

use std::vec::Vec;

use super::*;
use crate::{PodInfo, Settings, POD_FLAG_HELD, POD_FLAG_INBOUND, POD_FLAG_OUTBOUND};

use DnsVerdict::*;

const A_VETH: u32 = 7;
const UPLINK: u32 = 2;
const A: PodInfo = PodInfo {
    ifindex: A_VETH,
    flags: POD_FLAG_OUTBOUND | POD_FLAG_INBOUND,
};
/// Enrolled for inbound only: its own connections (and DNS) are not the mesh's.
const INBOUND_ONLY: PodInfo = PodInfo {
    ifindex: A_VETH,
    flags: POD_FLAG_INBOUND,
};
/// Enrolled, interface not known yet.
const A_UNKNOWN_IFACE: PodInfo = PodInfo {
    ifindex: 0,
    flags: POD_FLAG_OUTBOUND | POD_FLAG_INBOUND,
};
const HELD: PodInfo = PodInfo {
    ifindex: 0,
    flags: POD_FLAG_HELD,
};
const NONE: PodInfo = PodInfo {
    ifindex: 0,
    flags: 0,
};

const ON: Settings = Settings {
    capture_mark: 0x1000,
    proxy_mark: 0x539,
    outbound_port: 15001,
    inbound_plain_port: 15006,
    inbound_hbone_port: 15008,
    flags: SETTINGS_ENABLED,
    dns_port: 15053,
    reserved: 0,
};
const DNS_OFF: Settings = Settings { dns_port: 0, ..ON };
const DISABLED: Settings = Settings { flags: 0, ..ON };

/// Records the ports asked for and answers from a fixed world.
struct World {
    listening: bool,
    to_node: bool,
    asked: Vec<u16>,
}

impl DnsLookups for World {
    fn dst_is_node(&mut self) -> bool {
        self.to_node
    }
    fn assign_dns(&mut self, port: u16) -> bool {
        self.asked.push(port);
        self.listening
    }
}

fn facts(settings: Settings, src: PodInfo, ifindex: u32, dport: u16) -> Facts {
    Facts {
        settings,
        ifindex,
        src,
        dst: NONE,
        tcp_flags: 0,
        dport,
    }
}

/// (case, settings, source, arrived on, port, ztunnel's socket there, verdict, asked)
type Row = (
    &'static str,
    Settings,
    PodInfo,
    u32,
    u16,
    bool,
    DnsVerdict,
    bool,
);

#[test]
fn dns_table() {
    #[rustfmt::skip]
    let rows: &[Row] = &[
        ("enrolled pod asks, socket there", ON, A, A_VETH, 53, true, Assigned, true),
        ("ztunnel down: fail open, counted", ON, A, A_VETH, 53, false, Passed, true),
        ("not port 53", ON, A, A_VETH, 5353, true, Continue, false),
        ("pod not enrolled", ON, NONE, A_VETH, 53, true, Continue, false),
        ("held pod: UDP is not held", ON, HELD, A_VETH, 53, true, Continue, false),
        ("inbound-only enrollment", ON, INBOUND_ONLY, A_VETH, 53, true, Continue, false),
        ("its address from another interface", ON, A, UPLINK, 53, true, Continue, false),
        ("its interface not known yet", ON, A_UNKNOWN_IFACE, A_VETH, 53, true, Continue, false),
        ("DNS capture off", DNS_OFF, A, A_VETH, 53, true, Continue, false),
        ("capture not enabled yet", DISABLED, A, A_VETH, 53, true, Continue, false),
    ];
    for &(case, settings, src, iface, port, listening, want, asks) in rows {
        let mut w = World {
            listening,
            to_node: false,
            asked: Vec::new(),
        };
        let got = decide_dns(&facts(settings, src, iface, port), &mut w);
        assert_eq!(got, want, "{case}");
        let expected: &[u16] = if asks { &[15053] } else { &[] };
        assert_eq!(w.asked, expected, "{case}: questions");
    }
    // A resolver on the node itself (NodeLocal DNSCache): not captured.
    let mut w = World {
        listening: true,
        to_node: true,
        asked: Vec::new(),
    };
    assert_eq!(decide_dns(&facts(ON, A, A_VETH, 53), &mut w), Continue);
    assert!(w.asked.is_empty());
}

#[test]
fn bridge_table() {
    // On the bridge's own device the source is not checked again (the mark says the port
    // took it; a mark does not cross a veth from a pod's namespace).
    #[rustfmt::skip]
    let rows: &[(&str, Settings, bool, u16, bool, DnsVerdict, bool)] = &[
        ("marked at the port: assigned again", ON, true, 53, true, Assigned, true),
        ("marked, socket gone since: passed on", ON, true, 53, false, Passed, true),
        ("not marked: decided at the port", ON, false, 53, true, Continue, false),
        ("marked but not DNS", ON, true, 5353, true, Continue, false),
        ("DNS capture off", DNS_OFF, true, 53, true, Continue, false),
        ("capture not enabled", DISABLED, true, 53, true, Continue, false),
    ];
    for &(case, settings, marked, port, listening, want, asks) in rows {
        let mut w = World {
            listening,
            to_node: false,
            asked: Vec::new(),
        };
        let f = facts(settings, NONE, 3, port);
        assert_eq!(decide_dns_on_bridge(&f, marked, &mut w), want, "{case}");
        assert_eq!(w.asked.len(), usize::from(asks), "{case}: questions");
    }
}
