//! Our `/config_dump` has every key of Istio's ztunnel's, at the same paths with the same
//! value types, for the side-by-side workload file: checked against upstream's recorded
//! shape (`tests/fixtures/istio-config_dump.shape`, written by `cargo xtask
//! istio-compare`), so every run keeps it without upstream's binary. The differences
//! allowed are those of the exceptions table (`ztunnel_tests::compare::exceptions`).

use std::time::Duration;

use ztunnel_tests::compare::exceptions::TABLE;
use ztunnel_tests::compare::json_shape::{diff, from_text, shape};
use ztunnel_tests::compare::report::{explain, from_shape_diff};
use ztunnel_tests::compare::DATA_KEYED;
use ztunnel_tests::http::{self, ADMIN};
use ztunnel_tests::side_by_side::{workload_file, UPSTREAM_CONFIG_DUMP_SHAPE};
use ztunnel_tests::{require_root, Testbed};

#[test]
fn config_dump_has_upstreams_keys_and_types() {
    require_root!();
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let config = tb
        .write_config("workloads.yaml", &workload_file(&client, &server))
        .unwrap();
    let z = tb.start_ztunnel(&a, &config, &[]).unwrap();
    z.wait_ready(Duration::from_secs(30)).unwrap();
    let (status, body) = http::get(&a.netns, ADMIN, "/config_dump").unwrap();
    assert_eq!(status, 200, "{body}");
    let ours = shape(&serde_json::from_str(&body).unwrap(), DATA_KEYED);
    let theirs = from_text(UPSTREAM_CONFIG_DUMP_SHAPE).unwrap();
    assert!(
        theirs.contains_key("workloads[].uid"),
        "the fixture is a recorded shape"
    );
    let findings = from_shape_diff("config_dump", &diff(&theirs, &ours));
    let unexplained: Vec<_> = findings
        .iter()
        .filter(|f| explain(f, TABLE).is_none())
        .collect();
    assert!(unexplained.is_empty(), "{unexplained:#?}\n{body}");
}
