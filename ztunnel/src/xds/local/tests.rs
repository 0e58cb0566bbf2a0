use std::net::SocketAddr;

use super::*;
use crate::policy::{Action, Connection, Scope, StringMatch};
use crate::state::{HealthStatus, Protocol};

/// Upstream's example file, as of its older single-IP, bare-list form.
const UPSTREAM_LOCALHOST: &str = "\
# This shows an example local config for ztunnel that adds a workload for localhost.
- name: local
  namespace: default
  serviceAccount: default
  workloadIp: \"127.0.0.1\"
  protocol: HBONE
  node: local
# Another local address, but this one uses TCP.
- name: local-tcp
  namespace: default
  serviceAccount: default
  workloadIp: \"127.0.0.2\"
  protocol: TCP
  node: local
";

const FULL: &str = r#"
workloads:
- uid: cluster1//Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.0.1.5"]
  protocol: HBONE
  node: node-a
- uid: cluster1//Pod/default/echo-1
  name: echo-1
  namespace: default
  serviceAccount: echo
  trustDomain: example.org
  workloadIps: ["10.0.2.7", "fd00::7"]
  protocol: HBONE
  node: node-b
  status: Healthy
  canonicalName: echo
  services:
    "default/echo.default.svc.cluster.local":
      80: 8080
  authorizationPolicies: [default/allow-sleep]
- uid: cluster1//Pod/default/echo-2
  name: echo-2
  namespace: default
  workloadIps: ["10.0.2.8"]
  protocol: HBONE
  node: node-b
  status: Unhealthy
  services:
    default/echo.default.svc.cluster.local: {80: 8080}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.96.0.10"]
  ports:
    80: 8080
policies:
- name: allow-sleep
  namespace: default
  scope: WorkloadSelector
  action: Allow
  rules:
  - - - principals:
        - Exact: cluster.local/ns/default/sa/sleep
- name: deny-admin
  namespace: istio-system
  scope: Global
  action: Deny
  rules:
  - - - destinationPorts: [15000]
  dryRun: false
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn parses_upstream_legacy_example() {
    let cfg = LocalConfig::from_yaml(UPSTREAM_LOCALHOST).unwrap();
    assert_eq!(cfg.workloads.len(), 2);
    let w = &cfg.workloads[0];
    assert_eq!(w.uid, "Kubernetes//Pod/default/local");
    assert_eq!(w.workload_ips, vec![ip("127.0.0.1")]);
    assert_eq!(w.protocol, Protocol::HBONE);
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(cfg.workloads[1].protocol, Protocol::TCP);
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
}

#[test]
fn parses_full_format() {
    let cfg = LocalConfig::from_yaml(FULL).unwrap();
    assert_eq!(
        (cfg.workloads.len(), cfg.services.len(), cfg.policies.len()),
        (3, 1, 2)
    );
    let echo = &cfg.workloads[1];
    assert_eq!(
        echo.identity().to_string(),
        "spiffe://example.org/ns/default/sa/echo"
    );
    assert_eq!(echo.workload_ips, vec![ip("10.0.2.7"), ip("fd00::7")]);
    let key = NamespacedHostname::new("default", "echo.default.svc.cluster.local");
    assert_eq!(echo.services[&key].get(&80), Some(&8080));
    assert_eq!(echo.authorization_policies, ["default/allow-sleep"]);
    assert_eq!(cfg.workloads[2].status, HealthStatus::Unhealthy);
    // Defaults: service account, trust domain, protocol-less workloads are TCP.
    assert_eq!(cfg.workloads[2].service_account, "default");
    assert_eq!(cfg.workloads[0].trust_domain, "cluster.local");

    let svc = &cfg.services[0];
    assert_eq!(svc.vips, vec![NetworkAddress::new("", ip("10.96.0.10"))]);
    assert_eq!(svc.ports.get(&80), Some(&8080));

    let p = &cfg.policies[0];
    assert_eq!(
        (p.scope, p.action),
        (Scope::WorkloadSelector, Action::Allow)
    );
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(
        m.principals,
        vec![StringMatch::Exact(
            "cluster.local/ns/default/sa/sleep".into()
        )]
    );
    assert_eq!(cfg.policies[1].scope, Scope::Global);
}

