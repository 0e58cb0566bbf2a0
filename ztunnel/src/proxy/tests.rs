//! The handlers in-process, over loopback, without root or capture: two "nodes" in one
//! process, pods as loopback addresses (127.0.0.x: all of 127/8 is local), the original
//! destination of each accepted connection told by the test, the pool's tunnels dialed to
//! the other node's HBONE listener. Real TLS, real HTTP/2, real policies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::*;
use crate::connections::ConnectionTracker;
use crate::identity::ca::{CaOptions, CertificateAuthority};
use crate::identity::manager::{LocalCaClient, SecretManagerOptions};
use crate::metrics::{AttemptLabels, Metrics};
use crate::pool::{PoolOptions, TcpDialer};
use crate::xds::local::LocalConfig;

const T: Duration = Duration::from_secs(5);

const CLIENT: &str = "127.0.0.2";
const SERVER: &str = "127.0.0.3";
const NEIGHBOUR: &str = "127.0.0.4";
const OUTSIDE: &str = "127.0.0.5";

/// node-a: client, neighbour (mesh); node-b: server (mesh), outside (plain).
fn config(policies: &str) -> String {
    let w = |name: &str, ip: &str, node: &str, proto: &str| {
        format!(
            "- uid: c//Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  \
             workloadIps: [\"{ip}\"]\n  protocol: {proto}\n  node: {node}\n"
        )
    };
    format!(
        "workloads:\n{}{}{}{}services:\n- name: empty\n  namespace: default\n  hostname: empty.default.svc.cluster.local\n  \
         vips: [\"/10.96.0.9\"]\n  ports: {{80: 8080}}\n{policies}",
        w("client", CLIENT, "node-a", "HBONE"),
        w("neighbour", NEIGHBOUR, "node-a", "HBONE"),
        w("server", SERVER, "node-b", "HBONE"),
        w("outside", OUTSIDE, "node-b", "TCP"),
    )
}

/// Plain connects (a test cannot bind a pod's address as source without root).
struct Plain;

#[async_trait::async_trait]
impl Connect for Plain {
    async fn connect(
        &self,
        _src: Option<SocketAddr>,
        dst: SocketAddr,
    ) -> std::io::Result<TcpStream> {
        TcpStream::connect(dst).await
    }
}

/// Tunnels to `<pod>:15008` go to the HBONE listener of the pod's node.
struct ToNode(SocketAddr);

#[async_trait::async_trait]
impl crate::pool::Dialer for ToNode {
    async fn dial(&self, _dst: SocketAddr) -> std::io::Result<TcpStream> {
        TcpDialer.dial(self.0).await
    }
}

/// The original destinations the test intends, by the client's address.
type Intended = Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>;

struct Node {
    ctx: Arc<ProxyContext>,
    metrics: Arc<Metrics>,
    _drain: tokio::sync::watch::Sender<bool>,
}

impl Node {
    fn attempts(
        &self,
        direction: &'static str,
        outcome: &'static str,
        reason: &'static str,
    ) -> u64 {
        self.metrics
            .connections
            .get_or_create(&AttemptLabels {
                direction,
                outcome,
                reason,
            })
            .get()
    }

    /// `istio_tcp_connections_closed_total` summed over label sets with this flag.
    fn closed_with_flag(&self, flag: &str) -> u64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics.registry).unwrap();
        text.lines()
            .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
            .filter(|l| l.contains(&format!("response_flags=\"{flag}\"")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }
}

struct Mesh {
    store: Arc<StateStore>,
    /// The mesh's certificates (one CA), for tests that play a client of their own.
    certs: Arc<SecretManager>,
    /// node-b's HBONE listener.
    hbone_b: SocketAddr,
    a: Node,
    b: Node,
    outbound: SocketAddr,
    intended: Intended,
}

