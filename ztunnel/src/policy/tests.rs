use std::net::SocketAddr;

use super::*;
use crate::state::Workload;

fn id(ns: &str, sa: &str) -> Option<Identity> {
    Some(Identity::new("cluster.local", ns, sa))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn conn(src: Option<Identity>, src_ip: &str, dst_port: u16) -> Connection {
    Connection::new(src, ip(src_ip), ip("10.0.0.2"), dst_port)
}

fn dst(ns: &str, selected: &[&str]) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{ns}/server"),
        name: "server".into(),
        namespace: ns.into(),
        workload_ips: vec![ip("10.0.0.2")],
        authorization_policies: selected.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Policies written in the local YAML syntax, so the tests also cover its parsing.
fn store(yaml: &str) -> PolicyStore {
    let policies: Vec<Authorization> = serde_yaml::from_str(yaml).unwrap();
    let mut s = PolicyStore::default();
    for p in policies {
        s.insert(p);
    }
    s
}

fn allowed(s: &PolicyStore, c: &Connection, w: &Workload) -> bool {
    s.evaluate(c, w).allowed
}

#[test]
fn no_policies_allows() {
    let d = PolicyStore::default().evaluate(&conn(None, "10.0.0.1", 80), &dst("default", &[]));
    assert_eq!(
        d,
        Decision {
            allowed: true,
            reason: Reason::NoPolicies,
            policy: None
        }
    );
}

#[test]
fn allow_policy_allows_match_and_denies_the_rest() {
    let s = store(
        "
- name: allow-sleep
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [cluster.local/ns/default/sa/sleep]
",
    );
    let w = dst("default", &[]);
    let d = s.evaluate(&conn(id("default", "sleep"), "10.0.0.1", 80), &w);
    assert_eq!(d.reason, Reason::AllowMatched);
    assert_eq!(d.policy.as_deref(), Some("default/allow-sleep"));
    let d = s.evaluate(&conn(id("default", "other"), "10.0.0.1", 80), &w);
    assert_eq!((d.allowed, d.reason), (false, Reason::NoAllowMatched));
    // Plaintext sources have no principal.
    assert!(!allowed(&s, &conn(None, "10.0.0.1", 80), &w));
    // Another namespace's workload is not covered by a NAMESPACE policy.
    assert!(allowed(&s, &conn(None, "10.0.0.1", 80), &dst("other", &[])));
}

#[test]
fn deny_wins_over_allow() {
    let s = store(
        "
- name: allow-all
  namespace: default
  scope: Namespace
  rules: [[]]
- name: deny-port
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - destinationPorts: [9090]
",
    );
    let w = dst("default", &[]);
    assert!(allowed(&s, &conn(None, "10.0.0.1", 80), &w));
    let d = s.evaluate(&conn(id("default", "sleep"), "10.0.0.1", 9090), &w);
    assert_eq!((d.allowed, d.reason), (false, Reason::DenyMatched));
    assert_eq!(d.policy.as_deref(), Some("default/deny-port"));
}

#[test]
fn deny_only_policies_allow_what_they_do_not_match() {
    let s = store(
        "
- name: deny-ns
  namespace: default
  scope: Namespace
  action: DENY
  rules:
  - - - namespaces: [evil]
",
    );
    let w = dst("default", &[]);
    let d = s.evaluate(&conn(id("good", "a"), "10.0.0.1", 80), &w);
    assert_eq!((d.allowed, d.reason), (true, Reason::NoDenyMatched));
    assert!(!allowed(&s, &conn(id("evil", "a"), "10.0.0.1", 80), &w));
}

#[test]
fn allow_without_rules_denies_everything() {
    let s = store("[{name: deny-all, namespace: default, scope: Namespace, action: Allow}]");
    assert!(!allowed(
        &s,
        &conn(id("default", "sleep"), "10.0.0.1", 80),
        &dst("default", &[])
    ));
    // ...and a DENY without rules denies nothing.
    let s = store("[{name: nothing, namespace: default, scope: Namespace, action: Deny}]");
    assert!(allowed(
        &s,
        &conn(id("default", "sleep"), "10.0.0.1", 80),
        &dst("default", &[])
    ));
}

#[test]
fn not_forms() {
    let s = store(
        "
- name: p
  namespace: default
  scope: Namespace
  rules:
  - - - notPrincipals: [cluster.local/ns/default/sa/blocked]
        notSourceIps: [192.168.0.0/16]
        notDestinationPorts: [22]
        notNamespaces: [quarantine]
",
    );
    let w = dst("default", &[]);
    assert!(allowed(
        &s,
        &conn(id("default", "sleep"), "10.0.0.1", 80),
        &w
    ));
    assert!(!allowed(
        &s,
        &conn(id("default", "blocked"), "10.0.0.1", 80),
        &w
    ));
    assert!(!allowed(
        &s,
        &conn(id("default", "sleep"), "192.168.3.4", 80),
        &w
    ));
    assert!(!allowed(
        &s,
        &conn(id("default", "sleep"), "10.0.0.1", 22),
        &w
    ));
    assert!(!allowed(
        &s,
        &conn(id("quarantine", "x"), "10.0.0.1", 80),
        &w
    ));
    // Negative matchers let identity-less sources through.
    assert!(allowed(&s, &conn(None, "10.0.0.1", 80), &w));
}

#[test]
fn principal_wildcards_and_forms() {
    let cases = [
        ("'*'", Some(("default", "x")), true),
        ("'*'", None, false),
        ("'cluster.local/ns/default/*'", Some(("default", "x")), true),
        ("'cluster.local/ns/default/*'", Some(("other", "x")), false),
        ("'*/sa/sleep'", Some(("any", "sleep")), true),
        ("'*/sa/sleep'", Some(("any", "sleepy")), false),
        ("{Exact: cluster.local/ns/a/sa/b}", Some(("a", "b")), true),
        ("{Prefix: cluster.local/ns/a/}", Some(("a", "z")), true),
        ("{Suffix: /sa/b}", Some(("q", "b")), true),
        ("{Presence: {}}", Some(("q", "b")), true),
        // YAML's tags, as upstream's own files write string matches.
        ("!Exact cluster.local/ns/a/sa/b", Some(("a", "b")), true),
        ("!Exact cluster.local/ns/a/sa/b", Some(("a", "c")), false),
        ("!Prefix cluster.local/ns/a/", Some(("a", "z")), true),
        ("!Suffix /sa/b", Some(("q", "b")), true),
        ("!Presence []", Some(("q", "b")), true),
        ("!Presence []", None, false),
        // The scheme is tolerated in patterns, though Istio writes principals without it.
        ("spiffe://cluster.local/ns/a/sa/b", Some(("a", "b")), true),
        ("cluster.local/ns/a/sa/b", Some(("a", "c")), false),
    ];
    for (pattern, src, want) in cases {
        let yaml = format!(
            "[{{name: p, namespace: default, scope: Global, rules: [[[{{principals: [{pattern}]}}]]]}}]"
        );
        let s = store(&yaml);
        let c = conn(src.and_then(|(ns, sa)| id(ns, sa)), "10.0.0.1", 80);
        assert_eq!(
            allowed(&s, &c, &dst("default", &[])),
            want,
            "{pattern} vs {src:?}"
        );
    }
}

/// `serviceAccounts` / `notServiceAccounts` as Istio matches them: namespace and name
/// exactly, any trust domain, never a source without identity; alone, beside other fields
/// (AND-ed with them) and in DENY policies. Rows: action | match (`SA` is default/sleep) |
/// source identity (`trust-domain/namespace/sa`, `-` for none) | source IP:destination
/// port | verdict.
#[test]
fn service_accounts() {
    let rows = [
        // DENY using them.
        "Deny | serviceAccounts: [SA] | cluster.local/default/sleep | 10.0.0.1:80 | deny",
        "Deny | serviceAccounts: [SA] | cluster.local/default/other | 10.0.0.1:80 | allow",
        // The trust domain is not part of the match; the namespace is.
        "Deny | serviceAccounts: [SA] | td.example/default/sleep | 10.0.0.1:80 | deny",
        "Deny | serviceAccounts: [SA] | cluster.local/other/sleep | 10.0.0.1:80 | allow",
        "Deny | serviceAccounts: [SA] | - | 10.0.0.1:80 | allow",
        "Deny | notServiceAccounts: [SA] | cluster.local/default/sleep | 10.0.0.1:80 | allow",
        "Deny | notServiceAccounts: [SA] | cluster.local/default/other | 10.0.0.1:80 | deny",
        "Deny | notServiceAccounts: [SA] | - | 10.0.0.1:80 | deny",
        "Deny | serviceAccounts: [SA], destinationPorts: [22] | cluster.local/default/sleep | 10.0.0.1:22 | deny",
        "Deny | serviceAccounts: [SA], destinationPorts: [22] | cluster.local/default/sleep | 10.0.0.1:80 | allow",
        // ALLOW using them alone.
        "Allow | serviceAccounts: [SA] | cluster.local/default/sleep | 10.0.0.1:80 | allow",
        "Allow | serviceAccounts: [SA] | cluster.local/default/other | 10.0.0.1:80 | deny",
        "Allow | serviceAccounts: [SA] | - | 10.0.0.1:80 | deny",
        "Allow | serviceAccounts: [SA, {namespace: api, serviceAccount: api}] | cluster.local/api/api | 10.0.0.1:80 | allow",
        "Allow | notServiceAccounts: [SA] | cluster.local/default/sleep | 10.0.0.1:80 | deny",
        "Allow | notServiceAccounts: [SA] | cluster.local/default/other | 10.0.0.1:80 | allow",
        // ALLOW using them beside other fields: all must hold.
        "Allow | serviceAccounts: [SA], destinationPorts: [80] | cluster.local/default/sleep | 10.0.0.1:80 | allow",
        "Allow | serviceAccounts: [SA], destinationPorts: [80] | cluster.local/default/sleep | 10.0.0.1:81 | deny",
        "Allow | serviceAccounts: [SA], destinationPorts: [80] | cluster.local/default/other | 10.0.0.1:80 | deny",
        "Allow | serviceAccounts: [SA], sourceIps: [10.0.0.0/24] | cluster.local/default/sleep | 10.0.9.9:80 | deny",
        "Allow | serviceAccounts: [SA], namespaces: [default] | cluster.local/default/other | 10.0.0.1:80 | deny",
        "Allow | principals: ['cluster.local/ns/default/*'], notServiceAccounts: [SA] | cluster.local/default/other | 10.0.0.1:80 | allow",
        "Allow | principals: ['cluster.local/ns/default/*'], notServiceAccounts: [SA] | cluster.local/default/sleep | 10.0.0.1:80 | deny",
    ];
    for row in rows {
        let f: Vec<&str> = row.split(" | ").collect();
        let (action, m, src, to, want) = (f[0], f[1], f[2], f[3], f[4] == "allow");
        let m = m.replace("SA", "{namespace: default, serviceAccount: sleep}");
        let yaml = format!(
            "[{{name: p, namespace: default, scope: Global, action: {action}, rules: [[[{{{m}}}]]]}}]"
        );
        let src_id = (src != "-").then(|| {
            let p: Vec<&str> = src.split('/').collect();
            Identity::new(p[0], p[1], p[2])
        });
        let to: SocketAddr = to.parse().unwrap();
        let c = Connection::new(src_id, to.ip(), ip("10.0.0.2"), to.port());
        assert_eq!(
            allowed(&store(&yaml), &c, &dst("default", &[])),
            want,
            "{row}"
        );
    }
    // A service account needs both halves.
    let half = "[{name: p, namespace: default, scope: Global, rules: [[[{serviceAccounts: [{namespace: default}]}]]]}]";
    assert!(serde_yaml::from_str::<Vec<Authorization>>(half).is_err());
}

#[test]
fn namespace_wildcards() {
    let s = store(
        "[{name: p, namespace: default, scope: Namespace, rules: [[[{namespaces: ['team-*']}]]]}]",
    );
    let w = dst("default", &[]);
    assert!(allowed(&s, &conn(id("team-a", "x"), "10.0.0.1", 80), &w));
    assert!(!allowed(&s, &conn(id("other", "x"), "10.0.0.1", 80), &w));
}

#[test]
fn ips_ports_and_and_or_semantics() {
    let s = store(
        "
- name: p
  namespace: default
  scope: Namespace
  rules:
  # rule 1: from 10.1.0.0/16 AND to port 80 or 8080 (two clauses, AND-ed)
  - - - sourceIps: [10.1.0.0/16]
    - - destinationPorts: [80, 8080]
  # rule 2 (OR-ed): to the single IP 10.0.0.2 on port 443
  - - - destinationIps: [10.0.0.2]
        destinationPorts: [443]
",
    );
    let w = dst("default", &[]);
    assert!(allowed(&s, &conn(None, "10.1.2.3", 8080), &w));
    assert!(!allowed(&s, &conn(None, "10.1.2.3", 9000), &w));
    assert!(!allowed(&s, &conn(None, "10.2.0.1", 80), &w));
    assert!(allowed(&s, &conn(None, "10.2.0.1", 443), &w));
    // IPv4-mapped IPv6 sources compare as IPv4.
    assert!(allowed(&s, &conn(None, "::ffff:10.1.0.9", 80), &w));
}

#[test]
fn empty_match_in_a_clause_matches_nothing() {
    // Upstream skips empty matches (L7-only fields): a clause of only those never matches.
    let s = store("[{name: p, namespace: default, scope: Namespace, rules: [[[{}]]]}]");
    assert!(!allowed(
        &s,
        &conn(id("default", "a"), "10.0.0.1", 80),
        &dst("default", &[])
    ));
}

#[test]
fn scopes() {
    let s = store(
        "
- {name: global, namespace: istio-system, scope: Global, action: Deny, rules: [[[{destinationPorts: [1]}]]]}
- {name: root-ns, namespace: istio-system, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [2]}]]]}
- {name: ns, namespace: a, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [3]}]]]}
- {name: sel, namespace: a, scope: WorkloadSelector, action: Deny, rules: [[[{destinationPorts: [4]}]]]}
",
    );
    let in_a = dst("a", &[]);
    let in_a_selected = dst("a", &["a/sel", "a/missing"]);
    let in_b = dst("b", &[]);
    let denied = |w: &Workload, port| !allowed(&s, &conn(None, "10.0.0.1", port), w);
    // Global and root-namespace policies apply everywhere.
    assert!(denied(&in_b, 1) && denied(&in_b, 2) && denied(&in_a, 1));
    // Namespace policies apply in their namespace only.
    assert!(denied(&in_a, 3) && !denied(&in_b, 3));
    // Selector policies apply only to the workloads that list them.
    assert!(!denied(&in_a, 4) && denied(&in_a_selected, 4));
    let keys: Vec<_> = s.applicable(&in_a_selected).map(|p| p.key()).collect();
    assert_eq!(
        keys,
        [
            "a/ns",
            "a/sel",
            "istio-system/global",
            "istio-system/root-ns"
        ]
    );
}

