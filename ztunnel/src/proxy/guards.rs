//! The inbound HBONE listener's limits (`--hbone-*`, see `config::limits`): pending TLS
//! handshakes and established connections, each in all and per client address;
//! per-connection streams, resets and PINGs; the upstream dial's time; TCP keepalive.

use std::net::IpAddr;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use crate::config::HboneLimits;
use crate::hbone::{Keepalive, ServerOptions};
use crate::identity::Identity;
use crate::limits::{Cap, KeyPermit, PerKey};

#[derive(Clone)]
pub struct InboundLimits {
    pending: Cap,
    pending_per_source: PerKey<IpAddr>,
    connections: Cap,
    /// Keyed by the client's address and identity: ztunnel's pools dial from the node's
    /// address, one connection per (source identity, destination pod), so a busy node
    /// legitimately holds many connections from one address.
    connections_per_source: PerKey<(IpAddr, Identity)>,
    pub server: ServerOptions,
    pub upstream_connect_timeout: Duration,
    pub tcp_keepalive: Option<TcpKeepalive>,
}

/// TCP keepalive of HBONE sockets (Istio's `KEEPALIVE_*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub retries: u32,
    /// TCP_USER_TIMEOUT as well: idle + interval x retries.
    pub user_timeout: bool,
}

impl TcpKeepalive {
    /// From the settings; none when the idle time is 0.
    pub fn from_limits(l: &HboneLimits) -> Option<TcpKeepalive> {
        (!l.hbone_tcp_keepalive.is_zero()).then_some(TcpKeepalive {
            idle: l.hbone_tcp_keepalive,
            interval: l.hbone_tcp_keepalive_interval,
            retries: l.hbone_tcp_keepalive_retries,
            user_timeout: l.hbone_tcp_user_timeout,
        })
    }
}

/// A place (a handshake in progress, an established connection), counted until dropped.
pub struct Pending<K: std::hash::Hash + Eq = IpAddr> {
    _all: OwnedSemaphorePermit,
    _source: KeyPermit<K>,
}

impl InboundLimits {
    /// Shared by every data-path thread (clones share the counts).
    pub fn new(l: &HboneLimits) -> Self {
        InboundLimits {
            pending: Cap::new("hbone_pending_handshakes", l.hbone_max_pending_handshakes),
            pending_per_source: PerKey::new(
                "hbone_pending_handshakes_per_source",
                l.hbone_max_pending_handshakes_per_source,
            ),
            connections: Cap::new("hbone_connections", l.hbone_max_connections),
            connections_per_source: PerKey::new(
                "hbone_connections_per_source",
                l.hbone_max_connections_per_source,
            ),
            server: ServerOptions {
                max_streams: l.hbone_max_streams_per_connection,
                max_pending_resets: l.hbone_max_pending_resets,
                max_local_resets: l.hbone_max_local_resets,
                keepalive: keepalive(l),
            },
            upstream_connect_timeout: l.upstream_connect_timeout,
            tcp_keepalive: TcpKeepalive::from_limits(l),
        }
    }

    /// Room for one more handshake from `source`, or `None` (counted, logged).
    pub fn admit(&self, source: IpAddr) -> Option<Pending> {
        let source_permit = self.pending_per_source.admit(source, &source)?;
        let all = self.pending.admit()?;
        Some(Pending {
            _all: all,
            _source: source_permit,
        })
    }

    /// Room for one more established (authenticated) connection from `source` with the
    /// identity `client`, held for the connection's life, or `None` (counted, logged).
    pub fn admit_connection(
        &self,
        source: IpAddr,
        client: &Identity,
    ) -> Option<Pending<(IpAddr, Identity)>> {
        let who = format!("{source} ({client})");
        let source_permit = self
            .connections_per_source
            .admit((source, client.clone()), &who)?;
        let all = self.connections.admit()?;
        Some(Pending {
            _all: all,
            _source: source_permit,
        })
    }
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits::new(&HboneLimits::default())
    }
}

/// The PING settings, none when the interval is 0.
pub fn keepalive(l: &HboneLimits) -> Option<Keepalive> {
    (!l.hbone_keepalive_interval.is_zero()).then_some(Keepalive {
        interval: l.hbone_keepalive_interval,
        timeout: l.hbone_keepalive_timeout,
    })
}

/// TCP keepalive on an HBONE connection's socket, so a peer gone without a word is
/// noticed even where no PING is sent (Istio's ztunnel: 180 s idle).
pub fn set_tcp_keepalive(s: &tokio::net::TcpStream, ka: Option<TcpKeepalive>) {
    let Some(ka) = ka else { return };
    let sock = socket2::SockRef::from(s);
    let opts = socket2::TcpKeepalive::new()
        .with_time(ka.idle)
        .with_interval(ka.interval)
        .with_retries(ka.retries);
    if let Err(e) = sock.set_tcp_keepalive(&opts) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
    if ka.user_timeout {
        let span = ka.idle + ka.interval * ka.retries;
        if let Err(e) = sock.set_tcp_user_timeout(Some(span)) {
            tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_handshakes_are_capped_in_all_and_per_source() {
        let l = InboundLimits::new(&HboneLimits {
            hbone_max_pending_handshakes: 3,
            hbone_max_pending_handshakes_per_source: 2,
            ..HboneLimits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none(), "per source");
        let _b1 = l.admit(b).unwrap();
        assert!(l.admit(c).is_none(), "in all");
        drop(a1);
        assert!(l.admit(c).is_some(), "a finished handshake frees its place");
    }

    #[test]
    fn established_connections_are_capped_in_all_and_per_source() {
        let l = InboundLimits::new(&HboneLimits {
            hbone_max_connections: 3,
            hbone_max_connections_per_source: 2,
            ..HboneLimits::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let id = crate::tls::tests::id("client");
        let other = crate::tls::tests::id("other");
        let before = crate::limits::hits("hbone_connections_per_source");
        let a1 = l.admit_connection(a, &id).unwrap();
        let _a2 = l.admit_connection(a, &id).unwrap();
        assert!(
            l.admit_connection(a, &id).is_none(),
            "per source and identity"
        );
        assert!(crate::limits::hits("hbone_connections_per_source") > before);
        let _b1 = l.admit_connection(a, &other).unwrap();
        assert!(l.admit_connection(b, &id).is_none(), "in all");
        assert!(l.admit(c).is_some(), "handshakes are counted apart");
        drop(a1);
        assert!(
            l.admit_connection(c, &id).is_some(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn zero_turns_pings_and_tcp_keepalive_off() {
        let l = InboundLimits::new(&HboneLimits {
            hbone_keepalive_interval: Duration::ZERO,
            hbone_tcp_keepalive: Duration::ZERO,
            ..HboneLimits::default()
        });
        assert_eq!(l.server.keepalive, None);
        assert_eq!(l.tcp_keepalive, None);
        let d = InboundLimits::default();
        assert_eq!(d.server.keepalive, Some(Keepalive::default()));
        let ka = d.tcp_keepalive.unwrap();
        assert_eq!(
            (ka.idle, ka.interval, ka.retries),
            (Duration::from_secs(180), Duration::from_secs(180), 9)
        );
        assert!(!ka.user_timeout);
    }
}
