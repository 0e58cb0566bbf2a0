//! Whose address an inbound HBONE stream carries.
//!
//! The client names the original source in `forwarded: for=<ip>` (and, our extension, its
//! port in `ztunnel-source-port`). Policies (`sourceIps`) match that address and the pod
//! sees it, so a client may not pick it freely: the claim is believed only when it is
//! consistent with who the client proved to be in the mTLS handshake (the peer):
//!
//! - the peer is a waypoint of the destination (it forwards other clients' connections), or
//! - the workload the state has at the claimed address has exactly the peer's identity (a
//!   node proxy tunnelling its own pod's connection), or
//! - the claim is the tunnel's own peer address.
//!
//! Even then, never an unspecified, multicast, broadcast or link-local address, nor one of this node's
//! own (loopback included): a connection the pod would see coming from its own node.
//! Anything else is refused, never replaced by another address: the client asked for
//! something it may not have. Without the header the source is the tunnel's real peer
//! (the TCP peer of the HBONE connection), as in Istio's ztunnel; the port then is the
//! node's choice, and a `ztunnel-source-port` alone is refused.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::identity::Identity;
use crate::state::{ProxyState, Workload};

/// Whether an address is one of this node's own (loopback included).
pub type NodeAddress = std::sync::Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// What the client claimed, from its CONNECT's headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    /// `forwarded: for=`.
    pub ip: Option<IpAddr>,
    /// `ztunnel-source-port`.
    pub port: Option<u16>,
}

/// Why a claimed source was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("forwarded for={0}: unspecified, multicast, broadcast or link-local")]
    Reserved(IpAddr),
    #[error("forwarded for={0}: an address of this node")]
    NodeAddress(IpAddr),
    #[error("forwarded for={claimed}: {found}, but the peer is {peer}, not it nor a waypoint of the destination")]
    NotThePeer {
        claimed: IpAddr,
        /// What the state has at the claimed address.
        found: String,
        peer: String,
    },
    #[error("ztunnel-source-port {0} without a forwarded address")]
    PortWithoutAddress(u16),
}

impl Untrusted {
    /// The `reason` label of `ztunnel_connections`.
    pub fn name(&self) -> &'static str {
        match self {
            Untrusted::Reserved(_) => "forwarded_reserved_address",
            Untrusted::NodeAddress(_) => "forwarded_node_address",
            Untrusted::NotThePeer { .. } => "forwarded_not_the_peer",
            Untrusted::PortWithoutAddress(_) => "forwarded_port_without_address",
        }
    }
}

/// The source of a stream from `peer` (verified identity) over a tunnel whose TCP peer is
/// `tunnel`, to the workload `dst`, given what it claimed (the module comment's rules).
pub fn tunnelled_source(
    state: &ProxyState,
    dst: &Workload,
    peer: &Identity,
    tunnel: SocketAddr,
    claim: Claim,
    is_node_address: &dyn Fn(IpAddr) -> bool,
) -> Result<SocketAddr, Untrusted> {
    let Some(ip) = claim.ip.map(|ip| ip.to_canonical()) else {
        return match claim.port {
            Some(port) => Err(Untrusted::PortWithoutAddress(port)),
            None => Ok(SocketAddr::new(tunnel.ip().to_canonical(), 0)),
        };
    };
    if is_reserved(ip) {
        return Err(Untrusted::Reserved(ip));
    }
    if is_node_address(ip) {
        return Err(Untrusted::NodeAddress(ip));
    }
    let there = state.workload_by_ip(ip);
    let consistent = ip == tunnel.ip().to_canonical()
        || there.as_ref().is_some_and(|w| w.identity() == *peer)
        || state.is_waypoint_of(dst, peer);
    if !consistent {
        return Err(Untrusted::NotThePeer {
            claimed: ip,
            found: match there {
                Some(w) => format!("{} has identity {}", w.uid, w.identity()),
                None => "no workload has it".into(),
            },
            peer: peer.to_string(),
        });
    }
    Ok(SocketAddr::new(ip, claim.port.unwrap_or(0)))
}

/// Addresses no client connection may be made to come from: unspecified, multicast, IPv4
/// broadcast, and link-local (a node's own link, and 169.254.7.127 is the address Istio
/// gives host-originated connections, which skip policy).
fn is_reserved(ip: IpAddr) -> bool {
    ip.is_unspecified()
        || ip.is_multicast()
        || match ip {
            IpAddr::V4(v4) => v4.is_broadcast() || v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(ip) => write!(f, "for={ip}")?,
            None => f.write_str("no forwarded")?,
        }
        if let Some(p) = self.port {
            write!(f, ", port {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
