//! The node's interfaces as capture sees them: which ones the program is attached to and
//! why, and which host-side interface belongs to which pod.
//!
//! A pod's host-side interface is found through the pod's own network namespace, not the
//! route to its address: for each link of the node whose peer lives in another namespace
//! (a veth, or netkit), the addresses of that peer are read from the peer's namespace
//! (`IFA_TARGET_NETNSID`, a netlink dump into a namespace named by its id, no `setns`, no
//! namespace file needed). That holds for every CNI layout: a route per pod (Calico,
//! kindnet, AWS VPC CNI), pods as ports of a bridge (flannel, `bridge`: the route points
//! at `cni0`, not the pod), the whole pod range routed to one device (Cilium's
//! `cilium_host`).
//!
//! What the host side carries says nothing: the reference `ptp` plugin (kindnet, GKE) puts
//! the pod's gateway on it (a `/24`, or one `/32` repeated on every pod veth), Calico and
//! Cilium put none, and a node's own uplink may be a veth with the node's address (kind).
//! So a veth is a pod's interface when its peer's namespace holds an address of a pod this
//! node enrolls; every other veth is a node link. kind's uplink has its peer in the host's
//! namespace, the testbed's in the switch's: neither holds a pod of this node. A veth whose
//! pod is not known yet is shown as a node link until it is; both roles have the program
//! attached, so only the label changes.
//!
//! One address, one pod: every interface whose peer holds an address is recorded as a
//! claim ([`PodInterfaces::found`]); [`PodInterfaces::resolve`] keeps an enrolled pod on
//! its interface whatever else claims its address later.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::Context;
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo as NlInfo, LinkLayerType,
};
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
    /// Has no MAC header (IPIP, GRE, SIT, WireGuard and other `ARPHRD_NONE` devices): the
    /// program reads its packets from the IP header on.
    pub l3: bool,
}

impl Link {
    /// A link whose other end is in another namespace, where a pod may live: a veth, or
    /// netkit (Cilium's alternative, which capture cannot work on).
    pub fn has_peer_namespace(&self) -> bool {
        self.peer_netnsid.is_some() && matches!(self.kind.as_deref(), Some("veth" | "netkit"))
    }

    fn netkit(&self) -> bool {
        self.kind.as_deref() == Some("netkit")
    }
}

/// What an interface is to capture; decides whether the program is attached to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The host side of a pod's interface: a veth whose peer's namespace holds a pod this
    /// node enrolls (whatever address the host side carries). Every packet the pod sends
    /// enters the node here. Attached: outbound capture of enrolled pods, and connections
    /// from any pod of this node to an enrolled one.
    Pod,
    /// Any other link (the uplink, also a veth one as in kind; an overlay device such as
    /// VXLAN; a tunnel; a veth whose pod is not known yet): where connections from other
    /// nodes arrive. Attached: inbound capture (15008, 15006).
    Node,
    /// A bridge's own device. Attached, but the program does nothing there except give a
    /// SYN taken at a port back the socket br_netfilter took from it (`IFACE_BRIDGE` in
    /// `ZT_IFACES`): the pods' frames were already decided at the bridge's ports.
    Bridge,
    /// Loopback: nothing from a pod or another node enters there. Not attached.
    Loopback,
}

impl Role {
    /// `pods`: the links whose peer's namespace holds a pod this node enrolls (found by
    /// the last enrollment pass).
    pub fn of(link: &Link, pods: &BTreeSet<u32>) -> Role {
        if link.loopback {
            Role::Loopback
        } else if link.kind.as_deref() == Some("bridge") {
            Role::Bridge
        } else if link.kind.as_deref() == Some("veth")
            && link.peer_netnsid.is_some()
            && pods.contains(&link.index)
        {
            Role::Pod
        } else {
            Role::Node
        }
    }

    pub fn attached(self) -> bool {
        matches!(self, Role::Pod | Role::Node | Role::Bridge)
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
                l3: is_l3(m.header.link_layer_type),
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

/// Link types whose packets start at the IP header at TC (no MAC header to skip).
fn is_l3(t: LinkLayerType) -> bool {
    matches!(
        t,
        LinkLayerType::None
            | LinkLayerType::Tunnel
            | LinkLayerType::Tunnel6
            | LinkLayerType::Sit
            | LinkLayerType::Ipgre
            | LinkLayerType::Ip6gre
            | LinkLayerType::Rawip
    )
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Other(s) => s.clone(),
        k => k.to_string(),
    }
}

/// A host-side interface: name and index.
pub type Iface = (String, u32);

/// Where each pod address of this node lives: address → the host-side interfaces whose
/// peer holds it (one, unless two namespaces claim the address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInterfaces {
    pub found: BTreeMap<IpAddr, Vec<Iface>>,
    /// Pod addresses behind an interface capture cannot work on, with why.
    pub unsupported: BTreeMap<IpAddr, String>,
    /// Namespaces whose addresses could not be read, with why (the pods behind them are
    /// reported as not found, with this reason).
    pub unreadable: Vec<String>,
    /// The links whose peer's namespace could not be read: an owner behind one keeps its
    /// address (a read that failed is no reason to move it).
    pub unreadable_links: BTreeMap<u32, String>,
}

