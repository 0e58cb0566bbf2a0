//! Waypoints: the L7 proxies (Istio's waypoint, an Envoy) that traffic to some services and
//! workloads must pass through. The control plane names one with a `GatewayAddress` on the
//! service or workload; this proxy's part is to send such traffic to it over HBONE and, at
//! the destination, to accept it only from it.
//!
//! Which field applies follows Istio: a connection addressed to a service VIP uses the
//! service's waypoint (istiod sets it for waypoints serving service traffic) and never the
//! endpoint's; one addressed to a workload's own IP uses the workload's (set for waypoints
//! serving workload traffic). A waypoint's own connections never loop back to it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::service::{Service, WeightedWaypoint};
use super::snapshot::ProxyState;
use super::workload::{NamespacedHostname, NetworkAddress, Workload};
use crate::identity::Identity;
use crate::xds::yaml::deserialize_via_str;

/// Where a waypoint is: an address (a workload's IP or a service VIP), or a service
/// hostname — the stable form, which also adapts to the caller's IP family.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

/// Written as upstream's local config writes it: `network/ip` (or a bare IP) for an
/// address, `namespace/hostname` for a hostname. No hostname parses as an IP, so the two
/// cannot be confused.
impl FromStr for GatewayDestination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<NetworkAddress>() {
            return Ok(GatewayDestination::Address(a));
        }
        s.parse::<NamespacedHostname>()
            .map(GatewayDestination::Hostname)
            .map_err(|_| {
                format!("{s:?} is neither an address (\"network/ip\") nor \"namespace/hostname\"")
            })
    }
}

impl fmt::Display for GatewayDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayDestination::Address(a) => a.fmt(f),
            GatewayDestination::Hostname(h) => h.fmt(f),
        }
    }
}

deserialize_via_str!(
    GatewayDestination,
    "a waypoint destination (\"network/ip\" or \"namespace/hostname\")",
    |s: &str| s.parse()
);

impl Serialize for GatewayDestination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A waypoint as the control plane names it (Istio's `GatewayAddress`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    /// The port the waypoint terminates HBONE on.
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    crate::hbone::HBONE_PORT
}

impl fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (HBONE port {})",
            self.destination, self.hbone_mtls_port
        )
    }
}

/// The waypoint instance one connection goes to.
#[derive(Debug, Clone)]
pub struct WaypointHop {
    /// As configured, for logs.
    pub gateway: GatewayAddress,
    /// The instance picked.
    pub workload: Arc<Workload>,
    /// Its IP (of the caller's family where it has one) and HBONE port: what is dialed.
    pub address: SocketAddr,
    /// The waypoint's service, when it was named by one.
    pub service: Option<Arc<Service>>,
}

impl WaypointHop {
    /// The identities the waypoint may present: its workload's, or any of its service's
    /// subjectAltNames.
    pub fn identities(&self) -> Vec<Identity> {
        let mut ids = vec![self.workload.identity()];
        if let Some(svc) = &self.service {
            ids.extend(svc.subject_alt_names.iter().filter_map(|s| s.parse().ok()));
        }
        ids
    }
}

/// A waypoint the state cannot send a connection to. The connection is refused: it never
/// falls back to the direct path, which would skip the waypoint's policies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaypointError {
    #[error("waypoint {0} is neither a known workload nor a known service")]
    Unknown(String),
    #[error("waypoint {0} has no healthy instance with an address")]
    NoInstance(String),
}

impl ProxyState {
    /// The waypoint a connection from `src` to `dst` must go through, if any (the rules
    /// in the module comment).
    pub fn waypoint_for(&self, src: &Workload, dst: SocketAddr) -> Option<GatewayAddress> {
        self.waypoint_for_with(src, dst, &mut rand::rng())
    }

    /// [`ProxyState::waypoint_for`], a weighted set sampled with `rng`.
    pub fn waypoint_for_with(
        &self,
        src: &Workload,
        dst: SocketAddr,
        rng: &mut impl Rng,
    ) -> Option<GatewayAddress> {
        let addr = NetworkAddress::new(&src.network, dst.ip().to_canonical());
        match self.destination_service(&addr, Some(&src.namespace)) {
            // Service-addressed: the service's waypoint or none; an endpoint's own waypoint
            // is for traffic addressed to the endpoint.
            Some(svc) => {
                // A waypoint's own connections to the service it fronts go straight to it,
                // whichever of the set it is.
                let all = svc
                    .waypoint
                    .iter()
                    .chain(svc.weighted_waypoints.iter().map(|w| &w.destination));
                if all.clone().any(|gw| self.is_waypoint_instance(gw, src)) {
                    return None;
                }
                sample_weighted(&svc.weighted_waypoints, rng).or_else(|| svc.waypoint.clone())
            }
            None => {
                let gw = self.workload_by_addr(&addr)?.waypoint.clone()?;
                (!self.is_waypoint_instance(&gw, src)).then_some(gw)
            }
        }
    }

