//! The HBONE server side: accept CONNECT streams on an mTLS connection and hand each to a
//! handler that decides (policy, upstream dial) and then accepts or rejects it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{HeaderMap, Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::keepalive::Keepalive;
use super::SERVER_MAX_CONCURRENT_STREAMS;
use super::{forwarded_for, parse_authority, server_builder, source_port, H2Stream, HboneError};
use super::{HEADER_BAGGAGE, HEADER_TRACEPARENT};
use crate::identity::Identity;

/// A CONNECT request waiting for its answer. Call [`accept`](Self::accept) once the
/// upstream is connected, or [`reject`](Self::reject) with 401/403 (policy) or 503
/// (upstream unreachable). Dropped unanswered, it is answered 503.
pub struct InboundRequest {
    /// The destination from `:authority`.
    pub target: SocketAddr,
    pub headers: HeaderMap,
    /// The client's verified SPIFFE identity (from its mTLS certificate).
    pub peer: Identity,
    respond: Option<SendResponse<Bytes>>,
    body: Option<RecvStream>,
}

impl InboundRequest {
    /// The original client's address as the client *claims* it: the IP from
    /// `forwarded: for=`, the port from `ztunnel-source-port` (0 when not sent). Unverified:
    /// the inbound proxy believes it only where it is consistent with `peer`
    /// (`crate::proxy::source`).
    pub fn source(&self) -> Option<SocketAddr> {
        let ip = forwarded_for(&self.headers)?;
        Some(SocketAddr::new(ip, source_port(&self.headers).unwrap_or(0)))
    }

    pub fn baggage(&self) -> Option<&str> {
        self.headers
            .get(HEADER_BAGGAGE)
            .and_then(|v| v.to_str().ok())
    }

    pub fn traceparent(&self) -> Option<&str> {
        self.headers
            .get(HEADER_TRACEPARENT)
            .and_then(|v| v.to_str().ok())
    }

    /// Answers 200 and returns the tunnel's byte stream.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let mut respond = self.respond.take().expect("answered once");
        let body = self.body.take().expect("answered once");
        let send = respond.send_response(status_response(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, body))
    }

    /// Answers with an error status and ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        if let Some(respond) = self.respond.take() {
            answer(respond, status);
        }
    }
}

impl Drop for InboundRequest {
    fn drop(&mut self) {
        if let Some(respond) = self.respond.take() {
            answer(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

fn status_response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

fn answer(mut respond: SendResponse<Bytes>, status: StatusCode) {
    if let Err(e) = respond.send_response(status_response(status), true) {
        tracing::debug!(error = %e, %status, "could not answer HBONE request");
    }
}

/// Serves HTTP/2 on an accepted mTLS stream from `peer` until the client closes it. Each
/// valid CONNECT runs `handler` in its own task; malformed requests are answered here
/// (405 for other methods, 400 for a bad authority) without reaching the handler.
pub async fn serve_connection<IO, H, F>(
    io: IO,
    peer: Identity,
    handler: H,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(InboundRequest) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    serve_connection_until(io, peer, handler, std::future::pending()).await
}

/// [`serve_connection`] that, once `drain` completes, shuts down gracefully: GOAWAY tells
/// the client to open new streams elsewhere (a new ztunnel after an upgrade) while the
/// streams already running finish.
pub async fn serve_connection_until<IO, H, F>(
    io: IO,
    peer: Identity,
    handler: H,
    drain: impl Future<Output = ()>,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(InboundRequest) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    serve_connection_with(io, peer, handler, drain, ServerOptions::default()).await
}

/// Per-connection limits of the server side.
#[derive(Clone, Copy, Debug)]
pub struct ServerOptions {
    /// Streams at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams: u32,
    /// Streams the client may reset before they are accepted, then GOAWAY (rapid reset).
    pub max_pending_resets: usize,
    /// Streams the server may reset for the client's errors, then GOAWAY.
    pub max_local_resets: usize,
    /// PINGs to the client; an unanswered one closes the connection.
    pub keepalive: Option<Keepalive>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_streams: SERVER_MAX_CONCURRENT_STREAMS,
            // h2's defaults, said here so that a change of defaults cannot turn them off.
            max_pending_resets: 20,
            max_local_resets: 1024,
            keepalive: None,
        }
    }
}

/// h2 ended the connection itself, with ENHANCE_YOUR_CALM: one of its reset guards
/// (pending-accept or local-error resets) counted past its limit.
fn reset_guard_tripped(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_library() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
}

/// [`serve_connection_until`] within `opts`.
pub async fn serve_connection_with<IO, H, F>(
    io: IO,
    peer: Identity,
    handler: H,
    drain: impl Future<Output = ()>,
    opts: ServerOptions,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(InboundRequest) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let handler = Arc::new(handler);
    let mut conn = server_builder(&opts).handshake::<_, Bytes>(io).await?;
    let pings = opts.keepalive.and_then(|k| Some((conn.ping_pong()?, k)));
    let dead = std::pin::pin!(async move {
        match pings {
            Some((pp, k)) => super::keepalive::unanswered(pp, k).await,
            None => std::future::pending().await,
        }
    });
    let mut dead = dead.fuse();
    let drain = std::pin::pin!(drain);
    let mut drain = drain.fuse();
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            why = &mut dead => {
                tracing::debug!(%peer, %why, "HBONE connection closed");
                return Err(HboneError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, why)));
            }
            () = &mut drain => {
                tracing::debug!(%peer, "draining: GOAWAY sent");
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(next) = next else { break };
        let (request, respond) = match next {
            Ok(r) => r,
            Err(e) if e.is_reset() => continue, // one stream failed; the connection is fine
            Err(e) => {
                if reset_guard_tripped(&e) {
                    crate::limits::hit(
                        "hbone_resets",
                        format_args!("HBONE peer {peer} reset too many streams: GOAWAY"),
                    );
                }
                return Err(e.into());
            }
        };
        if request.method() != Method::CONNECT {
            answer(respond, StatusCode::METHOD_NOT_ALLOWED);
            continue;
        }
        let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let target = match parse_authority(authority) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "rejecting HBONE request");
                answer(respond, StatusCode::BAD_REQUEST);
                continue;
            }
        };
        let (parts, body) = request.into_parts();
        let inbound = InboundRequest {
            target,
            headers: parts.headers,
            peer: peer.clone(),
            respond: Some(respond),
            body: Some(body),
        };
        let handler = handler.clone();
        tokio::spawn(async move { handler(inbound).await });
    }
    Ok(())
}
