use super::*;
use crate::SETTINGS_HOST_UNDER_POLICY;

/// Answers from a table row; records what was asked.
struct Look {
    excluded: bool,
    cached: u8,
    queue_full: bool,
    asked: bool,
}

impl LastHopLookups for Look {
    fn port_excluded(&mut self) -> bool {
        self.excluded
    }
    fn cached(&mut self) -> u8 {
        self.cached
    }
    fn ask(&mut self) -> bool {
        self.asked = true;
        !self.queue_full
    }
}

const ON: u16 = SETTINGS_ENABLED;
const STRICT: u16 = SETTINGS_ENABLED | SETTINGS_HOST_UNDER_POLICY;
const POD: u32 = POD_FLAG_INBOUND;
const HELD: u32 = POD_FLAG_HELD;
const NONE: u32 = 0;

use LastHopVerdict::*;

#[test]
fn last_hop_table() {
    // (settings flags, dst flags, syn, from ztunnel, from node, excluded, cached,
    //  queue full) → (verdict, asked)
    type Given = (u16, u32, bool, bool, bool, bool, u8, bool);
    #[rustfmt::skip]
    let rows: &[(Given, (LastHopVerdict, bool))] = &[
        // not enabled, not a SYN, not enrolled: not the last hop's business
        ((0, POD, true, false, false, false, 0, false), (Continue, false)),
        ((ON, POD, false, false, false, false, 0, false), (Continue, false)),
        ((ON, NONE, true, false, false, false, 0, false), (Continue, false)),
        // ztunnel delivering what it authorized; an excluded port
        ((ON, POD, true, true, true, false, 0, false), (Continue, false)),
        ((ON, POD, true, false, false, true, 0, false), (Continue, false)),
        // the node's own connections (probes): exempt, unless under policy
        ((ON, POD, true, false, true, false, 0, false), (FromNode, false)),
        ((STRICT, POD, true, false, true, false, LAST_HOP_DENY, false), (Denied, false)),
        ((STRICT, POD, true, false, true, false, LAST_HOP_ALLOW, false), (Allowed, false)),
        // forwarded (VIP, NodePort, hostPort): the cached verdict, or ask
        ((ON, POD, true, false, false, false, LAST_HOP_ALLOW, false), (Allowed, false)),
        ((ON, POD, true, false, false, false, LAST_HOP_DENY, false), (Denied, false)),
        ((ON, POD, true, false, false, false, LAST_HOP_PENDING, false), (Waiting, false)),
        ((ON, POD, true, false, false, false, 0, false), (Asked, true)),
        ((ON, POD, true, false, false, false, 0, true), (Waiting, true)),
        // held pods: the node's connections only, nothing asked
        ((ON, HELD, true, false, true, false, 0, false), (FromNode, false)),
        ((STRICT, HELD, true, false, true, false, 0, false), (FromNode, false)),
        ((ON, HELD, true, false, false, false, LAST_HOP_ALLOW, false), (Denied, false)),
    ];
    for (i, &((flags, dst, syn, zt, node, excluded, cached, full), (want, want_asked))) in
        rows.iter().enumerate()
    {
        let f = LastHopFacts {
            settings: Settings {
                flags,
                ..Settings::default()
            },
            dst: PodInfo {
                ifindex: 7,
                flags: dst,
            },
            syn,
            from_ztunnel: zt,
            from_node: node,
        };
        let mut look = Look {
            excluded,
            cached,
            queue_full: full,
            asked: false,
        };
        assert_eq!(decide_last_hop(&f, &mut look), want, "row {i}");
        assert_eq!(look.asked, want_asked, "row {i}: asked");
    }
}

#[test]
fn drops_and_counters() {
    for v in [Continue, FromNode, Allowed] {
        assert!(!v.drops(), "{v:?}");
    }
    for v in [Denied, Asked, Waiting] {
        assert!(v.drops(), "{v:?}");
    }
    assert_eq!(Continue.counter(), None);
    let mut seen: Vec<u32> = [FromNode, Allowed, Denied, Asked, Waiting]
        .iter()
        .filter_map(|v| v.counter())
        .collect();
    seen.sort();
    assert_eq!(seen, (0..LAST_HOP_COUNTERS).collect::<Vec<_>>());
}
