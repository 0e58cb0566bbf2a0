//! The node's interfaces as capture sees them: which ones the program is attached to and
//! why, and which host-side interface belongs to which pod.
//!
//! A pod's host-side interface is found through the pod's own network namespace, not the
//! route to its address: for each link of the node whose peer lives in another namespace
//! (a veth), the addresses of that peer are read from the peer's namespace
//! (`IFA_TARGET_NETNSID`, a netlink dump into a namespace named by its id, no `setns`, no
//! namespace file needed). That holds for every CNI layout: a route per pod (Calico,
//! kindnet, AWS VPC CNI), pods as ports of a bridge (flannel, `bridge`: the route points
//! at `cni0`, not the pod), the whole pod range routed to one device (Cilium's
//! `cilium_host`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::Context;
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlInfo};
use netlink_sys::AsyncSocket;
use rtnetlink::Handle;

/// One link of the node's namespace, with what capture needs to know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// `veth`, `bridge`, `vxlan`, … (`IFLA_INFO_KIND`); `None` for physical devices.
    pub kind: Option<String>,
    /// The bridge (or bond) this link is a port of.
    pub master: Option<u32>,
    /// Id (in this namespace) of the namespace the link's peer lives in.
    pub peer_netnsid: Option<i32>,
    /// Index of the peer, in its own namespace (`IFLA_LINK`).
    pub peer_index: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub loopback: bool,
    /// Carries an address of the node other than a link-local one (a pod's gateway
    /// address such as Calico's 169.254.1.1 is link-local).
    pub addressed: bool,
}

/// What an interface is to capture; decides whether the program is attached to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The host side of a pod's interface (a veth whose peer is in another namespace and
    /// which carries no address of the node: a node whose own uplink is a veth, as in
    /// kind, has its address there): every packet the pod sends enters the node here. Attached: outbound capture of
    /// enrolled pods, and connections from any pod of this node to an enrolled one.
    Pod,
    /// Any other link (the uplink, an overlay device such as VXLAN, a tunnel): where
    /// connections from other nodes arrive. Attached: inbound capture (15008, 15006).
    Node,
    /// A bridge's own device. Not attached: the pods' frames were already seen at the
    /// bridge's ports, and a frame the bridge passes up would be decided twice (and, by
    /// the anti-spoofing check, dropped: it carries a pod's address on another interface).
    Bridge,
    /// Loopback: nothing from a pod or another node enters there. Not attached.
    Loopback,
}

impl Role {
    pub fn of(link: &Link) -> Role {
        if link.loopback {
            Role::Loopback
        } else if link.kind.as_deref() == Some("bridge") {
            Role::Bridge
        } else if link.peer_netnsid.is_some()
            && link.kind.as_deref() == Some("veth")
            && !link.addressed
        {
            Role::Pod
        } else {
            Role::Node
        }
    }

    pub fn attached(self) -> bool {
        matches!(self, Role::Pod | Role::Node)
    }
}

/// Every link of the namespace `handle` is in.
pub async fn links(handle: &Handle) -> anyhow::Result<Vec<Link>> {
    Ok(scan(handle).await?.links)
}

/// The namespace's links and addresses, from one dump of each.
pub struct Scan {
    pub links: Vec<Link>,
    /// Every address configured in the namespace (the node's own, for the program).
    pub addresses: Vec<IpAddr>,
}

