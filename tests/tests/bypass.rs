//! No way around the policy through the node's NAT: connections that become connections
//! to an enrolled pod only on their way through the node (kube-proxy's DNAT of a
//! ClusterIP, of a NodePort) are judged at the last hop into the pod, by its policy, with
//! their source as the pod sees it. Each case is an attack with the expected refusal: the
//! server never sees the connection; ztunnel's access log and metrics show the refusal.
//!
//! Runs on the layout `TESTBED_LAYOUT` names (`cargo xtask layouts`), in either attachment
//! mode (`TC_ATTACH=legacy`).

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use ztunnel_tests::kube_proxy::{self, Service};
use ztunnel_tests::traffic::{connect, echo_round_trip, eventually, EchoServer};
use ztunnel_tests::ztunnel::{local_config, metric, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Netns, Node, Pod, Testbed};

const T: Duration = Duration::from_secs(5);
/// Long enough for the first retransmission of a SYN (1 s): the first one asks ztunnel
/// and is dropped; the answer is in place for the next.
const ALLOWED: Duration = Duration::from_secs(4);
/// Two retransmissions' worth: a refused connection is never answered.
const REFUSED: Duration = Duration::from_millis(3500);

const SERVICE_PORT: u16 = 80;
const NODE_PORT_SERVER: u16 = 30080;
const NODE_PORT_OPEN: u16 = 30081;

/// Node a: `server` (mesh, namespace `default`, its policy admits the `client` identity and
/// `friend`'s address only), `open` (mesh, namespace `open`, no policy), `friend` and
/// `intruder` (outside the mesh). Node b: `client` (mesh) and `outside` (outside the
/// mesh). kube-proxy's rules on node a: a ClusterIP for `server` and for `open`, a NodePort
/// for each.
struct Bed {
    tb: Testbed,
    a: Node,
    b: Node,
    server: Pod,
    friend: Pod,
    intruder: Pod,
    outside: Pod,
    client: Pod,
    server_echo: EchoServer,
    config: std::path::PathBuf,
}

fn v4(p: &Pod, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(p.ip, port)
}

fn bed() -> Bed {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let server = tb.add_pod(&a, "server").unwrap();
    let open = tb.add_pod(&a, "open").unwrap();
    let friend = tb.add_pod(&a, "friend").unwrap();
    let intruder = tb.add_pod(&a, "intruder").unwrap();
    let client = tb.add_pod(&b, "client").unwrap();
    let outside = tb.add_pod(&b, "outside").unwrap();
    let server_echo = EchoServer::start(&server.netns, 8080).unwrap();
    std::mem::forget(EchoServer::start(&open.netns, 8080).unwrap());
    let policy = format!(
        "policies:\n- name: server-callers\n  namespace: default\n  scope: Namespace\n  action: Allow\n  rules:\n  \
         - - - principals: [\"cluster.local/ns/default/sa/client\"]\n  \
         - - - sourceIps: [\"{}/32\"]\n",
        friend.ip
    );
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&server, "default", "server"),
            WorkloadSpec::mesh(&open, "open", "open"),
            WorkloadSpec::plain(&friend, "default"),
            WorkloadSpec::plain(&intruder, "default"),
            WorkloadSpec::mesh(&client, "default", "client"),
            WorkloadSpec::plain(&outside, "default"),
        ],
        &policy,
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    kube_proxy::install(
        &a.netns,
        &[
            Service::ClusterIp {
                vip: kube_proxy::vip(10, SERVICE_PORT),
                endpoint: v4(&server, 8080),
            },
            Service::ClusterIp {
                vip: kube_proxy::vip(11, SERVICE_PORT),
                endpoint: v4(&open, 8080),
            },
            Service::NodePort {
                port: NODE_PORT_SERVER,
                endpoint: v4(&server, 8080),
            },
            Service::NodePort {
                port: NODE_PORT_OPEN,
                endpoint: v4(&open, 8080),
            },
        ],
    )
    .unwrap();
    Bed {
        tb,
        a,
        b,
        server,
        friend,
        intruder,
        outside,
        client,
        server_echo,
        config,
    }
}

impl Bed {
    /// ztunnel on `node`, once it enrolled its mesh pods (two on a, one on b).
    fn start(&self, node: &Node, extra: &[&str]) -> Ztunnel {
        let log = self.tb.dir().join(format!("ztunnel-{}.log", node.name));
        let from = std::fs::metadata(&log)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let z = self.tb.start_ztunnel(node, &self.config, extra).unwrap();
        let want = if node.name == self.a.name { 2 } else { 1 };
        eventually("pods enrolled", T * 2, || {
            z.log_text()
                .get(from..)
                .unwrap_or("")
                .matches("workload enrolled")
                .count()
                >= want
        });
        z
    }

    /// Whether the server accepted a connection from `src` since the last call.
    fn server_saw(&self, src: IpAddr) -> bool {
        self.server_echo
            .drain()
            .iter()
            .any(|(peer, _)| peer.ip() == src)
    }
}

fn echoes(ns: &Netns, dst: SocketAddr, timeout: Duration) -> bool {
    match connect(ns, dst, timeout) {
        Ok(mut s) => echo_round_trip(&mut s, b"last hop").ok().as_deref() == Some(b"last hop"),
        Err(_) => false,
    }
}

fn node_port(node: &Node, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(node.ip), port)
}

