//! HTTP/2 PINGs on HBONE connections (both ends), as Istio's ztunnel sends them: a peer
//! whose node died, or whose network path did, stops answering, and its connection is
//! closed (a pooled one evicted) within `interval + timeout` instead of when TCP gives up
//! retransmitting, many minutes later.

use std::time::Duration;

/// How often to PING, and how long an answer may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// Istio's ztunnel's: every 10 s, 20 s to answer.
    fn default() -> Self {
        Keepalive {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

/// PINGs every `k.interval` for as long as they are answered; returns why not once one
/// is not (no answer within `k.timeout`, or the connection failed). Runs beside whatever
/// drives the connection (the PONG arrives through it), which should end when this does.
pub async fn unanswered(mut ping_pong: h2::PingPong, k: Keepalive) -> String {
    loop {
        tokio::time::sleep(k.interval).await;
        match tokio::time::timeout(k.timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("HTTP/2 PING failed: {e}"),
            Err(_) => {
                crate::limits::hit(
                    "hbone_keepalive_timeout",
                    format_args!(
                        "an HBONE peer left a PING unanswered for {:?}: connection closed",
                        k.timeout
                    ),
                );
                return format!("no answer to an HTTP/2 PING within {:?}", k.timeout);
            }
        }
    }
}
