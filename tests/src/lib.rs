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
pub mod compare;
pub mod dns;
pub mod firewall;
pub mod http;
pub mod kube_proxy;
pub mod layout;
mod netns;
pub mod patient;
pub mod procstat;
pub mod raw;
pub mod side_by_side;
pub mod sniffer;
mod testbed;
pub mod traffic;
pub mod tunnel;
pub mod ztunnel;

pub use cleanup::remove_stale;
pub use layout::{Interconnect, Layout, PodAttach, PtpGateway};
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

/// How many times slower than native this machine runs the tests: `ZT_TEST_TIME_SCALE`
/// (a whole number, default 1). `cargo xtask kernels` sets it in its QEMU guests, which run
/// 10-35x slower under TCG. The testbed's helpers stretch every wait and timeout they take
/// or use by it, so a test's own numbers stay the native ones.
pub fn time_scale() -> u32 {
    static SCALE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| parse_time_scale(std::env::var("ZT_TEST_TIME_SCALE").ok().as_deref()))
}

/// `d` stretched by [`time_scale`].
pub fn scaled(d: std::time::Duration) -> std::time::Duration {
    d * time_scale()
}

/// Unset, empty or 1 → 1; anything else but a whole number from 1 to 1000 is a mistake
/// worth stopping for, not silently running at native speed.
fn parse_time_scale(v: Option<&str>) -> u32 {
    match v.map(str::trim) {
        None | Some("") => 1,
        Some(s) => match s.parse::<u32>() {
            Ok(n @ 1..=1000) => n,
            _ => panic!("ZT_TEST_TIME_SCALE={s:?}: expected a whole number from 1 to 1000"),
        },
    }
}

/// A numeric knob of a long run from the environment (`BENCH_*`, `SOAK_*`), else `default`.
pub fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[cfg(test)]
mod time_scale_tests {
    #[test]
    fn parses_the_time_scale() {
        assert_eq!(super::parse_time_scale(None), 1);
        assert_eq!(super::parse_time_scale(Some("")), 1);
        assert_eq!(super::parse_time_scale(Some(" 10 ")), 10);
        for bad in ["0", "1.5", "-2", "x", "1001"] {
            assert!(
                std::panic::catch_unwind(|| super::parse_time_scale(Some(bad))).is_err(),
                "{bad}"
            );
        }
    }
}
