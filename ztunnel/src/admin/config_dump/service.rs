//! Services as Istio's ztunnel writes them in `/config_dump`: each with its endpoints
//! (workload UID → the workload's port mapping and health) and upstream's spellings of the
//! load-balancing settings; and `stagedServices`, the endpoints of services not known yet
//! (a workload names a service the control plane has not sent).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::state::load_balancing::{HealthPolicy, LoadBalancing, Mode, Scope};
use crate::state::{
    Endpoint, GatewayAddress, HealthStatus, IpFamilies, NetworkAddress, NetworkCidr, PortMap,
    ProxyState, Service, Visibility, WeightedWaypoint, Workload,
};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDump<'a> {
    name: &'a str,
    namespace: &'a str,
    hostname: &'a str,
    vips: &'a [NetworkAddress],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    cidr_vips: Vec<CidrDump<'a>>,
    ports: &'a PortMap,
    endpoints: BTreeMap<String, EndpointDump<'a>>,
    subject_alt_names: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    waypoint: Option<&'a GatewayAddress>,
    #[serde(skip_serializing_if = "<[WeightedWaypoint]>::is_empty")]
    weighted_waypoints: &'a [WeightedWaypoint],
    #[serde(skip_serializing_if = "Option::is_none")]
    load_balancer: Option<LoadBalancerDump>,
    /// Upstream leaves the automatic choice out.
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_families: Option<&'static str>,
    canonical: bool,
    visibility: &'static str,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointDump<'a> {
    workload_uid: &'a str,
    port: &'a PortMap,
    status: HealthStatus,
}

impl<'a> EndpointDump<'a> {
    fn new(w: &Workload, ep: &'a Endpoint) -> Self {
        EndpointDump {
            workload_uid: &ep.workload_uid,
            port: &ep.ports,
            status: w.status,
        }
    }
}

/// Upstream writes an address range as an object, not as `network/ip/len`.
#[derive(Debug, Serialize, PartialEq, Eq)]
struct CidrDump<'a> {
    network: &'a str,
    cidr: String,
}

impl<'a> From<&'a NetworkCidr> for CidrDump<'a> {
    fn from(c: &'a NetworkCidr) -> Self {
        CidrDump {
            network: &c.network,
            cidr: c.cidr.to_string(),
        }
    }
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct LoadBalancerDump {
    routing_preferences: Vec<&'static str>,
    mode: &'static str,
    health_policy: &'static str,
}

impl From<&LoadBalancing> for LoadBalancerDump {
    fn from(lb: &LoadBalancing) -> Self {
        LoadBalancerDump {
            routing_preferences: lb
                .routing_preference
                .iter()
                .map(|s| match s {
                    Scope::Region => "Region",
                    Scope::Zone => "Zone",
                    Scope::Subzone => "Subzone",
                    Scope::Node => "Node",
                    Scope::Cluster => "Cluster",
                    Scope::Network => "Network",
                })
                .collect(),
            mode: match lb.mode {
                Mode::Unspecified => "Standard",
                Mode::Strict => "Strict",
                Mode::Failover => "Failover",
                Mode::Passthrough => "Passthrough",
            },
            health_policy: match lb.health_policy {
                HealthPolicy::OnlyHealthy => "OnlyHealthy",
                HealthPolicy::AllowAll => "AllowAll",
            },
        }
    }
}

impl<'a> ServiceDump<'a> {
    /// `svc` with the endpoints `state` has for it (none for a service of the file).
    pub fn new(svc: &'a Service, state: Option<&'a ProxyState>) -> Self {
        let endpoints = state
            .map(|st| st.endpoints(&svc.key()))
            .unwrap_or_default()
            .into_iter()
            .map(|(w, ep)| (ep.workload_uid.clone(), EndpointDump::new(&w, ep)))
            .collect();
        ServiceDump {
            name: &svc.name,
            namespace: &svc.namespace,
            hostname: &svc.hostname,
            vips: &svc.vips,
            cidr_vips: svc.cidr_vips.iter().map(CidrDump::from).collect(),
            ports: &svc.ports,
            endpoints,
            subject_alt_names: &svc.subject_alt_names,
            waypoint: svc.waypoint.as_ref(),
            weighted_waypoints: &svc.weighted_waypoints,
            load_balancer: svc.load_balancing.as_ref().map(Into::into),
            ip_families: match svc.ip_families {
                IpFamilies::Automatic => None,
                IpFamilies::Ipv4Only => Some("IPv4"),
                IpFamilies::Ipv6Only => Some("IPv6"),
                IpFamilies::Dual => Some("Dual"),
            },
            canonical: svc.canonical,
            visibility: match svc.visibility {
                Visibility::Public => "Public",
                Visibility::Namespace => "Namespace",
            },
        }
    }
}

