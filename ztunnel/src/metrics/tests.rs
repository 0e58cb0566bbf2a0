//! The exposition's names and labels, as Istio's tools query them.

use super::*;

#[test]
fn istio_names_and_labels() {
    let m = Metrics::new();
    let l = TcpLabels {
        reporter: label("source"),
        source_workload: label("sleep"),
        ..TcpLabels::unknown(crate::connections::Direction::Outbound)
    };
    m.tcp_opened.get_or_create(&l).inc();
    m.tcp_sent.get_or_create(&l).inc_by(42);
    let text = m.encode();
    assert!(
        text.contains("istio_tcp_connections_opened_total{"),
        "{text}"
    );
    assert!(text.contains("reporter=\"source\""));
    assert!(text.contains("source_workload=\"sleep\""));
    assert!(text.contains("istio_tcp_sent_bytes_total{") && text.contains("} 42"));
}

/// What Istio's dashboards and `istioctl` read beside the traffic metrics: the build
/// gauge and the process's own figures.
#[test]
fn build_and_process_metrics() {
    let text = Metrics::new().encode();
    assert!(
        text.contains(&format!(
            "istio_build{{component=\"ztunnel\",tag=\"{}\"}} 1",
            crate::config::istio_names::istio_version()
        )),
        "{text}"
    );
    for name in [
        "process_open_fds ",
        "process_max_fds ",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_virtual_memory_bytes ",
        "process_start_time_seconds ",
    ] {
        assert!(text.contains(&format!("\n{name}")), "{name}: {text}");
    }
}

#[test]
fn pool_and_ca_metrics_are_the_registered_ones() {
    let m = Metrics::new();
    let pool = m.pool();
    pool.opened.inc();
    pool.active.inc();
    m.ca_requests
        .get_or_create(&ResultLabels {
            result: "ok".into(),
        })
        .inc();
    let text = m.encode();
    assert!(
        text.contains("ztunnel_pool_connections_opened_total 1"),
        "{text}"
    );
    assert!(text.contains("ztunnel_pool_connections_active 1"), "{text}");
    assert!(
        text.contains("ztunnel_ca_requests_total{result=\"ok\"} 1"),
        "{text}"
    );
}

/// Upstream's families beside ours, under upstream's names and label sets.
#[test]
fn upstream_families_are_exposed_with_upstreams_labels() {
    let m = Metrics::new();
    m.xds.terminated(xds::Termination::Reconnect);
    m.xds
        .received("type.googleapis.com/istio.workload.Address", 12);
    m.sockets_open
        .get_or_create(&SocketLabels {
            reporter: KNOWN.destination.clone(),
        })
        .inc();
    let mut status = crate::enroll::EnrollmentStatus::default();
    (status.started, status.stopped) = (3, 1);
    m.set_enrollment(&status, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    m.runtimes.add(rt.metrics());
    let text = m.encode();
    for line in [
        "istio_xds_connection_terminations_total{reason=\"Reconnect\"} 1",
        "istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"} 1",
        "istio_xds_message_bytes_total{url=\"type.googleapis.com/istio.workload.Address\"} 12",
        "istio_tcp_sockets_open{reporter=\"destination\"} 1",
        "workload_manager_active_proxy_count 0",
        "workload_manager_pending_proxy_count 0",
        "workload_manager_proxies_started_total 3",
        "workload_manager_proxies_stopped_total 1",
        "tokio_num_workers 1",
        "tokio_num_alive_tasks 0",
        "tokio_global_queue_depth 0",
        "tokio_worker_park_count_total{worker=\"0\"} ",
        "tokio_worker_park_unpark_count_total{worker=\"0\"} ",
        "tokio_worker_total_busy_duration_seconds_total{worker=\"0\"} ",
    ] {
        assert!(text.contains(&format!("\n{line}")), "{line}: {text}");
    }
    // A later scrape copies only what the totals grew by.
    status.started = 4;
    m.set_enrollment(&status, 0);
    assert_eq!(m.workload_manager.started.get(), 4);
}
