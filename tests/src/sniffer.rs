//! A packet capture on one interface of a namespace (AF_PACKET), to prove what crosses
//! the wire: which TCP ports, and whether some plaintext appears in any payload.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::netns::Netns;

pub struct Sniffer {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    thread: Option<JoinHandle<()>>,
}

/// What was seen.
#[derive(Debug, Default)]
pub struct Capture {
    pub frames: Vec<Vec<u8>>,
}

impl Sniffer {
    /// Starts capturing every frame on `ifname` inside `ns`.
    pub fn start(ns: &Netns, ifname: &str) -> anyhow::Result<Sniffer> {
        let ifname = std::ffi::CString::new(ifname)?;
        let fd = ns.run(move || -> anyhow::Result<i32> {
            // SAFETY: plain socket/bind syscalls with valid arguments.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
                if fd < 0 {
                    anyhow::bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                }
                let idx = libc::if_nametoindex(ifname.as_ptr());
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto as u16;
                sll.sll_ifindex = idx as i32;
                if libc::bind(
                    fd,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    anyhow::bail!("bind AF_PACKET: {}", std::io::Error::last_os_error());
                }
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 100_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                Ok(fd)
            }
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (s, f) = (stop.clone(), frames.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: reading into a buffer we own.
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n > 0 {
                    f.lock().unwrap().push(buf[..n as usize].to_vec());
                }
            }
            // Frames already queued when the capture was stopped belong to it too.
            loop {
                // SAFETY: reading into a buffer we own, without blocking.
                let n = unsafe {
                    libc::recv(
                        fd,
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n <= 0 {
                    break;
                }
                f.lock().unwrap().push(buf[..n as usize].to_vec());
            }
            // SAFETY: closing our own fd once.
            unsafe { libc::close(fd) };
        });
        Ok(Sniffer {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    pub fn finish(mut self) -> Capture {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Capture {
            frames: std::mem::take(&mut self.frames.lock().unwrap()),
        }
    }
}

/// The device of a node where the TCP its pods exchange with other nodes can be read: the
/// VXLAN device (before encapsulation) under VXLAN, else the uplink (under IPIP, read the
/// capture through [`Capture::pod_traffic`]).
pub fn carrier(layout: crate::Layout) -> &'static str {
    layout.vxlan().unwrap_or(layout.uplink())
}

impl Capture {
    /// (source port, destination port, payload) of every TCP segment.
    pub fn tcp(&self) -> Vec<(u16, u16, &[u8])> {
        self.frames.iter().filter_map(|f| tcp_segment(f)).collect()
    }

    /// Whether `needle` appears anywhere in a frame: in a TCP payload, or inside an
    /// encapsulation (VXLAN, IPIP) that carries one. Only encryption hides it.
    pub fn contains_plaintext(&self, needle: &[u8]) -> bool {
        self.frames
            .iter()
            .any(|f| f.windows(needle.len()).any(|w| w == needle))
    }

    /// What the nodes' pods sent each other, from a capture on [`carrier`]: under IPIP the
    /// packets inside the tunnel's, elsewhere the capture as it is.
    pub fn pod_traffic(self, layout: crate::Layout) -> Capture {
        if layout.tunnel().is_some() {
            self.decapsulated()
        } else {
            self
        }
    }

    /// UDP datagrams to `port` (outer headers: VXLAN's are to 8472).
    pub fn udp_to(&self, port: u16) -> usize {
        self.frames
            .iter()
            .filter(|f| udp_dport(f) == Some(port))
            .count()
    }

    /// Distinct TCP ports carrying payload.
    pub fn ports_with_payload(&self) -> std::collections::BTreeSet<u16> {
        self.tcp()
            .iter()
            .filter(|(_, _, p)| !p.is_empty())
            .flat_map(|(s, d, _)| [*s, *d])
            .collect()
    }
}

impl Capture {
    /// IPv4 packets of protocol 4 or 41 (IP-in-IP, IPv6-in-IPv4: an IPIP tunnel).
    pub fn ipip(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| ipip_inner(f).is_some())
            .count()
    }

    /// The packets inside the IPIP packets, as frames of their own (with an Ethernet
    /// header made up for them), so that what the tunnel carried can be read like a wire.
    pub fn decapsulated(&self) -> Capture {
        let frames = self
            .frames
            .iter()
            .filter_map(|f| ipip_inner(f))
            .map(|(ethertype, inner)| {
                let mut f = vec![0u8; 12];
                f.extend_from_slice(&ethertype.to_be_bytes());
                f.extend_from_slice(inner);
                f
            })
            .collect();
        Capture { frames }
    }
}

/// The ethertype and bytes of the packet inside an IPv4 packet of protocol 4 or 41.
fn ipip_inner(f: &[u8]) -> Option<(u16, &[u8])> {
    if u16::from_be_bytes([*f.get(12)?, *f.get(13)?]) != 0x0800 {
        return None;
    }
    let ethertype = match *f.get(23)? {
        4 => 0x0800,
        41 => 0x86dd,
        _ => return None,
    };
    let ihl = ((f.get(14)? & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]) as usize;
    Some((ethertype, f.get(14 + ihl..14 + total)?))
}

/// The destination port of an IPv4 or IPv6 UDP datagram in an Ethernet frame.
fn udp_dport(f: &[u8]) -> Option<u16> {
    let l4 = match u16::from_be_bytes([*f.get(12)?, *f.get(13)?]) {
        0x0800 if *f.get(23)? == 17 => 14 + ((f.get(14)? & 0x0f) as usize) * 4,
        0x86dd if *f.get(20)? == 17 => 54,
        _ => return None,
    };
    Some(u16::from_be_bytes([*f.get(l4 + 2)?, *f.get(l4 + 3)?]))
}

fn tcp_segment(f: &[u8]) -> Option<(u16, u16, &[u8])> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (l4, proto) = match ethertype {
        0x0800 => {
            let ihl = ((f.get(14)? & 0x0f) as usize) * 4;
            let total = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]) as usize;
            (f.get(14 + ihl..14 + total)?, *f.get(23)?)
        }
        0x86dd => {
            let plen = u16::from_be_bytes([*f.get(18)?, *f.get(19)?]) as usize;
            (f.get(54..54 + plen)?, *f.get(20)?)
        }
        _ => return None,
    };
    if proto != 6 {
        return None;
    }
    let sport = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
    let dport = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
    let off = ((l4.get(12)? >> 4) as usize) * 4;
    Some((sport, dport, l4.get(off..)?))
}
