//! Load generators and the servers they talk to, all plain blocking sockets on threads
//! that live in pod namespaces. Every load has a deadline or a count, and every socket a
//! timeout, so nothing runs on if the data path stalls.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ztunnel_tests::patient::Patient;
use ztunnel_tests::Netns;

/// Server ports in every server pod.
pub const SINK_PORT: u16 = 5001;
pub const ECHO_PORT: u16 = 5002;
/// Connection-rate runs each use a fresh port from here (see [`Servers::start`]).
pub const CONN_PORT_BASE: u16 = 6000;
pub const CONN_PORTS: u16 = 64;

/// Every port a server pod listens on.
pub fn server_ports() -> Vec<u16> {
    let mut ports = vec![SINK_PORT, ECHO_PORT];
    ports.extend((0..CONN_PORTS).map(|i| CONN_PORT_BASE + i));
    ports
}

/// Big writes: the generator should cost little next to what it measures.
const BUF: usize = 256 * 1024;
/// Nothing in a healthy run waits this long; a stalled tunnel fails the item instead.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Server threads only need small stacks; 1,000 held connections mean 1,000 of them.
const SERVER_STACK: usize = 128 * 1024;

/// The servers of one pod: a sink for throughput (reads everything, then answers with
/// the byte count it received, so the client learns what really arrived), and echo
/// servers for request/response and connection rate.
pub struct Servers;

impl Servers {
    /// Starts them on all addresses of the pod. Connection-rate runs use a fresh port
    /// each (`CONN_PORT_BASE + run`), so TIME_WAIT entries of one run never limit the
    /// source ports of the next, in the pods or in ztunnel's original-source sockets.
    pub fn start(ns: &Netns) -> anyhow::Result<()> {
        Servers::start_at(ns, 0)
    }

    /// The same servers on every port plus `offset` (a second set, measured another way).
    pub fn start_at(ns: &Netns, offset: u16) -> anyhow::Result<()> {
        for port in server_ports() {
            let sink = port == SINK_PORT;
            let port = port + offset;
            let l = ns.run(move || TcpListener::bind(("0.0.0.0", port)))?;
            std::thread::spawn(move || accept_loop(l, sink));
        }
        Ok(())
    }
}

fn accept_loop(l: TcpListener, sink: bool) {
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        let Ok(conn) = Patient::new(conn, IO_TIMEOUT * 3) else {
            continue;
        };
        let spawned = std::thread::Builder::new()
            .stack_size(SERVER_STACK)
            .spawn(move || {
                if sink {
                    let _ = serve_sink(conn);
                } else {
                    let _ = serve_echo(conn);
                }
            });
        if spawned.is_err() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn serve_sink(mut c: Patient) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        match c.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    c.write_all(&total.to_be_bytes())?;
    c.shutdown(Shutdown::Write)
}

fn serve_echo(mut c: Patient) -> std::io::Result<()> {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf)? {
            0 => return Ok(()),
            n => c.write_all(&buf[..n])?,
        }
    }
}

/// Patient: on a sockmap-accelerated socket a blocking read woken without data (after the
/// half-close of a throughput run) returns EAGAIN, which an event-driven program treats as
/// "not yet"; every mode gets the same I/O (see `ztunnel_tests::patient`).
fn connect(dst: SocketAddr, nodelay: bool) -> std::io::Result<Patient> {
    let s = TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT)?;
    s.set_nodelay(nodelay)?;
    Patient::new(s, IO_TIMEOUT)
}

/// Bulk transfer result: bytes the server confirmed receiving, over the time from the
/// first write to the last confirmation.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub bytes: u64,
    pub secs: f64,
    pub errors: u64,
}

impl Transfer {
    pub fn gbit_per_sec(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs.max(1e-9) / 1e9
    }
}

/// `streams` connections from `ns` to the sink at `dst`, each writing for `dur`.
pub fn throughput(ns: &Netns, dst: SocketAddr, streams: usize, dur: Duration) -> Transfer {
    let start = Instant::now();
    let deadline = start + dur;
    let workers: Vec<_> = (0..streams)
        .map(|_| ns.spawn(move || one_stream(dst, deadline)))
        .collect();
    let mut t = Transfer {
        bytes: 0,
        secs: 0.0,
        errors: 0,
    };
    for w in workers {
        match w.join() {
            Ok(Ok(b)) => t.bytes += b,
            _ => t.errors += 1,
        }
    }
    t.secs = start.elapsed().as_secs_f64();
    t
}

fn one_stream(dst: SocketAddr, deadline: Instant) -> std::io::Result<u64> {
    let mut s = connect(dst, false)?;
    let buf = vec![0x5au8; BUF];
    while Instant::now() < deadline {
        s.write_all(&buf)?;
    }
    s.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    Ok(u64::from_be_bytes(count))
}

/// Round-trip times of `n` 1-byte request/responses on one connection (after a warm-up),
/// in nanoseconds.
pub fn latency(ns: &Netns, dst: SocketAddr, n: usize) -> std::io::Result<Vec<u64>> {
    ns.spawn(move || {
        let mut s = connect(dst, true)?;
        let mut b = [0u8; 1];
        let mut rtts = Vec::with_capacity(n);
        for i in 0..n + n / 20 {
            let t = Instant::now();
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            if i >= n / 20 {
                rtts.push(t.elapsed().as_nanos() as u64);
            }
        }
        Ok(rtts)
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("latency thread panicked")))
}

/// Connection-rate result.
#[derive(Clone, Copy, Debug)]
pub struct Churn {
    pub connections: u64,
    pub errors: u64,
    pub secs: f64,
}

impl Churn {
    pub fn per_sec(&self) -> f64 {
        self.connections as f64 / self.secs.max(1e-9)
    }
}

/// `concurrency` loops of connect, 1-byte request, 1-byte response, close, for `dur`.
pub fn conn_rate(ns: &Netns, dst: SocketAddr, concurrency: usize, dur: Duration) -> Churn {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (ok, failed) = (ok.clone(), failed.clone());
            ns.spawn(move || {
                while Instant::now() < deadline {
                    match one_connection(dst) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Churn {
        connections: ok.load(Ordering::Relaxed),
        errors: failed.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
    }
}

fn one_connection(dst: SocketAddr) -> std::io::Result<()> {
    let mut s = connect(dst, true)?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
}

/// Opens `n` connections, each proven end to end by a 1-byte round trip, and returns them
/// open. Stops at the first failure (the caller reports how many it got).
pub fn hold(ns: &Netns, dst: SocketAddr, n: usize) -> Vec<Patient> {
    ns.spawn(move || {
        let mut held = Vec::with_capacity(n);
        for _ in 0..n {
            let Ok(mut s) = connect(dst, false) else {
                break;
            };
            let mut b = [0u8; 1];
            if s.write_all(b"h")
                .and_then(|_| s.read_exact(&mut b))
                .is_err()
            {
                break;
            }
            held.push(s);
        }
        held
    })
    .join()
    .unwrap_or_default()
}
