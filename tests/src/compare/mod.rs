//! Side by side with Istio's ztunnel: the comparisons `cargo xtask istio-compare` makes
//! between the two proxies' outputs for the same workload file and traffic, and the table
//! of the differences that stay, each with its reason.
//!
//! Everything here is pure (documents in, findings out), so it is tested without either
//! proxy; `src/bin/istio_compare` runs the proxies and feeds it.

pub mod access_log;
pub mod exceptions;
pub mod json_shape;
pub mod prometheus;
pub mod report;

use report::Finding;

/// Maps in `/config_dump` whose keys are data (UIDs, service keys, ports, addresses):
/// their values' shapes are compared, not their keys.
pub const DATA_KEYED: &[&str] = &[
    "*.ports",
    "*.port",
    "*.endpoints",
    "stagedServices",
    "stagedServices.*",
    "workloadState",
    "staticConfig.workloads[].services",
    "staticConfig.workloads[].services.*",
    "config.proxyMetadata",
    "enrolled",
    "pendingEnrollment",
];

/// `/config_dump`: keys and value types.
pub fn config_dump(theirs: &serde_json::Value, ours: &serde_json::Value) -> Vec<Finding> {
    let d = json_shape::diff(
        &json_shape::shape(theirs, DATA_KEYED),
        &json_shape::shape(ours, DATA_KEYED),
    );
    report::from_shape_diff("config_dump", &d)
}

/// One kind of access-log line (`connection opened`, `connection complete`) in one
/// format; a kind one side never logged is one finding.
pub fn access_log(message: &str, json: bool, theirs: &str, ours: &str) -> Vec<Finding> {
    let area = format!(
        "access log: {message} ({})",
        if json { "json" } else { "text" }
    );
    let absent = |side| {
        vec![Finding {
            area: area.clone(),
            side,
            item: "(no such line)".into(),
            detail: String::new(),
        }]
    };
    if json {
        match (
            access_log::json_fields(theirs, message),
            access_log::json_fields(ours, message),
        ) {
            (Some(t), Some(o)) => report::from_shape_diff(&area, &json_shape::diff(&t, &o)),
            (Some(_), None) => absent(report::Side::Missing),
            (None, Some(_)) => absent(report::Side::Extra),
            (None, None) => vec![],
        }
    } else {
        match (
            access_log::text_fields(theirs, message),
            access_log::text_fields(ours, message),
        ) {
            (Some(t), Some(o)) => {
                let mut found = report::from_sets(&area, &t, &o);
                // The layout before the fields, as one item on each side when it differs.
                let layout =
                    |log| access_log::text_layout(log, message).map(|l| format!("(layout) {l}"));
                if let (Some(t), Some(o)) = (layout(theirs), layout(ours)) {
                    found.extend(report::from_sets(&area, &[t].into(), &[o].into()));
                }
                found
            }
            (Some(_), None) => absent(report::Side::Missing),
            (None, Some(_)) => absent(report::Side::Extra),
            (None, None) => vec![],
        }
    }
}

/// Metric names and label names.
pub fn metrics(theirs: &str, ours: &str) -> Vec<Finding> {
    report::from_metrics(&prometheus::families(theirs), &prometheus::families(ours))
}
