//! Collected results, the targets they are held to, and their JSON and markdown forms.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::cluster::{Mode, Path};
use crate::stats::{median, quantile};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Tput1,
    Tput4,
    Conn1,
    Conn4,
}

impl Metric {
    fn key(self) -> &'static str {
        match self {
            Metric::Tput1 => "throughput_1_stream_gbit_s",
            Metric::Tput4 => "throughput_4_streams_gbit_s",
            Metric::Conn1 => "connections_per_s_concurrency_1",
            Metric::Conn4 => "connections_per_s_concurrency_4",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Metric::Tput1 => "throughput, 1 stream (Gbit/s)",
            Metric::Tput4 => "throughput, 4 streams (Gbit/s)",
            Metric::Conn1 => "new connections/s, concurrency 1",
            Metric::Conn4 => "new connections/s, concurrency 4",
        }
    }
}

struct Series {
    path: Path,
    metric: Metric,
    direct: Vec<f64>,
    relay: Vec<f64>,
    mesh: Vec<f64>,
    sockmap: Vec<f64>,
    errors: u64,
}

impl Series {
    fn ratio(&self) -> f64 {
        median(&self.mesh) / median(&self.direct)
    }
    /// The mesh with sockmap acceleration against direct.
    fn sockmap_ratio(&self) -> f64 {
        median(&self.sockmap) / median(&self.direct)
    }
}

pub struct Machine {
    date: String,
    cpu: String,
    cores: usize,
    kernel: String,
    commit: String,
    /// The `GLIBC_TUNABLES` ztunnel ran with (the deployed value unless overridden).
    glibc_tunables: String,
}

/// Where and when: for the README's "Performance" section.
pub fn machine() -> Machine {
    let cmd = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Machine {
        date: cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        cpu: cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into()),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        commit: cmd(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        ),
        glibc_tunables: ztunnel_tests::ztunnel::glibc_tunables(),
    }
}

/// What ztunnel itself costs: CPU per byte carried and memory, per node (a, b).
#[derive(Default)]
pub struct Resources {
    pub rss_idle: Vec<u64>,
    pub rss_idle_anon: Vec<u64>,
    pub rss_after: Vec<u64>,
    pub rss_load: Vec<u64>,
    pub rss_held: Vec<u64>,
    pub held: usize,
    /// (streams, CPU seconds per ztunnel, bytes carried) of every mesh throughput run.
    cpu: Vec<(usize, Vec<f64>, u64)>,
}

impl Resources {
    pub fn add_cpu(&mut self, streams: usize, cpu: &[f64], bytes: u64) {
        self.cpu.push((streams, cpu.to_vec(), bytes));
    }

    pub fn add_peak(&mut self, peak: &[u64]) {
        self.rss_load.resize(peak.len(), 0);
        for (m, p) in self.rss_load.iter_mut().zip(peak) {
            *m = (*m).max(*p);
        }
    }

    /// CPU seconds per GB (10^9 bytes) for each ztunnel, over all runs with `streams`.
    fn cpu_per_gb(&self, streams: usize) -> Vec<f64> {
        let runs: Vec<_> = self.cpu.iter().filter(|(s, _, _)| *s == streams).collect();
        let gb: f64 = runs.iter().map(|(_, _, b)| *b as f64 / 1e9).sum();
        let n = runs.first().map_or(0, |r| r.1.len());
        (0..n)
            .map(|i| runs.iter().map(|r| r.1[i]).sum::<f64>() / gb)
            .collect()
    }
}

pub struct Results {
    machine: Machine,
    series: Vec<Series>,
    rtts: Vec<(Path, Mode, Vec<u64>)>,
    pub resources: Resources,
    /// The DNS part, when it ran.
    pub dns: Option<crate::dns::DnsResults>,
    pub elapsed_secs: f64,
}

impl Results {
    pub fn new(machine: Machine) -> Results {
        Results {
            machine,
            series: vec![],
            rtts: vec![],
            resources: Resources::default(),
            dns: None,
            elapsed_secs: 0.0,
        }
    }

    pub fn add(&mut self, path: Path, metric: Metric, mode: Mode, value: f64, errors: u64) {
        eprintln!(
            "bench:   {} {} {}: {value:.2} ({errors} errors)",
            path.name(),
            metric.key(),
            mode.name()
        );
        let pos = self
            .series
            .iter()
            .position(|s| s.path == path && s.metric == metric);
        let s = match pos {
            Some(i) => &mut self.series[i],
            None => {
                self.series.push(Series {
                    path,
                    metric,
                    direct: vec![],
                    relay: vec![],
                    mesh: vec![],
                    sockmap: vec![],
                    errors: 0,
                });
                self.series.last_mut().expect("just pushed")
            }
        };
        s.errors += errors;
        match mode {
            Mode::Direct => s.direct.push(value),
            Mode::Relay => s.relay.push(value),
            Mode::Mesh => s.mesh.push(value),
            Mode::Sockmap => s.sockmap.push(value),
        }
    }

