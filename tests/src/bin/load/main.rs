//! `cargo xtask load`: every listener under hostile load (issue 30), on the namespace
//! testbed, against the testbed's own addresses only.
//!
//! Three nodes: node-a (a client pod in the mesh, and an `attacker` pod outside it),
//! node-b (an echo server pod in the mesh) and `cp` (`ztunnel controlplane`). For each
//! attack, bounded in count and duration, it reports the target's RSS before, at its peak
//! and after, whether a mesh echo (client → server, one round trip every 200 ms) kept
//! passing beside it, and what the attack itself saw; during the attacks on 15012 a node
//! token keeps asking for certificates. Writes `target/load/results.{json,md}` (LOAD_OUT to
//! change). Knobs: LOAD_SLOW_CONNS (3000), LOAD_IDLE_CONNS (5000), LOAD_STREAMS (10000),
//! LOAD_HOLD_SECS (25), LOAD_RESETS (20000 per connection on 15012, a quarter on 15008), LOAD_XDS_NAMES (50000),
//! LOAD_DNS_FLOOD (1000000 questions, at most 10 s), LOAD_DNS_MALFORMED (5000 of each kind),
//! LOAD_DNS_CONNS (2000 TCP connections); LOAD_ONLY (comma list of: http, hbone, cp, dns,
//! peer) runs only those attacks. node-a's ztunnel runs the DNS proxy on node-a's address,
//! port 15053, its resolver a dead one (`dns`).

mod attacks;
mod clients;
mod dns;
mod measure;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use ztunnel::identity::Identity;
use ztunnel_tests::dns::DeadDns;
use ztunnel_tests::procstat;
use ztunnel_tests::traffic::{echoes, eventually, EchoServer};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec};
use ztunnel_tests::Testbed;

use clients::{grpc, CertProber, Cp, CSR_PATH};
use measure::{measured, Outcome, Report};

const ECHO_PORT: u16 = 8080;