/// An address's interface, decided: the owner, and the other interfaces claiming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub owner: Iface,
    /// Interfaces whose peer also holds the address: refused.
    pub rivals: Vec<Iface>,
}

impl PodInterfaces {
    /// The host-side interface of the pod holding `ip` (for tests and single lookups).
    pub fn lookup(&self, ip: IpAddr) -> Result<Iface, String> {
        self.resolve(ip, None).map(|r| r.owner)
    }

    /// Who owns `ip`, given the interface it is enrolled on now (`owner`, if any). One
    /// address, one pod: an owner that still holds the address keeps it, whoever else
    /// claims it (the others are rivals, refused); one whose namespace could not be read
    /// this time keeps it too. Without an owner, a single claim wins; two or more are
    /// ambiguous, and nothing is enrolled on a guess.
    pub fn resolve(&self, ip: IpAddr, owner: Option<u32>) -> Result<Resolved, String> {
        let claims = self.found.get(&ip).map(Vec::as_slice).unwrap_or_default();
        if let Some(o) = owner.filter(|o| *o != 0) {
            let others =
                |o: u32| -> Vec<Iface> { claims.iter().filter(|c| c.1 != o).cloned().collect() };
            if let Some(own) = claims.iter().find(|c| c.1 == o) {
                return Ok(Resolved {
                    owner: own.clone(),
                    rivals: others(o),
                });
            }
            if let Some(name) = self.unreadable_links.get(&o) {
                return Ok(Resolved {
                    owner: (name.clone(), o),
                    rivals: others(o),
                });
            }
        }
        match claims {
            [one] => {
                return Ok(Resolved {
                    owner: one.clone(),
                    rivals: vec![],
                })
            }
            [] => {}
            many => {
                let names: Vec<&str> = many.iter().map(|c| c.0.as_str()).collect();
                return Err(format!(
                    "{ip} is claimed by {} interfaces ({}): not enrolled until one alone \
                     holds it",
                    many.len(),
                    names.join(", ")
                ));
            }
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

    /// The interfaces other than `owner` whose peer holds `ip`.
    pub fn rivals(&self, ip: IpAddr, owner: u32) -> Vec<Iface> {
        self.found
            .get(&ip)
            .into_iter()
            .flatten()
            .filter(|c| c.1 != owner)
            .cloned()
            .collect()
    }
}

/// Finds the pods behind every link of this node whose peer is in another namespace.
/// `strict` must be a connection with `NETLINK_GET_STRICT_CHK` set ([`strict_connection`]):
/// the kernel honours the target namespace of an address dump only then.
pub async fn pod_interfaces(strict: &Handle, links: &[Link]) -> PodInterfaces {
    let mut out = PodInterfaces::default();
    // Every veth (whatever its host side carries) and netkit: which of them are pods' is
    // decided by what their peer holds. netkit (Cilium's alternative to veth) runs the
    // pod's egress inside the device: no host-side tc hook sees it, so such pods can be
    // found but not captured.
    let peers: Vec<&Link> = links.iter().filter(|l| l.has_peer_namespace()).collect();
    let nsids: BTreeSet<i32> = peers.iter().filter_map(|l| l.peer_netnsid).collect();
    for nsid in nsids {
        let addrs = match addresses_in(strict, nsid).await {
            Ok(a) => a,
            Err(e) => {
                out.unreadable.push(format!("netnsid {nsid}: {e:#}"));
                for l in peers.iter().filter(|l| l.peer_netnsid == Some(nsid)) {
                    out.unreadable_links.insert(l.index, l.name.clone());
                }
                continue;
            }
        };
        for l in peers.iter().filter(|l| l.peer_netnsid == Some(nsid)) {
            let Some(peer) = l.peer_index else { continue };
            for (index, ip) in &addrs {
                if *index != peer || !is_pod_address(*ip) {
                    continue;
                }
                if l.netkit() {
                    let why = format!(
                        "{ip} is behind netkit device {}: its traffic passes no tc hook \
                         ztunnel could capture it at (use veth mode)",
                        l.name
                    );
                    out.unsupported.insert(*ip, why);
                } else {
                    let claims = out.found.entry(*ip).or_default();
                    if !claims.iter().any(|c| c.1 == l.index) {
                        claims.push((l.name.clone(), l.index));
                    }
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

    fn link(name: &str, index: u32, kind: Option<&str>, netnsid: Option<i32>) -> Link {
        Link {
            name: name.into(),
            index,
            kind: kind.map(str::to_string),
            master: None,
            peer_netnsid: netnsid,
            peer_index: netnsid.map(|_| 2),
            mac: None,
            loopback: name == "lo",
            l3: false,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The layouts of real nodes: what decides is whether the peer holds a pod of this
    /// node, never what the host side carries.
    #[test]
    fn roles_say_where_the_program_goes() {
        let pods: BTreeSet<u32> = [3, 4, 5, 6].into();
        let cases = [
            (link("lo", 1, None, None), Role::Loopback),
            (link("cni0", 2, Some("bridge"), None), Role::Bridge),
            // ptp (kindnet, GKE): the gateway on the host veth changes nothing.
            (link("veth1", 3, Some("veth"), Some(3)), Role::Pod),
            // Calico (no address, proxy ARP), Cilium (`lxc*`, no address).
            (link("cali1", 4, Some("veth"), Some(4)), Role::Pod),
            (link("lxc1", 5, Some("veth"), Some(5)), Role::Pod),
            // A bridge's port.
            (link("veth2", 6, Some("veth"), Some(6)), Role::Pod),
            // kind: the uplink is a veth whose peer (in the host) holds no pod of ours.
            (link("eth0", 7, Some("veth"), Some(0)), Role::Node),
            // A veth whose pod is not known yet: a node link until it is.
            (link("veth9", 9, Some("veth"), Some(9)), Role::Node),
            // A veth with both ends in the node.
            (link("v", 3, Some("veth"), None), Role::Node),
            (link("eth0", 8, None, None), Role::Node),
            (link("flannel.1", 10, Some("vxlan"), None), Role::Node),
            (link("cilium_host", 11, Some("veth"), None), Role::Node),
        ];
        for (l, want) in cases {
            assert_eq!(Role::of(&l, &pods), want, "{}", l.name);
        }
        assert!(Role::Pod.attached() && Role::Node.attached() && Role::Bridge.attached());
        assert!(!Role::Loopback.attached());
        assert!(link("nk0", 1, Some("netkit"), Some(1)).has_peer_namespace());
        assert!(!link("vx", 1, Some("vxlan"), Some(1)).has_peer_namespace());
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
            found: [(ip("10.0.0.2"), vec![("p2".to_string(), 7)])].into(),
            unsupported: [(ip("10.0.0.9"), "netkit".to_string())].into(),
            unreadable: vec!["netnsid 4: denied".into()],
            ..Default::default()
        };
        assert_eq!(p.lookup(ip("10.0.0.2")), Ok(("p2".into(), 7)));
        assert_eq!(p.lookup(ip("10.0.0.9")), Err("netkit".into()));
        let why = p.lookup(ip("10.0.0.3")).unwrap_err();
        assert!(
            why.contains("10.0.0.3") && why.contains("netnsid 4: denied"),
            "{why}"
        );
    }

    /// One address, one pod: who gets an address claimed by several interfaces.
    #[test]
    fn an_owner_keeps_its_address() {
        let v = ("victim".to_string(), 7);
        let c = ("claimant".to_string(), 9);
        let n = ("new".to_string(), 11);
        let x = ip("10.0.0.2");
        let claims = |c: &[&Iface]| PodInterfaces {
            found: [(x, c.iter().map(|i| (*i).clone()).collect())].into(),
            ..Default::default()
        };
        let ok = |owner: &Iface, rivals: &[&Iface]| {
            Ok(Resolved {
                owner: owner.clone(),
                rivals: rivals.iter().map(|i| (*i).clone()).collect(),
            })
        };
        // (claims, current owner, outcome)
        let both = claims(&[&c, &v]);
        assert_eq!(both.resolve(x, Some(7)), ok(&v, &[&c]), "claimed after");
        assert_eq!(
            claims(&[&v, &c]).resolve(x, Some(7)),
            ok(&v, &[&c]),
            "order"
        );
        assert_eq!(both.rivals(x, 7), vec![c.clone()]);
        let ambiguous = both.resolve(x, None).unwrap_err();
        assert!(
            ambiguous.contains("claimed by 2 interfaces (claimant, victim)"),
            "{ambiguous}"
        );
        assert!(both.resolve(x, Some(0)).is_err(), "0: held, no interface");
        // The owner's interface is gone (pod recreated): two new claims are ambiguous,
        // one is the new home.
        assert!(claims(&[&c, &n]).resolve(x, Some(7)).is_err());
        assert_eq!(claims(&[&n]).resolve(x, Some(7)), ok(&n, &[]));
        assert_eq!(claims(&[&v]).resolve(x, None), ok(&v, &[]));
        // The owner's namespace could not be read this time: it keeps the address.
        let unread = PodInterfaces {
            unreadable_links: [(7, "victim".to_string())].into(),
            ..claims(&[&c])
        };
        assert_eq!(unread.resolve(x, Some(7)), ok(&v, &[&c]));
        assert_eq!(unread.resolve(x, None), ok(&c, &[]), "no owner to keep");
    }
}
