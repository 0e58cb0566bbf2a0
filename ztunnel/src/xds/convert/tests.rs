use std::collections::BTreeMap;

use prost::Message;

use super::*;
use crate::xds::LocalConfig;

/// Exercises every field the state holds, including non-defaults.
const CONFIG: &str = r#"
workloads:
- uid: c1//Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  trustDomain: td.example
  workloadIps: [10.0.1.5, "fd00::5"]
  network: net1
  protocol: HBONE
  networkMode: HostNetwork
  node: node-a
  status: Unhealthy
  services:
    default/echo.default.svc.cluster.local: {80: 8080, 443: 0}
  authorizationPolicies: [default/allow-sleep]
  hostname: sleep.example
  workloadName: sleep
  workloadType: job
  canonicalName: sleep-app
  canonicalRevision: v1
  clusterId: c1
  waypoint: {destination: "net1/10.0.2.5", hboneMtlsPort: 15009}
  locality: {region: r1, zone: z1, subzone: s1}
  capacity: 0
- name: plain
  namespace: other
  workloadIps: [10.0.2.5]
  # The proto has no "unset" type: it reads back as the proto's default, deployment.
  workloadType: deployment
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.96.0.10", "net1/fd00::10"]
  ports: {80: 8080, 443: 0}
  subjectAltNames: ["spiffe://td.example/ns/default/sa/echo"]
  waypoint: {destination: "other/waypoint.other.svc.cluster.local"}
  weightedWaypoints:
  - {destination: {destination: "other/waypoint.other.svc.cluster.local"}, weight: 90}
  - {destination: {destination: "net1/10.0.2.5", hboneMtlsPort: 15009}, weight: 0}
  cidrVips: ["/10.97.0.0/24", {network: net1, cidr: "fd00:97::/64"}]
  loadBalancer: {routingPreferences: [Network, Zone], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: IPv6
  canonical: true
  visibility: Namespace
- name: passthrough
  namespace: other
  hostname: ext.example.com
  vips: ["/10.96.0.10"]
  loadBalancer: {mode: Passthrough}
  ipFamilies: Dual
policies:
- name: allow-sleep
  namespace: default
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - principals: ["cluster.local/ns/default/sa/sleep", "*"]
        notPrincipals: ["*bad", "evil*"]
        namespaces: [{Exact: default}]
        notNamespaces: [{Presence: {}}]
        serviceAccounts: [{namespace: default, serviceAccount: sleep}]
        notServiceAccounts: [{namespace: other, serviceAccount: bad}]
        sourceIps: [10.0.0.0/8, "fd00::/64"]
        notSourceIps: [10.1.2.3]
        destinationIps: [192.168.0.0/16]
        notDestinationIps: ["::1"]
        destinationPorts: [80, 443]
        notDestinationPorts: [22]
      - destinationPorts: [9090]
    - []
- name: global
  namespace: istio-system
  scope: Global
"#;

fn config() -> LocalConfig {
    LocalConfig::from_yaml(CONFIG).unwrap()
}

#[test]
fn state_to_proto_and_back_is_lossless() {
    let cfg = config();
    for w in &cfg.workloads {
        let wire = workload_to_proto(w).encode_to_vec();
        let back = workload_from_proto(&wpb::Workload::decode(wire.as_slice()).unwrap()).unwrap();
        assert_eq!(&back, w);
        let any = address_to_any(&AddressResource::Workload(w.clone()));
        assert_eq!(
            decode_address(&any).unwrap(),
            AddressResource::Workload(w.clone())
        );
    }
    for s in &cfg.services {
        let back = service_from_proto(&service_to_proto(s)).unwrap();
        assert_eq!(&back, s);
        let any = address_to_any(&AddressResource::Service(s.clone()));
        assert_eq!(
            decode_address(&any).unwrap(),
            AddressResource::Service(s.clone())
        );
    }
    for p in &cfg.policies {
        assert_eq!(
            &authorization_from_proto(&authorization_to_proto(p)).unwrap(),
            p
        );
        assert_eq!(&decode_authorization(&authorization_to_any(p)).unwrap(), p);
    }
}

#[test]
fn proto_to_state_and_back_is_lossless() {
    let w = wpb::Workload {
        uid: "c//Pod/ns/a".into(),
        name: "a".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1], [0xfdu8; 16].to_vec()],
        tunnel_protocol: wpb::TunnelProtocol::Hbone as i32,
        trust_domain: "cluster.local".into(),
        service_account: "sa".into(),
        workload_type: wpb::WorkloadType::Cronjob as i32,
        services: [(
            "ns/a.ns.svc.cluster.local".to_string(),
            wpb::PortList {
                ports: vec![wpb::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
            },
        )]
        .into(),
        status: wpb::WorkloadStatus::Unhealthy as i32,
        network_mode: wpb::NetworkMode::HostNetwork as i32,
        ..Default::default()
    };
    let state = workload_from_proto(&w).unwrap();
    assert_eq!(state.workload_type, "cronjob");
    assert_eq!(workload_to_proto(&state), w);
}

