//! The access log's two events, under Istio ztunnel's target (`access`), messages, levels
//! and field names, so log pipelines built for it read ours:
//!
//! - `connection opened` (debug) when both ends are known;
//! - `connection complete` when the attempt ends: info if it ended well, error (with an
//!   `error` field) otherwise.
//!
//! For HBONE, `dst.addr` is the tunnel's address (`<ip>:15008`) and `dst.hbone_addr`
//! the CONNECT's; our `dst.target` is the endpoint (or waypoint) chosen. Fields upstream
//! leaves out when unknown are left out here too (no `-` placeholders);
//! strings are recorded as strings (quoted in text lines), addresses with `Display`.
//! `bytes_sent`/`bytes_recv` are the reporting side's workload's: on outbound what the
//! client sent and got, on inbound what the destination sent and got, as upstream logs
//! them. Ours come after upstream's: `dst.target`, `protocol`, `outcome`, `reason`,
//! `response_flags`.

use tracing::{event, Level};

use super::{ConnectionInfo, Direction, Outcome, Reason};
use crate::metrics::{Label, TcpLabels};

/// What both events log about the two ends.
pub(super) struct Ends<'a> {
    info: &'a ConnectionInfo,
    labels: &'a TcpLabels,
}

impl<'a> Ends<'a> {
    pub(super) fn new(info: &'a ConnectionInfo, labels: &'a TcpLabels) -> Self {
        Ends { info, labels }
    }

    fn direction(&self) -> &'static str {
        match self.info.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    fn mtls(&self) -> bool {
        self.info.hbone.is_some()
    }

    /// `dst.addr`: for HBONE the tunnel's address (a node's or waypoint's HBONE port),
    /// as upstream logs it; else the destination.
    fn dst_addr(&self) -> tracing::field::DisplayValue<std::net::SocketAddr> {
        tracing::field::display(self.info.hbone.map_or(self.info.dst, |h| h.tunnel))
    }

    /// `dst.hbone_addr`: what the tunnel's CONNECT asked for; HBONE only.
    fn hbone_addr(&self) -> Option<tracing::field::DisplayValue<std::net::SocketAddr>> {
        self.info
            .hbone
            .map(|h| tracing::field::display(h.authority))
    }

    /// Identities come from the mTLS handshake: none on a plaintext connection.
    fn identity(&self, l: &'a Option<Label>) -> Option<&'a str> {
        l.as_deref().map(String::as_str).filter(|_| self.mtls())
    }
}

/// The pod's name: the connection record names a workload `namespace/name` (a namespace
/// holds no `/`), and the namespace has a field of its own.
fn workload(l: &Option<Label>) -> Option<&str> {
    let l = l.as_deref()?;
    Some(l.split_once('/').map_or(l.as_str(), |(_, name)| name))
}

/// A metric label's value, or nothing where the metric says `unknown`.
fn known(l: &Label) -> Option<&str> {
    match l.as_str() {
        "unknown" | "" => None,
        v => Some(v),
    }
}

pub(super) fn opened(e: &Ends<'_>) {
    let (info, labels) = (e.info, e.labels);
    event!(
        target: "access",
        parent: None,
        Level::DEBUG,
        src.addr = %info.src,
        src.workload = workload(&info.src_workload),
        src.namespace = known(&labels.source_workload_namespace),
        src.identity = e.identity(&info.src_identity),
        src.cluster = known(&labels.source_cluster),
        dst.addr = e.dst_addr(),
        dst.hbone_addr = e.hbone_addr(),
        dst.service = known(&labels.destination_service),
        dst.workload = workload(&info.dst_workload),
        dst.namespace = known(&labels.destination_workload_namespace),
        dst.identity = e.identity(&info.dst_identity),
        dst.cluster = known(&labels.destination_cluster),
        direction = e.direction(),
        "connection opened"
    );
}

/// `sent`/`received`: bytes from the client towards the destination, and back.
pub(super) fn complete(e: &Ends<'_>, outcome: &Outcome, sent: u64, received: u64, ms: u128) {
    let (info, labels) = (e.info, e.labels);
    let (bytes_sent, bytes_recv) = match info.direction {
        Direction::Outbound => (sent, received),
        Direction::Inbound => (received, sent),
    };
    let reason = outcome.reason().map(ToString::to_string);
    let reason = reason.as_deref().unwrap_or("-");
    let duration = format!("{ms}ms");
    // One field list, at the level the outcome calls for (tracing's levels are static).
    macro_rules! complete {
        ($level:expr, $($error:tt)*) => {
            event!(
                target: "access",
                parent: None,
                $level,
                src.addr = %info.src,
                src.workload = workload(&info.src_workload),
                src.namespace = known(&labels.source_workload_namespace),
                src.identity = e.identity(&info.src_identity),
                src.cluster = known(&labels.source_cluster),
                dst.addr = e.dst_addr(),
                dst.hbone_addr = e.hbone_addr(),
                dst.service = known(&labels.destination_service),
                dst.workload = workload(&info.dst_workload),
                dst.namespace = known(&labels.destination_workload_namespace),
                dst.identity = e.identity(&info.dst_identity),
                dst.cluster = known(&labels.destination_cluster),
                direction = e.direction(),
                bytes_sent,
                bytes_recv,
                duration,
                $($error)*
                dst.target = %info.target,
                protocol = info.protocol,
                outcome = outcome.name(),
                reason = %reason,
                response_flags = outcome.response_flags(),
                "connection complete"
            )
        };
    }
    match outcome {
        Outcome::Ok => complete!(Level::INFO,),
        _ => {
            let error = outcome
                .reason()
                .map_or_else(|| outcome.to_string(), Reason::to_string);
            complete!(Level::ERROR, error,)
        }
    }
}
