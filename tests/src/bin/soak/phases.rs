//! The soak's three phases and what they found.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use ztunnel_tests::procstat::{fds, rss};
use ztunnel_tests::traffic::{Load, LoadReport};
use ztunnel_tests::ztunnel::{capture_counter, Ztunnel};
use ztunnel_tests::{Node, Pod, Testbed};

const MIB: f64 = 1024.0 * 1024.0;

pub struct Knobs {
    pub conns: usize,
    pub secs: u64,
    pub workers: usize,
    pub out: PathBuf,
}

impl Knobs {
    pub fn from_env() -> Knobs {
        let num = ztunnel_tests::env_num;
        Knobs {
            conns: num("SOAK_CONNS", 10_000) as usize,
            secs: num("SOAK_SECS", 300),
            workers: num("SOAK_WORKERS", 2) as usize,
            out: std::env::var_os("SOAK_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak")),
        }
    }
}

/// The running mesh: node-a (client pod) and node-b (server pod), a ztunnel on each.
pub struct Mesh<'a> {
    pub tb: &'a Testbed,
    pub config: &'a Path,
    pub flags: &'a [&'a str],
    pub nodes: [Node; 2],
    pub client: Pod,
    pub server: Pod,
    pub dst: SocketAddr,
    pub ztunnels: [Ztunnel; 2],
}

impl Mesh<'_> {
    fn pids(&self) -> [u32; 2] {
        [self.ztunnels[0].pid, self.ztunnels[1].pid]
    }

    fn fds(&self) -> [usize; 2] {
        self.pids().map(fds)
    }

    fn rss(&self) -> [u64; 2] {
        self.pids().map(rss)
    }

    fn syns_dropped(&self) -> anyhow::Result<u64> {
        Ok(
            capture_counter(&self.nodes[0], &self.client, "dropped_no_proxy")?
                + capture_counter(&self.nodes[1], &self.server, "dropped_no_proxy")?,
        )
    }
}

/// Phase 1: many connections open at once.
pub struct Concurrent {
    pub target: usize,
    pub opened: usize,
    pub failures: Vec<String>,
    pub failed: usize,
    pub open_secs: f64,
    pub fds_base: [usize; 2],
    pub fds_peak: [usize; 2],
    pub fds_after: [usize; 2],
    pub rss_base: [u64; 2],
    pub rss_peak: [u64; 2],
    pub rss_after: [u64; 2],
}

pub fn concurrent(m: &Mesh, n: usize) -> anyhow::Result<Concurrent> {
    std::thread::sleep(Duration::from_secs(1));
    let (fds_base, rss_base) = (m.fds(), m.rss());
    let started = Instant::now();
    let dst = m.dst;
    let (conns, mut failures) = m.client.netns.run(move || {
        let mut conns = Vec::with_capacity(n);
        let mut failures = vec![];
        for i in 0..n {
            let r = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                s.write_all(b"1")?;
                Ok(s)
            });
            match r {
                Ok(s) => conns.push(s),
                Err(e) => failures.push(format!("connection {i}: {e}")),
            }
        }
        (conns, failures)
    });
    let open_secs = started.elapsed().as_secs_f64();
    let mut conns: Vec<TcpStream> = conns;
    // Two exchanges on every connection: the second proves all were alive together.
    for msg in [b"1", b"2"] {
        let mut alive = Vec::with_capacity(conns.len());
        for (i, mut s) in conns.into_iter().enumerate() {
            if msg == b"2" {
                if let Err(e) = s.write_all(msg) {
                    failures.push(format!("write {i}: {e}"));
                    continue;
                }
            }
            let mut b = [0u8; 1];
            match s.read_exact(&mut b) {
                Ok(()) if &b == msg => alive.push(s),
                Ok(()) => failures.push(format!("connection {i}: wrong echo")),
                Err(e) => failures.push(format!("echo {i}: {e}")),
            }
        }
        conns = alive;
    }
    let opened = conns.len();
    let (fds_peak, rss_peak) = (m.fds(), m.rss());
    drop(conns);
    // Back to baseline, but for the pooled HTTP/2 connections (one per 100 streams, idle
    // until the pool's idle timeout).
    let pooled = n / 100 + 2;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fds_after = m.fds();
    while Instant::now() < deadline
        && !(fds_after[0] <= fds_base[0] + pooled && fds_after[1] <= fds_base[1] + pooled)
    {
        std::thread::sleep(Duration::from_millis(500));
        fds_after = m.fds();
    }
    let failed = failures.len();
    failures.truncate(10);
    Ok(Concurrent {
        target: n,
        opened,
        failures,
        failed,
        open_secs,
        fds_base,
        fds_peak,
        fds_after,
        rss_base,
        rss_peak,
        rss_after: m.rss(),
    })
}