    /// Round trips of all rounds are pooled per (path, mode): p99.9 needs many.
    pub fn add_rtts(&mut self, path: Path, mode: Mode, rtts: Vec<u64>) {
        let mut sorted = rtts.clone();
        sorted.sort_unstable();
        eprintln!(
            "bench:   {} rtt {}: p50 {} µs",
            path.name(),
            mode.name(),
            quantile(&sorted, 0.5) / 1000
        );
        match self
            .rtts
            .iter_mut()
            .find(|(p, m, _)| *p == path && *m == mode)
        {
            Some(e) => e.2.extend(rtts),
            None => self.rtts.push((path, mode, rtts)),
        }
    }

    /// Latency percentiles (µs) of one path and mode, and the sample count.
    fn latency(&self, path: Path, mode: Mode) -> Option<([f64; 3], usize)> {
        let (_, _, v) = self
            .rtts
            .iter()
            .find(|(p, m, _)| *p == path && *m == mode)?;
        let mut s = v.clone();
        s.sort_unstable();
        let us = |q| quantile(&s, q) as f64 / 1000.0;
        Some(([us(0.5), us(0.99), us(0.999)], s.len()))
    }

    fn series(&self, path: Path, metric: Metric) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.path == path && s.metric == metric)
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// A target: its description, the measured value (None: not measured) and the limit test.
struct Target {
    what: &'static str,
    value: Option<f64>,
    unit: &'static str,
    met: bool,
}

fn targets(r: &Results) -> Vec<Target> {
    // NaN (a side not measured) is no value.
    let finite = |v: f64| v.is_finite().then_some(v);
    let ratio = |m| r.series(Path::CrossNode, m).and_then(|s| finite(s.ratio()));
    let sockmap_ratio = |path, m| r.series(path, m).and_then(|s| finite(s.sockmap_ratio()));
    let p50_over = |path, mode| match (r.latency(path, mode), r.latency(path, Mode::Direct)) {
        (Some((m, _)), Some((d, _))) => Some(m[0] - d[0]),
        _ => None,
    };
    let p50 = p50_over(Path::CrossNode, Mode::Mesh);
    let relay_p50 = p50_over(Path::CrossNode, Mode::Relay);
    let max_mib = |v: &[u64]| v.iter().max().map(|m| *m as f64 / MIB);
    let t = |what, value: Option<f64>, unit, ok: &dyn Fn(f64) -> bool| Target {
        what,
        value,
        unit,
        met: value.is_some_and(ok),
    };
    // Below the plain relays' p50 overhead measured in the same run.
    let under_relays = |v: f64| relay_p50.is_some_and(|floor| v < floor);
    let same_ratio = |mode| {
        r.series(Path::SameNode, Metric::Tput1)
            .and_then(|s| match mode {
                Mode::Sockmap => finite(s.sockmap_ratio()),
                _ => finite(s.ratio()),
            })
    };
    vec![
        t(
            "throughput 1 stream, mesh/direct ≥ 0.45",
            ratio(Metric::Tput1),
            "×",
            &|v| v >= 0.45,
        ),
        t(
            "req/resp p50, mesh − direct ≤ 50 µs",
            p50,
            "µs",
            &|v| v <= 50.0,
        ),
        t(
            "new conn/s concurrency 1, mesh/direct ≥ 0.40",
            ratio(Metric::Conn1),
            "×",
            &|v| v >= 0.40,
        ),
        t(
            "throughput 1 stream ≥ 0.55× direct, sockmap off",
            ratio(Metric::Tput1),
            "×",
            &|v| v >= 0.55,
        ),
        t(
            "throughput 1 stream ≥ 0.55× direct, sockmap on",
            sockmap_ratio(Path::CrossNode, Metric::Tput1),
            "×",
            &|v| v >= 0.55,
        ),
        t(
            "req/resp p50 − direct below the plain relays', sockmap off",
            p50,
            "µs",
            &under_relays,
        ),
        t(
            "req/resp p50 − direct below the plain relays', sockmap on",
            p50_over(Path::CrossNode, Mode::Sockmap),
            "µs",
            &under_relays,
        ),
        t(
            "same-node throughput ≥ 0.8× direct, sockmap off",
            same_ratio(Mode::Mesh),
            "×",
            &|v| v >= 0.8,
        ),
        t(
            "same-node throughput ≥ 0.8× direct, sockmap on",
            same_ratio(Mode::Sockmap),
            "×",
            &|v| v >= 0.8,
        ),
        t(
            "RSS idle ≤ 12 MiB (max of both ztunnels)",
            max_mib(&r.resources.rss_idle),
            "MiB",
            &|v| v <= 12.0,
        ),
        t(
            "RSS with 1,000 open connections ≤ 64 MiB",
            max_mib(&r.resources.rss_held),
            "MiB",
            &|v| v <= 64.0,
        ),
    ]
}