#[test]
fn defaults_follow_istio() {
    let w = workload_from_proto(&wpb::Workload {
        uid: "u".into(),
        namespace: "ns".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(w.service_account, "default");
    assert_eq!(w.protocol, Protocol::TCP);
    assert_eq!(w.workload_type, "deployment");
    // An IPv4-mapped IPv6 address is indexed as the IPv4 one.
    let mut mapped = vec![0u8; 10];
    mapped.extend([0xff, 0xff, 10, 0, 0, 9]);
    let w = workload_from_proto(&wpb::Workload {
        uid: "u".into(),
        namespace: "ns".into(),
        addresses: vec![mapped],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(w.workload_ips, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
}

fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn invalid_workloads_name_the_field() {
    let ok = wpb::Workload {
        uid: "u".into(),
        namespace: "ns".into(),
        ..Default::default()
    };
    let e = err(workload_from_proto(&wpb::Workload {
        addresses: vec![vec![10, 0, 0, 1], vec![1, 2, 3]],
        ..ok.clone()
    }));
    assert_eq!(
        e,
        "addresses[1]: 3 bytes is not an IP address (4 for IPv4, 16 for IPv6)"
    );
    let e = err(workload_from_proto(&wpb::Workload {
        tunnel_protocol: 7,
        ..ok.clone()
    }));
    assert_eq!(e, "tunnelProtocol: unknown enum value 7");
    let e = err(workload_from_proto(&wpb::Workload {
        uid: String::new(),
        ..ok.clone()
    }));
    assert_eq!(e, "uid: missing (required)");
    let e = err(workload_from_proto(&wpb::Workload {
        namespace: String::new(),
        ..ok.clone()
    }));
    assert_eq!(e, "namespace: missing (required)");
    let bad_ports = wpb::PortList {
        ports: vec![wpb::Port {
            service_port: 80,
            target_port: 70000,
            ..Default::default()
        }],
    };
    let e = err(workload_from_proto(&wpb::Workload {
        services: [("ns/h".to_string(), bad_ports)].into(),
        ..ok.clone()
    }));
    assert_eq!(
        e,
        "services[\"ns/h\"].ports[0].targetPort: 70000 is not a port number"
    );
    let e = err(workload_from_proto(&wpb::Workload {
        services: [("nohost".to_string(), wpb::PortList::default())].into(),
        ..ok.clone()
    }));
    assert!(e.starts_with("services[\"nohost\"]: "), "{e}");
    let e = err(address_from_proto(&wpb::Address {
        r#type: Some(wpb::address::Type::Workload(wpb::Workload {
            status: 9,
            ..ok
        })),
    }));
    assert_eq!(e, "workload.status: unknown enum value 9");
    let e = err(address_from_proto(&wpb::Address { r#type: None }));
    assert!(e.contains("neither a workload nor a service"), "{e}");
}

#[test]
fn invalid_services_and_policies_name_the_field() {
    let e = err(service_from_proto(&wpb::Service {
        namespace: "ns".into(),
        hostname: "h".into(),
        addresses: vec![wpb::NetworkAddress {
            network: String::new(),
            address: vec![1; 5],
            ..Default::default()
        }],
        ..Default::default()
    }));
    assert!(e.starts_with("addresses[0].address: 5 bytes"), "{e}");
    let e = err(service_from_proto(&wpb::Service {
        namespace: "ns".into(),
        ..Default::default()
    }));
    assert_eq!(e, "hostname: missing (required)");
    let e = err(service_from_proto(&wpb::Service {
        namespace: "ns".into(),
        hostname: "h".into(),
        waypoint: Some(wpb::GatewayAddress {
            destination: None,
            hbone_mtls_port: 15008,
        }),
        ..Default::default()
    }));
    assert_eq!(e, "waypoint.destination: missing (required)");
    let e = err(service_from_proto(&wpb::Service {
        namespace: "ns".into(),
        hostname: "h".into(),
        waypoint: Some(wpb::GatewayAddress {
            destination: Some(wpb::gateway_address::Destination::Address(
                wpb::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 0, 0, 1],
                    ..Default::default()
                },
            )),
            hbone_mtls_port: 0,
        }),
        ..Default::default()
    }));
    assert_eq!(e, "waypoint.hboneMtlsPort: missing (required)");
    let e = err(service_from_proto(&wpb::Service {
        namespace: "ns".into(),
        hostname: "h".into(),
        ports: vec![wpb::Port::default()],
        ..Default::default()
    }));
    assert_eq!(e, "ports[0].servicePort: port 0 is not a port");

    let policy = |m: spb::Match| spb::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        rules: vec![spb::Rule {
            clauses: vec![spb::Clause {
                matches: vec![spb::Match::default(), m],
            }],
        }],
        ..Default::default()
    };
    let e = err(authorization_from_proto(&policy(spb::Match {
        source_ips: vec![spb::Address {
            address: vec![10, 0, 0, 0],
            length: 33,
        }],
        ..Default::default()
    })));
    assert_eq!(
        e,
        "rules[0].clauses[0].matches[1].sourceIps[0]: prefix length 33 is too long for 10.0.0.0"
    );
    let e = err(authorization_from_proto(&policy(spb::Match {
        principals: vec![spb::StringMatch { match_type: None }],
        ..Default::default()
    })));
    assert!(
        e.starts_with("rules[0].clauses[0].matches[1].principals[0]: a string match without"),
        "{e}"
    );
    let e = err(authorization_from_proto(&policy(spb::Match {
        not_destination_ports: vec![65536],
        ..Default::default()
    })));
    assert_eq!(
        e,
        "rules[0].clauses[0].matches[1].notDestinationPorts[0]: 65536 is not a port number"
    );
    let e = err(authorization_from_proto(&spb::Authorization {
        action: 2,
        ..policy(spb::Match::default())
    }));
    assert_eq!(e, "action: unknown enum value 2");
    let e = err(authorization_from_proto(&spb::Authorization {
        name: String::new(),
        ..policy(spb::Match::default())
    }));
    assert_eq!(e, "name: missing (required)");
    let e = err(authorization_from_proto(&policy(spb::Match {
        not_service_accounts: vec![spb::ServiceAccountMatch {
            namespace: "ns".into(),
            service_account: String::new(),
        }],
        ..Default::default()
    })));
    assert_eq!(
        e,
        "rules[0].clauses[0].matches[1].notServiceAccounts[0].serviceAccount: missing (required)"
    );
}

/// What istiod sends for `from: [{source: {serviceAccounts: [ns/sa]}}]`: the field numbers
/// of upstream's proto (11 and 12 on `Match`, 1 and 2 on `ServiceAccountMatch`), written
/// by hand so a renumbered proto cannot pass.
#[test]
fn service_accounts_arrive_with_upstreams_field_numbers() {
    // Match { service_accounts (11): {namespace: "a", serviceAccount: "b"},
    //         not_service_accounts (12): {namespace: "c", serviceAccount: "d"} }
    let wire = [
        0x5a, 6, 0x0a, 1, b'a', 0x12, 1, b'b', 0x62, 6, 0x0a, 1, b'c', 0x12, 1, b'd',
    ];
    let m = spb::Match::decode(wire.as_slice()).unwrap();
    let policy = spb::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        action: spb::Action::Deny as i32,
        rules: vec![spb::Rule {
            clauses: vec![spb::Clause { matches: vec![m] }],
        }],
        ..Default::default()
    };
    let a = authorization_from_proto(&policy).unwrap();
    let got = &a.rules[0].clauses[0].matches[0];
    let sa = |ns: &str, name: &str| ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    };
    assert_eq!(got.service_accounts, vec![sa("a", "b")]);
    assert_eq!(got.not_service_accounts, vec![sa("c", "d")]);
    // Not an empty match: a DENY with it applies.
    assert!(!got.is_empty());
    assert_eq!(match_to_wire(got), wire);
}