    /// Picks the instance of `gw` to dial for a connection to `family_of`'s IP family.
    pub fn waypoint(
        &self,
        gw: &GatewayAddress,
        family_of: IpAddr,
    ) -> Result<WaypointHop, WaypointError> {
        let Members { service, workloads } = self.waypoint_members(gw)?;
        let healthy: Vec<_> = workloads
            .into_iter()
            .filter(|w| w.is_healthy() && !w.workload_ips.is_empty())
            .collect();
        if healthy.is_empty() {
            return Err(WaypointError::NoInstance(gw.to_string()));
        }
        // As a service's endpoints: in proportion to their capacities.
        let workload = healthy
            .choose_weighted(&mut rand::rng(), |w| w.capacity)
            .map_err(|_| WaypointError::NoInstance(gw.to_string()))?
            .clone();
        let ip = match &gw.destination {
            // Named by a workload's address: that address, as upstream does.
            GatewayDestination::Address(a) if service.is_none() => a.address,
            _ => workload
                .ip_like(family_of)
                .ok_or_else(|| WaypointError::NoInstance(gw.to_string()))?,
        };
        Ok(WaypointHop {
            gateway: gw.clone(),
            address: SocketAddr::new(ip, gw.hbone_mtls_port),
            workload,
            service,
        })
    }

    /// The waypoint `dst` must be reached through that a connection from `client` (its
    /// verified identity; `None` for plaintext) skipped, if it did. A workload with a
    /// waypoint of its own (istiod sets it when the waypoint serves workload traffic) takes
    /// connections only from the waypoint's identity; one whose only waypoint is its
    /// service's takes traffic addressed to its own IP directly, as in Istio (such traffic
    /// never goes through that waypoint).
    pub fn skipped_waypoint<'w>(
        &self,
        dst: &'w Workload,
        client: Option<&Identity>,
    ) -> Option<&'w GatewayAddress> {
        let gw = dst.waypoint.as_ref()?;
        match client {
            Some(id) if self.is_waypoint_identity(gw, id) => None,
            _ => Some(gw),
        }
    }

    /// Whether `id` is an identity the waypoint `gw` may present: what the destination
    /// checks before it accepts a connection for a workload behind `gw`.
    pub fn is_waypoint_identity(&self, gw: &GatewayAddress, id: &Identity) -> bool {
        let Ok(Members { service, workloads }) = self.waypoint_members(gw) else {
            return false;
        };
        let sans = service.iter().flat_map(|s| s.subject_alt_names.iter());
        workloads.iter().any(|w| w.identity() == *id)
            || sans
                .filter_map(|s| s.parse::<Identity>().ok())
                .any(|s| s == *id)
    }

    /// Whether `id` is the identity of a waypoint of `dst`: its own, or that of a service
    /// it backs. Such a waypoint forwards other clients' connections to `dst`, so the
    /// source it names for them (HBONE's `forwarded`) is believed.
    pub fn is_waypoint_of(&self, dst: &Workload, id: &Identity) -> bool {
        let services = dst
            .services
            .keys()
            .filter_map(|key| self.service(key))
            .flat_map(|svc| {
                let weighted = svc.weighted_waypoints.iter().map(|w| w.destination.clone());
                svc.waypoint
                    .clone()
                    .into_iter()
                    .chain(weighted)
                    .collect::<Vec<_>>()
            });
        dst.waypoint
            .iter()
            .cloned()
            .chain(services)
            .any(|gw| self.is_waypoint_identity(&gw, id))
    }

    /// Whether `w` is one of the workloads that make up `gw` (its own traffic must not be
    /// sent back to it).
    pub fn is_waypoint_instance(&self, gw: &GatewayAddress, w: &Workload) -> bool {
        self.waypoint_members(gw)
            .is_ok_and(|m| m.workloads.iter().any(|m| m.uid == w.uid))
    }

    /// The waypoint's service (when named by one) and every workload behind it.
    fn waypoint_members(&self, gw: &GatewayAddress) -> Result<Members, WaypointError> {
        let unknown = || WaypointError::Unknown(gw.destination.to_string());
        let service = match &gw.destination {
            GatewayDestination::Hostname(h) => Some(self.service(h).ok_or_else(unknown)?),
            GatewayDestination::Address(a) => match self.service_by_vip(a) {
                Some(svc) => Some(svc),
                None => {
                    let w = self.workload_by_addr(a).ok_or_else(unknown)?;
                    return Ok(Members {
                        service: None,
                        workloads: vec![w],
                    });
                }
            },
        };
        let workloads = service
            .as_ref()
            .map(|svc| {
                let eps = self.endpoints(&svc.key());
                eps.into_iter().map(|(w, _)| w).collect()
            })
            .unwrap_or_default();
        Ok(Members { service, workloads })
    }
}

/// One of a weighted set of waypoints, each in proportion to its weight; `None` when no
/// weight is above zero (the service's single waypoint then applies).
pub fn sample_weighted(set: &[WeightedWaypoint], rng: &mut impl Rng) -> Option<GatewayAddress> {
    set.choose_weighted(rng, |w| w.weight)
        .ok()
        .map(|w| w.destination.clone())
}

/// What a waypoint is made of: its service when named by one, and the workloads behind it.
struct Members {
    service: Option<Arc<Service>>,
    workloads: Vec<Arc<Workload>>,
}