/// Phase 2: steady load, memory sampled.
pub struct Soak {
    pub secs: u64,
    pub load: LoadReport,
    /// (seconds since start, RSS of node-a's and node-b's ztunnel)
    pub samples: Vec<(u64, [u64; 2])>,
    pub fds_before: [usize; 2],
    pub fds_after: [usize; 2],
}

impl Soak {
    /// Mean RSS over the first and the last fifth of the run (the first 30 s, warm-up,
    /// left out).
    pub fn windows(&self) -> ([f64; 2], [f64; 2]) {
        let settled: Vec<_> = self.samples.iter().filter(|(t, _)| *t >= 30).collect();
        let k = (settled.len() / 5).max(1);
        let mean = |s: &[&(u64, [u64; 2])]| {
            let n = s.len().max(1) as f64;
            [0, 1].map(|i| s.iter().map(|(_, r)| r[i] as f64).sum::<f64>() / n)
        };
        (
            mean(&settled[..k.min(settled.len())]),
            mean(&settled[settled.len().saturating_sub(k)..]),
        )
    }

    /// Flat: the last window within 10 % (and 4 MiB) of the first.
    pub fn flat(&self) -> bool {
        let (first, last) = self.windows();
        (0..2).all(|i| last[i] <= first[i] * 1.10 + 4.0 * MIB)
    }
}

pub fn soak(m: &Mesh, k: &Knobs) -> anyhow::Result<Soak> {
    let fds_before = m.fds();
    let load = Load::start(&m.client.netns, m.dst, k.workers);
    let started = Instant::now();
    let mut samples = vec![];
    while started.elapsed() < Duration::from_secs(k.secs) {
        samples.push((started.elapsed().as_secs(), m.rss()));
        std::thread::sleep(Duration::from_secs(5));
    }
    samples.push((started.elapsed().as_secs(), m.rss()));
    let load = load.stop();
    std::thread::sleep(Duration::from_secs(2));
    Ok(Soak {
        secs: k.secs,
        load,
        samples,
        fds_before,
        fds_after: m.fds(),
    })
}

/// Phase 3: both nodes upgraded under load.
pub struct Handover {
    pub load: LoadReport,
    pub syns_dropped: u64,
    pub old_exits: Vec<String>,
}

pub fn handover(m: &mut Mesh, k: &Knobs) -> anyhow::Result<Handover> {
    let dropped_before = m.syns_dropped()?;
    let load = Load::start(&m.client.netns, m.dst, k.workers);
    std::thread::sleep(Duration::from_secs(2));
    let mut old_exits = vec![];
    for i in 0..2 {
        let node = m.nodes[i].clone();
        let new = m.tb.start_ztunnel(&node, m.config, m.flags)?;
        new.wait_for_log(
            "took over the running ztunnel's listeners",
            Duration::from_secs(10),
        )?;
        let old = std::mem::replace(&mut m.ztunnels[i], new);
        old.wait_for_log("ztunnel stopped", Duration::from_secs(20))?;
        let status = m.tb.stop(old.pid, Duration::from_secs(5));
        let clean = status.is_some_and(|s| s.success());
        old_exits.push(format!(
            "{}: {}",
            node.name,
            if clean {
                "exit 0".to_string()
            } else {
                format!("{status:?}")
            }
        ));
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(2));
    let load = load.stop();
    Ok(Handover {
        load,
        syns_dropped: m.syns_dropped()? - dropped_before,
        old_exits,
    })
}

pub struct Results {
    pub date: String,
    pub elapsed_secs: f64,
    pub concurrent: Concurrent,
    pub soak: Soak,
    pub handover: Handover,
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / MIB)
}

fn pair<T: std::fmt::Display>(v: [T; 2]) -> String {
    format!("{} / {}", v[0], v[1])
}

