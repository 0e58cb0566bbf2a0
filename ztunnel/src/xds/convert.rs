//! Istio's xDS resources (protos) ↔ the proxy's state types.
//!
//! Inbound (`*_from_proto`) is strict: a resource the proxy cannot use faithfully (bad IP
//! bytes, an enum value this build does not know, a missing key field) is an error naming
//! the field, so the xDS client can NACK it with that detail and keep the previous
//! version. Fields this L4 proxy does not implement (network gateways, application
//! tunnels, extensions) are ignored, but not silently: [`address_from_proto`] logs each
//! by name and counts it (`super::ignored`), as the local YAML reader warns about them.
//!
//! Outbound (`*_to_proto`, in [`to_proto`]) is what the built-in control plane serves; the
//! two directions round-trip (see the tests).

mod to_proto;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use prost::Message;

pub use to_proto::{
    address_to_any, authorization_to_any, authorization_to_proto, service_to_proto,
    workload_to_proto,
};

use crate::policy::{
    Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};
use crate::proto::istio::security as spb;
use crate::proto::istio::workload as wpb;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::state::load_balancing::{self as lbs, HealthPolicy, LoadBalancing, Locality, Mode};
use crate::state::{
    GatewayAddress, GatewayDestination, HealthStatus, IpFamilies, NamespacedHostname,
    NetworkAddress, NetworkCidr, NetworkMode, PortMap, Protocol, Service, Visibility,
    WeightedWaypoint, Workload, DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN,
};

/// Why a resource was rejected: the field (`addresses[1]`, `rules[0].clauses[2]...`) and
/// what is wrong with it. `Display` is what goes into the NACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConvertError {
    /// Dotted path of the offending field; empty when the whole resource is at fault.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl ConvertError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConvertError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefixes the field path with the enclosing field (`rules[0]` + `clauses[1]`).
    fn within(mut self, outer: impl fmt::Display) -> Self {
        self.field = if self.field.is_empty() {
            outer.to_string()
        } else {
            format!("{outer}.{}", self.field)
        };
        self
    }
}

type Result<T> = std::result::Result<T, ConvertError>;

/// An `istio.workload.Address` resource: one of the two things it can carry.
// Short-lived (one per resource in a push): boxing the workload would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressResource {
    Workload(Workload),
    Service(Service),
}

/// Decodes an `Any` that must hold an `istio.workload.Address`.
pub fn decode_address(any: &prost_types::Any) -> Result<AddressResource> {
    let a: wpb::Address = decode_any(any, ADDRESS_TYPE_URL)?;
    address_from_proto(&a)
}

/// Decodes an `Any` that must hold an `istio.security.Authorization`.
pub fn decode_authorization(any: &prost_types::Any) -> Result<Authorization> {
    let a: spb::Authorization = decode_any(any, AUTHORIZATION_TYPE_URL)?;
    let r = authorization_from_proto(&a)?;
    let name = format!("{}/{}", a.namespace, a.name);
    super::ignored::report(&name, &super::ignored::policy_fields(&a));
    Ok(r)
}

fn decode_any<M: Message + Default>(any: &prost_types::Any, type_url: &str) -> Result<M> {
    if any.type_url != type_url {
        return Err(ConvertError::new(
            "",
            format!("expected a {type_url}, got a {:?}", any.type_url),
        ));
    }
    M::decode(any.value.as_slice())
        .map_err(|e| ConvertError::new("", format!("cannot decode the protobuf: {e}")))
}

