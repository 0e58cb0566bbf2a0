//! One immutable version of the state and its indexes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use tracing::warn;

use super::service::{Endpoint, Service};
use super::vip_index::{self, VipIndex};
use super::workload::{NamespacedHostname, NetworkAddress, Workload};
use crate::policy::PolicyStore;

/// Values are `Arc`s so that cloning the state for an update copies pointers, not
/// workloads.
#[derive(Debug, Clone, Default)]
pub struct ProxyState {
    workloads_by_uid: HashMap<String, Arc<Workload>>,
    workloads_by_addr: HashMap<NetworkAddress, Arc<Workload>>,
    services: HashMap<NamespacedHostname, Arc<Service>>,
    vips: VipIndex,
    /// Hostname → the services of that name (one per namespace at most), for DNS.
    services_by_host: HashMap<String, Vec<NamespacedHostname>>,
    /// Service → workload uid → endpoint. Kept apart from [`Service`] because workloads and
    /// services arrive independently over xDS (a workload may name a service not yet seen).
    endpoints: HashMap<NamespacedHostname, BTreeMap<String, Endpoint>>,
    pub policies: PolicyStore,
    /// The network of this node (`NETWORK`, Istio's `global.network`; "" when none is
    /// set): an address without one is looked up on it.
    network: String,
    /// Of services sharing a VIP, the namespace to prefer after the client's and a
    /// canonical one (`PREFERED_SERVICE_NAMESPACE`).
    preferred_namespace: Option<String>,
}

impl ProxyState {
    /// A state whose policies use the given root namespace.
    pub fn with_root_namespace(root_namespace: &str) -> Self {
        ProxyState {
            policies: PolicyStore::new(root_namespace),
            ..Default::default()
        }
    }

    pub fn clear(&mut self) {
        let root = self.policies.root_namespace().to_string();
        let network = std::mem::take(&mut self.network);
        let preferred = self.preferred_namespace.take();
        *self = ProxyState::with_root_namespace(&root);
        self.network = network;
        self.preferred_namespace = preferred;
    }

    /// This node's network.
    pub fn network(&self) -> &str {
        &self.network
    }

    pub fn set_preferred_namespace(&mut self, ns: Option<&str>) {
        self.preferred_namespace = ns.map(str::to_string);
    }

    /// Sets this node's network (from `NETWORK`).
    pub fn set_network(&mut self, network: &str) {
        self.network = network.to_string();
    }

    // ---- workloads ----

    /// Adds or replaces (by uid) a workload and its service endpoints.
    pub fn upsert_workload(&mut self, w: Workload) {
        self.remove_workload(&w.uid);
        let w = Arc::new(w);
        for addr in w.network_addresses() {
            if let Some(prev) = self.workloads_by_addr.insert(addr.clone(), w.clone()) {
                warn!(%addr, new = %w, old = %prev, "two workloads claim one address; the newer wins");
            }
        }
        for (svc, ports) in &w.services {
            self.endpoints.entry(svc.clone()).or_default().insert(
                w.uid.clone(),
                Endpoint {
                    workload_uid: w.uid.clone(),
                    ports: ports.clone(),
                },
            );
        }
        self.workloads_by_uid.insert(w.uid.clone(), w);
    }

    pub fn remove_workload(&mut self, uid: &str) -> Option<Arc<Workload>> {
        let old = self.workloads_by_uid.remove(uid)?;
        for addr in old.network_addresses() {
            // Only drop the index entry if it still points at this workload.
            if self
                .workloads_by_addr
                .get(&addr)
                .is_some_and(|w| w.uid == uid)
            {
                self.workloads_by_addr.remove(&addr);
            }
        }
        for svc in old.services.keys() {
            if let Some(eps) = self.endpoints.get_mut(svc) {
                eps.remove(uid);
                if eps.is_empty() {
                    self.endpoints.remove(svc);
                }
            }
        }
        Some(old)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads_by_uid.get(uid).cloned()
    }

    pub fn workload_by_addr(&self, addr: &NetworkAddress) -> Option<Arc<Workload>> {
        self.workloads_by_addr.get(addr).cloned()
    }