/// Dumps links and addresses once: the roles need both.
pub async fn scan(handle: &Handle) -> anyhow::Result<Scan> {
    let msgs: Vec<_> = handle.link().get().execute().try_collect().await?;
    let addrs: Vec<_> = handle.address().get().execute().try_collect().await?;
    let addresses: Vec<IpAddr> = addrs
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
        .collect();
    let addressed: BTreeSet<u32> = addrs
        .iter()
        .filter(|m| {
            m.attributes.iter().any(|a| match a {
                AddressAttribute::Address(ip) => is_pod_address(*ip),
                _ => false,
            })
        })
        .map(|m| m.header.index)
        .collect();
    let links = msgs
        .iter()
        .filter_map(|m| {
            let mut l = Link {
                name: String::new(),
                index: m.header.index,
                kind: None,
                master: None,
                peer_netnsid: None,
                peer_index: None,
                mac: None,
                loopback: m.header.flags.contains(LinkFlags::Loopback),
                addressed: addressed.contains(&m.header.index),
            };
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) => l.name = n.clone(),
                    LinkAttribute::Controller(i) => l.master = Some(*i),
                    LinkAttribute::LinkNetNsId(id) => l.peer_netnsid = Some(*id),
                    LinkAttribute::Link(i) => l.peer_index = Some(*i),
                    LinkAttribute::Address(mac) if mac.len() == 6 => {
                        l.mac = Some(mac[..].try_into().unwrap())
                    }
                    LinkAttribute::LinkInfo(infos) => {
                        for i in infos {
                            if let NlInfo::Kind(k) = i {
                                l.kind = Some(kind_name(k));
                            }
                        }
                    }
                    _ => {}
                }
            }
            (!l.name.is_empty()).then_some(l)
        })
        .collect();
    Ok(Scan { links, addresses })
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Other(s) => s.clone(),
        k => k.to_string(),
    }
}

/// Where each pod address of this node lives: address → host-side interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInterfaces {
    pub found: BTreeMap<IpAddr, (String, u32)>,
    /// Pod addresses behind an interface capture cannot work on, with why.
    pub unsupported: BTreeMap<IpAddr, String>,
    /// Namespaces whose addresses could not be read, with why (the pods behind them are
    /// reported as not found, with this reason).
    pub unreadable: Vec<String>,
}

impl PodInterfaces {
    /// The host-side interface of the pod holding `ip`, or why there is none.
    pub fn lookup(&self, ip: IpAddr) -> Result<(String, u32), String> {
        if let Some(i) = self.found.get(&ip) {
            return Ok(i.clone());
        }
        if let Some(why) = self.unsupported.get(&ip) {
            return Err(why.clone());
        }
        let mut why = format!("no pod interface on this node holds {ip}");
        if !self.unreadable.is_empty() {
            why.push_str(&format!(
                " (pod namespaces not readable: {})",
                self.unreadable.join("; ")
            ));
        }
        Err(why)
    }
}

/// Finds the pod behind every veth of this node. `strict` must be a connection with
/// `NETLINK_GET_STRICT_CHK` set ([`strict_connection`]): the kernel honours the target
/// namespace of an address dump only then.
pub async fn pod_interfaces(strict: &Handle, links: &[Link]) -> PodInterfaces {
    let mut out = PodInterfaces::default();
    // netkit (Cilium's alternative to veth) runs the pod's egress inside the device: no
    // host-side tc hook sees it, so such pods can be found but not captured.
    let netkit = |l: &Link| l.kind.as_deref() == Some("netkit") && l.peer_netnsid.is_some();
    let pods: Vec<&Link> = links
        .iter()
        .filter(|l| Role::of(l) == Role::Pod || netkit(l))
        .collect();
    let nsids: BTreeSet<i32> = pods.iter().filter_map(|l| l.peer_netnsid).collect();
    for nsid in nsids {
        let addrs = match addresses_in(strict, nsid).await {
            Ok(a) => a,
            Err(e) => {
                out.unreadable.push(format!("netnsid {nsid}: {e:#}"));
                continue;
            }
        };
        for l in pods.iter().filter(|l| l.peer_netnsid == Some(nsid)) {
            let Some(peer) = l.peer_index else { continue };
            for (index, ip) in &addrs {
                if *index != peer || !is_pod_address(*ip) {
                    continue;
                }
                if netkit(l) {
                    let why = format!(
                        "{ip} is behind netkit device {}: its traffic passes no tc hook \
                         ztunnel could capture it at (use veth mode)",
                        l.name
                    );
                    out.unsupported.insert(*ip, why);
                } else {
                    out.found.insert(*ip, (l.name.clone(), l.index));
                }
            }
        }
    }
    out
}

