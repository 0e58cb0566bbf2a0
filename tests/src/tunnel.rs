//! The L3 tunnel between nodes of [`Interconnect::Ipip`](crate::layout::Interconnect):
//! a device with no Ethernet header, as Calico's IPIP `tunl0` (or a WireGuard or GRE
//! device) is, carrying pod packets in IP-in-IP across the wire.
//!
//! This kernel has no `ipip`, `gre` or `wireguard` driver, so the device is a TUN device
//! (`IFF_TUN`: layer 3, `ARPHRD_NONE`, packets start at the IP header) named `tunl0`,
//! and a relay thread in the node's namespace does the encapsulation the `ipip` driver
//! would: each packet the node routes into `tunl0` leaves as the payload of an IPv4
//! packet of protocol 4 (IPv4 inside) or 41 (IPv6 inside, as `sit` sends it) to the node
//! owning the inner destination; each such packet arriving from another node is written
//! back into `tunl0`, so the node receives it on `tunl0`, as from the `ipip` driver. On
//! the wire that is exactly IPIP (flannel's old `udp` backend is this design too).
//!
//! Node `j` owns `10.j.0.0/16` and `fd00:j::/64` (the testbed's addressing), so the
//! relay needs no table.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};

use crate::netns::Netns;

/// The tunnel device's name (Calico's).
pub const DEVICE: &str = "tunl0";
/// Its MTU: the wire's 1500 less the outer IPv4 header (Calico's IPIP MTU).
pub const MTU: u32 = 1480;
/// IP protocol numbers of the outer header: IPv4-in-IPv4, IPv6-in-IPv4.
pub const IPPROTO_IPIP: i32 = 4;
pub const IPPROTO_IPV6: i32 = 41;

