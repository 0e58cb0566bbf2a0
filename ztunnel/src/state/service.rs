//! Services: a hostname with virtual IPs and ports, load balanced over the workloads that
//! list the service in their `services` map (Istio's `istio.workload.Service`).

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::workload::{NamespacedHostname, NetworkAddress, PortMap};
use crate::xds::yaml::deserialize_via_str;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    pub vips: Vec<NetworkAddress>,
    /// Address ranges that stand for the service as a whole (istiod's addresses with a
    /// prefix length, from ServiceEntries): any IP inside reaches it, when no workload or
    /// exact VIP claims the IP first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cidr_vips: Vec<NetworkCidr>,
    /// Service port → default target port (0: same as the service port unless an endpoint
    /// says otherwise).
    pub ports: PortMap,
    /// Extra identities a server of this service may present (besides its own workload's).
    pub subject_alt_names: Vec<String>,
    /// The waypoint that traffic addressed to this service goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<super::GatewayAddress>,
    /// When it holds a weight above zero: the waypoints to share this service's
    /// connections between, each picked with the probability of its weight (a canary of a
    /// new waypoint). `waypoint` is then only the fallback.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    /// Which endpoints a client may be sent to (routing preference, health policy), or
    /// none picked at all (PASSTHROUGH).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<super::load_balancing::LoadBalancing>,
    /// Which of an endpoint's addresses may be dialled.
    pub ip_families: IpFamilies,
    /// Of several services sharing a VIP, the one to pick for clients in none of their
    /// namespaces.
    pub canonical: bool,
    /// Which clients may reach the service by its VIPs (and, with a DNS proxy, its name).
    pub visibility: Visibility,
}

/// Upstream's `Service.Visibility`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Visibility {
    /// Every client the control plane serves.
    #[default]
    Public,
    /// Only clients in the service's own namespace.
    Namespace,
}

/// Upstream's `IPFamilies`: which endpoint addresses a connection to the service may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum IpFamilies {
    /// Inferred from the addresses: the client's family where the endpoint has it.
    #[default]
    Automatic,
    Ipv4Only,
    Ipv6Only,
    Dual,
}

impl IpFamilies {
    pub fn accepts(self, ip: IpAddr) -> bool {
        match self {
            IpFamilies::Ipv4Only => ip.is_ipv4(),
            IpFamilies::Ipv6Only => ip.is_ipv6(),
            IpFamilies::Automatic | IpFamilies::Dual => true,
        }
    }
}

/// One waypoint of a weighted set (upstream's `WeightedWaypoint`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedWaypoint {
    pub destination: super::GatewayAddress,
    /// Relative to the set's other weights; 0: described, sent nothing.
    pub weight: u32,
}

/// An address range on a network, written `network/ip/len` (a bare `ip/len` is on the
/// default network).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetworkCidr {
    pub network: String,
    pub cidr: IpNet,
}

impl NetworkCidr {
    pub fn contains(&self, addr: &NetworkAddress) -> bool {
        self.network == addr.network && self.cidr.contains(&addr.address)
    }
}

impl std::str::FromStr for NetworkCidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an address range (expected \"network/ip/len\")");
        let (rest, len) = s.rsplit_once('/').ok_or_else(bad)?;
        let (network, ip) = rest.rsplit_once('/').unwrap_or(("", rest));
        let cidr = format!("{ip}/{len}").parse::<IpNet>().map_err(|_| bad())?;
        if cidr.network() != cidr.addr() {
            return Err(format!(
                "{s:?} has host bits set (the range is {})",
                cidr.trunc()
            ));
        }
        Ok(NetworkCidr {
            network: network.to_string(),
            cidr,
        })
    }
}

impl fmt::Display for NetworkCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.cidr)
    }
}

deserialize_via_str!(
    NetworkCidr,
    "an address range \"network/ip/len\"",
    |s: &str| s.parse()
);

impl Serialize for NetworkCidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Service {
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname::new(&self.namespace, &self.hostname)
    }

    /// Whether a client in `namespace` may reach this service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        self.visibility == Visibility::Public || self.namespace == namespace
    }

    /// The port to dial on `endpoint_ports`' workload for a connection to `service_port`.
    ///
    /// The endpoint's own mapping wins (pods of one service may listen on different ports),
    /// then the service's. A service that declares ports only serves those; one that
    /// declares none forwards every port unchanged.
    pub fn target_port(&self, service_port: u16, endpoint_ports: &PortMap) -> Option<u16> {
        let nonzero = |p: Option<&u16>| p.copied().filter(|p| *p != 0);
        if let Some(p) = nonzero(endpoint_ports.get(&service_port)) {
            return Some(p);
        }
        match self.ports.get(&service_port) {
            Some(_) => Some(nonzero(self.ports.get(&service_port)).unwrap_or(service_port)),
            None if self.ports.is_empty() && endpoint_ports.is_empty() => Some(service_port),
            None => None,
        }
    }
}

/// A workload's membership in one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub workload_uid: String,
    pub ports: PortMap,
}
