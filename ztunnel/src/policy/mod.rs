//! L4 authorization (Istio `AuthorizationPolicy` as ztunnel enforces it): which source may
//! open a connection to which destination workload and port.
//!
//! Decision order, per Istio: any matching DENY policy denies; otherwise, if any ALLOW
//! policy applies to the destination workload, the connection must match one of them;
//! with no applicable ALLOW policy it is allowed.

mod authorization;
mod store;

use std::fmt;
use std::net::IpAddr;

use tracing::debug;

pub use authorization::{
    Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};
pub use store::{PolicyStore, DEFAULT_ROOT_NAMESPACE};

use crate::identity::Identity;
use crate::state::Workload;

/// What the policy check knows about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The client's verified SPIFFE identity; `None` for plaintext sources.
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

impl Connection {
    pub fn new(
        src_identity: Option<Identity>,
        src_ip: IpAddr,
        dst_ip: IpAddr,
        dst_port: u16,
    ) -> Self {
        // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; CIDRs are written in
        // plain IPv4, so compare in canonical form.
        Connection {
            src_identity,
            src_ip: src_ip.to_canonical(),
            dst_ip: dst_ip.to_canonical(),
            dst_port,
        }
    }
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.src_identity {
            Some(id) => write!(f, "{}({id})", self.src_ip)?,
            None => write!(f, "{}(no identity)", self.src_ip)?,
        }
        write!(f, " -> {}:{}", self.dst_ip, self.dst_port)
    }
}

/// Why a connection was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// No policy applies to the destination.
    NoPolicies,
    /// Only DENY policies apply and none matched.
    NoDenyMatched,
    AllowMatched,
    DenyMatched,
    /// ALLOW policies apply but none matched.
    NoAllowMatched,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// Key (`namespace/name`) of the policy that decided, for logs and metrics.
    pub policy: Option<String>,
}

impl Decision {
    fn new(allowed: bool, reason: Reason, policy: Option<&Authorization>) -> Self {
        Decision {
            allowed,
            reason,
            policy: policy.map(Authorization::key),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allow" } else { "deny" };
        match &self.policy {
            Some(p) => write!(f, "{verdict} ({:?}, policy {p})", self.reason),
            None => write!(f, "{verdict} ({:?})", self.reason),
        }
    }
}

/// Whether decisions are logged at info level (Istio's `AUTHZ_POLICY_INFO_LOGGING`), not
/// only at debug.
static INFO_LOGGING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_info_logging(on: bool) {
    INFO_LOGGING.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn log_decision(conn: &Connection, dst: &Workload, d: &Decision) {
    if INFO_LOGGING.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(%conn, workload = %dst, decision = %d, "authorization");
    } else {
        debug!(%conn, workload = %dst, decision = %d, "authorization");
    }
}

impl PolicyStore {
    /// Decides whether `conn` may reach `dst` (the workload owning `conn.dst_ip`).
    pub fn evaluate(&self, conn: &Connection, dst: &Workload) -> Decision {
        let mut allows = Vec::new();
        let mut has_deny = false;
        for policy in self.applicable(dst) {
            let matched = policy.matches(conn);
            if policy.dry_run {
                debug!(policy = %policy.key(), action = ?policy.action, matched, %conn, "dry-run policy, not enforced");
                continue;
            }
            match policy.action {
                Action::Deny if matched => {
                    let d = Decision::new(false, Reason::DenyMatched, Some(policy));
                    log_decision(conn, dst, &d);
                    return d;
                }
                Action::Deny => has_deny = true,
                Action::Allow => allows.push((policy, matched)),
            }
        }
        let d = if let Some((p, _)) = allows.iter().find(|(_, m)| *m) {
            Decision::new(true, Reason::AllowMatched, Some(p))
        } else if !allows.is_empty() {
            Decision::new(false, Reason::NoAllowMatched, None)
        } else if has_deny {
            Decision::new(true, Reason::NoDenyMatched, None)
        } else {
            Decision::new(true, Reason::NoPolicies, None)
        };
        log_decision(conn, dst, &d);
        d
    }
}

#[cfg(test)]
mod tests;
