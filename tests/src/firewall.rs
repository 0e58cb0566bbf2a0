//! What kubeadm, kube-proxy and flannel leave in a bridged node's netfilter, so that the
//! bridge layouts test ztunnel under it instead of a testbed-only shortcut:
//!
//! - `net.bridge.bridge-nf-call-iptables` and `…-ip6tables` at 1 (kubeadm's preflight
//!   requires them; with `br_netfilter` loaded they are 1 in every new namespace anyway):
//!   IPv4 and IPv6 frames crossing a bridge go through the `ip`/`ip6` hooks and conntrack
//!   at the bridge layer.
//! - `FORWARD` rules as kube-proxy and flannel write them (here with `nft`, as
//!   `iptables-nft` would): accept established and related flows (kube-proxy's
//!   `KUBE-FORWARD`), accept what comes from or goes to the pod range (flannel's
//!   `FLANNEL-FWD`). The policy is drop, as on nodes where Docker set it: anything a
//!   change pushes off those rules is lost instead of slipping through.
//!
//! The ruleset uses conntrack, so every packet of the node's namespace is tracked, as on
//! a real node.

use anyhow::Context;

use crate::netns::Netns;

/// The cluster's pod range, IPv4 (every node's `10.i.0.0/16`).
pub const POD_CIDR_V4: &str = "10.0.0.0/8";
/// The cluster's pod range, IPv6 (every node's `fd00:i::/64`; it also holds the nodes'
/// `fd00:ff::/64`, which is never forwarded).
pub const POD_CIDR_V6: &str = "fd00::/16";

/// br_netfilter's sysctls that kubeadm requires at 1.
pub const BR_NF_SYSCTLS: [&str; 2] = [
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
];

/// The ruleset, in `nft -f` syntax.
pub fn forward_rules() -> String {
    let mut s = String::new();
    for (family, ip, cidr) in [("ip", "ip", POD_CIDR_V4), ("ip6", "ip6", POD_CIDR_V6)] {
        s.push_str(&format!(
            "table {family} filter {{\n\
             \tchain FORWARD {{\n\
             \t\ttype filter hook forward priority filter; policy drop;\n\
             \t\tct state established,related counter accept comment \"KUBE-FORWARD\"\n\
             \t\t{ip} saddr {cidr} counter accept comment \"FLANNEL-FWD\"\n\
             \t\t{ip} daddr {cidr} counter accept comment \"FLANNEL-FWD\"\n\
             \t}}\n\
             }}\n"
        ));
    }
    s
}

/// Turns br_netfilter on for the namespace and installs [`forward_rules`]. Fails if the
/// kernel has no br_netfilter (kubeadm's preflight fails there too) or `nft` is missing.
pub fn kube_bridge_node(ns: &Netns) -> anyhow::Result<()> {
    for key in BR_NF_SYSCTLS {
        ns.sysctl(key, "1").with_context(|| {
            format!("{key}: br_netfilter is not available (CONFIG_BRIDGE_NETFILTER, or `modprobe br_netfilter`)")
        })?;
    }
    nft_apply(ns, &forward_rules())
}

/// Applies `rules` (`nft -f` syntax) inside `ns`.
pub fn nft_apply(ns: &Netns, rules: &str) -> anyhow::Result<()> {
    let mut child = ns
        .command("nft")?
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (install nftables: cargo xtask setup)")?;
    use std::io::Write;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("nft -f: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `nft list ruleset` inside `ns`.
pub fn ruleset(ns: &Netns) -> anyhow::Result<String> {
    crate::layout::run(ns, "nft", &["list", "ruleset"])
}

/// How many packets the `FORWARD` chain's rules of `family` (`ip`, `ip6`) accepted, summed.
pub fn forward_accepted(ns: &Netns, family: &str) -> anyhow::Result<u64> {
    let out = crate::layout::run(ns, "nft", &["list", "chain", family, "filter", "FORWARD"])?;
    Ok(out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "packets")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_both_families_and_drop_by_default() {
        let r = forward_rules();
        assert_eq!(r.matches("policy drop").count(), 2);
        assert!(r.contains("table ip filter") && r.contains("table ip6 filter"));
        assert!(r.contains("ip saddr 10.0.0.0/8") && r.contains("ip6 daddr fd00::/16"));
        assert_eq!(r.matches("ct state established,related").count(), 2);
    }
}
