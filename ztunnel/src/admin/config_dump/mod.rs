//! `/config_dump` in Istio's ztunnel's shape, so that `istioctl ztunnel-config` and
//! anything else written against upstream reads it: every key upstream writes, at the
//! same path, with the same value type (`cargo xtask istio-compare` checks this against
//! upstream's binary). Our own keys (`enrolled`, `pendingEnrollment`, `xds`, `dns`) sit
//! beside them.

pub mod config;
mod dns;
mod policy;
mod service;
mod static_config;
pub use static_config::LocalSource;
mod version;
mod workload;
#[cfg(test)]
pub(crate) use workload::WorkloadDump;
mod workload_state;

use serde_json::{json, Value};

use super::AdminState;

pub async fn config_dump(s: &AdminState) -> Value {
    let state = s.store.snapshot();
    let mut workloads: Vec<_> = state.workloads().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<_> = state.services().collect();
    services.sort_by_key(|s| s.key());
    let mut policies: Vec<_> = state.policies.iter().collect();
    policies.sort_by_key(|p| p.key());
    let enrollment = s.enroller.status();
    json!({
        "workloads": workloads.iter().map(|w| workload::WorkloadDump::new(w)).collect::<Vec<_>>(),
        "services": services
            .iter()
            .map(|svc| service::ServiceDump::new(svc, Some(&state)))
            .collect::<Vec<_>>(),
        "policies": policies.iter().map(|p| policy::PolicyDump::new(p)).collect::<Vec<_>>(),
        "stagedServices": service::staged_services(&state),
        "staticConfig": static_config::static_config(s.local_config.as_ref()),
        "version": version::build_info(),
        "config": s.config,
        "certificates": super::cert_dump::certificates(&s.certs),
        "workloadState": workload_state::workload_state(
            &enrollment,
            &state,
            &s.connections.list(),
        ),
        // Ours: which pods this node captures, which it holds and why, the xDS stream,
        // the names the DNS proxy answers.
        "enrolled": enrollment.enrolled,
        "dns": crate::dns::entries(&state),
        "pendingEnrollment": enrollment.pending,
        "xds": s.xds.as_ref().map(|x| x.borrow().clone()),
    })
}
