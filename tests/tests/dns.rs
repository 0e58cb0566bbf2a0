//! The DNS proxy in the data path: an enrolled pod's DNS, over UDP and TCP, to any address,
//! is captured and answered by the node's DNS proxy as if it were the server the pod asked
//! — mesh names from the mesh, the rest through the node's resolver (a stand-in for CoreDNS
//! in a pod); an unenrolled pod's DNS is untouched; with ztunnel down it fails open.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::rr::RecordType;
use ztunnel_tests::dns::{resolve_tcp, resolve_udp, StubDns};
use ztunnel_tests::traffic::{echoes, eventually, EchoServer};
use ztunnel_tests::ztunnel::{capture_counter, local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Node, Pod, Testbed};

const WAIT: Duration = Duration::from_secs(20);
/// What the stand-in CoreDNS answers for every name.
const COREDNS_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);

/// Two nodes: on node-a an enrolled client, a pod outside the mesh and the ztunnel running
/// the DNS proxy (127.0.0.1:15053), its resolver a stand-in CoreDNS in a pod on node-b,
/// beside the echo server behind the `echo` service's VIPs (`vips`). `services` may add
/// more services to the file.
struct Bed {
    tb: Testbed,
    a: Node,
    client: Pod,
    plain: Pod,
    coredns: Pod,
    config: std::path::PathBuf,
    resolv: String,
    za: Ztunnel,
    _zb: Ztunnel,
    _echo: EchoServer,
    _stub: StubDns,
}

impl Bed {
    fn new(vips: &str, services: &str) -> Bed {
        let mut tb = Testbed::new().unwrap();
        let a = tb.add_node("node-a").unwrap();
        let b = tb.add_node("node-b").unwrap();
        let client = tb.add_pod(&a, "client").unwrap();
        let plain = tb.add_pod(&a, "plain").unwrap();
        let server = tb.add_pod(&b, "server").unwrap();
        let coredns = tb.add_pod(&b, "coredns").unwrap();
        let echo = EchoServer::start(&server.netns, 8080).unwrap();
        let stub = StubDns::start(&coredns.netns, COREDNS_ANSWER).unwrap();
        let mut server_spec = WorkloadSpec::mesh(&server, "default", "server");
        server_spec.extra =
            "  services:\n    default/echo.default.svc.cluster.local: {80: 8080}\n".into();
        let services = format!(
            "services:\n- name: echo\n  namespace: default\n  \
             hostname: echo.default.svc.cluster.local\n  vips: [{vips}]\n  \
             ports: {{80: 8080}}\n{services}"
        );
        let yaml = local_config(
            &[
                WorkloadSpec::mesh(&client, "default", "client"),
                WorkloadSpec::plain(&plain, "default"),
                server_spec,
            ],
            &services,
        );
        let config = tb.write_config("workloads.yaml", &yaml).unwrap();
        // The node's resolver is the stand-in CoreDNS.
        let resolv = tb
            .write_config("resolv.conf", &format!("nameserver {}\n", coredns.ip))
            .unwrap()
            .display()
            .to_string();
        let args = dns_args(&resolv);
        let za = tb.start_ztunnel(&a, &config, &args).unwrap();
        let zb = tb.start_ztunnel(&b, &config, &[]).unwrap();
        Bed {
            tb,
            a,
            client,
            plain,
            coredns,
            config,
            resolv,
            za,
            _zb: zb,
            _echo: echo,
            _stub: stub,
        }
    }

    /// Another ztunnel on node-a with the same arguments (a restart, or an upgrade while
    /// one runs).
    fn start_a(&self) -> Ztunnel {
        let args = dns_args(&self.resolv);
        self.tb.start_ztunnel(&self.a, &self.config, &args).unwrap()
    }
}

fn dns_args(resolv: &str) -> [&str; 4] {
    [
        "--dns-proxy-addr",
        "127.0.0.1:15053",
        "--dns-upstream",
        resolv,
    ]
}

