//! Which service and endpoint a destination reaches: ranges (CIDR VIPs), services sharing
//! a VIP, visibility, capacity, IP families, and weighted waypoints.

use std::collections::HashMap;
use std::net::SocketAddr;

use rand::SeedableRng;

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn pod(ns: &str, name: &str, ips: &[&str], svc: Option<&NamespacedHostname>) -> Workload {
    Workload {
        uid: format!("c//Pod/{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        service_account: name.into(),
        workload_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
        protocol: Protocol::HBONE,
        node: "n1".into(),
        services: svc
            .map(|k| [(k.clone(), [(80, 8080)].into_iter().collect())].into())
            .unwrap_or_default(),
        ..Default::default()
    }
}

fn service(ns: &str, host: &str, vips: &[&str], cidrs: &[&str]) -> Service {
    Service {
        name: host.into(),
        namespace: ns.into(),
        hostname: host.into(),
        vips: vips.iter().map(|v| v.parse().unwrap()).collect(),
        cidr_vips: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        ports: [(80, 8080)].into_iter().collect(),
        ..Default::default()
    }
}

fn key(ns: &str, host: &str) -> NamespacedHostname {
    NamespacedHostname::new(ns, host)
}

#[test]
fn a_range_reaches_its_service_but_never_takes_a_pods_address() {
    let store = StateStore::default();
    let ext = key("a", "ext.example.com");
    store.replace_all(
        [
            pod("a", "client", &["10.0.0.1"], None),
            pod("a", "backend", &["10.0.0.2"], Some(&ext)),
            // A pod whose IP lies inside the range.
            pod("a", "inside", &["10.97.0.7"], None),
        ],
        [service("a", "ext.example.com", &[], &["/10.97.0.0/24"])],
        [],
    );
    let snap = store.snapshot();
    let client = snap.workload_by_uid("c//Pod/a/client").unwrap();
    let up = snap
        .resolve_from(Some(&client), sa("10.97.0.200:80"))
        .unwrap()
        .unwrap()
        .expect_address();
    assert_eq!(up.workload.name, "backend");
    assert_eq!(up.address, sa("10.0.0.2:8080"));
    assert_eq!(up.service.unwrap().hostname, "ext.example.com");
    // The pod's own address is the pod, not the range's service.
    let up = snap.resolve(sa("10.97.0.7:80")).unwrap().unwrap();
    assert_eq!(up.workload.name, "inside");
    assert!(up.service.is_none());
    // Outside the range: not the mesh's.
    assert!(snap.resolve(sa("10.97.1.1:80")).unwrap().is_none());
}

#[test]
fn a_shared_vip_goes_to_the_clients_namespace_and_respects_visibility() {
    let store = StateStore::default();
    let (in_a, in_b) = (key("a", "ext.example.com"), key("b", "ext.example.com"));
    let scoped = Service {
        visibility: Visibility::Namespace,
        ..service("b", "ext.example.com", &["/240.0.0.1"], &[])
    };
    store.replace_all(
        [
            pod("a", "client-a", &["10.0.0.1"], None),
            pod("b", "client-b", &["10.0.0.2"], None),
            pod("c", "client-c", &["10.0.0.3"], None),
            pod("a", "backend-a", &["10.0.1.1"], Some(&in_a)),
            pod("b", "backend-b", &["10.0.1.2"], Some(&in_b)),
        ],
        [
            service("a", "ext.example.com", &["/240.0.0.1"], &[]),
            scoped,
        ],
        [],
    );
    let snap = store.snapshot();
    let backend = |client: &str| {
        let w = snap.workload_by_uid(client).unwrap();
        let up = snap.resolve_from(Some(&w), sa("240.0.0.1:80")).unwrap();
        up.map(|u| u.expect_address().workload.name.clone())
    };
    assert_eq!(backend("c//Pod/a/client-a").as_deref(), Some("backend-a"));
    assert_eq!(backend("c//Pod/b/client-b").as_deref(), Some("backend-b"));
    // c sees only the public one.
    assert_eq!(backend("c//Pod/c/client-c").as_deref(), Some("backend-a"));
    // Removing a's service leaves b's, which c may not see: outside the mesh for c.
    store.update(|s| {
        s.remove_service(&in_a);
    });
    let snap = store.snapshot();
    let c = snap.workload_by_uid("c//Pod/c/client-c").unwrap();
    assert!(snap
        .resolve_from(Some(&c), sa("240.0.0.1:80"))
        .unwrap()
        .is_none());
}

#[test]
fn endpoints_are_picked_in_proportion_to_capacity() {
    let store = StateStore::default();
    let echo = key("a", "echo");
    let with = |name: &str, ip: &str, capacity| Workload {
        capacity,
        ..pod("a", name, &[ip], Some(&echo))
    };
    store.replace_all(
        [
            with("big", "10.0.0.1", 3),
            with("small", "10.0.0.2", 1),
            with("drained", "10.0.0.3", 0),
        ],
        [service("a", "echo", &["/10.96.0.1"], &[])],
        [],
    );
    let snap = store.snapshot();
    let svc = snap.service(&echo).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..4000 {
        let up = snap
            .pick_endpoint(&svc, sa("10.96.0.1:80"), &mut rng)
            .unwrap();
        *seen.entry(up.workload.name.clone()).or_default() += 1;
    }
    assert_eq!(seen.get("drained"), None, "capacity 0 is never picked");
    let big = f64::from(seen["big"]) / 4000.0;
    assert!((0.70..0.80).contains(&big), "3 of 4 expected, got {big}");

    // Every endpoint at 0: refused, saying why.
    store.update(|s| {
        for name in ["big", "small"] {
            let uid = format!("c//Pod/a/{name}");
            let mut w = (*s.workload_by_uid(&uid).unwrap()).clone();
            w.capacity = 0;
            s.upsert_workload(w);
        }
    });
    let err = store.snapshot().resolve(sa("10.96.0.1:80")).unwrap_err();
    assert!(matches!(err, ResolveError::NoCapacity { .. }), "{err}");
}

#[test]
fn ip_families_restrict_the_address_dialled() {
    let store = StateStore::default();
    let echo = key("a", "echo");
    let svc = |f| Service {
        ip_families: f,
        ..service("a", "echo", &["/10.96.0.1", "/fd00::1"], &[])
    };
    let dual = pod("a", "dual", &["10.0.0.1", "fd00::a"], Some(&echo));
    let v4 = pod("a", "v4", &["10.0.0.2"], Some(&echo));
    let cases = [
        (
            IpFamilies::Automatic,
            "10.96.0.1:80",
            vec!["10.0.0.1:8080", "10.0.0.2:8080"],
        ),
        (
            IpFamilies::Automatic,
            "[fd00::1]:80",
            vec!["[fd00::a]:8080", "10.0.0.2:8080"],
        ),
        (IpFamilies::Ipv6Only, "10.96.0.1:80", vec!["[fd00::a]:8080"]),
        (
            IpFamilies::Ipv4Only,
            "[fd00::1]:80",
            vec!["10.0.0.1:8080", "10.0.0.2:8080"],
        ),
    ];
    for (families, dst, want) in cases {
        store.replace_all([dual.clone(), v4.clone()], [svc(families)], []);
        let snap = store.snapshot();
        let mut got: Vec<String> = (0..64)
            .map(|_| snap.resolve(sa(dst)).unwrap().unwrap().address.to_string())
            .collect();
        got.sort();
        got.dedup();
        let mut want: Vec<String> = want.into_iter().map(String::from).collect();
        want.sort();
        assert_eq!(got, want, "{families:?} to {dst}");
    }
}

#[test]
fn weighted_waypoints_share_a_services_connections() {
    let store = StateStore::default();
    let echo = key("a", "echo");
    let (old, new) = (key("a", "wp-old"), key("a", "wp-new"));
    let gw = |k: &NamespacedHostname| GatewayAddress {
        destination: GatewayDestination::Hostname(k.clone()),
        hbone_mtls_port: 15008,
    };
    let weighted = |w_old, w_new| Service {
        waypoint: Some(gw(&old)),
        weighted_waypoints: vec![
            WeightedWaypoint {
                destination: gw(&old),
                weight: w_old,
            },
            WeightedWaypoint {
                destination: gw(&new),
                weight: w_new,
            },
        ],
        ..service("a", "echo", &["/10.96.0.1"], &[])
    };
    let pods = [
        pod("a", "client", &["10.0.0.1"], None),
        pod("a", "backend", &["10.0.0.2"], Some(&echo)),
        pod("a", "wp-old-0", &["10.0.9.1"], Some(&old)),
        pod("a", "wp-new-0", &["10.0.9.2"], Some(&new)),
    ];
    let share = |w_old, w_new| {
        store.replace_all(
            pods.clone(),
            [
                weighted(w_old, w_new),
                service("a", "wp-old", &[], &[]),
                service("a", "wp-new", &[], &[]),
            ],
            [],
        );
        let snap = store.snapshot();
        let client = snap.workload_by_uid("c//Pod/a/client").unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let to_new = (0..1000)
            .filter(|_| {
                let gw = snap
                    .waypoint_for_with(&client, sa("10.96.0.1:80"), &mut rng)
                    .unwrap();
                gw.destination.to_string() == new.to_string()
            })
            .count();
        (to_new, snap)
    };
    let (to_new, snap) = share(90, 10);
    assert!(
        (60..140).contains(&to_new),
        "10% expected, got {to_new}/1000"
    );
    // Both waypoints' identities are the service's waypoints at the destination.
    let backend = snap.workload_by_uid("c//Pod/a/backend").unwrap();
    for wp in ["wp-old-0", "wp-new-0"] {
        let id = snap
            .workload_by_uid(&format!("c//Pod/a/{wp}"))
            .unwrap()
            .identity();
        assert!(snap.is_waypoint_of(&backend, &id), "{wp}");
    }
    // A waypoint's own connections to the service go straight to it.
    let own = snap.workload_by_uid("c//Pod/a/wp-new-0").unwrap();
    assert!(snap.waypoint_for(&own, sa("10.96.0.1:80")).is_none());
    // No weight above zero: the single waypoint.
    assert_eq!(share(0, 0).0, 0);
}
