//! The DNS proxy (Istio's ztunnel's, on 15053): enrolled pods' questions about mesh
//! hostnames — Kubernetes services in every form the pods' search domains produce,
//! ServiceEntry hosts with their (auto-allocated) VIPs, wildcard hosts — are answered here,
//! as the asking pod may see them (`visibility`); everything else goes to the node's
//! resolvers.
//!
//! Built so far: the proxy itself (`names`, `table`, `answer`, `forward`, `server`,
//! `metrics`), on `--dns-proxy-addr`, and enrolled pods' DNS over TCP, which the ordinary
//! TCP capture brings to the outbound listener (handed here by port 53); and, apart from
//! the proxy, looking up endpoints known by hostname only when a connection to one is made
//! (`on_demand`). Not yet: enrolled pods' DNS over UDP (steering it in the eBPF program,
//! with a transparent reply source).

mod answer;
mod forward;
pub mod metrics;
mod names;
mod on_demand;
mod server;
mod table;

pub use answer::{decide, Reply, MESH_TTL};
pub use forward::Upstreams;
pub use on_demand::{OnDemand, ResolverSettings, LOOKUP_TIMEOUT};
pub use server::DnsProxy;
pub use table::{entries, lookup, Entry, Lookup};

#[cfg(test)]
mod tests;