    /// The workload owning `ip` on this node's network.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.workload_by_addr(&NetworkAddress::new(&self.network, ip.to_canonical()))
    }

    /// The workloads this node's ztunnel serves, sorted by uid.
    pub fn workloads_on_node(&self, node: &str) -> Vec<Arc<Workload>> {
        let mut v: Vec<_> = self
            .workloads_by_uid
            .values()
            .filter(|w| w.node == node)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.uid.cmp(&b.uid));
        v
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads_by_uid.values()
    }

    // ---- services ----

    /// Adds or replaces (by namespace/hostname) a service; its endpoints are kept.
    pub fn upsert_service(&mut self, svc: Service) {
        let key = svc.key();
        self.remove_service_only(&key);
        self.vips.insert(&svc);
        self.services_by_host
            .entry(svc.hostname.clone())
            .or_default()
            .push(key.clone());
        self.services.insert(key, Arc::new(svc));
    }

    /// Removes a service. Endpoints stay: the workloads still name it, and would be its
    /// endpoints again if it came back.
    pub fn remove_service(&mut self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        self.remove_service_only(key)
    }

    fn remove_service_only(&mut self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        self.vips.remove(&old);
        if let Some(keys) = self.services_by_host.get_mut(&old.hostname) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.services_by_host.remove(&old.hostname);
            }
        }
        Some(old)
    }

    pub fn service(&self, key: &NamespacedHostname) -> Option<Arc<Service>> {
        self.services.get(key).cloned()
    }

    /// The service named `hostname` that a client in `client_ns` reaches: the same choice
    /// as among services sharing a VIP (its namespace, canonical, preferred, first).
    pub fn service_by_hostname(
        &self,
        hostname: &str,
        client_ns: Option<&str>,
    ) -> Option<Arc<Service>> {
        let keys = self.services_by_host.get(hostname)?;
        let services = keys.iter().filter_map(|k| self.services.get(k).cloned());
        vip_index::best_exact(services, client_ns, self.preferred_namespace.as_deref())
    }

    /// The service an exact VIP stands for, whoever asks (see [`vip_index`]).
    pub fn service_by_vip(&self, vip: &NetworkAddress) -> Option<Arc<Service>> {
        self.service_by_exact_vip(vip, None)
    }

    /// The service `vip` stands for, exactly, for a client in `client_ns` (`None`: not
    /// known; every service is visible).
    pub fn service_by_exact_vip(
        &self,
        vip: &NetworkAddress,
        client_ns: Option<&str>,
    ) -> Option<Arc<Service>> {
        let services = self
            .vips
            .exact(vip)
            .iter()
            .filter_map(|k| self.services.get(k).cloned());
        vip_index::best_exact(services, client_ns, self.preferred_namespace.as_deref())
    }

    /// The service a connection to `addr` from a client in `client_ns` is addressed to:
    /// an exact VIP, or else a range that holds it, unless it is a workload's own IP (a
    /// ServiceEntry's range never takes a pod's address from it).
    pub fn destination_service(
        &self,
        addr: &NetworkAddress,
        client_ns: Option<&str>,
    ) -> Option<Arc<Service>> {
        self.service_by_exact_vip(addr, client_ns).or_else(|| {
            if self.workloads_by_addr.contains_key(addr) {
                return None;
            }
            self.service_by_vip_range(addr, client_ns)
        })
    }

    /// The service whose address range holds `addr`, for a client in `client_ns`.
    pub fn service_by_vip_range(
        &self,
        addr: &NetworkAddress,
        client_ns: Option<&str>,
    ) -> Option<Arc<Service>> {
        let services = self
            .vips
            .ranges(addr)
            .filter_map(|(len, k)| Some((len, self.services.get(k)?.clone())));
        vip_index::best_range(services, client_ns)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// All endpoints of a service, healthy or not, each with its workload.
    pub fn endpoints(&self, key: &NamespacedHostname) -> Vec<(Arc<Workload>, &Endpoint)> {
        self.endpoints
            .get(key)
            .into_iter()
            .flat_map(|eps| eps.values())
            .filter_map(|ep| Some((self.workload_by_uid(&ep.workload_uid)?, ep)))
            .collect()
    }
}