/// Link-local and loopback addresses are no one's identity (every pod has fe80::…, and
/// routed CNIs put a link-local gateway on every pod's host side).
fn is_pod_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !a.is_loopback() && !a.is_link_local(),
        IpAddr::V6(a) => !a.is_loopback() && (a.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// (interface index, address) of every address in namespace `nsid`.
async fn addresses_in(strict: &Handle, nsid: i32) -> anyhow::Result<Vec<(u32, IpAddr)>> {
    let mut req = strict.address().get();
    // IFA_TARGET_NETNSID: the addresses of another namespace, named by its id.
    req.message_mut()
        .attributes
        .push(AddressAttribute::TargetNetNsId(nsid));
    let msgs: Vec<_> = req
        .execute()
        .try_collect()
        .await
        .context("dumping the pod namespace's addresses")?;
    Ok(msgs
        .iter()
        .flat_map(|m| {
            m.attributes.iter().filter_map(move |a| match a {
                AddressAttribute::Address(ip) => Some((m.header.index, *ip)),
                _ => None,
            })
        })
        .collect())
}

/// A netlink connection that asks the kernel for strict checking of dump requests.
pub fn strict_connection() -> anyhow::Result<Handle> {
    let (mut conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    conn.socket_mut()
        .socket_mut()
        .set_netlink_get_strict_chk(true)
        .context("NETLINK_GET_STRICT_CHK")?;
    tokio::spawn(conn);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, kind: Option<&str>, netnsid: Option<i32>) -> Link {
        Link {
            name: name.into(),
            index: 1,
            kind: kind.map(str::to_string),
            master: None,
            peer_netnsid: netnsid,
            peer_index: netnsid.map(|_| 2),
            mac: None,
            loopback: name == "lo",
            addressed: false,
        }
    }

    #[test]
    fn roles_say_where_the_program_goes() {
        assert_eq!(Role::of(&link("lo", None, None)), Role::Loopback);
        assert_eq!(Role::of(&link("cni0", Some("bridge"), None)), Role::Bridge);
        assert_eq!(Role::of(&link("veth1", Some("veth"), Some(3))), Role::Pod);
        // A veth whose both ends are in the node (no peer namespace) is no pod's.
        assert_eq!(Role::of(&link("v", Some("veth"), None)), Role::Node);
        // The node's own uplink as a veth (kind, the testbed): it has the node's address.
        let uplink = Link {
            addressed: true,
            ..link("eth0", Some("veth"), Some(0))
        };
        assert_eq!(Role::of(&uplink), Role::Node);
        assert_eq!(Role::of(&link("eth0", None, None)), Role::Node);
        assert_eq!(
            Role::of(&link("flannel.1", Some("vxlan"), None)),
            Role::Node
        );
        assert!(Role::Pod.attached() && Role::Node.attached());
        assert!(!Role::Bridge.attached() && !Role::Loopback.attached());
    }

    #[test]
    fn link_local_addresses_identify_no_pod() {
        assert!(!is_pod_address("fe80::1".parse().unwrap()));
        assert!(!is_pod_address("169.254.1.1".parse().unwrap()));
        assert!(!is_pod_address("127.0.0.1".parse().unwrap()));
        assert!(is_pod_address("10.1.0.2".parse().unwrap()));
        assert!(is_pod_address("fd00:1::2".parse().unwrap()));
    }

    #[test]
    fn a_missing_pod_says_why() {
        let p = PodInterfaces {
            found: [("10.0.0.2".parse().unwrap(), ("p2".to_string(), 7))].into(),
            unsupported: [("10.0.0.9".parse().unwrap(), "netkit".to_string())].into(),
            unreadable: vec!["netnsid 4: denied".into()],
        };
        assert_eq!(p.lookup("10.0.0.2".parse().unwrap()), Ok(("p2".into(), 7)));
        let why = p.lookup("10.0.0.3".parse().unwrap()).unwrap_err();
        assert!(
            why.contains("10.0.0.3") && why.contains("netnsid 4: denied"),
            "{why}"
        );
    }
}
