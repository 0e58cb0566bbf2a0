//! The data path after capture: accept → identify → authorize → tunnel → deliver.
//!
//! `outbound` serves 15001 (connections pods open): `route` plans where each goes from
//! the state alone, `outbound` carries the plan out. `inbound` serves 15008 (HBONE) and
//! 15006 (plaintext addressed to enrolled pods). Every attempt is one
//! `connections::ConnectionResult`, finished once with a typed outcome. `socket` holds the
//! socket options every stage relies on; `labels` what each connection is recorded as.
//! The kernel-facing parts — the original destination of an accepted socket and the
//! original-source dialer — are in the context, so the handlers run in tests without
//! root or capture.

pub mod guards;
pub mod inbound;
pub mod labels;
pub mod last_hop;
pub mod outbound;
pub mod route;
pub mod socket;
pub mod source;
pub mod workers;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::connections::{ConnectionTracker, Reason};
use crate::identity::manager::SecretManager;
use crate::identity::Identity;
use crate::metrics::{Metrics, ResultLabels};
use crate::pool::Pool;
use crate::state::{StateStore, Workload};

/// What every connection handler needs.
pub struct ProxyContext {
    pub node: String,
    pub store: Arc<StateStore>,
    /// Connects to pods (with the client's address as source) and other destinations.
    pub dialer: Arc<dyn Connect>,
    /// The original destination of an accepted connection (its local address, under
    /// capture: [`socket::original_dst`]).
    pub original_dst: OriginalDst,
    pub certs: Arc<SecretManager>,
    pub pool: Pool,
    pub connections: Arc<ConnectionTracker>,
    pub metrics: Arc<Metrics>,
    /// Our own listener ports: a connection whose original destination is one of
    /// them on a local address would loop.
    pub listen_ports: Vec<u16>,
    /// The inbound HBONE port of remote ztunnels.
    pub hbone_port: u16,
    /// Bound on an inbound mTLS handshake: a client that connects and sends nothing
    /// must not hold a task and a socket forever.
    pub handshake_timeout: std::time::Duration,
    /// Whether an address is this node's own (loopback included): never believed as the
    /// source an HBONE client names ([`source`]).
    pub is_node_address: source::NodeAddress,
    /// How long a connection waits for the workload record of an enrolled pod it comes
    /// from or goes to (enrollment can run ahead of xDS) before it is refused.
    pub workload_wait: std::time::Duration,
    /// The inbound HBONE listener's limits (shared counts across threads).
    pub limits: guards::InboundLimits,
    /// Turns true when this process drains (stop, or a new ztunnel took over).
    pub draining: tokio::sync::watch::Receiver<bool>,
    /// Where enrolled pods' captured DNS over TCP (port 53) goes, when set.
    pub dns: Option<Arc<crate::dns::DnsProxy>>,
    /// Looks up endpoints known by hostname only, when a connection picks one.
    pub resolver: crate::dns::OnDemand,
}

/// Reads an accepted connection's original destination.
pub type OriginalDst =
    Arc<dyn Fn(&tokio::net::TcpStream) -> std::io::Result<SocketAddr> + Send + Sync>;

/// How the data path opens its upstream connections.
#[async_trait::async_trait]
pub trait Connect: Send + Sync {
    /// Connects to `dst`, from `src` (a client's address, not ours) when given.
    async fn connect(
        &self,
        src: Option<SocketAddr>,
        dst: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream>;
}

#[async_trait::async_trait]
impl Connect for socket::Dialer {
    async fn connect(
        &self,
        src: Option<SocketAddr>,
        dst: SocketAddr,
    ) -> std::io::Result<tokio::net::TcpStream> {
        socket::Dialer::connect(self, src, dst).await
    }
}

impl ProxyContext {
    /// The outbound planner of this node.
    pub fn planner(&self) -> route::Planner<'_> {
        route::Planner {
            node: &self.node,
            listen_ports: &self.listen_ports,
            is_local: &socket::is_local,
        }
    }

    /// The workload of this node at `ip` that `usable` accepts, waiting for its record
    /// (at most [`workload_wait`](Self::workload_wait)) when the state has none yet.
    pub async fn local_workload(
        &self,
        ip: IpAddr,
        usable: impl Fn(&Workload) -> bool,
    ) -> Option<(Arc<crate::state::ProxyState>, Arc<Workload>)> {
        let found = self
            .store
            .wait_for(self.workload_wait, |s| {
                s.workload_by_ip(ip)
                    .filter(|w| w.node == self.node && usable(w))
            })
            .await;
        if found.is_none() {
            debug!(%ip, waited = ?self.workload_wait, "no workload record of this node for the address");
        }
        found
    }

    /// Completes once this process starts draining.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.draining.clone();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }
}

/// Accepts on `listener` forever, handing each connection to `handle`. `direction`
/// says which reporter the listener's open sockets count under
/// (`istio_tcp_sockets_open`).
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    direction: crate::connections::Direction,
    handle: F,
) where
    F: Fn(Arc<ProxyContext>, tokio::net::TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let open = ctx
        .metrics
        .sockets_open
        .get_or_create(&crate::metrics::SocketLabels {
            reporter: crate::metrics::TcpLabels::unknown(direction).reporter,
        })
        .clone();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                socket::set_nodelay(&stream);
                let handling = ctx.connections.handling();
                let fut = handle(ctx.clone(), stream, socket::canonical(peer));
                let open = open.clone();
                open.inc();
                tokio::spawn(async move {
                    fut.await;
                    open.dec();
                    drop(handling);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// L4 authorization of a connection to `dst` on workload `w`: the policy connection it
/// was judged as (re-judged on every state change while it lives), or why it is denied.
pub fn authorize(
    ctx: &ProxyContext,
    src_id: Option<&Identity>,
    src_ip: IpAddr,
    dst: SocketAddr,
    w: &Workload,
) -> Result<crate::connections::Authz, Reason> {
    let conn = crate::policy::Connection::new(src_id.cloned(), src_ip, dst.ip(), dst.port());
    let decision = ctx.store.snapshot().policies.evaluate(&conn, w);
    let result = if decision.allowed { "allow" } else { "deny" };
    ctx.metrics
        .authz_decisions
        .get_or_create(&ResultLabels {
            result: result.into(),
        })
        .inc();
    if !decision.allowed {
        info!(%conn, workload = %w.uid, %decision, "connection denied by policy");
        return Err(Reason::PolicyDenied(decision.to_string()));
    }
    Ok(crate::connections::Authz {
        conn,
        workload_uid: w.uid.clone(),
    })
}

/// [`relay`] for a TCP connection and an HBONE tunnel (no intermediate copy).
pub async fn relay_tunnel<T>(tcp: T, tunnel: crate::hbone::H2Stream) -> std::io::Result<(u64, u64)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    logged(crate::hbone::relay_tunnel(tcp, tunnel).await)
}

/// Copies both ways until both sides are done, half-closing each direction as its
/// source ends. Returns (bytes a→b, bytes b→a).
pub async fn relay<A, B>(mut a: A, mut b: B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    logged(crate::hbone::copy_bidirectional(&mut a, &mut b).await)
}

fn logged(r: std::io::Result<(u64, u64)>) -> std::io::Result<(u64, u64)> {
    if let Err(e) = &r {
        debug!("relay ended with error: {e}");
    }
    r
}

#[cfg(test)]
mod tests;
