//! The control plane's listener against hostile clients, over raw HTTP/2 on loopback TLS:
//! what no gRPC client would do (declare a large message and never send it, hold
//! connections without a handshake), and what the server does about it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::ControlplaneLimits;
use crate::identity::ca::CaOptions;

const TOKEN: &str = "tok-node-a-0123456789abcdef";
const CSR_PATH: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

struct Cp {
    dir: PathBuf,
    addr: SocketAddr,
    ca: Arc<CertificateAuthority>,
    _server: RunningCaServer,
}

impl Drop for Cp {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

async fn start(name: &str, limits: ControlplaneLimits) -> Cp {
    let dir = std::env::temp_dir().join(format!(
        "ztunnel-cplim-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("w.yaml"), "workloads: []\n").unwrap();
    std::fs::write(dir.join("tokens"), format!("{TOKEN} node-a\n")).unwrap();
    let ca = Arc::new(CertificateAuthority::new(CaOptions::new("cluster.local")).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cert = ca
        .issue_server_cert(&[addr.ip()], &[], Duration::from_secs(3600))
        .unwrap();
    let interval = Duration::from_millis(20);
    let workloads = crate::xds::watch_every(dir.join("w.yaml"), interval).unwrap();
    let tokens = tokens::watch_tokens(&dir.join("tokens"), "cluster.local", interval).unwrap();
    let xds = xds_server::XdsService::with_limits(tokens.clone(), workloads.clone(), &limits);
    let service = CaService::new(ca.clone(), tokens, workloads);
    let server = serve_with_limits(service, Some(xds), listener, &cert, &limits).unwrap();
    Cp {
        dir,
        addr,
        ca,
        _server: server,
    }
}

/// An HTTP/2 connection to the control plane (TLS, trusting its CA).
async fn connect(cp: &Cp) -> SendRequest<Bytes> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cp.ca.root_cert_der()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(cp.addr).await.unwrap();
    let name = ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

fn grpc(path: &str, token: Option<&str>) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("https://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(()).unwrap()
}

/// The 5-byte gRPC frame header declaring a message of `len` bytes.
fn declares(len: u32) -> Bytes {
    let mut h = vec![0u8];
    h.extend_from_slice(&len.to_be_bytes());
    Bytes::from(h)
}

/// Opens a call, sends `first` and never ends the request; returns the grpc-status the
/// server answers with (in its headers: a trailers-only answer), if any.
async fn call_never_ending(
    send: &SendRequest<Bytes>,
    req: http::Request<()>,
    first: Bytes,
) -> (Option<String>, h2::SendStream<Bytes>) {
    let mut send = send.clone().ready().await.unwrap();
    let (response, mut body) = send.send_request(req, false).unwrap();
    body.send_data(first, false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("the server answers a call whose body never ends")
        .unwrap();
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_string());
    (status, body)
}

/// The issue's attack: calls without a token, each declaring a 4 MiB message that never
/// comes. Each is refused (16, UNAUTHENTICATED) while its body is still unsent — so before
/// any of it was read — and none holds a stream: far more calls than the connection's
/// stream limit go through one after another on one connection.
#[tokio::test]
async fn unauthenticated_calls_are_refused_before_their_body() {
    let limits = ControlplaneLimits {
        max_streams_per_connection: 4,
        ..ControlplaneLimits::default()
    };
    let cp = start("unauth", limits).await;
    let send = connect(&cp).await;
    let before = crate::limits::hits(guard::UNAUTHENTICATED);
    let mut open = Vec::new();
    for i in 0..50 {
        let token = (i % 2 == 1).then_some("not-a-token");
        let (status, body) =
            call_never_ending(&send, grpc(CSR_PATH, token), declares(4 << 20)).await;
        assert_eq!(status.as_deref(), Some("16"), "call {i}");
        open.push(body); // our side never ends it
    }
    assert!(crate::limits::hits(guard::UNAUTHENTICATED) >= before + 50);
    // The same for xDS.
    let xds = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
    let (status, _) = call_never_ending(&send, grpc(xds, None), declares(4 << 20)).await;
    assert_eq!(status.as_deref(), Some("16"));
}

/// A caller with a valid token still cannot make the server buffer more than a CSR's
/// worth: a larger declared message is refused from its header alone.
#[tokio::test]
async fn a_certificate_request_larger_than_a_csr_is_refused() {
    let limits = ControlplaneLimits {
        max_csr_bytes: 16 * 1024,
        ..ControlplaneLimits::default()
    };
    let cp = start("csr-size", limits).await;
    let send = connect(&cp).await;
    let mut send = send.ready().await.unwrap();
    let (response, mut body) = send
        .send_request(grpc(CSR_PATH, Some(TOKEN)), false)
        .unwrap();
    body.send_data(declares(4 << 20), false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .expect("answered")
        .unwrap();
    // Answered in the headers or in the trailers (after the response head).
    let status = match response.headers().get("grpc-status") {
        Some(s) => s.to_str().unwrap().to_string(),
        None => {
            let mut b = response.into_body();
            while b.data().await.is_some() {}
            let trailers = b.trailers().await.unwrap().unwrap();
            trailers["grpc-status"].to_str().unwrap().to_string()
        }
    };
    // RESOURCE_EXHAUSTED or OUT_OF_RANGE, depending on tonic's version: not read, not OK.
    assert!(status == "8" || status == "11", "grpc-status {status}");
}

/// The connection's stream limit is what the server announces.
#[tokio::test]
async fn streams_per_connection_are_announced() {
    let limits = ControlplaneLimits {
        max_streams_per_connection: 7,
        ..ControlplaneLimits::default()
    };
    let cp = start("streams", limits).await;
    let send = connect(&cp).await;
    // SETTINGS arrive with the first exchange: make one.
    let _ = call_never_ending(&send, grpc(CSR_PATH, None), declares(1)).await;
    assert_eq!(send.current_max_send_streams(), 7);
}

/// Reads from a raw TCP connection until the server closes it; what it sent.
async fn until_closed(c: &mut TcpStream) -> usize {
    let mut n = 0;
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server never closed the connection");
    n
}

/// A client that connects and never starts TLS is closed after the handshake timeout.
#[tokio::test]
async fn a_silent_client_is_closed_by_the_handshake_timeout() {
    let limits = ControlplaneLimits {
        tls_handshake_timeout: Duration::from_millis(200),
        ..ControlplaneLimits::default()
    };
    let cp = start("tls-timeout", limits).await;
    let mut c = TcpStream::connect(cp.addr).await.unwrap();
    assert_eq!(until_closed(&mut c).await, 0);
}

/// Past the connection cap a new connection is closed unread; once one goes, a client gets
/// its certificate-service connection again.
#[tokio::test]
async fn connections_past_the_cap_are_closed() {
    let limits = ControlplaneLimits {
        max_connections: 2,
        ..ControlplaneLimits::default()
    };
    let cp = start("conn-cap", limits).await;
    let first = connect(&cp).await;
    let second = connect(&cp).await;
    let before = crate::limits::hits("controlplane_connections");
    let mut third = TcpStream::connect(cp.addr).await.unwrap();
    assert_eq!(until_closed(&mut third).await, 0, "closed before any TLS");
    assert!(crate::limits::hits("controlplane_connections") > before);
    drop((first, second));
    // The places come back as the server sees the connections close.
    let send = loop {
        let tcp_ok = async {
            let mut probe = TcpStream::connect(cp.addr).await.unwrap();
            let mut b = [0u8; 1];
            // A capped connection is closed at once; an admitted one waits for our hello.
            tokio::time::timeout(Duration::from_millis(100), probe.read(&mut b))
                .await
                .is_err()
        };
        if tcp_ok.await {
            break connect(&cp).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (status, _) = call_never_ending(&send, grpc(CSR_PATH, None), declares(1)).await;
    assert_eq!(status.as_deref(), Some("16"), "served again");
}
