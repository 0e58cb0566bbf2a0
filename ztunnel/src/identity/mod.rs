//! Workload identities (SPIFFE) and, as the node's Citadel Agent, their certificates.

pub mod spiffe;

pub use spiffe::Identity;
