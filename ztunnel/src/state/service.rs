//! Services: a hostname with virtual IPs and ports, load balanced over the workloads that
//! list the service in their `services` map (Istio's `istio.workload.Service`).

use serde::Serialize;

use super::workload::{NamespacedHostname, NetworkAddress, PortMap};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    pub vips: Vec<NetworkAddress>,
    /// Service port → default target port (0: same as the service port unless an endpoint
    /// says otherwise).
    pub ports: PortMap,
    /// Extra identities a server of this service may present (besides its own workload's).
    pub subject_alt_names: Vec<String>,
    /// The waypoint that traffic addressed to this service goes through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<super::GatewayAddress>,
    /// Which endpoints a client may be sent to (routing preference, health policy), or
    /// none picked at all (PASSTHROUGH).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<super::load_balancing::LoadBalancing>,
}

impl Service {
    pub fn key(&self) -> NamespacedHostname {
        NamespacedHostname::new(&self.namespace, &self.hostname)
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