#[test]
fn enrolled_pods_dns_over_tcp_is_answered_by_the_mesh() {
    require_root!();
    let bed = Bed::new("\"/10.96.0.50\"", "");
    let (client, plain, coredns) = (&bed.client, &bed.plain, &bed.coredns);
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

#[test]
fn enrolled_pods_dns_over_udp_is_answered_by_the_mesh_and_fails_open() {
    require_root!();
    // A service with both families' VIPs, and a ServiceEntry host with an (auto-allocated
    // style) VIP that no resolver but the mesh's knows.
    let bed = Bed::new(
        "\"/10.96.0.50\", \"/fd00:96::50\"",
        "- name: api\n  namespace: default\n  hostname: api.example.com\n  \
         vips: [\"/240.240.0.7\"]\n  ports: {443: 443}\n",
    );
    let (a, client, plain, coredns) = (&bed.a, &bed.client, &bed.plain, &bed.coredns);
    let short = Duration::from_secs(1);
    let kube_dns: SocketAddr = "10.96.0.10:53".parse().unwrap();
    let kube_dns6: SocketAddr = "[fd00:96::10]:53".parse().unwrap();
    let stub: SocketAddr = SocketAddr::new(coredns.ip.into(), 53);
    let vip: IpAddr = "10.96.0.50".parse().unwrap();
    let vip6: IpAddr = "fd00:96::50".parse().unwrap();
    let echo = "echo.default.svc.cluster.local.";
    let ask = |pod: &ztunnel_tests::Pod, to: SocketAddr, name: &str, t: RecordType| {
        resolve_udp(&pod.netns, to, name, t, short)
    };
    // To the cluster DNS's address (which nothing here serves): answered by the mesh, from
    // the address the pod asked.
    eventually("the mesh answers over UDP", WAIT, || {
        ask(client, kube_dns, echo, RecordType::A).is_ok_and(|r| r == (vec![vip], kube_dns))
    });
    // The forms the pod's search domains make, as its resolver tries them.
    for name in [
        "echo.default.default.svc.cluster.local.",
        "echo.default.svc.cluster.local.default.svc.cluster.local.",
    ] {
        assert_eq!(
            ask(client, kube_dns, name, RecordType::A).unwrap().0,
            [vip],
            "{name}"
        );
    }
    // A ServiceEntry host: its VIP, known only to the mesh.
    assert_eq!(
        ask(client, kube_dns, "api.example.com.", RecordType::A)
            .unwrap()
            .0,
        ["240.240.0.7".parse::<IpAddr>().unwrap()]
    );
    // IPv6: asked over IPv6, AAAA answered from the IPv6 server address asked.
    assert_eq!(
        ask(client, kube_dns6, echo, RecordType::AAAA).unwrap(),
        (vec![vip6], kube_dns6)
    );
    // A name the mesh does not know: through the node's resolver.
    assert_eq!(
        ask(client, kube_dns, "www.example.org.", RecordType::A).unwrap(),
        (vec![IpAddr::V4(COREDNS_ANSWER)], kube_dns)
    );
    // Asked of the real server's address, a mesh name is still the mesh's answer, from it.
    assert_eq!(
        ask(client, stub, echo, RecordType::A).unwrap(),
        (vec![vip], stub)
    );
    // A pod outside the mesh asks the server itself, and the cluster address stays silent.
    assert_eq!(
        ask(plain, stub, echo, RecordType::A).unwrap(),
        (vec![IpAddr::V4(COREDNS_ANSWER)], stub)
    );
    assert!(ask(plain, kube_dns, echo, RecordType::A).is_err());
    // Nor is a question to the node's own address taken (a node-local resolver would hold
    // its port 53): nothing serves it here, so it goes unanswered.
    let node_dns = SocketAddr::new(a.ip.into(), 53);
    assert!(ask(client, node_dns, echo, RecordType::A).is_err());
    // The proxy's own address still answers (on the node: 127.0.0.1:15053), from itself.
    let own: SocketAddr = "127.0.0.1:15053".parse().unwrap();
    assert_eq!(
        resolve_udp(&a.netns, own, echo, RecordType::A, short).unwrap(),
        (vec![vip], own)
    );
    // What the pod got reaches the service through the mesh.
    assert!(echoes(&client.netns, SocketAddr::new(vip, 80)));
    let captured = capture_counter(a, client, "dns_captured").unwrap();
    // Six questions over IPv4 (the IPv6 one counts on the pod's IPv6 address).
    assert!(captured >= 6, "dns_captured {captured}");

    // ztunnel killed: the pod's DNS goes where it was sent (fails open): the real server
    // answers; a name only the mesh knew does not resolve there.
    bed.tb.kill(bed.za.pid);
    assert_eq!(
        ask(client, stub, echo, RecordType::A).unwrap(),
        (vec![IpAddr::V4(COREDNS_ANSWER)], stub)
    );
    assert!(ask(client, kube_dns, echo, RecordType::A).is_err());
    // Back: the mesh answers again; the counters (pinned) saw the questions passed on.
    let za = bed.start_a();
    eventually("the mesh answers again", WAIT, || {
        ask(client, kube_dns, echo, RecordType::A).is_ok_and(|r| r == (vec![vip], kube_dns))
    });
    assert!(capture_counter(a, client, "dns_passed").unwrap() >= 2);

    // An upgrade: the new ztunnel takes the DNS sockets over with the listeners (binding
    // them beside the running one's would fail), and answers once the old one is gone.
    let next = bed.start_a();
    next.wait_for_log("took over the running ztunnel's listeners", WAIT)
        .unwrap();
    za.wait_for_log("a new ztunnel took over: draining", WAIT)
        .unwrap();
    bed.tb.stop(za.pid, WAIT).expect("old process");
    assert_eq!(
        ask(client, kube_dns, echo, RecordType::A).unwrap(),
        (vec![vip], kube_dns)
    );
    assert!(echoes(&client.netns, SocketAddr::new(vip, 80)));

    // An upgrade that cannot take the DNS sockets (here: capture switched off, so the
    // proxy wants its own address bound plainly, which the predecessor's wildcard socket
    // holds): the data path is taken over all the same, and DNS fails open meanwhile.
    let mut args = dns_args(&bed.resolv).to_vec();
    args.extend(["--dns-capture", "false"]);
    let odd = bed.tb.start_ztunnel(a, &bed.config, &args).unwrap();
    odd.wait_for_log("DNS proxy sockets not served after the takeover", WAIT)
        .unwrap();
    next.wait_for_log("a new ztunnel took over: draining", WAIT)
        .unwrap();
    bed.tb.stop(next.pid, WAIT).expect("old process");
    assert!(echoes(&client.netns, SocketAddr::new(vip, 80)));
    assert_eq!(
        ask(client, stub, echo, RecordType::A).unwrap(),
        (vec![IpAddr::V4(COREDNS_ANSWER)], stub)
    );
}
