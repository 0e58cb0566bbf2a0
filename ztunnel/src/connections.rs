//! Every connection attempt, from accept to its end ([`ConnectionResult`]): what
//! `/debug/connections` shows while it lives, the one access-log line and the metrics
//! (`istio_tcp_*`, `ztunnel_connections`) when it ends — refused and failed attempts too —
//! and the live set that policy and membership changes are enforced on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tracing::info;

use crate::metrics::{AttemptLabels, Label, Metrics, TcpLabels, KNOWN};

mod access_log;
mod outcome;

#[cfg(test)]
mod access_log_tests;

pub use outcome::{Outcome, Reason};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// Who and where, fixed when the connection is identified.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionInfo {
    pub direction: Direction,
    pub src: SocketAddr,
    /// The original destination (a pod or a service VIP).
    pub dst: SocketAddr,
    /// Where it is actually sent (the chosen endpoint).
    pub target: SocketAddr,
    pub src_workload: Option<Label>,
    pub src_identity: Option<Label>,
    pub dst_workload: Option<Label>,
    pub dst_identity: Option<Label>,
    /// `HBONE` or `TCP` (plaintext).
    pub protocol: &'static str,
    /// For HBONE, the tunnel's address and the CONNECT's (the access log's `dst.addr`
    /// and `dst.hbone_addr`, as upstream logs them).
    #[serde(skip)]
    pub hbone: Option<Hbone>,
}

/// Where an HBONE connection's tunnel goes, and what it asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hbone {
    /// The tunnel's own address: the peer's (or waypoint's) HBONE port.
    pub tunnel: SocketAddr,
    /// The CONNECT's `:authority`.
    pub authority: SocketAddr,
}

impl ConnectionInfo {
    /// What is known of an attempt refused before both ends were identified.
    fn unknown(direction: Direction, src: SocketAddr, dst: Option<SocketAddr>) -> Self {
        let dst = dst.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        ConnectionInfo {
            direction,
            src,
            dst,
            target: dst,
            src_workload: None,
            src_identity: None,
            dst_workload: None,
            dst_identity: None,
            protocol: "TCP",
            hbone: None,
        }
    }
}

#[derive(Serialize)]
pub struct ConnectionView {
    pub id: u64,
    #[serde(flatten)]
    pub info: ConnectionInfo,
    /// Bytes from the client towards the destination.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub age_ms: u128,
}

/// A registered connection: what `/debug/connections` shows and live enforcement checks.
struct Live {
    info: ConnectionInfo,
    started: Instant,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    /// What authorized it, re-checked when policies or workloads change.
    authz: Option<Authz>,
    /// Set once to close the connection, with why.
    close: watch::Sender<Option<Reason>>,
}

/// What a connection was authorized as: re-evaluated against every new state.
#[derive(Clone, Debug)]
pub struct Authz {
    pub conn: crate::policy::Connection,
    /// The destination workload the policies were evaluated on.
    pub workload_uid: String,
}