fn to_json(r: &Results) -> Value {
    let m = &r.machine;
    let mut paths = serde_json::Map::new();
    for path in [Path::CrossNode, Path::SameNode] {
        let mut o = serde_json::Map::new();
        for s in r.series.iter().filter(|s| s.path == path) {
            o.insert(
                s.metric.key().into(),
                json!({"direct": median(&s.direct), "mesh": median(&s.mesh), "ratio": s.ratio(),
                       "relay": median(&s.relay),
                       "sockmap": median(&s.sockmap), "sockmap_ratio": s.sockmap_ratio(),
                       "direct_rounds": s.direct, "relay_rounds": s.relay, "mesh_rounds": s.mesh,
                       "sockmap_rounds": s.sockmap,
                       "errors": s.errors}),
            );
        }
        for mode in [Mode::Direct, Mode::Relay, Mode::Mesh, Mode::Sockmap] {
            if let Some((p, n)) = r.latency(path, mode) {
                o.insert(
                    format!("latency_us_{}", mode.name()),
                    json!({"p50": p[0], "p99": p[1], "p999": p[2], "round_trips": n}),
                );
            }
        }
        paths.insert(path.name().into(), Value::Object(o));
    }
    let res = &r.resources;
    json!({
        "machine": {"date": m.date, "cpu": m.cpu, "cores": m.cores, "kernel": m.kernel, "commit": m.commit, "ztunnel_glibc_tunables": m.glibc_tunables},
        "elapsed_secs": r.elapsed_secs,
        "results": paths,
        "ztunnel": {
            "nodes": ["node-a (client side)", "node-b (server side)"],
            "cpu_seconds_per_gb_1_stream": res.cpu_per_gb(1),
            "cpu_seconds_per_gb_4_streams": res.cpu_per_gb(4),
            "rss_idle_bytes": res.rss_idle,
            "rss_idle_anonymous_bytes": res.rss_idle_anon,
            "rss_peak_under_load_bytes": res.rss_load,
            "rss_held_connections_bytes": res.rss_held,
            "held_connections": res.held,
            "rss_idle_after_run_bytes": res.rss_after,
        },
        "targets": targets(r).iter().map(|t| json!({"target": t.what, "value": t.value, "unit": t.unit, "met": t.met})).collect::<Vec<_>>(),
        "dns": r.dns.as_ref().map(|d| d.json()),
    })
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn to_markdown(r: &Results) -> String {
    let mut md = cluster_markdown(r);
    if let Some(dns) = &r.dns {
        md.push('\n');
        md.push_str(&dns.markdown());
    }
    md
}

fn cluster_markdown(r: &Results) -> String {
    let m = &r.machine;
    let mut md = String::new();
    if r.series.is_empty() && r.rtts.is_empty() && r.resources.rss_idle.is_empty() {
        let _ = writeln!(
            md,
            "Measured {} on {} ({} cores), Linux {}, commit {}, by `cargo xtask bench` in {:.0} s \
             (the DNS part only).",
            m.date, m.cpu, m.cores, m.kernel, m.commit, r.elapsed_secs
        );
        return md;
    }
    let _ = writeln!(
        md,
        "Measured {} on {} ({} cores), Linux {}, commit {}, by `cargo xtask bench` in {:.0} s: \
         direct (pods outside the mesh), plain relays (the same pods through a plain TCP relay on \
         each node on the way: no capture, TLS or HTTP/2), mesh (capture + HBONE + mTLS) and mesh with \
         sockmap (the same, with the pod ↔ ztunnel hops accelerated) take turns round by round; throughput and connection rates are medians of the rounds, latency \
         percentiles are over all 1-byte round trips of a path and mode. ztunnel ran with \
         `GLIBC_TUNABLES={}`.\n",
        m.date, m.cpu, m.cores, m.kernel, m.commit, r.elapsed_secs, m.glibc_tunables
    );
    for path in [Path::CrossNode, Path::SameNode] {
        let _ = writeln!(
            md,
            "| {} | direct | plain relays | mesh | mesh + sockmap | relays/direct | mesh/direct | sockmap/direct |\n|---|---:|---:|---:|---:|---:|---:|---:|",
            path.name()
        );
        for metric in [Metric::Tput1, Metric::Tput4] {
            series_row(&mut md, r, path, metric);
        }
        latency_rows(&mut md, r, path);
        for metric in [Metric::Conn1, Metric::Conn4] {
            series_row(&mut md, r, path, metric);
        }
        md.push('\n');
    }
    let res = &r.resources;
    let mib = |v: &[u64], i: usize| {
        v.get(i)
            .map_or("—".into(), |b| format!("{:.1}", *b as f64 / MIB))
    };
    let _ = writeln!(
        md,
        "| ztunnel | node-a (client side) | node-b (server side) |\n|---|---:|---:|"
    );
    for (label, v) in [
        ("CPU s per GB carried, 1 stream", res.cpu_per_gb(1)),
        ("CPU s per GB carried, 4 streams", res.cpu_per_gb(4)),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {} | {} |",
            v.first().map_or("—".into(), |x| fmt(*x)),
            v.get(1).map_or("—".into(), |x| fmt(*x))
        );
    }
    let held = format!("RSS with {} open connections (MiB)", res.held);
    for (label, v) in [
        ("RSS idle (MiB)", &res.rss_idle),
        (
            "of which anonymous (not the binary's code pages)",
            &res.rss_idle_anon,
        ),
        ("RSS peak under throughput load (MiB)", &res.rss_load),
        (held.as_str(), &res.rss_held),
        ("RSS idle after the run (MiB)", &res.rss_after),
    ] {
        let _ = writeln!(md, "| {label} | {} | {} |", mib(v, 0), mib(v, 1));
    }
    let _ = writeln!(
        md,
        "\n| target (cross-node) | measured | met |\n|---|---:|:---:|"
    );
    for t in targets(r) {
        let v = t
            .value
            .map_or("not measured".into(), |v| format!("{} {}", fmt(v), t.unit));
        let _ = writeln!(
            md,
            "| {} | {v} | {} |",
            t.what,
            if t.met { "yes" } else { "**no**" }
        );
    }
    md
}

