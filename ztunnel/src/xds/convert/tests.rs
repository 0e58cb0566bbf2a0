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