/// An address resource from istiod; fields it carries that this proxy does not implement
/// are reported by name (`super::ignored`), not dropped silently.
pub fn address_from_proto(a: &wpb::Address) -> Result<AddressResource> {
    use super::ignored;
    match &a.r#type {
        Some(wpb::address::Type::Workload(w)) => {
            let r = workload_from_proto(w).map_err(|e| e.within("workload"))?;
            ignored::report(&w.uid, &ignored::workload_fields(w));
            Ok(AddressResource::Workload(r))
        }
        Some(wpb::address::Type::Service(s)) => {
            let r = service_from_proto(s).map_err(|e| e.within("service"))?;
            let name = format!("{}/{}", s.namespace, s.hostname);
            ignored::report(&name, &ignored::service_fields(s));
            Ok(AddressResource::Service(r))
        }
        None => Err(ConvertError::new(
            "type",
            "the Address holds neither a workload nor a service",
        )),
    }
}

pub fn workload_from_proto(w: &wpb::Workload) -> Result<Workload> {
    require("uid", &w.uid)?;
    require("namespace", &w.namespace)?;
    let mut workload_ips = Vec::with_capacity(w.addresses.len());
    for (i, bytes) in w.addresses.iter().enumerate() {
        let ip = ip_from_bytes(bytes).map_err(|e| e.within(format!("addresses[{i}]")))?;
        if !workload_ips.contains(&ip) {
            workload_ips.push(ip);
        }
    }
    let protocol = match enum_value::<wpb::TunnelProtocol>("tunnelProtocol", w.tunnel_protocol)? {
        wpb::TunnelProtocol::None => Protocol::TCP,
        wpb::TunnelProtocol::Hbone => Protocol::HBONE,
        // A sidecar's own mTLS: neither plaintext nor HBONE would reach it as it expects.
        wpb::TunnelProtocol::LegacyIstioMtls => {
            return Err(ConvertError::new(
                "tunnelProtocol",
                "LEGACY_ISTIO_MTLS (sidecar mTLS) is not supported by this proxy",
            ))
        }
    };
    let status = match enum_value::<wpb::WorkloadStatus>("status", w.status)? {
        wpb::WorkloadStatus::Healthy => HealthStatus::Healthy,
        wpb::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
    };
    let network_mode = match enum_value::<wpb::NetworkMode>("networkMode", w.network_mode)? {
        wpb::NetworkMode::Standard => NetworkMode::Standard,
        wpb::NetworkMode::HostNetwork => NetworkMode::HostNetwork,
    };
    // Upstream ztunnel shows the type in lowercase ("deployment"); so does the local YAML.
    let workload_type = enum_value::<wpb::WorkloadType>("workloadType", w.workload_type)?
        .as_str_name()
        .to_ascii_lowercase();
    // A workload with no address is reached by looking this name up at connect time.
    if !w.hostname.is_empty() {
        crate::state::check_hostname(&w.hostname).map_err(|e| ConvertError::new("hostname", e))?;
    }
    let mut services = std::collections::BTreeMap::new();
    for (key, ports) in &w.services {
        let field = format!("services[{key:?}]");
        let svc: NamespacedHostname = key
            .parse()
            .map_err(|e: String| ConvertError::new(field.clone(), e))?;
        services.insert(
            svc,
            ports_from_proto(&ports.ports).map_err(|e| e.within(&field))?,
        );
    }
    Ok(Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        trust_domain: or_default(&w.trust_domain, DEFAULT_TRUST_DOMAIN),
        service_account: or_default(&w.service_account, DEFAULT_SERVICE_ACCOUNT),
        workload_ips,
        network: w.network.clone(),
        protocol,
        network_mode,
        node: w.node.clone(),
        status,
        authorization_policies: w.authorization_policies.clone(),
        services,
        waypoint: waypoint_from_proto(&w.waypoint).map_err(|e| e.within("waypoint"))?,
        locality: w
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.subzone.clone(),
            })
            .unwrap_or_default(),
        hostname: w.hostname.clone(),
        workload_name: w.workload_name.clone(),
        workload_type,
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        cluster_id: w.cluster_id.clone(),
        // Unset means 1 (upstream's rule); 0 is kept: that endpoint is never picked.
        capacity: w.capacity.unwrap_or(1),
        labels: Default::default(),
    })
}