/// A pod outside the mesh reaches an enrolled pod on its own node through a ClusterIP
/// (kube-proxy's DNAT in the node): before the last hop it got in past the policy. Now
/// it is refused, the server never sees it, ztunnel logs and counts the refusal; an
/// address the policy names still gets in the same way.
#[test]
fn same_node_cluster_ip_meets_the_policy() {
    require_root!();
    let bed = bed();
    let za = bed.start(&bed.a, &[]);
    let vip = SocketAddr::V4(kube_proxy::vip(10, SERVICE_PORT));

    assert!(
        !echoes(&bed.intruder.netns, vip, REFUSED),
        "the intruder reached the server through its ClusterIP"
    );
    assert!(
        !bed.server_saw(bed.intruder.ip.into()),
        "the server saw the intruder"
    );
    let line = za
        .wait_for_line(
            &[
                "connection complete",
                &bed.intruder.ip.to_string(),
                "denied by policy",
            ],
            T,
        )
        .unwrap();
    assert!(
        line.contains(&format!("dst.addr={}:8080", bed.server.ip)),
        "{line}"
    );
    assert!(metric(&bed.a, "ztunnel_last_hop_syns{result=\"asked\"}") >= 1);
    assert!(metric(&bed.a, "ztunnel_last_hop_syns{result=\"denied\"}") >= 1);
    assert!(
        metric(
            &bed.a,
            "ztunnel_connections_total{direction=\"inbound\",outcome=\"denied\",reason=\"policy_denied\"}"
        ) >= 1
    );

    // The address the policy admits, the same way in.
    assert!(echoes(&bed.friend.netns, vip, ALLOWED), "friend refused");
    assert!(bed.server_saw(bed.friend.ip.into()));
    assert!(metric(&bed.a, "ztunnel_last_hop_syns{result=\"allowed\"}") >= 1);
    // A pod without a policy is reached through its ClusterIP as before.
    let open_vip = SocketAddr::V4(kube_proxy::vip(11, SERVICE_PORT));
    assert!(echoes(&bed.intruder.netns, open_vip, ALLOWED));
    // The mesh identity the policy names, from the other node, directly.
    let _zb = bed.start(&bed.b, &[]);
    assert!(echoes(
        &bed.client.netns,
        SocketAddr::new(bed.server.ip.into(), 8080),
        T
    ));
}

/// A NodePort from another node: kube-proxy DNATs it to the enrolled pod and masquerades
/// it (its 0x4000 mark). The pod's policy admits neither that source nor the node's, so
/// it is refused; a NodePort of a pod without policy works.
#[test]
fn node_port_from_another_node_meets_the_policy() {
    require_root!();
    let bed = bed();
    let _za = bed.start(&bed.a, &[]);
    assert!(echoes(
        &bed.outside.netns,
        node_port(&bed.a, NODE_PORT_OPEN),
        ALLOWED
    ));
    let before = metric(&bed.a, "ztunnel_last_hop_syns{result=\"denied\"}");
    assert!(
        !echoes(
            &bed.outside.netns,
            node_port(&bed.a, NODE_PORT_SERVER),
            REFUSED
        ),
        "a NodePort reached the server past its policy"
    );
    let seen = bed.server_echo.drain();
    assert!(seen.is_empty(), "the server accepted {seen:?}");
    assert!(metric(&bed.a, "ztunnel_last_hop_syns{result=\"denied\"}") > before);
}

/// The node's own connections (kubelet's probes) are exempt by default; with
/// `--host-probes policy` they meet the policy like any other source, and this one
/// admits no node address.
#[test]
fn host_probes_are_exempt_unless_put_under_policy() {
    require_root!();
    let bed = bed();
    let za = bed.start(&bed.a, &[]);
    let server = SocketAddr::new(bed.server.ip.into(), 8080);
    assert!(echoes(&bed.a.netns, server, T), "probe refused");
    assert!(metric(&bed.a, "ztunnel_last_hop_syns{result=\"from_node\"}") >= 1);
    // Through the ClusterIP too (kube-proxy's OUTPUT rule).
    assert!(echoes(
        &bed.a.netns,
        SocketAddr::V4(kube_proxy::vip(10, SERVICE_PORT)),
        T
    ));
    bed.tb.stop(za.pid, T);

    let za = bed.start(&bed.a, &["--host-probes", "policy"]);
    bed.server_echo.drain();
    assert!(
        !echoes(&bed.a.netns, server, REFUSED),
        "the node's connection got past the policy"
    );
    assert!(bed.server_echo.drain().is_empty());
    za.wait_for_line(
        &[
            "connection complete",
            "denied by policy",
            &format!("dst.addr={server}"),
        ],
        T,
    )
    .unwrap();
}

/// Without ztunnel nobody answers: a source it never judged is refused (fail closed),
/// while one it allowed keeps its cached verdict. A new ztunnel forgets the verdicts and
/// answers again.
#[test]
fn without_ztunnel_new_sources_are_refused() {
    require_root!();
    let bed = bed();
    let za = bed.start(&bed.a, &[]);
    let vip = SocketAddr::V4(kube_proxy::vip(10, SERVICE_PORT));
    assert!(echoes(&bed.friend.netns, vip, ALLOWED));
    bed.tb.kill(za.pid);
    // `outside` was never judged: its NodePort to `open` (no policy) waits forever.
    assert!(!echoes(
        &bed.outside.netns,
        node_port(&bed.a, NODE_PORT_OPEN),
        REFUSED
    ));
    assert!(echoes(&bed.friend.netns, vip, T), "a cached allow was lost");
    let _za = bed.start(&bed.a, &[]);
    assert!(echoes(
        &bed.outside.netns,
        node_port(&bed.a, NODE_PORT_OPEN),
        ALLOWED
    ));
}
