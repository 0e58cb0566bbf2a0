//! The DNS proxy in the data path, as far as it goes: an enrolled pod's DNS over TCP, to
//! any address, is captured with the rest of its TCP and answered by the node's DNS proxy
//! as if it were the server the pod asked — mesh names from the mesh, the rest through the
//! node's resolver (a stand-in for CoreDNS in a pod); an unenrolled pod's DNS is untouched.
//! (DNS over UDP is not captured yet.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ztunnel_tests::dns::{resolve_tcp, StubDns};
use ztunnel_tests::traffic::{echoes, eventually, EchoServer};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec};
use ztunnel_tests::{require_root, Testbed};

const WAIT: Duration = Duration::from_secs(20);
/// What the stand-in CoreDNS answers for every name.
const COREDNS_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

#[test]
fn enrolled_pods_dns_over_tcp_is_answered_by_the_mesh() {
    require_root!();
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let plain = tb.add_pod(&a, "plain").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let coredns = tb.add_pod(&b, "coredns").unwrap();
    let _echo = EchoServer::start(&server.netns, 8080).unwrap();
    let _stub = StubDns::start(&coredns.netns, COREDNS_ANSWER).unwrap();
    let mut server_spec = WorkloadSpec::mesh(&server, "default", "server");
    server_spec.extra =
        "  services:\n    default/echo.default.svc.cluster.local: {80: 8080}\n".into();
    let services = "services:\n- name: echo\n  namespace: default\n  \
                    hostname: echo.default.svc.cluster.local\n  vips: [\"/10.96.0.50\"]\n  \
                    ports: {80: 8080}\n";
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&client, "default", "client"),
            WorkloadSpec::plain(&plain, "default"),
            server_spec,
        ],
        services,
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    // The node's resolver is the stand-in CoreDNS.
    let resolv = tb
        .write_config("resolv.conf", &format!("nameserver {}\n", coredns.ip))
        .unwrap();
    let resolv = resolv.display().to_string();
    let dns_args = [
        "--dns-proxy-addr",
        "127.0.0.1:15053",
        "--dns-upstream",
        &resolv,
    ];
    let _za = tb.start_ztunnel(&a, &config, &dns_args).unwrap();
    let _zb = tb.start_ztunnel(&b, &config, &[]).unwrap();

    let kube_dns: SocketAddr = "10.96.0.10:53".parse().unwrap();
    let stub: SocketAddr = SocketAddr::new(coredns.ip.into(), 53);
    let vip: IpAddr = "10.96.0.50".parse().unwrap();
    let echo = "echo.default.svc.cluster.local.";
    // To the cluster DNS's address (which nothing here serves): answered by the mesh.
    eventually("the mesh answers", WAIT, || {
        resolve_tcp(&client.netns, kube_dns, echo).is_ok_and(|ips| ips == [vip])
    });
    // A name the mesh does not know: through the node's resolver.
    assert_eq!(
        resolve_tcp(&client.netns, kube_dns, "www.example.org.").unwrap(),
        [IpAddr::V4(COREDNS_ANSWER)]
    );
    // Even asked of the real server's address, a mesh name is the mesh's answer.
    assert_eq!(resolve_tcp(&client.netns, stub, echo).unwrap(), [vip]);
    // A pod outside the mesh asks the server itself.
    assert_eq!(
        resolve_tcp(&plain.netns, stub, echo).unwrap(),
        [IpAddr::V4(COREDNS_ANSWER)]
    );
    // And what the pod got reaches the service through the mesh.
    assert!(echoes(&client.netns, SocketAddr::new(vip, 80)));
}
