//! Outbound (15001): connections enrolled pods open, captured with their original
//! destination as the accepted socket's local address.
//!
//! accept → plan (`route`: from the state alone) → carry the plan out:
//! → in the mesh on another node: HBONE through the pool, presenting the source's
//!   certificate and requiring the destination's identity;
//! → in the mesh on this node: the same identity checks and the destination's policies,
//!   delivered directly;
//! → behind a waypoint: HBONE to the waypoint, asking it for the original destination;
//! → outside the mesh: plain passthrough with the pod's address as source;
//! → an endpoint known by hostname only: looked up (bounded), then one of the above;
//! → refused: nothing dialed.
//! Each path finishes the attempt's [`ConnectionResult`] exactly once.
//!
//! Only enrolled pods' connections reach this listener, so a source the state has no mesh
//! workload of this node for is one whose record has not arrived yet (Kubernetes
//! enrollment runs ahead of xDS): it is waited for (`ProxyContext::workload_wait`), then
//! refused (`unknown_source_workload`), never passed in plaintext.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::debug;

use super::labels::{End, Record};
use super::route::{Refusal, Route};
use super::{authorize, relay, relay_tunnel, socket, ProxyContext};
use crate::connections::{Authz, ConnectionResult, Direction, Hbone, Outcome, Reason};
use crate::dns::metrics::{OnDemandLabels, DNS};
use crate::hbone::ConnectRequest;
use crate::identity::Identity;
use crate::pool::PoolKey;
use crate::state::{ResolveError, Service, Unresolved, Upstream, WaypointHop, Workload};

pub async fn handle(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let dst = (ctx.original_dst)(&stream);
    // DNS over TCP, to whatever server the pod asked: the DNS proxy answers as that
    // server (the connection is already the pod's, to that address).
    if let (Ok(d), Some(dns)) = (&dst, &ctx.dns) {
        if d.port() == 53 {
            return dns.serve_captured_tcp(stream, peer).await;
        }
    }
    let conn = ctx
        .connections
        .accept(Direction::Outbound, peer, dst.as_ref().ok().copied());
    let dst = match dst {
        Ok(d) => d,
        Err(e) => {
            return conn.finish(Outcome::Failed(Reason::NoOriginalDestination(
                e.to_string(),
            )))
        }
    };
    let Some((state, _)) = ctx.local_workload(peer.ip(), Workload::in_mesh).await else {
        return conn.finish(Outcome::Denied(Reason::UnknownSourceWorkload(
            peer.ip().to_string(),
        )));
    };
    let route = ctx.planner().plan(&state, peer, dst);
    carry_out(&ctx, conn, stream, peer, dst, route).await
}

async fn carry_out(
    ctx: &ProxyContext,
    conn: ConnectionResult,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    route: Route,
) {
    match route {
        Route::Hbone { src, up } => hbone(ctx, conn, stream, peer, dst, &src, &up).await,
        Route::SameNode { src, up } => same_node(ctx, conn, stream, peer, dst, &src, &up).await,
        Route::Waypoint {
            src,
            hop,
            dst,
            service,
        } => waypoint(ctx, conn, stream, peer, dst, &src, &hop, service.as_deref()).await,
        Route::Passthrough { src, up, target } => {
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
                hbone: None,
            };
            deliver(ctx, conn, stream, peer, &record, None).await
        }
        Route::Lookup { src, endpoint } => {
            let labels = OnDemandLabels::new(src.as_deref(), endpoint.hostname());
            DNS.on_demand.get_or_create(&labels).inc();
            let route = match lookup(ctx, &endpoint).await {
                Ok(up) => ctx.planner().to_endpoint(src, Some(up), dst),
                Err(e) => {
                    return refuse_unresolved(conn, peer, dst, src.as_deref(), &endpoint, e);
                }
            };
            // Never another lookup: `to_endpoint` plans for an address.
            Box::pin(carry_out(ctx, conn, stream, peer, dst, route)).await
        }
        Route::Refuse(r) => conn.finish(Outcome::Denied(match r {
            Refusal::OwnListener => Reason::OwnListener,
            Refusal::NoEndpoint(e) => Reason::NoEndpoint(e),
            Refusal::NoWaypoint(e) => Reason::NoWaypoint(e),
        })),
    }
}

/// The endpoint at an address its hostname has now. Bounded (`dns::LOOKUP_TIMEOUT`): a
/// resolver that does not answer refuses the connection, it never hangs it.
async fn lookup(ctx: &ProxyContext, endpoint: &Unresolved) -> Result<Upstream, ResolveError> {
    let hostname = endpoint.hostname();
    let found = ctx
        .resolver
        .lookup(hostname)
        .await
        .map_err(|e| endpoint.failed(e))?;
    let up = endpoint.clone().found(&found, &mut rand::rng())?;
    debug!(%hostname, ?found, picked = %up.address, "looked up the endpoint");
    Ok(up)
}

/// The access log's line for a connection whose endpoint could not be looked up: what
/// was dialed, the service and the endpoint's workload, and why.
fn refuse_unresolved(
    mut conn: ConnectionResult,
    peer: SocketAddr,
    dst: SocketAddr,
    src: Option<&Workload>,
    endpoint: &Unresolved,
    e: ResolveError,
) {
    let record = Record {
        direction: Direction::Outbound,
        src: End {
            addr: Some(peer),
            workload: src,
            identity: None,
        },
        dst: End {
            addr: None,
            workload: Some(&endpoint.workload),
            identity: None,
        },
        service: endpoint.service.as_deref(),
        dst_addr: dst,
        target: dst,
        hbone: None,
    };
    conn.identify(record.info(), record.labels(), None);
    conn.finish(Outcome::Denied(Reason::NoEndpoint(e.to_string())))
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
    hbone_port: u16,
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
        hbone: Some(Hbone {
            tunnel: SocketAddr::new(up.address.ip(), hbone_port),
            authority: up.address,
        }),
    }
}

