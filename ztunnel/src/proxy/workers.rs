//! The data path's threads. Each worker thread runs its own single-threaded tokio runtime
//! with a handle on every proxy listener and its own HBONE pool, so every task of a
//! connection — its relay, the HTTP/2 connection it is tunnelled in, the streams a peer's
//! connection carries — runs on the thread that accepted it, and waking one of them is a
//! function call rather than a hand-off to another thread. (With one multi-threaded
//! runtime each ztunnel made two `futex` calls per request/response; see the README's
//! Performance section for what this layout measured.)
//!
//! Connections spread over the threads by themselves: a new connection wakes every idle
//! thread and the first to accept it keeps it. Control-plane work (xDS, certificates,
//! enrollment, the admin endpoints) stays on the main runtime.

use std::io;
use std::net::TcpListener as StdListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use super::{accept_loop, inbound, outbound, ProxyContext};
use crate::connections::Direction;

/// What a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    /// 15001: connections enrolled pods open.
    Outbound,
    /// 15006: plaintext addressed to enrolled pods.
    InboundPlaintext,
    /// 15008: HBONE from other nodes.
    InboundHbone,
}

/// How far the workers are in their life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Accepting,
    /// No new connections; the open ones go on.
    Draining,
    /// Close everything and end the thread.
    Exit,
}

