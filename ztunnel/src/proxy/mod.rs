//! The data path after capture: accept → identify → authorize → tunnel → deliver.
//!
//! `outbound` serves 15001 (connections pods open), `inbound` serves 15006 (plaintext
//! addressed to enrolled pods) and 15008 (HBONE). `socket` holds the socket options
//! every stage relies on.

pub mod inbound;
pub mod outbound;
pub mod socket;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::state::StateStore;

/// What every connection handler needs.
pub struct ProxyContext {
    pub node: String,
    pub store: Arc<StateStore>,
    pub dialer: socket::Dialer,
    /// Our own listener ports: a connection whose original destination is one of
    /// them on a local address would loop.
    pub listen_ports: Vec<u16>,
}

/// Accepts on `listener` forever, handing each connection to `handle`.
pub async fn accept_loop<F, Fut>(listener: TcpListener, ctx: Arc<ProxyContext>, handle: F)
where
    F: Fn(Arc<ProxyContext>, tokio::net::TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                socket::set_nodelay(&stream);
                tokio::spawn(handle(ctx.clone(), stream, socket::canonical(peer)));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Copies both ways until both sides are done, half-closing each direction as its
/// source ends. Returns (bytes client→server, bytes server→client).
pub async fn relay<A, B>(mut a: A, mut b: B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let r = tokio::io::copy_bidirectional(&mut a, &mut b).await;
    if let Err(e) = &r {
        debug!("relay ended with error: {e}");
    }
    r
}
