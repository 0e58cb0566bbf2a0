//! Which endpoint a service's connections reach, end to end, from the workload file and
//! over xDS: routing preference (FAILOVER, STRICT) by locality, the health policy,
//! capacity, a PASSTHROUGH service, and a service that stands for an address range — all
//! on a named network (`--network net1`), as a multi-cluster install would be.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ztunnel_tests::traffic::{echoes, eventually, EchoServer};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Node, Pod, Testbed};

const WAIT: Duration = Duration::from_secs(20);
/// Connections per check.
const N: usize = 12;

#[test]
fn endpoints_follow_load_balancing_from_the_workload_file() {
    require_root!();
    run(Via::File);
}

#[test]
fn endpoints_follow_load_balancing_over_xds() {
    require_root!();
    run(Via::Xds);
}

#[derive(Clone, Copy)]
enum Via {
    File,
    Xds,
}

/// One version of the file: each server's extra fields, and the services' load balancing.
struct Phase<'a> {
    near: &'a str,
    far: &'a str,
    echo_lb: &'a str,
    ext_lb: &'a str,
}

fn run(via: Via) {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let c = tb.add_node("node-c").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let near = tb.add_pod(&b, "near").unwrap();
    let far = tb.add_pod(&c, "far").unwrap();
    // Not in the file: reached only by passing through.
    let ext = tb.add_pod(&c, "ext").unwrap();
    let near_echo = EchoServer::start(&near.netns, 8080).unwrap();
    let far_echo = EchoServer::start(&far.netns, 8080).unwrap();
    let ext_echo = EchoServer::start(&ext.netns, 8080).unwrap();

    let file = |p: &Phase| config(&client, &near, &far, &ext, p);
    let first = Phase {
        near: "",
        far: "",
        echo_lb: "{routingPreferences: [Zone], mode: Failover}",
        ext_lb: "{mode: Standard}",
    };
    let path = tb.write_config("workloads.yaml", &file(&first)).unwrap();
    let cp = match via {
        Via::File => None,
        Via::Xds => Some(tb.add_node("cp").unwrap()),
    };
    let _nodes = start(&tb, cp, &path, &[&a, &b, &c]);

    let vip: SocketAddr = "10.96.0.50:80".parse().unwrap();
    let count = |what: &str| -> (usize, usize) {
        near_echo.drain();
        far_echo.drain();
        for _ in 0..N {
            assert!(echoes(&client.netns, vip), "{what}: a connection failed");
        }
        (near_echo.drain().len(), far_echo.drain().len())
    };

    // FAILOVER by zone: every connection to the endpoint in the client's zone.
    eventually("the mesh serves the VIP", WAIT, || {
        echoes(&client.netns, vip)
    });
    assert_eq!(count("failover, both healthy"), (N, 0));
    // A service with no endpoint, not PASSTHROUGH: refused, the address never reached.
    let ext_dst = SocketAddr::new(IpAddr::V4(ext.ip), 8080);
    assert!(!echoes(&client.netns, ext_dst));
    assert!(ext_echo.drain().is_empty(), "refused, not passed through");

    // The near endpoint turns unhealthy: FAILOVER goes to the next zone.
    let unhealthy = "  status: Unhealthy\n";
    apply(
        &path,
        file(&Phase {
            near: unhealthy,
            ..first
        }),
    );
    eventually("failover to the far zone", WAIT, || {
        far_echo.drain();
        echoes(&client.netns, vip) && !far_echo.drain().is_empty()
    });
    assert_eq!(count("failover, near unhealthy"), (0, N));

    // STRICT: only the client's zone, and nobody healthy there: refused.
    let strict = Phase {
        near: unhealthy,
        echo_lb: "{routingPreferences: [Zone], mode: Strict}",
        ..first
    };
    apply(&path, file(&strict));
    eventually("strict refuses", WAIT, || !echoes(&client.netns, vip));
    far_echo.drain();
    assert!(!echoes(&client.netns, vip));
    assert!(far_echo.drain().is_empty(), "STRICT never leaves the zone");

    // ALLOW_ALL: the unhealthy endpoint may be picked again.
    apply(
        &path,
        file(&Phase {
            echo_lb: "{routingPreferences: [Zone], mode: Strict, healthPolicy: AllowAll}",
            ..strict
        }),
    );
    eventually("allow-all serves", WAIT, || echoes(&client.netns, vip));
    assert_eq!(count("strict, allow all"), (N, 0));

    // No preference; capacity 0 takes the near endpoint out. The range reaches the service
    // too, and the PASSTHROUGH service sends the connection to the address dialled.
    apply(
        &path,
        file(&Phase {
            near: "  capacity: 0\n",
            far: "  capacity: 3\n",
            echo_lb: "{}",
            ext_lb: "{mode: Passthrough}",
        }),
    );
    eventually("capacity applies", WAIT, || {
        near_echo.drain();
        echoes(&client.netns, vip) && near_echo.drain().is_empty()
    });
    assert_eq!(count("capacity"), (0, N));
    let in_range: SocketAddr = "10.250.0.9:80".parse().unwrap();
    assert!(echoes(&client.netns, in_range), "an address of the range");
    assert_eq!(far_echo.drain().len(), 1);
    eventually("passthrough", WAIT, || echoes(&client.netns, ext_dst));
    assert!(!ext_echo.drain().is_empty());
}

