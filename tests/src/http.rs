//! A tiny HTTP/1.0 client for the admin, metrics and readiness endpoints, run from inside a
//! namespace (the admin endpoint listens on the node's loopback only).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;

use crate::netns::Netns;

/// Sends `method path` to `addr` from inside `ns`; returns (status, body).
pub fn request(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    raw_request(ns, addr, req.into_bytes())
}

/// Sends `req` as it is (e.g. a head announcing a body it never sends); returns (status,
/// body) of the answer.
pub fn raw_request(ns: &Netns, addr: SocketAddr, req: Vec<u8>) -> anyhow::Result<(u16, String)> {
    let raw = ns.run(move || -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, crate::scaled(Duration::from_secs(5)))?;
        s.set_read_timeout(Some(crate::scaled(Duration::from_secs(10))))?;
        s.write_all(&req)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

pub fn get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    request(ns, addr, "GET", path)
}

pub const ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);
