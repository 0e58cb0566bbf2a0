//! `cargo xtask demo`: a two-node mesh on this machine, end to end.
//!
//! Builds a cluster in network namespaces, starts the built-in control plane (Istio's CA
//! API over gRPC) and one ztunnel per node, then shows: pods talking through the mesh with
//! their SPIFFE identities, that the wire carries only TLS on 15008, that traffic to a pod
//! outside the mesh passes through, and what each node's admin endpoint knows.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ztunnel_tests::http::{self, ADMIN};
use ztunnel_tests::sniffer::Sniffer;
use ztunnel_tests::traffic::{connect, echo_round_trip, EchoServer};
use ztunnel_tests::ztunnel::{binary, local_config, WorkloadSpec};
use ztunnel_tests::Testbed;

const T: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    if !ztunnel_tests::is_root() {
        bail!("the demo needs root (network namespaces, eBPF)");
    }
    section("1. A cluster in network namespaces");
    let mut tb = Testbed::new()?;
    let a = tb.add_node("node-a")?;
    let b = tb.add_node("node-b")?;
    let cp = tb.add_node("controlplane")?;
    let sleep = tb.add_pod(&a, "sleep")?;
    let echo = tb.add_pod(&b, "echo")?;
    let legacy = tb.add_pod(&b, "legacy")?;
    println!(
        "  node-a {}  pod sleep  {} / {}  (mesh, sa sleep)",
        a.ip, sleep.ip, sleep.ip6
    );
    println!(
        "  node-b {}  pod echo   {} / {}  (mesh, sa echo)",
        b.ip, echo.ip, echo.ip6
    );
    println!(
        "                        pod legacy {}  (outside the mesh)",
        legacy.ip
    );
    println!("  control plane {}", cp.ip);
    let echo_srv = EchoServer::start(&echo.netns, 8080)?;
    let legacy_srv = EchoServer::start(&legacy.netns, 8080)?;

    let config = tb.write_config(
        "workloads.yaml",
        &local_config(
            &[
                WorkloadSpec::mesh(&sleep, "default", "sleep"),
                WorkloadSpec::mesh(&echo, "default", "echo"),
                WorkloadSpec::plain(&legacy, "legacy"),
            ],
            "",
        ),
    )?;

    section("2. Control plane: Istio's CA API (gRPC, TLS, bearer tokens)");
    let ca_dir = tb.dir().join("controlplane-ca");
    let tokens = tb.write_config("tokens", "token-a node-a\ntoken-b node-b\n")?;
    let cp_log = tb.dir().join("controlplane.log");
    let mut cmd = cp.netns.command(binary())?;
    cmd.arg("controlplane")
        .arg("--config")
        .arg(&config)
        .arg("--ca-dir")
        .arg(&ca_dir)
        .arg("--tokens-file")
        .arg(&tokens)
        .args(["--listen", &format!("{}:15012", cp.ip)])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&cp_log)?)
        .stderr(std::fs::File::options().append(true).open(&cp_log)?);
    tb.spawn(cmd)?;
    wait_for(
        || {
            std::fs::read_to_string(&cp_log)
                .unwrap_or_default()
                .contains("serving")
        },
        "control plane",
    )?;
    println!(
        "  listening on {}:15012, root certificate {}",
        cp.ip,
        ca_dir.join("root-cert.pem").display()
    );

    section("3. One ztunnel per node");
    let ca = format!("https://{}:15012", cp.ip);
    let mut zs = vec![];
    for (node, token) in [(&a, "token-a"), (&b, "token-b")] {
        let token_file = tb.write_config(&format!("token-{}", node.name), token)?;
        let root = ca_dir.join("root-cert.pem");
        let args = [
            "--ca-address",
            ca.as_str(),
            "--ca-root-cert",
            root.to_str().unwrap(),
            "--ca-token-file",
            token_file.to_str().unwrap(),
        ];
        let z = tb.start_ztunnel(node, &config, &args)?;
        wait_for(
            || {
                matches!(
                    http::get(
                        &node.netns,
                        SocketAddr::from(([127, 0, 0, 1], 15021)),
                        "/healthz/ready"
                    ),
                    Ok((200, _))
                )
            },
            "readiness",
        )?;
        println!(
            "  {}: ready (eBPF capture attached, certificates from the CA); log {}",
            node.name,
            z.log.display()
        );
        zs.push(z);
    }

    section("4. sleep (node-a) -> echo (node-b): through the mesh");
    let sniff = Sniffer::start(&a.netns, "eth0")?;
    let msg = b"hello from sleep, over HBONE";
    for dst in [
        SocketAddr::new(echo.ip.into(), 8080),
        SocketAddr::new(echo.ip6.into(), 8080),
    ] {
        let mut s = connect(&sleep.netns, dst, T)?;
        let reply = echo_round_trip(&mut s, msg)?;
        let (peer, _) = echo_srv.next_accepted(T).context("echo saw nothing")?;
        println!(
            "  {dst}: echoed {} bytes; echo saw the caller as {peer}",
            reply.len()
        );
    }
    section("5. sleep -> legacy (outside the mesh): plain passthrough");
    let plain = b"plaintext to a pod outside the mesh";
    let mut s = connect(&sleep.netns, SocketAddr::new(legacy.ip.into(), 8080), T)?;
    echo_round_trip(&mut s, plain)?;
    println!(
        "  legacy saw the caller as {}",
        legacy_srv.next_accepted(T).context("legacy saw nothing")?.0
    );
    std::thread::sleep(Duration::from_millis(200));
    let cap = sniff.finish();

    section("6. What crossed node-a's wire");
    println!("  TCP ports carrying data: {:?}", cap.ports_with_payload());
    println!(
        "  mesh message visible in plaintext:   {}",
        cap.contains_plaintext(msg)
    );
    println!(
        "  legacy message visible in plaintext: {}",
        cap.contains_plaintext(plain)
    );

    section("7. The access log (node-b)");
    for line in zs[1]
        .log_text()
        .lines()
        .filter(|l| l.contains("connection complete"))
    {
        println!(
            "  {}",
            line.split_once("\taccess\t").map(|x| x.1).unwrap_or(line)
        );
    }

    section("8. node-a's admin endpoint (127.0.0.1:15000, node-local)");
    let dump: serde_json::Value =
        serde_json::from_str(&http::get(&a.netns, ADMIN, "/config_dump")?.1)?;
    for w in dump["workloads"].as_array().into_iter().flatten() {
        println!(
            "  workload {:<34} node {:<7} protocol {}",
            w["uid"].as_str().unwrap_or(""),
            w["node"].as_str().unwrap_or(""),
            w["protocol"].as_str().unwrap_or("")
        );
    }
    for c in dump["certificates"].as_array().into_iter().flatten() {
        println!(
            "  certificate {} ({})",
            c["identity"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or("")
        );
    }
    let cap: serde_json::Value =
        serde_json::from_str(&http::get(&a.netns, ADMIN, "/debug/capture")?.1)?;
    for (ip, c) in cap["counters"].as_object().into_iter().flatten() {
        println!(
            "  capture {ip:<12} outbound flows {} packets {} bytes {}",
            c["outbound_flows"], c["packets"], c["bytes"]
        );
    }
    section("Done: tearing the cluster down");
    drop(tb);
    Ok(())
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}
