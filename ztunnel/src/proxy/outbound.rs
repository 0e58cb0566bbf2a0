//! Outbound (15001): connections enrolled pods open, captured with their original
//! destination as the accepted socket's local address.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{relay, socket, ProxyContext};

pub async fn handle(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let dst = match socket::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => return warn!("no original destination: {e}"),
    };
    if ctx.listen_ports.contains(&dst.port()) && is_local(dst) {
        return debug!(%peer, %dst, "refusing a connection to our own listener");
    }
    // Identify: who is calling (by the pod address) and where it goes.
    let state = ctx.store.snapshot();
    let source = state.workload_by_ip(peer.ip());
    let upstream = match state.resolve(dst) {
        Ok(u) => u,
        Err(e) => return warn!(%peer, %dst, "refused: {e}"),
    };
    let target = upstream.as_ref().map(|u| u.address).unwrap_or(dst);
    debug!(
        src = %peer,
        src_workload = source.as_ref().map(|w| w.uid.as_str()).unwrap_or("-"),
        %dst,
        %target,
        "outbound connection"
    );
    // Plain passthrough, with the pod's address as source.
    let up = match ctx.dialer.connect(Some(peer.ip()), target).await {
        Ok(s) => s,
        Err(e) => return info!(%peer, %target, "upstream connect failed: {e}"),
    };
    match relay(stream, up).await {
        Ok((tx, rx)) => debug!(%peer, %target, tx, rx, "outbound connection closed"),
        Err(e) => debug!(%peer, %target, "outbound connection failed: {e}"),
    }
}

fn is_local(dst: SocketAddr) -> bool {
    // Binding to an address succeeds only if it is ours (without IP_TRANSPARENT).
    std::net::TcpListener::bind(SocketAddr::new(dst.ip(), 0)).is_ok()
}
