//! Inbound: connections addressed to this node's enrolled pods.
//!
//! - 15008 (HBONE): mTLS presenting the certificate of the pod the client dialed, the
//!   client's SPIFFE identity read from its certificate, then one CONNECT stream per
//!   tunnelled connection: authorize → connect to the pod (original source) → relay.
//! - 15006 (plaintext from outside the mesh): authorized with no identity (so policies
//!   that require one — strict mTLS — refuse it), then delivered the same way.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::labels::{End, Record};
use super::{authorize, relay, relay_tunnel, socket, ProxyContext};
use crate::connections::Direction;
use crate::hbone::{serve_connection_until, InboundRequest};
use crate::identity::Identity;
use crate::state::Workload;

/// The local, in-mesh workload owning `ip`, if it is one of this node's.
fn local_workload(ctx: &ProxyContext, ip: IpAddr) -> Option<Arc<Workload>> {
    ctx.store
        .snapshot()
        .workload_by_ip(ip)
        .filter(|w| w.node == ctx.node)
}

pub async fn handle_hbone(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let dialed = match socket::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => return warn!("no original destination: {e}"),
    };
    // Which pod the client dialed decides which certificate we present.
    let Some(workload) = local_workload(&ctx, dialed.ip()).filter(|w| w.in_mesh()) else {
        return info!(%peer, %dialed, "HBONE to an address that is no mesh workload of this node: closed");
    };
    let identity = workload.identity();
    let cert = match ctx.certs.fetch(&identity).await {
        Ok(c) => c,
        // Fail closed: without its certificate the pod accepts no mesh traffic.
        Err(e) => return warn!(%peer, %identity, "no certificate, refusing HBONE: {e}"),
    };
    let config = match crate::tls::server_config(&cert) {
        Ok(c) => c,
        Err(e) => return warn!(%identity, "TLS server config: {e}"),
    };
    // A client that connects and sends nothing must not hold a task and a socket forever.
    let accepted =
        tokio::time::timeout(ctx.handshake_timeout, crate::tls::accept(config, stream)).await;
    let (tls, client) = match accepted {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return info!(%peer, %identity, "mTLS handshake failed: {e}"),
        Err(_) => return info!(%peer, %identity, "mTLS handshake timed out"),
    };
    // (A client of a foreign trust domain was refused by the handshake: tls::verifier.)
    debug!(%peer, client = %client, server = %identity, "HBONE connection");
    let handler_ctx = ctx.clone();
    let drained = ctx.drained();
    let result = serve_connection_until(
        tls,
        client,
        move |req| deliver(handler_ctx.clone(), workload.clone(), peer, req),
        drained,
    )
    .await;
    if let Err(e) = result {
        debug!(%peer, "HBONE connection ended: {e}");
    }
}

async fn deliver(
    ctx: Arc<ProxyContext>,
    dialed: Arc<Workload>,
    tunnel: SocketAddr,
    req: InboundRequest,
) {
    let target = req.target;
    // The tunnel was authenticated as this pod: it may only carry traffic to this pod.
    if !dialed.workload_ips.contains(&target.ip().to_canonical()) {
        info!(%tunnel, %target, workload = %dialed.uid, "CONNECT to another address than the dialed pod: 400");
        return req.reject(StatusCode::BAD_REQUEST);
    }
    let src = req.source().unwrap_or(SocketAddr::new(tunnel.ip(), 0));
    let src_ip = src.ip();
    let client = req.peer.clone();
    let state = ctx.store.snapshot();
    let source = state.workload_by_ip(src_ip);
    if !authorize(&ctx, Some(&client), src_ip, target, &dialed) {
        return req.reject(StatusCode::UNAUTHORIZED);
    }
    let server_id = dialed.identity();
    let record = Record {
        direction: Direction::Inbound,
        src: End {
            addr: Some(src),
            workload: source.as_deref(),
            identity: Some(&client),
        },
        dst: End {
            addr: Some(target),
            workload: Some(&dialed),
            identity: Some(&server_id),
        },
        service: None,
        dst_addr: target,
        target,
        mtls: true,
    };
    let up = match ctx.dialer.connect(Some(src), target).await {
        Ok(s) => s,
        Err(e) => {
            info!(%src, %target, "delivery to the pod failed: {e}");
            return req.reject(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let mut guard = ctx.connections.open(record.info(), record.labels());
    let tunnel_stream = match req.accept() {
        Ok(s) => s,
        Err(e) => return guard.set_outcome(format!("answering CONNECT failed: {e}")),
    };
    match relay_tunnel(guard.count_upstream(up), tunnel_stream).await {
        Ok(_) => guard.set_outcome("ok"),
        Err(e) => guard.set_outcome(format!("error: {e}")),
    }
}

pub async fn handle_plaintext(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let dst = match socket::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => return warn!("no original destination: {e}"),
    };
    let Some(workload) = local_workload(&ctx, dst.ip()) else {
        return info!(%peer, %dst, "plaintext to an address that is no workload of this node: closed");
    };
    if !authorize(&ctx, None::<&Identity>, peer.ip(), dst, &workload) {
        return; // closing the accepted socket refuses the connection
    }
    let source = ctx.store.snapshot().workload_by_ip(peer.ip());
    let dst_id = workload.identity();
    let record = Record {
        direction: Direction::Inbound,
        src: End {
            addr: Some(peer),
            workload: source.as_deref(),
            identity: None,
        },
        dst: End {
            addr: Some(dst),
            workload: Some(&workload),
            identity: Some(&dst_id),
        },
        service: None,
        dst_addr: dst,
        target: dst,
        mtls: false,
    };
    let up = match ctx.dialer.connect(Some(peer), dst).await {
        Ok(s) => s,
        Err(e) => return info!(%peer, %dst, "delivery to the pod failed: {e}"),
    };
    let mut guard = ctx.connections.open(record.info(), record.labels());
    match relay(guard.count(stream), up).await {
        Ok(_) => guard.set_outcome("ok"),
        Err(e) => guard.set_outcome(format!("error: {e}")),
    }
}