fn node(
    name: &str,
    store: &Arc<StateStore>,
    certs: &Arc<SecretManager>,
    original_dst: OriginalDst,
    tunnels: SocketAddr,
    workload_wait: Duration,
) -> Node {
    let metrics = Arc::new(Metrics::new());
    // Kept by the node: a dropped sender reads as "draining" (GOAWAY on every connection).
    let (drain, draining) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(ProxyContext {
        node: name.into(),
        store: store.clone(),
        dialer: Arc::new(Plain),
        original_dst,
        certs: certs.clone(),
        pool: Pool::new(
            Arc::new(ToNode(tunnels)),
            certs.clone(),
            PoolOptions::default(),
        ),
        connections: ConnectionTracker::new(metrics.clone()),
        metrics: metrics.clone(),
        listen_ports: vec![15001, 15006, 15008],
        hbone_port: 15008,
        handshake_timeout: T,
        // The "node" of these tests: where every tunnel comes from.
        is_node_address: Arc::new(|ip| ip == std::net::IpAddr::from([127, 0, 0, 1])),
        workload_wait,
        dns: None,
        resolver: crate::dns::ResolverSettings::unavailable("no resolver in tests")
            .build(crate::dns::LOOKUP_TIMEOUT),
        limits: Default::default(),
        draining,
    });
    Node {
        ctx,
        metrics,
        _drain: drain,
    }
}

async fn mesh(policies: &str) -> Mesh {
    let yaml = config(policies);
    mesh_seen_as(&yaml, &yaml).await
}

/// A mesh whose two nodes have their own view of it (a node that has not heard of a
/// change yet, or disagrees). `Mesh::store` is node-a's.
async fn mesh_seen_as(node_a: &str, node_b: &str) -> Mesh {
    mesh_waiting(node_a, node_b, Duration::ZERO).await
}

/// [`mesh_seen_as`] whose nodes wait `workload_wait` for missing workload records.
async fn mesh_waiting(node_a: &str, node_b: &str, workload_wait: Duration) -> Mesh {
    let view = |yaml: &str| {
        let store = Arc::new(StateStore::default());
        LocalConfig::from_yaml(yaml).unwrap().apply_to(&store);
        store
    };
    let (store, store_b) = (view(node_a), view(node_b));
    let ca = CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap();
    let certs = Arc::new(SecretManager::new(
        Arc::new(LocalCaClient::new(Arc::new(ca))),
        SecretManagerOptions::default(),
    ));
    let out = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone_b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let intended: Intended = Arc::default();
    let by_peer = intended.clone();
    let a = node(
        "node-a",
        &store,
        &certs,
        Arc::new(move |s: &TcpStream| {
            let peer = s.peer_addr()?;
            by_peer
                .lock()
                .unwrap()
                .get(&peer)
                .copied()
                .ok_or_else(|| std::io::Error::other("no original destination"))
        }),
        hbone_b.local_addr().unwrap(),
        workload_wait,
    );
    // Every tunnel node-b accepts was dialed to the server pod.
    let dialed: SocketAddr = format!("{SERVER}:15008").parse().unwrap();
    let b = node(
        "node-b",
        &store_b,
        &certs,
        Arc::new(move |_: &TcpStream| Ok(dialed)),
        "127.0.0.1:9".parse().unwrap(),
        workload_wait,
    );
    let outbound = out.local_addr().unwrap();
    let hbone_addr = hbone_b.local_addr().unwrap();
    tokio::spawn(accept_loop(
        out,
        a.ctx.clone(),
        crate::connections::Direction::Outbound,
        outbound::handle,
    ));
    tokio::spawn(accept_loop(
        hbone_b,
        b.ctx.clone(),
        crate::connections::Direction::Inbound,
        inbound::handle_hbone,
    ));
    Mesh {
        store,
        certs,
        hbone_b: hbone_addr,
        a,
        b,
        outbound,
        intended,
    }
}

/// An echo server on `ip`; its address.
async fn echo(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

impl Mesh {
    /// A connection from pod `from` to `dst`, captured by node-a's outbound listener.
    async fn connect(&self, from: &str, dst: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let local = s.local_addr().unwrap();
        self.intended.lock().unwrap().insert(local, dst);
        s.connect(self.outbound).await.unwrap()
    }

    /// Sends `msg` and reads it back; `None` if the connection was closed instead.
    async fn round_trip(&self, from: &str, dst: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
        let mut s = self.connect(from, dst).await;
        s.write_all(msg).await.ok()?;
        let mut buf = vec![0; msg.len()];
        match tokio::time::timeout(T, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            _ => None,
        }
    }
}

/// Waits until `f` holds (attempts are recorded when handlers finish, just after the
/// client sees the end).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}");
}

