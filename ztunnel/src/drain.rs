//! The order ztunnel stops in, in one place: whatever asked (SIGTERM, `/quitquitquit`, a
//! successor taking over), [`Drain::run`] takes the same steps.
//!
//! 1. The data path stops accepting (every thread closes its listener handles; a
//!    successor that took them over keeps accepting on the same sockets), and the
//!    listeners leave the handover registry.
//! 2. Draining is announced: inbound HBONE connections send GOAWAY, so peers open new
//!    streams elsewhere (on the successor) while running ones finish.
//! 3. After a handover, the control loops stop now: the successor owns enrollment, the
//!    maps and the certificates from here on.
//! 4. Live connections get until the deadline — also accepted sockets not registered yet
//!    (in their handshake, policy check or dial).
//! 5. Everything left stops (remaining connections are closed by the caller dropping
//!    the data path).

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::connections::ConnectionTracker;
use crate::handover::Registry;
use crate::proxy::workers::Workers;

/// Why the process is stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop: capture is removed unless `--retain-capture-on-exit`.
    Stopped,
    /// A new ztunnel took over: capture is its now and stays.
    HandedOver,
}

/// What a drain found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Connections (registered or still being set up) left at the deadline.
    pub left: u64,
}

/// The components a drain acts on, in the order it acts on them.
pub struct Drain<'a> {
    pub workers: &'a mut Workers,
    pub registry: &'a Registry,
    /// Turned true to announce draining (GOAWAY on inbound HBONE connections).
    pub draining: &'a watch::Sender<bool>,
    /// The control loops (reconcile, memory, live-policy enforcement, admin servers).
    pub tasks: &'a mut JoinSet<()>,
    pub connections: &'a ConnectionTracker,
    pub timeout: Duration,
}

impl Drain<'_> {
    pub async fn run(self, exit: Exit) -> Drained {
        // 1.
        self.workers.stop_accepting().await;
        self.registry.clear();
        // 2.
        self.draining.send_replace(true);
        // 3.
        if exit == Exit::HandedOver {
            self.tasks.shutdown().await;
        }
        // 4.
        let deadline = tokio::time::Instant::now() + self.timeout;
        let c = self.connections;
        let left = || c.count() as u64 + c.in_flight();
        while left() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let drained = Drained { left: left() };
        if drained.left > 0 {
            warn!(
                open = c.count(),
                handling = c.in_flight(),
                "drain timeout: closing remaining connections"
            );
        } else {
            info!("drained: no connection left");
        }
        // 5.
        self.tasks.shutdown().await;
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connections::{Direction, Outcome};
    use crate::metrics::Metrics;
    use crate::proxy::workers::Role;
    use std::sync::Arc;

    /// A drain closes the listeners first, then waits for live connections up to the
    /// deadline, and reports what was left.
    #[tokio::test]
    async fn listeners_close_first_then_connections_get_until_the_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let registry = Registry::default();
        registry.add(&l).unwrap();
        let listeners = [(l, Role::InboundPlaintext)];
        let mut workers = Workers::start(1, &listeners, crate::proxy::workers::test_context())
            .await
            .unwrap();
        drop(listeners);
        let tracker = ConnectionTracker::new(Arc::new(Metrics::new()));
        // A connection still being handled when the drain starts, which ends 300 ms in.
        let handling = tracker.handling();
        let conn = tracker.accept(Direction::Inbound, addr, None);
        let (draining, watched) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let finisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            conn.finish(Outcome::Ok);
            drop(handling);
        });
        let started = tokio::time::Instant::now();
        let drained = Drain {
            workers: &mut workers,
            registry: &registry,
            draining: &draining,
            tasks: &mut tasks,
            connections: &tracker,
            timeout: Duration::from_secs(5),
        }
        .run(Exit::Stopped)
        .await;
        assert_eq!(drained, Drained { left: 0 });
        assert!(*watched.borrow(), "draining announced");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "waited for it"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "did not wait for the deadline"
        );
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still accepting"
        );
        finisher.await.unwrap();

        // One that never ends: the deadline bounds the drain.
        let _stuck = tracker.handling();
        let drained = Drain {
            workers: &mut workers,
            registry: &registry,
            draining: &draining,
            tasks: &mut tasks,
            connections: &tracker,
            timeout: Duration::from_millis(200),
        }
        .run(Exit::HandedOver)
        .await;
        assert_eq!(drained, Drained { left: 1 });
    }
}
