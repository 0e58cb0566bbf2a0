//! A test waypoint: the part of Istio's waypoint (an Envoy) a node proxy deals with, over
//! the real protocol and real sockets, inside a pod's network namespace.
//!
//! It asks the control plane's CA for its own identity with an identity token (no
//! ImpersonatedIdentity), terminates HBONE on 15008 with that certificate, records the
//! `:authority` and the client identity of every CONNECT, and forwards each stream onward
//! over HBONE to the destination pod's node (the pod's IP, port 15008), asking for the pod
//! address its route table maps the authority to. No L7: that is Envoy's part.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use ztunnel::hbone::{self, ConnectRequest, H2Stream, InboundRequest};
use ztunnel::identity::ca_client::GrpcCaClient;
use ztunnel::identity::cert::WorkloadCertificate;
use ztunnel::identity::manager::CaClient;
use ztunnel::identity::{csr, Identity};
use ztunnel_tests::Pod;

/// One CONNECT the waypoint received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub authority: SocketAddr,
    pub client: String,
}

/// Where the waypoint sends what it is asked for: authority → (pod address, the pod's
/// identity). Istio's waypoint learns this from istiod; the test tells it.
pub type Routes = HashMap<SocketAddr, (SocketAddr, Identity)>;

/// How to reach the control plane's CA.
pub struct Ca {
    pub url: String,
    pub root: PathBuf,
    pub token_file: PathBuf,
}

/// Gets `identity`'s certificate from the CA as a proxy asking for itself.
pub async fn certificate(ca: &Ca, identity: &Identity) -> anyhow::Result<WorkloadCertificate> {
    let client = GrpcCaClient::new(&ca.url, &ca.root, Some(&ca.token_file))?.for_own_identity();
    let req = csr::generate(identity)?;
    let chain = client
        .sign(req.csr_pem, identity, Duration::from_secs(3600))
        .await
        .with_context(|| format!("the CA refused {identity}"))?;
    Ok(WorkloadCertificate::from_ca_response(
        identity.clone(),
        &chain,
        req.key,
        &[],
    )?)
}

/// A running waypoint; stops when dropped.
pub struct Waypoint {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Waypoint {
    /// Starts the waypoint in `pod`'s namespace as `identity` and waits until it serves.
    pub fn start(pod: &Pod, identity: Identity, ca: Ca, routes: Routes) -> anyhow::Result<Self> {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let record = seen.clone();
        let thread = pod.netns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let started = async {
                    let cert = certificate(&ca, &identity).await?;
                    let listener = TcpListener::bind(("0.0.0.0", hbone::HBONE_PORT)).await?;
                    anyhow::Ok((Arc::new(cert), listener))
                };
                let (cert, listener) = match started.await {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let routes = Arc::new(routes);
                tokio::select! {
                    _ = serve(listener, cert, routes, record) => {}
                    _ = stopped => {}
                }
            })
        });
        match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("waypoint did not start: {e:#}"),
            Err(_) => bail!("waypoint did not start within 20 s"),
        }
        Ok(Waypoint {
            seen,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Every CONNECT so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: TcpListener,
    cert: Arc<WorkloadCertificate>,
    routes: Arc<Routes>,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let config = ztunnel::tls::server_config(&cert).expect("server config");
    while let Ok((tcp, _)) = listener.accept().await {
        let (config, cert, routes, seen) =
            (config.clone(), cert.clone(), routes.clone(), seen.clone());
        tokio::spawn(async move {
            let Ok((tls, client)) = ztunnel::tls::accept(config, tcp).await else {
                return;
            };
            let handler = move |req: InboundRequest| {
                seen.lock().unwrap().push(Seen {
                    authority: req.target,
                    client: req.peer.to_string(),
                });
                forward(cert.clone(), routes.clone(), req)
            };
            let _ = hbone::serve_connection(tls, client, handler).await;
        });
    }
}

/// Forwards one CONNECT to the pod its authority maps to, over HBONE to the pod's node.
async fn forward(cert: Arc<WorkloadCertificate>, routes: Arc<Routes>, req: InboundRequest) {
    let Some((pod, pod_id)) = routes.get(&req.target).cloned() else {
        return req.reject(StatusCode::NOT_FOUND);
    };
    let upstream = match open(&cert, pod, &pod_id, req.source()).await {
        Ok(s) => s,
        Err(_) => return req.reject(StatusCode::SERVICE_UNAVAILABLE),
    };
    let Ok(downstream) = req.accept() else { return };
    let (mut a, mut b) = (downstream, upstream);
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// An HBONE stream to `pod` (through its node's 15008) presenting `cert` and requiring
/// `pod_id`. Also what a client that skips the waypoint does.
pub async fn open(
    cert: &WorkloadCertificate,
    pod: SocketAddr,
    pod_id: &Identity,
    source: Option<SocketAddr>,
) -> anyhow::Result<H2Stream> {
    let node = SocketAddr::new(pod.ip(), hbone::HBONE_PORT);
    let config = ztunnel::tls::client_config(cert, std::slice::from_ref(pod_id))?;
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(node)).await??;
    let tls = ztunnel::tls::connect(config, node, tcp).await?;
    let (send, _driver) = hbone::client::handshake(tls).await?;
    let mut req = ConnectRequest::new(pod);
    req.source = source;
    Ok(hbone::client::connect_stream(&send, &req).await?)
}

/// Writes an identity token file (no trailing newline: it goes into a header verbatim).
pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let p = dir.join(format!("token-{token}"));
    std::fs::write(&p, token).expect("token file");
    p
}
