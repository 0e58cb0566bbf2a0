//! The DNS proxy (Istio's ztunnel's, on 15053): enrolled pods' questions about mesh
//! hostnames — Kubernetes services in every form the pods' search domains produce,
//! ServiceEntry hosts with their (auto-allocated) VIPs, wildcard hosts — are answered here,
//! as the asking pod may see them (`visibility`); everything else goes to the node's
//! resolvers.
//!
//! Built so far: the proxy itself (`names`, `table`, `answer`, `forward`, `server`,
//! `metrics`), on `--dns-proxy-addr`, and enrolled pods' DNS over TCP, which the ordinary
//! TCP capture brings to the outbound listener (handed here by port 53). Not yet: their
//! DNS over UDP (steering it in the eBPF program, with a transparent reply source), and
//! resolving hostname-only workloads at connect time.

mod answer;
mod forward;
pub mod metrics;
mod names;
mod server;
mod table;

pub use answer::{decide, Reply, MESH_TTL};
pub use forward::Upstreams;
pub use server::DnsProxy;
pub use table::{entries, lookup, Entry, Lookup};

#[cfg(test)]
mod tests;
