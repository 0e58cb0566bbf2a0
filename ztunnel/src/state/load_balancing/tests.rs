//! Which endpoints a client may be sent to, as a table: the client is in region r1, zone
//! z1, on node n1, cluster c1, network net1; each endpoint differs from it in some of
//! those.

use super::*;

fn at(name: &str, region: &str, zone: &str, node: &str, network: &str) -> Workload {
    Workload {
        name: name.into(),
        node: node.into(),
        network: network.into(),
        cluster_id: "c1".into(),
        locality: Locality {
            region: region.into(),
            zone: zone.into(),
            subzone: String::new(),
        },
        ..Default::default()
    }
}

fn client() -> Workload {
    at("client", "r1", "z1", "n1", "net1")
}

/// Endpoints: same zone, same region other zone, other region, same node, other network.
fn endpoints() -> Vec<Workload> {
    vec![
        at("same-zone", "r1", "z1", "n2", "net1"),
        at("same-region", "r1", "z2", "n3", "net1"),
        at("other-region", "r2", "z9", "n4", "net1"),
        at("same-node", "r1", "z1", "n1", "net1"),
        at("other-network", "r1", "z1", "n5", "net2"),
    ]
}

fn lb(mode: Mode, prefs: &[Scope]) -> LoadBalancing {
    LoadBalancing {
        routing_preference: prefs.to_vec(),
        mode,
        health_policy: HealthPolicy::OnlyHealthy,
    }
}

fn names(lb: Option<&LoadBalancing>, eps: &[Workload]) -> Vec<String> {
    let src = client();
    let mut got = choose(
        lb,
        Some(&src),
        eps.iter().map(|w| (w.name.clone(), w)).collect(),
    );
    got.sort();
    got
}

use Scope::*;

#[test]
fn table() {
    let eps = endpoints();
    let rows: &[(&str, Option<LoadBalancing>, &[&str])] = &[
        (
            "no load balancing: any endpoint",
            None,
            &[
                "other-network",
                "other-region",
                "same-node",
                "same-region",
                "same-zone",
            ],
        ),
        (
            "a preference without a mode: any endpoint",
            Some(lb(Mode::Unspecified, &[Region, Zone])),
            &[
                "other-network",
                "other-region",
                "same-node",
                "same-region",
                "same-zone",
            ],
        ),
        (
            "failover region, zone: the client's zone",
            Some(lb(Mode::Failover, &[Region, Zone])),
            &["other-network", "same-node", "same-zone"],
        ),
        (
            "failover region, zone, node: the client's node",
            Some(lb(Mode::Failover, &[Region, Zone, Node])),
            &["same-node"],
        ),
        (
            "strict node: only the client's node",
            Some(lb(Mode::Strict, &[Node])),
            &["same-node"],
        ),
        (
            "network first: the client's network, then the zone",
            Some(lb(Mode::Failover, &[Network, Region, Zone])),
            &["same-node", "same-zone"],
        ),
        (
            "strict network alone: every endpoint on the client's network",
            Some(lb(Mode::Strict, &[Network])),
            &["other-region", "same-node", "same-region", "same-zone"],
        ),
        (
            "passthrough picks no endpoint here (the caller sends to the address dialled)",
            Some(lb(Mode::Passthrough, &[Region])),
            &[
                "other-network",
                "other-region",
                "same-node",
                "same-region",
                "same-zone",
            ],
        ),
    ];
    for (name, lb, want) in rows {
        assert_eq!(names(lb.as_ref(), &eps), *want, "{name}");
    }
}

#[test]
fn failover_falls_back_to_fewer_scopes() {
    let lb = lb(Mode::Failover, &[Region, Zone]);
    let eps: Vec<Workload> = endpoints()
        .into_iter()
        .filter(|w| w.locality.zone != "z1")
        .collect();
    assert_eq!(names(Some(&lb), &eps), ["same-region"]);
    let far: Vec<Workload> = endpoints()
        .into_iter()
        .filter(|w| w.name == "other-region")
        .collect();
    assert_eq!(names(Some(&lb), &far), ["other-region"], "then any");
}

#[test]
fn strict_with_no_match_keeps_nothing() {
    let lb = lb(Mode::Strict, &[Region, Zone]);
    let far: Vec<Workload> = endpoints()
        .into_iter()
        .filter(|w| w.name == "other-region")
        .collect();
    assert!(names(Some(&lb), &far).is_empty());
}

#[test]
fn health_policy() {
    let sick = Workload {
        status: HealthStatus::Unhealthy,
        ..client()
    };
    assert!(!eligible(None, &sick));
    assert!(!eligible(Some(&lb(Mode::Failover, &[Region])), &sick));
    let all = LoadBalancing {
        health_policy: HealthPolicy::AllowAll,
        ..Default::default()
    };
    assert!(eligible(Some(&all), &sick));
    assert!(eligible(None, &client()));
}
