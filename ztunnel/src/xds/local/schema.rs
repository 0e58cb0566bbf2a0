//! The local file's own shapes: upstream ztunnel's local YAML, field for field, read
//! strictly (unknown fields are errors, values are checked where they stand so errors
//! point at them), then turned into the state's types by the validator in `super`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::state::load_balancing::{self as lbs, HealthPolicy, LoadBalancing, Mode, Scope};
use crate::state::{
    GatewayAddress, HealthStatus, IpFamilies, NamespacedHostname, NetworkAddress, NetworkCidr,
    NetworkMode, PortMap, Protocol, Visibility, WeightedWaypoint,
};
use crate::xds::yaml::deserialize_via_str;

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct LocalWorkload {
    #[serde(default)]
    pub(super) uid: String,
    #[serde(default)]
    pub(super) name: String,
    pub(super) namespace: Name,
    #[serde(default)]
    pub(super) service_account: Option<Name>,
    #[serde(default)]
    pub(super) trust_domain: Option<TrustDomain>,
    #[serde(default)]
    pub(super) workload_ips: Vec<Ip>,
    /// Older upstream files give one IP.
    #[serde(default)]
    pub(super) workload_ip: Option<Ip>,
    #[serde(default)]
    pub(super) network: String,
    #[serde(default)]
    pub(super) protocol: Protocol,
    #[serde(default)]
    pub(super) network_mode: NetworkMode,
    #[serde(default)]
    pub(super) node: String,
    #[serde(default)]
    pub(super) status: HealthStatus,
    #[serde(default)]
    pub(super) services: BTreeMap<NamespacedHostname, PortMap>,
    #[serde(default)]
    pub(super) authorization_policies: Vec<PolicyKey>,
    #[serde(default)]
    pub(super) hostname: String,
    #[serde(default)]
    pub(super) workload_name: String,
    #[serde(default)]
    pub(super) workload_type: String,
    #[serde(default)]
    pub(super) canonical_name: String,
    #[serde(default)]
    pub(super) canonical_revision: String,
    #[serde(default)]
    pub(super) cluster_id: String,
    #[serde(default)]
    pub(super) waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub(super) locality: Locality,
    /// Upstream's default when absent.
    #[serde(default = "one")]
    pub(super) capacity: u32,
    // Upstream fields this proxy does not implement: accepted so upstream files load.
    #[serde(default)]
    pub(super) network_gateway: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) application_tunnel: Option<IgnoredAny>,
    #[serde(default)]
    pub(super) native_tunnel: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct LocalService {
    pub(super) name: String,
    pub(super) namespace: Name,
    pub(super) hostname: Hostname,
    #[serde(default)]
    pub(super) vips: Vec<NetworkAddress>,
    #[serde(default)]
    pub(super) ports: PortMap,
    #[serde(default)]
    pub(super) subject_alt_names: Vec<String>,
    #[serde(default)]
    pub(super) waypoint: Option<GatewayAddress>,
    #[serde(default)]
    pub(super) weighted_waypoints: Vec<WeightedWaypoint>,
    #[serde(default)]
    pub(super) cidr_vips: Vec<Cidr>,
    #[serde(default)]
    pub(super) load_balancer: Option<LoadBalancer>,
    /// Absent: inferred from the addresses.
    #[serde(default)]
    pub(super) ip_families: Option<IpFamily>,
    #[serde(default)]
    pub(super) canonical: bool,
    #[serde(default)]
    pub(super) visibility: LocalVisibility,
    // Endpoints come from the workloads' `services`; upstream's dump has them here too.
    #[serde(default)]
    pub(super) endpoints: Option<IgnoredAny>,
}

pub(super) struct Ip(pub(super) IpAddr);
deserialize_via_str!(Ip, "an IP address", |s: &str| {
    s.parse()
        .map(Ip)
        .map_err(|_| format!("{s:?} is not an IP address"))
});

/// A namespace or service account: one SPIFFE path segment, a Kubernetes name.
pub(super) struct Name(pub(super) String);
deserialize_via_str!(Name, "a Kubernetes name", |s: &str| {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(Name(s.to_string()))
    } else {
        Err(format!(
            "{s:?} is not a valid name (non-empty; letters, digits, '-', '.', '_')"
        ))
    }
});

