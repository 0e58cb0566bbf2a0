//! Standalone enrollment: the workloads the state places on this node, in the mesh
//! (HBONE), are enrolled with the capture programs; ones that leave are unenrolled.
//!
//! A pod's host-side interface is found from the route to its address. A pod whose
//! interface is not there yet (the CNI has not finished) is retried on every pass and
//! reported, never fatal.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::capture::{routing, Capture};
use crate::state::StateStore;

/// What enrollment looks like right now, for the admin endpoint and readiness.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EnrollmentStatus {
    /// uid → (addresses, interface) of enrolled workloads.
    pub enrolled: BTreeMap<String, (Vec<IpAddr>, String)>,
    /// uid → why it is not enrolled yet.
    pub pending: BTreeMap<String, String>,
}

pub struct Enroller {
    node: String,
    store: Arc<StateStore>,
    capture: Arc<Mutex<Capture>>,
    status: std::sync::Mutex<EnrollmentStatus>,
}

impl Enroller {
    pub fn new(node: String, store: Arc<StateStore>, capture: Arc<Mutex<Capture>>) -> Self {
        Enroller { node, store, capture, status: Default::default() }
    }

    pub fn status(&self) -> EnrollmentStatus {
        self.status.lock().unwrap().clone()
    }

    /// Brings the kernel's enrolled set in line with the state. Idempotent.
    pub async fn reconcile(&self) {
        let state = self.store.snapshot();
        let wanted: Vec<_> = state
            .workloads_on_node(&self.node)
            .into_iter()
            .filter(|w| w.in_mesh() && !w.workload_ips.is_empty())
            .collect();
        let mut cap = self.capture.lock().await;
        let mut next = EnrollmentStatus::default();
        let previous = self.status();
        for w in &wanted {
            let first = w.workload_ips[0];
            let iface = match routing_interface(&cap, first).await {
                Ok(Some(i)) => i,
                Ok(None) => {
                    let why = format!("no interface routes {first} yet");
                    if !previous.pending.contains_key(&w.uid) {
                        warn!(workload = %w.uid, "not enrolled: {why}; will retry");
                    }
                    next.pending.insert(w.uid.clone(), why);
                    continue;
                }
                Err(e) => {
                    next.pending.insert(w.uid.clone(), format!("route lookup failed: {e:#}"));
                    continue;
                }
            };
            let already = previous.enrolled.get(&w.uid) == Some(&(w.workload_ips.clone(), iface.clone()));
            if !already {
                if let Err(e) = cap.enroll(&w.workload_ips, &iface).await {
                    warn!(workload = %w.uid, "enrollment failed: {e:#}; will retry");
                    next.pending.insert(w.uid.clone(), format!("{e:#}"));
                    continue;
                }
                info!(workload = %w.uid, interface = %iface, "workload enrolled");
            }
            next.enrolled.insert(w.uid.clone(), (w.workload_ips.clone(), iface));
        }
        // Addresses enrolled before (also by an earlier ztunnel, found in the pinned
        // map) that no wanted workload has any more.
        let keep: BTreeSet<IpAddr> = next.enrolled.values().flat_map(|(ips, _)| ips.clone()).collect();
        let stale: Vec<IpAddr> =
            cap.enrolled().into_iter().map(|p| p.address).filter(|a| !keep.contains(a)).collect();
        if !stale.is_empty() {
            info!(addresses = ?stale, "unenrolling addresses no workload of this node has");
            if let Err(e) = cap.unenroll(&stale) {
                warn!("unenroll failed: {e:#}");
            }
        }
        *self.status.lock().unwrap() = next;
    }
}

async fn routing_interface(cap: &Capture, ip: IpAddr) -> anyhow::Result<Option<String>> {
    routing::interface_for(cap.netlink(), ip).await
}
