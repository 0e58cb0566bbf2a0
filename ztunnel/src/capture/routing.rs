//! Policy routing that turns the capture mark into local delivery, and the netlink
//! queries the loader needs (node addresses, links, the route to a pod).
//!
//! A packet the eBPF program assigned to a ztunnel socket still goes through the
//! routing decision; unless it is routed `local` the kernel forwards it and the
//! assignment is lost. One rule per family sends marked packets to a table whose only
//! route is `local default dev lo`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context;
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion};

/// What to install: `ip rule add fwmark MARK/MARK lookup TABLE pref PRIORITY` and
/// `ip route add local default dev lo table TABLE`, for IPv4 and IPv6.
#[derive(Clone, Copy, Debug)]
pub struct RoutingConfig {
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

pub fn connect() -> anyhow::Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Installs the rules and routes; idempotent (a restart finds them already there).
pub async fn install(handle: &Handle, cfg: RoutingConfig) -> anyhow::Result<()> {
    remove_rules(handle, cfg).await?;
    let lo = link_index(handle, "lo")
        .await?
        .context("no loopback interface")?;
    for v6 in [false, true] {
        let mut rule = handle
            .rule()
            .add()
            .table_id(cfg.table)
            .action(RuleAction::ToTable)
            .priority(cfg.priority)
            .fw_mark(cfg.mark);
        rule.message_mut()
            .attributes
            .push(RuleAttribute::FwMask(cfg.mark));
        let res = if v6 {
            rule.v6().execute().await
        } else {
            rule.v4().execute().await
        };
        res.with_context(|| format!("adding the capture rule (ipv6={v6})"))?;

        let route = handle
            .route()
            .add()
            .table_id(cfg.table)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(lo);
        let res = if v6 {
            route
                .v6()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .replace()
                .execute()
                .await
        } else {
            route
                .v4()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .replace()
                .execute()
                .await
        };
        res.with_context(|| format!("adding the local route to table {} (ipv6={v6})", cfg.table))?;
    }
    Ok(())
}

/// Removes what [`install`] added. Routes go with their table's last rule being gone
/// only if deleted explicitly, so both are removed.
pub async fn uninstall(handle: &Handle, cfg: RoutingConfig) -> anyhow::Result<()> {
    remove_rules(handle, cfg).await?;
    for version in [IpVersion::V4, IpVersion::V6] {
        let routes: Vec<_> = handle.route().get(version).execute().try_collect().await?;
        for route in routes {
            if route_table(&route) == cfg.table {
                handle
                    .route()
                    .del(route)
                    .execute()
                    .await
                    .context("deleting capture route")?;
            }
        }
    }
    Ok(())
}

async fn remove_rules(handle: &Handle, cfg: RoutingConfig) -> anyhow::Result<()> {
    for version in [IpVersion::V4, IpVersion::V6] {
        let rules: Vec<_> = handle.rule().get(version).execute().try_collect().await?;
        for rule in rules {
            let ours = rule.attributes.contains(&RuleAttribute::FwMark(cfg.mark))
                && rule
                    .attributes
                    .contains(&RuleAttribute::Priority(cfg.priority));
            if ours {
                handle
                    .rule()
                    .del(rule)
                    .execute()
                    .await
                    .context("deleting capture rule")?;
            }
        }
    }
    Ok(())
}

fn route_table(route: &netlink_packet_route::route::RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table as u32)
}

/// Every address configured in this network namespace.
pub async fn local_addresses(handle: &Handle) -> anyhow::Result<Vec<IpAddr>> {
    let msgs: Vec<_> = handle.address().get().execute().try_collect().await?;
    Ok(msgs
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
        .collect())
}

/// Names and indexes of every link in this network namespace.
pub async fn links(handle: &Handle) -> anyhow::Result<Vec<(String, u32)>> {
    let msgs: Vec<_> = handle.link().get().execute().try_collect().await?;
    Ok(msgs
        .iter()
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some((n.clone(), m.header.index)),
                _ => None,
            })
        })
        .collect())
}

pub async fn link_index(handle: &Handle, name: &str) -> anyhow::Result<Option<u32>> {
    Ok(links(handle)
        .await?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, i)| i))
}

/// The interface the main table routes `ip` through (longest prefix wins): for a pod
/// on this node, the host side of its veth.
pub async fn interface_for(handle: &Handle, ip: IpAddr) -> anyhow::Result<Option<(String, u32)>> {
    let version = if ip.is_ipv4() {
        IpVersion::V4
    } else {
        IpVersion::V6
    };
    let routes: Vec<_> = handle.route().get(version).execute().try_collect().await?;
    let mut best: Option<(u8, u32)> = None;
    for r in &routes {
        if route_table(r) != 254 || r.header.kind != RouteType::Unicast {
            continue;
        }
        let len = r.header.destination_prefix_length;
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        });
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let (Some(oif), true) = (oif, r.header.address_family != AddressFamily::Unspec) else {
            continue;
        };
        let matches = match dst {
            Some(dst) => prefix_contains(dst, len, ip),
            None => len == 0,
        };
        if matches && best.is_none_or(|(l, _)| len > l) {
            best = Some((len, oif));
        }
    }
    let Some((_, oif)) = best else {
        return Ok(None);
    };
    Ok(links(handle).await?.into_iter().find(|(_, i)| *i == oif))
}

fn prefix_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len.min(32))
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len.min(128))
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(prefix_contains(ip("10.1.0.0"), 16, ip("10.1.2.3")));
        assert!(!prefix_contains(ip("10.1.0.0"), 16, ip("10.2.2.3")));
        assert!(prefix_contains(ip("10.1.2.3"), 32, ip("10.1.2.3")));
        assert!(prefix_contains(ip("0.0.0.0"), 0, ip("1.2.3.4")));
        assert!(prefix_contains(ip("fd00:1::"), 64, ip("fd00:1::5")));
        assert!(!prefix_contains(ip("fd00:1::"), 64, ip("10.1.2.3")));
    }
}