pub struct ConnectionTracker {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Live>>>,
    /// Accepted sockets whose handler still runs: also those not registered yet (in
    /// their handshake, policy check or upstream dial), which a drain must wait for too.
    handling: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

/// Held by a connection handler from accept to its end.
pub struct Handling(Arc<AtomicU64>);

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionTracker {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnectionTracker {
            next: AtomicU64::new(1),
            live: Mutex::default(),
            handling: Arc::default(),
            metrics,
        })
    }

    /// Starts the record of one attempt, at accept. It is finished exactly once: by
    /// [`ConnectionResult::finish`], or as `aborted` when dropped unfinished.
    pub fn accept(
        self: &Arc<Self>,
        direction: Direction,
        src: SocketAddr,
        dst: Option<SocketAddr>,
    ) -> ConnectionResult {
        ConnectionResult {
            tracker: self.clone(),
            started: Instant::now(),
            direction,
            src,
            dst,
            registered: None,
            finished: false,
        }
    }

    pub fn list(&self) -> Vec<ConnectionView> {
        self.live
            .lock()
            .unwrap()
            .iter()
            .map(|(id, l)| ConnectionView {
                id: *id,
                info: l.info.clone(),
                bytes_sent: l.sent.load(Ordering::Relaxed),
                bytes_received: l.received.load(Ordering::Relaxed),
                age_ms: l.started.elapsed().as_millis(),
            })
            .collect()
    }

    pub fn count(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    /// Marks an accepted socket as being handled until the returned value is dropped.
    pub fn handling(&self) -> Handling {
        self.handling.fetch_add(1, Ordering::AcqRel);
        Handling(self.handling.clone())
    }

    /// Accepted sockets still being handled (registered or not).
    pub fn in_flight(&self) -> u64 {
        self.handling.load(Ordering::Acquire)
    }

    /// Closes every live connection that `state` no longer allows: its destination
    /// workload left the mesh, has a waypoint of its own the connection did not come
    /// through, or its policies now deny it. Returns how many.
    pub fn enforce(&self, state: &crate::state::ProxyState) -> usize {
        let live: Vec<Arc<Live>> = self.live.lock().unwrap().values().cloned().collect();
        let mut closed = 0;
        for l in live {
            let Some(authz) = &l.authz else { continue };
            if l.close.borrow().is_some() {
                continue;
            }
            let why = match state.workload_by_uid(&authz.workload_uid) {
                Some(w) if w.in_mesh() || authz.conn.src_identity.is_none() => {
                    let src = authz.conn.src_identity.as_ref();
                    if let Some(gw) = state.skipped_waypoint(&w, src) {
                        // A waypoint given to the workload since: what skipped it ends.
                        Some(Reason::BypassedWaypoint(gw.to_string()))
                    } else {
                        let d = state.policies.evaluate(&authz.conn, &w);
                        (!d.allowed).then(|| Reason::PolicyChanged(d.to_string()))
                    }
                }
                _ => Some(Reason::WorkloadLeft(authz.workload_uid.clone())),
            };
            if let Some(why) = why {
                info!(conn = %authz.conn, workload = %authz.workload_uid, "closing a live connection: {why}");
                let _ = l.close.send(Some(why));
                closed += 1;
            }
        }
        closed
    }
}

/// One connection attempt, from accept to its end: identified once the proxy knows both
/// ends, then counted, closable and finished with a typed [`Outcome`].
pub struct ConnectionResult {
    tracker: Arc<ConnectionTracker>,
    started: Instant,
    direction: Direction,
    src: SocketAddr,
    dst: Option<SocketAddr>,
    registered: Option<Registered>,
    finished: bool,
}

struct Registered {
    id: u64,
    live: Arc<Live>,
    labels: TcpLabels,
    closed: watch::Receiver<Option<Reason>>,
}

impl ConnectionResult {
    /// Both ends are known: the connection is registered (`/debug/connections`, live
    /// enforcement when `authz` is given) and counted as opened.
    pub fn identify(&mut self, info: ConnectionInfo, labels: TcpLabels, authz: Option<Authz>) {
        if self.registered.is_some() {
            return;
        }
        let t = &self.tracker;
        let id = t.next.fetch_add(1, Ordering::Relaxed);
        t.metrics.tcp_opened.get_or_create(&labels).inc();
        access_log::opened(&access_log::Ends::new(&info, &labels));
        let (close, closed) = watch::channel(None);
        let live = Arc::new(Live {
            info,
            started: self.started,
            sent: Arc::default(),
            received: Arc::default(),
            authz,
            close,
        });
        t.live.lock().unwrap().insert(id, live.clone());
        self.registered = Some(Registered {
            id,
            live,
            labels,
            closed,
        });
    }

