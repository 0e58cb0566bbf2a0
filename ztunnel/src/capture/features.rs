//! What capture needs from the kernel, checked at start: one clear error naming every
//! missing feature and the oldest kernel that has them all, instead of a verifier log.
//!
//! | feature | since |
//! |---|---|
//! | tc programs (`sched_cls`), clsact, direct action | 4.5 |
//! | hash, array, per-CPU hash maps | 4.6 |
//! | LRU hash maps (captured flows) | 4.10 |
//! | `bpf_skc_lookup_tcp` | 5.2 |
//! | `bpf_sk_assign` from tc ingress | 5.7 |
//! | ring buffer maps (the program's log records) | 5.8 |
//! | TCX links (optional: legacy tc filters otherwise) | 6.6 |
//!
//! BTF is not needed: the program's maps are plain definitions and it uses no CO-RE
//! relocations.

use aya::maps::MapType;
use aya::programs::{ProgramType, SchedClassifier, TcAttachType};
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};

/// The oldest kernel with everything capture needs.
pub const OLDEST_KERNEL: &str = "5.8";

/// What this kernel offers capture.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Features {
    /// `uname -r`.
    pub kernel: String,
    /// TCX links can be attached.
    pub tcx: bool,
    /// `/sys/kernel/btf/vmlinux` exists (informational: not needed).
    pub btf: bool,
}

/// Probes the kernel; errors with every missing feature at once.
pub fn check() -> anyhow::Result<Features> {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    // The probes create maps too.
    raise_memlock_if_charged(&kernel);
    let mut missing: Vec<String> = vec![];
    let mut need = |ok: Result<bool, String>, what: &str, since: &str| match ok {
        Ok(true) => {}
        Ok(false) => missing.push(format!("{what} (Linux {since})")),
        Err(e) => missing.push(format!("{what} (Linux {since}; probing it failed: {e})")),
    };
    let sched_cls = is_program_supported(ProgramType::SchedClassifier).map_err(|e| e.to_string());
    let have_tc = matches!(sched_cls, Ok(true));
    need(sched_cls, "tc (sched_cls) eBPF programs", "4.5");
    for (map, what, since) in [
        (MapType::Hash, "hash maps", "4.6"),
        (MapType::Array, "array maps", "4.6"),
        (MapType::PerCpuHash, "per-CPU hash maps", "4.6"),
        (MapType::LruHash, "LRU hash maps", "4.10"),
        (MapType::RingBuf, "ring buffer maps", "5.8"),
    ] {
        need(
            is_map_supported(map).map_err(|e| e.to_string()),
            what,
            since,
        );
    }
    if have_tc {
        for (helper, what, since) in [
            (
                BpfHelper::BPF_FUNC_skc_lookup_tcp,
                "the bpf_skc_lookup_tcp helper",
                "5.2",
            ),
            (
                BpfHelper::BPF_FUNC_sk_assign,
                "the bpf_sk_assign helper in tc programs",
                "5.7",
            ),
        ] {
            need(
                is_helper_supported(ProgramType::SchedClassifier, helper)
                    .map_err(|e| e.to_string()),
                what,
                since,
            );
        }
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "this kernel ({kernel}) lacks what capture needs: {}. ztunnel needs Linux {OLDEST_KERNEL} \
             or newer with BPF enabled (CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF, CONFIG_NET_SCH_INGRESS)",
            missing.join(", ")
        );
    }
    Ok(Features {
        kernel,
        tcx: tcx_supported(),
        btf: std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
    })
}

/// Kernels before 5.11 charge BPF maps and programs to `RLIMIT_MEMLOCK` (later ones to
/// the memory cgroup); its usual default (64 KiB, 8 MiB in newer runtimes) is far below
/// what capture's maps take. Raise it; beyond the hard limit that needs
/// `CAP_SYS_RESOURCE`, so say so when it fails instead of failing later in a map create.
fn raise_memlock_if_charged(kernel: &str) {
    if !charges_memlock(kernel) {
        return;
    }
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    match setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        Ok(()) => tracing::info!(
            kernel,
            "RLIMIT_MEMLOCK raised: this kernel charges BPF maps to it"
        ),
        Err(e) => tracing::warn!(
            kernel,
            "this kernel charges BPF maps to RLIMIT_MEMLOCK and raising it failed ({e}); \
             loading capture may fail: run ztunnel with CAP_SYS_RESOURCE or an unlimited \
             memlock limit"
        ),
    }
}

/// Whether a kernel release (`uname -r`) is older than 5.11.
fn charges_memlock(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    major != 0 && (major, minor) < (5, 11)
}

/// TCX exists if the kernel answers a TCX query (older kernels reject the attach type).
fn tcx_supported() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn memlock_is_charged_before_5_11() {
        for (release, charged) in [
            ("5.10.215-203.850.amzn2.x86_64", true),
            ("5.8.0-63-generic", true),
            ("4.19.0", true),
            ("5.11.0", false),
            ("5.15.0-91-generic", false),
            ("6.1.0-18-amd64", false),
            ("6.18.44-fc-v657", false),
            ("unknown", false),
        ] {
            assert_eq!(super::charges_memlock(release), charged, "{release}");
        }
    }
}
