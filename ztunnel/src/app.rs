//! `ztunnel run`: wires state, identity, capture, enrollment, the proxy and the admin
//! endpoints together, and takes them apart again on SIGTERM/SIGINT or `/quitquitquit`.
//!
//! Threads: this runs on the main thread's runtime (the control plane); the data path has
//! threads of its own (`proxy::workers`). The process starts in the node's network
//! namespace (a DaemonSet pod on the host network, or a testbed node), so every socket
//! and netlink call is the node's.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use tracing::{debug, error, info, warn};

use crate::admin::{self, AdminState};
use crate::capture::{Capture, CaptureConfig, RoutingConfig};
use crate::config::RunArgs;
use crate::connections::ConnectionTracker;
use crate::drain::Exit;
use crate::enroll::Enroller;
use crate::handover;
use crate::identity::ca::{CaOptions, CertificateAuthority};
use crate::identity::ca_client::CaDialOptions;
use crate::identity::manager::{LocalCaClient, SecretManagerOptions};
use crate::identity::{CaClient, GrpcCaClient, SecretManager};
use crate::memory;
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolOptions};
use crate::proxy::workers::{Role, Workers};
use crate::proxy::{socket, ProxyContext};
use crate::state::StateStore;

pub async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    // On Kubernetes: enrollment by namespace label, istiod for xDS and certificates.
    let kubernetes = args.kubernetes_enrollment();
    if kubernetes {
        args.apply_kubernetes_defaults();
        info!("Kubernetes mode: pods are enrolled by the istio.io/dataplane-mode label");
    }
    // Before touching capture: a running ztunnel of this instance owns it.
    let predecessor = handover::is_running(&args.handover_socket());
    if predecessor && !args.takeover {
        anyhow::bail!(
            "a ztunnel of instance {:?} is already running (it answers on {}): stop it, or start with --takeover true to take over from it",
            args.instance(),
            args.handover_socket().display()
        );
    }
    let store = Arc::new(StateStore::default());
    store.update(|s| {
        s.set_network(&args.network);
        s.set_preferred_namespace(args.preferred_service_namespace.as_deref());
    });
    crate::policy::set_info_logging(args.authz_policy_info_logging);
    crate::hbone::set_sizes(crate::hbone::H2Sizes {
        stream_window: args.hbone_limits.http2_stream_window_size,
        connection_window: args.hbone_limits.http2_connection_window_size,
        max_frame: args.hbone_limits.http2_frame_size,
    });
    let _config_task = match &args.local_xds_path {
        Some(path) => Some(
            crate::xds::watch::follow(path.clone(), store.clone())
                .with_context(|| format!("loading {}", path.display()))?,
        ),
        None => None,
    };
    if let Some(yaml) = &args.local_xds {
        let cfg = crate::xds::LocalConfig::from_yaml(yaml).context("LOCAL_XDS")?;
        for w in &cfg.warnings {
            warn!("LOCAL_XDS: {w}");
        }
        cfg.apply_to(&store);
        info!(
            workloads = cfg.workloads.len(),
            services = cfg.services.len(),
            policies = cfg.policies.len(),
            "configuration from LOCAL_XDS"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let xds = crate::xds::client::spawn_for_run(&args, store.clone(), &metrics.xds)?;
    if args.local_xds_path.is_none() && args.local_xds.is_none() && xds.is_none() {
        warn!("neither LOCAL_XDS_PATH nor XDS_ADDRESS: no workloads are known; nothing will be enrolled");
    }
    let (xds_task, xds_status) = xds.map(|(t, s)| (Some(t), Some(s))).unwrap_or((None, None));
    let certs = Arc::new(SecretManager::new(
        ca_client(&args)?,
        SecretManagerOptions {
            requested_ttl: args.workload_cert_ttl,
            ca_requests: metrics.ca_requests.clone(),
            ..Default::default()
        },
    ));

    let dns = match args.dns_proxy_addr {
        Some(_) => Some(dns_proxy(&args, store.clone())?),
        None => None,
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
        attach: args.tc_attach,
        tc_priority: args.tc_priority,
        sockmap: crate::capture::sockmap::SockmapConfig {
            enabled: args.sockmap,
            cgroup: args.sockmap_cgroup.clone(),
            excluded_ports: args.sockmap_exclude_ports.clone(),
        },
        host_under_policy: args.host_probes == crate::config::HostProbes::Policy,
        dns_port: args.dns_capture_port().unwrap_or(0),
    })
    .await
    .context("starting capture")?;
    let capture = Arc::new(Mutex::new(capture));

    let result = serve(
        &args,
        store,
        certs,
        capture.clone(),
        xds_status,
        metrics,
        dns,
    )
    .await;
    if let Some(t) = xds_task {
        t.abort();
    }

    // Aborted tasks may hold the capture a moment longer.
    for _ in 0..100 {
        if Arc::strong_count(&capture) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Keep capture for whoever serves next: after a handover, on request, and when we
    // failed while a predecessor still runs (removing it would expose its pods).
    let keep = args.retain_capture_on_exit
        || matches!(result, Ok(Exit::HandedOver))
        || (predecessor && result.is_err());
    match Arc::into_inner(capture).map(Mutex::into_inner) {
        Some(capture) if keep => capture.retain(),
        Some(capture) => {
            if let Err(e) = capture.shutdown().await {
                error!("removing capture failed: {e:#}");
            }
        }
        None => error!("capture still in use at exit: left in place"),
    }
    info!("ztunnel stopped");
    result.map(|_| ())
}

/// The DNS proxy (its sockets are bound in `serve`, where a predecessor's are taken over).
fn dns_proxy(args: &RunArgs, store: Arc<StateStore>) -> anyhow::Result<Arc<crate::dns::DnsProxy>> {
    // Checked at start, before anything is taken over from a running ztunnel.
    if args.dns_capture_port().is_some() {
        crate::dns::transparent::check_reply_privilege(args.proxy_mark).context(
            "DNS capture answers from port 53 of the address each pod asked: that needs \
             CAP_NET_BIND_SERVICE (and NET_ADMIN); add it, or run with --dns-capture false",
        )?;
    }
    let upstreams = crate::dns::Upstreams::from_resolv_conf(&args.dns_upstream)
        .context("--dns-upstream (DNS_UPSTREAM)")?;
    info!(upstreams = ?upstreams.servers, "DNS proxy: questions the mesh does not answer go to these");
    Ok(crate::dns::DnsProxy::new(
        store,
        upstreams,
        &args.cluster_domain,
    ))
}

/// The DNS proxy's sockets, inherited or bound: TCP on `--dns-proxy-addr`; UDP there too,
/// or, when enrolled pods' DNS is captured, on the wildcard addresses of its port
/// (transparent: captured questions arrive there, whatever address they were for).
fn serve_dns(
    args: &RunArgs,
    proxy: &Arc<crate::dns::DnsProxy>,
    inherited: &mut handover::Inherited,
    registry: &handover::Registry,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    use crate::dns::{transparent, UdpRole};
    let Some(addr) = args.dns_proxy_addr else {
        return Ok(());
    };
    let udp: Vec<(std::net::UdpSocket, UdpRole)> = match args.dns_capture_port() {
        Some(port) => args
            .listen_addrs(port)
            .into_iter()
            .map(|a| {
                let s = inherited
                    .take_or_bind_udp(a, transparent::bind_capture_socket)
                    .with_context(|| format!("DNS proxy: transparent udp {a}"))?;
                let role = UdpRole::Capture {
                    proxy_addr: addr,
                    mark: args.proxy_mark,
                };
                Ok((s, role))
            })
            .collect::<anyhow::Result<_>>()?,
        None => vec![(
            inherited
                .take_or_bind_udp(addr, transparent::bind_plain_socket)
                .with_context(|| format!("DNS proxy: udp {addr}"))?,
            UdpRole::Plain,
        )],
    };
    let tcp = inherited
        .take_or_bind(addr, std::net::TcpListener::bind)
        .with_context(|| format!("DNS proxy: tcp {addr}"))?;
    registry.add(&tcp)?;
    tcp.set_nonblocking(true)?;
    tasks.spawn(proxy.clone().serve_tcp(TcpListener::from_std(tcp)?));
    for (s, role) in udp {
        registry.add_udp(&s)?;
        s.set_nonblocking(true)?;
        tasks.spawn(
            proxy
                .clone()
                .serve_udp(tokio::net::UdpSocket::from_std(s)?, role),
        );
    }
    info!(%addr, captured = args.dns_capture_port().is_some(), "DNS proxy");
    Ok(())
}

/// The CA: Istio's gRPC API when an address is given, else the built-in one.
fn ca_client(args: &RunArgs) -> anyhow::Result<Arc<dyn CaClient>> {
    if let Some(addr) = &args.ca_address {
        let root = args
            .ca_root_cert
            .as_ref()
            .context("--ca-address needs --ca-root-cert (CA_ROOT_CA)")?;
        let opts = CaDialOptions {
            tls_name: args.ca_tls_name.clone(),
            headers: crate::config::istio_settings::headers("CA_HEADER_", std::env::vars())
                .map_err(anyhow::Error::msg)?,
        };
        let client = GrpcCaClient::with_options(addr, root, args.ca_token_file.as_ref(), opts)
            .with_context(|| format!("CA client for {addr}"))?;
        info!(ca = %addr, "workload certificates from the CA");
        return Ok(Arc::new(client));
    }
    let mut opts = CaOptions::new(&args.trust_domain);
    opts.dir = args.local_ca_dir.clone();
    if opts.dir.is_none() {
        warn!("built-in CA with an in-memory root: only this node trusts it (use --local-ca-dir or --ca-address)");
    }
    let ca = CertificateAuthority::new(opts).context("built-in CA")?;
    Ok(Arc::new(LocalCaClient::new(Arc::new(ca))))
}

async fn serve(
    args: &RunArgs,
    store: Arc<StateStore>,
    certs: Arc<SecretManager>,
    capture: Arc<Mutex<Capture>>,
    xds: Option<tokio::sync::watch::Receiver<crate::xds::client::XdsStatus>>,
    metrics: Arc<Metrics>,
    dns: Option<Arc<crate::dns::DnsProxy>>,
) -> anyhow::Result<Exit> {
    // Enrolled pods' DNS over TCP is captured with the rest of their TCP: it goes to the
    // DNS proxy when one runs (their DNS over UDP reaches it through its own socket).
    let dns_tcp = dns.clone().filter(|_| args.dns_capture);
    let connections = ConnectionTracker::new(metrics.clone());
    let dialer = socket::Dialer {
        mark: args.proxy_mark,
    };
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    // One context per data-path thread: everything shared but the pool, whose HTTP/2
    // connections are driven by the thread that opened them.
    let context: Arc<dyn Fn() -> ProxyContext + Send + Sync> = {
        let (node, store, certs) = (args.node_name.clone(), store.clone(), certs.clone());
        let (connections, metrics) = (connections.clone(), metrics.clone());
        let listen_ports = vec![
            args.outbound_port,
            args.inbound_plaintext_port,
            args.inbound_hbone_port,
        ];
        let (hbone_port, handshake_timeout) = (args.inbound_hbone_port, args.tls_handshake_timeout);
        let workload_wait = args.workload_wait_timeout;
        let (pool_max_streams, pool_idle) = (
            usize::from(args.pool_max_streams_per_connection),
            args.pool_unused_release_timeout,
        );
        let hbone_limits = args.hbone_limits.clone();
        let inbound_limits = crate::proxy::guards::InboundLimits::new(&hbone_limits);
        // The node's resolvers, the ones the DNS proxy forwards to.
        let resolvers = crate::dns::ResolverSettings::from_resolv_conf(&args.dns_upstream);
        Arc::new(move || ProxyContext {
            node: node.clone(),
            store: store.clone(),
            dialer: Arc::new(dialer),
            original_dst: Arc::new(socket::original_dst),
            certs: certs.clone(),
            pool: Pool::new(
                Arc::new(dialer),
                certs.clone(),
                PoolOptions {
                    max_streams_per_conn: pool_max_streams,
                    idle_timeout: pool_idle,
                    metrics: metrics.pool(),
                    keepalive: crate::proxy::guards::keepalive(&hbone_limits),
                    tcp_keepalive: inbound_limits.tcp_keepalive,
                    ..Default::default()
                },
            ),
            connections: connections.clone(),
            metrics: metrics.clone(),
            listen_ports: listen_ports.clone(),
            hbone_port,
            handshake_timeout,
            is_node_address: Arc::new(socket::is_node_address),
            workload_wait,
            limits: inbound_limits.clone(),
            draining: drain_rx.clone(),
            dns: dns_tcp.clone(),
            resolver: resolvers.build(crate::dns::LOOKUP_TIMEOUT),
        })
    };

    // Enrollment and certificates...
    let enroller = if args.kubernetes_enrollment() {
        let client = crate::k8s::client()
            .await
            .context("Kubernetes API client")?;
        let source = crate::k8s::KubeSource::start(
            client,
            crate::k8s::KubeOptions {
                node_name: args.node_name.clone(),
                trust_domain: args.trust_domain.clone(),
                cluster_id: args.cluster_id.clone(),
            },
        );
        Arc::new(Enroller::with_source(source, capture.clone()))
    } else {
        Arc::new(Enroller::new(
            args.node_name.clone(),
            store.clone(),
            capture.clone(),
        ))
    };
    let mut tasks = tokio::task::JoinSet::new();
    let interval = Duration::from_millis(args.rescan_interval_ms.max(50));
    tasks.spawn(reconcile_loop(
        args.node_name.clone(),
        store.clone(),
        capture.clone(),
        enroller.clone(),
        certs.clone(),
        interval,
        args.kubernetes_enrollment(),
    ));
    enroller.reconcile().await;
    tasks.spawn(memory::return_freed_memory(args.malloc_trim_interval));
    if let Some((questions, answers)) = capture.lock().await.last_hop_responder() {
        tasks.spawn(crate::proxy::last_hop::answer(
            Arc::new(context()),
            questions,
            answers,
        ));
    }
    tasks.spawn(enforce_on_live_connections(
        store.clone(),
        connections.clone(),
    ));

    let quit = Arc::new(tokio::sync::Notify::new());
    let admin_state = Arc::new(AdminState {
        node: args.node_name.clone(),
        store: store.clone(),
        capture: capture.clone(),
        enroller: enroller.clone(),
        metrics,
        connections: connections.clone(),
        certs,
        config_expected: args.local_xds_path.is_some(),
        xds,
        config: crate::admin::config_dump::config::config(args),
        local_config: {
            use crate::admin::config_dump::LocalSource;
            let file = args.local_xds_path.clone().map(LocalSource::File);
            file.or_else(|| args.local_xds.clone().map(LocalSource::Inline))
        },
        quit: quit.clone(),
    });

    // ...the listening sockets, inherited from a running ztunnel when upgrading...
    let mut inherited = take_over(args, &admin_state).await?;
    let took_over = !inherited.is_empty();
    let registry = handover::Registry::default();
    let mut bind = |addr| -> anyhow::Result<std::net::TcpListener> {
        let l = inherited
            .take_or_bind(addr, socket::transparent_std_listener)
            .with_context(|| format!("listening on {addr} (is another program using the port?)"))?;
        registry.add(&l)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };

    // ...the data path...
    let mut listeners = Vec::new();
    for (port, role) in [
        (args.outbound_port, Role::Outbound),
        (args.inbound_plaintext_port, Role::InboundPlaintext),
        (args.inbound_hbone_port, Role::InboundHbone),
    ] {
        for addr in args.listen_addrs(port) {
            listeners.push((bind(addr)?, role));
        }
    }
    let mut workers = Workers::start(args.worker_threads, &listeners, context)
        .await
        .context("starting the data-path threads")?;
    // The workers hold their own handles; the registry holds these for a successor.
    drop(listeners);

    // ...and what people look at.
    for (addr, handler) in [
        (args.admin_addr, Endpoint::Admin),
        (args.metrics_addr, Endpoint::Metrics),
        (args.readiness_addr, Endpoint::Readiness),
    ] {
        let l = inherited
            .take_or_bind(addr, std::net::TcpListener::bind)
            .with_context(|| format!("listening on {addr}"))?;
        registry.add(&l)?;
        l.set_nonblocking(true)?;
        let state = admin_state.clone();
        let handler = Arc::new(move |req| handler.handle(state.clone(), req));
        tasks.spawn(admin::http::serve(
            TcpListener::from_std(l)?,
            handler,
            args.http_limits.clone(),
        ));
    }
    if let Some(dns) = &dns {
        match serve_dns(args, dns, &mut inherited, &registry, &mut tasks) {
            Ok(()) => {}
            // The predecessor has handed over the data path and is draining: failing now
            // would leave the node without one. Without the DNS sockets, pods' DNS over UDP
            // goes to the servers they ask (fails open); over TCP it is still answered.
            Err(e) if took_over => error!(
                "DNS proxy sockets not served after the takeover (the predecessor still \
                 holds them: another --dns-proxy-addr or --dns-capture, or a build that did \
                 not hand them over): {e:#}; enrolled pods' DNS over UDP goes to the \
                 servers they ask until the next restart"
            ),
            Err(e) => return Err(e),
        }
    }
    if !inherited.is_empty() {
        warn!(addresses = ?inherited.unused(), "inherited listeners this configuration does not use: closed");
    }
    drop(inherited);
    let mut handed = handover::serve(&args.handover_socket(), registry.clone())?;
    info!(node = %args.node_name, admin = %args.admin_addr, "ztunnel ready");
    if args.release_startup_pages {
        tokio::task::spawn_blocking(|| match memory::release_startup_pages() {
            Ok(n) => debug!(
                mib = n >> 20,
                "start-up pages of the executable handed back"
            ),
            Err(e) => debug!("could not hand back start-up pages: {e}"),
        });
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let exit = tokio::select! {
        _ = term.recv() => { info!("SIGTERM: draining"); Exit::Stopped }
        _ = int.recv() => { info!("SIGINT: draining"); Exit::Stopped }
        _ = quit.notified() => { info!("/quitquitquit: draining"); Exit::Stopped }
        Ok(()) = &mut handed => { info!("a new ztunnel took over: draining"); Exit::HandedOver }
    };
    crate::drain::Drain {
        workers: &mut workers,
        registry: &registry,
        draining: &drain_tx,
        tasks: &mut tasks,
        connections: &connections,
        timeout: args.drain_timeout,
    }
    .run(exit)
    .await;
    if exit == Exit::HandedOver && args.kubernetes_enrollment() {
        // Exiting now would make the kubelet restart this container, and the restarted
        // process would take over from the new pod: wait for the pod's deletion instead.
        info!("handed over and drained: idle until this pod is deleted");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    drop(admin_state);
    drop(enroller);
    drop(workers);
    Ok(exit)
}

/// Policy and membership changes act on live connections too: after every state update,
/// each live connection is judged again and closed if it is no longer allowed.
async fn enforce_on_live_connections(store: Arc<StateStore>, connections: Arc<ConnectionTracker>) {
    let mut changes = store.subscribe();
    while changes.changed().await.is_ok() {
        connections.enforce(&store.snapshot());
    }
}

/// Keeps capture, enrollment and certificates in line with the state: on every change,
/// and periodically to attach to new interfaces and retry what failed.
async fn reconcile_loop(
    node: String,
    store: Arc<StateStore>,
    capture: Arc<Mutex<Capture>>,
    enroller: Arc<Enroller>,
    certs: Arc<SecretManager>,
    interval: Duration,
    kubernetes: bool,
) {
    let mut changes = enroller.changes();
    let mut state_changes = store.subscribe();
    loop {
        if let Err(e) = capture.lock().await.refresh().await {
            warn!("capture refresh failed: {e:#}");
        }
        enroller.reconcile().await;
        // The Citadel Agent role: hold certificates for exactly this node's workloads —
        // the enrolled pods (Kubernetes), or the mesh workloads the state places here.
        let wanted: BTreeSet<_> = if kubernetes {
            match enroller.identities() {
                Some(ids) => ids,
                None => {
                    let _ = tokio::time::timeout(interval, changes.changed()).await;
                    continue;
                }
            }
        } else {
            store
                .snapshot()
                .workloads_on_node(&node)
                .iter()
                .filter(|w| w.in_mesh())
                .map(|w| w.identity())
                .collect()
        };
        for id in &wanted {
            certs.prefetch(id);
        }
        for id in certs.identities() {
            if !wanted.contains(&id) {
                info!(identity = %id, "no workload of this node has this identity any more: certificate dropped");
                certs.forget(&id);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = changes.changed() => {}
            _ = state_changes.changed() => {}
        }
    }
}

/// The three HTTP endpoints, served alike.
#[derive(Clone, Copy)]
enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

impl Endpoint {
    async fn handle(
        self,
        state: Arc<AdminState>,
        req: admin::http::Req,
    ) -> hyper::Response<admin::http::Body> {
        match self {
            Endpoint::Admin => admin::admin(state, req).await,
            Endpoint::Metrics => admin::metrics(state, req).await,
            Endpoint::Readiness => admin::readiness(state, req).await,
        }
    }
}

/// Upgrades: when a ztunnel of this instance is running, wait (bounded) until this one
/// could serve as well as it does, then take its listening sockets.
async fn take_over(args: &RunArgs, state: &AdminState) -> anyhow::Result<handover::Inherited> {
    if !args.takeover {
        return Ok(handover::Inherited::default());
    }
    if !handover::is_running(&args.handover_socket()) {
        return Ok(handover::Inherited::default());
    }
    info!("a ztunnel of this instance is running: taking over once ready");
    let deadline = tokio::time::Instant::now() + args.takeover_ready_timeout;
    loop {
        let reasons = admin::not_ready(state);
        if reasons.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                ?reasons,
                "not ready after --takeover-ready-timeout: taking over anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Connect only now: the predecessor gives an idle request a few seconds, not our
    // whole start-up.
    let Some(predecessor) = handover::Predecessor::find(&args.handover_socket()) else {
        warn!("the running ztunnel went away before the takeover: binding afresh");
        return Ok(handover::Inherited::default());
    };
    let inherited = tokio::task::spawn_blocking(move || predecessor.take_listeners())
        .await?
        .context("taking over from the running ztunnel")?;
    info!(
        sockets = inherited.len(),
        "took over the running ztunnel's listeners"
    );
    Ok(inherited)
}
