//! State types → Istio's xDS protos, for the built-in control plane.
//!
//! Lossless for everything the state holds: `*_from_proto(*_to_proto(x)) == x`.

use std::net::IpAddr;

use ipnet::IpNet;
use prost::Message;

use crate::policy::{Action, Authorization, Match, Scope, ServiceAccountMatch, StringMatch};
use crate::proto::istio::security as spb;
use crate::proto::istio::workload as wpb;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::state::load_balancing::{self as lbs, HealthPolicy, LoadBalancing, Mode};
use crate::state::{
    GatewayAddress, GatewayDestination, HealthStatus, IpFamilies, NetworkMode, PortMap, Protocol,
    Service, Visibility, Workload,
};

pub fn workload_to_proto(w: &Workload) -> wpb::Workload {
    let workload_type =
        wpb::WorkloadType::from_str_name(&w.workload_type.to_ascii_uppercase()).unwrap_or_default();
    wpb::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(ip_bytes).collect(),
        hostname: w.hostname.clone(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            Protocol::TCP => wpb::TunnelProtocol::None,
            Protocol::HBONE => wpb::TunnelProtocol::Hbone,
        } as i32,
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: workload_type as i32,
        workload_name: w.workload_name.clone(),
        services: w
            .services
            .iter()
            .map(|(svc, ports)| {
                let list = wpb::PortList {
                    ports: ports_to_proto(ports),
                };
                (svc.to_string(), list)
            })
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            HealthStatus::Healthy => wpb::WorkloadStatus::Healthy,
            HealthStatus::Unhealthy => wpb::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: w.cluster_id.clone(),
        network_mode: match w.network_mode {
            NetworkMode::Standard => wpb::NetworkMode::Standard,
            NetworkMode::HostNetwork => wpb::NetworkMode::HostNetwork,
        } as i32,
        waypoint: w.waypoint.as_ref().map(waypoint_to_proto),
        locality: (!w.locality.is_empty()).then(|| wpb::Locality {
            region: w.locality.region.clone(),
            zone: w.locality.zone.clone(),
            subzone: w.locality.subzone.clone(),
        }),
        capacity: (w.capacity != 1).then_some(w.capacity),
        ..Default::default()
    }
}

pub fn service_to_proto(s: &Service) -> wpb::Service {
    wpb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(|v| wpb::NetworkAddress {
                network: v.network.clone(),
                address: ip_bytes(&v.address),
                ..Default::default()
            })
            .chain(s.cidr_vips.iter().map(|c| wpb::NetworkAddress {
                network: c.network.clone(),
                address: ip_bytes(&c.cidr.addr()),
                length: Some(c.cidr.prefix_len().into()),
            }))
            .collect(),
        ports: ports_to_proto(&s.ports),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(waypoint_to_proto),
        load_balancing: s.load_balancing.as_ref().map(load_balancing_to_proto),
        weighted_waypoints: s
            .weighted_waypoints
            .iter()
            .map(|w| wpb::WeightedWaypoint {
                destination: Some(waypoint_to_proto(&w.destination)),
                weight: w.weight,
            })
            .collect(),
        ip_families: match s.ip_families {
            IpFamilies::Automatic => wpb::IpFamilies::Automatic,
            IpFamilies::Ipv4Only => wpb::IpFamilies::Ipv4Only,
            IpFamilies::Ipv6Only => wpb::IpFamilies::Ipv6Only,
            IpFamilies::Dual => wpb::IpFamilies::Dual,
        } as i32,
        canonical: s.canonical,
        visibility: match s.visibility {
            Visibility::Public => wpb::service::Visibility::Public,
            Visibility::Namespace => wpb::service::Visibility::Namespace,
        } as i32,
        ..Default::default()
    }
}

fn load_balancing_to_proto(lb: &LoadBalancing) -> wpb::LoadBalancing {
    use wpb::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
    wpb::LoadBalancing {
        routing_preference: lb
            .routing_preference
            .iter()
            .map(|s| match s {
                lbs::Scope::Region => S::Region,
                lbs::Scope::Zone => S::Zone,
                lbs::Scope::Subzone => S::Subzone,
                lbs::Scope::Node => S::Node,
                lbs::Scope::Cluster => S::Cluster,
                lbs::Scope::Network => S::Network,
            } as i32)
            .collect(),
        mode: match lb.mode {
            Mode::Unspecified => M::UnspecifiedMode,
            Mode::Strict => M::Strict,
            Mode::Failover => M::Failover,
            Mode::Passthrough => M::Passthrough,
        } as i32,
        health_policy: match lb.health_policy {
            HealthPolicy::OnlyHealthy => H::OnlyHealthy,
            HealthPolicy::AllowAll => H::AllowAll,
        } as i32,
    }
}