#[tokio::test]
async fn cross_node_success_is_one_ok_attempt_on_each_side() {
    let m = mesh("").await;
    let dst = echo(SERVER).await;
    assert_eq!(m.round_trip(CLIENT, dst, b"hello").await.unwrap(), b"hello");
    eventually("both sides recorded ok", || {
        m.a.attempts("outbound", "ok", "-") == 1 && m.b.attempts("inbound", "ok", "-") == 1
    })
    .await;
    assert_eq!(m.a.closed_with_flag("-"), 1);
    assert_eq!(m.b.closed_with_flag("-"), 1);
}

#[tokio::test]
async fn a_denied_connection_is_logged_and_counted_as_denied() {
    let only_neighbour = "policies:\n- name: only-neighbour\n  namespace: default\n  scope: Namespace\n  \
                          action: Allow\n  rules:\n  - - - principals: [\"cluster.local/ns/default/sa/neighbour\"]\n";
    let m = mesh(only_neighbour).await;
    let dst = echo(SERVER).await;
    assert_eq!(m.round_trip(CLIENT, dst, b"no").await, None);
    eventually("the destination denied it", || {
        m.b.attempts("inbound", "denied", "policy_denied") == 1
    })
    .await;
    assert_eq!(m.b.closed_with_flag("DENY"), 1);
    // The source side saw its tunnel refused.
    eventually("the source recorded the refused tunnel", || {
        m.a.attempts("outbound", "failed", "tunnel_connect") == 1
    })
    .await;
    assert_eq!(m.a.closed_with_flag("CONNECT"), 1);
}

#[tokio::test]
async fn a_failed_delivery_is_counted_with_connect_flags() {
    let m = mesh("").await;
    // Nothing listens there.
    let free = std::net::TcpListener::bind((SERVER, 0))
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(m.round_trip(CLIENT, free, b"x").await, None);
    eventually("the destination recorded the failed dial", || {
        m.b.attempts("inbound", "failed", "upstream_connect") == 1
    })
    .await;
    assert_eq!(m.b.closed_with_flag("CONNECT"), 1);
}

#[tokio::test]
async fn refusals_and_passthrough_are_attempts_too() {
    let m = mesh("").await;
    // A VIP with no endpoint: refused before anything is dialed.
    assert_eq!(
        m.round_trip(CLIENT, "10.96.0.9:80".parse().unwrap(), b"x")
            .await,
        None
    );
    eventually("no endpoint recorded", || {
        m.a.attempts("outbound", "denied", "no_endpoint") == 1
    })
    .await;
    // Outside the mesh: plain passthrough, recorded as ok.
    let outside = echo(OUTSIDE).await;
    assert_eq!(
        m.round_trip(CLIENT, outside, b"plain").await.unwrap(),
        b"plain"
    );
    eventually("passthrough recorded", || {
        m.a.attempts("outbound", "ok", "-") == 1
    })
    .await;
    // A connection whose original destination cannot be told.
    let mut s = TcpStream::connect(m.outbound).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(
        tokio::time::timeout(T, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap(),
        0
    );
    eventually("no original destination recorded", || {
        m.a.attempts("outbound", "failed", "no_original_destination") == 1
    })
    .await;
}

#[tokio::test]
async fn a_deny_added_later_closes_the_live_same_node_connection() {
    let m = mesh("").await;
    let dst = echo(NEIGHBOUR).await;
    let mut s = m.connect(CLIENT, dst).await;
    s.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(m.a.ctx.connections.count(), 1);
    // The policy arrives: the live connection is judged again and closed.
    let deny = "policies:\n- name: deny-client\n  namespace: default\n  scope: Namespace\n  action: Deny\n  \
                rules:\n  - - - principals: [\"cluster.local/ns/default/sa/client\"]\n";
    LocalConfig::from_yaml(&config(deny))
        .unwrap()
        .apply_to(&m.store);
    let started = std::time::Instant::now();
    assert_eq!(m.a.ctx.connections.enforce(&m.store.snapshot()), 1);
    let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "still open: {n:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    eventually("closed by policy recorded", || {
        m.a.attempts("outbound", "closed", "policy_changed") == 1
    })
    .await;
    assert_eq!(m.a.closed_with_flag("DENY"), 1);
    assert_eq!(m.a.ctx.connections.count(), 0);
    // And a new one is refused.
    assert_eq!(m.round_trip(CLIENT, dst, b"after").await, None);
}