/// SPIFFE trust domains: lowercase letters, digits, '.', '-', '_'.
pub(super) struct TrustDomain(pub(super) String);
deserialize_via_str!(TrustDomain, "a SPIFFE trust domain", |s: &str| {
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(TrustDomain(s.to_string()))
    } else {
        Err(format!(
            "{s:?} is not a valid SPIFFE trust domain (lowercase letters, digits, '.', '-', '_')"
        ))
    }
});

pub(super) struct Hostname(pub(super) String);
deserialize_via_str!(Hostname, "a hostname", |s: &str| {
    if s.is_empty() || s.contains(['/', ' ', '\t']) {
        Err(format!("{s:?} is not a valid hostname"))
    } else {
        Ok(Hostname(s.to_string()))
    }
});

/// A policy reference `namespace/name`.
pub(super) struct PolicyKey(pub(super) String);
deserialize_via_str!(PolicyKey, "a policy key \"namespace/name\"", |s: &str| {
    match s.split_once('/') {
        Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {
            Ok(PolicyKey(s.to_string()))
        }
        _ => Err(format!(
            "{s:?} is not a policy key of the form \"namespace/name\""
        )),
    }
});

/// A workload's place, for routing preferences.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Locality {
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
}

impl From<Locality> for lbs::Locality {
    fn from(l: Locality) -> Self {
        lbs::Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        }
    }
}

/// A service's `loadBalancer`, spelled as upstream's file spells it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct LoadBalancer {
    #[serde(default)]
    routing_preferences: Vec<LbScope>,
    #[serde(default)]
    mode: LbMode,
    #[serde(default)]
    health_policy: LbHealthPolicy,
}

#[derive(Deserialize, Clone, Copy)]
enum LbScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Deserialize, Default)]
enum LbMode {
    #[default]
    Standard,
    Strict,
    Failover,
    Passthrough,
}

#[derive(Deserialize, Default)]
enum LbHealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

impl From<LoadBalancer> for LoadBalancing {
    fn from(lb: LoadBalancer) -> Self {
        LoadBalancing {
            routing_preference: lb
                .routing_preferences
                .iter()
                .map(|s| match s {
                    LbScope::Region => Scope::Region,
                    LbScope::Zone => Scope::Zone,
                    LbScope::Subzone => Scope::Subzone,
                    LbScope::Node => Scope::Node,
                    LbScope::Cluster => Scope::Cluster,
                    LbScope::Network => Scope::Network,
                })
                .collect(),
            mode: match lb.mode {
                LbMode::Standard => Mode::Unspecified,
                LbMode::Strict => Mode::Strict,
                LbMode::Failover => Mode::Failover,
                LbMode::Passthrough => Mode::Passthrough,
            },
            health_policy: match lb.health_policy {
                LbHealthPolicy::OnlyHealthy => HealthPolicy::OnlyHealthy,
                LbHealthPolicy::AllowAll => HealthPolicy::AllowAll,
            },
        }
    }
}

/// Upstream's `ipFamilies` spelling.
#[derive(Deserialize, Clone, Copy)]
pub(super) enum IpFamily {
    Dual,
    IPv4,
    IPv6,
}

impl From<Option<IpFamily>> for IpFamilies {
    fn from(f: Option<IpFamily>) -> Self {
        match f {
            None => IpFamilies::Automatic,
            Some(IpFamily::Dual) => IpFamilies::Dual,
            Some(IpFamily::IPv4) => IpFamilies::Ipv4Only,
            Some(IpFamily::IPv6) => IpFamilies::Ipv6Only,
        }
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
pub(super) enum LocalVisibility {
    #[default]
    Public,
    Namespace,
}

impl From<LocalVisibility> for Visibility {
    fn from(v: LocalVisibility) -> Self {
        match v {
            LocalVisibility::Public => Visibility::Public,
            LocalVisibility::Namespace => Visibility::Namespace,
        }
    }
}

/// A `cidrVips` entry: upstream's `{network, cidr}`, or the short `network/ip/len`.
pub(super) struct Cidr(pub(super) NetworkCidr);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Cidr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an address range: \"network/ip/len\" or {network, cidr}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Cidr, E> {
                s.parse().map(Cidr).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Cidr, A::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Parts {
                    #[serde(default)]
                    network: String,
                    cidr: String,
                }
                let p = Parts::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let cidr: IpNet = p.cidr.parse().map_err(|_| {
                    de::Error::custom(format!("{:?} is not an address range (ip/len)", p.cidr))
                })?;
                format!("{}/{cidr}", p.network)
                    .parse()
                    .map(Cidr)
                    .map_err(de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}
