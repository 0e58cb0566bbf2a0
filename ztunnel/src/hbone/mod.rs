//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` streams over mesh mTLS (port 15008).
//!
//! One HTTP/2 connection between two workloads' identities carries many tunnelled TCP
//! connections, one stream each. `:authority` is the original destination `ip:port`; the
//! source address travels in `forwarded: for=<ip>`, tracing context in `baggage`/`traceparent`.
//! Our one extension, `ztunnel-source-port`, carries the client's port (see [`source_port`]).

/// The port HBONE is served on (Istio's, for ztunnels and waypoints alike).
pub const HBONE_PORT: u16 = 15008;

pub mod client;
pub mod copy;
pub mod keepalive;
pub mod server;
pub mod stream;

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};

pub use client::{
    connect_stream, connect_stream_with_data, handshake, handshake_with, ConnectRequest,
};
pub use copy::{copy_bidirectional, relay_tunnel};
pub use keepalive::Keepalive;
pub use server::{
    serve_connection, serve_connection_until, serve_connection_with, InboundRequest, ServerOptions,
};
pub use stream::H2Stream;

// Flow-control windows. HTTP/2's 64 KiB default caps a stream at 64 KiB per round trip,
// far below what a single TCP connection carries between nodes. Each stream may have
// 1 MiB in flight, so one stream can fill a fast link; the connection may have 16 MiB so
// that several busy streams (or one stalled reader, which holds at most its stream
// window) never starve the others sharing the connection.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Larger DATA frames than the 16 KiB default: fewer frame headers and wakeups per byte.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

/// HBONE's HTTP/2 sizes: the constants above unless the settings (Istio's
/// `HTTP2_STREAM_WINDOW_SIZE`, `HTTP2_CONNECTION_WINDOW_SIZE`, `HTTP2_FRAME_SIZE`) say
/// otherwise. Set once at start, before any connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Sizes {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame: u32,
}

static SIZES: std::sync::OnceLock<H2Sizes> = std::sync::OnceLock::new();

pub fn set_sizes(sizes: H2Sizes) {
    if SIZES.set(sizes).is_err() {
        tracing::debug!("HTTP/2 sizes were already set");
    }
}

fn sizes() -> H2Sizes {
    SIZES.get().copied().unwrap_or(H2Sizes {
        stream_window: STREAM_WINDOW,
        connection_window: CONNECTION_WINDOW,
        max_frame: MAX_FRAME_SIZE,
    })
}
/// Streams a server accepts at once on one connection; the pool opens more connections
/// well before this.
pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Largest request header block the server decodes. A CONNECT carries a handful of short
/// headers (baggage, the largest, is capped at 8 KiB by W3C); h2's default of 16 MiB would
/// let each peer connection make the server buffer that much.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

pub const HEADER_FORWARDED: &str = "forwarded";
pub const HEADER_BAGGAGE: &str = "baggage";
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// The client's TCP port, so that the destination node dials the pod from the client's
/// own address *and port*: its connection then takes the 4-tuple the client's kernel
/// already chose, instead of an ephemeral port searched for in the node's range (where the
/// TIME_WAITs of a busy client pile up). An extension: Istio's ztunnel neither sends nor
/// reads it, and without it the destination picks a port as before.
pub const HEADER_SOURCE_PORT: &str = "ztunnel-source-port";

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("HBONE peer answered CONNECT with {0}")]
    Status(http::StatusCode),
    #[error("bad CONNECT authority {0:?}")]
    BadAuthority(String),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// `:authority` for a destination: `ip:port`, IPv6 in brackets (what `SocketAddr` prints).
pub fn authority(dst: SocketAddr) -> String {
    dst.to_string()
}

/// Parses `ip:port` / `[ipv6]:port`. Host names are refused: HBONE targets are addresses.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, HboneError> {
    authority
        .parse()
        .map_err(|_| HboneError::BadAuthority(authority.to_string()))
}

/// The source IP from `forwarded: for=<ip>` (RFC 7239; IPv6 may be quoted and bracketed).
pub fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let value = headers.get(HEADER_FORWARDED)?.to_str().ok()?;
    value.split([';', ',']).find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        let v = v
            .strip_prefix('[')
            .map(|s| s.split(']').next().unwrap_or(s))
            .unwrap_or(v);
        v.parse().ok()
    })
}

/// The client's port from `ztunnel-source-port`, when sent and valid (0 is not a port).
pub fn source_port(headers: &HeaderMap) -> Option<u16> {
    let port: u16 = headers
        .get(HEADER_SOURCE_PORT)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    (port != 0).then_some(port)
}

/// The `forwarded` header value for a source IP.
pub fn forwarded_value(src: IpAddr) -> HeaderValue {
    let s = match src {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    };
    HeaderValue::from_str(&s).expect("IP addresses are valid header values")
}

fn server_builder(opts: &server::ServerOptions) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    let sz = sizes();
    b.initial_window_size(sz.stream_window)
        .initial_connection_window_size(sz.connection_window)
        .max_frame_size(sz.max_frame)
        .max_concurrent_streams(opts.max_streams)
        // Rapid reset: a client resetting streams before they are accepted, or making
        // the server reset them, past these counts gets GOAWAY.
        .max_pending_accept_reset_streams(opts.max_pending_resets)
        .max_local_error_reset_streams(Some(opts.max_local_resets))
        .max_header_list_size(MAX_HEADER_LIST_SIZE);
    b
}

fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    let sz = sizes();
    b.initial_window_size(sz.stream_window)
        .initial_connection_window_size(sz.connection_window)
        .max_frame_size(sz.max_frame)
        // A peer's response headers are as bounded as its requests are (h2 allows 16 MiB).
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .enable_push(false);
    b
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod bad_input_tests;

#[cfg(test)]
mod limits_tests;

#[cfg(test)]
mod header_tests {
    use super::*;

    #[test]
    fn authority_round_trip() {
        for s in ["10.0.0.1:80", "[fd00::1]:8080"] {
            let a = parse_authority(s).unwrap();
            assert_eq!(authority(a), s);
        }
        assert!(parse_authority("example.com:80").is_err());
        assert!(parse_authority("10.0.0.1").is_err());
    }

    #[test]
    fn forwarded_round_trip() {
        for ip in ["10.1.2.3", "fd00::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut h = HeaderMap::new();
            h.insert(HEADER_FORWARDED, forwarded_value(ip));
            assert_eq!(forwarded_for(&h), Some(ip));
        }
        let mut h = HeaderMap::new();
        h.insert(
            HEADER_FORWARDED,
            HeaderValue::from_static("proto=http;for=192.0.2.60"),
        );
        assert_eq!(forwarded_for(&h), Some("192.0.2.60".parse().unwrap()));
        assert_eq!(forwarded_for(&HeaderMap::new()), None);
    }

    #[test]
    fn source_port_is_a_nonzero_u16() {
        let port = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(HEADER_SOURCE_PORT, HeaderValue::from_str(v).unwrap());
            source_port(&h)
        };
        assert_eq!(port("40123"), Some(40123));
        for bad in ["0", "65536", "-1", "80x", ""] {
            assert_eq!(port(bad), None, "{bad:?}");
        }
        assert_eq!(source_port(&HeaderMap::new()), None);
    }
}
