//! HBONE over real mTLS on loopback: one test server whose handler behaves according to the
//! CONNECT target's port.

use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::*;
use crate::identity::ca::CertificateAuthority;
use crate::identity::Identity;
use crate::tls;
use crate::tls::tests::{cert, id, test_ca};

pub(crate) const ECHO: u16 = 1;
const SERVER_FIRST: u16 = 2;
const FIREHOSE: u16 = 3;
pub(crate) const FORBIDDEN: u16 = 403;
const FIREHOSE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug)]
pub(crate) enum Report {
    Headers {
        peer: Identity,
        source: Option<SocketAddr>,
        baggage: Option<String>,
        trace: Option<String>,
    },
    Received(Vec<u8>),
    Copied(u64, u64),
    FirehoseDone,
    ConnectionClosed,
}

/// Starts the HBONE test server (identity `httpbin`); returns its address.
pub(crate) async fn start_server(
    ca: &CertificateAuthority,
) -> (SocketAddr, mpsc::UnboundedReceiver<Report>) {
    let (addr, rx, drain) = start_drainable_server(ca).await;
    std::mem::forget(drain); // never drains
    (addr, rx)
}

/// [`start_server`] whose connections open at the time of a `drain.send(())` shut down
/// gracefully (as an old ztunnel's after a handover); later connections are served as usual.
pub(crate) async fn start_drainable_server(
    ca: &CertificateAuthority,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Report>,
    tokio::sync::watch::Sender<()>,
) {
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(());
    let config = tls::server_config(&cert(ca, "httpbin")).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let config = config.clone();
            let tx = tx.clone();
            let mut drain = drain_rx.clone();
            drain.borrow_and_update(); // only drains sent from now on count
            tokio::spawn(async move {
                let Ok((tls, peer)) = tls::accept(config, tcp).await else {
                    return;
                };
                let handler_tx = tx.clone();
                let drained = async move {
                    let _ = drain.changed().await;
                };
                let _ = serve_connection_until(
                    tls,
                    peer,
                    move |req| handle(req, handler_tx.clone()),
                    drained,
                )
                .await;
                let _ = tx.send(Report::ConnectionClosed);
            });
        }
    });
    (addr, rx, drain_tx)
}

async fn handle(req: InboundRequest, tx: mpsc::UnboundedSender<Report>) {
    let _ = tx.send(Report::Headers {
        peer: req.peer.clone(),
        source: req.source(),
        baggage: req.baggage().map(String::from),
        trace: req.traceparent().map(String::from),
    });
    match req.target.port() {
        FORBIDDEN => req.reject(http::StatusCode::FORBIDDEN),
        ECHO => {
            let (mut r, mut w) = tokio::io::split(req.accept().unwrap());
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        }
        SERVER_FIRST => {
            let mut s = req.accept().unwrap();
            s.write_all(b"greeting").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            let _ = tx.send(Report::Received(got));
        }
        FIREHOSE => {
            let mut s = req.accept().unwrap();
            // Blocks once the client stops reading; that is the point.
            if s.write_all(&vec![7u8; FIREHOSE_BYTES]).await.is_ok() {
                let _ = tx.send(Report::FirehoseDone);
            }
        }
        _ => match TcpStream::connect(req.target).await {
            Ok(upstream) => {
                // As the inbound proxy does: the zero-copy relay.
                let s = req.accept().unwrap();
                let (from_upstream, to_upstream) = relay_tunnel(upstream, s).await.unwrap();
                let _ = tx.send(Report::Copied(to_upstream, from_upstream));
            }
            Err(_) => req.reject(http::StatusCode::SERVICE_UNAVAILABLE),
        },
    }
}

/// An HTTP/2 connection from `sleep` to the test server.
pub(crate) async fn client(ca: &CertificateAuthority, addr: SocketAddr) -> SendRequest<Bytes> {
    let config = tls::client_config(&cert(ca, "sleep"), &[id("httpbin")]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls::connect(config, addr, tcp).await.unwrap();
    handshake(tls).await.unwrap().0
}

fn target(port: u16) -> ConnectRequest {
    ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], port)))
}

async fn with_timeout<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out")
}

