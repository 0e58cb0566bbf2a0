//! Waypoints end to end: a test waypoint (tests/support/waypoint.rs: its own certificate
//! from the control plane with an identity token, HBONE in and out) between a client pod
//! on node-a and a server pod on node-b, with the config served over xDS by `ztunnel
//! controlplane`, as istiod would.

#[path = "support/waypoint.rs"]
mod waypoint;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::identity::Identity;
use ztunnel_tests::http::ADMIN;
use ztunnel_tests::traffic::{echoes, eventually, EchoServer};
use ztunnel_tests::ztunnel::{local_config, ControlPlane, WorkloadSpec, Ztunnel};
use ztunnel_tests::{require_root, Pod, Testbed};

use waypoint::{Ca, Routes, Waypoint};

const WAIT: Duration = Duration::from_secs(20);
const VIP: [u8; 4] = [10, 96, 0, 10];
const WAYPOINT: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const GATEWAY: &str =
    "{destination: default/waypoint.default.svc.cluster.local, hboneMtlsPort: 15008}";

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

struct Mesh {
    tb: Testbed,
    cp: ControlPlane,
    config: PathBuf,
    client: Pod,
    server: Pod,
    waypoint_pod: Pod,
    rogue: Pod,
    _echo: EchoServer,
    zb: Ztunnel,
    za: Ztunnel,
}

impl Mesh {
    /// The workload file: the echo service (VIP 10.96.0.10:80 → server:8080) and the
    /// server itself behind the waypoint when `behind` (Istio's `waypoint-for: all`).
    fn yaml(&self, behind: bool) -> String {
        let wp = |field: &str| {
            if behind {
                format!("  {field}: {GATEWAY}\n")
            } else {
                String::new()
            }
        };
        let workloads = [
            WorkloadSpec::mesh(&self.client, "default", "client"),
            WorkloadSpec::mesh(&self.server, "default", "server").with(&format!(
                "  services: {{default/echo.default.svc.cluster.local: {{80: 8080}}}}\n{}",
                wp("waypoint")
            )),
            WorkloadSpec {
                service_account: "waypoint".into(),
                ..WorkloadSpec::plain(&self.waypoint_pod, "default")
            }
            .with("  services: {default/waypoint.default.svc.cluster.local: {}}\n"),
        ];
        let services = format!(
            "services:\n- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  \
             vips: [\"/10.96.0.10\"]\n  ports: {{80: 8080}}\n{}\
             - name: waypoint\n  namespace: default\n  hostname: waypoint.default.svc.cluster.local\n  \
             vips: [\"/10.96.0.20\"]\n",
            wp("waypoint")
        );
        local_config(&workloads, &services)
    }

    fn set_waypoint(&self, behind: bool) {
        std::fs::write(&self.config, self.yaml(behind)).unwrap();
    }

    /// No waypoint, and these policies (`policies:` YAML, or "").
    fn set_policies(&self, policies: &str) {
        std::fs::write(&self.config, self.yaml(false) + policies).unwrap();
    }

    /// `rogue` (identity `client`, on node-a but in no workload record) opens an HBONE
    /// stream straight to the server's node naming `source` as the client: the error, or
    /// what a ping brought back.
    fn rogue_connect(&self, source: Option<SocketAddr>) -> String {
        let pod = SocketAddr::new(IpAddr::V4(self.server.ip), 8080);
        let ca = self.ca("rogue-token");
        self.rogue.netns.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let cert = waypoint::certificate(&ca, &id("client")).await.unwrap();
                match waypoint::open(&cert, pod, &id("server"), source).await {
                    Ok(mut s) => {
                        let _ = s.write_all(b"ping").await;
                        let mut buf = [0u8; 4];
                        match s.read_exact(&mut buf).await {
                            Ok(_) => format!("accepted: {}", String::from_utf8_lossy(&buf)),
                            Err(e) => format!("accepted, then {e}"),
                        }
                    }
                    Err(e) => e.to_string(),
                }
            })
        })
    }

    fn ca(&self, token: &str) -> Ca {
        Ca {
            url: self.cp.url.clone(),
            root: self.cp.ca_dir.join("root-cert.pem"),
            token_file: waypoint::token_file(&self.tb.dir(), token),
        }
    }

    fn start_waypoint(&self) -> Waypoint {
        let server = SocketAddr::new(self.server.ip.into(), 8080);
        let routes: Routes = [
            (SocketAddr::from((VIP, 80)), (server, id("server"))),
            (server, (server, id("server"))),
        ]
        .into();
        Waypoint::start(
            &self.waypoint_pod,
            id("waypoint"),
            self.ca("wp-token"),
            routes,
        )
        .unwrap()
    }
}

