//! The DNS part (`BENCH_ONLY=dns` runs it alone, in under a minute): DNS questions over UDP
//! from a pod, closed loop, `BENCH_DNS_CLIENTS` (4) at once, `BENCH_DNS_SECS` (4) s per
//! variant and round, `BENCH_DNS_ROUNDS` (3) rounds that rotate the variants.
//!
//! A testbed of its own: node-a runs ztunnel with the DNS proxy on node-a's address, port
//! 15053, its upstream a stand-in DNS server (`StubDns`) in a pod on node-b; a mesh service
//! gives the mesh name. Variants:
//! - direct: an unenrolled pod asks the DNS server;
//! - captured, forwarded / mesh name: an enrolled pod asks the DNS server's address (the
//!   proxy answers only if the pod's UDP port 53 is captured: whether it did is read from
//!   the proxy's `istio_dns_requests_total`, and a variant it did not answer is reported
//!   "not captured", with no figure);
//! - proxy listener, forwarded / mesh name: the enrolled pod asks the proxy's own address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use serde_json::{json, Value};
use ztunnel_tests::dns::{answers, question, StubDns};
use ztunnel_tests::ztunnel::{local_config, WorkloadSpec, Ztunnel};
use ztunnel_tests::{Netns, Node, Pod, Testbed};

use crate::stats::{median, quantile};

/// What the stand-in DNS server answers for every name.
const STUB_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const MESH_NAME: &str = "echo.bench.svc.cluster.local.";
const OTHER_NAME: &str = "www.example.org.";
const PROXY_PORT: u16 = 15053;
/// A question not answered within this is lost.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Questions asked to learn whether a captured variant reaches the proxy.
const PROBE: u64 = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Direct,
    CapturedForward,
    CapturedMesh,
    ListenerForward,
    ListenerMesh,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::Direct,
        Variant::CapturedForward,
        Variant::CapturedMesh,
        Variant::ListenerForward,
        Variant::ListenerMesh,
    ];

    fn key(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::CapturedForward => "captured_forwarded",
            Variant::CapturedMesh => "captured_mesh_name",
            Variant::ListenerForward => "listener_forwarded",
            Variant::ListenerMesh => "listener_mesh_name",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::Direct => "direct: unenrolled pod → DNS server",
            Variant::CapturedForward => {
                "proxy (captured), forwarded name: enrolled pod → DNS server's address"
            }
            Variant::CapturedMesh => {
                "proxy (captured), mesh name: enrolled pod → DNS server's address"
            }
            Variant::ListenerForward => {
                "proxy (its listener), forwarded name: enrolled pod → node:15053"
            }
            Variant::ListenerMesh => "proxy (its listener), mesh name: enrolled pod → node:15053",
        }
    }

    fn captured(self) -> bool {
        matches!(self, Variant::CapturedForward | Variant::CapturedMesh)
    }

    fn name(self) -> &'static str {
        match self {
            Variant::CapturedMesh | Variant::ListenerMesh => MESH_NAME,
            _ => OTHER_NAME,
        }
    }

    fn expect(self) -> Ipv4Addr {
        match self {
            Variant::CapturedMesh | Variant::ListenerMesh => VIP,
            _ => STUB_ANSWER,
        }
    }
}

/// How much to measure.
struct Plan {
    clients: usize,
    secs: Duration,
    rounds: usize,
}

/// One variant's figures over all rounds.
struct Row {
    variant: Variant,
    qps: Vec<f64>,
    /// Latency of every answered question (ns).
    lat: Vec<u64>,
    answered: u64,
    lost: u64,
    /// Answered, but not with the expected address (someone else answered).
    wrong: u64,
    /// How many questions `istio_dns_requests_total` counted while it ran.
    counted: u64,
    /// For a captured variant the proxy did not answer: (counted, asked) in the probe.
    not_captured: Option<(u64, u64)>,
}

pub struct DnsResults {
    plan: Plan,
    rows: Vec<Row>,
    pub secs: f64,
}

/// One closed-loop run's outcome.
#[derive(Default)]
struct Run {
    answered: u64,
    lost: u64,
    wrong: u64,
    lat: Vec<u64>,
}

struct Setup {
    plain: Pod,
    client: Pod,
    stub: SocketAddr,
    proxy: SocketAddr,
    node: Node,
    _z: Vec<Ztunnel>,
    /// Dropped last.
    _tb: Testbed,
}