fn main() -> anyhow::Result<()> {
    if !ztunnel_tests::is_root() {
        bail!("the load suite needs root (network namespaces, eBPF)");
    }
    ztunnel_tests::watchdog("load", Duration::from_secs(1200));
    procstat::raise_fd_limit();
    if std::env::var_os("ZTUNNEL_LOG").is_none() {
        std::env::set_var("ZTUNNEL_LOG", ztunnel_tests::ztunnel::PRODUCTION_LOG);
    }
    let num = |k, d| ztunnel_tests::env_num(k, d) as usize;
    let hold = Duration::from_secs(num("LOAD_HOLD_SECS", 25) as u64);
    let started = Instant::now();

    let mut tb = Testbed::new()?;
    let a = tb.add_node("node-a")?;
    let b = tb.add_node("node-b")?;
    let cp_node = tb.add_node("cp")?;
    let client = tb.add_pod(&a, "client")?;
    let attacker = tb.add_pod(&a, "attacker")?;
    let server = tb.add_pod(&b, "server")?;
    let resolver = tb.add_pod(&b, "dead-dns")?;
    DeadDns::start(&resolver.netns)?;
    let mut server_spec = WorkloadSpec::mesh(&server, "load", "server");
    server_spec.extra = "  services:\n    load/echo.load.svc.cluster.local: {80: 8080}\n".into();
    let services = "services:\n- name: echo\n  namespace: load\n  \
                    hostname: echo.load.svc.cluster.local\n  vips: [\"/10.96.0.60\"]\n  \
                    ports: {80: 8080}\n";
    let config = tb.write_config(
        "workloads.yaml",
        &local_config(
            &[WorkloadSpec::mesh(&client, "load", "client"), server_spec],
            services,
        ),
    )?;
    let resolv = tb.write_config("resolv.conf", &format!("nameserver {}\n", resolver.ip))?;
    let dns_target = dns::DnsTarget {
        proxy: SocketAddr::new(a.ip.into(), 15053),
        captured_tcp: "10.96.0.10:53".parse()?,
        mesh_name: "echo.load.svc.cluster.local.",
        vip: "10.96.0.60".parse()?,
    };
    let only: Option<Vec<String>> = std::env::var("LOAD_ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let wants = |what: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == what));
    let _echo = EchoServer::start(&server.netns, ECHO_PORT)?;
    let cp = tb.start_controlplane(
        &cp_node,
        &config,
        &["--metrics-addr", &format!("{}:15014", cp_node.ip)],
    )?;
    let (proxy, resolv) = (dns_target.proxy.to_string(), resolv.display().to_string());
    let dns_args = ["--dns-proxy-addr", &proxy, "--dns-upstream", &resolv];
    let za = tb.start_ztunnel(&a, &config, &dns_args)?;
    let zb = tb.start_ztunnel(&b, &config, &[])?;
    let dst = SocketAddr::new(server.ip.into(), ECHO_PORT);
    eventually("the mesh echoes", Duration::from_secs(30), || {
        echoes(&client.netns, dst)
    });
    let node_args = cp.node_args(&a);
    let token_a = PathBuf::from(&node_args[5]);
    let token_b = PathBuf::from(&cp.node_args(&b)[5]);
    let cpc = Cp {
        addr: SocketAddr::new(cp_node.ip.into(), 15012),
        root_pem: std::fs::read_to_string(cp.ca_dir.join("root-cert.pem"))?,
        root_path: cp.ca_dir.join("root-cert.pem"),
    };
    let client_id = Identity::new("cluster.local", "load", "client");
    let server_id = Identity::new("cluster.local", "load", "server");
    eprintln!(
        "load: ztunnel {} (node-a), {} (node-b), control plane {}",
        za.pid, zb.pid, cp.pid
    );

    let mut results: Vec<Outcome> = Vec::new();
    let settle = Duration::from_secs(12); // past the 10 s timeouts and malloc trim
    let ns_a = a.netns.clone();
    let ns_att = attacker.netns.clone();
    let cn = client.netns.clone();

    // 15020 and 15021 of node-b, from node-a (a host outside every pod).
    let n = num("LOAD_SLOW_CONNS", 3000);
    let targets = vec![
        SocketAddr::new(b.ip.into(), 15020),
        SocketAddr::new(b.ip.into(), 15021),
    ];
    if wants("http") {
        results.push(measured(
            "slow headers 15020+15021",
            "ztunnel node-b",
            zb.pid,
            &cn,
            dst,
            settle,
            || {
                Ok(with_hits(
                    &b,
                    attacks::slow_headers(&ns_a, targets, n, hold),
                ))
            },
        ));
    }

    // 15008 of the server pod, from a pod outside the mesh.
    let n = num("LOAD_IDLE_CONNS", 5000);
    let hbone = SocketAddr::new(server.ip.into(), 15008);
    if wants("http") {
        results.push(measured(
            "idle connections 15008",
            "ztunnel node-b",
            zb.pid,
            &cn,
            dst,
            settle,
            || Ok(with_hits(&b, attacks::idle(&ns_att, hbone, n, hold))),
        ));
    }

    // 15012: unauthenticated streams that never end, with a node getting certificates.
    let streams = num("LOAD_STREAMS", 10_000);
    let conns = streams.div_ceil(100);
    if wants("cp") {
        results.push(cp_attack(
            "unauthenticated CreateCertificate streams",
            &cp,
            &cpc,
            &cn,
            dst,
            &ns_a,
            &token_a,
            &client_id,
            settle,
            || attacks::unauthenticated_streams(&ns_att, &cpc, conns, 100, hold),
        ));
    }

    // 15012: huge initial_resource_versions from a node token.
    let token = std::fs::read_to_string(&token_a)?.trim().to_string();
    let other_token = std::fs::read_to_string(&token_b)?.trim().to_string();
    let names = num("LOAD_XDS_NAMES", 50_000);
    if wants("cp") {
        results.push(cp_attack(
            "xDS huge initial_resource_versions",
            &cp,
            &cpc,
            &cn,
            dst,
            &ns_a,
            &token_a,
            &client_id,
            settle,
            || {
                attacks::huge_initial_versions(
                    &ns_att,
                    &cpc,
                    (token.clone(), other_token.clone()),
                    10,
                    names,
                    (120_000, 400_000),
                    hold,
                )
            },
        ));
    }

    // Reset floods.
    let resets = num("LOAD_RESETS", 20_000);
    let c2 = cpc.clone();
    if wants("cp") {
        results.push(cp_attack(
            "reset flood 15012",
            &cp,
            &cpc,
            &cn,
            dst,
            &ns_a,
            &token_a,
            &client_id,
            settle,
            || {
                attacks::reset_flood(
                    &ns_att,
                    move || {
                        let cp = c2.clone();
                        async move { cp.h2().await }
                    },
                    || grpc(CSR_PATH, None),
                    4,
                    resets,
                )
            },
        ));
    }
    let attacker_cert = {
        let mut opts = ztunnel::identity::ca::CaOptions::new("cluster.local");
        opts.dir = Some(tb.dir().join("ca"));
        let ca = ztunnel::identity::ca::CertificateAuthority::new(opts)?;
        ca.issue_workload_cert(
            &Identity::new("cluster.local", "load", "attacker"),
            Duration::from_secs(3600),
        )?
    };
    let attacker_cert = Arc::new(attacker_cert);
    if wants("hbone") {
        results.push(measured(
            "reset flood 15008 (mesh certificate)",
            "ztunnel node-b",
            zb.pid,
            &cn,
            dst,
            settle,
            || {
                let (cert, sid) = (attacker_cert.clone(), server_id.clone());
                Ok(with_hits(
                    &b,
                    attacks::reset_flood(
                        &ns_att,
                        move || {
                            let (cert, sid) = (cert.clone(), sid.clone());
                            async move {
                                let config = ztunnel::tls::client_config(&cert, &[sid])?;
                                let tcp = tokio::net::TcpStream::connect(hbone).await?;
                                let tls = ztunnel::tls::connect(config, hbone, tcp).await?;
                                let (send, _driver) = ztunnel::hbone::handshake(tls).await?;
                                Ok(send)
                            }
                        },
                        move || {
                            http::Request::builder()
                                .method(http::Method::CONNECT)
                                .uri(dst.to_string())
                                .body(())
                                .expect("request")
                        },
                        4,
                        resets / 4,
                    ),
                ))
            },
        ));
    }

    // A token removed in the same write as a typo.
    let tokens_file = tb.dir().join("tokens");
    let kept = (token_a.clone(), client_id.clone());
    let removed_token = std::fs::read_to_string(&token_b)?.trim().to_string();
    if wants("cp") {
        results.push(measured(
            "token removed in an edit with a typo",
            "control plane",
            cp.pid,
            &cn,
            dst,
            Duration::from_secs(1),
            || {
                Ok(attacks::token_typo(
                    &ns_a,
                    &cpc,
                    tokens_file.clone(),
                    (token_b.clone(), server_id.clone(), removed_token),
                    kept,
                ))
            },
        ));
    }

    if wants("dns") {
        results.extend(dns_attacks(&za, &ns_att, &cn, dst, &dns_target, &a, hold));
    }

    // A peer node that stops answering: node-a's pooled tunnel to node-b is evicted.
    if wants("peer") {
        results.push(measured(
            "killed peer node (node-b's ztunnel stopped)",
            "ztunnel node-a",
            za.pid,
            &cn,
            dst,
            Duration::from_secs(1),
            || killed_peer(&a, &client.netns, dst, zb.pid),
        ));
    }

    let out = std::env::var_os("LOAD_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/load"));
    std::fs::create_dir_all(&out)?;
    let json = serde_json::json!({
        "elapsed_secs": started.elapsed().as_secs_f64(),
        "ztunnel": ztunnel_tests::ztunnel::binary().display().to_string(),
        "attacks": results.iter().map(Outcome::json).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let mut md = String::from(
        "| attack | target | RSS MiB before / peak / after | mesh echo ok / tried | held | what the attack saw |\n|---|---|---|---|---|---|\n",
    );
    for r in &results {
        md.push_str(&r.row());
        md.push('\n');
    }
    std::fs::write(out.join("results.md"), &md)?;
    println!("{md}");
    drop(tb);
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "attacks whose expectation did not hold: {}",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The DNS proxy's attacks (`dns`), each with good questions beside it.
fn dns_attacks(
    za: &ztunnel_tests::ztunnel::Ztunnel,
    att: &Arc<ztunnel_tests::Netns>,
    client: &Arc<ztunnel_tests::Netns>,
    dst: SocketAddr,
    t: &dns::DnsTarget,
    a: &ztunnel_tests::Node,
    hold: Duration,
) -> Vec<Outcome> {
    let num = |k, d| ztunnel_tests::env_num(k, d) as usize;
    let settle = Duration::from_secs(12);
    let proxy = t.proxy;
    let run = |name: &str, need_tcp: bool, attack: &dyn Fn() -> measure::Report| {
        measured(name, "ztunnel node-a", za.pid, client, dst, settle, || {
            Ok(with_hits(
                a,
                dns::with_good_questions(client, t, need_tcp, attack),
            ))
        })
    };
    let flood = num("LOAD_DNS_FLOOD", 1_000_000);
    let per_kind = num("LOAD_DNS_MALFORMED", 5_000);
    let conns = num("LOAD_DNS_CONNS", 2_000);
    vec![
        run(
            &format!("DNS: up to {flood} UDP questions in 10 s, as fast as they go, resolver dead"),
            true,
            &|| dns::udp_flood(&a.netns, att, proxy, flood, Duration::from_secs(10), 8),
        ),
        run(
            &format!("DNS: malformed UDP messages ({per_kind} of each kind)"),
            true,
            &|| dns::malformed(att, proxy, per_kind),
        ),
        run(
            &format!(
                "DNS: {conns} idle TCP connections (held {} s)",
                hold.as_secs()
            ),
            false,
            &|| dns::tcp_hold(&a.netns, att, proxy, conns, (b"", false), hold),
        ),
        run(
            &format!("DNS: {conns} TCP connections declaring 65,535 bytes, a byte every 2 s"),
            false,
            &|| dns::tcp_hold(&a.netns, att, proxy, conns, (b"\xff\xff", true), hold),
        ),
    ]
}

/// An attack on the control plane, with a node token asking for certificates beside it.
#[allow(clippy::too_many_arguments)]
fn cp_attack(
    name: &str,
    cp: &ztunnel_tests::ztunnel::ControlPlane,
    cpc: &Cp,
    client: &Arc<ztunnel_tests::Netns>,
    dst: SocketAddr,
    ns: &Arc<ztunnel_tests::Netns>,
    token_file: &Path,
    id: &Identity,
    settle: Duration,
    attack: impl FnOnce() -> Report,
) -> Outcome {
    let metrics = SocketAddr::new(cpc.addr.ip(), 15014);
    measured(name, "control plane", cp.pid, client, dst, settle, || {
        let before = limit_hits(ns, metrics);
        let certs = CertProber::start(ns, cpc, token_file.to_path_buf(), id.clone());
        let mut r = attack();
        let (ok, failed, last) = certs.finish();
        r.notes.push(format!(
            "valid node token beside it: {ok} certificates issued, {failed} failed{}",
            if failed > 0 {
                format!(" ({last})")
            } else {
                String::new()
            }
        ));
        r.passed &= ok > 0 && failed == 0;
        r.notes.push(hits_since(&before, &limit_hits(ns, metrics)));
        Ok(r)
    })
}

/// `ztunnel_limit_hits_total` by limit, from a metrics endpoint.
fn limit_hits(ns: &Arc<ztunnel_tests::Netns>, addr: SocketAddr) -> Vec<(String, u64)> {
    let Ok((_, body)) = ztunnel_tests::http::get(ns, addr, "/metrics") else {
        return Vec::new();
    };
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ztunnel_limit_hits_total{limit=\"")?;
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn hits_since(before: &[(String, u64)], after: &[(String, u64)]) -> String {
    let hits: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let was = before.iter().find(|(b, _)| b == k).map_or(0, |(_, v)| *v);
            (*v > was).then(|| format!("{k} +{}", v - was))
        })
        .collect();
    if hits.is_empty() {
        "limits hit: none".to_string()
    } else {
        format!("limits hit: {}", hits.join(", "))
    }
}

/// Adds the node's limit counters (read from its 15020 before and after) to a report.
fn with_hits(node: &ztunnel_tests::Node, r: Report) -> Report {
    // The counters before are those after the previous attack: read both here.
    let metrics = SocketAddr::new(node.ip.into(), 15020);
    let after = limit_hits(&node.netns, metrics);
    let mut r = r;
    r.notes.push(format!(
        "limit counters now: {}",
        after
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    r
}

/// Stops (SIGSTOP) node-b's ztunnel with a tunnel from node-a open, and times how long
/// node-a's pool takes to let go of it; then resumes it and checks the mesh again.
fn killed_peer(
    a: &ztunnel_tests::Node,
    client: &Arc<ztunnel_tests::Netns>,
    dst: SocketAddr,
    victim: u32,
) -> anyhow::Result<Report> {
    use std::io::{Read, Write};
    let metrics = SocketAddr::new(a.ip.into(), 15020);
    let active = || -> u64 {
        ztunnel_tests::http::get(&a.netns, metrics, "/metrics")
            .ok()
            .and_then(|(_, body)| {
                body.lines()
                    .find_map(|l| l.strip_prefix("ztunnel_pool_connections_active "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let mut held = ztunnel_tests::traffic::connect(client, dst, Duration::from_secs(5))?;
    held.write_all(b"x")?;
    let mut one = [0u8; 1];
    held.read_exact(&mut one)?;
    let before = active();
    if before == 0 {
        bail!("no pooled connection on node-a before the stop");
    }
    // SAFETY: kill(2) on a process this run started.
    unsafe { libc::kill(victim as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let evicted = loop {
        if active() == 0 {
            break Some(stopped.elapsed());
        }
        if stopped.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    // SAFETY: as above.
    unsafe { libc::kill(victim as i32, libc::SIGCONT) };
    let back = (0..100).any(|_| {
        let ok = echoes(client, dst);
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    drop(held);
    let mut notes = vec![match evicted {
        Some(d) => format!(
            "node-a's pooled connections to node-b ({before}) evicted {:.1} s after node-b stopped answering (PING every 10 s, 20 s to answer)",
            d.as_secs_f64()
        ),
        None => "pooled connection still held 60 s after the peer stopped".to_string(),
    }];
    notes.push(format!(
        "mesh echo after node-b resumed: {}",
        if back { "passes" } else { "FAILS" }
    ));
    notes.push("the echo beside it fails while node-b is stopped, as it must".to_string());
    Ok(Report {
        passed: evicted.is_some_and(|d| d <= Duration::from_secs(31)) && back,
        notes,
    })
}