/// Endpoints of services the state does not have: service key → workload UID → endpoint.
pub fn staged_services(state: &ProxyState) -> BTreeMap<String, BTreeMap<String, EndpointDump<'_>>> {
    let mut out: BTreeMap<String, BTreeMap<String, EndpointDump<'_>>> = BTreeMap::new();
    for w in state.workloads() {
        for (key, ports) in &w.services {
            if state.service(key).is_none() {
                out.entry(key.to_string()).or_default().insert(
                    w.uid.clone(),
                    EndpointDump {
                        workload_uid: &w.uid,
                        port: ports,
                        status: w.status,
                    },
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NamespacedHostname, Protocol};
    use serde_json::json;

    fn state() -> ProxyState {
        let key = NamespacedHostname::new("default", "echo.default.svc.cluster.local");
        let mut st = ProxyState::default();
        st.upsert_service(Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            vips: vec!["/10.96.0.10".parse().unwrap()],
            cidr_vips: vec!["net1/10.97.0.0/16".parse().unwrap()],
            ports: PortMap::from([(80, 8080)]),
            load_balancing: Some(LoadBalancing {
                routing_preference: vec![Scope::Zone, Scope::Node],
                mode: Mode::Failover,
                health_policy: HealthPolicy::AllowAll,
            }),
            ip_families: IpFamilies::Ipv6Only,
            visibility: Visibility::Namespace,
            ..Default::default()
        });
        let ghost = NamespacedHostname::new("default", "ghost.default.svc.cluster.local");
        st.upsert_workload(Workload {
            uid: "cluster1//Pod/default/echo".into(),
            name: "echo".into(),
            namespace: "default".into(),
            workload_ips: vec!["10.2.0.2".parse().unwrap()],
            protocol: Protocol::HBONE,
            services: [
                (key, PortMap::from([(80, 9090)])),
                (ghost, PortMap::from([(81, 0)])),
            ]
            .into(),
            ..Default::default()
        });
        st
    }

    #[test]
    fn a_service_with_its_endpoints_in_upstream_spelling() {
        let st = state();
        let svc = st.services().next().unwrap();
        let v = serde_json::to_value(ServiceDump::new(svc, Some(&st))).unwrap();
        assert_eq!(
            v,
            json!({
                "name": "echo",
                "namespace": "default",
                "hostname": "echo.default.svc.cluster.local",
                "vips": ["/10.96.0.10"],
                "cidrVips": [{"network": "net1", "cidr": "10.97.0.0/16"}],
                "ports": {"80": 8080},
                "endpoints": {"cluster1//Pod/default/echo": {
                    "workloadUid": "cluster1//Pod/default/echo",
                    "port": {"80": 9090},
                    "status": "Healthy",
                }},
                "subjectAltNames": [],
                "loadBalancer": {
                    "routingPreferences": ["Zone", "Node"],
                    "mode": "Failover",
                    "healthPolicy": "AllowAll",
                },
                "ipFamilies": "IPv6",
                "canonical": false,
                "visibility": "Namespace",
            })
        );
    }

    #[test]
    fn endpoints_of_unknown_services_are_staged() {
        let st = state();
        let v = serde_json::to_value(staged_services(&st)).unwrap();
        assert_eq!(
            v,
            json!({"default/ghost.default.svc.cluster.local": {"cluster1//Pod/default/echo": {
                "workloadUid": "cluster1//Pod/default/echo",
                "port": {"81": 0},
                "status": "Healthy",
            }}})
        );
    }
}
