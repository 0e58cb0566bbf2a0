//! The testbed: a Kubernetes-like cluster built from network namespaces on one Linux
//! machine, for end-to-end tests, benchmarks and the demo. Needs root.
//!
//! Each node and pod is a network namespace; the real kernel runs the real eBPF
//! programs and real packets cross a real (virtual) wire. Namespaces are named per
//! testbed (`zt<pid>-<n>-…`) so tests run in parallel, and are always removed: on
//! drop (also during a panic), on Ctrl-C, and — for runs that were killed — by the
//! next run.

mod cleanup;
pub mod cni;
pub mod http;
pub mod layout;
mod netns;
pub mod patient;
pub mod procstat;
pub mod sniffer;
mod testbed;
pub mod traffic;
pub mod ztunnel;

pub use cleanup::remove_stale;
pub use layout::{Interconnect, Layout, PodAttach};
pub use netns::Netns;
pub use testbed::{Node, Pod, Testbed};

/// True when running as root (the testbed needs it).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Skips a test (returns from it) unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: needs root (network namespaces, eBPF)");
            return;
        }
    };
}

/// Tears the testbed down (through its Ctrl-C handler) if a long run (bench, soak)
/// overstays its budget, so nothing is left behind.
pub fn watchdog(what: &'static str, budget: std::time::Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(budget);
        eprintln!(
            "{what}: exceeded its {} s budget, stopping",
            budget.as_secs()
        );
        // SAFETY: raise(2) delivers SIGINT to ourselves; the testbed's handler cleans up.
        unsafe { libc::raise(libc::SIGINT) };
        std::thread::sleep(std::time::Duration::from_secs(10));
        std::process::exit(2);
    });
}

/// A numeric knob of a long run from the environment (`BENCH_*`, `SOAK_*`), else `default`.
pub fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
