//! What stands in front of the control plane's services: the bearer token is checked in an
//! interceptor, from the request's headers, before the service is called — so before any
//! of the body is read or decoded — and the listener holds at most so many connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tonic::metadata::MetadataMap;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Status};

use super::tokens::{digest, Caller, Digest, Tokens};
use crate::limits::{self, Cap};

/// Unauthenticated calls refused (a counter like the limits', so floods show in metrics).
pub const UNAUTHENTICATED: &str = "controlplane_unauthenticated";

/// Who the interceptor found the caller to be; in the request's extensions for the service.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub caller: Caller,
    /// The token's digest: what a stream re-checks when the tokens change.
    pub token: Digest,
}

/// The interceptor: refuses a call whose `authorization: Bearer <token>` names no caller.
#[derive(Clone)]
pub struct Authenticate {
    tokens: watch::Receiver<Arc<Tokens>>,
}

impl Authenticate {
    pub fn new(tokens: watch::Receiver<Arc<Tokens>>) -> Self {
        Authenticate { tokens }
    }

    pub fn check(&self, metadata: &MetadataMap) -> Result<Authenticated, Status> {
        let refuse = |status: Status| {
            limits::hit(
                UNAUTHENTICATED,
                format_args!(
                    "call refused before its body was read: {}",
                    status.message()
                ),
            );
            status
        };
        let token = digest(&bearer_token(metadata).map_err(refuse)?);
        let caller = self
            .tokens
            .borrow()
            .caller_of_digest(&token)
            .cloned()
            .ok_or_else(|| refuse(Status::unauthenticated("unknown bearer token")))?;
        Ok(Authenticated { caller, token })
    }
}

impl tonic::service::Interceptor for Authenticate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let who = self.check(req.metadata())?;
        req.extensions_mut().insert(who);
        Ok(req)
    }
}

/// The caller of a request the interceptor let through (or, for a service called without
/// it, as in some tests, checked here).
pub fn caller<T>(req: &Request<T>, auth: &Authenticate) -> Result<Authenticated, Status> {
    match req.extensions().get::<Authenticated>() {
        Some(a) => Ok(a.clone()),
        None => auth.check(req.metadata()),
    }
}

/// `authorization: Bearer <token>`.
pub fn bearer_token(metadata: &MetadataMap) -> Result<String, Status> {
    let header = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` header"))?;
    header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string())
        .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer <token>`"))
}

/// An accepted connection holding its place under the listener's connection cap.
pub struct Capped {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The listener's connections, at most `cap` at once (TLS handshakes in progress
/// included): one past it is closed as soon as accepted, counted and logged. Accept
/// failures (EMFILE...) are backed off rather than retried at once.
pub fn capped_incoming(
    listener: TcpListener,
    cap: Cap,
) -> impl futures::Stream<Item = io::Result<Capped>> {
    let what = match listener.local_addr() {
        Ok(a) => format!("CA/xDS server {a}"),
        Err(_) => "CA/xDS server".to_string(),
    };
    futures::stream::unfold((listener, cap), move |(listener, cap)| {
        let what = what.clone();
        async move {
            loop {
                let (io, _) =
                    crate::admin::http::accept_with_backoff(&what, || listener.accept()).await;
                if let Some(permit) = cap.admit() {
                    let capped = Capped {
                        io,
                        _permit: permit,
                    };
                    return Some((Ok::<_, io::Error>(capped), (listener, cap)));
                }
                // Dropped: closed at once, nothing read.
            }
        }
    })
}
