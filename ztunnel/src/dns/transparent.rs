//! Enrolled pods' DNS over UDP, captured: the capture program assigns a question an
//! enrolled pod sends to port 53 of any address to a UDP socket here, bound to the
//! wildcard address on the DNS proxy's port (`IP_TRANSPARENT`, so a datagram for an
//! address the node does not own is delivered; `IP_RECVORIGDSTADDR`, so each one says
//! where it was going). The answer goes back from that address and port, through a
//! socket bound there for the one reply (`IP_TRANSPARENT` again), so the pod's resolver
//! sees the server it asked answer — and the node's conntrack sees the reply of the
//! pod's own flow, which it un-NATs as usual when the pod asked a Service VIP.
//!
//! The same socket also serves the DNS proxy's own address (`--dns-proxy-addr`), which it
//! covers being bound to the wildcard on that port, answering from that address the same
//! way (left to the route, the source could be another of the node's addresses, and a
//! resolver takes answers only from the server it asked); datagrams that reach it on any
//! other address and port were neither captured nor sent to the proxy's address, and are
//! dropped.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::proxy::socket::set_transparent;

/// The port DNS questions are captured on: the capture program's.
pub use ztunnel_ebpf_common::dns::DNS_PORT;

/// Whose a datagram that reached the capture socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Captured on its way to port 53 of this address: answer from it.
    Captured(SocketAddr),
    /// Sent to the DNS proxy's own address (this one: with a wildcard proxy address, the
    /// one the datagram came to): answer from it too, as the socket, bound to the
    /// wildcard, would pick its source by the route instead.
    Direct(SocketAddr),
    /// Neither (the wildcard socket reached on another address): dropped.
    Stray,
}

/// Classifies a datagram by where it was going (`orig_dst`, absent if the kernel did not
/// say) against the proxy's own address.
pub fn arrival(orig_dst: Option<SocketAddr>, proxy_addr: SocketAddr) -> Arrival {
    let Some(dst) = orig_dst else {
        return Arrival::Stray;
    };
    let dst = crate::proxy::socket::canonical(dst);
    if dst.port() == proxy_addr.port()
        && (proxy_addr.ip().is_unspecified() || dst.ip() == proxy_addr.ip())
    {
        return Arrival::Direct(dst);
    }
    if dst.port() == DNS_PORT {
        return Arrival::Captured(dst);
    }
    Arrival::Stray
}

/// The capture socket for one family: the wildcard address of `addr`'s family on its port,
/// v6-only for IPv6 (IPv4 gets its own), transparent, reporting original destinations.
pub fn bind_capture_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let v6 = addr.is_ipv6();
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(true)?;
    }
    // The reply sockets bind the destinations pods asked, some of which may share this
    // socket's port (a pod asking the proxy's own port): they need the address reusable.
    s.set_reuse_address(true)?;
    set_transparent(&s, v6)?;
    if v6 {
        setsockopt(&s, sockopt::Ipv6OrigDstAddr, &true)?;
    } else {
        setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true)?;
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The proxy's plain UDP socket on exactly `addr` (when pods' DNS is not captured).
pub fn bind_plain_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Receives one datagram: its length, its source and, on a capture socket, where it was
/// going.
pub async fn recv_with_dst(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    sock.async_io(Interest::READABLE, || {
        let mut iov = [IoSliceMut::new(buf)];
        let mut space = nix::cmsg_space!(libc::sockaddr_in6);
        let msg = recvmsg::<nix::sys::socket::SockaddrStorage>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        let src = msg
            .address
            .and_then(|a| storage_to_std(&a))
            .ok_or_else(|| io::Error::other("datagram without a source address"))?;
        let mut dst = None;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            match c {
                ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                    dst = Some(SocketAddr::V4(SocketAddrV4::new(
                        u32::from_be(a.sin_addr.s_addr).into(),
                        u16::from_be(a.sin_port),
                    )));
                }
                ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                    dst = Some(SocketAddr::V6(SocketAddrV6::new(
                        a.sin6_addr.s6_addr.into(),
                        u16::from_be(a.sin6_port),
                        a.sin6_flowinfo,
                        a.sin6_scope_id,
                    )));
                }
                _ => {}
            }
        }
        Ok((msg.bytes, src, dst))
    })
    .await
}

fn storage_to_std(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    let v6 = a.as_sockaddr_in6()?;
    Some(SocketAddr::V6(SocketAddrV6::new(
        v6.ip(),
        v6.port(),
        v6.flowinfo(),
        v6.scope_id(),
    )))
}