#[test]
fn custom_root_namespace() {
    let mut s = PolicyStore::new("mesh-root");
    s.insert(Authorization {
        name: "deny-all".into(),
        namespace: "mesh-root".into(),
        scope: Scope::Namespace,
        action: Action::Deny,
        rules: vec![Rule::default()],
        dry_run: false,
    });
    assert!(!allowed(&s, &conn(None, "10.0.0.1", 80), &dst("x", &[])));
}

#[test]
fn dry_run_is_not_enforced() {
    let s = store("[{name: p, namespace: default, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}]");
    assert!(allowed(
        &s,
        &conn(None, "10.0.0.1", 80),
        &dst("default", &[])
    ));
}

#[test]
fn insert_replaces_and_remove_unindexes() {
    let mut s = store("[{name: p, namespace: a, scope: Namespace, action: Deny, rules: [[]]}]");
    let w = dst("a", &[]);
    assert!(!allowed(&s, &conn(None, "10.0.0.1", 80), &w));
    // Same key, now WORKLOAD_SELECTOR: no longer applies to the whole namespace.
    s.insert(Authorization {
        scope: Scope::WorkloadSelector,
        ..(**s.get("a/p").unwrap()).clone()
    });
    assert_eq!(s.len(), 1);
    assert!(allowed(&s, &conn(None, "10.0.0.1", 80), &w));
    assert!(s.remove("a/p").is_some());
    assert!(s.is_empty() && s.remove("a/p").is_none());
}

