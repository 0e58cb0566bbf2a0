//! The clients the attacks use: raw HTTP/2 over TLS to the control plane (to do what no
//! gRPC client does), a tonic xDS client, ztunnel's own CA client (the valid node beside
//! the attacks), raw TCP connections that drip or idle, HBONE with a mesh certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::identity::{csr, CaClient, GrpcCaClient, Identity};
use ztunnel_tests::Netns;

pub const CSR_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// A single-threaded runtime for a thread inside a namespace (its sockets live there).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Where the control plane is and what a client needs to reach it.
#[derive(Clone)]
pub struct Cp {
    pub addr: SocketAddr,
    pub root_pem: String,
    pub root_path: PathBuf,
}

impl Cp {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// An HTTP/2 connection over TLS (the control plane's CA trusted).
    pub async fn h2(&self) -> anyhow::Result<SendRequest<Bytes>> {
        let mut roots = rustls::RootCertStore::empty();
        for der in rustls_pki_types::CertificateDer::pem_slice_iter(self.root_pem.as_bytes()) {
            roots.add(der?)?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(ztunnel::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(self.addr))
            .await
            .context("connect timed out")??;
        let name = rustls_pki_types::ServerName::IpAddress(self.addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        let (send, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        Ok(send)
    }
}

pub fn grpc(path: &str, token: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("https://ztunnel{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(()).expect("request")
}

/// A gRPC frame header announcing a message of `len` bytes (whose body never follows).
pub fn declares(len: u32) -> Bytes {
    let mut h = vec![0u8];
    h.extend_from_slice(&len.to_be_bytes());
    Bytes::from(h)
}

/// Certificate requests with a valid node token, one every 200 ms, from a thread in `ns`,
/// for as long as the attacks beside it run.
pub struct CertProber {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_error: Arc<std::sync::Mutex<String>>,
    handle: std::thread::JoinHandle<()>,
}

impl CertProber {
    pub fn start(ns: &Arc<Netns>, cp: &Cp, token_file: PathBuf, identity: Identity) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(std::sync::Mutex::new(String::new()));
        let (s, o, f, le) = (stop.clone(), ok.clone(), failed.clone(), last_error.clone());
        let cp = cp.clone();
        let handle = ns.spawn(move || {
            runtime().block_on(async move {
                while !s.load(Ordering::Relaxed) {
                    match sign_once(&cp, &token_file, &identity).await {
                        Ok(()) => o.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            *le.lock().unwrap() = format!("{e:#}");
                            f.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        CertProber {
            stop,
            ok,
            failed,
            last_error,
            handle,
        }
    }

    /// (issued, failed, last error).
    pub fn finish(self) -> (u64, u64, String) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        let e = self.last_error.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            e,
        )
    }
}

/// One certificate request as a node proxy makes it (a new client each time: a new
/// connection, as a node starting up would open).
pub async fn sign_once(cp: &Cp, token_file: &std::path::Path, id: &Identity) -> anyhow::Result<()> {
    let client = GrpcCaClient::new(&cp.url(), cp.root_path.clone(), Some(token_file))?;
    let req = csr::generate(id)?;
    tokio::time::timeout(
        Duration::from_secs(10),
        client.sign(req.csr_pem, id, Duration::from_secs(3600)),
    )
    .await
    .context("no answer within 10 s")??;
    Ok(())
}

/// What became of a connection an attack opened and held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    ConnectFailed,
    /// Closed by the server within a second of opening: refused by a cap.
    ClosedAtOnce,
    /// Closed by the server later: a timeout.
    ClosedLater,
    /// Still open when the attack ended.
    StillOpen,
}

/// Opens a TCP connection to `dst`, sends `first`, then (with `drip`) one more byte every
/// `drip` until `hold` has passed or the server closes it.
pub async fn hold_connection(
    dst: SocketAddr,
    first: &'static [u8],
    drip: Option<Duration>,
    hold: Duration,
) -> Fate {
    let Ok(Ok(mut c)) =
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(dst)).await
    else {
        return Fate::ConnectFailed;
    };
    // From the connection's establishment: a SYN retransmitted under a full backlog does
    // not make a refusal look like a timeout.
    let start = Instant::now();
    if !first.is_empty() && c.write_all(first).await.is_err() {
        return closed(start);
    }
    let deadline = tokio::time::Instant::now() + hold;
    let mut buf = [0u8; 1024];
    loop {
        let next_drip = match drip {
            Some(d) => (tokio::time::Instant::now() + d).min(deadline),
            None => deadline,
        };
        tokio::select! {
            r = c.read(&mut buf) => match r {
                Ok(0) | Err(_) => return closed(start),
                Ok(_) => {} // an error answer (408, 431): the close follows
            },
            _ = tokio::time::sleep_until(next_drip) => {
                if tokio::time::Instant::now() >= deadline {
                    return Fate::StillOpen;
                }
                if c.write_all(b"a").await.is_err() {
                    return closed(start);
                }
            }
        }
    }
}

fn closed(start: Instant) -> Fate {
    if start.elapsed() < Duration::from_secs(1) {
        Fate::ClosedAtOnce
    } else {
        Fate::ClosedLater
    }
}

/// `n` connections at once to `targets` (round robin), each as [`hold_connection`];
/// counts of each fate.
pub async fn hold_many(
    targets: &[SocketAddr],
    n: usize,
    first: &'static [u8],
    drip: Option<Duration>,
    hold: Duration,
) -> std::collections::BTreeMap<String, usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let dst = targets[i % targets.len()];
        tasks.spawn(hold_connection(dst, first, drip, hold));
    }
    let mut counts = std::collections::BTreeMap::new();
    while let Some(f) = tasks.join_next().await {
        let f = f.unwrap_or(Fate::ConnectFailed);
        *counts.entry(format!("{f:?}")).or_insert(0) += 1;
    }
    counts
}

pub fn fates(counts: &std::collections::BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
