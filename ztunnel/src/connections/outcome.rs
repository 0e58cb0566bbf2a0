//! How a connection attempt ended, typed: the access log's `outcome` and `reason`, the
//! `response_flags` of Istio's metrics, and ztunnel's own attempt counter come from here.

use std::fmt;

/// How a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Proxied until both sides were done.
    Ok,
    /// Refused before any byte was proxied (policy, no certificate, no endpoint, …).
    Denied(Reason),
    /// Something on the way failed (dial, handshake, tunnel).
    Failed(Reason),
    /// Closed while live, by ztunnel (a policy or membership change).
    Closed(Reason),
    /// The handler ended without saying why (a drain timeout, a panic).
    Aborted,
}

impl Outcome {
    /// `ok`, `denied`, `failed`, `closed`, `aborted`.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied(_) => "denied",
            Outcome::Failed(_) => "failed",
            Outcome::Closed(_) => "closed",
            Outcome::Aborted => "aborted",
        }
    }

    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Outcome::Denied(r) | Outcome::Failed(r) | Outcome::Closed(r) => Some(r),
            Outcome::Ok | Outcome::Aborted => None,
        }
    }

    /// Istio's `response_flags`: `DENY` for authorization (a skipped waypoint too), `CONNECT` when the upstream
    /// connection could not be made, `-` otherwise.
    pub fn response_flags(&self) -> &'static str {
        match self.reason() {
            Some(Reason::PolicyDenied(_))
            | Some(Reason::PolicyChanged(_))
            | Some(Reason::BypassedWaypoint(_))
            | Some(Reason::UntrustedSource(_)) => "DENY",
            Some(Reason::UpstreamConnect(_)) | Some(Reason::TunnelConnect(_)) => "CONNECT",
            _ => "-",
        }
    }
}

/// Why an attempt did not end `ok`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("no original destination: {0}")]
    NoOriginalDestination(String),
    #[error("destination is ztunnel's own listener")]
    OwnListener,
    #[error("no endpoint: {0}")]
    NoEndpoint(String),
    #[error("no waypoint: {0}")]
    NoWaypoint(String),
    #[error("not from the destination's waypoint {0}: it accepts mesh traffic only through it")]
    BypassedWaypoint(String),
    #[error("{0} is no mesh workload of this node")]
    NotLocalWorkload(String),
    /// An enrolled pod's connection whose workload record did not arrive in time: it is
    /// refused, never passed in plaintext.
    #[error("no mesh workload of this node has the source address {0}")]
    UnknownSourceWorkload(String),
    /// An HBONE stream naming a source its client may not speak for.
    #[error("untrusted source: {0}")]
    UntrustedSource(crate::proxy::source::Untrusted),
    #[error("no certificate for {identity}: {error}")]
    NoCertificate { identity: String, error: String },
    #[error("denied by policy: {0}")]
    PolicyDenied(String),
    #[error("policy changed: {0}")]
    PolicyChanged(String),
    #[error("workload left the mesh: {0}")]
    WorkloadLeft(String),
    #[error("mTLS handshake: {0}")]
    Handshake(String),
    #[error("CONNECT to {0}, not an address of the dialed pod")]
    WrongTarget(String),
    #[error("client failed before tunnelling: {0}")]
    Client(String),
    #[error("HBONE connect failed: {0}")]
    TunnelConnect(String),
    #[error("upstream connect failed: {0}")]
    UpstreamConnect(String),
    #[error("relay: {0}")]
    Relay(String),
}

impl Reason {
    /// A short stable name, the `reason` label of `ztunnel_connections`.
    pub fn name(&self) -> &'static str {
        match self {
            Reason::NoOriginalDestination(_) => "no_original_destination",
            Reason::OwnListener => "own_listener",
            Reason::NoEndpoint(_) => "no_endpoint",
            Reason::NoWaypoint(_) => "no_waypoint",
            Reason::BypassedWaypoint(_) => "bypassed_waypoint",
            Reason::NotLocalWorkload(_) => "not_local_workload",
            Reason::UnknownSourceWorkload(_) => "unknown_source_workload",
            Reason::UntrustedSource(u) => u.name(),
            Reason::NoCertificate { .. } => "no_certificate",
            Reason::PolicyDenied(_) => "policy_denied",
            Reason::PolicyChanged(_) => "policy_changed",
            Reason::WorkloadLeft(_) => "workload_left",
            Reason::Handshake(_) => "handshake",
            Reason::WrongTarget(_) => "wrong_target",
            Reason::Client(_) => "client",
            Reason::TunnelConnect(_) => "tunnel_connect",
            Reason::UpstreamConnect(_) => "upstream_connect",
            Reason::Relay(_) => "relay",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason() {
            Some(r) => write!(f, "{}: {r}", self.name()),
            None => f.write_str(self.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_istio() {
        let deny = Outcome::Denied(Reason::PolicyDenied("no ALLOW matched".into()));
        assert_eq!(deny.response_flags(), "DENY");
        assert_eq!(
            deny.to_string(),
            "denied: denied by policy: no ALLOW matched"
        );
        let closed = Outcome::Closed(Reason::PolicyChanged("DENY rule".into()));
        assert_eq!(closed.response_flags(), "DENY");
        let failed = Outcome::Failed(Reason::UpstreamConnect("refused".into()));
        assert_eq!(failed.response_flags(), "CONNECT");
        assert_eq!(failed.reason().unwrap().name(), "upstream_connect");
        assert_eq!(
            Outcome::Failed(Reason::TunnelConnect("503".into())).response_flags(),
            "CONNECT"
        );
        assert_eq!(Outcome::Ok.response_flags(), "-");
        assert_eq!(Outcome::Aborted.response_flags(), "-");
        assert_eq!(
            Outcome::Failed(Reason::Relay("reset".into())).response_flags(),
            "-"
        );
    }
}
