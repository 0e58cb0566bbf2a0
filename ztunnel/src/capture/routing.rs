//! Policy routing that turns the capture mark into local delivery, and the netlink
//! queries it needs (the loopback link; the node's links and addresses come from
//! `interfaces::scan`).
//!
//! A packet the eBPF program assigned to a ztunnel socket still goes through the
//! routing decision; unless it is routed `local` the kernel forwards it and the
//! assignment is lost. One rule per family sends marked packets to a table whose only
//! route is `local default dev lo`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context;
use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

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

        let default: IpAddr = if v6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let route = RouteMessageBuilder::<IpAddr>::new()
            .table_id(cfg.table)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(lo)
            .destination_prefix(default, 0)?
            .build();
        let res = handle.route().add(route).replace().execute().await;
        res.with_context(|| format!("adding the local route to table {} (ipv6={v6})", cfg.table))?;
    }
    Ok(())
}

/// Removes what [`install`] added. Routes go with their table's last rule being gone
/// only if deleted explicitly, so both are removed.
pub async fn uninstall(handle: &Handle, cfg: RoutingConfig) -> anyhow::Result<()> {
    remove_rules(handle, cfg).await?;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let routes: Vec<_> = handle
            .route()
            .get(all_routes(family))
            .execute()
            .try_collect()
            .await?;
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
            if is_ours(&rule.attributes, cfg) {
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

/// A capture rule this or an earlier ztunnel installed: at our priority, with our mark or
/// pointing at our table. The table counts too so that a rule left by a ztunnel with
/// another `--capture-mark` (before 0x1000 the default was 0x4000, kube-proxy's
/// masquerade mark) is replaced, not left to route other marked packets locally.
fn is_ours(attributes: &[RuleAttribute], cfg: RoutingConfig) -> bool {
    attributes.contains(&RuleAttribute::Priority(cfg.priority))
        && (attributes.contains(&RuleAttribute::FwMark(cfg.mark))
            || attributes.contains(&RuleAttribute::Table(cfg.table)))
}

/// A route dump request for every table of one family: zero is the wildcard of every
/// other header field (rtnetlink(7)).
fn all_routes(family: AddressFamily) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family;
    m.header.destination_prefix_length = 0;
    m.header.source_prefix_length = 0;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unspec;
    m.header.table = RouteHeader::RT_TABLE_UNSPEC;
    m.header.protocol = RouteProtocol::Unspec;
    m
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(route.header.table as u32)
}

/// Runs a netlink dump again while the kernel answers `EBUSY`: a netlink socket runs one
/// dump at a time, and the same connection is shared by the refresh and the enroller.
pub async fn retry_busy<T, F, Fut>(mut dump: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0;
    loop {
        match dump().await {
            Err(e) if tries < 10 && is_busy(&e) => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5 * tries)).await;
            }
            r => return r,
        }
    }
}

fn is_busy(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<rtnetlink::Error>(), Some(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EBUSY)
            || c.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error()) == Some(libc::EBUSY)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_is_ours_by_priority_and_mark_or_table() {
        let cfg = RoutingConfig {
            mark: 0x1000,
            table: 15010,
            priority: 100,
        };
        let rule = |mark: u32, table: u32, prio: u32| {
            vec![
                RuleAttribute::Table(table),
                RuleAttribute::FwMark(mark),
                RuleAttribute::FwMask(mark),
                RuleAttribute::Priority(prio),
            ]
        };
        assert!(is_ours(&rule(0x1000, 15010, 100), cfg));
        // an older default mark, our table: replaced on upgrade
        assert!(is_ours(&rule(0x4000, 15010, 100), cfg));
        assert!(is_ours(&rule(0x1000, 200, 100), cfg));
        // someone else's rule at another priority, or another mark and table
        assert!(!is_ours(&rule(0x1000, 15010, 101), cfg));
        assert!(!is_ours(&rule(0x4000, 200, 100), cfg));
    }
}
