//! Around each attack: the target's RSS before, at its peak and after, and a mesh echo
//! running beside it (client pod → server pod across the two nodes) counted ok / failed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use ztunnel_tests::procstat::{rss, RssSampler};
use ztunnel_tests::traffic::echoes;
use ztunnel_tests::Netns;

const MIB: f64 = 1024.0 * 1024.0;

/// One attack's figures.
pub struct Outcome {
    pub name: String,
    /// Which process was measured ("ztunnel node-b", "control plane").
    pub target: String,
    pub rss: [u64; 3],
    pub echo_ok: u64,
    pub echo_failed: u64,
    /// What the attack itself saw (accepted / refused / closed ...), in words.
    pub notes: Vec<String>,
    /// Whether the attack's own expectation held (e.g. the revoked token is refused).
    pub passed: bool,
    pub secs: f64,
}

impl Outcome {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "attack": self.name,
            "target": self.target,
            "rss_mib": {"before": self.rss[0] as f64 / MIB, "peak": self.rss[1] as f64 / MIB, "after": self.rss[2] as f64 / MIB},
            "mesh_echo": {"ok": self.echo_ok, "failed": self.echo_failed},
            "notes": self.notes,
            "passed": self.passed,
            "secs": self.secs,
        })
    }

    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {:.1} / {:.1} / {:.1} | {} / {} | {} | {} |",
            self.name,
            self.target,
            self.rss[0] as f64 / MIB,
            self.rss[1] as f64 / MIB,
            self.rss[2] as f64 / MIB,
            self.echo_ok,
            self.echo_ok + self.echo_failed,
            if self.passed { "yes" } else { "**no**" },
            self.notes.join("; ")
        )
    }
}

/// Echo round trips through the mesh, one every 200 ms, until stopped.
pub struct Prober {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl Prober {
    pub fn start(client: &Arc<Netns>, dst: SocketAddr) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let ns = client.clone();
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if echoes(&ns, dst) {
                    o.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Prober {
            stop,
            ok,
            failed,
            handle,
        }
    }

    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// What an attack reports back to [`measured`].
pub struct Report {
    pub notes: Vec<String>,
    pub passed: bool,
}

/// Runs `attack` against the process `pid` with the mesh echo beside it; `settle` is how
/// long to wait after it for the target to close what the attack left (timeouts) and hand
/// memory back (malloc trim) before the "after" reading.
pub fn measured(
    name: &str,
    target: &str,
    pid: u32,
    client: &Arc<Netns>,
    dst: SocketAddr,
    settle: Duration,
    attack: impl FnOnce() -> anyhow::Result<Report>,
) -> Outcome {
    eprintln!("load: {name}...");
    let started = Instant::now();
    let before = rss(pid);
    let sampler = RssSampler::start(vec![pid]);
    let prober = Prober::start(client, dst);
    let report = attack().unwrap_or_else(|e| Report {
        notes: vec![format!("attack failed to run: {e:#}")],
        passed: false,
    });
    let (echo_ok, echo_failed) = prober.finish();
    let peak = sampler.finish().first().copied().unwrap_or(0);
    std::thread::sleep(settle);
    let after = rss(pid);
    let o = Outcome {
        name: name.to_string(),
        target: target.to_string(),
        rss: [before, peak.max(before), after],
        echo_ok,
        echo_failed,
        notes: report.notes,
        passed: report.passed,
        secs: started.elapsed().as_secs_f64(),
    };
    eprintln!("load: {}", o.row());
    o
}
