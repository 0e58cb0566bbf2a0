//! What the kernel counts of ztunnel's programs: runs and time spent, per program, for
//! `/debug/capture`. The kernel counts only while `kernel.bpf_stats_enabled` is 1 (it
//! costs two clock reads per run, so it is off by default and ztunnel leaves it alone):
//! turn it on, run traffic, read the average cost of a packet.

use serde::Serialize;

/// One loaded program of ztunnel's (names start `zt_`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStats {
    pub id: u32,
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Nanoseconds per run, when it ran at all.
    pub average_ns: Option<u64>,
}

/// Every program of ztunnel's the kernel has loaded (those of an older ztunnel still
/// attached included), in id order.
pub fn program_stats() -> Vec<ProgramStats> {
    let mut out: Vec<ProgramStats> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| {
            let name = p.name_as_str()?.to_string();
            if !name.starts_with("zt_") {
                return None;
            }
            let (count, ns) = (p.run_count(), p.run_time().as_nanos() as u64);
            Some(ProgramStats {
                id: p.id(),
                name,
                run_count: count,
                run_time_ns: ns,
                average_ns: (count > 0).then(|| ns / count),
            })
        })
        .collect();
    out.sort_by_key(|p| p.id);
    out
}
