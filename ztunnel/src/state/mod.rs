//! What the proxy knows about the mesh: workloads, services and their endpoints, and
//! authorization policies, with the lookups the data path needs.
//!
//! Readers take an immutable snapshot ([`StateStore::snapshot`], an `Arc` clone under a
//! read lock held for nanoseconds) and keep it for as long as they like, so an update never
//! changes the view of a connection already being set up. Writers build the next snapshot
//! from a copy and swap it in.

pub mod load_balancing;
mod resolve;
mod service;
mod snapshot;
mod unresolved;
mod vip_index;
mod waypoint;
mod workload;

use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

pub use resolve::{ResolveError, Target, Upstream};
pub use service::{Endpoint, IpFamilies, NetworkCidr, Service, Visibility, WeightedWaypoint};
pub use snapshot::ProxyState;
pub use unresolved::{check_hostname, pick_address, Unresolved};
pub use waypoint::{GatewayAddress, GatewayDestination, WaypointError, WaypointHop};
pub use workload::{
    HealthStatus, NamespacedHostname, NetworkAddress, NetworkMode, PortMap, Protocol, Workload,
    DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN,
};

use crate::policy::Authorization;

/// The shared, updatable state. Cheap to share: wrap in an `Arc`.
#[derive(Debug)]
pub struct StateStore {
    current: RwLock<Arc<ProxyState>>,
    /// Serializes writers so two updates never start from the same snapshot and lose one.
    writer: Mutex<()>,
    /// Bumped on every update, for those that react to changes (certificate prefetch,
    /// enrollment of new local pods).
    version: watch::Sender<u64>,
}

impl Default for StateStore {
    fn default() -> Self {
        StateStore::new(ProxyState::default())
    }
}

impl StateStore {
    pub fn new(initial: ProxyState) -> Self {
        StateStore {
            current: RwLock::new(Arc::new(initial)),
            writer: Mutex::new(()),
            version: watch::Sender::new(0),
        }
    }

    /// The current state. Lookups on it are consistent with each other.
    pub fn snapshot(&self) -> Arc<ProxyState> {
        // A poisoned lock only means a writer panicked mid-swap; the Arc inside is whole.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies `f` to a copy of the state and publishes the result atomically. Batch
    /// several changes (an xDS push) in one call: the copy is taken once.
    pub fn update<R>(&self, f: impl FnOnce(&mut ProxyState) -> R) -> R {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (*self.snapshot()).clone();
        let r = f(&mut next);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        self.version.send_modify(|v| *v += 1);
        r
    }

    /// Replaces everything (a full local config, or an xDS state-of-the-world), keeping
    /// the configured root namespace.
    pub fn replace_all(
        &self,
        workloads: impl IntoIterator<Item = Workload>,
        services: impl IntoIterator<Item = Service>,
        policies: impl IntoIterator<Item = Authorization>,
    ) {
        self.update(|s| {
            s.clear();
            for svc in services {
                s.upsert_service(svc);
            }
            for w in workloads {
                s.upsert_workload(w);
            }
            for p in policies {
                s.policies.insert(p);
            }
        })
    }

    pub fn upsert_workload(&self, w: Workload) {
        self.update(|s| s.upsert_workload(w))
    }

    pub fn remove_workload(&self, uid: &str) -> Option<Arc<Workload>> {
        self.update(|s| s.remove_workload(uid))
    }

    pub fn upsert_service(&self, svc: Service) {
        self.update(|s| s.upsert_service(svc))
    }

    pub fn remove_service(&self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        self.update(|s| s.remove_service(key))
    }

    pub fn upsert_policy(&self, p: Authorization) {
        self.update(|s| s.policies.insert(p))
    }

    pub fn remove_policy(&self, key: &str) -> Option<Arc<Authorization>> {
        self.update(|s| s.policies.remove(key))
    }

    /// Receives the update counter; `changed()` wakes after each update.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Waits, at most `timeout`, for a state in which `find` finds something: the record
    /// of a pod capture already knows (Kubernetes enrollment runs ahead of xDS). Returns
    /// what was found with the state it was found in, or `None` when the time ran out.
    pub async fn wait_for<T>(
        &self,
        timeout: std::time::Duration,
        find: impl Fn(&ProxyState) -> Option<T>,
    ) -> Option<(Arc<ProxyState>, T)> {
        // Subscribed before the first look, so an update in between is not missed.
        let mut updates = self.subscribe();
        let look = || {
            let state = self.snapshot();
            find(&state).map(|t| (state, t))
        };
        if let Some(found) = look() {
            return Some(found);
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return None,
                changed = updates.changed() => {
                    if changed.is_err() {
                        return None; // the store is gone: nothing will arrive
                    }
                    if let Some(found) = look() {
                        return Some(found);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod destination_tests;
#[cfg(test)]
mod tests;
