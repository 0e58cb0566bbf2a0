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

/// TCX exists if the kernel answers a TCX query (older kernels reject the attach type).
fn tcx_supported() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}
