//! The floor under any node proxy: plain TCP relays in the node namespaces, no capture, no
//! TLS, no HTTP/2 — accept, connect onwards, copy both ways. Pods reach them by address.
//! Cross-node the bytes take the mesh's route (client → relay on its node → relay on the
//! server's node → server), so the relays pay what the two extra TCP connections and the
//! user-space hops cost on this machine, and the rest of the mesh's cost is what ztunnel
//! adds on top (capture, mTLS, HBONE).
//!
//! Built like ztunnel's data path, so the comparison is of work and not of threading:
//! two threads, each with a single-threaded tokio runtime and every listener, a
//! connection staying on the thread that accepted it, 256 KiB copy buffers, no Nagle.

use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpListener, TcpStream};
use ztunnel_tests::Netns;

const THREADS: usize = 2;
const COPY_BUFFER: usize = 256 * 1024;

/// Listens on `listen:port + offset` for every port in `ports` and relays each
/// connection to `target:port`. The threads run as long as the process.
pub fn start(
    ns: &Netns,
    listen: IpAddr,
    offset: u16,
    ports: &[u16],
    target: IpAddr,
) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    for &port in ports {
        let addr = SocketAddr::new(listen, port + offset);
        let l = ns.run(move || std::net::TcpListener::bind(addr))?;
        l.set_nonblocking(true)?;
        listeners.push((l, SocketAddr::new(target, port)));
    }
    for _ in 0..THREADS {
        let mine = listeners
            .iter()
            .map(|(l, t)| Ok((l.try_clone()?, *t)))
            .collect::<std::io::Result<Vec<_>>>()?;
        ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(serve(mine));
        });
    }
    Ok(())
}

async fn serve(listeners: Vec<(std::net::TcpListener, SocketAddr)>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (l, target) in listeners {
        let l = TcpListener::from_std(l).expect("register listener");
        tasks.spawn(async move {
            loop {
                let Ok((down, _)) = l.accept().await else {
                    // Out of file descriptors, say: let some close.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(relay(down, target));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn relay(mut down: TcpStream, target: SocketAddr) {
    let Ok(mut up) = TcpStream::connect(target).await else {
        return; // dropping `down` refuses the client, as a proxy would
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, COPY_BUFFER, COPY_BUFFER)
        .await;
}