#[tokio::test]
async fn echo_round_trip_with_client_half_close() {
    let ca = test_ca();
    let (addr, mut reports) = start_server(&ca).await;
    let send = client(&ca, addr).await;
    let mut req = target(ECHO);
    req.source = Some("10.0.0.9:40123".parse().unwrap());
    req.baggage = Some("k8s.namespace.name=default".into());
    req.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let mut s = connect_stream(&send, &req).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    with_timeout(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"hello");
    match reports.recv().await.unwrap() {
        Report::Headers {
            peer,
            source,
            baggage,
            trace,
        } => {
            assert_eq!(peer, id("sleep"));
            assert_eq!(source, req.source, "IP and port");
            assert_eq!(baggage, req.baggage);
            assert_eq!(trace, req.traceparent);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_half_close_then_client_sends() {
    let ca = test_ca();
    let (addr, mut reports) = start_server(&ca).await;
    let send = client(&ca, addr).await;
    // No forwarded/baggage/traceparent: the server tolerates their absence.
    let mut s = connect_stream(&send, &target(SERVER_FIRST)).await.unwrap();
    let mut got = Vec::new();
    with_timeout(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"greeting");
    // The server finished writing, but still reads.
    s.write_all(b"reply after EOF").await.unwrap();
    s.shutdown().await.unwrap();
    let _headers = reports.recv().await.unwrap();
    match with_timeout(reports.recv()).await.unwrap() {
        Report::Received(data) => assert_eq!(data, b"reply after EOF"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn tunnels_to_tcp_upstream_with_half_close_both_ways() {
    let ca = test_ca();
    let (addr, mut reports) = start_server(&ca).await;
    // Upstream: reads a request to EOF, then answers and closes.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = upstream.accept().await.unwrap();
        let mut req = Vec::new();
        tcp.read_to_end(&mut req).await.unwrap();
        tcp.write_all(format!("got {} bytes", req.len()).as_bytes())
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
    });
    let send = client(&ca, addr).await;
    let mut s = connect_stream(&send, &ConnectRequest::new(upstream_addr))
        .await
        .unwrap();
    let payload = vec![1u8; 300_000];
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    with_timeout(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"got 300000 bytes");
    let _headers = reports.recv().await.unwrap();
    match with_timeout(reports.recv()).await.unwrap() {
        Report::Copied(to_upstream, from_upstream) => {
            assert_eq!(to_upstream, 300_000);
            assert_eq!(from_upstream, got.len() as u64);
        }
        other => panic!("{other:?}"),
    }
}

/// Bytes sent with the CONNECT wait at the server until the upstream is connected, and
/// arrive ahead of what follows; a refused request with early bytes fails cleanly.
#[tokio::test]
async fn early_data_arrives_first_and_refusal_still_reports_status() {
    let ca = test_ca();
    let (addr, _reports) = start_server(&ca).await;
    let send = client(&ca, addr).await;
    let early = bytes::Bytes::from_static(b"GET / HTTP/1.1\r\n");
    let s = connect_stream_with_data(&send, &target(ECHO), &early)
        .await
        .unwrap();
    assert_eq!(send_last(s, b"rest").await, b"GET / HTTP/1.1\r\nrest");

    let refused = connect_stream_with_data(&send, &target(FORBIDDEN), &early).await;
    assert_status(refused, http::StatusCode::FORBIDDEN);
    // The connection is unharmed by the dropped early bytes.
    let s = connect_stream(&send, &target(ECHO)).await.unwrap();
    assert_eq!(send_last(s, b"ok").await, b"ok");
}

/// The CONNECT was answered with `want`.
fn assert_status(r: Result<H2Stream, HboneError>, want: http::StatusCode) {
    match r {
        Err(HboneError::Status(s)) => assert_eq!(s, want),
        Err(e) => panic!("expected {want}, got error {e}"),
        Ok(_) => panic!("expected {want}, got a stream"),
    }
}

/// Writes `data`, half-closes, and returns all the peer sends back.
async fn send_last(mut s: H2Stream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    with_timeout(s.read_to_end(&mut got)).await.unwrap();
    got
}

#[tokio::test]
async fn rejections_carry_status() {
    let ca = test_ca();
    let (addr, _reports) = start_server(&ca).await;
    let send = client(&ca, addr).await;
    assert_status(
        connect_stream(&send, &target(FORBIDDEN)).await,
        http::StatusCode::FORBIDDEN,
    );
    // Nothing listens on this port: upstream unreachable.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = connect_stream(&send, &ConnectRequest::new(closed))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, HboneError::Status(s) if s == http::StatusCode::SERVICE_UNAVAILABLE));
    // A host name is not an HBONE authority.
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("example.com:80")
        .body(())
        .unwrap();
    let (resp, _stream) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), http::StatusCode::BAD_REQUEST);
    // The connection is still usable.
    let mut s = connect_stream(&send, &target(ECHO)).await.unwrap();
    s.write_all(b"x").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    with_timeout(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"x");
}

#[tokio::test]
async fn many_concurrent_streams_on_one_connection() {
    let ca = test_ca();
    let (addr, _reports) = start_server(&ca).await;
    let send = client(&ca, addr).await;
    let tasks = (0..100u32).map(|i| {
        let send = send.clone();
        tokio::spawn(async move {
            let payload: Vec<u8> = (0..50_000u32).map(|j| (i + j) as u8).collect();
            let mut s = connect_stream(&send, &target(ECHO)).await.unwrap();
            let (mut r, mut w) = tokio::io::split(&mut s);
            let writer = async {
                w.write_all(&payload).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let (_, read) = tokio::join!(writer, r.read_to_end(&mut got));
            read.unwrap();
            assert_eq!(got, payload);
        })
    });
    for t in with_timeout(futures::future::join_all(tasks)).await {
        t.unwrap();
    }
}

#[tokio::test]
async fn stalled_reader_does_not_block_other_streams() {
    let ca = test_ca();
    let (addr, mut reports) = start_server(&ca).await;
    let send = client(&ca, addr).await;
    // Never read from this one: the server's writes stall at the stream window.
    let stalled = connect_stream(&send, &target(FIREHOSE)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let mut s = connect_stream(&send, &target(ECHO)).await.unwrap();
        let payload = vec![9u8; 2 * STREAM_WINDOW as usize];
        let (mut r, mut w) = tokio::io::split(&mut s);
        let writer = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, read) = with_timeout(async { tokio::join!(writer, r.read_to_end(&mut got)) }).await;
        read.unwrap();
        assert_eq!(got.len(), payload.len());
    }
    // Flow control held the stalled stream's sender back: it did not get to write it all.
    while let Ok(r) = reports.try_recv() {
        assert!(
            !matches!(r, Report::FirehoseDone),
            "unread data was buffered without limit"
        );
    }
    drop(stalled);
}