#[test]
fn yaml_errors_name_the_place() {
    let bad = [
        ("[{name: p, namespace: a, scope: Cluster}]", "scope"),
        (
            "[{name: p, namespace: a, scope: Global, action: Audit}]",
            "action",
        ),
        (
            "[{name: p, namespace: a, scope: Global, rules: [[[{sourceIps: [10.0.0.0/33]}]]]}]",
            "sourceIps",
        ),
        (
            "[{name: p, namespace: a, scope: Global, rules: [[[{destinationPorts: [70000]}]]]}]",
            "destinationPorts",
        ),
        (
            "[{name: p, namespace: a, scope: Global, rules: [[[{principal: [x]}]]]}]",
            "principal",
        ),
        (
            "[{name: p, namespace: a, scope: Global, rules: [[[{principals: [{Regex: x}]}]]]}]",
            "Regex",
        ),
    ];
    for (yaml, field) in bad {
        let err = serde_yaml::from_str::<Vec<Authorization>>(yaml).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(field) && err.location().is_some(),
            "{yaml}: {msg}"
        );
    }
}

#[test]
fn serializes_back_to_the_same_shape() {
    let yaml = "[{name: p, namespace: a, scope: Global, rules: [[[{sourceIps: [10.0.0.1], principals: ['*x']}]]]}]";
    let p: Vec<Authorization> = serde_yaml::from_str(yaml).unwrap();
    let again: Vec<Authorization> =
        serde_yaml::from_str(&serde_yaml::to_string(&p).unwrap()).unwrap();
    assert_eq!(p, again);
    assert_eq!(
        p[0].rules[0].clauses[0].matches[0].source_ips[0].to_string(),
        "10.0.0.1/32"
    );
}
