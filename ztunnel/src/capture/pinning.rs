//! On a bridge, an enrolled pod's MAC is pinned: a claimant answering ARP/ND for the pod's
//! address, or sending frames from the pod's MAC, gains nothing.
//!
//! Two entries, both over netlink, both for the owner's interface only:
//! - a permanent neighbour on the bridge device, address → the pod's MAC: the node (and
//!   ztunnel, which delivers every captured connection from the node's stack) keeps sending
//!   to the owner whatever ARP replies or neighbour advertisements arrive;
//! - a static, sticky forwarding entry, the pod's MAC → the owner's bridge port: the bridge
//!   does not learn the MAC on another port from frames a claimant sends with it.
//!
//! The pod's MAC is read from its own namespace (`RTM_GETLINK` with
//! `IFLA_TARGET_NETNSID`, like its addresses), never learnt from the wire.

use std::net::IpAddr;

use anyhow::Context;
use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::Handle;
use tracing::debug;

use super::{Capture, Role};

/// What was pinned for one enrolled pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub bridge: u32,
    pub port: u32,
    pub mac: [u8; 6],
}

/// The MAC of interface `index` in the namespace the node knows as `nsid`. `strict`: a
/// connection with `NETLINK_GET_STRICT_CHK` (the target namespace is honoured only then).
pub async fn peer_mac(strict: &Handle, nsid: i32, index: u32) -> anyhow::Result<[u8; 6]> {
    let mut req = strict.link().get();
    // IFLA_IF_NETNSID is IFLA_TARGET_NETNSID: the links of another namespace.
    req.message_mut()
        .attributes
        .push(LinkAttribute::IfNetnsId(nsid));
    let msgs: Vec<_> = req
        .execute()
        .try_collect()
        .await
        .context("dumping the pod namespace's links")?;
    msgs.iter()
        .filter(|m| m.header.index == index)
        .flat_map(|m| m.attributes.iter())
        .find_map(|a| match a {
            LinkAttribute::Address(mac) if mac.len() == 6 => mac[..].try_into().ok(),
            _ => None,
        })
        .with_context(|| format!("no MAC for interface {index} in netnsid {nsid}"))
}

/// Pins `ips` to `pin.mac` on the bridge, and the MAC to the owner's port (replacing what
/// was there: a recreated pod has a new MAC).
pub async fn pin(netlink: &Handle, pin: &Pin, ips: &[IpAddr]) -> anyhow::Result<()> {
    for ip in ips {
        netlink
            .neighbours()
            .add(pin.bridge, *ip)
            .link_layer_address(&pin.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .with_context(|| format!("pinning the neighbour {ip} on the bridge"))?;
    }
    netlink
        .neighbours()
        .add_bridge(pin.port, &pin.mac)
        .flags(NeighbourFlags::Controller | NeighbourFlags::Sticky)
        .state(NeighbourState::Noarp)
        .replace()
        .execute()
        .await
        .context("pinning the pod's MAC to its bridge port")?;
    Ok(())
}

/// Removes the neighbour entries of `ips` on `bridge` (and, with `fdb`, the forwarding
/// entry); entries already gone are not an error.
pub async fn unpin(netlink: &Handle, bridge: u32, ips: &[IpAddr], fdb: Option<(u32, [u8; 6])>) {
    for ip in ips {
        let mut m = NeighbourMessage::default();
        m.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.ifindex = bridge;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(*a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(*a),
        }));
        let _ = netlink.neighbours().del(m).execute().await;
    }
    if let Some((port, mac)) = fdb {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = port;
        m.header.flags = NeighbourFlags::Controller;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        let _ = netlink.neighbours().del(m).execute().await;
    }
}

impl Capture {
    /// On a bridge port: pins the pod's addresses to its MAC (a permanent neighbour on the
    /// bridge) and its MAC to its port (a static, sticky forwarding entry), so that a
    /// neighbour answering ARP/ND for them, or sending from that MAC, gains nothing.
    pub(super) async fn pin_owner(
        &mut self,
        addresses: &[IpAddr],
        ifindex: u32,
    ) -> anyhow::Result<()> {
        let links = super::routing::retry_busy(|| super::interfaces::links(&self.netlink)).await?;
        let Some(port) = links.iter().find(|l| l.index == ifindex) else {
            return Ok(());
        };
        let bridge = port
            .master
            .and_then(|m| links.iter().find(|b| b.index == m))
            .filter(|b| b.kind.as_deref() == Some("bridge"));
        let (Some(bridge), Some(nsid), Some(peer)) = (bridge, port.peer_netnsid, port.peer_index)
        else {
            // Not (or no longer) on a bridge: nothing to pin, nothing pinned may stay.
            self.unpin(addresses, false).await;
            return Ok(());
        };
        let wanted = Pin {
            bridge: bridge.index,
            port: ifindex,
            mac: peer_mac(&self.strict_netlink, nsid, peer).await?,
        };
        pin(&self.netlink, &wanted, addresses).await?;
        for a in addresses {
            self.pins.insert(*a, wanted.clone());
        }
        debug!(?addresses, bridge = %bridge.name, "pod MAC pinned on its bridge");
        Ok(())
    }

    /// Removes what [`Capture::pin_owner`] pinned for these addresses. An address this
    /// process did not pin (enrolled by an earlier ztunnel) has its neighbour entry removed
    /// from every bridge: a permanent one left behind would send the next pod given the
    /// address to a gone pod's MAC.
    /// `sweep`: also for addresses this process did not pin.
    pub async fn unpin(&mut self, addresses: &[IpAddr], sweep: bool) {
        let bridges: Vec<u32> = self
            .inventory
            .iter()
            .filter(|i| i.role == Role::Bridge)
            .map(|i| i.ifindex)
            .collect();
        for a in addresses {
            match self.pins.remove(a) {
                Some(p) => {
                    let shared = self
                        .pins
                        .values()
                        .any(|o| o.port == p.port && o.mac == p.mac);
                    let fdb = (!shared).then_some((p.port, p.mac));
                    unpin(&self.netlink, p.bridge, &[*a], fdb).await;
                }
                None if sweep => {
                    for b in &bridges {
                        unpin(&self.netlink, *b, &[*a], None).await;
                    }
                }
                None => {}
            }
        }
    }
}