impl Setup {
    fn start() -> anyhow::Result<Setup> {
        let mut tb = Testbed::new()?;
        let a = tb.add_node("node-a")?;
        let b = tb.add_node("node-b")?;
        let client = tb.add_pod(&a, "dns-client")?;
        let plain = tb.add_pod(&a, "dns-plain")?;
        let server = tb.add_pod(&b, "dns-server")?;
        let coredns = tb.add_pod(&b, "coredns")?;
        StubDns::start(&coredns.netns, STUB_ANSWER)?;
        let mut server_spec = WorkloadSpec::mesh(&server, "bench", "server");
        server_spec.extra =
            "  services:\n    bench/echo.bench.svc.cluster.local: {80: 8080}\n".into();
        let services = format!(
            "services:\n- name: echo\n  namespace: bench\n  hostname: {}\n  \
             vips: [\"/{VIP}\"]\n  ports: {{80: 8080}}\n",
            MESH_NAME.trim_end_matches('.')
        );
        let yaml = local_config(
            &[
                WorkloadSpec::mesh(&client, "bench", "client"),
                WorkloadSpec::plain(&plain, "bench"),
                server_spec,
            ],
            &services,
        );
        let config = tb.write_config("dns-workloads.yaml", &yaml)?;
        let resolv = tb.write_config("resolv.conf", &format!("nameserver {}\n", coredns.ip))?;
        tb.own_binaries()?;
        let proxy = SocketAddr::new(IpAddr::V4(a.ip), PROXY_PORT);
        let (proxy_s, resolv_s) = (proxy.to_string(), resolv.display().to_string());
        let args = ["--dns-proxy-addr", &proxy_s, "--dns-upstream", &resolv_s];
        let za = tb.start_ztunnel(&a, &config, &args)?;
        let zb = tb.start_ztunnel(&b, &config, &[])?;
        Ok(Setup {
            plain,
            client,
            stub: SocketAddr::new(IpAddr::V4(coredns.ip), 53),
            proxy,
            node: a,
            _z: vec![za, zb],
            _tb: tb,
        })
    }

    fn target(&self, v: Variant) -> (Arc<Netns>, SocketAddr) {
        match v {
            Variant::Direct => (self.plain.netns.clone(), self.stub),
            Variant::CapturedForward | Variant::CapturedMesh => {
                (self.client.netns.clone(), self.stub)
            }
            Variant::ListenerForward | Variant::ListenerMesh => {
                (self.client.netns.clone(), self.proxy)
            }
        }
    }

