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
//! `/debug/capture`, a metric), never enrolled on a guess and never fatal. Never open:
//! meanwhile its addresses are *held* in the kernel map, so the program drops its TCP
//! from and to anywhere but its own node, on every interface ztunnel is attached to.
//!
//! One address, one pod: once enrolled on an interface, a pod keeps its addresses there
//! for as long as its interface still holds them, whatever other namespace claims them
//! later (`PodInterfaces::resolve`); the claim is refused, logged, reported in
//! `/debug/capture` and counted, and the program drops the claimant's packets carrying
//! the address (anti-spoofing). After a restart the owner is the interface the pinned
//! map names. An address two interfaces claim with no owner known is held, not guessed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::capture::interfaces::Resolved;
use crate::capture::{Capture, PodInterfaces};
use crate::identity::Identity;
use crate::state::StateStore;

/// What enrollment looks like right now, for the admin endpoint and readiness.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EnrollmentStatus {
    /// uid → (addresses, interface) of enrolled workloads.
    pub enrolled: BTreeMap<String, (Vec<IpAddr>, String)>,
    /// uid → why it is not enrolled yet (its addresses are held meanwhile).
    pub pending: BTreeMap<String, String>,
    /// Addresses of this node's pods that more than one interface claims.
    pub conflicts: BTreeMap<IpAddr, Conflict>,
    /// uid → SPIFFE identity of the enrolled workloads (readiness checks their
    /// certificates without a state lookup, which k8s-mode uids may not match).
    pub identities: BTreeMap<String, String>,
    /// uid → index of the interface it was enrolled on: the anti-spoofing check in the
    /// program compares packets' ingress interface with it.
    #[serde(skip)]
    ifindexes: BTreeMap<String, u32>,
    /// Enrollments made and ended since start, counted by each pass: the
    /// `workload_manager_proxies_started`/`_stopped` counters (an enrolled pod stands
    /// for upstream's in-pod proxy; see `metrics::workload_manager`).
    #[serde(skip)]
    pub started: u64,
    #[serde(skip)]
    pub stopped: u64,
}

/// An address claimed by more than one pod interface.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Conflict {
    /// The workload the address belongs to.
    pub workload: String,
    /// The interface it stays enrolled on; `None` if no owner was known (then the
    /// workload is held until one interface alone holds it).
    pub owner: Option<String>,
    /// The other interfaces claiming it: refused.
    pub refused: Vec<String>,
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
    /// Holds addresses of a pod that should be enrolled but cannot be: nothing of it
    /// moves (never open).
    async fn hold(&self, ips: &[IpAddr]) -> anyhow::Result<()>;
    async fn unenroll(&self, ips: &[IpAddr]) -> anyhow::Result<()>;
    /// Addresses in the kernel map (also by an earlier ztunnel: pinned map), with the
    /// index of the interface each is enrolled on (0: held).
    async fn enrolled(&self) -> BTreeMap<IpAddr, u32>;
    /// The interfaces the pass found this node's pods behind (shown as pods').
    async fn set_pod_links(&self, _links: BTreeSet<u32>) {}
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
    async fn hold(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
        let mut capture = self.lock().await;
        capture.hold(ips)?;
        capture.unpin(ips, false).await;
        Ok(())
    }
    async fn unenroll(&self, ips: &[IpAddr]) -> anyhow::Result<()> {
        let mut capture = self.lock().await;
        capture.unenroll(ips)?;
        capture.unpin(ips, true).await;
        Ok(())
    }
    async fn enrolled(&self) -> BTreeMap<IpAddr, u32> {
        self.lock()
            .await
            .enrolled()
            .into_iter()
            .map(|p| (p.address, p.ifindex))
            .collect()
    }
    async fn set_pod_links(&self, links: BTreeSet<u32>) {
        self.lock().await.set_pod_links(links)
    }
}