#[test]
fn applies_to_the_state_end_to_end() {
    let cfg = LocalConfig::from_yaml(FULL).unwrap();
    let store = StateStore::default();
    cfg.apply_to(&store);
    let snap = store.snapshot();
    // The VIP goes to the only healthy endpoint, on its target port.
    let up = snap
        .resolve("10.96.0.10:80".parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(up.address, "10.0.2.7:8080".parse::<SocketAddr>().unwrap());
    // Policy: only sleep may reach echo-1, and never on 15000.
    let sleep = snap.workload_by_ip(ip("10.0.1.5")).unwrap();
    let ok = Connection::new(Some(sleep.identity()), ip("10.0.1.5"), ip("10.0.2.7"), 8080);
    assert!(snap.policies.evaluate(&ok, &up.workload).allowed);
    let admin = Connection {
        dst_port: 15000,
        ..ok.clone()
    };
    assert!(!snap.policies.evaluate(&admin, &up.workload).allowed);
    let stranger = Connection {
        src_identity: None,
        ..ok
    };
    assert!(!snap.policies.evaluate(&stranger, &up.workload).allowed);
    assert_eq!(snap.workloads_on_node("node-b").len(), 2);
}

/// `serviceAccounts` in the workload file, as upstream's local config writes them: a DENY
/// on one service account refuses it and no other.
#[test]
fn service_account_rules_load_and_apply() {
    // deny-admin gains a second rule: `sleep`, on any port.
    let yaml = FULL.replace(
        "  - - - destinationPorts: [15000]\n",
        "  - - - destinationPorts: [15000]\n  - - - serviceAccounts: [{namespace: default, serviceAccount: sleep}]\n",
    );
    let cfg = LocalConfig::from_yaml(&yaml).unwrap();
    let store = StateStore::default();
    cfg.apply_to(&store);
    let snap = store.snapshot();
    let echo = snap.workload_by_ip(ip("10.0.2.7")).unwrap();
    let sleep = snap.workload_by_ip(ip("10.0.1.5")).unwrap();
    let from = |id| Connection::new(Some(id), ip("10.0.1.5"), ip("10.0.2.7"), 8080);
    let d = snap.policies.evaluate(&from(sleep.identity()), &echo);
    assert!(!d.allowed, "{d}");
    assert_eq!(d.policy.as_deref(), Some("istio-system/deny-admin"));
    // Another service account of the same namespace is not denied by it (only by the
    // ALLOW that admits sleep alone).
    let other = crate::identity::Identity::new("cluster.local", "default", "echo");
    let d = snap.policies.evaluate(&from(other), &echo);
    assert_ne!(d.policy.as_deref(), Some("istio-system/deny-admin"));
}

#[test]
fn empty_inputs() {
    for src in ["", "# nothing\n", "{}", "workloads: []\n"] {
        assert_eq!(
            LocalConfig::from_yaml(src).unwrap(),
            LocalConfig::default(),
            "{src:?}"
        );
    }
}

/// Each broken input must fail with the field named and the right line.
#[test]
fn errors_name_line_and_field() {
    let cases: &[(&str, usize, &str)] = &[
        // serde-level errors
        ("workloads:\n- name: a\n  namespace: default\n  workloadIps: [\"10.0.0.256\"]\n", 4, "workloads[0].workloadIps[0]"),
        ("workloads:\n- name: a\n  namespace: default\n  protocol: QUIC\n", 4, "workloads[0].protocol"),
        ("workloads:\n- name: a\n  namespace: default\n  protcol: HBONE\n", 4, "unknown field `protcol`"),
        ("workloads:\n- name: a\n  namespace: default\n  serviceAccount: a/b\n", 4, "workloads[0].serviceAccount"),
        ("workloads:\n- name: a\n  namespace: default\n  trustDomain: Cluster.Local\n", 4, "workloads[0].trustDomain"),
        ("workloads:\n- name: a\n  namespace: \"\"\n", 3, "workloads[0].namespace"),
        ("workloads:\n- name: a\n", 2, "missing field `namespace`"),
        ("workloads:\n- name: a\n  namespace: d\n  services:\n    echo: {80: 8080}\n", 5, "workloads[0].services"),
        ("workloads:\n- name: a\n  namespace: d\n  authorizationPolicies: [nope]\n", 4, "authorizationPolicies[0]"),
        ("workloads:\n- name: a\n  namespace: d\n  status: Dead\n", 4, "workloads[0].status"),
        ("services:\n- name: s\n  namespace: d\n  hostname: s.d\n  vips: [\"/10.0.0\"]\n", 5, "services[0].vips[0]"),
        ("services:\n- name: s\n  namespace: d\n  hostname: s.d\n  ports: {http: 80}\n", 5, "services[0].ports"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Global\n  action: Maybe\n", 5, "policies[0].action"),
        ("workload:\n- name: a\n", 1, "unknown field `workload`"),
        ("workloads:\n  - name: [a\n", 2, ""),
        // semantic errors found after parsing
        ("workloads:\n- {name: a, namespace: d, workloadIps: [10.0.0.1]}\n- uid: x\n  name: b\n  namespace: d\n  workloadIps:\n  - 10.0.0.2\n  - 10.0.0.1\n", 8, "workloads[1].workloadIps: address /10.0.0.1 is also used by workloads[0]"),
        ("workloads:\n- {uid: u1, name: a, namespace: d}\n- uid: u1\n  name: b\n  namespace: d\n", 3, "workloads[1].uid: duplicate uid \"u1\""),
        ("workloads:\n- namespace: d\n", 2, "workloads[0].uid: a workload needs a uid or a name"),
        ("services:\n- {name: s, namespace: d, hostname: h, vips: [10.0.0.1]}\n- name: t\n  namespace: d\n  hostname: h2\n  vips: [10.0.0.1]\n", 6, "services[1].vips: VIP /10.0.0.1 is also used by services[0]"),
        ("services:\n- {name: s, namespace: d, hostname: h}\n- name: s\n  namespace: d\n  hostname: h\n", 5, "services[1].hostname: service d/h is also defined"),
        ("services:\n- name: s\n  namespace: d\n  hostname: h\n  ports:\n    0: 80\n", 6, "services[0].ports: service port 0"),
        ("policies:\n- {name: p, namespace: d, scope: Global}\n- name: p\n  namespace: d\n  scope: Namespace\n", 3, "policies[1].name: policy d/p is also defined"),
        ("policies:\n- name: \"\"\n  namespace: d\n  scope: Global\n", 2, "policies[0].name"),
        ("- name: a\n  namespace: d\n  workloadIp: 10.0.0.1\n- name: b\n  namespace: d\n  workloadIp: 10.0.0.1\n", 6, "[1].workloadIps: address"),
    ];
    for (src, line, needle) in cases {
        let err = LocalConfig::from_yaml(src).expect_err(src);
        let msg = err.to_string();
        assert_eq!(err.line, Some(*line), "{src}\n=> {msg}");
        assert!(
            msg.contains(needle),
            "{src}\n=> {msg}\n(expected {needle:?})"
        );
        assert!(msg.contains(&format!("line {line}")), "{msg}");
    }
}

#[test]
fn upstream_load_balancing_fields_are_read() {
    let src = "\
workloads:
- name: a
  namespace: d
  waypoint: {destination: /10.0.0.9, hboneMtlsPort: 15008}
  locality: {region: r, zone: z}
  capacity: 2
  networkGateway: {destination: /10.0.0.1}
services:
- name: s
  namespace: d
  hostname: s.d
  subjectAltNames: [spiffe://cluster.local/ns/d/sa/s]
  loadBalancer: {routingPreferences: [Zone, Node], mode: Strict}
  cidrVips: [10.98.0.0/16]
";
    let cfg = LocalConfig::from_yaml(src).unwrap();
    // The network gateway is not supported; the waypoint names nothing the file defines.
    assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0].contains("networkGateway"));
    assert!(
        cfg.warnings[1]
            .contains("waypoint /10.0.0.9 is neither a known workload nor a known service"),
        "{:?}",
        cfg.warnings
    );
    let w = &cfg.workloads[0];
    assert_eq!(
        (w.locality.region.as_str(), w.locality.zone.as_str()),
        ("r", "z")
    );
    assert_eq!(w.capacity, 2);
    let lb = cfg.services[0].load_balancing.as_ref().unwrap();
    assert_eq!(lb.mode, crate::state::load_balancing::Mode::Strict);
    assert_eq!(lb.routing_preference.len(), 2);
    assert_eq!(cfg.services[0].cidr_vips[0].to_string(), "/10.98.0.0/16");
    // Absent: one each.
    assert_eq!(
        LocalConfig::from_yaml("- name: b\n  namespace: d\n")
            .unwrap()
            .workloads[0]
            .capacity,
        1
    );

    for (bad, needle) in [
        (
            "services:\n- {name: s, namespace: d, hostname: h, cidrVips: [10.0.0.1/8]}\n",
            "host bits",
        ),
        (
            "services:\n- {name: s, namespace: d, hostname: h, cidrVips: [{cidr: nope}]}\n",
            "not an address range",
        ),
        (
            "services:\n- {name: s, namespace: d, hostname: h, loadBalancer: {mode: Nearest}}\n",
            "Nearest",
        ),
        (
            "services:\n- {name: s, namespace: d, hostname: h, visibility: Private}\n",
            "Private",
        ),
    ] {
        let e = LocalConfig::from_yaml(bad).expect_err(bad).to_string();
        assert!(e.contains(needle) && e.contains("line"), "{bad} => {e}");
    }
}

#[test]
fn waypoints_by_address_or_hostname() {
    let src = "\
workloads:
- name: a
  namespace: d
  waypoint: {destination: 10.0.0.9}
- name: wp
  namespace: d
  workloadIps: [10.0.0.9]
  services: {d/wp.d: {}}
services:
- name: s
  namespace: d
  hostname: s.d
  waypoint: {destination: d/wp.d, hboneMtlsPort: 15009}
- name: wp
  namespace: d
  hostname: wp.d
";
    let cfg = LocalConfig::from_yaml(src).unwrap();
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    let w = cfg.workloads[0].waypoint.as_ref().unwrap();
    assert_eq!(w.to_string(), "/10.0.0.9 (HBONE port 15008)");
    let s = cfg.services[0].waypoint.as_ref().unwrap();
    assert_eq!(s.to_string(), "d/wp.d (HBONE port 15009)");
    // Shown in the config dump as upstream writes it.
    let json = serde_json::to_value(&cfg.services[0]).unwrap();
    assert_eq!(
        json["waypoint"],
        serde_json::json!({"destination": "d/wp.d", "hboneMtlsPort": 15009})
    );
    assert!(serde_json::to_value(&cfg.services[1])
        .unwrap()
        .get("waypoint")
        .is_none());

    let bad = "workloads:\n- name: a\n  namespace: d\n  waypoint: {destination: nowhere}\n";
    let err = LocalConfig::from_yaml(bad).unwrap_err().to_string();
    assert!(err.contains("neither an address"), "{err}");
    assert!(err.contains("line 4"), "{err}");
    let typo =
        "workloads:\n- name: a\n  namespace: d\n  waypoint: {destination: 10.0.0.9, port: 1}\n";
    let err = LocalConfig::from_yaml(typo).unwrap_err().to_string();
    assert!(err.contains("unknown field `port`"), "{err}");
}

#[test]
fn dangling_references_are_warnings() {
    let src = "workloads:\n- name: a\n  namespace: d\n  services: {d/missing: {80: 80}}\n  authorizationPolicies: [d/nope]\n";
    let cfg = LocalConfig::from_yaml(src).unwrap();
    assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
}

#[test]
fn load_names_the_file() {
    let dir = std::env::temp_dir().join(format!("ztunnel-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, FULL).unwrap();
    assert_eq!(LocalConfig::load(&good).unwrap().workloads.len(), 3);
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "workloads:\n- name: a\n  namespace: d\n  protocol: UDP\n",
    )
    .unwrap();
    let err = LocalConfig::load(&bad).unwrap_err();
    assert_eq!(err.file.as_deref(), Some(bad.as_path()));
    let msg = err.to_string();
    assert!(
        msg.contains("bad.yaml") && msg.contains("line 4") && msg.contains("protocol"),
        "{msg}"
    );
    let missing = LocalConfig::load(dir.join("absent.yaml")).unwrap_err();
    assert!(missing.to_string().contains("absent.yaml"), "{missing}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn never_panics_on_garbage() {
    let samples = [
        "\u{0}",
        "[",
        "]",
        "- - -",
        "workloads: 5",
        "workloads: [1, 2]",
        "{a: b",
        "*x",
        "workloads:\n- &a {name: a, namespace: d}\n- *a\n",
        "---\n---\n",
        "!Foo bar",
        "policies: [{name: p, namespace: d, scope: Global, rules: 7}]",
        "services: [{name: s, namespace: d, hostname: h, ports: {99999: 1}}]",
    ];
    for s in samples {
        let _ = LocalConfig::from_yaml(s);
    }
}
