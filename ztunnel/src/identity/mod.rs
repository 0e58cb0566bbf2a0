//! Workload identities (SPIFFE) and, as the node's Citadel Agent, their certificates.

pub mod ca;
pub mod ca_client;
pub mod cert;
pub mod csr;
pub mod manager;
pub mod roots;
pub mod spiffe;

pub use ca_client::GrpcCaClient;
pub use cert::WorkloadCertificate;
pub use manager::{CaClient, SecretManager};
pub use spiffe::Identity;

#[cfg(test)]
mod ca_corpus_tests;