/// The running worker threads; dropping it ends them (and every connection they carry).
pub struct Workers {
    phase: watch::Sender<Phase>,
    /// One per worker: fires once it has closed its listeners.
    closed: Vec<oneshot::Receiver<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` threads (0: one per core), each serving all of `listeners` (which
    /// must be non-blocking) with a context from `context`, called on that thread.
    pub async fn start(
        count: usize,
        listeners: &[(StdListener, Role)],
        context: Arc<dyn Fn() -> ProxyContext + Send + Sync>,
    ) -> anyhow::Result<Workers> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (phase, _) = watch::channel(Phase::Accepting);
        let mut workers = Workers {
            phase,
            closed: Vec::new(),
            threads: Vec::new(),
        };
        let mut started = Vec::new();
        for i in 0..count {
            let own = listeners
                .iter()
                .map(|(l, role)| Ok((l.try_clone()?, *role)))
                .collect::<io::Result<Vec<_>>>()?;
            let (ready_tx, ready_rx) = oneshot::channel();
            let (closed_tx, closed_rx) = oneshot::channel();
            let phase = workers.phase.subscribe();
            let context = context.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ztunnel-dp-{i}"))
                .spawn(move || worker(own, context, phase, ready_tx, closed_tx))?;
            workers.threads.push(thread);
            workers.closed.push(closed_rx);
            started.push(ready_rx);
        }
        for ready in started {
            match ready.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => anyhow::bail!("a data-path thread ended while starting"),
            }
        }
        debug!(threads = count, "data-path threads serving");
        Ok(workers)
    }

    /// Stops accepting on every thread; returns once all have closed their listeners.
    /// Open connections go on until [`Workers`] is dropped.
    pub async fn stop_accepting(&mut self) {
        self.phase.send_replace(Phase::Draining);
        for closed in self.closed.drain(..) {
            let _ = closed.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.phase.send_replace(Phase::Exit);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                warn!("a data-path thread panicked");
            }
        }
    }
}

fn worker(
    listeners: Vec<(StdListener, Role)>,
    context: Arc<dyn Fn() -> ProxyContext + Send + Sync>,
    mut phase: watch::Receiver<Phase>,
    ready: oneshot::Sender<io::Result<()>>,
    closed: oneshot::Sender<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async {
        let ctx = Arc::new(context());
        ctx.metrics.runtimes.add(rt.metrics());
        let mut accepting = tokio::task::JoinSet::new();
        for (l, role) in listeners {
            let l = match TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let ctx = ctx.clone();
            match role {
                Role::Outbound => {
                    accepting.spawn(accept_loop(l, ctx, Direction::Outbound, outbound::handle))
                }
                Role::InboundPlaintext => accepting.spawn(accept_loop(
                    l,
                    ctx,
                    Direction::Inbound,
                    inbound::handle_plaintext,
                )),
                Role::InboundHbone => accepting.spawn(accept_loop(
                    l,
                    ctx,
                    Direction::Inbound,
                    inbound::handle_hbone,
                )),
            };
        }
        let _ = ready.send(Ok(()));
        let _ = phase.wait_for(|p| *p != Phase::Accepting).await;
        accepting.shutdown().await;
        let _ = closed.send(());
        // Serve what is open until told to exit (or the sender is gone).
        let _ = phase.wait_for(|p| *p == Phase::Exit).await;
    });
    // Tasks still running are dropped here; none of them blocks.
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// A context for tests: an empty state, a CA in memory, plain dials.
#[cfg(test)]
pub(crate) fn test_context() -> Arc<dyn Fn() -> ProxyContext + Send + Sync> {
    use crate::connections::ConnectionTracker;
    use crate::identity::ca::{CaOptions, CertificateAuthority};
    use crate::identity::manager::{LocalCaClient, SecretManagerOptions};
    use crate::identity::SecretManager;
    use crate::metrics::Metrics;
    use crate::pool::{Pool, PoolOptions};
    use crate::proxy::socket::Dialer;
    use crate::state::StateStore;
    let ca = CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap();
    let certs = Arc::new(SecretManager::new(
        Arc::new(LocalCaClient::new(Arc::new(ca))),
        SecretManagerOptions::default(),
    ));
    let metrics = Arc::new(Metrics::new());
    let connections = ConnectionTracker::new(metrics.clone());
    let (_, draining) = watch::channel(false);
    Arc::new(move || ProxyContext {
        node: "node".into(),
        store: Arc::new(StateStore::default()),
        dialer: Arc::new(Dialer { mark: 0 }),
        original_dst: Arc::new(crate::proxy::socket::original_dst),
        certs: certs.clone(),
        pool: Pool::new(
            Arc::new(Dialer { mark: 0 }),
            certs.clone(),
            PoolOptions::default(),
        ),
        connections: connections.clone(),
        metrics: metrics.clone(),
        listen_ports: vec![],
        hbone_port: 15008,
        handshake_timeout: Duration::from_secs(1),
        is_node_address: Arc::new(crate::proxy::socket::is_node_address),
        workload_wait: Duration::ZERO,
        limits: Default::default(),
        draining: draining.clone(),
        dns: None,
        resolver: crate::dns::ResolverSettings::unavailable("no resolver in tests")
            .build(crate::dns::LOOKUP_TIMEOUT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// What happened to a connection: closed by a handler, or left waiting.
    async fn answered(addr: std::net::SocketAddr) -> bool {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    }

    /// Threads of this process named like data-path threads (tests run in parallel, so
    /// other tests' threads may be among them).
    fn data_path_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.starts_with("ztunnel-dp-"))
            .count()
    }

    #[tokio::test]
    async fn every_thread_serves_until_told_to_stop_accepting_and_ends_on_drop() {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let listeners = [(l.try_clone().unwrap(), Role::InboundPlaintext)];
        let mut workers = Workers::start(3, &listeners, test_context()).await.unwrap();
        assert!(data_path_threads() >= 3);
        // Plaintext to an address that is no workload: whichever thread takes it closes it.
        for _ in 0..12 {
            assert!(answered(addr).await, "a connection was not served");
        }
        // Closed only in the workers: the socket still listens (as it does while the
        // handover registry holds it for a successor), but no thread takes connections.
        workers.stop_accepting().await;
        drop(listeners);
        assert!(
            !answered(addr).await,
            "a connection was served after stop_accepting"
        );
        drop(workers);
        drop(l);
        // `drop` joins the threads, so returning at all shows they ended. The count is a
        // loose check beside it: another test's threads (one per core) may still be alive.
        assert!(data_path_threads() <= 3);
    }

    #[tokio::test]
    async fn zero_threads_means_one_per_core() {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let workers = Workers::start(0, &[(l, Role::Outbound)], test_context())
            .await
            .unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(workers.threads.len(), cores);
    }
}
