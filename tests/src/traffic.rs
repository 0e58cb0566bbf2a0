//! Test traffic: servers and clients that run inside pod namespaces.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use crate::netns::Netns;

/// A TCP server inside a namespace that echoes what it reads and reports, for every
/// connection, the peer and local addresses it saw.
pub struct EchoServer {
    pub addr: SocketAddr,
    accepted: mpsc::Receiver<(SocketAddr, SocketAddr)>,
}

/// Writes back what `conn` sends, in reads of up to `chunk` bytes, until it ends or fails.
pub fn echo_until_eof(conn: &mut (impl Read + Write), chunk: usize) {
    let mut buf = vec![0u8; chunk];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

impl EchoServer {
    /// Listens on `[::]:port` (dual-stack) inside `ns`.
    pub fn start(ns: &Netns, port: u16) -> anyhow::Result<EchoServer> {
        let listener = ns.run(move || TcpListener::bind(("::", port)))?;
        let addr = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let peer = conn.peer_addr().map(canonical);
                let local = conn.local_addr().map(canonical);
                if let (Ok(p), Ok(l)) = (peer, local) {
                    let _ = tx.send((p, l));
                }
                std::thread::spawn(move || {
                    echo_until_eof(&mut conn, 16384);
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        Ok(EchoServer { addr, accepted })
    }

    /// The (peer, local) addresses of the next accepted connection.
    pub fn next_accepted(&self, timeout: Duration) -> Option<(SocketAddr, SocketAddr)> {
        self.accepted.recv_timeout(crate::scaled(timeout)).ok()
    }

    /// Connections accepted so far and not yet taken.
    pub fn drain(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.accepted.try_iter().collect()
    }
}

/// Connects from inside `ns`.
pub fn connect(ns: &Netns, dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let timeout = crate::scaled(timeout);
    ns.run(move || {
        let s = TcpStream::connect_timeout(&dst, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    })
}

/// Sends `msg`, half-closes, and reads the whole echo back.
pub fn echo_round_trip(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(msg)?;
    stream.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) as plain IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Sends `bytes` to an echo server at `dst` from inside `ns` while reading the echo back
/// (both directions at once, so full-size segments flow both ways); fails if the echo
/// differs or stalls for `timeout`.
pub fn bulk_echo(
    ns: &Netns,
    dst: SocketAddr,
    bytes: usize,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut s = connect(ns, dst, timeout)?;
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut w = s.try_clone()?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&sent)?;
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(bytes);
    let r = s.read_to_end(&mut back);
    writer.join().expect("bulk writer")?;
    r.map_err(|e| std::io::Error::new(e.kind(), format!("{e} after {} bytes", back.len())))?;
    if back != data {
        return Err(std::io::Error::other(format!(
            "echo of {} bytes altered",
            back.len()
        )));
    }
    Ok(())
}

/// Whether a connection from `ns` to `dst` carries a `ping` and gets it echoed (2 s bound).
pub fn echoes(ns: &Netns, dst: SocketAddr) -> bool {
    connect(ns, dst, Duration::from_secs(2))
        .and_then(|mut s| echo_round_trip(&mut s, b"ping"))
        .map(|v| v == b"ping")
        .unwrap_or(false)
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + crate::scaled(timeout);
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out: {what}");
}

/// Steady load: `workers` threads in `ns`, each opening a connection to `dst`, echoing a
/// few bytes and closing it, over and over, until stopped. Every failure is counted by
/// kind, so a test can say exactly what was lost.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<std::thread::JoinHandle<LoadReport>>,
}

/// What a [`Load`] saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub refused: u64,
    pub reset: u64,
    pub timed_out: u64,
    /// Wrong or short echo, or any other error.
    pub other: u64,
    /// The longest successful connect + echo + close (a dropped SYN shows as ≥ 1 s).
    pub slowest: Duration,
    /// The first few failures, for the assertion message.
    pub samples: Vec<String>,
}

impl LoadReport {
    pub fn failed(&self) -> u64 {
        self.refused + self.reset + self.timed_out + self.other
    }

    fn merge(&mut self, o: LoadReport) {
        self.ok += o.ok;
        self.refused += o.refused;
        self.reset += o.reset;
        self.timed_out += o.timed_out;
        self.other += o.other;
        self.slowest = self.slowest.max(o.slowest);
        self.samples.extend(o.samples);
        self.samples.truncate(10);
    }

    fn record(&mut self, r: std::io::Result<Vec<u8>>, msg: &[u8], took: Duration) {
        use std::io::ErrorKind::*;
        let e = match r {
            Ok(v) if v == msg => {
                self.ok += 1;
                self.slowest = self.slowest.max(took);
                return;
            }
            Ok(v) => {
                self.other += 1;
                format!("echo of {} bytes, expected {}", v.len(), msg.len())
            }
            Err(e) => {
                match e.kind() {
                    ConnectionRefused => self.refused += 1,
                    ConnectionReset | ConnectionAborted | BrokenPipe => self.reset += 1,
                    TimedOut | WouldBlock => self.timed_out += 1,
                    _ => self.other += 1,
                }
                e.to_string()
            }
        };
        if self.samples.len() < 10 {
            self.samples.push(e);
        }
    }
}

impl Load {
    pub fn start(ns: &Netns, dst: SocketAddr, workers: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers = (0..workers)
            .map(|i| {
                let stop = stop.clone();
                ns.spawn(move || {
                    let mut report = LoadReport::default();
                    let msg = format!("load-{i}").into_bytes();
                    let t = crate::scaled(Duration::from_secs(5));
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = std::time::Instant::now();
                        let r = TcpStream::connect_timeout(&dst, t).and_then(|mut s| {
                            s.set_read_timeout(Some(t))?;
                            echo_round_trip(&mut s, &msg)
                        });
                        report.record(r, &msg, started.elapsed());
                    }
                    report
                })
            })
            .collect();
        Load { stop, workers }
    }

    pub fn stop(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadReport::default();
        for w in self.workers {
            total.merge(w.join().expect("load worker"));
        }
        total
    }
}

/// Sends one ICMP (ICMPv6) echo request from inside `ns` to `dst` over a raw socket and
/// waits up to `timeout` for the matching reply (no `ping` binary needed).
pub fn ping(ns: &Netns, dst: std::net::IpAddr, timeout: Duration) -> std::io::Result<bool> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    static SEQ: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let id = std::process::id() as u16;
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ns.run(move || {
        let v6 = dst.is_ipv6();
        let (domain, proto, request, reply) = if v6 {
            (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8)
        } else {
            (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8)
        };
        let s = Socket::new(domain, Type::RAW, Some(proto))?;
        let mut pkt = vec![request, 0, 0, 0];
        pkt.extend_from_slice(&id.to_be_bytes());
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(b"ztunnel-tests ping");
        if !v6 {
            // ICMPv6 raw sockets get their checksum from the kernel; ICMP ones do not.
            let sum = inet_checksum(&pkt);
            pkt[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        s.send_to(&pkt, &SockAddr::from(SocketAddr::new(dst, 0)))?;
        let deadline = std::time::Instant::now() + crate::scaled(timeout);
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            s.set_read_timeout(Some(left))?;
            let n = match (&s).read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock) => return Ok(false),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut) => return Ok(false),
                Err(e) => return Err(e),
            };
            // IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
            let icmp = if v6 {
                &buf[..n]
            } else {
                &buf[((buf[0] & 0x0f) as usize * 4).min(n)..n]
            };
            if icmp.len() >= 8
                && icmp[0] == reply
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                return Ok(true);
            }
        }
    })
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
