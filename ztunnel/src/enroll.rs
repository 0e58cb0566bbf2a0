//! Enrollment: brings the kernel's set of captured pods in line with the pods this node
//! should capture.
//!
//! *Which* pods is the job of a [`WorkloadSource`]: in standalone mode the workloads the
//! state (workload file or xDS) places on this node in the mesh ([`StoreSource`]); on
//! Kubernetes the pods of this node in namespaces labelled for ambient
//! (`crate::k8s::KubeSource`). *How* is the job of an [`EnrollTarget`]: the eBPF capture
//! in production, an in-memory fake in tests (so this logic is tested without root).
//!
//! A pod's host-side interface is found through the pod's own network namespace (the
//! peer of its interface: `capture::interfaces`), not the route to its address, which on
//! a bridge CNI names the bridge. A pod whose interface is not there yet (the CNI has not
//! finished) or cannot be found is retried on every pass and reported (log, readiness,
//! `/debug/capture`), never enrolled on a guess and never fatal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::capture::{Capture, PodInterfaces};
use crate::identity::Identity;
use crate::state::StateStore;

/// What enrollment looks like right now, for the admin endpoint and readiness.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EnrollmentStatus {
    /// uid → (addresses, interface) of enrolled workloads.
    pub enrolled: BTreeMap<String, (Vec<IpAddr>, String)>,
    /// uid → why it is not enrolled yet.
    pub pending: BTreeMap<String, String>,
    /// uid → SPIFFE identity of the enrolled workloads (readiness checks their
    /// certificates without a state lookup, which k8s-mode uids may not match).
    pub identities: BTreeMap<String, String>,
    /// uid → index of the interface it was enrolled on: the anti-spoofing check in the
    /// program compares packets' ingress interface with it.
    #[serde(skip)]
    ifindexes: BTreeMap<String, u32>,
}

/// A pod this node should capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// Stable key: the state's workload uid, or the Kubernetes pod uid.
    pub uid: String,
    /// Every address of the pod (IPv4 and IPv6); the first finds its interface.
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
}

/// Where the wanted set comes from.
pub trait WorkloadSource: Send + Sync {
    /// The pods to capture now, or `None` while the source has not synced yet: a
    /// half-known set must not unenroll pods a previous ztunnel left enrolled.
    fn wanted(&self) -> Option<Vec<Wanted>>;

    /// Ticks whenever `wanted` may have changed.
    fn changes(&self) -> watch::Receiver<u64>;

    /// Told the outcome of every pass (Kubernetes annotates enrolled pods).
    fn report(&self, _status: &EnrollmentStatus) {}
}

/// Standalone: the state's in-mesh workloads of this node.
pub struct StoreSource {
    node: String,
    store: Arc<StateStore>,
}

impl StoreSource {
    pub fn new(node: String, store: Arc<StateStore>) -> Self {
        StoreSource { node, store }
    }
}

impl WorkloadSource for StoreSource {
    fn wanted(&self) -> Option<Vec<Wanted>> {
        let state = self.store.snapshot();
        let wanted = state
            .workloads_on_node(&self.node)
            .into_iter()
            .filter(|w| w.in_mesh() && !w.workload_ips.is_empty())
            .map(|w| Wanted {
                uid: w.uid.clone(),
                ips: w.workload_ips.clone(),
                identity: w.identity(),
            })
            .collect();
        Some(wanted)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.store.subscribe()
    }
}

/// The capture side of enrollment.
#[async_trait]
pub trait EnrollTarget: Send + Sync {
    /// The host-side interface of every pod of this node, by address: name and index (a
    /// pod recreated with the same interface name gets a new index). One call per pass.
    async fn pod_interfaces(&self) -> anyhow::Result<PodInterfaces>;
    async fn enroll(&self, ips: &[IpAddr], interface: &str, ifindex: u32) -> anyhow::Result<()>;
    async fn unenroll(&self, ips: &[IpAddr]) -> anyhow::Result<()>;
    /// Addresses enrolled in the kernel (also by an earlier ztunnel: pinned map).
    async fn enrolled(&self) -> Vec<IpAddr>;
}

/// The eBPF capture; each call takes the lock briefly so the admin endpoint and the
/// periodic refresh are not held up by netlink round trips of a whole pass.
#[async_trait]
impl EnrollTarget for Mutex<Capture> {
    async fn pod_interfaces(&self) -> anyhow::Result<PodInterfaces> {
        self.lock().await.pod_interfaces().await
    }
    async fn enroll(&self, ips: &[IpAddr], interface: &str, ifindex: u32) -> anyhow::Result<()> {
        self.lock().await.enroll(ips, interface, ifindex).await
    }
    async fn unenroll(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
        self.lock().await.unenroll(ips)
    }
    async fn enrolled(&self) -> Vec<IpAddr> {
        self.lock()
            .await
            .enrolled()
            .into_iter()
            .map(|p| p.address)
            .collect()
    }
}

