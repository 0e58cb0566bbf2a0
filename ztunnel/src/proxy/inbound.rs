//! Inbound: connections addressed to enrolled pods. 15006 carries plaintext from
//! outside the mesh; it is delivered to the pod with the client's address as source.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{relay, socket, ProxyContext};

pub async fn handle_plaintext(ctx: Arc<ProxyContext>, stream: TcpStream, peer: SocketAddr) {
    let dst = match socket::original_dst(&stream) {
        Ok(d) => d,
        Err(e) => return warn!("no original destination: {e}"),
    };
    let state = ctx.store.snapshot();
    let Some(workload) = state.workload_by_ip(dst.ip()) else {
        return info!(%peer, %dst, "plaintext inbound to an unknown workload: refused");
    };
    debug!(%peer, %dst, workload = %workload.uid, "inbound plaintext connection");
    let up = match ctx.dialer.connect(Some(peer.ip()), dst).await {
        Ok(s) => s,
        Err(e) => return info!(%peer, %dst, "delivery to the pod failed: {e}"),
    };
    match relay(stream, up).await {
        Ok((tx, rx)) => debug!(%peer, %dst, tx, rx, "inbound connection closed"),
        Err(e) => debug!(%peer, %dst, "inbound connection failed: {e}"),
    }
}
