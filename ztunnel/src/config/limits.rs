//! The limits on what peers can make a ztunnel or its control plane hold (issue 30): one
//! flag and environment variable each, with defaults a node of 1,000 pods (and a control
//! plane of a few thousand nodes) does not reach. Hitting one is logged and counted
//! (`ztunnel_limit_hits_total{limit=...}`, see [`crate::limits`]); the README's "Limits"
//! table lists them.

use std::time::Duration;

use clap::Parser;

use super::parse_duration;

/// `ztunnel controlplane`'s listener (15012: the CA and xDS).
#[derive(clap::Args, Debug, Clone)]
pub struct ControlplaneLimits {
    /// Connections open at once (TLS handshakes in progress included); more are closed as
    /// soon as accepted. A node proxy holds one or two.
    #[arg(long, env = "CONTROLPLANE_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// HTTP/2 streams (calls) at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS);
    /// a client past it waits for a stream to end.
    #[arg(
        long,
        env = "CONTROLPLANE_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 128
    )]
    pub max_streams_per_connection: u32,

    /// Time a client gets to complete the TLS handshake.
    #[arg(long, env = "CONTROLPLANE_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,

    /// Time a call gets from its headers to its answer (a certificate request's whole body
    /// included; an xDS stream only until it is opened).
    #[arg(long, env = "CONTROLPLANE_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// HTTP/2 PING interval on every connection; a connection whose PING is not answered
    /// within --keepalive-timeout is closed.
    #[arg(long, env = "CONTROLPLANE_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// Time a PING may go unanswered before the connection is closed.
    #[arg(long, env = "CONTROLPLANE_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// Largest CreateCertificate request (a CSR is about 1 KiB).
    #[arg(long, env = "CONTROLPLANE_MAX_CSR_BYTES", default_value_t = 64 * 1024)]
    pub max_csr_bytes: usize,

    /// Largest xDS request message (its initial_resource_versions is the large part: about
    /// 100 bytes per resource the client holds).
    #[arg(long, env = "CONTROLPLANE_MAX_XDS_REQUEST_BYTES", default_value_t = 8 << 20)]
    pub max_xds_request_bytes: usize,

    /// xDS streams one bearer token may hold open at once (a node proxy holds one).
    #[arg(
        long,
        env = "CONTROLPLANE_MAX_XDS_STREAMS_PER_TOKEN",
        default_value_t = 8
    )]
    pub max_xds_streams_per_token: usize,

    /// Entries of initial_resource_versions one xDS request may carry; a request with
    /// more ends its stream. Names the server does not serve are answered as removed once
    /// and never stored.
    #[arg(
        long,
        env = "CONTROLPLANE_MAX_INITIAL_RESOURCES",
        default_value_t = 100_000
    )]
    pub max_initial_resources: usize,

    /// Streams a client may reset before the server accepts them, per connection, after
    /// which the connection is closed (HTTP/2 rapid reset).
    #[arg(long, env = "CONTROLPLANE_MAX_PENDING_RESETS", default_value_t = 20)]
    pub max_pending_resets: usize,

    /// Largest header block of a call (h2 would take 16 MiB).
    #[arg(long, env = "CONTROLPLANE_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: u32,

    /// Streams the server may reset for a client's errors, per connection, before closing it.
    #[arg(long, env = "CONTROLPLANE_MAX_LOCAL_RESETS", default_value_t = 1024)]
    pub max_local_resets: usize,
}

/// The admin (127.0.0.1:15000), metrics (15020) and readiness (15021) listeners; each has
/// these limits of its own.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpLimits {
    /// Connections open at once per listener; more are closed as soon as accepted. A
    /// scraper and the kubelet's probes hold a few.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 256)]
    pub http_max_connections: usize,

    /// Time a client gets to send a request's headers, and to send the next one on a
    /// kept-alive connection (so also the idle timeout); and to send its body.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Read buffer per connection, the largest request head accepted (8 KiB or more).
    #[arg(long, env = "HTTP_MAX_BUFFER_BYTES", default_value_t = 16 * 1024)]
    pub http_max_buffer_bytes: usize,
}

/// The HBONE listener (15008) and the pooled HBONE connections to other nodes.
#[derive(clap::Args, Debug, Clone)]
pub struct HboneLimits {
    /// Inbound HBONE connections whose TLS handshake is in progress, in all; more are
    /// closed as soon as accepted.
    #[arg(long, env = "HBONE_MAX_PENDING_HANDSHAKES", default_value_t = 1024)]
    pub hbone_max_pending_handshakes: usize,