impl Results {
    /// What went wrong, in words; empty when nothing did.
    pub fn problems(&self) -> Vec<String> {
        let mut p = vec![];
        let c = &self.concurrent;
        if c.failed > 0 {
            p.push(format!(
                "{} of {} concurrent connections failed: {:?}",
                c.failed, c.target, c.failures
            ));
        }
        let pooled = c.target / 100 + 2;
        if (0..2).any(|i| c.fds_after[i] > c.fds_base[i] + pooled) {
            p.push(format!(
                "descriptors not back to baseline after the concurrent phase: {:?} → {:?}",
                c.fds_base, c.fds_after
            ));
        }
        let s = &self.soak;
        if s.load.failed() > 0 || s.load.ok == 0 {
            p.push(format!("steady load lost connections: {:?}", s.load));
        }
        if !s.flat() {
            p.push(format!("RSS not flat: {:?}", s.windows()));
        }
        if (0..2).any(|i| s.fds_after[i] > s.fds_before[i] + 4) {
            p.push(format!(
                "descriptors grew during the soak: {:?} → {:?}",
                s.fds_before, s.fds_after
            ));
        }
        let h = &self.handover;
        if h.load.failed() > 0 || h.syns_dropped > 0 {
            p.push(format!(
                "handover lost connections: {:?}, SYNs dropped {}",
                h.load, h.syns_dropped
            ));
        }
        if h.old_exits.iter().any(|e| !e.ends_with("exit 0")) {
            p.push(format!(
                "old ztunnels did not exit cleanly: {:?}",
                h.old_exits
            ));
        }
        p
    }

    pub fn json(&self) -> serde_json::Value {
        let (c, s, h) = (&self.concurrent, &self.soak, &self.handover);
        let (first, last) = s.windows();
        let load = |l: &LoadReport| {
            json!({"ok": l.ok, "refused": l.refused, "reset": l.reset, "timed_out": l.timed_out,
                   "other": l.other, "slowest_ms": l.slowest.as_secs_f64() * 1e3, "samples": l.samples})
        };
        json!({
            "date": self.date,
            "elapsed_secs": self.elapsed_secs,
            "concurrent": {
                "target": c.target, "held": c.opened, "failed": c.failed, "failures": c.failures,
                "open_secs": c.open_secs,
                "fds": {"base": c.fds_base, "peak": c.fds_peak, "after": c.fds_after},
                "rss_bytes": {"base": c.rss_base, "peak": c.rss_peak, "after": c.rss_after},
            },
            "soak": {
                "secs": s.secs, "load": load(&s.load),
                "rss_first_window_bytes": first, "rss_last_window_bytes": last, "flat": s.flat(),
                "rss_samples": s.samples,
                "fds": {"before": s.fds_before, "after": s.fds_after},
            },
            "handover": {"load": load(&h.load), "syns_dropped": h.syns_dropped, "old_exits": h.old_exits},
            "problems": self.problems(),
        })
    }

    pub fn markdown(&self) -> String {
        let (c, s, h) = (&self.concurrent, &self.soak, &self.handover);
        let (first, last) = s.windows();
        let w = |v: [f64; 2]| format!("{:.1} / {:.1}", v[0] / MIB, v[1] / MIB);
        let verdict = if self.problems().is_empty() {
            "nothing lost, nothing leaked".to_string()
        } else {
            self.problems().join("; ")
        };
        format!(
            "### Soak ({date}, {elapsed:.0} s)\n\n\
             Values are node-a / node-b ztunnel (client side / server side).\n\n\
             | phase | measured |\n|---|---|\n\
             | concurrent | {held} of {target} connections held at once ({failed} failed), opened in {open:.1} s |\n\
             | concurrent: fds | baseline {fb}, peak {fp}, after close {fa} |\n\
             | concurrent: RSS MiB | baseline {rb}, peak {rp}, after close {ra} |\n\
             | soak {secs} s | {sok} connections, {sfail} failed, slowest {sslow:.0} ms |\n\
             | soak: RSS MiB | first window {first}, last window {last} ({flat}) |\n\
             | soak: fds | {sfb} before, {sfa} after |\n\
             | handover (both nodes) | {hok} connections, {href} refused, {hreset} reset, {hto} timed out, {hsyn} SYNs dropped, slowest {hslow:.0} ms |\n\n\
             Verdict: {verdict}\n",
            date = self.date,
            elapsed = self.elapsed_secs,
            held = c.opened,
            target = c.target,
            failed = c.failed,
            open = c.open_secs,
            fb = pair(c.fds_base),
            fp = pair(c.fds_peak),
            fa = pair(c.fds_after),
            rb = pair(c.rss_base.map(mib)),
            rp = pair(c.rss_peak.map(mib)),
            ra = pair(c.rss_after.map(mib)),
            secs = s.secs,
            sok = s.load.ok,
            sfail = s.load.failed(),
            sslow = s.load.slowest.as_secs_f64() * 1e3,
            first = w(first),
            last = w(last),
            flat = if s.flat() { "flat" } else { "GROWING" },
            sfb = pair(s.fds_before),
            sfa = pair(s.fds_after),
            hok = h.load.ok,
            href = h.load.refused,
            hreset = h.load.reset,
            hto = h.load.timed_out,
            hsyn = h.syns_dropped,
            hslow = h.load.slowest.as_secs_f64() * 1e3,
        )
    }
}

pub fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
