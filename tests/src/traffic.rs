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
                    let mut buf = [0u8; 16384];
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
                    let _ = conn.shutdown(Shutdown::Write);
                });
            }
        });
        Ok(EchoServer { addr, accepted })
    }

    /// The (peer, local) addresses of the next accepted connection.
    pub fn next_accepted(&self, timeout: Duration) -> Option<(SocketAddr, SocketAddr)> {
        self.accepted.recv_timeout(timeout).ok()
    }

    /// Connections accepted so far and not yet taken.
    pub fn drain(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.accepted.try_iter().collect()
    }
}

/// Connects from inside `ns`.
pub fn connect(ns: &Netns, dst: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
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

/// Whether a connection from `ns` to `dst` carries a `ping` and gets it echoed (2 s bound).
pub fn echoes(ns: &Netns, dst: SocketAddr) -> bool {
    connect(ns, dst, Duration::from_secs(2))
        .and_then(|mut s| echo_round_trip(&mut s, b"ping"))
        .map(|v| v == b"ping")
        .unwrap_or(false)
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
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
                    let t = Duration::from_secs(5);
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
