//! How each [`PodAttach`] wires a pod's veth into its node, as the CNI it stands for does.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::{Layout, PodAttach, PtpGateway, BRIDGE};
use crate::netns::Netns;

/// Wires a pod's veth (`host_if` in the node, `eth0` in the pod, already created) into
/// the node, and configures the pod's addresses and routes.
pub(crate) fn attach_pod(
    node: &Netns,
    pod: &Netns,
    host_if: &str,
    index: u8,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    layout: Layout,
) -> anyhow::Result<()> {
    if layout.pod_mtu() != 1500 {
        let mtu = layout.pod_mtu().to_string();
        node.ip(&["link", "set", host_if, "mtu", &mtu])?;
        pod.ip(&["link", "set", "eth0", "mtu", &mtu])?;
    }
    match layout.pods {
        PodAttach::Routed => attach_routed(node, pod, host_if, ip, ip6),
        PodAttach::Bridge => attach_bridged(node, pod, host_if, index, ip, ip6),
        PodAttach::Ptp(gw) => attach_ptp(node, pod, host_if, index, ip, ip6, gw),
    }
}

/// As the reference `ptp` plugin wires a pod: the gateway as a real address on the host
/// side, a host route to the pod, and in the pod a `/24` whose subnet goes via the gateway.
fn attach_ptp(
    node: &Netns,
    pod: &Netns,
    host_if: &str,
    index: u8,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    gateway: PtpGateway,
) -> anyhow::Result<()> {
    let (gw4, gw6) = (format!("10.{index}.0.1"), format!("fd00:{index}::1"));
    let (len4, len6) = match gateway {
        PtpGateway::Subnet => (24, 64),
        PtpGateway::Host => (32, 128),
    };
    node.sysctl(&format!("net.ipv6.conf.{host_if}.accept_dad"), "0")?;
    node.ip(&["addr", "add", &format!("{gw4}/{len4}"), "dev", host_if])?;
    node.ip(&[
        "addr",
        "add",
        &format!("{gw6}/{len6}"),
        "dev",
        host_if,
        "nodad",
    ])?;
    node.ip(&["link", "set", host_if, "up"])?;
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if])?;
    node.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", host_if])?;
    pod.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    pod.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
    pod.ip(&[
        "addr",
        "add",
        &format!("{ip}/24"),
        "dev",
        "eth0",
        "noprefixroute",
    ])?;
    pod.ip(&[
        "addr",
        "add",
        &format!("{ip6}/64"),
        "dev",
        "eth0",
        "nodad",
        "noprefixroute",
    ])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    for (v, gw, host, net) in [
        (
            "-4",
            &gw4,
            format!("{gw4}/32"),
            format!("10.{index}.0.0/24"),
        ),
        (
            "-6",
            &gw6,
            format!("{gw6}/128"),
            format!("fd00:{index}::/64"),
        ),
    ] {
        pod.ip(&[v, "route", "add", &host, "dev", "eth0"])?;
        pod.ip(&[v, "route", "add", &net, "via", gw, "dev", "eth0"])?;
        pod.ip(&[v, "route", "add", "default", "via", gw, "dev", "eth0"])?;
    }
    Ok(())
}

fn attach_routed(
    node: &Netns,
    pod: &Netns,
    host_if: &str,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
) -> anyhow::Result<()> {
    node.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1")?;
    node.sysctl(&format!("net.ipv6.conf.{host_if}.accept_dad"), "0")?;
    // The pod's gateway lives on every host-side veth (as Calico does with
    // 169.254.1.1): the node answers for it, then routes by destination.
    node.ip(&[
        "addr",
        "add",
        "169.254.1.1/32",
        "dev",
        host_if,
        "noprefixroute",
    ])?;
    node.ip(&["addr", "add", "fe80::1/64", "dev", host_if, "nodad"])?;
    node.ip(&["link", "set", host_if, "up"])?;
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_if])?;
    node.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", host_if])?;
    pod.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    pod.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    pod.ip(&["addr", "add", &format!("{ip6}/128"), "dev", "eth0", "nodad"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", "169.254.1.1", "dev", "eth0"])?;
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])?;
    pod.ip(&[
        "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
    ])
}

fn attach_bridged(
    node: &Netns,
    pod: &Netns,
    host_if: &str,
    index: u8,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
) -> anyhow::Result<()> {
    node.sysctl(&format!("net.ipv6.conf.{host_if}.accept_dad"), "0")?;
    node.ip(&["link", "set", host_if, "master", BRIDGE])?;
    node.ip(&["link", "set", host_if, "up"])?;
    pod.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    pod.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
    pod.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    pod.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        &format!("10.{index}.0.1"),
        "dev",
        "eth0",
    ])?;
    pod.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &format!("fd00:{index}::1"),
        "dev",
        "eth0",
    ])
}
