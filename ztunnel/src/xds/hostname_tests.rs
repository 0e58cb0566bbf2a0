//! Workloads known by hostname only (a ServiceEntry with `resolution: DNS`): no address,
//! a `hostname`. Valid from the local file and over xDS alike, shown in `/config_dump`,
//! and picked as a service's endpoint to be looked up at connect time.

use crate::admin::config_dump::WorkloadDump;
use crate::state::{StateStore, Target};
use crate::xds::convert::{workload_from_proto, workload_to_proto};
use crate::xds::LocalConfig;

/// Upstream's shape for a ServiceEntry `api.example.com` (resolution DNS, endpoint by
/// name) and its auto-allocated VIP.
const SERVICE_ENTRY: &str = r#"
workloads:
- uid: Kubernetes/networking.istio.io/ServiceEntry/default/api/api.example.com
  name: api
  namespace: default
  hostname: api.example.com
  protocol: TCP
  services:
    default/api.example.com: {443: 443}
services:
- name: api
  namespace: default
  hostname: api.example.com
  vips: ["/240.240.0.1"]
  ports: {443: 443}
"#;

#[test]
fn a_hostname_only_workload_loads_and_is_an_endpoint_to_look_up() {
    let cfg = LocalConfig::from_yaml(SERVICE_ENTRY).unwrap();
    let store = StateStore::default();
    cfg.apply_to(&store);
    let snap = store.snapshot();
    let w = snap
        .workload_by_uid("Kubernetes/networking.istio.io/ServiceEntry/default/api/api.example.com")
        .unwrap();
    assert!(w.workload_ips.is_empty());
    assert_eq!(w.hostname, "api.example.com");
    match snap.resolve_from(None, "240.240.0.1:443".parse().unwrap()) {
        Ok(Some(Target::Hostname(endpoint))) => {
            assert_eq!(endpoint.hostname(), "api.example.com");
            assert_eq!(endpoint.port, 443);
        }
        other => panic!("{other:?}"),
    }
    // In /config_dump: the hostname, and no address.
    let dump = serde_json::to_value(WorkloadDump::new(&w)).unwrap();
    assert_eq!(dump["hostname"], "api.example.com");
    assert_eq!(dump["workloadIps"], serde_json::json!([]));
}

#[test]
fn a_hostname_only_workload_round_trips_over_xds() {
    let cfg = LocalConfig::from_yaml(SERVICE_ENTRY).unwrap();
    let w = &cfg.workloads[0];
    let proto = workload_to_proto(w);
    assert!(proto.addresses.is_empty());
    assert_eq!(proto.hostname, "api.example.com");
    let back = workload_from_proto(&proto).unwrap();
    assert_eq!(back.hostname, w.hostname);
    assert!(back.workload_ips.is_empty());
    assert_eq!(back.services, w.services);
}

#[test]
fn a_hostname_no_lookup_could_answer_is_refused_where_it_comes_from() {
    let bad = SERVICE_ENTRY.replace(
        "hostname: api.example.com\n  protocol",
        "hostname: \"api example\"\n  protocol",
    );
    let e = LocalConfig::from_yaml(&bad).unwrap_err().to_string();
    assert!(e.contains("workloads[0].hostname"), "{e}");
    assert!(e.contains("not a hostname that can be looked up"), "{e}");

    let cfg = LocalConfig::from_yaml(SERVICE_ENTRY).unwrap();
    let mut proto = workload_to_proto(&cfg.workloads[0]);
    proto.hostname = "*.example.com".into();
    let e = workload_from_proto(&proto).unwrap_err().to_string();
    assert!(e.starts_with("hostname: "), "{e}");
}