/// The workload file: every workload on `net1`; the client in zone z1, `near` in z1 on
/// another node, `far` in z2. `echo` has a VIP and a range; `ext`'s VIP is the address
/// of a pod that is not in the file.
fn config(client: &Pod, near: &Pod, far: &Pod, ext: &Pod, p: &Phase) -> String {
    let at = |pod: &Pod, sa: &str, zone: &str, extra: &str, endpoint: bool| {
        let mut w = WorkloadSpec::mesh(pod, "default", sa);
        w.extra = format!("  network: net1\n  locality: {{region: r1, zone: {zone}}}\n{extra}");
        if endpoint {
            w.extra
                .push_str("  services:\n    default/echo.default.svc.cluster.local: {80: 8080}\n");
        }
        w
    };
    let services = format!(
        "services:\n\
         - name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  \
           vips: [\"net1/10.96.0.50\"]\n  cidrVips: [\"net1/10.250.0.0/24\"]\n  ports: {{80: 8080}}\n  \
           loadBalancer: {}\n\
         - name: ext\n  namespace: default\n  hostname: ext.example.com\n  \
           vips: [\"net1/{}\"]\n  loadBalancer: {}\n",
        p.echo_lb, ext.ip, p.ext_lb
    );
    local_config(
        &[
            at(client, "client", "z1", "", false),
            at(near, "server", "z1", p.near, true),
            at(far, "server", "z2", p.far, true),
        ],
        &services,
    )
}

fn apply(path: &Path, yaml: String) {
    std::fs::write(path, yaml).unwrap();
}

/// The nodes' ztunnels on `net1`, from the file, or (with a control-plane node) from a
/// control plane serving it over xDS.
fn start(tb: &Testbed, cp: Option<Node>, path: &Path, nodes: &[&Node]) -> Vec<Ztunnel> {
    let net = ["--network", "net1"];
    let Some(cp_node) = cp else {
        return nodes
            .iter()
            .map(|n| tb.start_ztunnel(n, path, &net).unwrap())
            .collect();
    };
    let cp = tb.start_controlplane(&cp_node, path, &[]).unwrap();
    nodes
        .iter()
        .map(|n| {
            let mut args = cp.node_args(n);
            args.extend(["--xds-address".to_string(), cp.url.clone()]);
            args.extend(net.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tb.start_ztunnel_with(n, &args).unwrap()
        })
        .collect()
}
