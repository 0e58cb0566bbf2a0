//! `ztunnel run`: wires capture, state, enrollment and the proxy together, and takes
//! them apart again on SIGTERM/SIGINT.
//!
//! Threads: one tokio runtime (worker threads = cores). The process starts in the
//! node's network namespace (a DaemonSet pod on the host network, or the testbed's
//! node namespace), so every socket and netlink call is the node's.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

use crate::capture::{Capture, CaptureConfig, RoutingConfig};
use crate::config::RunArgs;
use crate::enroll::Enroller;
use crate::proxy::{self, socket, ProxyContext};
use crate::state::StateStore;

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let store = Arc::new(StateStore::default());
    let _config_task = match &args.local_xds_path {
        Some(path) => Some(
            crate::xds::watch::follow(path.clone(), store.clone())
                .with_context(|| format!("loading {}", path.display()))?,
        ),
        None => {
            warn!("no LOCAL_XDS_PATH: no workloads are known; nothing will be enrolled");
            None
        }
    };

    let capture = Capture::start(CaptureConfig {
        instance: args.instance(),
        bpffs_root: args.bpffs_root.clone(),
        routing: RoutingConfig {
            mark: args.capture_mark,
            table: args.route_table,
            priority: args.rule_priority,
        },
        proxy_mark: args.proxy_mark,
        outbound_port: args.outbound_port,
        inbound_plain_port: args.inbound_plaintext_port,
        inbound_hbone_port: args.inbound_hbone_port,
        excluded_ports: args.exclude_ports.clone(),
    })
    .await
    .context("starting capture")?;
    let capture = Arc::new(Mutex::new(capture));

    let result = serve(&args, store, capture.clone()).await;

    let capture = Arc::into_inner(capture)
        .map(Mutex::into_inner)
        .context("capture still in use at exit")?;
    if args.retain_capture_on_exit {
        capture.retain();
    } else if let Err(e) = capture.shutdown().await {
        error!("removing capture failed: {e:#}");
    }
    info!("ztunnel stopped");
    result
}

async fn serve(args: &RunArgs, store: Arc<StateStore>, capture: Arc<Mutex<Capture>>) -> anyhow::Result<()> {
    let ctx = Arc::new(ProxyContext {
        node: args.node_name.clone(),
        store: store.clone(),
        dialer: socket::Dialer { mark: args.proxy_mark },
        listen_ports: vec![args.outbound_port, args.inbound_plaintext_port, args.inbound_hbone_port],
    });
    let mut tasks = tokio::task::JoinSet::new();
    for addr in args.listen_addrs(args.outbound_port) {
        let l = socket::transparent_listener(addr).with_context(|| format!("listening on {addr}"))?;
        tasks.spawn(proxy::accept_loop(l, ctx.clone(), proxy::outbound::handle));
    }
    for addr in args.listen_addrs(args.inbound_plaintext_port) {
        let l = socket::transparent_listener(addr).with_context(|| format!("listening on {addr}"))?;
        tasks.spawn(proxy::accept_loop(l, ctx.clone(), proxy::inbound::handle_plaintext));
    }

    let enroller = Arc::new(Enroller::new(args.node_name.clone(), store.clone(), capture.clone()));
    let interval = Duration::from_millis(args.rescan_interval_ms.max(50));
    {
        let enroller = enroller.clone();
        let capture = capture.clone();
        let mut changes = store.subscribe();
        tasks.spawn(async move {
            loop {
                if let Err(e) = capture.lock().await.refresh().await {
                    warn!("capture refresh failed: {e:#}");
                }
                enroller.reconcile().await;
                // Wake on a config change, or periodically to retry pending pods and
                // attach to new interfaces.
                let _ = tokio::time::timeout(interval, changes.changed()).await;
            }
        });
    }
    enroller.reconcile().await;
    info!(node = %args.node_name, "ztunnel ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    tasks.shutdown().await;
    drop(enroller);
    Ok(())
}
