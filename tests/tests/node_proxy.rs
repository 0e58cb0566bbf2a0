//! The `ztunnel` binary on testbed nodes: standalone enrollment from the workload file,
//! traffic through it, clean exit, crash (fail closed) and restart.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use ztunnel_tests::traffic::{connect, echo_round_trip, EchoServer};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec};
use ztunnel_tests::{require_root, Pod, Testbed};

const T: Duration = Duration::from_secs(5);

struct Cluster {
    tb: Testbed,
    client: Pod,
    server: Pod,
    echo: EchoServer,
    config: std::path::PathBuf,
}

fn cluster() -> Cluster {
    let mut tb = Testbed::new().unwrap();
    let a = tb.add_node("node-a").unwrap();
    let b = tb.add_node("node-b").unwrap();
    let client = tb.add_pod(&a, "client").unwrap();
    let server = tb.add_pod(&b, "server").unwrap();
    let echo = EchoServer::start(&server.netns, 8080).unwrap();
    let yaml = local_config(
        &[
            WorkloadSpec::mesh(&client, "default", "client"),
            WorkloadSpec::mesh(&server, "default", "server"),
        ],
        "",
    );
    let config = tb.write_config("workloads.yaml", &yaml).unwrap();
    Cluster {
        tb,
        client,
        server,
        echo,
        config,
    }
}

fn ip_rules(ns: &ztunnel_tests::Netns) -> String {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "rule"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn traffic_between_enrolled_pods_goes_through_both_ztunnels() {
    require_root!();
    let c = cluster();
    let [a, b] = [c.tb.nodes()[0].clone(), c.tb.nodes()[1].clone()];
    let za = c.tb.start_ztunnel(&a, &c.config, &[]).unwrap();
    let zb = c.tb.start_ztunnel(&b, &c.config, &[]).unwrap();
    za.wait_for_log("workload enrolled", T).unwrap();
    zb.wait_for_log("workload enrolled", T).unwrap();
    for v6 in [false, true] {
        let dst = SocketAddr::new(c.server.addr(v6), 8080);
        let mut s = connect(&c.client.netns, dst, T).unwrap();
        assert_eq!(
            echo_round_trip(&mut s, b"hello mesh").unwrap(),
            b"hello mesh"
        );
        let (peer, _) = c.echo.next_accepted(T).unwrap();
        assert_eq!(
            peer.ip(),
            c.client.addr(v6),
            "server sees the client pod's address"
        );
    }
    // Both ztunnels handled it: the eBPF log (aya-log) and the proxy's own.
    za.wait_for_log("outbound flow", T).unwrap();
    zb.wait_for_log("to listener 15008", T).unwrap();
    // Each side logged the connection with both identities, over HBONE.
    for (z, dir) in [
        (&za, "direction=\"outbound\""),
        (&zb, "direction=\"inbound\""),
    ] {
        let line = z.wait_for_line(&["connection complete", dir], T).unwrap();
        assert!(
            line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/client\""),
            "{line}"
        );
        assert!(
            line.contains("dst.identity=\"spiffe://cluster.local/ns/default/sa/server\""),
            "{line}"
        );
        assert!(line.contains("protocol=\"HBONE\""), "{line}");
    }
    assert!(ip_rules(&a.netns).contains("lookup 15010"));

    // SIGTERM: clean exit that removes programs, pins and rules.
    let status = c.tb.stop(za.pid, Duration::from_secs(10)).unwrap();
    assert!(
        status.success(),
        "ztunnel exit status {status}; log:\n{}",
        za.log_text()
    );
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/ztunnel/{}", a.netns.name())).exists());
    assert!(!ip_rules(&a.netns).contains("lookup 15010"));
}

#[test]
fn killed_ztunnel_fails_closed_and_restart_recovers() {
    require_root!();
    let c = cluster();
    let [a, b] = [c.tb.nodes()[0].clone(), c.tb.nodes()[1].clone()];
    let za = c.tb.start_ztunnel(&a, &c.config, &[]).unwrap();
    let _zb = c.tb.start_ztunnel(&b, &c.config, &[]).unwrap();
    za.wait_for_log("workload enrolled", T).unwrap();
    let dst = SocketAddr::new(c.server.ip.into(), 8080);
    let mut s = connect(&c.client.netns, dst, T).unwrap();
    assert_eq!(echo_round_trip(&mut s, b"one").unwrap(), b"one");
    c.echo.next_accepted(T).unwrap();

    c.tb.kill(za.pid);
    let r = connect(&c.client.netns, dst, Duration::from_millis(1500));
    assert!(
        r.is_err(),
        "a connection left the pod while ztunnel was dead"
    );
    assert!(
        c.echo.drain().is_empty(),
        "plaintext reached the server while ztunnel was dead"
    );

    let za = c.tb.start_ztunnel(&a, &c.config, &[]).unwrap();
    // "adopted pinned capture link" (TCX) or "adopted capture filter" (legacy tc).
    za.wait_for_log("adopted", T).unwrap();
    let mut s = connect(&c.client.netns, dst, T).unwrap();
    assert_eq!(echo_round_trip(&mut s, b"two").unwrap(), b"two");
    assert_eq!(
        c.echo.next_accepted(T).unwrap().0.ip(),
        IpAddr::from(c.client.ip)
    );
}

#[test]
fn pod_whose_interface_appears_later_is_enrolled_then() {
    require_root!();
    let mut c = cluster();
    let a = c.tb.nodes()[0].clone();
    // The config names a pod on node-a that does not exist yet (10.1.0.3).
    let late_ip = "10.1.0.3";
    let yaml = std::fs::read_to_string(&c.config).unwrap()
        + &format!(
            "- uid: cluster1//Pod/default/late\n  name: late\n  namespace: default\n  workloadIps: [\"{late_ip}\"]\n  protocol: HBONE\n  node: node-a\n"
        );
    std::fs::write(&c.config, yaml).unwrap();
    let b = c.tb.nodes()[1].clone();
    let _zb = c.tb.start_ztunnel(&b, &c.config, &[]).unwrap();
    let za = c.tb.start_ztunnel(&a, &c.config, &[]).unwrap();
    za.wait_for_log("will retry", T).unwrap();
    let late = c.tb.add_pod(&a, "late").unwrap();
    assert_eq!(late.ip.to_string(), late_ip);
    za.wait_for_log("workload=cluster1//Pod/default/late interface=p3", T)
        .unwrap();
    let mut s = connect(&late.netns, SocketAddr::new(c.server.ip.into(), 8080), T).unwrap();
    assert_eq!(echo_round_trip(&mut s, b"late").unwrap(), b"late");
}

#[test]
fn broken_config_is_refused_with_its_location() {
    require_root!();
    let c = cluster();
    let a = c.tb.nodes()[0].clone();
    let bad =
        c.tb.write_config(
            "bad.yaml",
            "workloads:\n- uid: x\n  workloadIps: [\"10.0.0.x\"]\n",
        )
        .unwrap();
    let err =
        c.tb.start_ztunnel(&a, &bad, &[])
            .err()
            .expect("must not start");
    let msg = format!("{err:#}");
    assert!(msg.contains("line 3"), "error should name the line: {msg}");
    assert!(
        msg.contains("workloadIps"),
        "error should name the field: {msg}"
    );
}
