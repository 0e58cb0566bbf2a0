//! The DNS proxy (Istio's ztunnel's, on 15053): enrolled pods' questions about mesh
//! hostnames — Kubernetes services in every form the pods' search domains produce,
//! ServiceEntry hosts with their (auto-allocated) VIPs, wildcard hosts — are answered here,
//! as the asking pod may see them (`visibility`); everything else goes to the node's
//! resolvers.
//!
//! The proxy itself is `names`, `table`, `answer`, `forward`, `server` and `metrics`, on
//! `--dns-proxy-addr`. Enrolled pods reach it without being told: their DNS over UDP is
//! assigned by the capture program to a transparent socket on the proxy's port and
//! answered from the address they asked (`transparent`); their DNS over TCP is a TCP
//! connection like any other, which the capture brings to the outbound listener and that
//! hands here by port 53.
//! Apart from the proxy, `on_demand` looks up endpoints known by hostname only, when a
//! connection to one is made.

mod answer;
mod forward;
pub mod metrics;
mod names;
mod on_demand;
mod server;
mod table;
pub mod transparent;

pub use answer::{decide, Reply, MESH_TTL};
pub use forward::Upstreams;
pub use on_demand::{OnDemand, ResolverSettings, LOOKUP_TIMEOUT};
pub use server::{DnsProxy, UdpRole};
pub use table::{entries, lookup, Entry, Lookup};

#[cfg(test)]
mod tests;
