//! Workloads (pods, VMs) as the control plane describes them, and the small key types that
//! index them. Field names follow Istio's `istio.workload.Workload` so that both the local
//! YAML file and a future xDS client convert into the same struct.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::xds::yaml::deserialize_via_str;

use crate::identity::Identity;

/// Trust domain assumed when the control plane leaves it empty (as Istio does).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Service account assumed when the control plane leaves it empty (as Istio does).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// How traffic reaches a workload. Spelled as upstream ztunnel's local config spells it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum Protocol {
    /// Plain TCP: the workload is outside the mesh; traffic passes through untouched.
    #[default]
    TCP,
    /// HTTP/2 CONNECT over mTLS to port 15008: the workload is in the mesh.
    HBONE,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// Host-network workloads share the node's IP, so they must not be indexed by address:
/// that would capture every other host-network pod's traffic under one identity.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NetworkMode {
    #[default]
    Standard,
    HostNetwork,
}

/// An IP within a network. Two clusters on different networks may reuse the same IPs, so
/// every address lookup is keyed by both. The default network is the empty string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

impl NetworkAddress {
    pub fn new(network: &str, address: IpAddr) -> Self {
        NetworkAddress {
            network: network.to_string(),
            address,
        }
    }
}

/// Written `network/ip` (Istio's form); a bare IP means the default network.
impl FromStr for NetworkAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (network, ip) = s.rsplit_once('/').unwrap_or(("", s));
        let address = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IP address (expected \"network/ip\")"))?;
        Ok(NetworkAddress::new(network, address))
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

deserialize_via_str!(NetworkAddress, "an address \"network/ip\"", |s: &str| s
    .parse());

impl Serialize for NetworkAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The xDS primary key of a service: `namespace/hostname`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl NamespacedHostname {
    pub fn new(namespace: &str, hostname: &str) -> Self {
        NamespacedHostname {
            namespace: namespace.to_string(),
            hostname: hostname.to_string(),
        }
    }
}

impl FromStr for NamespacedHostname {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, host)) if !ns.is_empty() && !host.is_empty() && !host.contains('/') => {
                Ok(NamespacedHostname::new(ns, host))
            }
            _ => Err(format!("{s:?} is not of the form \"namespace/hostname\"")),
        }
    }
}

impl fmt::Display for NamespacedHostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.hostname)
    }
}

deserialize_via_str!(NamespacedHostname, "\"namespace/hostname\"", |s: &str| s
    .parse());

impl Serialize for NamespacedHostname {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Service port → target port on this workload (Istio's `PortList`). A target of 0 means
/// "not overridden here": the service's own mapping applies.
pub type PortMap = BTreeMap<u16, u16>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Globally unique key (xDS resource name), e.g. `Kubernetes//Pod/default/sleep-0`.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub trust_domain: String,
    pub service_account: String,
    pub workload_ips: Vec<IpAddr>,
    pub network: String,
    pub protocol: Protocol,
    pub network_mode: NetworkMode,
    /// Name of the node the workload runs on; a ztunnel serves the workloads of its node.
    pub node: String,
    pub status: HealthStatus,
    /// Keys (`namespace/name`) of WORKLOAD_SELECTOR policies that select this workload;
    /// the control plane resolves label selectors, the proxy only follows this list.
    pub authorization_policies: Vec<String>,
    /// Services this workload is an endpoint of, with its port mapping for each.
    pub services: BTreeMap<NamespacedHostname, PortMap>,
    /// The waypoint that traffic addressed to this workload goes through (istiod sets it
    /// for waypoints serving workload traffic); the workload then accepts mesh traffic
    /// only from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<super::GatewayAddress>,
    pub hostname: String,
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub cluster_id: String,
    /// Region, zone and subzone, for services' routing preferences.
    #[serde(skip_serializing_if = "super::load_balancing::Locality::is_empty")]
    pub locality: super::load_balancing::Locality,
    /// This workload's share of a service's connections relative to the other endpoints a
    /// client may pick (istiod's `capacity`): 1 when the control plane leaves it unset, 0
    /// to receive none.
    pub capacity: u32,
    /// This workload's side of every connection's metric labels, built on first use: a
    /// workload changes only by being replaced, so they are built once per version.
    #[serde(skip)]
    pub labels: Memo<std::sync::Arc<crate::metrics::PeerLabels>>,
}

/// A value computed from its owner on first use. It is no part of the owner's value: it
/// compares equal to any other, and a copy starts empty (a copy may be changed before use).
pub struct Memo<T>(std::sync::OnceLock<T>);

impl<T> Memo<T> {
    pub fn get_or_init(&self, f: impl FnOnce() -> T) -> &T {
        self.0.get_or_init(f)
    }
}

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Memo(std::sync::OnceLock::new())
    }
}

impl<T> Clone for Memo<T> {
    fn clone(&self) -> Self {
        Memo::default()
    }
}

impl<T> PartialEq for Memo<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl<T> Eq for Memo<T> {}

impl<T> std::fmt::Debug for Memo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            uid: String::new(),
            name: String::new(),
            namespace: String::new(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            service_account: DEFAULT_SERVICE_ACCOUNT.to_string(),
            workload_ips: Vec::new(),
            network: String::new(),
            protocol: Protocol::default(),
            network_mode: NetworkMode::default(),
            node: String::new(),
            status: HealthStatus::default(),
            authorization_policies: Vec::new(),
            services: BTreeMap::new(),
            waypoint: None,
            hostname: String::new(),
            workload_name: String::new(),
            workload_type: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            cluster_id: String::new(),
            locality: Default::default(),
            capacity: 1,
            labels: Memo::default(),
        }
    }
}

impl Workload {
    /// The SPIFFE identity the workload's certificate carries.
    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Only HBONE workloads are in the mesh; the rest get plain passthrough.
    pub fn in_mesh(&self) -> bool {
        self.protocol == Protocol::HBONE
    }

    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }

    /// The addresses the workload is reachable at, keyed by network. Empty for host-network
    /// workloads (see [`NetworkMode`]).
    pub fn network_addresses(&self) -> impl Iterator<Item = NetworkAddress> + '_ {
        let indexed = self.network_mode == NetworkMode::Standard;
        self.workload_ips
            .iter()
            .filter(move |_| indexed)
            .map(|ip| NetworkAddress::new(&self.network, *ip))
    }

    /// The workload IP to dial for a destination of `family_of`'s IP family (dual-stack pods
    /// have one of each); falls back to the first IP.
    pub fn ip_like(&self, family_of: IpAddr) -> Option<IpAddr> {
        self.workload_ips
            .iter()
            .find(|ip| ip.is_ipv4() == family_of.is_ipv4())
            .or(self.workload_ips.first())
            .copied()
    }
}

impl Workload {
    /// The IP to dial for a connection to `svc` at `dst`: one the service's IP families
    /// allow, of `dst`'s family where there is one.
    pub fn ip_for(&self, svc: &super::Service, dst: IpAddr) -> Option<IpAddr> {
        let allowed = || {
            self.workload_ips
                .iter()
                .filter(|ip| svc.ip_families.accepts(**ip))
        };
        allowed()
            .find(|ip| ip.is_ipv4() == dst.is_ipv4())
            .or_else(|| allowed().next())
            .copied()
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.namespace, self.name, self.uid)
    }
}