    /// The same, per client address.
    #[arg(
        long,
        env = "HBONE_MAX_PENDING_HANDSHAKES_PER_SOURCE",
        default_value_t = 128
    )]
    pub hbone_max_pending_handshakes_per_source: usize,

    /// Streams (tunnelled connections) at once on one inbound HBONE connection; the
    /// client opens another connection past it (ztunnel's pool opens one at 100).
    #[arg(long, env = "HBONE_MAX_STREAMS_PER_CONNECTION", default_value_t = 1000)]
    pub hbone_max_streams_per_connection: u32,

    /// Established (authenticated) inbound HBONE connections at once; one more is closed
    /// right after its handshake. Each may hold a 256 KiB read buffer and, in data its
    /// streams have not delivered yet, up to the HTTP/2 connection window (16 MiB).
    #[arg(long, env = "HBONE_MAX_CONNECTIONS", default_value_t = 16384)]
    pub hbone_max_connections: usize,

    /// Of those, from one client address with one identity (a peer node's pool opens one
    /// connection per source identity and destination pod, another per 100 streams).
    #[arg(long, env = "HBONE_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 512)]
    pub hbone_max_connections_per_source: usize,

    /// Streams a peer may reset before ztunnel accepts them, per inbound HBONE connection,
    /// after which the connection is closed with GOAWAY (HTTP/2 rapid reset); counted as
    /// `ztunnel_limit_hits_total{limit="hbone_resets"}`.
    #[arg(long, env = "HBONE_MAX_PENDING_RESETS", default_value_t = 20)]
    pub hbone_max_pending_resets: usize,

    /// Streams ztunnel may reset for a peer's errors, per inbound HBONE connection, before
    /// closing it with GOAWAY (counted like the above).
    #[arg(long, env = "HBONE_MAX_LOCAL_RESETS", default_value_t = 1024)]
    pub hbone_max_local_resets: usize,

    /// Time an inbound stream's dial to the destination pod may take before the stream is
    /// refused (503).
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub upstream_connect_timeout: Duration,

    /// HTTP/2 PING interval on HBONE connections, both ways (Istio's ztunnel: 10 s).
    #[arg(long, env = "HBONE_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub hbone_keepalive_interval: Duration,

    /// A connection whose PING is not answered within this is closed, and a pooled one
    /// evicted (Istio's ztunnel: 20 s).
    #[arg(long, env = "HBONE_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub hbone_keepalive_timeout: Duration,

    /// TCP keepalive idle time on HBONE connections (Istio's ztunnel: 180 s).
    #[arg(long, env = "HBONE_TCP_KEEPALIVE", default_value = "180s", value_parser = parse_duration)]
    pub hbone_tcp_keepalive: Duration,

    /// Time between TCP keepalive probes on HBONE connections (Istio's
    /// `KEEPALIVE_INTERVAL`; 180 s either way).
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "180s", value_parser = parse_duration)]
    pub hbone_tcp_keepalive_interval: Duration,

    /// Unanswered probes before the connection is dropped (Istio's `KEEPALIVE_RETRIES`).
    #[arg(long, env = "KEEPALIVE_RETRIES", default_value_t = 9)]
    pub hbone_tcp_keepalive_retries: u32,

    /// Also give up on data unacknowledged for the keepalive's whole span (idle + interval
    /// x retries), with TCP_USER_TIMEOUT (Istio's `USER_TIMEOUT_ENABLED`).
    #[arg(long, env = "USER_TIMEOUT_ENABLED", default_value_t = false, action = clap::ArgAction::Set)]
    pub hbone_tcp_user_timeout: bool,

    /// HTTP/2 flow-control window of each HBONE stream, in bytes (Istio's ztunnel: 4 MiB).
    #[arg(long, env = "HTTP2_STREAM_WINDOW_SIZE", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u32).range(65535..=2147483647))]
    pub http2_stream_window_size: u32,

    /// HTTP/2 flow-control window of each HBONE connection, in bytes (16 MiB either way).
    #[arg(long, env = "HTTP2_CONNECTION_WINDOW_SIZE", default_value_t = 16 * 1024 * 1024, value_parser = clap::value_parser!(u32).range(65535..=2147483647))]
    pub http2_connection_window_size: u32,

    /// Largest HTTP/2 frame accepted on HBONE, in bytes (Istio's ztunnel: 1 MiB).
    #[arg(long, env = "HTTP2_FRAME_SIZE", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u32).range(16384..=16777215))]
    pub http2_frame_size: u32,
}

#[derive(Parser)]
struct CpDefaults {
    #[command(flatten)]
    l: ControlplaneLimits,
}

#[derive(Parser)]
struct HttpDefaults {
    #[command(flatten)]
    l: HttpLimits,
}

#[derive(Parser)]
struct HboneDefaults {
    #[command(flatten)]
    l: HboneLimits,
}

// The defaults are the flags' defaults (one place), as tests and embedders use them.
impl Default for ControlplaneLimits {
    fn default() -> Self {
        CpDefaults::parse_from(["defaults"]).l
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpDefaults::parse_from(["defaults"]).l
    }
}

impl Default for HboneLimits {
    fn default() -> Self {
        HboneDefaults::parse_from(["defaults"]).l
    }
}
