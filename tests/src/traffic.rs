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