pub fn service_from_proto(s: &wpb::Service) -> Result<Service> {
    require("namespace", &s.namespace)?;
    require("hostname", &s.hostname)?;
    if s.hostname.contains('/') {
        return Err(ConvertError::new(
            "hostname",
            format!("{:?} is not a hostname", s.hostname),
        ));
    }
    let mut vips = Vec::with_capacity(s.addresses.len());
    let mut cidr_vips = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let ip =
            ip_from_bytes(&a.address).map_err(|e| e.within(format!("addresses[{i}].address")))?;
        let host_len = if ip.is_ipv4() { 32 } else { 128 };
        match a.length {
            // A prefix length short of a host's: the service stands for the whole range.
            Some(len) if len != host_len => {
                let cidr = u8::try_from(len)
                    .ok()
                    .and_then(|l| IpNet::new(ip, l).ok())
                    .ok_or_else(|| {
                        ConvertError::new(
                            format!("addresses[{i}].length"),
                            format!("prefix length {len} is too long for {ip}"),
                        )
                    })?;
                cidr_vips.push(NetworkCidr {
                    network: a.network.clone(),
                    cidr: cidr.trunc(),
                });
            }
            _ => vips.push(NetworkAddress::new(&a.network, ip)),
        }
    }
    let mut weighted_waypoints = Vec::with_capacity(s.weighted_waypoints.len());
    for (i, w) in s.weighted_waypoints.iter().enumerate() {
        let field = format!("weightedWaypoints[{i}].destination");
        let destination = waypoint_from_proto(&w.destination)
            .map_err(|e| e.within(&field))?
            .ok_or_else(|| ConvertError::new(field, "missing (required)"))?;
        weighted_waypoints.push(WeightedWaypoint {
            destination,
            weight: w.weight,
        });
    }
    let ip_families = match enum_value::<wpb::IpFamilies>("ipFamilies", s.ip_families)? {
        wpb::IpFamilies::Automatic => IpFamilies::Automatic,
        wpb::IpFamilies::Ipv4Only => IpFamilies::Ipv4Only,
        wpb::IpFamilies::Ipv6Only => IpFamilies::Ipv6Only,
        wpb::IpFamilies::Dual => IpFamilies::Dual,
    };
    let visibility = match enum_value::<wpb::service::Visibility>("visibility", s.visibility)? {
        wpb::service::Visibility::Public => Visibility::Public,
        wpb::service::Visibility::Namespace => Visibility::Namespace,
    };
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        cidr_vips,
        ports: ports_from_proto(&s.ports)?,
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: waypoint_from_proto(&s.waypoint).map_err(|e| e.within("waypoint"))?,
        load_balancing: s
            .load_balancing
            .as_ref()
            .map(load_balancing_from_proto)
            .transpose()
            .map_err(|e| e.within("loadBalancing"))?,
        weighted_waypoints,
        ip_families,
        canonical: s.canonical,
        visibility,
    })
}

fn load_balancing_from_proto(lb: &wpb::LoadBalancing) -> Result<LoadBalancing> {
    use wpb::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
    let mut routing_preference = Vec::with_capacity(lb.routing_preference.len());
    for (i, v) in lb.routing_preference.iter().enumerate() {
        let field = format!("routingPreference[{i}]");
        routing_preference.push(match enum_value::<S>(&field, *v)? {
            S::Region => lbs::Scope::Region,
            S::Zone => lbs::Scope::Zone,
            S::Subzone => lbs::Scope::Subzone,
            S::Node => lbs::Scope::Node,
            S::Cluster => lbs::Scope::Cluster,
            S::Network => lbs::Scope::Network,
            S::UnspecifiedScope => {
                return Err(ConvertError::new(field, "UNSPECIFIED_SCOPE is not a scope"))
            }
        });
    }
    Ok(LoadBalancing {
        routing_preference,
        mode: match enum_value::<M>("mode", lb.mode)? {
            M::UnspecifiedMode => Mode::Unspecified,
            M::Strict => Mode::Strict,
            M::Failover => Mode::Failover,
            M::Passthrough => Mode::Passthrough,
        },
        health_policy: match enum_value::<H>("healthPolicy", lb.health_policy)? {
            H::OnlyHealthy => HealthPolicy::OnlyHealthy,
            H::AllowAll => HealthPolicy::AllowAll,
        },
    })
}