fn waypoint_to_proto(g: &GatewayAddress) -> wpb::GatewayAddress {
    use wpb::gateway_address::Destination;
    let destination = match &g.destination {
        GatewayDestination::Address(a) => Destination::Address(wpb::NetworkAddress {
            network: a.network.clone(),
            address: ip_bytes(&a.address),
            ..Default::default()
        }),
        GatewayDestination::Hostname(h) => Destination::Hostname(wpb::NamespacedHostname {
            namespace: h.namespace.clone(),
            hostname: h.hostname.clone(),
        }),
    };
    wpb::GatewayAddress {
        destination: Some(destination),
        hbone_mtls_port: g.hbone_mtls_port.into(),
    }
}

pub fn authorization_to_proto(a: &Authorization) -> spb::Authorization {
    spb::Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope: match a.scope {
            Scope::Global => spb::Scope::Global,
            Scope::Namespace => spb::Scope::Namespace,
            Scope::WorkloadSelector => spb::Scope::WorkloadSelector,
        } as i32,
        action: match a.action {
            Action::Allow => spb::Action::Allow,
            Action::Deny => spb::Action::Deny,
        } as i32,
        rules: a
            .rules
            .iter()
            .map(|r| spb::Rule {
                clauses: r
                    .clauses
                    .iter()
                    .map(|c| spb::Clause {
                        matches: c.matches.iter().map(match_to_proto).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: a.dry_run,
        ..Default::default()
    }
}

/// A workload wrapped as the `istio.workload.Address` xDS resource.
pub fn address_to_any(a: &super::AddressResource) -> prost_types::Any {
    use wpb::address::Type;
    let inner = match a {
        super::AddressResource::Workload(w) => Type::Workload(workload_to_proto(w)),
        super::AddressResource::Service(s) => Type::Service(service_to_proto(s)),
    };
    let msg = wpb::Address {
        r#type: Some(inner),
    };
    prost_types::Any {
        type_url: ADDRESS_TYPE_URL.to_string(),
        value: msg.encode_to_vec(),
    }
}

pub fn authorization_to_any(a: &Authorization) -> prost_types::Any {
    prost_types::Any {
        type_url: AUTHORIZATION_TYPE_URL.to_string(),
        value: authorization_to_proto(a).encode_to_vec(),
    }
}

fn match_to_proto(m: &Match) -> spb::Match {
    let strings = |v: &[StringMatch]| v.iter().map(string_match_to_proto).collect();
    let cidrs = |v: &[IpNet]| {
        v.iter()
            .map(|n| spb::Address {
                address: ip_bytes(&n.addr()),
                length: u32::from(n.prefix_len()),
            })
            .collect()
    };
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    let accounts = |v: &[ServiceAccountMatch]| {
        v.iter()
            .map(|m| spb::ServiceAccountMatch {
                namespace: m.namespace.clone(),
                service_account: m.service_account.clone(),
            })
            .collect()
    };
    spb::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: cidrs(&m.source_ips),
        not_source_ips: cidrs(&m.not_source_ips),
        destination_ips: cidrs(&m.destination_ips),
        not_destination_ips: cidrs(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        ..Default::default()
    }
}

fn string_match_to_proto(m: &StringMatch) -> spb::StringMatch {
    use spb::string_match::MatchType;
    let t = match m {
        StringMatch::Exact(s) => MatchType::Exact(s.clone()),
        StringMatch::Prefix(s) => MatchType::Prefix(s.clone()),
        StringMatch::Suffix(s) => MatchType::Suffix(s.clone()),
        StringMatch::Presence => MatchType::Presence(()),
    };
    spb::StringMatch {
        match_type: Some(t),
    }
}

fn ports_to_proto(ports: &PortMap) -> Vec<wpb::Port> {
    ports
        .iter()
        .map(|(s, t)| wpb::Port {
            service_port: u32::from(*s),
            target_port: u32::from(*t),
            ..Default::default()
        })
        .collect()
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
