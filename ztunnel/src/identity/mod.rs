//! Workload identities (SPIFFE) and, as the node's Citadel Agent, their certificates.

pub mod ca;
pub mod cert;
pub mod csr;
pub mod manager;
pub mod spiffe;

pub use cert::WorkloadCertificate;
pub use manager::{CaClient, SecretManager};
pub use spiffe::Identity;