fn waypoint_from_proto(g: &Option<wpb::GatewayAddress>) -> Result<Option<GatewayAddress>> {
    use wpb::gateway_address::Destination;
    let Some(g) = g else { return Ok(None) };
    let destination = match &g.destination {
        Some(Destination::Address(a)) => {
            let ip = ip_from_bytes(&a.address).map_err(|e| e.within("address.address"))?;
            GatewayDestination::Address(NetworkAddress::new(&a.network, ip))
        }
        Some(Destination::Hostname(h)) => {
            require("hostname.namespace", &h.namespace)?;
            require("hostname.hostname", &h.hostname)?;
            GatewayDestination::Hostname(NamespacedHostname::new(&h.namespace, &h.hostname))
        }
        // Sending nowhere and sending direct are both wrong guesses for a waypoint.
        None => return Err(ConvertError::new("destination", "missing (required)")),
    };
    let hbone_mtls_port = port(g.hbone_mtls_port).map_err(|e| e.within("hboneMtlsPort"))?;
    if hbone_mtls_port == 0 {
        return Err(ConvertError::new("hboneMtlsPort", "missing (required)"));
    }
    Ok(Some(GatewayAddress {
        destination,
        hbone_mtls_port,
    }))
}

pub fn authorization_from_proto(a: &spb::Authorization) -> Result<Authorization> {
    for (field, value) in [("name", &a.name), ("namespace", &a.namespace)] {
        require(field, value)?;
        if value.contains('/') {
            return Err(ConvertError::new(field, format!("{value:?} contains '/'")));
        }
    }
    let scope = match enum_value::<spb::Scope>("scope", a.scope)? {
        spb::Scope::Global => Scope::Global,
        spb::Scope::Namespace => Scope::Namespace,
        spb::Scope::WorkloadSelector => Scope::WorkloadSelector,
    };
    let action = match enum_value::<spb::Action>("action", a.action)? {
        spb::Action::Allow => Action::Allow,
        spb::Action::Deny => Action::Deny,
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for (r, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, mat) in clause.matches.iter().enumerate() {
                let converted = match_from_proto(mat)
                    .map_err(|e| e.within(format!("rules[{r}].clauses[{c}].matches[{m}]")))?;
                matches.push(converted);
            }
            clauses.push(Clause { matches });
        }
        rules.push(Rule { clauses });
    }
    Ok(Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    })
}

fn match_from_proto(m: &spb::Match) -> Result<Match> {
    Ok(Match {
        namespaces: string_matches("namespaces", &m.namespaces)?,
        not_namespaces: string_matches("notNamespaces", &m.not_namespaces)?,
        service_accounts: service_accounts("serviceAccounts", &m.service_accounts)?,
        not_service_accounts: service_accounts("notServiceAccounts", &m.not_service_accounts)?,
        principals: string_matches("principals", &m.principals)?,
        not_principals: string_matches("notPrincipals", &m.not_principals)?,
        source_ips: cidrs("sourceIps", &m.source_ips)?,
        not_source_ips: cidrs("notSourceIps", &m.not_source_ips)?,
        destination_ips: cidrs("destinationIps", &m.destination_ips)?,
        not_destination_ips: cidrs("notDestinationIps", &m.not_destination_ips)?,
        destination_ports: ports("destinationPorts", &m.destination_ports)?,
        not_destination_ports: ports("notDestinationPorts", &m.not_destination_ports)?,
    })
}