pub struct Enroller {
    source: Arc<dyn WorkloadSource>,
    target: Arc<dyn EnrollTarget>,
    status: std::sync::Mutex<EnrollmentStatus>,
    /// One pass at a time: a pass reads the previous status and writes the next.
    pass: Mutex<()>,
}

impl Enroller {
    /// Standalone: the state's workloads of `node`, enrolled with the eBPF capture.
    pub fn new(node: String, store: Arc<StateStore>, capture: Arc<Mutex<Capture>>) -> Self {
        Enroller::with_source(Arc::new(StoreSource::new(node, store)), capture)
    }

    pub fn with_source(source: Arc<dyn WorkloadSource>, target: Arc<dyn EnrollTarget>) -> Self {
        Enroller {
            source,
            target,
            status: Default::default(),
            pass: Mutex::new(()),
        }
    }

    pub fn status(&self) -> EnrollmentStatus {
        self.status.lock().unwrap().clone()
    }

    /// Ticks when the wanted set may have changed: reconcile then.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.source.changes()
    }

    /// Identities of the pods this node should capture (enrolled or about to be): the
    /// certificates the node's Citadel Agent should hold. `None` until the source synced.
    pub fn identities(&self) -> Option<BTreeSet<Identity>> {
        Some(
            self.source
                .wanted()?
                .into_iter()
                .map(|w| w.identity)
                .collect(),
        )
    }

    /// Brings the kernel's enrolled set in line with the source. Idempotent.
    pub async fn reconcile(&self) {
        let _pass = self.pass.lock().await;
        let Some(wanted) = self.source.wanted() else {
            return; // not synced: keep what is enrolled, decide nothing yet
        };
        let previous = self.status();
        let mut next = EnrollmentStatus::default();
        let interfaces = self
            .target
            .pod_interfaces()
            .await
            .map_err(|e| format!("reading the pods' interfaces failed: {e:#}"));
        for w in &wanted {
            if let Some(iface) = self.enroll_one(w, &interfaces, &previous, &mut next).await {
                next.enrolled.insert(w.uid.clone(), (w.ips.clone(), iface));
                next.identities
                    .insert(w.uid.clone(), w.identity.to_string());
            }
        }
        // Addresses enrolled before (also by an earlier ztunnel, found in the pinned
        // map) that no wanted workload has any more. A pending pod's addresses go too:
        // its interface vanished or never was, and a stale entry would capture the next
        // pod given the address.
        let keep: BTreeSet<IpAddr> = next
            .enrolled
            .values()
            .flat_map(|(ips, _)| ips.clone())
            .collect();
        let stale: Vec<IpAddr> = self
            .target
            .enrolled()
            .await
            .into_iter()
            .filter(|a| !keep.contains(a))
            .collect();
        if !stale.is_empty() {
            info!(addresses = ?stale, "unenrolling addresses no workload of this node has");
            if let Err(e) = self.target.unenroll(&stale).await {
                warn!("unenroll failed: {e:#}");
            }
        }
        self.source.report(&next);
        *self.status.lock().unwrap() = next;
    }

    /// Enrolls one pod unless it already is; its interface, or `None` (recorded as
    /// pending, retried next pass).
    async fn enroll_one(
        &self,
        w: &Wanted,
        interfaces: &Result<PodInterfaces, String>,
        previous: &EnrollmentStatus,
        next: &mut EnrollmentStatus,
    ) -> Option<String> {
        let first = *w.ips.first()?;
        let found = match interfaces {
            Ok(i) => i.lookup(first),
            Err(e) => Err(e.clone()),
        };
        let (iface, ifindex) = match found {
            Ok(i) => i,
            Err(why) => {
                if previous.pending.get(&w.uid) != Some(&why) {
                    warn!(workload = %w.uid, "not enrolled: {why}; will retry");
                }
                next.pending.insert(w.uid.clone(), why);
                return None;
            }
        };
        // Same addresses on the same interface — the same interface, not just its name:
        // a pod recreated with the same veth name has a new one.
        let already = previous.enrolled.get(&w.uid) == Some(&(w.ips.clone(), iface.clone()))
            && previous.ifindexes.get(&w.uid) == Some(&ifindex);
        next.ifindexes.insert(w.uid.clone(), ifindex);
        if !already {
            if let Err(e) = self.target.enroll(&w.ips, &iface, ifindex).await {
                warn!(workload = %w.uid, "enrollment failed: {e:#}; will retry");
                next.pending.insert(w.uid.clone(), format!("{e:#}"));
                return None;
            }
            info!(workload = %w.uid, interface = %iface, "workload enrolled");
        }
        Some(iface)
    }
}

#[cfg(test)]
pub(crate) mod tests;
