//! Live connections: what `/debug/connections` shows, what the access log and the
//! `istio_tcp_*` metrics are made from when a connection closes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::info;

use crate::metrics::{Metrics, TcpLabels};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// Who and where, fixed when the connection is accepted.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionInfo {
    pub direction: Direction,
    pub src: SocketAddr,
    /// The original destination (a pod or a service VIP).
    pub dst: SocketAddr,
    /// Where it is actually sent (the chosen endpoint).
    pub target: SocketAddr,
    pub src_workload: Option<String>,
    pub src_identity: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    /// `HBONE` or `TCP` (plaintext).
    pub protocol: &'static str,
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

struct Live {
    info: ConnectionInfo,
    started: Instant,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
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

    /// Registers a connection; it is reported when the guard is finished or dropped.
    pub fn open(self: &Arc<Self>, info: ConnectionInfo, labels: TcpLabels) -> ConnectionGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.metrics.tcp_opened.get_or_create(&labels).inc();
        let live = Arc::new(Live {
            info,
            started: Instant::now(),
            sent: Arc::default(),
            received: Arc::default(),
        });
        self.live.lock().unwrap().insert(id, live.clone());
        ConnectionGuard {
            id,
            live,
            labels,
            tracker: self.clone(),
            outcome: None,
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
}

/// One live connection. Wrap its client-side stream with [`ConnectionGuard::count`] so
/// bytes are counted as they flow.
pub struct ConnectionGuard {
    id: u64,
    live: Arc<Live>,
    labels: TcpLabels,
    tracker: Arc<ConnectionTracker>,
    outcome: Option<String>,
}

impl ConnectionGuard {
    /// Counts bytes read from `s` as sent (client → destination) and bytes written to it
    /// as received.
    pub fn count<S>(&self, s: S) -> Counted<S> {
        Counted {
            inner: s,
            read: self.live.sent.clone(),
            written: self.live.received.clone(),
        }
    }

    /// The same for the destination side's stream: bytes written to it are sent, bytes
    /// read from it received.
    pub fn count_upstream<S>(&self, s: S) -> Counted<S> {
        Counted {
            inner: s,
            read: self.live.received.clone(),
            written: self.live.sent.clone(),
        }
    }

    /// Counts `n` bytes sent that were read before the client stream was wrapped.
    pub fn add_sent(&self, n: u64) {
        self.live.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Records how the connection ended (`ok`, or the error); logged on drop.
    pub fn set_outcome(&mut self, outcome: impl Into<String>) {
        self.outcome = Some(outcome.into());
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.live.info
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.tracker.live.lock().unwrap().remove(&self.id);
        let m = &self.tracker.metrics;
        let sent = self.live.sent.load(Ordering::Relaxed);
        let received = self.live.received.load(Ordering::Relaxed);
        m.tcp_closed.get_or_create(&self.labels).inc();
        m.tcp_sent.get_or_create(&self.labels).inc_by(sent);
        m.tcp_received.get_or_create(&self.labels).inc_by(received);
        let i = &self.live.info;
        let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        info!(
            target: "access",
            direction = ?i.direction,
            src.addr = %i.src,
            src.workload = %dash(&i.src_workload),
            src.identity = %dash(&i.src_identity),
            dst.addr = %i.dst,
            dst.target = %i.target,
            dst.workload = %dash(&i.dst_workload),
            dst.identity = %dash(&i.dst_identity),
            protocol = i.protocol,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.live.started.elapsed().as_millis() as u64,
            outcome = self.outcome.as_deref().unwrap_or("aborted"),
            "connection complete"
        );
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
