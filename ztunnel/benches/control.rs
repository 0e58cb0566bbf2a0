//! Micro-benchmarks of the per-connection decisions: state lookups (who is this address,
//! where does this destination go) and L4 authorization, on a state of realistic size.
//!
//! `cargo bench -p ztunnel --bench control`

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

use ztunnel::identity::Identity;
use ztunnel::policy::{Action, Authorization, Clause, Connection, Match, Rule, Scope, StringMatch};
use ztunnel::state::{
    NamespacedHostname, NetworkAddress, Protocol, ProxyState, Service, StateStore, Workload,
};

const WORKLOADS: u32 = 5_000;
const SERVICES: u32 = 500;
const NAMESPACES: u32 = 50;

fn pod_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn vip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + i))
}

/// Workload `i` in namespace `i % NAMESPACES`, an endpoint of service `i % SERVICES`.
fn workload(i: u32) -> Workload {
    let ns = format!("ns{}", i % NAMESPACES);
    let svc = NamespacedHostname::new(&ns, &format!("svc{}.{ns}.svc.cluster.local", i % SERVICES));
    Workload {
        uid: format!("cluster1//Pod/{ns}/pod-{i}"),
        name: format!("pod-{i}"),
        namespace: ns,
        service_account: format!("sa{}", i % 20),
        workload_ips: vec![pod_ip(i)],
        protocol: Protocol::HBONE,
        node: format!("node-{}", i % 10),
        services: BTreeMap::from([(svc, BTreeMap::from([(80, 8080)]))]),
        ..Default::default()
    }
}

fn service(i: u32) -> Service {
    let ns = format!("ns{}", i % NAMESPACES);
    Service {
        name: format!("svc{i}"),
        hostname: format!("svc{i}.{ns}.svc.cluster.local"),
        namespace: ns,
        vips: vec![NetworkAddress::new("", vip(i))],
        ports: BTreeMap::from([(80, 8080)]),
        ..Default::default()
    }
}

/// An ALLOW policy for a namespace: `principals` may connect on port 8080.
fn allow(ns: &str, name: &str, principals: &[String]) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope: Scope::Namespace,
        action: Action::Allow,
        rules: vec![Rule {
            clauses: vec![
                Clause {
                    matches: vec![Match {
                        principals: principals
                            .iter()
                            .map(|p| StringMatch::from_wildcard(p))
                            .collect(),
                        ..Default::default()
                    }],
                },
                Clause {
                    matches: vec![Match {
                        destination_ports: vec![8080],
                        ..Default::default()
                    }],
                },
            ],
        }],
        dry_run: false,
    }
}

fn deny_global(name: &str, cidr: &str) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: "istio-system".into(),
        scope: Scope::Global,
        action: Action::Deny,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    source_ips: vec![cidr.parse().unwrap()],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    }
}

fn state() -> StateStore {
    let store = StateStore::default();
    store.replace_all((0..WORKLOADS).map(workload), (0..SERVICES).map(service), []);
    store
}

fn state_lookups(c: &mut Criterion) {
    let store = state();
    let snap = store.snapshot();
    let mut g = c.benchmark_group("state");
    g.bench_function("snapshot", |b| b.iter(|| store.snapshot()));
    let ip = pod_ip(4321);
    g.bench_function("workload_by_ip", |b| {
        b.iter(|| snap.workload_by_ip(std::hint::black_box(ip)).unwrap())
    });
    let to_pod = SocketAddr::new(pod_ip(1234), 8080);
    g.bench_function("resolve_workload", |b| {
        b.iter(|| {
            snap.resolve_from(None, std::hint::black_box(to_pod))
                .unwrap()
                .unwrap()
        })
    });
    let to_vip = SocketAddr::new(vip(123), 80);
    g.bench_function("resolve_service_vip", |b| {
        b.iter(|| {
            snap.resolve_from(None, std::hint::black_box(to_vip))
                .unwrap()
                .unwrap()
        })
    });
    let miss = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 443);
    g.bench_function("resolve_outside_mesh", |b| {
        b.iter(|| snap.resolve_from(None, std::hint::black_box(miss)).unwrap())
    });
    g.finish();
}

/// Evaluation cost as the number of policies that apply to the destination grows.
fn policy_evaluation(c: &mut Criterion) {
    let dst = workload(7);
    let src_id = Identity::new("cluster.local", "ns3", "sa3");
    let conn = Connection::new(Some(src_id), pod_ip(3), pod_ip(7), 8080);
    let mut g = c.benchmark_group("policy");
    for n in [0usize, 1, 10, 100] {
        let mut s = ProxyState::default();
        s.upsert_workload(dst.clone());
        s.policies
            .insert(deny_global("deny-blocked", "192.0.2.0/24"));
        // n ALLOW policies on the destination's namespace; only the last one matches, so
        // every one of them is evaluated.
        for k in 0..n {
            let principal = if k + 1 == n {
                "cluster.local/ns/ns3/sa/*".to_string()
            } else {
                format!("cluster.local/ns/other/sa/p{k}")
            };
            s.policies
                .insert(allow(&dst.namespace, &format!("allow-{k}"), &[principal]));
        }
        let decision = s.policies.evaluate(&conn, &dst);
        assert!(decision.allowed, "{decision}");
        g.bench_with_input(
            BenchmarkId::new("evaluate_allow_policies", n),
            &s,
            |b, s| b.iter(|| s.policies.evaluate(std::hint::black_box(&conn), &dst)),
        );
    }
    g.finish();
}

/// What every connection costs its record: the labels and info built from both
/// workloads, registration, and the end (metrics; the access-log line is off here, as
/// with a log filter that hides it).
fn connection_record(c: &mut Criterion) {
    use std::sync::Arc;
    use ztunnel::connections::{ConnectionTracker, Direction, Outcome};
    use ztunnel::proxy::labels::{End, Record};
    let tracker = ConnectionTracker::new(Arc::new(ztunnel::metrics::Metrics::new()));
    let (src, dst) = (workload(3), workload(7));
    let (src_id, dst_id) = (src.identity(), dst.identity());
    let peer = SocketAddr::new(pod_ip(3), 40000);
    let target = SocketAddr::new(pod_ip(7), 8080);
    c.bench_function("connection/accept_identify_finish", |b| {
        b.iter(|| {
            let record = Record {
                direction: Direction::Outbound,
                src: End {
                    addr: Some(peer),
                    workload: Some(&src),
                    identity: Some(&src_id),
                },
                dst: End {
                    addr: Some(target),
                    workload: Some(&dst),
                    identity: Some(&dst_id),
                },
                service: None,
                dst_addr: target,
                target,
                hbone: Some(ztunnel::connections::Hbone {
                    tunnel: SocketAddr::new(target.ip(), 15008),
                    authority: target,
                }),
            };
            let mut conn = tracker.accept(Direction::Outbound, peer, Some(target));
            conn.identify(record.info(), record.labels(), None);
            conn.finish(Outcome::Ok);
        })
    });
    let _ = Arc::new(());
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = state_lookups, policy_evaluation, connection_record
}
criterion_main!(benches);
