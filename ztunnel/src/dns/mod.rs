//! The DNS proxy (Istio's ztunnel's, on 15053): enrolled pods' questions about mesh
//! hostnames — Kubernetes services in every form the pods' search domains produce,
//! ServiceEntry hosts with their (auto-allocated) VIPs, wildcard hosts — are answered here,
//! as the asking pod may see them (`visibility`); everything else goes to the node's
//! resolvers.
//!
//! Built so far: the proxy itself (`names`, `table`, `answer`, `forward`, `server`,
//! `metrics`). Not yet: steering the pods' port-53 traffic to it in the eBPF program, and
//! resolving hostname-only workloads at connect time; until then it serves those who ask
//! it directly (`--dns-proxy-addr`).

mod answer;
mod forward;
pub mod metrics;
mod names;
mod server;
mod table;

pub use answer::{decide, Reply, MESH_TTL};
pub use forward::Upstreams;
pub use server::DnsProxy;
pub use table::{lookup, Lookup};

#[cfg(test)]
mod tests;
