//! A service's load balancing as istiod describes it (`istio.workload.LoadBalancing`,
//! from `trafficDistribution` and the like): which endpoints a client may pick, by
//! health and by how close they are to the client (routing preference).
//!
//! The choice is a pure function of the client, the endpoints and the settings, so it is
//! table-tested here; [`super::ProxyState::pick_endpoint_for`] then picks at random among
//! what [`choose`] keeps.

use serde::Serialize;

use super::workload::{HealthStatus, Workload};

/// How far traffic may go: the scopes of a routing preference, most important first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// No preference applied: any endpoint.
    #[default]
    Unspecified,
    /// Only endpoints that match every scope of the preference.
    Strict,
    /// The endpoints that match the most scopes (in order), failing over to fewer.
    Failover,
    /// No endpoint is picked: the connection goes to the address the client dialled.
    Passthrough,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    /// Unhealthy endpoints are picked too.
    AllowAll,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    pub routing_preference: Vec<Scope>,
    pub mode: Mode,
    pub health_policy: HealthPolicy,
}

/// Where a workload runs, for routing preferences.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

/// Whether `ep` may be picked at all under `lb` (its health).
pub fn eligible(lb: Option<&LoadBalancing>, ep: &Workload) -> bool {
    ep.status == HealthStatus::Healthy
        || lb.is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll)
}

/// How close `ep` is to `src` under the preference `prefs`: how many of its scopes, in
/// order, they share, counting up to the first they do not. A preference that starts with
/// NETWORK puts every endpoint on the client's network ahead of every other one, and ranks
/// each group by the other scopes (as Istio's ztunnel does).
pub fn rank(prefs: &[Scope], src: &Workload, ep: &Workload) -> usize {
    match prefs.split_first() {
        Some((Scope::Network, rest)) => {
            let network = if src.network == ep.network {
                prefs.len()
            } else {
                0
            };
            network + shared(rest, src, ep)
        }
        _ => shared(prefs, src, ep),
    }
}

/// The rank of an endpoint that shares every scope of `prefs` with the client.
fn full_rank(prefs: &[Scope]) -> usize {
    match prefs.first() {
        Some(Scope::Network) => 2 * prefs.len() - 1,
        _ => prefs.len(),
    }
}

/// The leading scopes of `scopes` that `src` and `ep` share.
fn shared(scopes: &[Scope], src: &Workload, ep: &Workload) -> usize {
    scopes
        .iter()
        .take_while(|scope| match scope {
            Scope::Region => src.locality.region == ep.locality.region,
            Scope::Zone => src.locality.zone == ep.locality.zone,
            Scope::Subzone => src.locality.subzone == ep.locality.subzone,
            Scope::Node => src.node == ep.node,
            Scope::Cluster => src.cluster_id == ep.cluster_id,
            Scope::Network => src.network == ep.network,
        })
        .count()
}

/// The endpoints (already [`eligible`]) a connection from `src` may be sent to under
/// `lb`: all of them without a preference (or without a known client); under STRICT only
/// those sharing every scope with the client; under FAILOVER those of the best rank
/// present.
pub fn choose<T>(
    lb: Option<&LoadBalancing>,
    src: Option<&Workload>,
    eps: Vec<(T, &Workload)>,
) -> Vec<T> {
    let (Some(lb), Some(src)) = (lb, src) else {
        return eps.into_iter().map(|(t, _)| t).collect();
    };
    let prefs = &lb.routing_preference;
    if !matches!(lb.mode, Mode::Strict | Mode::Failover) || prefs.is_empty() {
        return eps.into_iter().map(|(t, _)| t).collect();
    }
    let ranked: Vec<(usize, T)> = eps
        .into_iter()
        .map(|(t, w)| (rank(prefs, src, w), t))
        .filter(|(r, _)| lb.mode != Mode::Strict || *r == full_rank(prefs))
        .collect();
    let Some(best) = ranked.iter().map(|(r, _)| *r).max() else {
        return vec![];
    };
    ranked
        .into_iter()
        .filter(|(r, _)| *r == best)
        .map(|(_, t)| t)
        .collect()
}

#[cfg(test)]
mod tests;