fn string_matches(field: &str, v: &[spb::StringMatch]) -> Result<Vec<StringMatch>> {
    use spb::string_match::MatchType;
    v.iter()
        .enumerate()
        .map(|(i, m)| match &m.match_type {
            Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
            Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
            Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
            Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
            // Matching "nothing" and "anything" are both wrong guesses for a policy.
            None => Err(ConvertError::new(
                format!("{field}[{i}]"),
                "a string match without exact, prefix, suffix or presence",
            )),
        })
        .collect()
}

fn service_accounts(
    field: &str,
    v: &[spb::ServiceAccountMatch],
) -> Result<Vec<ServiceAccountMatch>> {
    v.iter()
        .enumerate()
        .map(|(i, m)| {
            // An empty half would match no identity: a DENY would silently never apply.
            let at = |f: &str| format!("{field}[{i}].{f}");
            require(&at("namespace"), &m.namespace)?;
            require(&at("serviceAccount"), &m.service_account)?;
            Ok(ServiceAccountMatch {
                namespace: m.namespace.clone(),
                service_account: m.service_account.clone(),
            })
        })
        .collect()
}

fn cidrs(field: &str, v: &[spb::Address]) -> Result<Vec<IpNet>> {
    v.iter()
        .enumerate()
        .map(|(i, a)| {
            let at = || format!("{field}[{i}]");
            let ip = ip_from_bytes(&a.address).map_err(|e| e.within(at()))?;
            let len = u8::try_from(a.length).ok();
            len.and_then(|l| IpNet::new(ip, l).ok()).ok_or_else(|| {
                ConvertError::new(
                    at(),
                    format!("prefix length {} is too long for {ip}", a.length),
                )
            })
        })
        .collect()
}

fn ports(field: &str, v: &[u32]) -> Result<Vec<u16>> {
    v.iter()
        .enumerate()
        .map(|(i, p)| port(*p).map_err(|e| e.within(format!("{field}[{i}]"))))
        .collect()
}

fn port(p: u32) -> Result<u16> {
    u16::try_from(p).map_err(|_| ConvertError::new("", format!("{p} is not a port number")))
}

fn ports_from_proto(v: &[wpb::Port]) -> Result<PortMap> {
    let mut out = PortMap::new();
    for (i, p) in v.iter().enumerate() {
        let at = |f: &str| format!("ports[{i}].{f}");
        let service_port = port(p.service_port).map_err(|e| e.within(at("servicePort")))?;
        if service_port == 0 {
            return Err(ConvertError::new(at("servicePort"), "port 0 is not a port"));
        }
        let target_port = port(p.target_port).map_err(|e| e.within(at("targetPort")))?;
        out.insert(service_port, target_port);
    }
    Ok(out)
}

/// Raw address bytes: 4 for IPv4, 16 for IPv6 (an IPv4-mapped IPv6 address is taken as
/// the IPv4 one, which is how the state indexes it).
fn ip_from_bytes(b: &[u8]) -> Result<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        return Ok(IpAddr::from(v4));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(b) {
        return Ok(IpAddr::from(v6).to_canonical());
    }
    Err(ConvertError::new(
        "",
        format!(
            "{} bytes is not an IP address (4 for IPv4, 16 for IPv6)",
            b.len()
        ),
    ))
}

/// Proto3 enums arrive as raw numbers: one newer than this build is an error, not a
/// silent default.
fn enum_value<E: TryFrom<i32>>(field: &str, v: i32) -> Result<E> {
    E::try_from(v).map_err(|_| ConvertError::new(field, format!("unknown enum value {v}")))
}

fn require(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(ConvertError::new(field, "missing (required)"));
    }
    Ok(())
}

fn or_default(v: &str, default: &str) -> String {
    if v.is_empty() { default } else { v }.to_string()
}

#[cfg(test)]
mod tests;
