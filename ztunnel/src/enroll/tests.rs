//! The Enroller against an in-memory capture: no root, no kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use super::*;

/// Stands in for the eBPF capture: the interfaces whose peers hold each address (the
/// test edits them), and the kernel map (address → interface and index; held: "", 0).
#[derive(Default)]
pub(crate) struct FakeTarget {
    pub routes: Mutex<BTreeMap<IpAddr, Vec<(String, u32)>>>,
    pub enrolled: Mutex<BTreeMap<IpAddr, (String, u32)>>,
    pub enroll_calls: Mutex<usize>,
    pub pod_links: Mutex<BTreeSet<u32>>,
}

impl FakeTarget {
    pub fn route(&self, ip: IpAddr, iface: &str) {
        self.route_index(ip, iface, 1);
    }
    /// `ip` is held by `iface` alone.
    pub fn route_index(&self, ip: IpAddr, iface: &str, index: u32) {
        self.routes
            .lock()
            .unwrap()
            .insert(ip, vec![(iface.to_string(), index)]);
    }
    /// `iface` claims `ip` too.
    pub fn claim(&self, ip: IpAddr, iface: &str, index: u32) {
        self.routes
            .lock()
            .unwrap()
            .entry(ip)
            .or_default()
            .push((iface.to_string(), index));
    }
    /// Enrolled (not held) addresses.
    pub fn enrolled_ips(&self) -> Vec<IpAddr> {
        let e = self.enrolled.lock().unwrap();
        e.iter()
            .filter(|(_, i)| i.1 != 0)
            .map(|(a, _)| *a)
            .collect()
    }
    pub fn held_ips(&self) -> Vec<IpAddr> {
        let e = self.enrolled.lock().unwrap();
        e.iter()
            .filter(|(_, i)| i.1 == 0)
            .map(|(a, _)| *a)
            .collect()
    }
    pub fn interface_of(&self, ip: IpAddr) -> Option<(String, u32)> {
        self.enrolled.lock().unwrap().get(&ip).cloned()
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
    async fn enroll(&self, ips: &[IpAddr], interface: &str, ifindex: u32) -> anyhow::Result<()> {
        *self.enroll_calls.lock().unwrap() += 1;
        let mut e = self.enrolled.lock().unwrap();
        for ip in ips {
            e.insert(*ip, (interface.to_string(), ifindex));
        }
        Ok(())
    }
    async fn hold(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
        let mut e = self.enrolled.lock().unwrap();
        for ip in ips {
            e.insert(*ip, (String::new(), 0));
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
    async fn enrolled(&self) -> BTreeMap<IpAddr, u32> {
        let e = self.enrolled.lock().unwrap();
        e.iter().map(|(a, i)| (*a, i.1)).collect()
    }
    async fn set_pod_links(&self, links: BTreeSet<u32>) {
        *self.pod_links.lock().unwrap() = links;
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
        .insert(ip("10.0.0.99"), ("old".into(), 3));
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
    assert_eq!(target.held_ips(), vec![ip("10.0.0.2")], "never open");
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
    assert!(target.held_ips().is_empty());
    assert!(enroller.status().pending.is_empty());

    // a leaves.
    *source.wanted.lock().unwrap() = Some(vec![pod("b", &["10.0.0.2"])]);
    enroller.reconcile().await;
    assert_eq!(target.enrolled_ips(), vec![ip("10.0.0.2")]);
    assert!(target.held_ips().is_empty());
    let last = source.reported.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.enrolled.keys().collect::<Vec<_>>(), vec!["b"]);
    // workload_manager_*: a and b started, a stopped, b active.
    assert_eq!((last.started, last.stopped), (2, 1), "{last:?}");
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
    // The move to a new interface ends one enrollment and starts another.
    let st = enroller.status();
    assert_eq!((st.started, st.stopped, st.enrolled.len()), (2, 1, 1));
}

fn source(wanted: Vec<Wanted>) -> Arc<ListSource> {
    Arc::new(ListSource {
        wanted: Mutex::new(Some(wanted)),
        tx: watch::channel(0).0,
        reported: Default::default(),
    })
}

/// One address, one pod: a second interface claiming an enrolled pod's address changes
/// nothing; the claim is reported and counted once; when the owner's interface goes, the
/// address is not handed to the claimant on a guess while two claim it.
#[tokio::test]
async fn a_claimed_address_stays_with_its_owner() {
    let target = Arc::new(FakeTarget::default());
    let enroller = Enroller::with_source(
        source(vec![
            pod("victim", &["10.0.0.2", "fd00::2"]),
            pod("claimant", &["10.0.0.3"]),
        ]),
        target.clone(),
    );
    target.route_index(ip("10.0.0.2"), "p2", 7);
    target.route_index(ip("fd00::2"), "p2", 7);
    target.route_index(ip("10.0.0.3"), "p3", 9);
    enroller.reconcile().await;
    assert_eq!(target.interface_of(ip("10.0.0.2")), Some(("p2".into(), 7)));
    assert_eq!(*target.pod_links.lock().unwrap(), [7, 9].into());

    // The claimant adds both of the victim's addresses to its own interface.
    target.claim(ip("10.0.0.2"), "p3", 9);
    target.claim(ip("fd00::2"), "p3", 9);
    for _ in 0..3 {
        enroller.reconcile().await;
    }
    assert_eq!(target.interface_of(ip("10.0.0.2")), Some(("p2".into(), 7)));
    assert_eq!(target.interface_of(ip("fd00::2")), Some(("p2".into(), 7)));
    let st = enroller.status();
    assert!(st.pending.is_empty(), "{st:?}");
    let c = &st.conflicts[&ip("10.0.0.2")];
    assert_eq!(
        (c.workload.as_str(), c.owner.as_deref(), c.refused.clone()),
        ("victim", Some("p2"), vec!["p3".to_string()])
    );
    assert!(st.conflicts.contains_key(&ip("fd00::2")));
    assert_eq!(enroller.claims_refused(), 2, "each claim counted once");

    // The claimant gives up: the conflict is gone, the count stays.
    target.route_index(ip("10.0.0.2"), "p2", 7);
    target.route_index(ip("fd00::2"), "p2", 7);
    enroller.reconcile().await;
    assert!(enroller.status().conflicts.is_empty());
    assert_eq!(enroller.claims_refused(), 2);
}

/// After a restart (no status yet), the owner is the interface the pinned map names.
#[tokio::test]
async fn a_restart_keeps_the_owner_the_pinned_map_names() {
    let target = Arc::new(FakeTarget::default());
    target
        .enrolled
        .lock()
        .unwrap()
        .insert(ip("10.0.0.2"), ("p2".into(), 7));
    target.route_index(ip("10.0.0.2"), "p3", 9);
    target.claim(ip("10.0.0.2"), "p2", 7);
    let enroller =
        Enroller::with_source(source(vec![pod("victim", &["10.0.0.2"])]), target.clone());
    enroller.reconcile().await;
    assert_eq!(target.interface_of(ip("10.0.0.2")), Some(("p2".into(), 7)));
    assert_eq!(enroller.claims_refused(), 1);
}

/// Two interfaces claim an address and no owner is known (first start, or the owner's
/// interface went away): held, reported, never enrolled on a guess.
#[tokio::test]
async fn an_address_two_claim_without_an_owner_is_held() {
    let target = Arc::new(FakeTarget::default());
    target.route_index(ip("10.0.0.2"), "p2", 7);
    target.claim(ip("10.0.0.2"), "p3", 9);
    let enroller =
        Enroller::with_source(source(vec![pod("victim", &["10.0.0.2"])]), target.clone());
    enroller.reconcile().await;
    assert_eq!(target.held_ips(), vec![ip("10.0.0.2")]);
    let st = enroller.status();
    assert!(
        st.pending["victim"].contains("claimed by 2 interfaces"),
        "{st:?}"
    );
    assert_eq!(st.conflicts[&ip("10.0.0.2")].owner, None);
    assert_eq!(enroller.claims_refused(), 2);
    // One interface alone holds it again: enrolled there.
    target.route_index(ip("10.0.0.2"), "p2", 7);
    enroller.reconcile().await;
    assert_eq!(target.interface_of(ip("10.0.0.2")), Some(("p2".into(), 7)));
    assert!(enroller.status().pending.is_empty());
}

/// An enrolled pod whose interface vanishes is held, not dropped from the map; a pod
/// that leaves the wanted set is removed whether enrolled or held.
#[tokio::test]
async fn a_pod_that_loses_its_interface_is_held_until_it_leaves() {
    let target = Arc::new(FakeTarget::default());
    let src = source(vec![pod("a", &["10.0.0.2"])]);
    let enroller = Enroller::with_source(src.clone(), target.clone());
    target.route_index(ip("10.0.0.2"), "p2", 7);
    enroller.reconcile().await;
    assert_eq!(target.enrolled_ips(), vec![ip("10.0.0.2")]);
    target.routes.lock().unwrap().clear();
    enroller.reconcile().await;
    assert_eq!(target.held_ips(), vec![ip("10.0.0.2")]);
    assert!(enroller.status().pending.contains_key("a"));
    *src.wanted.lock().unwrap() = Some(vec![]);
    enroller.reconcile().await;
    assert!(target.enrolled.lock().unwrap().is_empty());
}
