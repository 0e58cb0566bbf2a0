//! Streams that treat EAGAIN as "not yet", as an event-driven application does, for
//! traffic on sockmap-accelerated connections.
//!
//! A socket in a sockmap reads through the kernel's `tcp_bpf_recvmsg`, which waits once
//! and returns EAGAIN even to a *blocking* reader when the socket was woken for something
//! else than data (a state change such as its own FIN being acknowledged after a
//! half-close, buffer space freed while another thread writes); TCP's own recvmsg waits
//! again instead. Measured on Linux 6.18 (ARCHITECTURE.md, "Sockmap"). Event-driven
//! programs (epoll: nginx, Envoy, Go, Node, tokio) wait for readiness on EAGAIN and never
//! notice; a blocking program that reads after a half-close, or reads and writes one
//! socket from two threads, sees an error. These wrappers stand for the former.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// A blocking stream whose reads and writes retry an EAGAIN that came before `timeout`
/// (the socket's own timeout, which also reports as EAGAIN, ends them).
pub struct Patient {
    inner: TcpStream,
    timeout: Duration,
}

impl Patient {
    pub fn new(inner: TcpStream, timeout: Duration) -> io::Result<Patient> {
        let timeout = crate::scaled(timeout);
        inner.set_read_timeout(Some(timeout))?;
        inner.set_write_timeout(Some(timeout))?;
        Ok(Patient { inner, timeout })
    }

    /// Connects from inside `ns`.
    pub fn connect(ns: &Netns, dst: SocketAddr, timeout: Duration) -> io::Result<Patient> {
        let t = crate::scaled(timeout);
        let s = ns.run(move || TcpStream::connect_timeout(&dst, t))?;
        Patient::new(s, timeout)
    }

    pub fn try_clone(&self) -> io::Result<Patient> {
        Ok(Patient {
            inner: self.inner.try_clone()?,
            timeout: self.timeout,
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }

    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }

    fn retry<T>(&mut self, mut op: impl FnMut(&mut TcpStream) -> io::Result<T>) -> io::Result<T> {
        let started = Instant::now();
        loop {
            match op(&mut self.inner) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock && started.elapsed() < self.timeout => {
                }
                r => return r,
            }
        }
    }
}

impl Read for Patient {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.retry(|s| s.read(buf))
    }
}

impl Write for Patient {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.retry(|s| s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends `msg`, half-closes, and reads the whole echo back.
pub fn echo_round_trip(s: &mut Patient, msg: &[u8]) -> io::Result<Vec<u8>> {
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// An echo server inside `ns` on `[::]:port` whose connections are [`Patient`].
pub fn echo_server(ns: &Netns, port: u16, timeout: Duration) -> anyhow::Result<()> {
    let listener = ns.run(move || TcpListener::bind(("::", port)))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let Ok(mut conn) = Patient::new(conn, timeout) else {
                continue;
            };
            std::thread::spawn(move || {
                crate::traffic::echo_until_eof(&mut conn, 65536);
                let _ = conn.shutdown(Shutdown::Write);
            });
        }
    });
    Ok(())
}