/// One metric's medians of direct, relays, mesh and mesh with sockmap, with the ratios
/// (nothing if unmeasured).
fn series_row(md: &mut String, r: &Results, path: Path, metric: Metric) {
    let Some(s) = r.series(path, metric) else {
        return;
    };
    let err = match s.errors {
        0 => String::new(),
        n => format!(" ({n} failed)"),
    };
    let (d, re, me, so) = (
        median(&s.direct),
        median(&s.relay),
        median(&s.mesh),
        median(&s.sockmap),
    );
    let _ = writeln!(
        md,
        "| {}{err} | {} | {} | {} | {} | {} | {} | {} |",
        metric.label(),
        fmt(d),
        fmt(re),
        fmt(me),
        fmt(so),
        times(re / d),
        times(me / d),
        times(so / d)
    );
}

/// A ratio, or a dash when a side was not measured.
fn times(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{ratio:.2}×")
    } else {
        "—".into()
    }
}

/// p50, p99 and p99.9 of direct, relays, mesh and mesh with sockmap, with the ratios and
/// differences.
fn latency_rows(md: &mut String, r: &Results, path: Path) {
    let Some((d, n)) = r.latency(path, Mode::Direct) else {
        return;
    };
    let other = |mode| r.latency(path, mode).map(|(v, _)| v);
    let (re, me, so) = (other(Mode::Relay), other(Mode::Mesh), other(Mode::Sockmap));
    for (i, q) in ["p50", "p99", "p99.9"].iter().enumerate() {
        let value = |v: Option<[f64; 3]>| v.map_or("—".into(), |v| fmt(v[i]));
        let versus = |v: Option<[f64; 3]>| {
            v.map_or("—".into(), |v| {
                format!("{:.2}× (+{:.0} µs)", v[i] / d[i], v[i] - d[i])
            })
        };
        let _ = writeln!(
            md,
            "| req/resp latency {q} (µs, {n} round trips) | {} | {} | {} | {} | {} | {} | {} |",
            fmt(d[i]),
            value(re),
            value(me),
            value(so),
            versus(re),
            versus(me),
            versus(so)
        );
    }
}

/// Writes both files under `$BENCH_OUT` (default: the workspace's `target/bench`).
pub fn write(r: &Results) -> anyhow::Result<PathBuf> {
    let dir = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&to_json(r))?,
    )?;
    std::fs::write(dir.join("results.md"), to_markdown(r))?;
    Ok(dir)
}
