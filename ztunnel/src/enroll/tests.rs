//! The Enroller against an in-memory capture: no root, no kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use super::*;

/// Stands in for the eBPF capture: a routing table (address → interface) the test edits,
/// and the enrolled map.
#[derive(Default)]
pub(crate) struct FakeTarget {
    pub routes: Mutex<BTreeMap<IpAddr, (String, u32)>>,
    pub enrolled: Mutex<BTreeMap<IpAddr, String>>,
    pub enroll_calls: Mutex<usize>,
}

impl FakeTarget {
    pub fn route(&self, ip: IpAddr, iface: &str) {
        self.route_index(ip, iface, 1);
    }
    pub fn route_index(&self, ip: IpAddr, iface: &str, index: u32) {
        self.routes
            .lock()
            .unwrap()
            .insert(ip, (iface.to_string(), index));
    }
    pub fn enrolled_ips(&self) -> Vec<IpAddr> {
        self.enrolled.lock().unwrap().keys().copied().collect()
    }
}

#[async_trait]
impl EnrollTarget for FakeTarget {
    async fn pod_interfaces(&self) -> anyhow::Result<crate::capture::PodInterfaces> {
        Ok(crate::capture::PodInterfaces {
            found: self.routes.lock().unwrap().clone(),
            ..Default::default()
        })
    }
    async fn enroll(&self, ips: &[IpAddr], interface: &str, _ifindex: u32) -> anyhow::Result<()> {
        *self.enroll_calls.lock().unwrap() += 1;
        let mut e = self.enrolled.lock().unwrap();
        for ip in ips {
            e.insert(*ip, interface.to_string());
        }
        Ok(())
    }
    async fn unenroll(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
        let mut e = self.enrolled.lock().unwrap();
        for ip in ips {
            e.remove(ip);
        }
        Ok(())
    }
    async fn enrolled(&self) -> Vec<IpAddr> {
        self.enrolled_ips()
    }
}

/// A source the test sets directly.
struct ListSource {
    wanted: Mutex<Option<Vec<Wanted>>>,
    tx: watch::Sender<u64>,
    reported: Mutex<Vec<EnrollmentStatus>>,
}

impl WorkloadSource for ListSource {
    fn wanted(&self) -> Option<Vec<Wanted>> {
        self.wanted.lock().unwrap().clone()
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
    fn report(&self, status: &EnrollmentStatus) {
        self.reported.lock().unwrap().push(status.clone());
    }
}

fn pod(uid: &str, ips: &[&str]) -> Wanted {
    Wanted {
        uid: uid.into(),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        identity: Identity::new("cluster.local", "ns1", uid),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn enrolls_wanted_retries_missing_interface_and_unenrolls_leavers() {
    let target = Arc::new(FakeTarget::default());
    // Left by an earlier ztunnel (pinned map), wanted by nobody now.
    target
        .enrolled
        .lock()
        .unwrap()
        .insert(ip("10.0.0.99"), "old".into());
    let source = Arc::new(ListSource {
        wanted: Mutex::new(None),
        tx: watch::channel(0).0,
        reported: Default::default(),
    });
    let enroller = Enroller::with_source(source.clone(), target.clone());

    // Not synced: nothing is decided, the pinned entry survives.
    enroller.reconcile().await;
    assert_eq!(target.enrolled_ips(), vec![ip("10.0.0.99")]);
    assert!(enroller.identities().is_none());

    *source.wanted.lock().unwrap() = Some(vec![
        pod("a", &["10.0.0.1", "fd00::1"]),
        pod("b", &["10.0.0.2"]),
    ]);
    target.route(ip("10.0.0.1"), "veth-a");
    enroller.reconcile().await;
    assert_eq!(target.enrolled_ips(), vec![ip("10.0.0.1"), ip("fd00::1")]);
    let st = enroller.status();
    assert!(
        st.pending["b"].contains("no pod interface on this node holds 10.0.0.2"),
        "{st:?}"
    );
    assert_eq!(st.identities["a"], "spiffe://cluster.local/ns/ns1/sa/a");
    assert_eq!(
        enroller.identities().unwrap().len(),
        2,
        "certificates for enrolled and pending pods"
    );

    // The interface appears: the next pass enrolls it.
    target.route(ip("10.0.0.2"), "veth-b");
    enroller.reconcile().await;
    assert_eq!(target.enrolled_ips().len(), 3);
    assert!(enroller.status().pending.is_empty());

    // a leaves.
    *source.wanted.lock().unwrap() = Some(vec![pod("b", &["10.0.0.2"])]);
    enroller.reconcile().await;
    assert_eq!(target.enrolled_ips(), vec![ip("10.0.0.2")]);
    let last = source.reported.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.enrolled.keys().collect::<Vec<_>>(), vec!["b"]);
}

/// A pod recreated with the same address and the same veth name has a new interface
/// index: it is enrolled again, so the anti-spoofing check knows its new interface.
#[tokio::test]
async fn same_interface_name_with_a_new_index_is_enrolled_again() {
    let target = Arc::new(FakeTarget::default());
    let source = Arc::new(ListSource {
        wanted: Mutex::new(Some(vec![pod("a", &["10.0.0.1"])])),
        tx: watch::channel(0).0,
        reported: Default::default(),
    });
    let enroller = Enroller::with_source(source, target.clone());
    target.route_index(ip("10.0.0.1"), "veth-a", 7);
    enroller.reconcile().await;
    enroller.reconcile().await;
    assert_eq!(*target.enroll_calls.lock().unwrap(), 1, "unchanged: once");
    target.route_index(ip("10.0.0.1"), "veth-a", 8);
    enroller.reconcile().await;
    assert_eq!(*target.enroll_calls.lock().unwrap(), 2, "new index: again");
    enroller.reconcile().await;
    assert_eq!(*target.enroll_calls.lock().unwrap(), 2);
}
