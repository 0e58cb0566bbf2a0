//! The access log line's fields, as a log pipeline reads them: Istio's ztunnel's names
//! first, ours after.

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::*;

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_access_log_uses_istios_field_names() {
    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let tracker = ConnectionTracker::new(Arc::new(crate::metrics::Metrics::new()));
        tracker
            .accept(
                Direction::Outbound,
                "10.0.0.1:40000".parse().unwrap(),
                Some("10.0.0.2:80".parse().unwrap()),
            )
            .finish(Outcome::Aborted);
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let f = &line["fields"];
    assert_eq!(f["message"], "connection complete", "{line}");
    assert_eq!(f["src.addr"], "10.0.0.1:40000", "{line}");
    assert_eq!(f["dst.addr"], "10.0.0.2:80", "{line}");
    assert_eq!(f["direction"], "outbound", "{line}");
    assert_eq!(f["bytes_sent"], 0, "{line}");
    assert_eq!(f["bytes_recv"], 0, "{line}");
    assert!(
        f["duration"].as_str().is_some_and(|d| d.ends_with("ms")),
        "{line}"
    );
    for name in [
        "src.workload",
        "src.namespace",
        "src.identity",
        "dst.hbone_addr",
        "dst.service",
        "dst.workload",
        "dst.namespace",
        "dst.identity",
        "outcome",
        "reason",
        "response_flags",
    ] {
        assert!(f[name].is_string(), "{name} missing: {line}");
    }
}

/// Refused and failed attempts count in `istio_tcp_connections_failed`; a completed one
/// does not.
#[test]
fn failures_are_counted_as_istio_counts_them() {
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let tracker = ConnectionTracker::new(metrics.clone());
    let conn = |outcome: Outcome| {
        tracker
            .accept(
                Direction::Inbound,
                "10.0.0.1:40000".parse().unwrap(),
                Some("10.0.0.2:80".parse().unwrap()),
            )
            .finish(outcome)
    };
    conn(Outcome::Ok);
    conn(Outcome::Denied(Reason::PolicyDenied("deny-all".into())));
    conn(Outcome::Failed(Reason::Handshake("bad certificate".into())));
    let failed: u64 = metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_failed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(failed, 2);
}
