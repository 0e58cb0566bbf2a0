//! The differences from Istio's ztunnel that stay, each with its reason. README.md's
//! "Side by side with Istio's ztunnel" gives the same reasons (a test checks it), so no
//! difference is excepted here that the README does not explain.

use super::report::Side;

/// One difference that is meant to be there. `area` and `item` are glob patterns (`*`
/// matches anything) over a finding's area and item.
#[derive(Debug)]
pub struct Exception {
    pub area: &'static str,
    pub side: Side,
    pub item: &'static str,
    pub reason: &'static str,
}

const fn ex(area: &'static str, side: Side, item: &'static str, reason: &'static str) -> Exception {
    Exception {
        area,
        side,
        item,
        reason,
    }
}

const CONFIG: &str = "config_dump";
const COMPLETE: &str = "access log: connection complete (*)";

pub const TABLE: &[Exception] = &[
    ex(
        CONFIG,
        Side::Extra,
        "enrolled",
        "ours: the pods this node captures with eBPF, with their addresses and interface",
    ),
    ex(
        CONFIG,
        Side::Extra,
        "pendingEnrollment",
        "ours: the pods this node should capture but holds, with why",
    ),
    ex(
        CONFIG,
        Side::Extra,
        "xds",
        "ours: the xDS client's state (null with a local workload file)",
    ),
    ex(
        CONFIG,
        Side::Extra,
        "dns",
        "ours: the names the DNS proxy answers from the mesh, with their addresses",
    ),
    ex(
        CONFIG,
        Side::Extra,
        "workloadState",
        "upstream writes workloadState only as a node proxy (shared mode, pods handed over \
         by Istio's CNI agent); the comparison runs it as a dedicated proxy, where it has none",
    ),
    ex(
        CONFIG,
        Side::Missing,
        "config.proxyWorkloadInformation.*",
        "upstream fills config.proxyWorkloadInformation only as a dedicated proxy (the one \
         workload it serves); as a node proxy it is null, as ours is",
    ),
    ex(
        CONFIG,
        Side::Extra,
        "workloads[].services",
        "upstream lists a workload's services when they come over xDS but not when they \
         come from the local file; ours lists them either way",
    ),
    ex(COMPLETE, Side::Extra, "*outcome", OUR_LOG_FIELDS),
    ex(COMPLETE, Side::Extra, "*reason", OUR_LOG_FIELDS),
    ex(COMPLETE, Side::Extra, "*response_flags", OUR_LOG_FIELDS),
    ex(COMPLETE, Side::Extra, "*protocol", OUR_LOG_FIELDS),
    ex(COMPLETE, Side::Extra, "*dst.target", OUR_LOG_FIELDS),
    ex(
        "metrics",
        Side::Extra,
        "ztunnel_*",
        "ours: capture, enrollment, connection outcomes, pool, CA and authorization \
         metrics, which have no upstream counterpart",
    ),
    ex(
        "metrics",
        Side::Extra,
        "workload_manager_*",
        "upstream registers workload_manager_* only as a node proxy (its in-pod workload \
         manager); the comparison runs it as a dedicated proxy. Ours counts enrolled pods \
         there",
    ),
    ex(
        "metrics",
        Side::Extra,
        "process_*",
        "ours: the standard process metrics (CPU, memory, start time) beside upstream's \
         file-descriptor counts",
    ),
];

/// One reason for the extra fields of our access log, given once in the README.
const OUR_LOG_FIELDS: &str = "ours: every attempt is logged, refused and failed ones too, \
     with outcome, reason, response_flags, the protocol and the endpoint dialled (dst.target)";

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason is in the README's subsection, word for word.
    #[test]
    fn the_readme_explains_every_exception() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("## Side by side with Istio's ztunnel")
            .or_else(|| readme.find("### Side by side with Istio's ztunnel"))
            .expect("README has a \"Side by side with Istio's ztunnel\" section");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let section = flat(section);
        for e in TABLE {
            assert!(
                section.contains(&flat(e.reason)),
                "README's side-by-side section does not give this reason ({:?} {} in {}): {}",
                e.side,
                e.item,
                e.area,
                e.reason
            );
        }
    }
}
