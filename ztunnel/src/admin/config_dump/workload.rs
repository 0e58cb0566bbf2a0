//! A workload as Istio's ztunnel writes it in `/config_dump`: camelCase fields, optional
//! ones left out while they hold their default, `services` as a list of
//! `namespace/hostname` keys (the port mappings live in the services' endpoints).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::state::{GatewayAddress, HealthStatus, NetworkMode, PortMap, Protocol, Workload};

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadDump<'a> {
    workload_ips: &'a [IpAddr],
    #[serde(skip_serializing_if = "Option::is_none")]
    waypoint: Option<&'a GatewayAddress>,
    protocol: Protocol,
    network_mode: NetworkMode,
    #[serde(skip_serializing_if = "str::is_empty")]
    uid: &'a str,
    name: &'a str,
    namespace: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    trust_domain: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    service_account: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    network: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    workload_name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    workload_type: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    canonical_name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    canonical_revision: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    hostname: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    node: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    authorization_policies: &'a [String],
    status: HealthStatus,
    cluster_id: &'a str,
    #[serde(skip_serializing_if = "crate::state::load_balancing::Locality::is_empty")]
    locality: &'a crate::state::load_balancing::Locality,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    services: Vec<String>,
    capacity: u32,
}

impl<'a> WorkloadDump<'a> {
    pub fn new(w: &'a Workload) -> Self {
        WorkloadDump {
            workload_ips: &w.workload_ips,
            waypoint: w.waypoint.as_ref(),
            protocol: w.protocol,
            network_mode: w.network_mode,
            uid: &w.uid,
            name: &w.name,
            namespace: &w.namespace,
            trust_domain: &w.trust_domain,
            service_account: &w.service_account,
            network: &w.network,
            workload_name: &w.workload_name,
            workload_type: &w.workload_type,
            canonical_name: &w.canonical_name,
            canonical_revision: &w.canonical_revision,
            hostname: &w.hostname,
            node: &w.node,
            authorization_policies: &w.authorization_policies,
            status: w.status,
            cluster_id: &w.cluster_id,
            locality: &w.locality,
            services: w.services.keys().map(|k| k.to_string()).collect(),
            capacity: w.capacity,
        }
    }
}

/// A workload of the local file as upstream echoes it in `staticConfig`: the workload's
/// fields, with `services` as the file has it (service key → port → target port).
#[derive(Debug, Serialize)]
pub struct LocalWorkloadDump<'a> {
    #[serde(flatten)]
    workload: WorkloadDump<'a>,
    services: BTreeMap<String, &'a PortMap>,
}

impl<'a> LocalWorkloadDump<'a> {
    pub fn new(w: &'a Workload) -> Self {
        let mut workload = WorkloadDump::new(w);
        // The map below takes the key: the list form must not be written as well.
        workload.services.clear();
        LocalWorkloadDump {
            workload,
            services: w.services.iter().map(|(k, p)| (k.to_string(), p)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NamespacedHostname;
    use serde_json::json;

    fn workload() -> Workload {
        Workload {
            uid: "cluster1//Pod/default/client".into(),
            name: "client".into(),
            namespace: "default".into(),
            service_account: "client".into(),
            workload_ips: vec!["10.1.0.2".parse().unwrap()],
            protocol: Protocol::HBONE,
            node: "node-a".into(),
            cluster_id: "cluster1".into(),
            services: [(
                NamespacedHostname::new("default", "echo.default.svc.cluster.local"),
                PortMap::from([(80, 8080)]),
            )]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn upstream_fields_with_defaults_left_out() {
        let v = serde_json::to_value(WorkloadDump::new(&workload())).unwrap();
        assert_eq!(
            v,
            json!({
                "workloadIps": ["10.1.0.2"],
                "protocol": "HBONE",
                "networkMode": "Standard",
                "uid": "cluster1//Pod/default/client",
                "name": "client",
                "namespace": "default",
                "trustDomain": "cluster.local",
                "serviceAccount": "client",
                "node": "node-a",
                "status": "Healthy",
                "clusterId": "cluster1",
                "services": ["default/echo.default.svc.cluster.local"],
                "capacity": 1,
            })
        );
    }

    #[test]
    fn the_local_form_keeps_the_port_mappings() {
        let w = workload();
        let v = serde_json::to_value(LocalWorkloadDump::new(&w)).unwrap();
        assert_eq!(
            v["services"],
            json!({"default/echo.default.svc.cluster.local": {"80": 8080}})
        );
        assert_eq!(v["uid"], "cluster1//Pod/default/client");
    }
}