fn mesh() -> Mesh {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let cp_node = tb.add_node("cp").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let waypoint_pod = tb.add_pod(&a, "waypoint").unwrap();
    let rogue = tb.add_pod(&a, "rogue").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let echo = EchoServer::start(&server.netns, 8080).unwrap();
    let config = tb.dir().join("workloads.yaml");
    std::fs::write(&config, "workloads: []\n").unwrap();
    // The waypoint gets exactly its identity; so does `rogue-token`, a workload of identity
    // `client` that will try to skip the waypoint.
    let cp = tb
        .start_controlplane_with_identities(
            &cp_node,
            &config,
            &[],
            &[
                ("wp-token", WAYPOINT),
                ("rogue-token", "spiffe://cluster.local/ns/default/sa/client"),
            ],
        )
        .unwrap();
    let start = |n| {
        let mut args = cp.node_args(n);
        args.extend(["--xds-address".to_string(), cp.url.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tb.start_ztunnel_with(n, &args).unwrap()
    };
    let (za, zb) = (start(&a), start(&b));
    let m = Mesh {
        cp,
        config,
        client,
        server,
        waypoint_pod,
        rogue,
        _echo: echo,
        zb,
        za,
        tb,
    };
    m.set_waypoint(true);
    m
}

fn vip() -> SocketAddr {
    SocketAddr::from((VIP, 80))
}

/// The destination node's access-log lines for connections that reached the server.
fn delivered_from(zb: &Ztunnel, identity: &str) -> usize {
    zb.log_text()
        .lines()
        .filter(|l| l.contains("direction=\"inbound\"") && l.contains("outcome=\"ok\""))
        .filter(|l| l.contains(&format!("src.identity=\"{identity}\"")))
        .count()
}

#[test]
fn traffic_to_a_service_with_a_waypoint_goes_through_it() {
    require_root!();
    let m = mesh();
    let wp = m.start_waypoint();
    let client = "spiffe://cluster.local/ns/default/sa/client";

    // Service-addressed: the waypoint is asked for the VIP, by the client's identity.
    eventually("service traffic through the waypoint", WAIT, || {
        echoes(&m.client.netns, vip())
    });
    let seen = wp.seen();
    assert!(
        seen.iter()
            .any(|s| s.authority == vip() && s.client == client),
        "{seen:?}"
    );
    // The server's node saw the waypoint's identity, not the client's.
    eventually("delivered from the waypoint", WAIT, || {
        delivered_from(&m.zb, WAYPOINT) >= 1
    });
    assert_eq!(delivered_from(&m.zb, client), 0);
    // The source node shows the waypoint it was given over xDS.
    let (_, dump) = ztunnel_tests::http::get(&m.za.node.netns, ADMIN, "/config_dump").unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let echo = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "echo")
        .unwrap();
    assert_eq!(
        echo["waypoint"],
        serde_json::json!({
            "destination": "default/waypoint.default.svc.cluster.local",
            "hboneMtlsPort": 15008
        })
    );

    // Workload-addressed: the server has the waypoint too, asked for the pod address.
    let pod = SocketAddr::new(IpAddr::V4(m.server.ip), 8080);
    assert!(echoes(&m.client.netns, pod));
    assert!(
        wp.seen()
            .iter()
            .any(|s| s.authority == pod && s.client == client),
        "{:?}",
        wp.seen()
    );
}

#[test]
fn skipping_the_waypoint_is_refused_at_the_destination() {
    require_root!();
    let m = mesh();
    let _wp = m.start_waypoint();
    eventually("mesh ready", WAIT, || echoes(&m.client.netns, vip()));

    // A workload with a valid mesh identity (`client`) dials the server's node itself.
    let refused = m.rogue_connect(None);
    assert!(refused.contains("401"), "{refused}");
    m.zb.wait_for_log(
        "not from the destination's waypoint",
        Duration::from_secs(5),
    )
    .unwrap();
    let metrics = ztunnel_tests::http::get(
        &m.zb.node.netns,
        SocketAddr::from(([127, 0, 0, 1], 15020)),
        "/metrics",
    )
    .unwrap()
    .1;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("reason=\"bypassed_waypoint\"") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[test]
fn adding_and_removing_the_waypoint_changes_new_connections_live() {
    require_root!();
    let m = mesh();
    let wp = m.start_waypoint();
    eventually("through the waypoint", WAIT, || {
        echoes(&m.client.netns, vip()) && !wp.seen().is_empty()
    });

    // Removed: new connections go straight to the server's node, as the client.
    m.set_waypoint(false);
    let client = "spiffe://cluster.local/ns/default/sa/client";
    eventually("direct once the waypoint is gone", WAIT, || {
        echoes(&m.client.netns, vip()) && delivered_from(&m.zb, client) >= 1
    });
    let before = wp.seen().len();
    assert!(echoes(&m.client.netns, vip()));
    assert_eq!(wp.seen().len(), before, "the waypoint still saw traffic");

    // Added back: through it again.
    m.set_waypoint(true);
    eventually("through the waypoint again", WAIT, || {
        echoes(&m.client.netns, vip()) && wp.seen().len() > before
    });

    // The waypoint down: refused, never sent direct.
    drop(wp);
    let direct = delivered_from(&m.zb, client);
    assert!(!echoes(&m.client.netns, vip()));
    assert_eq!(delivered_from(&m.zb, client), direct);
}

/// The `forwarded` spoof: a holder of a valid mesh identity (`client`) dials the server's
/// node from outside every mesh pod and names another pod's address (the waypoint pod's,
/// identity `waypoint`), or none, as its source. Refused (403), logged, counted; the server
/// never sees it. The same claim through the waypoint itself is what the other tests here
/// rely on, and the client pod's own node keeps naming its pod (mesh.rs).
#[test]
fn a_forwarded_source_the_client_may_not_name_is_refused() {
    require_root!();
    let m = mesh();
    let waypoint_pod = SocketAddr::new(IpAddr::V4(m.waypoint_pod.ip), 40000);
    // The server takes connections only from the waypoint pod's address.
    m.set_policies(&format!(
        "policies:\n- name: only-waypoint-pod\n  namespace: default\n  scope: Namespace\n  \
         action: Allow\n  rules:\n  - - - sourceIps: [\"{}/32\"]\n",
        m.waypoint_pod.ip
    ));
    // In force once the rogue's own address is refused by it.
    eventually("the sourceIps policy in force", WAIT, || {
        m.rogue_connect(None).contains("401")
    });
    let spoofed = m.rogue_connect(Some(waypoint_pod));
    assert!(spoofed.contains("403"), "{spoofed}");
    m.zb.wait_for_log("refusing an HBONE stream", Duration::from_secs(5))
        .unwrap();
    m.zb.wait_for_log(
        "reason=untrusted source: forwarded for=",
        Duration::from_secs(5),
    )
    .unwrap();

    // Without any policy: its own address is fine, another pod's or none is not.
    m.set_policies("");
    eventually("the policy gone", WAIT, || {
        m.rogue_connect(None) == "accepted: ping"
    });
    for (claim, reason) in [
        (waypoint_pod, "forwarded_not_the_peer"),
        (
            SocketAddr::from(([0, 0, 0, 0], 40000)),
            "forwarded_reserved_address",
        ),
    ] {
        let r = m.rogue_connect(Some(claim));
        assert!(r.contains("403"), "{claim}: {r}");
        let metrics = ztunnel_tests::http::get(
            &m.zb.node.netns,
            SocketAddr::from(([127, 0, 0, 1], 15020)),
            "/metrics",
        )
        .unwrap()
        .1;
        assert!(
            metrics
                .lines()
                .any(|l| l.contains(&format!("reason=\"{reason}\"")) && !l.ends_with(" 0")),
            "{reason}: {metrics}"
        );
    }
    // The server saw only the rogue's honest connections, from its own address.
    let seen = m._echo.drain();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|(peer, _)| peer.ip() == IpAddr::V4(m.rogue.ip)),
        "{seen:?}"
    );
}
