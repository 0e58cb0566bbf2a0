//! Outbound resolution: from the original destination of a captured connection to the
//! workload and port to tunnel to, or to an endpoint known by hostname only, whose address
//! the connection looks up (`unresolved`).

use std::net::SocketAddr;
use std::sync::Arc;

use rand::seq::IndexedRandom;
use rand::Rng;

use super::load_balancing::{self, Mode};
use super::service::Service;
use super::snapshot::ProxyState;
use super::unresolved::Unresolved;
use super::workload::{NetworkAddress, Workload};

/// Where a connection goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub workload: Arc<Workload>,
    /// The workload IP and target port to reach (the `:authority` of the HBONE CONNECT).
    pub address: SocketAddr,
    /// The service whose VIP was dialed, if it was one.
    pub service: Option<Arc<Service>>,
}

impl Upstream {
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Whether to tunnel (HBONE) or pass through in plaintext.
    pub fn in_mesh(&self) -> bool {
        self.workload.in_mesh()
    }
}

/// A destination the mesh knows but cannot serve; refuse the connection rather than send
/// it somewhere else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("service {service} has no healthy endpoint")]
    NoHealthyEndpoints { service: String },
    #[error("service {service} does not serve port {port}")]
    NoSuchPort { service: String, port: u16 },
    #[error("every endpoint of service {service} that may be picked has capacity 0")]
    NoCapacity { service: String },
    #[error("workload {uid} has no IP address the service allows")]
    NoWorkloadIp { uid: String },
    #[error("service {service} has endpoints only on other networks ({networks}), and network gateways are not supported")]
    OtherNetworks { service: String, networks: String },
    #[error("no endpoint of service {service} meets its routing preference (STRICT)")]
    NoPreferredEndpoint { service: String },
    /// The picked endpoint is known by hostname only and its lookup gave no usable address
    /// (failed, timed out, or none the service allows).
    #[error("could not resolve {hostname}: {error}")]
    Dns { hostname: String, error: String },
}

/// Where the state says a connection goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// An endpoint at a known address.
    Address(Upstream),
    /// An endpoint known by hostname only: its address is looked up first.
    Hostname(Unresolved),
}

impl Target {
    /// The endpoint, for callers that know it has an address (tests).
    #[cfg(test)]
    pub fn expect_address(self) -> Upstream {
        match self {
            Target::Address(up) => up,
            Target::Hostname(l) => panic!("{} needs a lookup", l.hostname()),
        }
    }
}

impl ProxyState {
    /// Resolves an original destination on this node's network.
    ///
    /// `Ok(None)`: the IP is neither a workload nor a service VIP (outside the mesh; pass
    /// through), or a VIP whose load balancing is PASSTHROUGH (sent to the address dialled).
    /// Service VIPs are load balanced at random over their endpoints, as their load
    /// balancing allows (health, routing preference from the client `src`, when known).
    /// (Tests: endpoints with addresses only.)
    #[cfg(test)]
    pub fn resolve(&self, dst: SocketAddr) -> Result<Option<Upstream>, ResolveError> {
        Ok(self.resolve_from(None, dst)?.map(Target::expect_address))
    }

    /// [`ProxyState::resolve`] for a connection from the workload `src`; the endpoint may
    /// be one to look up.
    pub fn resolve_from(
        &self,
        src: Option<&Workload>,
        dst: SocketAddr,
    ) -> Result<Option<Target>, ResolveError> {
        self.resolve_on(self.network(), src, dst)
    }

    #[cfg(test)]
    pub fn resolve_in(
        &self,
        network: &str,
        dst: SocketAddr,
    ) -> Result<Option<Upstream>, ResolveError> {
        Ok(self
            .resolve_on(network, None, dst)?
            .map(Target::expect_address))
    }

    fn resolve_on(
        &self,
        network: &str,
        src: Option<&Workload>,
        dst: SocketAddr,
    ) -> Result<Option<Target>, ResolveError> {
        let ip = dst.ip().to_canonical();
        let addr = NetworkAddress::new(network, ip);
        let Some(svc) = self.destination_service(&addr, src.map(|w| w.namespace.as_str())) else {
            return Ok(self.workload_by_addr(&addr).map(|workload| {
                Target::Address(Upstream {
                    workload,
                    address: SocketAddr::new(ip, dst.port()),
                    service: None,
                })
            }));
        };
        if svc
            .load_balancing
            .as_ref()
            .is_some_and(|lb| lb.mode == Mode::Passthrough)
        {
            return Ok(None);
        }
        self.pick_endpoint_for(src, &svc, SocketAddr::new(ip, dst.port()), &mut rand::rng())
            .map(Some)
    }

