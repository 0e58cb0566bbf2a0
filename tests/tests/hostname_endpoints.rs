//! Endpoints known by hostname only (a ServiceEntry with `resolution: DNS`): the client's
//! ztunnel looks the name up with the node's resolver (`--dns-upstream`, here a stand-in
//! DNS server in a pod) when a connection picks the endpoint, and connects to what it
//! found — plaintext for an endpoint outside the mesh, HBONE for one in it. A name the
//! resolver does not know refuses the connection, and says why in the access log. From
//! the workload file and over xDS alike.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ztunnel_tests::dns::StubDns;
use ztunnel_tests::traffic::{echoes, eventually, EchoServer};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Node, Testbed};

const WAIT: Duration = Duration::from_secs(20);
const T: Duration = Duration::from_secs(5);

/// The one endpoint of the ServiceEntry `name.example.com` (port 80 → 8080), known by
/// `hostname` only: a workload for the workload list, as istiod describes it.
fn endpoint(name: &str, hostname: &str, protocol: &str, sa: &str) -> String {
    format!(
        "- uid: Kubernetes/networking.istio.io/ServiceEntry/default/{name}/{hostname}\n  \
         name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  hostname: {hostname}\n  \
         protocol: {protocol}\n  services:\n    default/{name}.example.com: {{80: 8080}}\n"
    )
}

#[test]
fn hostname_endpoints_are_looked_up_when_a_connection_picks_them() {
    require_root!();
    run(false);
}

#[test]
fn hostname_endpoints_over_xds_are_looked_up_too() {
    require_root!();
    run(true);
}

fn run(xds: bool) {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    // Outside the mesh and not in the file: known to the client only by name.
    let external = tb.add_pod(&b, "external").unwrap();
    // In the mesh: a VM-like workload reached by name, through HBONE.
    let vm = tb.add_pod(&b, "vm").unwrap();
    let coredns = tb.add_pod(&b, "coredns").unwrap();
    let external_echo = EchoServer::start(&external.netns, 8080).unwrap();
    let vm_echo = EchoServer::start(&vm.netns, 8080).unwrap();
    let _stub = StubDns::start_names(
        &coredns.netns,
        &[("api.example.com", external.ip), ("vm.example.com", vm.ip)],
    )
    .unwrap();

    let endpoints = [
        endpoint("api", "api.example.com", "TCP", "default"),
        endpoint("vm", "vm.example.com", "HBONE", "vm"),
        // The resolver answers NXDOMAIN for it.
        endpoint("gone", "gone.example.com", "TCP", "default"),
    ]
    .concat();
    let services = ["api", "vm", "gone"]
        .iter()
        .zip(["240.240.0.1", "240.240.0.2", "240.240.0.3"])
        .map(|(name, vip)| {
            format!(
                "- name: {name}\n  namespace: default\n  hostname: {name}.example.com\n  \
                 vips: [\"/{vip}\"]\n  ports: {{80: 8080}}\n"
            )
        })
        .collect::<String>();
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&client, "default", "client"),
            WorkloadSpec::mesh(&vm, "default", "vm"),
        ],
        &format!("{endpoints}services:\n{services}"),
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    let resolv = tb
        .write_config("resolv.conf", &format!("nameserver {}\n", coredns.ip))
        .unwrap();
    let resolv = resolv.display().to_string();
    let cp = xds.then(|| tb.add_node("cp").unwrap());
    let (za, _zb) = start(&tb, cp, &config, &a, &b, &resolv);

    // Outside the mesh: plaintext to the address found, with the client's address.
    let api: SocketAddr = "240.240.0.1:80".parse().unwrap();
    eventually("the name is looked up and reached", WAIT, || {
        echoes(&client.netns, api)
    });
    let (peer, local) = external_echo.next_accepted(T).unwrap();
    assert_eq!(peer.ip(), IpAddr::V4(client.ip), "the pod's own address");
    assert_eq!(local, SocketAddr::new(external.ip.into(), 8080));
    za.wait_for_line(
        &[
            "connection complete",
            "dst.service=\"api.example.com\"",
            &format!("dst.target={}:8080", external.ip),
            "protocol=\"TCP\"",
            "outcome=\"ok\"",
        ],
        T,
    )
    .unwrap();

    // In the mesh: HBONE to the address found, the vm's identity required.
    let vm_vip: SocketAddr = "240.240.0.2:80".parse().unwrap();
    assert!(echoes(&client.netns, vm_vip));
    assert!(vm_echo.next_accepted(T).is_some());
    za.wait_for_line(
        &[
            "connection complete",
            "dst.service=\"vm.example.com\"",
            &format!("dst.target={}:8080", vm.ip),
            "protocol=\"HBONE\"",
            "outcome=\"ok\"",
        ],
        T,
    )
    .unwrap();

    // A name the resolver does not know: refused, nothing reached, the reason logged.
    external_echo.drain();
    vm_echo.drain();
    let gone: SocketAddr = "240.240.0.3:80".parse().unwrap();
    let started = std::time::Instant::now();
    assert!(!echoes(&client.netns, gone), "an unresolvable endpoint");
    assert!(started.elapsed() < T, "refused at once, not left to hang");
    assert!(external_echo.drain().is_empty() && vm_echo.drain().is_empty());
    za.wait_for_line(
        &[
            "connection complete",
            "dst.service=\"gone.example.com\"",
            "could not resolve gone.example.com: no such name (NXDOMAIN)",
        ],
        T,
    )
    .unwrap();
    // Each lookup counted under Istio's name, by hostname.
    for host in ["api.example.com", "vm.example.com", "gone.example.com"] {
        let prefix = "istio_on_demand_dns_total{";
        let counted = metric_line(&a, prefix, &format!("hostname=\"{host}\""));
        assert!(counted >= 1, "{prefix}…hostname={host}");
    }
}

/// The sum of the metric lines of the ztunnel on `node` that start with `prefix` and hold
/// `label`.
fn metric_line(node: &Node, prefix: &str, label: &str) -> u64 {
    let metrics = SocketAddr::from(([127, 0, 0, 1], 15020));
    let (_, body) = ztunnel_tests::http::get(&node.netns, metrics, "/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with(prefix) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// node-a's ztunnel (the node's resolver from `resolv`) and node-b's, from the file, or
/// (with a control-plane node) over xDS from a control plane serving it.
fn start(
    tb: &Testbed,
    cp: Option<Node>,
    config: &Path,
    a: &Node,
    b: &Node,
    resolv: &str,
) -> (Ztunnel, Ztunnel) {
    let dns = ["--dns-upstream", resolv];
    let Some(cp_node) = cp else {
        return (
            tb.start_ztunnel(a, config, &dns).unwrap(),
            tb.start_ztunnel(b, config, &[]).unwrap(),
        );
    };
    let cp = tb.start_controlplane(&cp_node, config, &[]).unwrap();
    let mut started = [a, b].into_iter().map(|n| {
        let mut args = cp.node_args(n);
        args.extend(["--xds-address".to_string(), cp.url.clone()]);
        if n.name == a.name {
            args.extend(dns.iter().map(|s| s.to_string()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tb.start_ztunnel_with(n, &args).unwrap()
    });
    (started.next().unwrap(), started.next().unwrap())
}
