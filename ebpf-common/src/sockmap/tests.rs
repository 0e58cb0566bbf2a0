//! Which sockets go in the map: the ends of each hop, and nothing else that shares their
//! addresses (TLS sockets, pods of another node with the same address, excluded ports).

use super::*;
use crate::SETTINGS_ENABLED;

const POD_A: PodKey = PodKey::v4([10, 1, 0, 2]);
const POD_B: PodKey = PodKey::v4([10, 1, 0, 3]);
const REMOTE: PodKey = PodKey::v4([10, 2, 0, 2]);
const ENROLLED: PodInfo = PodInfo {
    ifindex: 7,
    flags: POD_FLAG_OUTBOUND | POD_FLAG_INBOUND,
};
const POD_SEQ: u32 = 1000;
const ZT_SEQ: u32 = 5000;

fn settings() -> Settings {
    Settings {
        inbound_hbone_port: 15008,
        flags: SETTINGS_ENABLED,
        ..Default::default()
    }
}

fn on() -> SockmapSettings {
    SockmapSettings {
        netns_cookie: 1,
        flags: SOCKMAP_ENABLED,
        _pad: 0,
    }
}

/// Answers from a fixed world: the SYNs capture recorded, the waiting delivery sockets.
#[derive(Default)]
struct World {
    syns: std::vec::Vec<(FlowKey, u32)>,
    pending: std::vec::Vec<SockKey>,
    excluded: std::vec::Vec<u16>,
}

impl SockLookups for World {
    fn syn_seq(&mut self, flow: &FlowKey) -> Option<u32> {
        self.syns.iter().find(|(f, _)| f == flow).map(|(_, s)| *s)
    }
    fn pending(&mut self, key: &SockKey) -> bool {
        self.pending.contains(key)
    }
    fn port_excluded(&mut self, port: u16) -> bool {
        self.excluded.contains(&port)
    }
}

/// Pod A (port 40000) connected to REMOTE:8080; its SYN was captured with POD_SEQ and
/// ztunnel answered with ZT_SEQ. Returns (pod's end, ztunnel's accepted end).
fn outbound_pair() -> (Established, Established) {
    let pod = Established {
        active: true,
        ztunnel_netns: false,
        local: POD_A,
        remote: REMOTE,
        local_port: 40000,
        remote_port: 8080,
        snd_una: POD_SEQ + 1,
        rcv_nxt: ZT_SEQ + 1,
        local_pod: ENROLLED,
        remote_pod: PodInfo::default(),
    };
    let zt = Established {
        active: false,
        ztunnel_netns: true,
        local: REMOTE,
        remote: POD_A,
        local_port: 8080,
        remote_port: 40000,
        snd_una: ZT_SEQ + 1,
        rcv_nxt: POD_SEQ + 1,
        local_pod: PodInfo::default(),
        remote_pod: ENROLLED,
    };
    (pod, zt)
}

fn captured(pod: &Established) -> World {
    World {
        syns: std::vec![(pod.flow(), POD_SEQ)],
        ..Default::default()
    }
}

#[test]
fn both_ends_of_an_outbound_hop_pair_up() {
    let (pod, zt) = outbound_pair();
    let mut w = captured(&pod);
    assert_eq!(classify(&pod, &settings(), &on(), &mut w), Some(End::Pod));
    assert_eq!(
        classify(&zt, &settings(), &on(), &mut w),
        Some(End::Ztunnel)
    );
    assert_eq!(pod.key().peer(), zt.key());
    assert_eq!(zt.key().peer(), pod.key());
    assert_ne!(pod.key(), zt.key());
}

#[test]
fn a_pod_elsewhere_with_the_same_tuple_is_not_taken() {
    // Another node's pod with the same address and ports: its SYN had another sequence.
    let (mut other, _) = outbound_pair();
    other.snd_una = POD_SEQ + 77;
    let mut w = captured(&outbound_pair().0);
    assert_eq!(classify(&other, &settings(), &on(), &mut w), None);
    // And one whose SYN this ztunnel never took at all.
    assert_eq!(
        classify(
            &outbound_pair().0,
            &settings(),
            &on(),
            &mut World::default()
        ),
        None
    );
}

#[test]
fn delivery_pairs_through_the_waiting_ztunnel_socket() {
    // ztunnel (original source POD_A:40000) delivers to pod B:9000; same tuple as pod A's
    // own socket to B, but other sequence numbers.
    let zt = Established {
        active: true,
        ztunnel_netns: true,
        local: POD_A,
        remote: POD_B,
        local_port: 40000,
        remote_port: 9000,
        snd_una: 7001,
        rcv_nxt: 9001,
        local_pod: ENROLLED,
        remote_pod: ENROLLED,
    };
    let pod_b = Established {
        active: false,
        ztunnel_netns: false,
        local: POD_B,
        remote: POD_A,
        local_port: 9000,
        remote_port: 40000,
        snd_una: 9001,
        rcv_nxt: 7001,
        local_pod: ENROLLED,
        remote_pod: ENROLLED,
    };
    let mut w = World::default();
    assert_eq!(
        classify(&zt, &settings(), &on(), &mut w),
        Some(End::Ztunnel)
    );
    // Until ztunnel's end waits in ZT_SOCK_PEND, pod B's socket is nobody's.
    assert_eq!(classify(&pod_b, &settings(), &on(), &mut w), None);
    w.pending.push(zt.key());
    assert_eq!(classify(&pod_b, &settings(), &on(), &mut w), Some(End::Pod));
    assert_eq!(pod_b.key().peer(), zt.key());
}

#[test]
fn tls_excluded_ports_and_switched_off_stay_out() {
    let (mut pod, mut zt) = outbound_pair();
    let mut w = captured(&pod);
    assert_eq!(
        classify(&pod, &settings(), &SockmapSettings::default(), &mut w),
        None
    );
    w.excluded.push(8080);
    assert_eq!(classify(&pod, &settings(), &on(), &mut w), None);
    assert_eq!(classify(&zt, &settings(), &on(), &mut w), None);
    // The HBONE port, either end: TLS.
    pod.remote_port = 15008;
    zt.local_port = 15008;
    let mut w = captured(&pod);
    assert_eq!(classify(&pod, &settings(), &on(), &mut w), None);
    assert_eq!(classify(&zt, &settings(), &on(), &mut w), None);
}

#[test]
fn unenrolled_ends_stay_out() {
    let (mut pod, mut zt) = outbound_pair();
    let mut w = captured(&pod);
    pod.local_pod = PodInfo::default();
    zt.remote_pod = PodInfo::default();
    assert_eq!(classify(&pod, &settings(), &on(), &mut w), None);
    assert_eq!(classify(&zt, &settings(), &on(), &mut w), None);
}