/// Sends `reply` to `to` through `sock` (bound to the wildcard on the proxy's port), from
/// the address `from` (`IP_PKTINFO`): a question to the proxy's own address is answered
/// from it, whatever source the route to the asker would pick. (Binding a socket there
/// for the reply, as [`send_from`] does, would take the proxy's next questions to that
/// address away from `sock` for as long as it exists.)
pub async fn send_via(
    sock: &UdpSocket,
    from: SocketAddr,
    to: SocketAddr,
    reply: &[u8],
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, SockaddrIn, SockaddrIn6};
    use std::io::IoSlice;
    let (from, to) = (
        crate::proxy::socket::canonical(from),
        crate::proxy::socket::canonical(to),
    );
    sock.async_io(Interest::WRITABLE, || {
        let iov = [IoSlice::new(reply)];
        let sent = match (from.ip(), to) {
            (IpAddr::V4(ip), SocketAddr::V4(to)) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                sendmsg(
                    sock.as_raw_fd(),
                    &iov,
                    &[ControlMessage::Ipv4PacketInfo(&info)],
                    MsgFlags::empty(),
                    Some(&SockaddrIn::from(to)),
                )
            }
            (IpAddr::V6(ip), SocketAddr::V6(to)) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                sendmsg(
                    sock.as_raw_fd(),
                    &iov,
                    &[ControlMessage::Ipv6PacketInfo(&info)],
                    MsgFlags::empty(),
                    Some(&SockaddrIn6::from(to)),
                )
            }
            _ => return Err(io::Error::other("reply across address families")),
        };
        sent.map(drop).map_err(io::Error::from)
    })
    .await
}

/// Sends `reply` to `to` from `from` (the address and port the pod asked), through a
/// socket bound there for this one datagram and carrying ztunnel's `SO_MARK`.
pub fn send_from(from: SocketAddr, to: SocketAddr, reply: &[u8], mark: u32) -> io::Result<()> {
    // The pod's family decides: an IPv4 pod asking an IPv4 server.
    let (from, to) = (
        crate::proxy::socket::canonical(from),
        crate::proxy::socket::canonical(to),
    );
    let v6 = matches!(from.ip(), IpAddr::V6(_));
    let s = Socket::new(Domain::for_address(from), Type::DGRAM, Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    set_transparent(&s, v6)?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&from.into())?;
    let sent = s.send_to(reply, &to.into())?;
    if sent != reply.len() {
        return Err(io::Error::other(format!(
            "sent {sent} of {} bytes",
            reply.len()
        )));
    }
    Ok(())
}

/// Checks, once at start, that this process may answer from port 53 (binding a port below
/// 1024 needs CAP_NET_BIND_SERVICE), on an address of the documentation range that no
/// one serves (a transparent bind needs no local address).
pub fn check_reply_privilege(mark: u32) -> io::Result<()> {
    let probe: SocketAddr = (std::net::Ipv4Addr::new(192, 0, 2, 53), DNS_PORT).into();
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    set_transparent(&s, false)?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.bind(&probe.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn arrival_table() {
        let loopback = a("127.0.0.1:15053");
        let any = a("0.0.0.0:15053");
        let rows: &[(&str, Option<SocketAddr>, SocketAddr, Arrival)] = &[
            (
                "captured to the cluster DNS",
                Some(a("10.96.0.10:53")),
                loopback,
                Arrival::Captured(a("10.96.0.10:53")),
            ),
            (
                "captured, IPv6",
                Some(a("[fd00::10]:53")),
                loopback,
                Arrival::Captured(a("[fd00::10]:53")),
            ),
            (
                "captured, v4-mapped on a v6 socket",
                Some(a("[::ffff:10.96.0.10]:53")),
                loopback,
                Arrival::Captured(a("10.96.0.10:53")),
            ),
            (
                "the proxy's address",
                Some(loopback),
                loopback,
                Arrival::Direct(loopback),
            ),
            (
                "the node's address on the proxy's port, proxy on loopback",
                Some(a("10.0.0.5:15053")),
                loopback,
                Arrival::Stray,
            ),
            (
                "proxy on every address",
                Some(a("10.0.0.5:15053")),
                any,
                Arrival::Direct(a("10.0.0.5:15053")),
            ),
            (
                "another port",
                Some(a("10.0.0.5:5353")),
                loopback,
                Arrival::Stray,
            ),
            ("no original destination", None, loopback, Arrival::Stray),
        ];
        for (case, dst, proxy, want) in rows {
            assert_eq!(arrival(*dst, *proxy), *want, "{case}");
        }
    }
}