pub struct Enroller {
    source: Arc<dyn WorkloadSource>,
    target: Arc<dyn EnrollTarget>,
    status: std::sync::Mutex<EnrollmentStatus>,
    /// One pass at a time: a pass reads the previous status and writes the next.
    pass: Mutex<()>,
    /// Claims of an enrolled pod's address by another interface refused, since start
    /// (each claim once, when it appears).
    claims_refused: AtomicU64,
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
            claims_refused: AtomicU64::new(0),
        }
    }

    /// Claims of an enrolled pod's address by another interface refused since start.
    pub fn claims_refused(&self) -> u64 {
        self.claims_refused.load(Ordering::Relaxed)
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
        let mut next = EnrollmentStatus {
            started: previous.started,
            stopped: previous.stopped,
            ..Default::default()
        };
        let interfaces = self
            .target
            .pod_interfaces()
            .await
            .map_err(|e| format!("reading the pods' interfaces failed: {e:#}"));
        // Who holds each address now: after a restart, the owner a claim must not move.
        let kernel = self.target.enrolled().await;
        let mut held: Vec<IpAddr> = vec![];
        for w in &wanted {
            let owner = previous
                .ifindexes
                .get(&w.uid)
                .copied()
                .or_else(|| w.ips.first().and_then(|ip| kernel.get(ip).copied()));
            match self
                .enroll_one(w, owner, &interfaces, &previous, &mut next)
                .await
            {
                Some(iface) => {
                    next.enrolled.insert(w.uid.clone(), (w.ips.clone(), iface));
                    next.identities
                        .insert(w.uid.clone(), w.identity.to_string());
                }
                None => held.extend(w.ips.iter().copied()),
            }
        }
        // Never open: a pod this node should capture but cannot is held in the kernel.
        if !held.is_empty() {
            if let Err(e) = self.target.hold(&held).await {
                warn!("holding pods that cannot be enrolled failed: {e:#}");
            }
        }
        // Addresses in the kernel (also left by an earlier ztunnel, found in the pinned
        // map) that no wanted workload has any more: a stale entry would capture (or
        // hold) the next pod given the address.
        let keep: BTreeSet<IpAddr> = next
            .enrolled
            .values()
            .flat_map(|(ips, _)| ips.clone())
            .chain(held)
            .collect();
        let stale: Vec<IpAddr> = kernel.into_keys().filter(|a| !keep.contains(a)).collect();
        if !stale.is_empty() {
            info!(addresses = ?stale, "unenrolling addresses no workload of this node has");
            if let Err(e) = self.target.unenroll(&stale).await {
                warn!("unenroll failed: {e:#}");
            }
        }
        // An enrollment ends when its pod is no longer enrolled the same way (gone,
        // pending, or enrolled again elsewhere, which counted as a start).
        next.stopped += previous
            .enrolled
            .iter()
            .filter(|(uid, e)| {
                next.enrolled.get(*uid) != Some(e)
                    || next.ifindexes.get(*uid) != previous.ifindexes.get(*uid)
            })
            .count() as u64;
        self.report_conflicts(&previous, &next);
        self.target
            .set_pod_links(next.ifindexes.values().copied().collect())
            .await;
        self.source.report(&next);
        *self.status.lock().unwrap() = next;
    }

    /// Logs and counts the claims that appeared since the last pass.
    fn report_conflicts(&self, previous: &EnrollmentStatus, next: &EnrollmentStatus) {
        for (ip, c) in &next.conflicts {
            let before = previous.conflicts.get(ip);
            let new: Vec<&String> = c
                .refused
                .iter()
                .filter(|r| before.is_none_or(|b| !b.refused.contains(r)))
                .collect();
            if new.is_empty() {
                continue;
            }
            self.claims_refused
                .fetch_add(new.len() as u64, Ordering::Relaxed);
            match &c.owner {
                Some(owner) => warn!(
                    address = %ip,
                    workload = %c.workload,
                    owner = %owner,
                    claimants = ?new,
                    "address claimed by another pod's interface: refused, it stays with its owner \
                     (the claimant's packets with it are dropped as spoofed)"
                ),
                None => warn!(
                    address = %ip,
                    workload = %c.workload,
                    claimants = ?c.refused,
                    "address claimed by several interfaces and no owner known: held, nothing \
                     of it passes until one interface alone holds it"
                ),
            }
        }
    }

    /// Enrolls one pod unless it already is; its interface, or `None` (recorded as
    /// pending, held, retried next pass). `owner`: the interface it is enrolled on now.
    async fn enroll_one(
        &self,
        w: &Wanted,
        owner: Option<u32>,
        interfaces: &Result<PodInterfaces, String>,
        previous: &EnrollmentStatus,
        next: &mut EnrollmentStatus,
    ) -> Option<String> {
        let first = *w.ips.first()?;
        let found = match interfaces {
            Ok(i) => i.resolve(first, owner),
            Err(e) => Err(e.clone()),
        };
        let Resolved {
            owner: (iface, ifindex),
            ..
        } = match found {
            Ok(r) => r,
            Err(why) => {
                if let Ok(i) = interfaces {
                    let claims = i.found.get(&first).map(Vec::as_slice).unwrap_or_default();
                    if claims.len() > 1 {
                        next.conflicts.insert(
                            first,
                            Conflict {
                                workload: w.uid.clone(),
                                owner: None,
                                refused: claims.iter().map(|c| c.0.clone()).collect(),
                            },
                        );
                    }
                }
                if previous.pending.get(&w.uid) != Some(&why) {
                    warn!(workload = %w.uid, "not enrolled, held (its traffic is dropped): {why}; will retry");
                }
                next.pending.insert(w.uid.clone(), why);
                return None;
            }
        };
        if let Ok(i) = interfaces {
            for ip in &w.ips {
                let rivals = i.rivals(*ip, ifindex);
                if !rivals.is_empty() {
                    next.conflicts.insert(
                        *ip,
                        Conflict {
                            workload: w.uid.clone(),
                            owner: Some(iface.clone()),
                            refused: rivals.into_iter().map(|r| r.0).collect(),
                        },
                    );
                }
            }
        }
        // Same addresses on the same interface — the same interface, not just its name:
        // a pod recreated with the same veth name has a new one.
        let already = previous.enrolled.get(&w.uid) == Some(&(w.ips.clone(), iface.clone()))
            && previous.ifindexes.get(&w.uid) == Some(&ifindex);
        next.ifindexes.insert(w.uid.clone(), ifindex);
        if !already {
            if let Err(e) = self.target.enroll(&w.ips, &iface, ifindex).await {
                warn!(workload = %w.uid, "enrollment failed, held: {e:#}; will retry");
                next.pending.insert(w.uid.clone(), format!("{e:#}"));
                return None;
            }
            info!(workload = %w.uid, interface = %iface, "workload enrolled");
            next.started += 1;
        }
        Some(iface)
    }
}

#[cfg(test)]
pub(crate) mod tests;
