//! `cargo xtask bench`: what the mesh costs, on the namespace testbed.
//!
//! Two nodes run ztunnel. The same kinds of pod pairs exist in the mesh (enrolled: capture,
//! HBONE, mTLS) and outside it (direct), cross-node and same-node; the pods outside the
//! mesh are also measured through plain TCP relays on the nodes (`relay`: the cost of any
//! node proxy's extra connections and hops, with nothing of ztunnel's), and the mesh pods
//! once more with sockmap acceleration of the pod ↔ ztunnel hops (`sockmap`: the same
//! ztunnels, with the plain mesh pairs' ports excluded from it). Each measurement
//! runs in rounds that rotate the modes (so none always goes first), so whatever else
//! loads the machine — on 2 cores, a compile does — hits all alike.
//!
//! Writes `target/bench/results.json` and `target/bench/results.md`. Bounded: every load
//! has a deadline or a count, and a watchdog tears everything down if the whole run
//! exceeds its budget. Knobs (environment): BENCH_ROUNDS, BENCH_TPUT_SECS,
//! BENCH_CONN_SECS, BENCH_RTT (round trips per run), BENCH_HOLD (connections held open),
//! BENCH_ONLY (comma list of: tput1,tput4,rtt,conn1,conn4,same,hold,relay,sockmap,dns;
//! without `relay` the relays are not measured, without `sockmap` nor the mesh with
//! sockmap acceleration; `dns` alone runs only the DNS part, in its own testbed, see
//! `dns`), BENCH_DNS_CLIENTS, BENCH_DNS_SECS, BENCH_DNS_ROUNDS, BENCH_OUT (dir), ZTUNNEL_GLIBC_TUNABLES (ztunnel's
//! `GLIBC_TUNABLES`; by default the value the Dockerfile and the DaemonSet deploy, so the
//! bench measures the process as deployed; empty for glibc's defaults).

mod cluster;
mod dns;
mod load;
mod relay;
mod report;
mod stats;

use std::time::{Duration, Instant};

use anyhow::bail;
use ztunnel_tests::procstat;

use cluster::{Cluster, Mode, Path};
use load::{CONN_PORTS, CONN_PORT_BASE, ECHO_PORT, SINK_PORT};
use report::{Metric, Resources, Results};

/// How much to measure.
struct Plan {
    rounds: usize,
    tput: Duration,
    conn: Duration,
    rtt: usize,
    hold: usize,
    only: Option<Vec<String>>,
}

impl Plan {
    fn from_env() -> Plan {
        let num = ztunnel_tests::env_num;
        Plan {
            rounds: num("BENCH_ROUNDS", 3) as usize,
            tput: Duration::from_secs(num("BENCH_TPUT_SECS", 10)),
            conn: Duration::from_secs(num("BENCH_CONN_SECS", 4)),
            rtt: num("BENCH_RTT", 20_000) as usize,
            hold: num("BENCH_HOLD", 1000) as usize,
            only: std::env::var("BENCH_ONLY")
                .ok()
                .map(|v| v.split(',').map(str::to_string).collect()),
        }
    }

    fn wants(&self, item: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == item))
    }

    /// Whether anything but the DNS part is asked for (the two-node mesh cluster).
    fn wants_cluster(&self) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x != "dns"))
    }
}

