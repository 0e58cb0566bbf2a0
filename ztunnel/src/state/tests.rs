use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::SeedableRng;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn echo() -> NamespacedHostname {
    NamespacedHostname::new("default", "echo.default.svc.cluster.local")
}

fn workload(name: &str, ip_s: &str, services: &[(NamespacedHostname, &[(u16, u16)])]) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        workload_ips: vec![ip(ip_s)],
        protocol: Protocol::HBONE,
        node: "node-a".into(),
        services: services
            .iter()
            .map(|(k, ports)| (k.clone(), ports.iter().copied().collect()))
            .collect(),
        ..Default::default()
    }
}

fn echo_service(ports: &[(u16, u16)]) -> Service {
    Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        vips: vec![NetworkAddress::new("", ip("10.96.0.10"))],
        ports: ports.iter().copied().collect(),
        ..Default::default()
    }
}

/// echo VIP 10.96.0.10:80 → pods e1 (10.0.0.1), e2 (10.0.0.2) on 8080; plus a TCP-only pod.
fn store() -> StateStore {
    let s = StateStore::default();
    s.replace_all(
        [
            workload("e1", "10.0.0.1", &[(echo(), &[(80, 8080)])]),
            workload("e2", "10.0.0.2", &[(echo(), &[(80, 8080)])]),
            Workload {
                protocol: Protocol::TCP,
                node: "node-b".into(),
                ..workload("legacy", "10.0.0.9", &[])
            },
        ],
        [echo_service(&[(80, 8080)])],
        [],
    );
    s
}

#[test]
fn resolves_a_workload_ip() {
    let snap = store().snapshot();
    let up = snap.resolve(sa("10.0.0.1:9000")).unwrap().unwrap();
    assert_eq!(up.workload.name, "e1");
    assert_eq!(up.address, sa("10.0.0.1:9000"));
    assert!(up.service.is_none() && up.in_mesh());
    assert_eq!(
        up.workload.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/e1"
    );
    // Outside the mesh: known, but plain TCP.
    let up = snap.resolve(sa("10.0.0.9:80")).unwrap().unwrap();
    assert!(!up.in_mesh());
}

#[test]
fn unknown_ip_is_not_in_the_mesh() {
    assert!(store()
        .snapshot()
        .resolve(sa("8.8.8.8:53"))
        .unwrap()
        .is_none());
}

#[test]
fn resolves_a_vip_to_an_endpoint_and_target_port() {
    let snap = store().snapshot();
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let up = snap.resolve(sa("10.96.0.10:80")).unwrap().unwrap();
        assert_eq!(up.port(), 8080);
        assert_eq!(up.service.as_ref().unwrap().name, "echo");
        seen.insert(up.workload.name.clone());
    }
    assert_eq!(seen.len(), 2, "both endpoints get traffic: {seen:?}");
}

#[test]
fn endpoint_port_mapping_wins_over_the_service_one() {
    let s = store();
    s.upsert_workload(workload("e1", "10.0.0.1", &[(echo(), &[(80, 9999)])]));
    s.remove_workload("Kubernetes//Pod/default/e2");
    let up = s.snapshot().resolve(sa("10.96.0.10:80")).unwrap().unwrap();
    assert_eq!(up.address, sa("10.0.0.1:9999"));
}

#[test]
fn target_port_rules() {
    let svc = echo_service(&[(80, 8080), (81, 0)]);
    let none = PortMap::new();
    let ep: PortMap = [(80, 7070), (90, 0)].into_iter().collect();
    assert_eq!(svc.target_port(80, &none), Some(8080));
    assert_eq!(svc.target_port(80, &ep), Some(7070));
    assert_eq!(svc.target_port(81, &none), Some(81)); // 0 = same port
    assert_eq!(svc.target_port(82, &none), None); // not a port of the service
    let portless = echo_service(&[]);
    assert_eq!(portless.target_port(5000, &none), Some(5000));
}

#[test]
fn port_not_served_is_an_error() {
    let err = store()
        .snapshot()
        .resolve(sa("10.96.0.10:443"))
        .unwrap_err();
    assert!(
        matches!(err, ResolveError::NoSuchPort { port: 443, .. }),
        "{err}"
    );
}

#[test]
fn unhealthy_endpoints_are_skipped() {
    let s = store();
    s.upsert_workload(Workload {
        status: HealthStatus::Unhealthy,
        ..workload("e1", "10.0.0.1", &[(echo(), &[(80, 8080)])])
    });
    let snap = s.snapshot();
    for _ in 0..50 {
        let up = snap.resolve(sa("10.96.0.10:80")).unwrap().unwrap();
        assert_eq!(up.workload.name, "e2");
    }
    // An unhealthy workload is still reachable directly by its IP.
    assert!(snap.resolve(sa("10.0.0.1:8080")).unwrap().is_some());
}

