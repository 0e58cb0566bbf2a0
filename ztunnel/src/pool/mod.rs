//! The HBONE connection pool: one HTTP/2-over-mTLS connection per (source identity,
//! destination identities, destination address), multiplexing many tunnelled TCP
//! connections as streams.
//!
//! A connection carries at most `max_streams_per_conn` streams; when all are busy another
//! connection is opened. Concurrent first uses of a key share one dial. Connections idle for
//! `idle_timeout` are closed, dead ones are evicted on sight.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use h2::client::SendRequest;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::hbone::{self, ConnectRequest, H2Stream, HboneError};
use crate::identity::{Identity, SecretManager, WorkloadCertificate};
use crate::tls::{self, TlsError};

/// Opens the TCP connection under an HBONE connection. The real proxy sets socket options
/// (SO_MARK so its own traffic is not captured again, IP_TRANSPARENT for source addresses).
#[async_trait]
pub trait Dialer: Send + Sync + 'static {
    async fn dial(&self, dst: SocketAddr) -> io::Result<TcpStream>;
}

/// A plain `connect()`.
pub struct TcpDialer;

#[async_trait]
impl Dialer for TcpDialer {
    async fn dial(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let tcp = TcpStream::connect(dst).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

/// Where the pool gets the source workload's certificate when it opens a connection.
#[async_trait]
pub trait CertSource: Send + Sync + 'static {
    async fn cert(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, String>;
}

#[async_trait]
impl CertSource for SecretManager {
    async fn cert(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, String> {
        self.fetch(identity).await.map_err(|e| e.to_string())
    }
}

/// Which connection a stream may share: same source identity, same set of acceptable
/// destination identities, same destination address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub dst_identities: Vec<Identity>,
    pub dst: SocketAddr,
}

impl PoolKey {
    pub fn new(src: Identity, mut dst_identities: Vec<Identity>, dst: SocketAddr) -> Self {
        // Order doesn't matter for verification, so it mustn't split the pool either.
        dst_identities.sort();
        dst_identities.dedup();
        PoolKey {
            src,
            dst_identities,
            dst,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub max_streams_per_conn: usize,
    pub idle_timeout: Duration,
    /// Bound on TCP + TLS + HTTP/2 setup.
    pub connect_timeout: Duration,
    /// Where connections are counted (`Metrics::pool`); by default counters nobody reads.
    pub metrics: PoolMetrics,
    /// HTTP/2 PINGs on each connection: one unanswered closes it, and the pool drops it
    /// (its driver has ended) at the next checkout or reaper pass. Default: none.
    pub keepalive: Option<hbone::Keepalive>,
    /// TCP keepalive idle time on each connection's socket.
    pub tcp_keepalive: Option<crate::proxy::guards::TcpKeepalive>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            metrics: PoolMetrics::default(),
            keepalive: None,
            tcp_keepalive: None,
        }
    }
}

/// `ztunnel_pool_connections_opened` and `ztunnel_pool_connections_active`.
#[derive(Clone, Debug, Default)]
pub struct PoolMetrics {
    /// HBONE connections established (TCP, mTLS and HTTP/2 handshakes done).
    pub opened: Counter,
    /// HBONE connections the pool holds: from established until the pool has let go of
    /// them (idle timeout, found dead) and their last stream has ended.
    pub active: Gauge,
}

/// Keeps a connection counted in [`PoolMetrics::active`] while it lives.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why a new connection could not be set up (shared by everyone waiting on that dial).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("source certificate: {0}")]
    Certificate(String),
    #[error("TCP connect: {0}")]
    Dial(io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("HTTP/2 handshake: {0}")]
    Handshake(HboneError),
    #[error("connection setup timed out")]
    Timeout,
    #[error("connection setup task failed: {0}")]
    Task(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot connect to {dst}: {err}")]
    Connect {
        dst: SocketAddr,
        err: Arc<ConnectError>,
    },
    /// The connection works but this stream failed (e.g. CONNECT answered 403 or 503).
    #[error(transparent)]
    Stream(#[from] HboneError),
}

type SharedDial = Shared<BoxFuture<'static, Result<(), Arc<ConnectError>>>>;

#[derive(Default)]
struct KeyConns {
    conns: Vec<Arc<Conn>>,
    dialing: Option<SharedDial>,
}

struct Conn {
    send: SendRequest<Bytes>,
    driver: JoinHandle<Result<(), h2::Error>>,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    broken: AtomicBool,
    /// Set when the driver has ended (before the reaper is woken).
    ended: Arc<AtomicBool>,
    _counted: Counted,
}

impl Conn {
    fn is_dead(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
            || self.ended.load(Ordering::Acquire)
            || self.driver.is_finished()
    }

    /// Claims a stream slot if the connection has one free.
    fn try_reserve(&self, max: usize) -> bool {
        // The server's SETTINGS_MAX_CONCURRENT_STREAMS may be lower than ours.
        let max = max.min(self.send.current_max_send_streams()).max(1);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

/// A claimed stream slot; frees it when the stream is dropped.
struct StreamSlot(Arc<Conn>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("poisoned") = Instant::now();
        }
    }
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    dialer: Arc<dyn Dialer>,
    certs: Arc<dyn CertSource>,
    opts: PoolOptions,
    keys: Mutex<HashMap<PoolKey, KeyConns>>,
    dials: AtomicU64,
    /// Wakes the reaper when a connection's driver ends (peer closed, PING unanswered),
    /// so a dead connection is let go of (and no longer counted) at once.
    reap_now: Arc<tokio::sync::Notify>,
}

impl Pool {
    /// Must be called within a tokio runtime (it starts the idle reaper).
    pub fn new(dialer: Arc<dyn Dialer>, certs: Arc<dyn CertSource>, opts: PoolOptions) -> Self {
        let inner = Arc::new(PoolInner {
            dialer,
            certs,
            opts,
            keys: Mutex::new(HashMap::new()),
            dials: AtomicU64::new(0),
            reap_now: Arc::new(tokio::sync::Notify::new()),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner)));
        Pool { inner }
    }

    /// Opens a tunnelled stream to `req.target` over a pooled connection for `key`.
    pub async fn connect(
        &self,
        key: &PoolKey,
        req: &ConnectRequest,
    ) -> Result<H2Stream, PoolError> {
        self.connect_with_data(key, req, &Bytes::new()).await
    }

    /// [`connect`](Self::connect) sending `early` — bytes the client already wrote — right
    /// behind the request (see [`hbone::connect_stream_with_data`]); a retry on a fresh
    /// connection sends them again, so nothing is lost when the first one was going away.
    pub async fn connect_with_data(
        &self,
        key: &PoolKey,
        req: &ConnectRequest,
        early: &Bytes,
    ) -> Result<H2Stream, PoolError> {
        let mut retried = false;
        loop {
            let slot = self.checkout(key).await?;
            match hbone::connect_stream_with_data(&slot.0.send, req, early).await {
                Ok(stream) => return Ok(stream.with_guard(Box::new(slot))),
                Err(HboneError::H2(e)) if !retried && connection_level(&e) => {
                    // E.g. the peer sent GOAWAY or the connection just died: one fresh try.
                    tracing::debug!(dst = %key.dst, error = %e, "pooled connection failed, redialing");
                    slot.0.broken.store(true, Ordering::Relaxed);
                    retried = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Live connections for a key.
    pub fn connection_count(&self, key: &PoolKey) -> usize {
        let keys = self.inner.keys.lock().expect("poisoned");
        keys.get(key)
            .map(|k| k.conns.iter().filter(|c| !c.is_dead()).count())
            .unwrap_or(0)
    }

    /// Dials started since start, failed ones included (for tests; [`PoolMetrics::opened`]
    /// counts the connections established).
    pub fn dials(&self) -> u64 {
        self.inner.dials.load(Ordering::Relaxed)
    }

    async fn checkout(&self, key: &PoolKey) -> Result<StreamSlot, PoolError> {
        loop {
            let dial = {
                let mut keys = self.inner.keys.lock().expect("poisoned");
                let kc = keys.entry(key.clone()).or_default();
                kc.conns.retain(|c| !c.is_dead());
                let max = self.inner.opts.max_streams_per_conn;
                if let Some(conn) = kc.conns.iter().find(|c| c.try_reserve(max)) {
                    return Ok(StreamSlot(conn.clone()));
                }
                kc.dialing
                    .get_or_insert_with(|| start_dial(self.inner.clone(), key.clone()))
                    .clone()
            };
            // Once the dial lands, loop to claim a slot on it (or dial again if others
            // filled it first).
            dial.await
                .map_err(|err| PoolError::Connect { dst: key.dst, err })?;
        }
    }
}

/// Errors that say the connection, not just the stream, is unusable.
fn connection_level(e: &h2::Error) -> bool {
    e.is_go_away() || e.is_io() || !e.is_reset() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Dials in its own task, so a caller giving up doesn't cancel it for the others waiting.
fn start_dial(inner: Arc<PoolInner>, key: PoolKey) -> SharedDial {
    let task = tokio::spawn(async move {
        inner.dials.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(inner.opts.connect_timeout, dial(&inner, &key))
            .await
            .unwrap_or(Err(ConnectError::Timeout));
        let mut keys = inner.keys.lock().expect("poisoned");
        let kc = keys.entry(key.clone()).or_default();
        kc.dialing = None;
        match result {
            Ok(conn) => {
                kc.conns.push(Arc::new(conn));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(src = %key.src, dst = %key.dst, error = %e, "HBONE connect failed");
                Err(Arc::new(e))
            }
        }
    });
    async move {
        task.await
            .unwrap_or_else(|e| Err(Arc::new(ConnectError::Task(e.to_string()))))
    }
    .boxed()
    .shared()
}

async fn dial(inner: &PoolInner, key: &PoolKey) -> Result<Conn, ConnectError> {
    let cert = inner
        .certs
        .cert(&key.src)
        .await
        .map_err(ConnectError::Certificate)?;
    let config = tls::client_config(&cert, &key.dst_identities)?;
    let tcp = inner
        .dialer
        .dial(key.dst)
        .await
        .map_err(ConnectError::Dial)?;
    crate::proxy::guards::set_tcp_keepalive(&tcp, inner.opts.tcp_keepalive);
    let tls = tls::connect(config, key.dst, tcp).await?;
    let (send, driver) = hbone::handshake_with(tls, inner.opts.keepalive)
        .await
        .map_err(ConnectError::Handshake)?;
    let (reap_now, ended) = (inner.reap_now.clone(), Arc::new(AtomicBool::new(false)));
    let ended_flag = ended.clone();
    let driver = tokio::spawn(async move {
        let r = driver.await.unwrap_or(Ok(()));
        ended_flag.store(true, Ordering::Release);
        reap_now.notify_one();
        r
    });
    tracing::debug!(src = %key.src, dst = %key.dst, "HBONE connection established");
    inner.opts.metrics.opened.inc();
    Ok(Conn {
        send,
        driver,
        active: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
        broken: AtomicBool::new(false),
        ended,
        _counted: Counted::new(&inner.opts.metrics.active),
    })
}

/// Drops connections idle past the timeout (their HTTP/2 connection then closes, having no
/// request handles or streams left) and dead ones. Stops when the pool is dropped.
async fn reap_idle(pool: Weak<PoolInner>) {
    let period = match pool.upgrade() {
        Some(p) => {
            (p.opts.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(15))
        }
        None => return,
    };
    let Some(reap_now) = pool.upgrade().map(|p| p.reap_now.clone()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = reap_now.notified() => {}
        }
        let Some(inner) = pool.upgrade() else { return };
        let idle_timeout = inner.opts.idle_timeout;
        let mut keys = inner.keys.lock().expect("poisoned");
        for kc in keys.values_mut() {
            kc.conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().expect("poisoned").elapsed() >= idle_timeout;
                !(idle || c.is_dead())
            });
        }
        keys.retain(|_, kc| !kc.conns.is_empty() || kc.dialing.is_some());
    }
}

#[cfg(test)]
mod tests;
