//! ztunnel: an eBPF-native, per-node service-mesh data plane.
//!
//! The data path, in the order a connection meets it:
//! `capture` (eBPF steers a pod's TCP into us) → `proxy::outbound` (accept, identify) →
//! policy → pool → HBONE → `proxy::inbound` (on the destination node) → deliver.

pub mod admin;
pub mod app;
pub mod capture;
pub mod config;
pub mod connections;
pub mod controlplane;
pub mod debug_cli;
pub mod dns;
pub mod drain;
pub mod enroll;
pub mod handover;
pub mod hbone;
#[cfg(feature = "heap-profiling")]
mod heap_alloc;
pub mod identity;
pub mod k8s;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod proto;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod xds;