#[test]
fn service_without_endpoints() {
    let s = store();
    s.remove_workload("Kubernetes//Pod/default/e1");
    s.remove_workload("Kubernetes//Pod/default/e2");
    let err = s.snapshot().resolve(sa("10.96.0.10:80")).unwrap_err();
    assert_eq!(
        err,
        ResolveError::NoHealthyEndpoints {
            service: echo().to_string()
        }
    );
}

#[test]
fn removal_and_snapshots() {
    let s = store();
    let before = s.snapshot();
    let removed = s.remove_workload("Kubernetes//Pod/default/e1").unwrap();
    assert_eq!(removed.name, "e1");
    assert!(s.remove_workload("Kubernetes//Pod/default/e1").is_none());
    let after = s.snapshot();
    assert!(after.workload_by_ip(ip("10.0.0.1")).is_none());
    assert_eq!(after.endpoints(&echo()).len(), 1);
    // A snapshot taken before the update is unaffected (in-flight connections).
    assert!(before.workload_by_ip(ip("10.0.0.1")).is_some());
    assert_eq!(before.endpoints(&echo()).len(), 2);

    // Removing the service makes its VIP unknown; endpoints come back with it.
    s.remove_service(&echo()).unwrap();
    assert!(s.snapshot().resolve(sa("10.96.0.10:80")).unwrap().is_none());
    s.upsert_service(echo_service(&[(80, 8080)]));
    assert!(s.snapshot().resolve(sa("10.96.0.10:80")).unwrap().is_some());
}

#[test]
fn workload_before_its_service() {
    // xDS may send a workload before the service it names.
    let s = StateStore::default();
    s.upsert_workload(workload("e1", "10.0.0.1", &[(echo(), &[(80, 8080)])]));
    assert!(s.snapshot().resolve(sa("10.96.0.10:80")).unwrap().is_none());
    s.upsert_service(echo_service(&[(80, 8080)]));
    let up = s.snapshot().resolve(sa("10.96.0.10:80")).unwrap().unwrap();
    assert_eq!(up.address, sa("10.0.0.1:8080"));
}

#[test]
fn upsert_moves_the_ip_index() {
    let s = store();
    s.upsert_workload(workload("e1", "10.0.0.5", &[]));
    let snap = s.snapshot();
    assert!(snap.workload_by_ip(ip("10.0.0.1")).is_none());
    assert_eq!(snap.workload_by_ip(ip("10.0.0.5")).unwrap().name, "e1");
    // e1 left the service.
    assert_eq!(snap.endpoints(&echo()).len(), 1);
}

#[test]
fn host_network_workloads_are_not_indexed_by_ip() {
    let s = StateStore::default();
    s.upsert_workload(Workload {
        network_mode: NetworkMode::HostNetwork,
        ..workload("h", "192.168.1.10", &[])
    });
    let snap = s.snapshot();
    assert!(snap.workload_by_ip(ip("192.168.1.10")).is_none());
    assert!(snap.workload_by_uid("Kubernetes//Pod/default/h").is_some());
}

#[test]
fn networks_are_separate() {
    let s = StateStore::default();
    s.upsert_workload(Workload {
        network: "net2".into(),
        ..workload("far", "10.0.0.1", &[])
    });
    let snap = s.snapshot();
    assert!(snap.resolve(sa("10.0.0.1:80")).unwrap().is_none());
    assert!(snap
        .resolve_in("net2", sa("10.0.0.1:80"))
        .unwrap()
        .is_some());
}

#[test]
fn workloads_on_node() {
    let snap = store().snapshot();
    let names: Vec<_> = snap
        .workloads_on_node("node-a")
        .iter()
        .map(|w| w.name.clone())
        .collect();
    assert_eq!(names, ["e1", "e2"]);
    assert_eq!(snap.workloads_on_node("node-b").len(), 1);
    assert!(snap.workloads_on_node("node-z").is_empty());
}

#[test]
fn dual_stack_endpoint_matches_the_vip_family() {
    let s = StateStore::default();
    let mut w = workload("e1", "10.0.0.1", &[(echo(), &[(80, 8080)])]);
    w.workload_ips.push(ip("fd00::1"));
    s.upsert_workload(w);
    let mut svc = echo_service(&[(80, 8080)]);
    svc.vips.push(NetworkAddress::new("", ip("fd00:96::10")));
    s.upsert_service(svc);
    let snap = s.snapshot();
    assert_eq!(
        snap.resolve(sa("[fd00:96::10]:80"))
            .unwrap()
            .unwrap()
            .address,
        sa("[fd00::1]:8080")
    );
    assert_eq!(
        snap.resolve(sa("10.96.0.10:80")).unwrap().unwrap().address,
        sa("10.0.0.1:8080")
    );
    // IPv4-mapped destinations (dual-stack listeners) resolve like IPv4.
    assert!(snap.resolve(sa("[::ffff:10.0.0.1]:80")).unwrap().is_some());
}