    /// `istio_dns_requests_total` over UDP, all labels summed, from node-a's 15020.
    fn counted(&self) -> u64 {
        let metrics = SocketAddr::new(IpAddr::V4(self.node.ip), 15020);
        let Ok((_, body)) = ztunnel_tests::http::get(&self.node.netns, metrics, "/metrics") else {
            return 0;
        };
        body.lines()
            .filter(|l| {
                l.starts_with("istio_dns_requests_total{") && l.contains("request_protocol=\"udp\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn run(&self, v: Variant, clients: usize, dur: Duration, max: u64) -> anyhow::Result<Run> {
        let (ns, dst) = self.target(v);
        closed_loop(&ns, dst, v.name(), v.expect(), clients, dur, max)
    }
}

pub fn run() -> anyhow::Result<DnsResults> {
    let num = ztunnel_tests::env_num;
    let plan = Plan {
        clients: num("BENCH_DNS_CLIENTS", 4).max(1) as usize,
        secs: Duration::from_secs(num("BENCH_DNS_SECS", 4).max(1)),
        rounds: num("BENCH_DNS_ROUNDS", 3).max(1) as usize,
    };
    let started = Instant::now();
    eprintln!("bench: dns: starting its testbed");
    let s = Setup::start()?;
    // Ready: the proxy answers the mesh name, and the DNS server answers directly.
    let ready = Instant::now();
    loop {
        let l = s.run(Variant::ListenerMesh, 1, Duration::from_secs(1), 1)?;
        let d = s.run(Variant::Direct, 1, Duration::from_secs(1), 1)?;
        if l.answered == 1 && d.answered == 1 {
            break;
        }
        if ready.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("dns: the proxy or the DNS server never answered");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut rows: Vec<Row> = Variant::ALL
        .iter()
        .map(|&variant| Row {
            variant,
            qps: vec![],
            lat: vec![],
            answered: 0,
            lost: 0,
            wrong: 0,
            counted: 0,
            not_captured: None,
        })
        .collect();
    // Does the enrolled pod's UDP to port 53 reach the proxy at all?
    for row in rows.iter_mut().filter(|r| r.variant.captured()) {
        let before = s.counted();
        let r = s.run(row.variant, 1, Duration::from_secs(5), PROBE)?;
        let counted = s.counted().saturating_sub(before);
        if counted < r.answered.max(1) {
            eprintln!(
                "bench: dns: {}: not captured (the proxy counted {counted} of {} questions)",
                row.variant.key(),
                r.answered + r.lost + r.wrong
            );
            row.not_captured = Some((counted, r.answered + r.lost + r.wrong));
        }
    }
    for round in 0..plan.rounds {
        eprintln!("bench: dns: round {}/{}", round + 1, plan.rounds);
        let n = rows.len();
        for i in 0..n {
            let row = &mut rows[(i + round) % n];
            if row.not_captured.is_some() {
                continue;
            }
            let before = s.counted();
            let t = Instant::now();
            let r = s.run(row.variant, plan.clients, plan.secs, u64::MAX)?;
            let secs = t.elapsed().as_secs_f64();
            row.counted += s.counted().saturating_sub(before);
            row.qps.push(r.answered as f64 / secs);
            eprintln!(
                "bench:   dns {}: {:.0} q/s ({} lost, {} wrong)",
                row.variant.key(),
                r.answered as f64 / secs,
                r.lost,
                r.wrong
            );
            row.answered += r.answered;
            row.lost += r.lost;
            row.wrong += r.wrong;
            row.lat.extend(r.lat);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for row in &mut rows {
        row.lat.sort_unstable();
    }
    Ok(DnsResults {
        plan,
        rows,
        secs: started.elapsed().as_secs_f64(),
    })
}

/// `clients` threads in `ns`, each with its own socket, asking `dst` for `name` one
/// question after another until `dur` has passed or `max` questions were asked.
fn closed_loop(
    ns: &Arc<Netns>,
    dst: SocketAddr,
    name: &str,
    expect: Ipv4Addr,
    clients: usize,
    dur: Duration,
    max: u64,
) -> anyhow::Result<Run> {
    let query = question(name, RecordType::A)?;
    let socks = ns.run(move || -> std::io::Result<Vec<UdpSocket>> {
        (0..clients)
            .map(|_| {
                let s = UdpSocket::bind(("0.0.0.0", 0))?;
                s.connect(dst)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                Ok(s)
            })
            .collect()
    })?;
    let deadline = Instant::now() + dur;
    let per_client = max.div_ceil(clients as u64);
    let threads: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let q = query.clone();
            std::thread::spawn(move || {
                one_client(s, q, (i as u16) << 12, expect, deadline, per_client)
            })
        })
        .collect();
    let mut all = Run::default();
    for t in threads {
        let r = t
            .join()
            .map_err(|_| anyhow::anyhow!("dns client panicked"))
            .context("dns load")?;
        all.answered += r.answered;
        all.lost += r.lost;
        all.wrong += r.wrong;
        all.lat.extend(r.lat);
    }
    Ok(all)
}

fn one_client(
    s: UdpSocket,
    mut q: Vec<u8>,
    mut id: u16,
    expect: Ipv4Addr,
    deadline: Instant,
    max: u64,
) -> Run {
    let mut r = Run::default();
    let mut buf = [0u8; 1500];
    let mut asked = 0;
    while asked < max && Instant::now() < deadline {
        asked += 1;
        id = id.wrapping_add(1);
        q[..2].copy_from_slice(&id.to_be_bytes());
        let t0 = Instant::now();
        if s.send(&q).is_err() {
            r.lost += 1;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        loop {
            match s.recv(&mut buf) {
                // A late reply to an earlier, timed-out question: not this one's.
                Ok(n) if n < 2 || buf[..2] != id.to_be_bytes() => continue,
                Ok(n) => {
                    let ok = matches!(answers(&buf[..n]),
                        Ok((ResponseCode::NoError, ips)) if ips == [IpAddr::V4(expect)]);
                    if ok {
                        r.answered += 1;
                        r.lat.push(t0.elapsed().as_nanos() as u64);
                    } else {
                        r.wrong += 1;
                    }
                    break;
                }
                Err(_) => {
                    r.lost += 1;
                    break;
                }
            }
        }
    }
    r
}

impl DnsResults {
    fn latency(&self, row: &Row) -> Option<[f64; 2]> {
        let _ = self;
        (!row.lat.is_empty()).then(|| {
            [
                quantile(&row.lat, 0.5) as f64 / 1000.0,
                quantile(&row.lat, 0.99) as f64 / 1000.0,
            ]
        })
    }

    fn direct(&self) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.variant == Variant::Direct && !r.qps.is_empty())
    }

    pub fn json(&self) -> Value {
        let direct = self.direct().map(|d| (median(&d.qps), self.latency(d)));
        let mut o = serde_json::Map::new();
        for row in &self.rows {
            let v = match row.not_captured {
                Some((counted, asked)) => json!({
                    "captured": false,
                    "probe_questions": asked,
                    "probe_counted_by_proxy": counted,
                }),
                None => {
                    let qps = median(&row.qps);
                    let lat = self.latency(row);
                    let ratio = |a: f64, b: f64| (a / b).is_finite().then_some(a / b);
                    json!({
                        "qps": qps,
                        "qps_rounds": row.qps,
                        "p50_us": lat.map(|l| l[0]),
                        "p99_us": lat.map(|l| l[1]),
                        "answered": row.answered,
                        "lost": row.lost,
                        "wrong_answer": row.wrong,
                        "counted_by_proxy": row.counted,
                        "qps_vs_direct": direct.and_then(|d| ratio(qps, d.0)),
                        "p50_vs_direct": direct.and_then(|d| Some(ratio(lat?[0], d.1?[0]))).flatten(),
                        "p99_vs_direct": direct.and_then(|d| Some(ratio(lat?[1], d.1?[1]))).flatten(),
                    })
                }
            };
            o.insert(row.variant.key().into(), v);
        }
        json!({
            "clients": self.plan.clients,
            "secs_per_run": self.plan.secs.as_secs(),
            "rounds": self.plan.rounds,
            "elapsed_secs": self.secs,
            "variants": o,
        })
    }

    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "DNS over UDP (in {:.0} s): {} clients in a closed loop from a pod on node-a, {} s per \
             variant and round, {} rounds taking turns; questions/s is the median of the rounds, \
             latency over all answered questions. The DNS server is a stand-in in a pod on node-b; \
             the proxy runs in node-a's ztunnel and forwards to it. \"counted\" is what the \
             proxy's `istio_dns_requests_total` counted meanwhile.\n",
            self.secs, self.plan.clients, self.plan.secs.as_secs(), self.plan.rounds
        );
        let _ = writeln!(
            md,
            "| DNS over UDP | questions/s | p50 (µs) | p99 (µs) | q/s vs direct | p50 vs direct | p99 vs direct | answered / lost / wrong / counted |\n|---|---:|---:|---:|---:|---:|---:|---|"
        );
        let direct = self.direct().map(|d| (median(&d.qps), self.latency(d)));
        for row in &self.rows {
            if let Some((counted, asked)) = row.not_captured {
                let _ = writeln!(
                    md,
                    "| {} | not captured: the proxy counted {counted} of {asked} questions | — | — | — | — | — | — |",
                    row.variant.label()
                );
                continue;
            }
            let qps = median(&row.qps);
            let lat = self.latency(row);
            let f = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.0}"));
            let vs = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                _ => "—".into(),
            };
            let plus = |i: usize| match (lat, direct.and_then(|d| d.1)) {
                (Some(l), Some(d)) => format!("{:.2}× ({:+.0} µs)", l[i] / d[i], l[i] - d[i]),
                _ => "—".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} / {} / {} / {} |",
                row.variant.label(),
                f(Some(qps).filter(|v| v.is_finite())),
                f(lat.map(|l| l[0])),
                f(lat.map(|l| l[1])),
                vs(Some(qps), direct.map(|d| d.0)),
                plus(0),
                plus(1),
                row.answered,
                row.lost,
                row.wrong,
                row.counted
            );
        }
        md
    }
}
