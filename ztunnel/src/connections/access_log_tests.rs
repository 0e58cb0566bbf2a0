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

/// Runs `f` under a subscriber writing Istio's text or JSON lines (debug and up), and
/// returns what it wrote.
fn logged(json: bool, f: impl FnOnce()) -> String {
    use crate::logging::format;
    let out = Captured::default();
    let writer = out.clone();
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone());
    if json {
        let s = builder
            .event_format(format::IstioJson)
            .fmt_fields(format::json_fields())
            .finish();
        tracing::subscriber::with_default(s, f);
    } else {
        let s = builder
            .event_format(format::IstioText)
            .fmt_fields(format::IstioText)
            .finish();
        tracing::subscriber::with_default(s, f);
    }
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    text
}

/// An HBONE connection between two known workloads, opened and completed.
fn a_mesh_connection() {
    let tracker = ConnectionTracker::new(Arc::new(crate::metrics::Metrics::new()));
    let mut conn = tracker.accept(
        Direction::Outbound,
        "10.0.0.1:40000".parse().unwrap(),
        Some("10.0.0.2:80".parse().unwrap()),
    );
    let info = ConnectionInfo {
        direction: Direction::Outbound,
        src: "10.0.0.1:40000".parse().unwrap(),
        dst: "10.0.0.2:80".parse().unwrap(),
        target: "10.0.0.2:80".parse().unwrap(),
        src_workload: Some(crate::metrics::label("default/sleep-1")),
        src_identity: Some(crate::metrics::label(
            "spiffe://cluster.local/ns/default/sa/sleep",
        )),
        dst_workload: Some(crate::metrics::label("default/echo-1")),
        dst_identity: Some(crate::metrics::label(
            "spiffe://cluster.local/ns/default/sa/echo",
        )),
        protocol: "HBONE",
        hbone: Some(super::Hbone {
            tunnel: "10.0.0.2:15008".parse().unwrap(),
            authority: "10.0.0.2:80".parse().unwrap(),
        }),
    };
    let l = crate::metrics::label;
    let labels = TcpLabels {
        source_workload_namespace: l("default"),
        source_cluster: l("Kubernetes"),
        destination_workload_namespace: l("default"),
        destination_cluster: l("Kubernetes"),
        destination_service: l("echo.default.svc.cluster.local"),
        ..TcpLabels::unknown(Direction::Outbound)
    };
    conn.identify(info, labels, None);
    conn.add_sent(5);
    conn.finish(Outcome::Ok);
}

/// Upstream's fields of both events, in both formats.
const ENDS: [&str; 13] = [
    "src.addr",
    "src.workload",
    "src.namespace",
    "src.identity",
    "src.cluster",
    "dst.addr",
    "dst.hbone_addr",
    "dst.service",
    "dst.workload",
    "dst.namespace",
    "dst.identity",
    "dst.cluster",
    "direction",
];

#[test]
fn json_lines_carry_istios_fields() {
    let text = logged(true, a_mesh_connection);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let (opened, complete) = (&lines[0], &lines[1]);
    assert_eq!(opened["message"], "connection opened", "{opened}");
    assert_eq!(opened["level"], "debug");
    assert_eq!(opened["scope"], "access");
    assert!(opened["time"].is_string());
    assert_eq!(complete["message"], "connection complete", "{complete}");
    assert_eq!(complete["level"], "info");
    for line in [opened, complete] {
        for name in ENDS {
            assert!(line[name].is_string(), "{name} missing: {line}");
        }
        assert_eq!(line["src.workload"], "sleep-1", "{line}");
        assert_eq!(line["src.namespace"], "default");
        assert_eq!(
            line["src.identity"],
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(line["src.cluster"], "Kubernetes");
        // Upstream's pair: the tunnel's address, and the CONNECT's.
        assert_eq!(line["dst.addr"], "10.0.0.2:15008");
        assert_eq!(line["dst.hbone_addr"], "10.0.0.2:80");
        assert_eq!(line["dst.service"], "echo.default.svc.cluster.local");
        assert_eq!(line["direction"], "outbound");
    }
    // Numbers stay numbers; the duration is a string in milliseconds.
    assert_eq!(complete["bytes_sent"], 5, "{complete}");
    assert_eq!(complete["bytes_recv"], 0);
    assert!(complete["duration"]
        .as_str()
        .is_some_and(|d| d.ends_with("ms")));
    for ours in [
        "dst.target",
        "protocol",
        "outcome",
        "reason",
        "response_flags",
    ] {
        assert!(complete[ours].is_string(), "{ours} missing: {complete}");
    }
    assert!(complete.get("error").is_none());
}

#[test]
fn text_lines_are_istios() {
    let text = logged(false, a_mesh_connection);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    // time, level, scope, message, fields: tab-separated.
    let cols: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(cols.len(), 5, "{text}");
    assert!(cols[0].ends_with('Z'), "{text}");
    assert_eq!(&cols[1..4], ["debug", "access", "connection opened"]);
    let cols: Vec<&str> = lines[1].split('\t').collect();
    assert_eq!(&cols[1..4], ["info", "access", "connection complete"]);
    for (line, fields) in [(lines[0], cols_of(lines[0])), (lines[1], cols_of(lines[1]))] {
        for name in ENDS {
            assert!(
                fields.contains(&format!(" {name}=")),
                "{name} missing: {line}"
            );
        }
        // Strings quoted, addresses and numbers not.
        assert!(fields.contains(" src.addr=10.0.0.1:40000 "), "{line}");
        assert!(fields.contains(" src.workload=\"sleep-1\" "), "{line}");
        assert!(
            fields.contains(" src.identity=\"spiffe://cluster.local/ns/default/sa/sleep\" "),
            "{line}"
        );
        assert!(fields.contains(" direction=\"outbound\""), "{line}");
    }
    let complete = cols_of(lines[1]);
    assert!(
        complete.contains(" bytes_sent=5 bytes_recv=0 duration=\""),
        "{complete}"
    );
    assert!(complete.contains(" outcome=\"ok\""), "{complete}");
}

/// The fields column, with a space in front so every field starts with one.
fn cols_of(line: &str) -> String {
    format!(" {} ", line.splitn(5, '\t').nth(4).unwrap_or_default())
}

/// A refused attempt: upstream's error level and `error` field; what is unknown is left
/// out rather than written as a placeholder.
#[test]
fn a_refused_attempt_is_an_error_without_unknown_fields() {
    let text = logged(true, || {
        let tracker = ConnectionTracker::new(Arc::new(crate::metrics::Metrics::new()));
        tracker
            .accept(
                Direction::Outbound,
                "10.0.0.1:40000".parse().unwrap(),
                Some("10.0.0.2:80".parse().unwrap()),
            )
            .finish(Outcome::Denied(Reason::PolicyDenied("deny-all".into())));
    });
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["message"], "connection complete", "{line}");
    assert_eq!(line["level"], "error");
    assert_eq!(line["error"], "denied by policy: deny-all");
    assert_eq!(line["src.addr"], "10.0.0.1:40000");
    assert_eq!(line["dst.addr"], "10.0.0.2:80");
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["outcome"], "denied");
    assert_eq!(line["response_flags"], "DENY");
    for absent in [
        "src.workload",
        "src.identity",
        "dst.service",
        "dst.hbone_addr",
    ] {
        assert!(line.get(absent).is_none(), "{absent}: {line}");
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