#[test]
fn pick_endpoint_is_deterministic_with_a_seeded_rng() {
    let snap = store().snapshot();
    let svc = snap.service(&echo()).unwrap();
    let pick = |seed| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        snap.pick_endpoint(&svc, sa("10.96.0.10:80"), &mut rng)
            .unwrap()
            .workload
            .name
            .clone()
    };
    assert_eq!(pick(7), pick(7));
}

#[test]
fn policies_live_in_the_state_and_updates_notify() {
    let s = store();
    let mut rx = s.subscribe();
    let v0 = *rx.borrow_and_update();
    s.upsert_policy(crate::policy::Authorization {
        name: "deny".into(),
        namespace: "default".into(),
        scope: crate::policy::Scope::Namespace,
        action: crate::policy::Action::Deny,
        rules: vec![Default::default()],
        dry_run: false,
    });
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), v0 + 1);
    let snap = s.snapshot();
    let dst = snap.workload_by_ip(ip("10.0.0.1")).unwrap();
    let conn = crate::policy::Connection::new(None, ip("10.0.0.9"), ip("10.0.0.1"), 80);
    assert!(!snap.policies.evaluate(&conn, &dst).allowed);
    assert!(s.remove_policy("default/deny").is_some());
    assert!(s.snapshot().policies.evaluate(&conn, &dst).allowed);
}

#[test]
fn concurrent_readers_and_writers() {
    let s = Arc::new(store());
    let writers: Vec<_> = (0..2)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for i in 0..200u16 {
                    let ip_s = format!("10.{t}.{}.{}", i / 250, i % 250);
                    s.upsert_workload(workload(&format!("w{t}-{i}"), &ip_s, &[]));
                }
            })
        })
        .collect();
    for _ in 0..500 {
        let snap = s.snapshot();
        assert!(snap.resolve(sa("10.96.0.10:80")).unwrap().is_some());
    }
    for w in writers {
        w.join().unwrap();
    }
    // No update lost despite concurrent writers.
    assert_eq!(s.snapshot().workloads().count(), 3 + 400);
}

#[test]
fn workload_defaults() {
    let w = Workload::default();
    assert_eq!(
        (w.trust_domain.as_str(), w.service_account.as_str()),
        ("cluster.local", "default")
    );
    assert_eq!(w.protocol, Protocol::TCP);
    assert!(!w.in_mesh() && w.is_healthy());
    let _: BTreeMap<NamespacedHostname, PortMap> = w.services;
}

/// `NETWORK`: addresses without a network are looked up on the node's; a service's
/// endpoints on other networks are never picked, and a service with only those is refused
/// naming them (no network gateways); `clear` keeps the node's network.
#[test]
fn the_nodes_network() {
    let on = |net: &str, w: Workload| Workload {
        network: net.into(),
        ..w
    };
    let s = StateStore::default();
    s.update(|st| st.set_network("net1"));
    let svc = |net: &str| Service {
        vips: vec![NetworkAddress::new(net, ip("10.96.0.10"))],
        ..echo_service(&[(80, 8080)])
    };
    s.replace_all(
        [
            on(
                "net1",
                workload("e1", "10.0.0.1", &[(echo(), &[(80, 8080)])]),
            ),
            on(
                "net2",
                workload("e2", "10.0.0.2", &[(echo(), &[(80, 8080)])]),
            ),
        ],
        [svc("net1")],
        [],
    );
    let snap = s.snapshot();
    assert_eq!(snap.network(), "net1", "kept across replace_all");
    assert_eq!(snap.workload_by_ip(ip("10.0.0.1")).unwrap().name, "e1");
    assert!(
        snap.workload_by_ip(ip("10.0.0.2")).is_none(),
        "another network's address is not this one's"
    );
    for _ in 0..50 {
        let up = snap.resolve(sa("10.96.0.10:80")).unwrap().unwrap();
        assert_eq!(up.workload.name, "e1", "only this network's endpoints");
    }
    s.remove_workload("Kubernetes//Pod/default/e1");
    let err = s.snapshot().resolve(sa("10.96.0.10:80")).unwrap_err();
    assert_eq!(
        err,
        ResolveError::OtherNetworks {
            service: echo().to_string(),
            networks: "\"net2\"".into()
        }
    );
    // Without NETWORK, a workload istiod put on a network is not found: the setting is
    // what makes a node on a named network work at all.
    let plain = StateStore::default();
    plain.replace_all([on("net1", workload("e1", "10.0.0.1", &[]))], [], []);
    assert!(plain.snapshot().workload_by_ip(ip("10.0.0.1")).is_none());
}

