//! Istio ztunnel's `workload_manager_*` family (no `istio_` prefix, no labels), mapped
//! onto enrollment.
//!
//! Upstream runs one in-pod proxy per workload of the node: "active" proxies serve a pod,
//! "pending" ones could not be started yet and are retried, and every start and stop is
//! counted. Here the counterpart of an in-pod proxy is an *enrolled pod*: its addresses in
//! the capture program's map, on its interface. So:
//!
//! - `workload_manager_active_proxy_count`: pods enrolled now;
//! - `workload_manager_pending_proxy_count`: pods this node should capture but cannot yet
//!   (held, their traffic dropped; the same figure as `ztunnel_workloads_not_enrolled`);
//! - `workload_manager_proxies_started_total`: enrollments made (a new pod, or one that
//!   came back on another interface);
//! - `workload_manager_proxies_stopped_total`: enrollments ended (the pod left the node or
//!   the mesh, became pending, or moved to another interface).
//!
//! The counts come from the enroller's own running totals, copied at scrape time.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Default)]
pub struct WorkloadManagerMetrics {
    pub active: Gauge,
    pub pending: Gauge,
    pub started: Counter,
    pub stopped: Counter,
}

impl WorkloadManagerMetrics {
    /// Registers on `registry`, the one with the `workload_manager` prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "active_proxy_count",
            "Pods enrolled now (ztunnel's counterpart of an active in-pod proxy)",
            self.active.clone(),
        );
        registry.register(
            "pending_proxy_count",
            "Pods this node should capture but has not enrolled yet (held; retried)",
            self.pending.clone(),
        );
        registry.register(
            "proxies_started",
            "Enrollments made (a pod enrolled, or enrolled again on another interface)",
            self.started.clone(),
        );
        registry.register(
            "proxies_stopped",
            "Enrollments ended (the pod left, became pending or moved interface)",
            self.stopped.clone(),
        );
    }

    /// Copies the enroller's figures: the gauges as they are, the running totals by
    /// what they grew since the last scrape (counters only go up).
    pub fn set(&self, active: usize, pending: usize, started: u64, stopped: u64) {
        self.active.set(active as i64);
        self.pending.set(pending as i64);
        for (c, total) in [(&self.started, started), (&self.stopped, stopped)] {
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
    }
}
