//! Inbound: connections addressed to this node's enrolled pods.
//!
//! - 15008 (HBONE): mTLS presenting the certificate of the pod the client dialed, the
//!   client's SPIFFE identity read from its certificate, then one CONNECT stream per
//!   tunnelled connection: authorize → connect to the pod (original source) → relay.
//! - 15006 (plaintext from outside the mesh): authorized with no identity (so policies
//!   that require one — strict mTLS — refuse it), then delivered the same way.
//!
//! A workload with a waypoint of its own accepts connections only from that waypoint's
//! identity (`through_waypoint`); they are then authorized with it as the source.
//!
//! The source address of an HBONE stream is what its client names only where that is
//! consistent with the client's identity (`super::source`); otherwise the stream is
//! refused (403). A destination pod whose workload record has not arrived yet (enrollment
//! ahead of xDS) is waited for, at most `ProxyContext::workload_wait`.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::labels::{End, Record};
use super::source::{tunnelled_source, Claim};
use super::{authorize, relay, relay_tunnel, ProxyContext};
use crate::connections::{Direction, Hbone, Outcome, Reason};
use crate::hbone::{forwarded_for, serve_connection_with, source_port, InboundRequest};
use crate::identity::Identity;
use crate::state::Workload;

/// A workload behind a waypoint of its own refuses what did not come through it.
fn through_waypoint(
    ctx: &ProxyContext,
    dst: &Workload,
    client: Option<&Identity>,
) -> Result<(), Reason> {
    match ctx.store.snapshot().skipped_waypoint(dst, client) {
        Some(gw) => Err(Reason::BypassedWaypoint(gw.to_string())),
        None => Ok(()),
    }
}

pub async fn handle_hbone(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    // Before anything else, handshakes in progress are bounded (in all and per client
    // address): one past the bound is closed unread, counted and logged by the limit
    // (not per connection, which a flood would turn into a flood of log lines).
    let Some(pending) = ctx.limits.admit(peer.ip()) else {
        return;
    };
    super::guards::set_tcp_keepalive(&stream, ctx.limits.tcp_keepalive);
    // A tunnel that never carried a stream is an attempt of its own: it is logged and
    // counted when it fails; each stream it carries is one afterwards.
    let failed = |dialed: Option<SocketAddr>, outcome: Outcome| {
        ctx.connections
            .accept(Direction::Inbound, peer, dialed)
            .finish(outcome)
    };
    let dialed = match (ctx.original_dst)(&stream) {
        Ok(d) => d,
        Err(e) => {
            return failed(
                None,
                Outcome::Failed(Reason::NoOriginalDestination(e.to_string())),
            )
        }
    };
    // Which pod the client dialed decides which certificate we present.
    let Some((_, workload)) = ctx.local_workload(dialed.ip(), Workload::in_mesh).await else {
        let why = Reason::NotLocalWorkload(dialed.ip().to_string());
        return failed(Some(dialed), Outcome::Denied(why));
    };
    let identity = workload.identity();
    let cert = match ctx.certs.fetch(&identity).await {
        Ok(c) => c,
        // Fail closed: without its certificate the pod accepts no mesh traffic.
        Err(e) => {
            let why = Reason::NoCertificate {
                identity: identity.to_string(),
                error: e.to_string(),
            };
            return failed(Some(dialed), Outcome::Denied(why));
        }
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
        Ok(Err(e)) => {
            return failed(
                Some(dialed),
                Outcome::Failed(Reason::Handshake(e.to_string())),
            )
        }
        Err(_) => {
            return failed(
                Some(dialed),
                Outcome::Failed(Reason::Handshake("timed out".into())),
            )
        }
    };
    drop(pending);
    // Authenticated connections are bounded too (in all, and per client address and
    // identity): each holds buffers and may hold a connection window of undelivered data.
    let Some(_place) = ctx.limits.admit_connection(peer.ip(), &client) else {
        return;
    };
    // (A client of a foreign trust domain was refused by the handshake: tls::verifier.)
    debug!(%peer, client = %client, server = %identity, "HBONE connection");
    let handler_ctx = ctx.clone();
    let drained = ctx.drained();
    let result = serve_connection_with(
        tls,
        client,
        move |req| deliver(handler_ctx.clone(), workload.clone(), peer, req),
        drained,
        ctx.limits.server,
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
    let client = req.peer.clone();
    let state = ctx.store.snapshot();
    let claim = Claim {
        ip: forwarded_for(&req.headers),
        port: source_port(&req.headers),
    };
    let src = tunnelled_source(
        &state,
        &dialed,
        &client,
        tunnel,
        claim,
        &*ctx.is_node_address,
    );
    // Refused claims are recorded with the address the stream really came from.
    let recorded = src.clone().unwrap_or(SocketAddr::new(tunnel.ip(), 0));
    let mut conn = ctx
        .connections
        .accept(Direction::Inbound, recorded, Some(target));
    // The tunnel was authenticated as this pod: it may only carry traffic to this pod.
    if !dialed.workload_ips.contains(&target.ip().to_canonical()) {
        req.reject(StatusCode::BAD_REQUEST);
        return conn.finish(Outcome::Denied(Reason::WrongTarget(target.to_string())));
    }
    let src = match src {
        Ok(src) => src,
        Err(why) => {
            info!(%tunnel, peer = %client, %claim, "refusing an HBONE stream: {why}");
            req.reject(StatusCode::FORBIDDEN);
            return conn.finish(Outcome::Denied(Reason::UntrustedSource(why)));
        }
    };
    let source = state.workload_by_ip(src.ip());
    let server_id = dialed.identity();
    let service = state.guess_inbound_service(&dialed, target.port());
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
        service: service.as_deref(),
        dst_addr: target,
        target,
        hbone: Some(Hbone {
            tunnel: SocketAddr::new(target.ip(), ctx.hbone_port),
            authority: target,
        }),
    };
    if let Err(denied) = through_waypoint(&ctx, &dialed, Some(&client)) {
        conn.identify(record.info(), record.labels(), None);
        req.reject(StatusCode::UNAUTHORIZED);
        return conn.finish(Outcome::Denied(denied));
    }
    let authz = match authorize(&ctx, Some(&client), src.ip(), target, &dialed) {
        Ok(a) => a,
        Err(denied) => {
            conn.identify(record.info(), record.labels(), None);
            req.reject(StatusCode::UNAUTHORIZED);
            return conn.finish(Outcome::Denied(denied));
        }
    };
    conn.identify(record.info(), record.labels(), Some(authz));
    let up = match dial_upstream(&ctx, src, target).await {
        Ok(s) => s,
        Err(e) => {
            req.reject(StatusCode::SERVICE_UNAVAILABLE);
            return conn.finish(Outcome::Failed(Reason::UpstreamConnect(e.to_string())));
        }
    };
    let tunnel_stream = match req.accept() {
        Ok(s) => s,
        Err(e) => return conn.finish(Outcome::Failed(Reason::Client(e.to_string()))),
    };
    let relay = relay_tunnel(conn.count_upstream(up), tunnel_stream);
    conn.relay(relay).await
}

