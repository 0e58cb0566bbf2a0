//! `ztunnel controlplane`: a minimal stand-in for istiod for clusters without one. It
//! serves Istio's CA API (what node proxies use to get their workloads' certificates) from
//! the built-in CA, and Istio's delta xDS (workloads, services, policies) on the same port;
//! both come from the same local YAML file the node proxies can read standalone.

pub mod ca_server;
pub mod guard;
pub mod tokens;
pub mod xds_server;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::info;

pub use ca_server::{
    serve, serve_with_limits, serve_with_xds, serving_ips, CaService, RunningCaServer,
};
pub use tokens::Tokens;

use crate::config::ControlplaneArgs;
use crate::identity::ca::{CaOptions, CertificateAuthority, ROOT_CERT_FILE};

/// The name node proxies dial in a cluster (`CA_ADDRESS=https://istiod.istio-system.svc:15012`).
pub const ISTIOD_DNS_NAME: &str = "istiod.istio-system.svc";

/// How often the workload and token files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// How often freed memory is handed back to the kernel (glibc's malloc_trim).
const MALLOC_TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Validity of the CA's own TLS certificate (a new one is made at every start).
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Runs the control plane until SIGTERM or SIGINT.
pub async fn run(args: ControlplaneArgs) -> anyhow::Result<()> {
    let mut opts = CaOptions::new(&args.trust_domain);
    opts.dir = Some(args.ca_dir.clone());
    opts.max_ttl = args.max_cert_ttl;
    opts.default_ttl = opts.default_ttl.min(opts.max_ttl);
    let ca = Arc::new(CertificateAuthority::new(opts).context("loading or creating the CA root")?);
    let root_path = args.ca_dir.join(ROOT_CERT_FILE);
    info!(path = %root_path.display(), "CA root certificate (give this file to the node proxies as CA_ROOT_CA)");

    let workloads = crate::xds::watch_every(&args.config, RELOAD_INTERVAL)?;
    let tokens = tokens::watch_tokens(&args.tokens_file, &args.trust_domain, RELOAD_INTERVAL)?;

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let cert = ca.issue_server_cert(
        &serving_ips(args.listen),
        &[ISTIOD_DNS_NAME.to_string(), "localhost".to_string()],
        SERVING_CERT_TTL,
    )?;
    let xds = xds_server::XdsService::with_limits(tokens.clone(), workloads.clone(), &args.limits);
    let ca_service = CaService::new(ca, tokens, workloads);
    let server = serve_with_limits(ca_service, Some(xds), listener, &cert, &args.limits)?;
    // As the node proxy does: memory freed after a burst (a flood of calls, a large xDS
    // request) goes back to the kernel instead of staying in glibc's arenas.
    tokio::spawn(crate::memory::return_freed_memory(MALLOC_TRIM_INTERVAL));
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr).await?;
    }
    info!(addr = %server.local_addr(), max_cert_ttl = ?args.max_cert_ttl, "serving istio.v1.auth.IstioCertificateService and delta xDS (AggregatedDiscoveryService)");

    wait_for_signal().await?;
    info!("shutting down");
    server.shutdown().await
}

/// `/metrics`: the limits' refusal counters (`ztunnel_limit_hits_total`), in the same
/// HTTP server (and limits) as the node proxy's metrics.
async fn serve_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.sub_registry_with_prefix("ztunnel").register(
        "limit_hits",
        "Work refused because a limit was reached, or a call without a valid token, by limit",
        crate::limits::HITS.clone(),
    );
    let registry = Arc::new(registry);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let handler = Arc::new(move |_req: crate::admin::http::Req| {
        let registry = registry.clone();
        async move {
            let mut text = String::new();
            let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
            crate::admin::http::text(hyper::StatusCode::OK, text)
        }
    });
    tokio::spawn(crate::admin::http::serve(
        listener,
        handler,
        crate::config::HttpLimits::default(),
    ));
    info!(%addr, "serving metrics");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod limits_tests;