async fn hbone(
    ctx: &ProxyContext,
    mut conn: ConnectionResult,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: &Workload,
    up: &Upstream,
) {
    let src_id = src.identity();
    let key = PoolKey::new(
        src_id.clone(),
        expected_identities(up),
        SocketAddr::new(up.address.ip(), ctx.hbone_port),
    );
    let mut req = ConnectRequest::new(up.address);
    req.source = Some(peer);
    let dst_id = up.workload.identity();
    let record = mesh_record(ctx.hbone_port, peer, dst, src, &src_id, up, &dst_id);
    // Authorization is the destination node's (it knows the policies of its pods).
    conn.identify(record.info(), record.labels(), None);
    tunnel(ctx, conn, stream, &key, &req).await
}

/// Through the destination's waypoint: HBONE to the waypoint with the source's
/// certificate, requiring the waypoint's identity. The waypoint picks the endpoint, so the
/// authority is what the pod dialed (a service VIP and port, or a workload's address and
/// port). No policy is evaluated here: the waypoint applies its own, then the destination
/// node applies the workload's with the waypoint's identity as the source, as in Istio.
#[allow(clippy::too_many_arguments)]
async fn waypoint(
    ctx: &ProxyContext,
    mut conn: ConnectionResult,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: &Workload,
    hop: &WaypointHop,
    service: Option<&Service>,
) {
    let src_id = src.identity();
    let wp_id = hop.workload.identity();
    let record = Record {
        direction: Direction::Outbound,
        src: End {
            addr: Some(peer),
            workload: Some(src),
            identity: Some(&src_id),
        },
        // The next hop is the waypoint; the service is still the one dialed.
        dst: End {
            addr: Some(hop.address),
            workload: Some(&hop.workload),
            identity: Some(&wp_id),
        },
        service,
        dst_addr: dst,
        target: hop.address,
        // The waypoint picks the endpoint: it is asked for what the pod dialed.
        hbone: Some(Hbone {
            tunnel: hop.address,
            authority: dst,
        }),
    };
    conn.identify(record.info(), record.labels(), None);
    debug!(%peer, %dst, waypoint = %hop.gateway, via = %hop.address, "through the waypoint");
    let key = PoolKey::new(src_id.clone(), hop.identities(), hop.address);
    let mut req = ConnectRequest::new(dst);
    req.source = Some(peer);
    tunnel(ctx, conn, stream, &key, &req).await
}

/// Opens an HBONE stream (pooled connection) for `req` and relays the pod's connection
/// through it.
async fn tunnel(
    ctx: &ProxyContext,
    conn: ConnectionResult,
    stream: TcpStream,
    key: &PoolKey,
    req: &ConnectRequest,
) {
    // Client-speaks-first protocols (HTTP, TLS) have usually sent their first bytes by
    // now: they travel with the CONNECT, saving the client a round trip between nodes.
    // At most one read's worth (`socket::ARRIVED_MAX`); the rest follows in the relay.
    let early = match socket::take_arrived(&stream) {
        Ok(b) => b,
        Err(e) => return conn.finish(Outcome::Failed(Reason::Client(e.to_string()))),
    };
    let tunnel = match ctx.pool.connect_with_data(key, req, &early).await {
        Ok(t) => t,
        // Closing the pod's connection is the only answer TCP has; the reason is logged.
        Err(e) => return conn.finish(Outcome::Failed(Reason::TunnelConnect(e.to_string()))),
    };
    conn.add_sent(early.len() as u64);
    let relay = relay_tunnel(conn.count(stream), tunnel);
    conn.relay(relay).await
}

/// Both pods on this node: no network trip, but the same checks as a tunnel — both
/// workloads must have their certificates (fail closed as HBONE would) and the
/// destination's policies must allow the source's identity.
async fn same_node(
    ctx: &ProxyContext,
    conn: ConnectionResult,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    src: &Workload,
    up: &Upstream,
) {
    let src_id = src.identity();
    let dst_id = up.workload.identity();
    let record = mesh_record(ctx.hbone_port, peer, dst, src, &src_id, up, &dst_id);
    for id in [&src_id, &dst_id] {
        if let Err(e) = ctx.certs.fetch(id).await {
            let mut conn = conn;
            conn.identify(record.info(), record.labels(), None);
            return conn.finish(Outcome::Denied(Reason::NoCertificate {
                identity: id.to_string(),
                error: e.to_string(),
            }));
        }
    }
    match authorize(ctx, Some(&src_id), peer.ip(), up.address, &up.workload) {
        Ok(authz) => deliver(ctx, conn, stream, peer, &record, Some(authz)).await,
        Err(denied) => {
            let mut conn = conn;
            conn.identify(record.info(), record.labels(), None);
            conn.finish(Outcome::Denied(denied))
        }
    }
}

/// Connects to the target with the pod's address as source and relays. `authz`: what
/// the destination's policies allowed, for connections they apply to.
async fn deliver(
    ctx: &ProxyContext,
    mut conn: ConnectionResult,
    stream: TcpStream,
    peer: SocketAddr,
    record: &Record<'_>,
    authz: Option<Authz>,
) {
    conn.identify(record.info(), record.labels(), authz);
    let up = match ctx.dialer.connect(Some(peer), record.target).await {
        Ok(s) => s,
        Err(e) => return conn.finish(Outcome::Failed(Reason::UpstreamConnect(e.to_string()))),
    };
    let relay = relay(conn.count(stream), up);
    conn.relay(relay).await
}