    /// Counts bytes read from `s` as sent (client → destination) and bytes written to it
    /// as received.
    pub fn count<S>(&self, s: S) -> Counted<S> {
        let (read, written) = self.counters();
        Counted {
            inner: s,
            read,
            written,
        }
    }

    /// The same for the destination side's stream: bytes written to it are sent, bytes
    /// read from it received.
    pub fn count_upstream<S>(&self, s: S) -> Counted<S> {
        let (read, written) = self.counters();
        Counted {
            inner: s,
            read: written,
            written: read,
        }
    }

    /// (sent, received) of the registered connection (throwaway ones before that).
    fn counters(&self) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
        match &self.registered {
            Some(r) => (r.live.sent.clone(), r.live.received.clone()),
            None => (Arc::default(), Arc::default()),
        }
    }

    /// Counts `n` bytes sent that were read before the client stream was wrapped.
    pub fn add_sent(&self, n: u64) {
        if let Some(r) = &self.registered {
            r.live.sent.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Completes when ztunnel decides to close this live connection, with why; never
    /// for a connection that was not registered with an [`Authz`].
    pub fn closed(&self) -> impl std::future::Future<Output = Reason> + Send + 'static {
        let rx = self.registered.as_ref().map(|r| r.closed.clone());
        async move {
            let Some(mut rx) = rx else {
                return std::future::pending().await;
            };
            let why = match rx.wait_for(|r| r.is_some()).await {
                Ok(r) => r.clone(),
                Err(_) => None,
            };
            match why {
                Some(why) => why,
                None => std::future::pending().await,
            }
        }
    }

    /// Runs `relay` until it ends or ztunnel closes the connection, and finishes.
    pub async fn relay<F>(self, relay: F)
    where
        F: std::future::Future<Output = std::io::Result<(u64, u64)>>,
    {
        let closed = self.closed();
        let outcome = tokio::select! {
            r = relay => match r {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Failed(Reason::Relay(e.to_string())),
            },
            why = closed => Outcome::Closed(why),
        };
        self.finish(outcome);
    }

    /// Records how the attempt ended: one access-log line, the metrics.
    pub fn finish(mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let t = &self.tracker;
        let m = &t.metrics;
        let (info, sent, received, mut labels) = match self.registered.take() {
            Some(r) => {
                t.live.lock().unwrap().remove(&r.id);
                let sent = r.live.sent.load(Ordering::Relaxed);
                let received = r.live.received.load(Ordering::Relaxed);
                (r.live.info.clone(), sent, received, r.labels)
            }
            None => {
                // Refused before both ends were known: what is known, counted as opened
                // and closed like any other attempt.
                let labels = TcpLabels::unknown(self.direction);
                m.tcp_opened.get_or_create(&labels).inc();
                let info = ConnectionInfo::unknown(self.direction, self.src, self.dst);
                (info, 0, 0, labels)
            }
        };
        labels.response_flags = KNOWN.flags(outcome.response_flags());
        m.tcp_closed.get_or_create(&labels).inc();
        if matches!(outcome, Outcome::Denied(_) | Outcome::Failed(_)) {
            m.tcp_failed.get_or_create(&labels).inc();
        }
        // Istio's meaning: "sent" is the response (destination to client), "received"
        // the request, whichever side reports.
        m.tcp_sent.get_or_create(&labels).inc_by(received);
        m.tcp_received.get_or_create(&labels).inc_by(sent);
        m.connections
            .get_or_create(&AttemptLabels {
                direction: match self.direction {
                    Direction::Outbound => "outbound",
                    Direction::Inbound => "inbound",
                },
                outcome: outcome.name(),
                reason: outcome.reason().map_or("-", Reason::name),
            })
            .inc();
        access_log::complete(
            &access_log::Ends::new(&info, &labels),
            &outcome,
            sent,
            received,
            self.started.elapsed().as_millis(),
        );
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        self.record(Outcome::Aborted);
    }
}

/// A stream that counts the bytes through it.
pub struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