fn main() -> anyhow::Result<()> {
    if !ztunnel_tests::is_root() {
        bail!("the benchmark needs root (network namespaces, eBPF)");
    }
    let plan = Plan::from_env();
    let budget = Duration::from_secs(
        std::env::var("BENCH_DEADLINE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(780),
    );
    ztunnel_tests::watchdog("bench", budget);
    procstat::raise_fd_limit();
    // What a production node logs: no per-connection debug lines, no dependency noise.
    if std::env::var_os("ZTUNNEL_LOG").is_none() {
        std::env::set_var("ZTUNNEL_LOG", ztunnel_tests::ztunnel::PRODUCTION_LOG);
    }
    let started = Instant::now();
    let mut results = Results::new(report::machine());
    // First, in a testbed of its own that is gone before the cluster starts.
    if plan.wants("dns") {
        results.dns = Some(dns::run()?);
    }
    if plan.wants_cluster() {
        results.resources = cluster_part(&plan, &mut results)?;
    }
    results.elapsed_secs = started.elapsed().as_secs_f64();
    let out = report::write(&results)?;
    println!("{}", std::fs::read_to_string(out.join("results.md"))?);
    eprintln!(
        "bench: wrote {} ({:.0} s)",
        out.display(),
        results.elapsed_secs
    );
    Ok(())
}

/// Everything but the DNS part, on the two-node cluster.
fn cluster_part(plan: &Plan, results: &mut Results) -> anyhow::Result<Resources> {
    eprintln!("bench: starting the cluster");
    let cluster = Cluster::start()?;
    // For profilers: `perf record -p <pids>`.
    eprintln!("bench: ztunnel pids {:?}", cluster.pids());
    warm_up(&cluster)?;
    std::thread::sleep(Duration::from_secs(1));
    let mut res = Resources::default();
    res.rss_idle = cluster.pids().iter().map(|p| procstat::rss(*p)).collect();
    res.rss_idle_anon = cluster
        .pids()
        .iter()
        .map(|p| procstat::rss_anon(*p))
        .collect();

    run_all(&cluster, plan, results, &mut res)?;
    if plan.wants("hold") {
        hold(&cluster, plan.hold, &mut res)?;
    }
    std::thread::sleep(Duration::from_secs(1));
    res.rss_after = cluster.pids().iter().map(|p| procstat::rss(*p)).collect();
    Ok(res)
}

/// One connection per pair and mode first: certificates are fetched and HBONE
/// connections pooled before anything is timed (steady state, not start-up).
fn warm_up(c: &Cluster) -> anyhow::Result<()> {
    for mode in [Mode::Direct, Mode::Relay, Mode::Mesh, Mode::Sockmap] {
        for path in [Path::CrossNode, Path::SameNode] {
            let p = c.pair(mode, path);
            let mut ok = false;
            for _ in 0..50 {
                if load::latency(&p.client.netns, p.dst(ECHO_PORT), 20).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !ok {
                bail!("{} {} pair never answered", mode.name(), path.name());
            }
        }
    }
    Ok(())
}

fn run_all(
    c: &Cluster,
    plan: &Plan,
    results: &mut Results,
    res: &mut Resources,
) -> anyhow::Result<()> {
    let mut conn_port = CONN_PORT_BASE;
    let pids = c.pids();
    for round in 0..plan.rounds {
        // Rotate the order every round so no mode always runs first.
        let mut modes = vec![Mode::Direct, Mode::Mesh];
        if plan.wants("relay") {
            modes.push(Mode::Relay);
        }
        let first = round % modes.len();
        modes.rotate_left(first);
        // Last, not rotated: a bulk sender on an accelerated socket is not held back by
        // its reader and fills the node's TCP memory until the connection fails
        // (ARCHITECTURE.md, "Sockmap"); the others must not run under that pressure.
        if plan.wants("sockmap") {
            modes.push(Mode::Sockmap);
        }
        eprintln!("bench: round {}/{}", round + 1, plan.rounds);
        for mode in modes {
            let cross = c.pair(mode, Path::CrossNode);
            for (item, streams) in [("tput1", 1usize), ("tput4", 4)] {
                if !plan.wants(item) {
                    continue;
                }
                let cpu0: Vec<_> = pids.iter().map(|p| procstat::cpu_time(*p)).collect();
                let sampler = procstat::RssSampler::start(pids.clone());
                let t = load::throughput(
                    &cross.client.netns,
                    cross.dst(SINK_PORT),
                    streams,
                    plan.tput,
                );
                let peak = sampler.finish();
                c.check_alive()?;
                let key = if streams == 1 {
                    Metric::Tput1
                } else {
                    Metric::Tput4
                };
                results.add(Path::CrossNode, key, mode, t.gbit_per_sec(), t.errors);
                if mode == Mode::Mesh {
                    let cpu: Vec<f64> = pids
                        .iter()
                        .zip(&cpu0)
                        .map(|(p, c0)| (procstat::cpu_time(*p) - *c0).as_secs_f64())
                        .collect();
                    res.add_cpu(streams, &cpu, t.bytes);
                    res.add_peak(&peak);
                }
                pause();
            }
            if plan.wants("rtt") {
                let rtts = load::latency(&cross.client.netns, cross.dst(ECHO_PORT), plan.rtt)?;
                results.add_rtts(Path::CrossNode, mode, rtts);
                pause();
            }
            for (item, conc) in [("conn1", 1usize), ("conn4", 4)] {
                if !plan.wants(item) {
                    continue;
                }
                // A fresh server port per run: see load::Servers::start.
                let port = conn_port;
                conn_port = CONN_PORT_BASE + (conn_port + 1 - CONN_PORT_BASE) % CONN_PORTS;
                let ch = load::conn_rate(&cross.client.netns, cross.dst(port), conc, plan.conn);
                c.check_alive()?;
                let key = if conc == 1 {
                    Metric::Conn1
                } else {
                    Metric::Conn4
                };
                results.add(Path::CrossNode, key, mode, ch.per_sec(), ch.errors);
                pause();
            }
            if plan.wants("same") {
                same_node(c, plan, mode, &mut conn_port, results)?;
            }
        }
    }
    Ok(())
}

/// The same-node path: 1-stream throughput, latency and connection rate.
fn same_node(
    c: &Cluster,
    plan: &Plan,
    mode: Mode,
    conn_port: &mut u16,
    results: &mut Results,
) -> anyhow::Result<()> {
    let p = c.pair(mode, Path::SameNode);
    let t = load::throughput(&p.client.netns, p.dst(SINK_PORT), 1, plan.tput);
    results.add(
        Path::SameNode,
        Metric::Tput1,
        mode,
        t.gbit_per_sec(),
        t.errors,
    );
    pause();
    let rtts = load::latency(&p.client.netns, p.dst(ECHO_PORT), plan.rtt)?;
    results.add_rtts(Path::SameNode, mode, rtts);
    pause();
    let port = *conn_port;
    *conn_port = CONN_PORT_BASE + (*conn_port + 1 - CONN_PORT_BASE) % CONN_PORTS;
    let ch = load::conn_rate(&p.client.netns, p.dst(port), 1, plan.conn);
    results.add(Path::SameNode, Metric::Conn1, mode, ch.per_sec(), ch.errors);
    c.check_alive()?;
    pause();
    Ok(())
}

/// Opens many mesh connections cross-node, keeps them open, and reads both ztunnels' RSS.
fn hold(c: &Cluster, n: usize, res: &mut Resources) -> anyhow::Result<()> {
    let p = c.pair(Mode::Mesh, Path::CrossNode);
    eprintln!("bench: holding {n} mesh connections open");
    let held = load::hold(&p.client.netns, p.dst(ECHO_PORT), n);
    std::thread::sleep(Duration::from_secs(1));
    res.held = held.len();
    res.rss_held = c.pids().iter().map(|p| procstat::rss(*p)).collect();
    drop(held);
    c.check_alive()
}

fn pause() {
    std::thread::sleep(Duration::from_millis(300));
}