/// A running tunnel endpoint: the device lives as long as this (its file descriptor).
pub struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Creates `tunl0` in `ns` (node `index`) and starts relaying. The device is up, with
    /// MTU [`MTU`], and no address or route yet.
    pub fn start(ns: &Netns, index: u8) -> anyhow::Result<Relay> {
        let fds = ns.run(open_endpoint)?;
        // A longer queue into the relay than TUN's default 500, for the same reason.
        ns.ip(&[
            "link",
            "set",
            DEVICE,
            "mtu",
            &MTU.to_string(),
            "txqueuelen",
            "10000",
            "up",
        ])?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tunl0-node{index}"))
            .spawn(move || relay(fds, s))?;
        Ok(Relay {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Fds {
    tun: OwnedFd,
    /// Raw sockets for protocols 4 and 41.
    raw4: OwnedFd,
    raw6: OwnedFd,
}

/// `struct ifreq` as `TUNSETIFF` reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens the TUN device and the two raw sockets, in the calling thread's namespace.
fn open_endpoint() -> anyhow::Result<Fds> {
    // SAFETY: open(2) of a fixed path; the fd is owned right away.
    let tun = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if tun < 0 {
        bail!("/dev/net/tun: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let tun = unsafe { OwnedFd::from_raw_fd(tun) };
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..DEVICE.len()].copy_from_slice(DEVICE.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq, which `req` is laid out as.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } != 0 {
        bail!("TUNSETIFF {DEVICE}: {}", std::io::Error::last_os_error());
    }
    let raw = |proto: i32| -> anyhow::Result<OwnedFd> {
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            bail!("raw socket {proto}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A raw socket whose receive buffer is full is skipped, and with no other taker
        // the kernel answers "protocol unreachable": room for a bulk transfer's burst
        // while the relay thread waits for a CPU.
        let size: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: setsockopt(2) with an int option on our own socket.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
        }
        Ok(fd)
    };
    Ok(Fds {
        tun,
        raw4: raw(IPPROTO_IPIP).context("IPIP")?,
        raw6: raw(IPPROTO_IPV6).context("IPv6 in IPv4")?,
    })
}

/// The node owning an inner packet's destination (`10.j.…` or `fd00:j::…` → node `j`'s
/// `192.168.0.j`), and the outer protocol; `None` for anything else.
pub fn outer_for(inner: &[u8]) -> Option<(Ipv4Addr, i32)> {
    match inner.first()? >> 4 {
        4 if inner.len() >= 20 && inner[16] == 10 && inner[17] != 0 => {
            Some((Ipv4Addr::new(192, 168, 0, inner[17]), IPPROTO_IPIP))
        }
        6 if inner.len() >= 40 && inner[24..28] == [0xfd, 0x00, 0x00, inner[27]] => {
            let j = inner[27];
            (j != 0 && j != 0xff).then_some((Ipv4Addr::new(192, 168, 0, j), IPPROTO_IPV6))
        }
        _ => None,
    }
}

/// The inner packet of an outer IPv4 packet read from a raw socket (which returns the
/// header too), if it came from a node on the wire (`192.168.0.0/24`).
pub fn inner_of(outer: &[u8]) -> Option<&[u8]> {
    if outer.len() < 20 || outer[0] >> 4 != 4 || outer[12..15] != [192, 168, 0] {
        return None;
    }
    let ihl = ((outer[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([outer[2], outer[3]]) as usize;
    outer.get(ihl..total.min(outer.len()))
}

fn relay(fds: Fds, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    let mut polls = [
        fds.tun.as_raw_fd(),
        fds.raw4.as_raw_fd(),
        fds.raw6.as_raw_fd(),
    ]
    .map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: poll(2) over our own array.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as _, 100) };
        if n <= 0 {
            continue;
        }
        for p in polls.iter_mut() {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            p.revents = 0;
            // SAFETY: reading into a buffer we own.
            let len = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if len <= 0 {
                continue;
            }
            let pkt = &buf[..len as usize];
            if p.fd == fds.tun.as_raw_fd() {
                let Some((node, proto)) = outer_for(pkt) else {
                    continue;
                };
                let sock = if proto == IPPROTO_IPIP {
                    &fds.raw4
                } else {
                    &fds.raw6
                };
                let to = socket2::SockAddr::from(SocketAddrV4::new(node, 0));
                // SAFETY: sendto(2) with a buffer and address we own. A failure is a
                // lost packet, as on a real wire.
                unsafe {
                    libc::sendto(
                        sock.as_raw_fd(),
                        pkt.as_ptr().cast(),
                        pkt.len(),
                        0,
                        to.as_ptr(),
                        to.len(),
                    )
                };
            } else if let Some(inner) = inner_of(pkt) {
                // SAFETY: write(2) of a buffer we own into our TUN fd.
                unsafe { libc::write(fds.tun.as_raw_fd(), inner.as_ptr().cast(), inner.len()) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&dst);
        p
    }

    fn v6(dst: [u8; 16]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[24..40].copy_from_slice(&dst);
        p
    }

    #[test]
    fn inner_destination_picks_the_node() {
        let four = |a| (Ipv4Addr::new(192, 168, 0, a), IPPROTO_IPIP);
        let six = |a| (Ipv4Addr::new(192, 168, 0, a), IPPROTO_IPV6);
        assert_eq!(outer_for(&v4([10, 2, 0, 3])), Some(four(2)));
        assert_eq!(outer_for(&v4([10, 1, 0, 0])), Some(four(1)));
        assert_eq!(outer_for(&v4([10, 0, 0, 3])), None);
        assert_eq!(outer_for(&v4([192, 168, 0, 2])), None);
        let mut d = [0u8; 16];
        d[..4].copy_from_slice(&[0xfd, 0, 0, 2]);
        d[15] = 3;
        assert_eq!(outer_for(&v6(d)), Some(six(2)));
        d[3] = 0xff;
        assert_eq!(outer_for(&v6(d)), None, "the nodes' own range");
        assert_eq!(outer_for(&[0x45, 0, 0]), None, "short");
        assert_eq!(outer_for(&[]), None);
    }

    #[test]
    fn outer_header_is_stripped_only_from_nodes() {
        let mut outer = v4([192, 168, 0, 1]);
        outer[12..16].copy_from_slice(&[192, 168, 0, 2]);
        outer.extend_from_slice(&v4([10, 1, 0, 2]));
        let total = outer.len() as u16;
        outer[2..4].copy_from_slice(&total.to_be_bytes());
        assert_eq!(inner_of(&outer), Some(&outer[20..]));
        outer[12] = 172;
        assert_eq!(inner_of(&outer), None);
        assert_eq!(inner_of(&[0x45; 10]), None);
    }
}
