//! Workload identity end to end: certificates from the built-in control plane over gRPC,
//! readiness while the CA is down, recovery, rotation under traffic, and `ztunnel debug`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztunnel_tests::http;
use ztunnel_tests::traffic::{connect, echo_round_trip, eventually, EchoServer};
use ztunnel_tests::ztunnel::{binary, local_config, WorkloadSpec};
use ztunnel_tests::{require_root, Node, Testbed};

const T: Duration = Duration::from_secs(5);
const READY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15021);

fn readiness(node: &Node) -> (u16, String) {
    http::get(&node.netns, READY, "/healthz/ready").unwrap_or((0, String::new()))
}

#[test]
fn ca_down_means_not_ready_and_fail_closed_then_recovers() {
    require_root!();
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let cp_node = tb.add_node("cp").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let echo = EchoServer::start(&server.netns, 8080).unwrap();
    let config = tb
        .write_config(
            "workloads.yaml",
            &local_config(
                &[
                    WorkloadSpec::mesh(&client, "default", "client"),
                    WorkloadSpec::mesh(&server, "default", "server"),
                ],
                "",
            ),
        )
        .unwrap();
    // The control plane makes its root, then goes away.
    let cp = tb.start_controlplane(&cp_node, &config, &[]).unwrap();
    tb.stop(cp.pid, T);
    let (za, zb) = (&a, &b);
    let args_a = cp.node_args(za);
    let args_b = cp.node_args(zb);
    let z = tb
        .start_ztunnel(
            &a,
            &config,
            &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .unwrap();
    tb.start_ztunnel(
        &b,
        &config,
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .unwrap();

    // Enrolled, but no certificate: not ready, and nothing leaves in plaintext.
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = readiness(&a);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("certificate"),
        "readiness names the missing certificate: {body}"
    );
    let dst = SocketAddr::new(server.ip.into(), 8080);
    let r = connect(&client.netns, dst, T).and_then(|mut s| echo_round_trip(&mut s, b"x"));
    assert!(
        r.map(|v| v.is_empty()).unwrap_or(true),
        "no data may flow without certificates"
    );
    assert!(echo.drain().is_empty());
    z.wait_for_log("cannot reach CA", T).unwrap();

    // The CA comes back: certificates arrive, readiness flips, traffic flows.
    let _cp = tb.start_controlplane(&cp_node, &config, &[]).unwrap();
    eventually(
        "node-a ready after the CA is back",
        Duration::from_secs(30),
        || readiness(&a).0 == 200,
    );
    eventually(
        "node-b ready after the CA is back",
        Duration::from_secs(30),
        || readiness(&b).0 == 200,
    );
    let mut s = connect(&client.netns, dst, T).unwrap();
    assert_eq!(echo_round_trip(&mut s, b"back").unwrap(), b"back");
}

#[test]
fn certificates_rotate_under_traffic_without_dropping_connections() {
    require_root!();
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let _echo = EchoServer::start(&server.netns, 8080).unwrap();
    let config = tb
        .write_config(
            "workloads.yaml",
            &local_config(
                &[
                    WorkloadSpec::mesh(&client, "default", "client"),
                    WorkloadSpec::mesh(&server, "default", "server"),
                ],
                "",
            ),
        )
        .unwrap();
    // Certificates live 4 s, so each workload rotates every ~2 s.
    let cp = tb
        .start_controlplane(&b, &config, &["--max-cert-ttl", "4s"])
        .unwrap();
    let mut zs = vec![];
    for n in [&a, &b] {
        let mut args = cp.node_args(n);
        args.extend(["--workload-cert-ttl".into(), "4s".into()]);
        zs.push(
            tb.start_ztunnel(
                n,
                &config,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .unwrap(),
        );
    }
    eventually("ready", Duration::from_secs(20), || {
        readiness(&a).0 == 200 && readiness(&b).0 == 200
    });

    let dst = SocketAddr::new(server.ip.into(), 8080);
    let mut long = connect(&client.netns, dst, T).unwrap();
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(9) {
        // The long-lived connection keeps working across rotations...
        let msg = format!("round {rounds}");
        long.write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        long.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg.as_bytes());
        // ...and so do new ones, each a fresh connection through the mesh.
        if rounds % 5 == 0 {
            let mut s = connect(&client.netns, dst, T).unwrap();
            assert_eq!(
                echo_round_trip(&mut s, b"new").unwrap(),
                b"new",
                "new connection at {:?}",
                started.elapsed()
            );
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let issued = zs[0]
        .log_text()
        .lines()
        .filter(|l| l.contains("workload certificate issued") && l.contains("sa/client"))
        .count();
    assert!(
        issued >= 3,
        "expected several rotations of the client's certificate, saw {issued}"
    );
}

#[test]
fn debug_command_prints_tables() {
    require_root!();
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let config = tb
        .write_config(
            "workloads.yaml",
            &local_config(&[WorkloadSpec::mesh(&client, "default", "client")], ""),
        )
        .unwrap();
    tb.start_ztunnel(&a, &config, &[]).unwrap();
    eventually("ready", Duration::from_secs(20), || readiness(&a).0 == 200);
    let run = |what: &str, json: bool| {
        let mut cmd = a.netns.command(binary()).unwrap();
        cmd.args(["debug", what]);
        if json {
            cmd.args(["-o", "json"]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let w = run("workloads", false);
    assert!(w.starts_with("WORKLOAD"), "{w}");
    assert!(
        w.contains("default/client")
            && w.contains("enrolled")
            && w.contains(&client.ip.to_string()),
        "{w}"
    );
    let c = run("certs", false);
    assert!(
        c.contains("spiffe://cluster.local/ns/default/sa/client") && c.contains("ready"),
        "{c}"
    );
    let cap = run("capture", false);
    assert!(
        cap.contains("INTERFACE") && cap.contains(&client.ip.to_string()),
        "{cap}"
    );
    let row = cap
        .lines()
        .find(|l| l.starts_with(&format!("{} ", client.host_if)))
        .unwrap_or_else(|| panic!("no row for the client's interface: {cap}"));
    assert!(row.contains("pod") && row.contains("yes"), "{row}");
    let j: serde_json::Value = serde_json::from_str(&run("workloads", true)).unwrap();
    assert_eq!(j[0]["name"], "client");
    // No ztunnel listening: a clear error, not a hang.
    let out = std::process::Command::new(binary())
        .args(["debug", "certs", "--admin-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin endpoint"));
}