/// The dial to the pod, bounded by `--upstream-connect-timeout`.
async fn dial_upstream(
    ctx: &ProxyContext,
    src: SocketAddr,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
    let timeout = ctx.limits.upstream_connect_timeout;
    match tokio::time::timeout(timeout, ctx.dialer.connect(Some(src), target)).await {
        Ok(r) => r,
        Err(_) => {
            crate::limits::hit(
                "upstream_connect_timeout",
                format_args!("a dial to {target} took longer than {timeout:?}"),
            );
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            ))
        }
    }
}

pub async fn handle_plaintext(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let dst = (ctx.original_dst)(&stream);
    let mut conn = ctx
        .connections
        .accept(Direction::Inbound, peer, dst.as_ref().ok().copied());
    let dst = match dst {
        Ok(d) => d,
        Err(e) => {
            return conn.finish(Outcome::Failed(Reason::NoOriginalDestination(
                e.to_string(),
            )))
        }
    };
    let Some((_, workload)) = ctx.local_workload(dst.ip(), |_| true).await else {
        return conn.finish(Outcome::Denied(Reason::NotLocalWorkload(
            dst.ip().to_string(),
        )));
    };
    let state = ctx.store.snapshot();
    let source = state.workload_by_ip(peer.ip());
    let service = state.guess_inbound_service(&workload, dst.port());
    let dst_id = workload.identity();
    let record = plaintext_record(peer, dst, source.as_deref(), &workload, &dst_id)
        .through(service.as_deref());
    // Closing the accepted socket is the refusal.
    let authz = match authorize_plaintext(&ctx, peer, dst, &workload) {
        Ok(a) => a,
        Err(denied) => {
            conn.identify(record.info(), record.labels(), None);
            return conn.finish(Outcome::Denied(denied));
        }
    };
    conn.identify(record.info(), record.labels(), Some(authz));
    let up = match ctx.dialer.connect(Some(peer), dst).await {
        Ok(s) => s,
        Err(e) => return conn.finish(Outcome::Failed(Reason::UpstreamConnect(e.to_string()))),
    };
    let relay = relay(conn.count(stream), up);
    conn.relay(relay).await
}

/// The checks of a plaintext connection from `peer` (no identity) to `workload`: policies
/// that require an identity (strict mTLS) refuse it, and so does a waypoint of the
/// workload's own. Also what the last hop asks of a forwarded connection.
pub(super) fn authorize_plaintext(
    ctx: &ProxyContext,
    peer: SocketAddr,
    dst: SocketAddr,
    workload: &Workload,
) -> Result<crate::connections::Authz, Reason> {
    through_waypoint(ctx, workload, None)?;
    authorize(ctx, None::<&Identity>, peer.ip(), dst, workload)
}

/// How a plaintext connection from `peer` to `workload` at `dst` is recorded.
pub(super) fn plaintext_record<'a>(
    peer: SocketAddr,
    dst: SocketAddr,
    source: Option<&'a Workload>,
    workload: &'a Workload,
    dst_id: &'a Identity,
) -> Record<'a> {
    Record {
        direction: Direction::Inbound,
        src: End {
            addr: Some(peer),
            workload: source,
            identity: None,
        },
        dst: End {
            addr: Some(dst),
            workload: Some(workload),
            identity: Some(dst_id),
        },
        service: None,
        dst_addr: dst,
        target: dst,
        hbone: None,
    }
}