fn match_to_wire(m: &Match) -> Vec<u8> {
    let a = Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        scope: Scope::Global,
        action: Action::Allow,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![m.clone()],
            }],
        }],
        dry_run: false,
    };
    authorization_to_proto(&a).rules[0].clauses[0].matches[0].encode_to_vec()
}

/// Fields of upstream's current protos this proxy does not act on still parse, and the
/// resource converts as if they were absent.
#[test]
fn newer_upstream_fields_parse_and_change_nothing() {
    let ext = || wpb::Extension {
        name: "x".into(),
        config: Some(prost_types::Any {
            type_url: "type.googleapis.com/x".into(),
            value: vec![1, 2],
        }),
    };
    let plain = wpb::Workload {
        uid: "c//Pod/ns/a".into(),
        namespace: "ns".into(),
        services: [(
            "ns/a.ns.svc.cluster.local".to_string(),
            wpb::PortList {
                ports: vec![wpb::Port {
                    service_port: 80,
                    target_port: 8080,
                    app_protocol: 0,
                }],
            },
        )]
        .into(),
        ..Default::default()
    };
    let mut extended = plain.clone();
    extended.extensions = vec![ext()];
    extended.services.values_mut().for_each(|l| {
        l.ports[0].app_protocol = wpb::AppProtocol::Http2 as i32;
    });
    let decoded = wpb::Workload::decode(extended.encode_to_vec().as_slice()).unwrap();
    assert_eq!(
        workload_from_proto(&decoded).unwrap(),
        workload_from_proto(&plain).unwrap()
    );

    let svc = wpb::Service {
        namespace: "ns".into(),
        hostname: "h".into(),
        addresses: vec![wpb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
            length: None,
        }],
        ..Default::default()
    };
    // Extensions are named as ignored; ingress_use_waypoint is for gateways, nothing to do.
    let extended = wpb::Service {
        extensions: vec![ext()],
        ingress_use_waypoint: true,
        ..svc.clone()
    };
    let decoded = wpb::Service::decode(extended.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, extended);
    assert_eq!(
        service_from_proto(&decoded).unwrap(),
        service_from_proto(&svc).unwrap()
    );

    let policy = spb::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        extensions: vec![ext()],
        rules: vec![spb::Rule {
            clauses: vec![spb::Clause {
                matches: vec![spb::Match {
                    destination_ports: vec![80],
                    extensions: vec![ext()],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let decoded = spb::Authorization::decode(policy.encode_to_vec().as_slice()).unwrap();
    let a = authorization_from_proto(&decoded).unwrap();
    assert_eq!(a.rules[0].clauses[0].matches[0].destination_ports, vec![80]);
}

/// A sidecar's workload (Istio mTLS, not HBONE) is refused by name, never taken as
/// plaintext or HBONE.
#[test]
fn legacy_istio_mtls_workloads_are_refused() {
    let e = err(workload_from_proto(&wpb::Workload {
        uid: "c//Pod/ns/a".into(),
        namespace: "ns".into(),
        tunnel_protocol: wpb::TunnelProtocol::LegacyIstioMtls as i32,
        ..Default::default()
    }));
    assert!(e.starts_with("tunnelProtocol: LEGACY_ISTIO_MTLS"), "{e}");
}

#[test]
fn any_of_the_wrong_type_or_garbage_is_rejected() {
    let any = prost_types::Any {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        value: vec![],
    };
    assert!(
        err(decode_address(&any)).contains("expected a type.googleapis.com/istio.workload.Address")
    );
    let any = prost_types::Any {
        type_url: ADDRESS_TYPE_URL.into(),
        value: vec![0xff, 0xff, 0xff],
    };
    assert!(err(decode_address(&any)).starts_with("cannot decode the protobuf"));
}

#[test]
fn workload_policy_references_survive() {
    let cfg = config();
    let w = &cfg.workloads[0];
    let p = workload_to_proto(w);
    assert_eq!(p.authorization_policies, vec!["default/allow-sleep"]);
    let services: BTreeMap<_, _> = p.services.into_iter().collect();
    assert_eq!(
        services["default/echo.default.svc.cluster.local"]
            .ports
            .len(),
        2
    );
}

/// A service's load balancing and a workload's locality arrive and round-trip; an
/// unspecified scope in a routing preference is refused by name.
#[test]
fn load_balancing_and_locality_round_trip() {
    use crate::proto::istio::workload::load_balancing::{HealthPolicy, Mode, Scope};
    let svc = wpb::Service {
        name: "echo".into(),
        namespace: "ns".into(),
        hostname: "echo.ns.svc.cluster.local".into(),
        load_balancing: Some(wpb::LoadBalancing {
            routing_preference: vec![Scope::Network as i32, Scope::Zone as i32],
            mode: Mode::Failover as i32,
            health_policy: HealthPolicy::AllowAll as i32,
        }),
        ..Default::default()
    };
    let state = service_from_proto(&svc).unwrap();
    let lb = state.load_balancing.as_ref().unwrap();
    assert_eq!(
        lb.routing_preference,
        [
            crate::state::load_balancing::Scope::Network,
            crate::state::load_balancing::Scope::Zone
        ]
    );
    assert_eq!(service_to_proto(&state), svc);

    let w = wpb::Workload {
        uid: "c//Pod/ns/a".into(),
        name: "a".into(),
        namespace: "ns".into(),
        trust_domain: "cluster.local".into(),
        service_account: "sa".into(),
        locality: Some(wpb::Locality {
            region: "r1".into(),
            zone: "z1".into(),
            subzone: String::new(),
        }),
        ..Default::default()
    };
    let state = workload_from_proto(&w).unwrap();
    assert_eq!(state.locality.zone, "z1");
    assert_eq!(workload_to_proto(&state), w);

    let bad = wpb::Service {
        load_balancing: Some(wpb::LoadBalancing {
            routing_preference: vec![Scope::UnspecifiedScope as i32],
            ..Default::default()
        }),
        ..svc
    };
    let e = err(service_from_proto(&bad));
    assert!(e.contains("loadBalancing.routingPreference[0]"), "{e}");
}

#[test]
fn service_addresses_with_a_prefix_length_are_ranges() {
    let addr = |address: Vec<u8>, length: Option<u32>| wpb::NetworkAddress {
        network: String::new(),
        address,
        length,
    };
    let svc = |addresses| wpb::Service {
        namespace: "ns".into(),
        hostname: "h".into(),
        addresses,
        ..Default::default()
    };
    // A host's length is a plain VIP, as no length is; a shorter one a range (host bits
    // cleared); one too long is refused by name.
    let s = service_from_proto(&svc(vec![
        addr(vec![10, 96, 0, 1], Some(32)),
        addr(vec![10, 96, 0, 2], None),
        addr(vec![10, 97, 0, 9], Some(24)),
    ]))
    .unwrap();
    assert_eq!(s.vips.len(), 2);
    assert_eq!(s.cidr_vips, ["/10.97.0.0/24".parse().unwrap()]);
    let e = err(service_from_proto(&svc(vec![addr(
        vec![10, 0, 0, 0],
        Some(33),
    )])));
    assert!(e.contains("addresses[0].length") && e.contains("33"), "{e}");
    // A weighted waypoint must say where.
    let mut bad = svc(vec![]);
    bad.weighted_waypoints = vec![wpb::WeightedWaypoint {
        destination: None,
        weight: 3,
    }];
    let e = err(service_from_proto(&bad));
    assert!(e.contains("weightedWaypoints[0].destination"), "{e}");
}