    /// The service an inbound connection to `workload` on `port` most likely came through,
    /// for its metrics and access log (a delivered connection names the pod, not the VIP
    /// it was sent to): the first, by name, of the workload's services with a port whose
    /// target is `port`. Istio's ztunnel guesses the same way.
    pub fn guess_inbound_service(&self, workload: &Workload, port: u16) -> Option<Arc<Service>> {
        workload.services.iter().find_map(|(key, endpoint_ports)| {
            let svc = self.service(key)?;
            let mut service_ports = svc.ports.keys().chain(endpoint_ports.keys());
            service_ports
                .any(|p| svc.target_port(*p, endpoint_ports) == Some(port))
                .then_some(svc)
        })
    }

    /// (Tests: [`ProxyState::pick_endpoint_for`] with no client, endpoints with addresses.)
    #[cfg(test)]
    pub fn pick_endpoint(
        &self,
        svc: &Arc<Service>,
        dst: SocketAddr,
        rng: &mut impl Rng,
    ) -> Result<Upstream, ResolveError> {
        Ok(self
            .pick_endpoint_for(None, svc, dst, rng)?
            .expect_address())
    }

    /// Picks a healthy endpoint of `svc` for a connection from `src` to `dst` (a VIP of
    /// it), at random with `rng` in proportion to the endpoints' capacities, among those
    /// the service's load balancing allows (`load_balancing::choose`). The endpoint IP is
    /// one the service's IP families allow, of `dst`'s family when it has one; an endpoint
    /// with no such IP but a hostname is picked too, to be looked up.
    pub fn pick_endpoint_for(
        &self,
        src: Option<&Workload>,
        svc: &Arc<Service>,
        dst: SocketAddr,
        rng: &mut impl Rng,
    ) -> Result<Target, ResolveError> {
        let key = svc.key();
        let port = dst.port();
        let lb = svc.load_balancing.as_ref();
        let eligible: Vec<_> = self
            .endpoints(&key)
            .into_iter()
            .filter(|(w, _)| {
                load_balancing::eligible(lb, w)
                    && (w.ip_for(svc, dst.ip()).is_some() || !w.hostname.is_empty())
            })
            .filter(|(w, _)| w.network == self.network())
            .filter_map(|(w, ep)| Some((svc.target_port(port, &ep.ports)?, w)))
            .collect();
        let any = !eligible.is_empty();
        let candidates = load_balancing::choose(
            lb,
            src,
            eligible
                .iter()
                .map(|(t, w)| ((*t, w.clone()), w.as_ref()))
                .collect(),
        );
        if any && candidates.is_empty() {
            return Err(ResolveError::NoPreferredEndpoint {
                service: key.to_string(),
            });
        }
        if candidates.is_empty() {
            // Endpoints on other networks would need a network gateway (double HBONE),
            // which is not built: refused, never dialled directly.
            let mut elsewhere: Vec<String> = self
                .endpoints(&key)
                .iter()
                .filter(|(w, _)| load_balancing::eligible(lb, w) && w.network != self.network())
                .map(|(w, _)| format!("{:?}", w.network))
                .collect();
            if !elsewhere.is_empty() {
                elsewhere.sort();
                elsewhere.dedup();
                return Err(ResolveError::OtherNetworks {
                    service: key.to_string(),
                    networks: elsewhere.join(", "),
                });
            }
            // Tell "nothing listens on that port" from "nobody is up" for the logs.
            let any_healthy = self
                .endpoints(&key)
                .iter()
                .any(|(w, _)| load_balancing::eligible(lb, w));
            return Err(if any_healthy {
                ResolveError::NoSuchPort {
                    service: key.to_string(),
                    port,
                }
            } else {
                ResolveError::NoHealthyEndpoints {
                    service: key.to_string(),
                }
            });
        }
        let (target, workload) = candidates
            .choose_weighted(rng, |(_, w)| w.capacity)
            .map_err(|_| ResolveError::NoCapacity {
                service: key.to_string(),
            })?
            .clone();
        match workload.ip_for(svc, dst.ip()) {
            Some(ip) => Ok(Target::Address(Upstream {
                workload,
                address: SocketAddr::new(ip, target),
                service: Some(svc.clone()),
            })),
            None if !workload.hostname.is_empty() => Ok(Target::Hostname(Unresolved {
                workload,
                port: target,
                service: Some(svc.clone()),
                dialed: dst.ip(),
            })),
            None => Err(ResolveError::NoWorkloadIp {
                uid: workload.uid.clone(),
            }),
        }
    }
}
