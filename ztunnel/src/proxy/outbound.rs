//! Outbound (15001): connections enrolled pods open, captured with their original
//! destination as the accepted socket's local address.
//!
//! identify (source by its address, destination by resolving the original destination)
//! → in the mesh on another node: HBONE through the pool, presenting the source's
//!   certificate and requiring the destination's identity;
//! → in the mesh on this node: the same identity checks, delivered directly;
//! → outside the mesh: plain passthrough with the pod's address as source.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::labels::{End, Record};
use super::{authorize, relay, relay_tunnel, socket, ProxyContext};
use crate::connections::Direction;
use crate::hbone::ConnectRequest;
use crate::identity::Identity;
use crate::pool::PoolKey;
use crate::state::{Upstream, Workload};

pub async fn handle(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let dst = match socket::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => return warn!("no original destination: {e}"),
    };
    if ctx.listen_ports.contains(&dst.port()) && is_local(dst) {
        return debug!(%peer, %dst, "refusing a connection to our own listener");
    }
    // Identify.
    let state = ctx.store.snapshot();
    let source = state
        .workload_by_ip(peer.ip())
        .filter(|w| w.node == ctx.node && w.in_mesh());
    let upstream = match state.resolve(dst) {
        Ok(u) => u,
        Err(e) => return info!(%peer, %dst, "refused: {e}"),
    };
    match (source, upstream) {
        (Some(src), Some(up)) if up.in_mesh() => {
            if up.workload.node == ctx.node {
                same_node(&ctx, stream, peer, dst, &src, &up).await
            } else {
                hbone(&ctx, stream, peer, dst, &src, &up).await
            }
        }
        (src, up) => {
            let target = up.as_ref().map(|u| u.address).unwrap_or(dst);
            let record = Record {
                direction: Direction::Outbound,
                src: End {
                    addr: Some(peer),
                    workload: src.as_deref(),
                    identity: None,
                },
                dst: End {
                    addr: Some(target),
                    workload: up.as_ref().map(|u| &*u.workload),
                    identity: None,
                },
                service: up.as_ref().and_then(|u| u.service.as_deref()),
                dst_addr: dst,
                target,
                mtls: false,
            };
            deliver(&ctx, stream, peer, record).await
        }
    }
}

/// The identities the destination may present: its workload's, or any of the
/// service's subjectAltNames.
fn expected_identities(up: &Upstream) -> Vec<Identity> {
    let mut ids = vec![up.workload.identity()];
    if let Some(svc) = &up.service {
        ids.extend(svc.subject_alt_names.iter().filter_map(|s| s.parse().ok()));
    }
    ids
}

/// What a connection between two mesh workloads is recorded as (both paths alike).
fn mesh_record<'a>(
    peer: SocketAddr,
    dst: SocketAddr,
    src: &'a Workload,
    src_id: &'a Identity,
    up: &'a Upstream,
    dst_id: &'a Identity,
) -> Record<'a> {
    Record {
        direction: Direction::Outbound,
        src: End {
            addr: Some(peer),
            workload: Some(src),
            identity: Some(src_id),
        },
        dst: End {
            addr: Some(up.address),
            workload: Some(&up.workload),
            identity: Some(dst_id),
        },
        service: up.service.as_deref(),
        dst_addr: dst,
        target: up.address,
        mtls: true,
    }
}

async fn hbone(
    ctx: &ProxyContext,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: &Workload,
    up: &Upstream,
) {
    let src_id = src.identity();
    let dst_ids = expected_identities(up);
    let key = PoolKey::new(
        src_id.clone(),
        dst_ids,
        SocketAddr::new(up.address.ip(), ctx.hbone_port),
    );
    let mut req = ConnectRequest::new(up.address);
    req.source = Some(peer);
    let dst_id = up.workload.identity();
    let record = mesh_record(peer, dst, src, &src_id, up, &dst_id);
    // Client-speaks-first protocols (HTTP, TLS) have usually sent their first bytes by
    // now: they travel with the CONNECT, saving the client a round trip between nodes.
    // At most one read's worth (`socket::ARRIVED_MAX`); the rest follows in the relay.
    let early = match socket::take_arrived(&stream) {
        Ok(b) => b,
        Err(e) => return debug!(%peer, %dst, "client connection failed before tunnelling: {e}"),
    };
    let tunnel = match ctx.pool.connect_with_data(&key, &req, &early).await {
        Ok(t) => t,
        // Closing the pod's connection is the only answer TCP has; the reason is logged.
        Err(e) => return info!(%peer, %dst, target = %up.address, "HBONE connect failed: {e}"),
    };
    let mut guard = ctx.connections.open(record.info(), record.labels());
    guard.add_sent(early.len() as u64);
    match relay_tunnel(guard.count(stream), tunnel).await {
        Ok(_) => guard.set_outcome("ok"),
        Err(e) => guard.set_outcome(format!("error: {e}")),
    }
}

/// Both pods on this node: no network trip, but the same checks as a tunnel — both
/// workloads must have their certificates (fail closed as HBONE would) and the
/// destination's policies must allow the source's identity.
async fn same_node(
    ctx: &ProxyContext,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: &Workload,
    up: &Upstream,
) {
    let src_id = src.identity();
    let dst_id = up.workload.identity();
    for id in [&src_id, &dst_id] {
        if let Err(e) = ctx.certs.fetch(id).await {
            return warn!(%peer, %dst, identity = %id, "no certificate, refusing: {e}");
        }
    }
    if !authorize(ctx, Some(&src_id), peer.ip(), up.address, &up.workload) {
        return;
    }
    let record = mesh_record(peer, dst, src, &src_id, up, &dst_id);
    deliver(ctx, stream, peer, record).await
}

/// Connects to the target with the pod's address as source and relays.
async fn deliver(ctx: &ProxyContext, stream: TcpStream, peer: SocketAddr, record: Record<'_>) {
    let target = record.target;
    let up = match ctx.dialer.connect(Some(peer), target).await {
        Ok(s) => s,
        Err(e) => return info!(%peer, %target, "upstream connect failed: {e}"),
    };
    let mut guard = ctx.connections.open(record.info(), record.labels());
    match relay(guard.count(stream), up).await {
        Ok(_) => guard.set_outcome("ok"),
        Err(e) => guard.set_outcome(format!("error: {e}")),
    }
}

fn is_local(dst: SocketAddr) -> bool {
    // Binding to an address succeeds only if it is ours (without IP_TRANSPARENT).
    std::net::TcpListener::bind(SocketAddr::new(dst.ip(), 0)).is_ok()
}