/// node-b sees the server behind a waypoint (`wp`, elsewhere): it takes mesh traffic for
/// it only from the waypoint's identity.
fn behind_waypoint(client_sa: &str) -> (String, String) {
    let a = config("").replace(
        "serviceAccount: client",
        &format!("serviceAccount: {client_sa}"),
    );
    let b = config("")
        .replace(
            "  node: node-b\n",
            "  node: node-b\n  waypoint: {destination: \"/127.0.0.9\", hboneMtlsPort: 15008}\n",
        )
        .replace(
            "workloads:\n",
            "workloads:\n- name: wp\n  namespace: default\n  serviceAccount: waypoint\n  \
             workloadIps: [\"127.0.0.9\"]\n  node: node-c\n",
        );
    (a, b)
}

#[tokio::test]
async fn a_workload_behind_a_waypoint_refuses_everyone_else() {
    // node-a does not know of the waypoint (stale, or skipping it on purpose).
    let (a, b) = behind_waypoint("client");
    let m = mesh_seen_as(&a, &b).await;
    let dst = echo(SERVER).await;
    assert_eq!(m.round_trip(CLIENT, dst, b"skip").await, None);
    eventually("the destination refused the bypass", || {
        m.b.attempts("inbound", "denied", "bypassed_waypoint") == 1
    })
    .await;
    assert_eq!(m.b.closed_with_flag("DENY"), 1);
}

#[tokio::test]
async fn a_workload_behind_a_waypoint_takes_the_waypoints_identity() {
    // The caller presents the waypoint's identity, as the waypoint does.
    let (a, b) = behind_waypoint("waypoint");
    let m = mesh_seen_as(&a, &b).await;
    let dst = echo(SERVER).await;
    assert_eq!(m.round_trip(CLIENT, dst, b"via").await.unwrap(), b"via");
    eventually("delivered", || m.b.attempts("inbound", "ok", "-") == 1).await;
}

#[tokio::test]
async fn a_waypoint_that_is_not_the_waypoint_is_refused_by_the_source() {
    // node-a sends to the waypoint (127.0.0.9), but what answers there (node-b's HBONE
    // listener, presenting the server's certificate) is not the waypoint's identity.
    let (_, b) = behind_waypoint("client");
    let m = mesh_seen_as(&b, &b).await;
    let dst = echo(SERVER).await;
    assert_eq!(m.round_trip(CLIENT, dst, b"x").await, None);
    eventually("the source refused the impostor", || {
        m.a.attempts("outbound", "failed", "tunnel_connect") == 1
    })
    .await;
    assert_eq!(m.b.attempts("inbound", "ok", "-"), 0);
}

#[tokio::test]
async fn a_waypoint_given_later_closes_the_connections_that_skipped_it() {
    let m = mesh("").await;
    let dst = echo(SERVER).await;
    let mut s = m.connect(CLIENT, dst).await;
    s.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.unwrap();
    // node-b learns that the server is behind a waypoint: the direct connection ends.
    let (_, b) = behind_waypoint("client");
    LocalConfig::from_yaml(&b).unwrap().apply_to(&m.b.ctx.store);
    assert_eq!(m.b.ctx.connections.enforce(&m.b.ctx.store.snapshot()), 1);
    let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "still open: {n:?}");
    eventually("closed for skipping the waypoint", || {
        m.b.attempts("inbound", "closed", "bypassed_waypoint") == 1
    })
    .await;
}

mod forwarded;
mod workload_wait;