/// An inbound connection names the pod and its port; the service it most likely came
/// through is the pod's service whose port targets that port.
#[test]
fn the_service_of_an_inbound_connection_is_guessed_from_the_port() {
    let snap = store().snapshot();
    let e1 = snap.workload_by_ip(ip("10.0.0.1")).unwrap();
    assert_eq!(
        snap.guess_inbound_service(&e1, 8080)
            .map(|s| s.name.clone()),
        Some("echo".to_string())
    );
    assert!(snap.guess_inbound_service(&e1, 9999).is_none());
    let legacy = snap.workload_by_ip(ip("10.0.0.9")).unwrap();
    assert!(snap.guess_inbound_service(&legacy, 8080).is_none());
}

/// A service's load balancing, end to end through `resolve_from`: PASSTHROUGH sends to the
/// VIP itself, ALLOW_ALL picks unhealthy endpoints too, STRICT keeps to the client's zone
/// and refuses by name when no endpoint is there.
#[test]
fn load_balancing_of_a_vip() {
    use load_balancing::{HealthPolicy, LoadBalancing, Locality, Mode, Scope};
    let in_zone = |zone: &str, w: Workload| Workload {
        locality: Locality {
            region: "r1".into(),
            zone: zone.into(),
            subzone: String::new(),
        },
        ..w
    };
    let lb_store = |lb: LoadBalancing, sick_e2: bool| {
        let s = StateStore::default();
        s.replace_all(
            [
                in_zone("z1", workload("e1", "10.0.0.1", &[(echo(), &[(80, 8080)])])),
                Workload {
                    status: if sick_e2 {
                        HealthStatus::Unhealthy
                    } else {
                        HealthStatus::Healthy
                    },
                    ..in_zone("z2", workload("e2", "10.0.0.2", &[(echo(), &[(80, 8080)])]))
                },
            ],
            [Service {
                load_balancing: Some(lb),
                ..echo_service(&[(80, 8080)])
            }],
            [],
        );
        s.snapshot()
    };
    let lb = |mode, prefs: &[Scope], health| LoadBalancing {
        routing_preference: prefs.to_vec(),
        mode,
        health_policy: health,
    };
    let vip = sa("10.96.0.10:80");
    let pass = lb_store(lb(Mode::Passthrough, &[], HealthPolicy::OnlyHealthy), false);
    assert!(
        pass.resolve(vip).unwrap().is_none(),
        "PASSTHROUGH: to the VIP"
    );

    let all = lb_store(lb(Mode::Unspecified, &[], HealthPolicy::AllowAll), true);
    let picked: HashSet<String> = (0..60)
        .map(|_| all.resolve(vip).unwrap().unwrap().workload.name.clone())
        .collect();
    assert!(
        picked.contains("e2"),
        "ALLOW_ALL picks the unhealthy one too"
    );

    let strict = lb_store(
        lb(Mode::Strict, &[Scope::Zone], HealthPolicy::OnlyHealthy),
        false,
    );
    let client_z2 = in_zone("z2", workload("c", "10.0.0.50", &[]));
    for _ in 0..30 {
        let up = strict
            .resolve_from(Some(&client_z2), vip)
            .unwrap()
            .unwrap()
            .expect_address();
        assert_eq!(up.workload.name, "e2", "STRICT zone");
    }
    let client_z3 = in_zone("z3", workload("c", "10.0.0.50", &[]));
    let err = strict.resolve_from(Some(&client_z3), vip).unwrap_err();
    assert!(
        matches!(err, ResolveError::NoPreferredEndpoint { .. }),
        "{err}"
    );
    // ALLOW_ALL, the only endpoint unhealthy and on another network: refused for the
    // network, as a healthy one there would be.
    let far = StateStore::default();
    far.replace_all(
        [Workload {
            status: HealthStatus::Unhealthy,
            network: "net2".into(),
            ..workload("e1", "10.0.0.1", &[(echo(), &[(80, 8080)])])
        }],
        [Service {
            load_balancing: Some(lb(Mode::Unspecified, &[], HealthPolicy::AllowAll)),
            ..echo_service(&[(80, 8080)])
        }],
        [],
    );
    let err = far.snapshot().resolve(vip).unwrap_err();
    assert!(matches!(err, ResolveError::OtherNetworks { .. }), "{err}");
    // FAILOVER from z3: no zone match, so any endpoint of the best (region) rank.
    let failover = lb_store(
        lb(
            Mode::Failover,
            &[Scope::Region, Scope::Zone],
            HealthPolicy::OnlyHealthy,
        ),
        false,
    );
    assert!(failover
        .resolve_from(Some(&client_z3), vip)
        .unwrap()
        .is_some());
}
