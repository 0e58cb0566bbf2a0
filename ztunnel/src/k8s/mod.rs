//! Kubernetes mode: which pods of this node are enrolled, decided from the API server.
//!
//! [`KubeSource`] watches all namespaces and the pods scheduled to this node
//! (`spec.nodeName`), and offers the pods that should be captured to the
//! [`Enroller`](crate::enroll::Enroller) as its [`WorkloadSource`](crate::enroll::WorkloadSource).
//! The rule ([`select`]) is Istio's: namespace (or pod) label
//! `istio.io/dataplane-mode=ambient`, pod opt-out `istio.io/dataplane-mode=none`, Running
//! with an address, not host-network, no injected sidecar. Enrolled pods carry the
//! annotation `ambient.istio.io/redirection: enabled` ([`annotate`]), which istiod reads
//! to tell other proxies that the pod speaks HBONE.
//!
//! Watch errors never leave stale state: kube's watcher re-lists after `410 Gone` and
//! the mirrors ([`mirror`]) swap in a re-list atomically, dropping pods deleted while the
//! watch was down.

pub mod annotate;
pub mod mirror;
pub mod select;
pub mod source;

pub use source::{KubeOptions, KubeSource};

/// Namespace or pod label choosing the data plane (Istio's).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Pod-level opt-out in an ambient namespace.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Set on pods whose traffic is captured, removed when they are released (Istio's).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
pub const REDIRECTION_ENABLED: &str = "enabled";
/// Set by Istio's injector on pods that run a sidecar: those are never captured.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// istiod's CA and xDS endpoint (upstream ztunnel's default in Kubernetes).
pub const ISTIOD_ADDRESS: &str = "https://istiod.istio-system.svc:15012";
/// Projected service-account token with audience `istio-ca` (upstream's path).
pub const ISTIO_TOKEN_PATH: &str = "/var/run/secrets/tokens/istio-token";
/// Istio's root certificate, from ConfigMap `istio-ca-root-cert` (upstream's path).
pub const ISTIO_ROOT_CERT_PATH: &str = "/var/run/secrets/istio/root-cert.pem";

/// A client for the API server: in-cluster (service account) when
/// `KUBERNETES_SERVICE_HOST` is set, else `KUBECONFIG` / `~/.kube/config`.
pub async fn client() -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer().await?;
    Ok(kube::Client::try_from(config)?)
}

/// Whether we run in a pod (the environment every pod gets).
pub fn in_cluster() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

#[cfg(test)]
mod tests;
