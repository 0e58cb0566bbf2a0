//! Hostile input to the HBONE server (issue 10): requests it must refuse while staying up,
//! TLS client certificates `tls::server_config` must refuse, and a replay of the fuzz seed
//! corpora (`fuzz/corpus/hbone_*`) through the same entry points the fuzz targets use, so
//! plain `cargo test` keeps covering them.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;

use super::tests::{client, start_server, Report, ECHO};
use super::*;
use crate::identity::ca::{CaOptions, CertificateAuthority};
use crate::identity::Identity;
use crate::tls;
use crate::tls::tests::{cert, id, test_ca};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out")
}

/// The server is unharmed: a new connection still tunnels (echo) end to end.
async fn assert_still_serves(ca: &CertificateAuthority, addr: SocketAddr) {
    let send = client(ca, addr).await;
    let mut s = within(connect_stream(
        &send,
        &ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], ECHO))),
    ))
    .await
    .expect("the server still accepts CONNECT");
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    within(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"still here");
}

/// No request reached the handler (no `Headers` report) since the last drain.
fn assert_handler_not_reached(reports: &mut tokio::sync::mpsc::UnboundedReceiver<Report>) {
    while let Ok(r) = reports.try_recv() {
        assert!(!matches!(r, Report::Headers { .. }), "handler saw {r:?}");
    }
}

/// An mTLS connection from `sleep` on which the test writes raw HTTP/2 bytes.
async fn raw_tls(
    ca: &CertificateAuthority,
    addr: SocketAddr,
) -> tls::ClientTlsStream<tls::TlsIo<TcpStream>> {
    let config = tls::client_config(&cert(ca, "sleep"), &[id("httpbin")]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls::connect(config, addr, tcp).await.unwrap()
}

/// Frame types in what the server sent until it closed the connection.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

const GOAWAY: u8 = 7;

#[tokio::test]
async fn garbage_after_preface_closes_only_that_connection() {
    let ca = test_ca();
    let (addr, mut reports) = start_server(&ca).await;
    let mut conn = raw_tls(&ca, addr).await;
    conn.write_all(PREFACE).await.unwrap();
    conn.write_all(EMPTY_SETTINGS).await.unwrap();
    // A HEADERS frame on stream 0 (never valid) followed by noise.
    conn.write_all(&[0, 0, 3, 1, 4, 0, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    conn.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(64))
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The server ends the connection itself (the client never closes its side).
    let _ = within(conn.read_to_end(&mut answer)).await;
    assert!(
        frame_types(&answer).contains(&GOAWAY),
        "expected a GOAWAY, got frame types {:?}",
        frame_types(&answer)
    );
    match within(reports.recv()).await.unwrap() {
        Report::ConnectionClosed => {}
        other => panic!("{other:?}"),
    }
    assert_still_serves(&ca, addr).await;
}

#[tokio::test]
async fn oversized_header_block_is_refused() {
    let ca = test_ca();
    let (addr, mut reports) = start_server(&ca).await;
    // One header (fits one frame: answered 431) and one split over CONTINUATION frames
    // (the connection is closed): either way the request never reaches the handler.
    for size in [2 * MAX_HEADER_LIST_SIZE as usize, 1024 * 1024] {
        let send = client(&ca, addr).await;
        let mut req = ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], ECHO)));
        req.baggage = Some("k=".to_string() + &"v".repeat(size));
        match within(connect_stream(&send, &req)).await {
            Err(HboneError::Status(s)) => {
                assert_eq!(s, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            }
            Err(HboneError::H2(_)) => {}
            other => panic!(
                "a {size}-byte header was not refused: {:?}",
                other.map(|_| ())
            ),
        }
    }
    assert_handler_not_reached(&mut reports);
    assert_still_serves(&ca, addr).await;
}

/// The client side too: a peer answering with an oversized header block fails that stream
/// instead of making us buffer it (h2's default limit is 16 MiB).
#[tokio::test]
async fn oversized_response_headers_are_refused_by_the_client() {
    let (c, s) = tokio::io::duplex(1024 * 1024);
    tokio::spawn(async move {
        let mut conn = h2::server::handshake(s).await.unwrap();
        while let Some(Ok((_, mut respond))) = conn.accept().await {
            let mut r = http::Response::new(());
            let big = "v".repeat(4 * MAX_HEADER_LIST_SIZE as usize);
            r.headers_mut()
                .insert("x-big", http::HeaderValue::from_str(&big).unwrap());
            let _ = respond.send_response(r, false);
        }
    });
    let (send, _driver) = handshake(c).await.unwrap();
    let req = ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], ECHO)));
    match within(connect_stream(&send, &req)).await {
        Err(HboneError::H2(_)) => {}
        other => panic!(
            "oversized response headers accepted: {:?}",
            other.map(|_| ())
        ),
    }
}

#[tokio::test]
async fn non_connect_method_is_refused() {
    let ca = test_ca();
    let (addr, mut reports) = start_server(&ca).await;
    let send = client(&ca, addr).await;
    for method in [http::Method::GET, http::Method::POST] {
        let req = http::Request::builder()
            .method(method)
            .uri("http://127.0.0.1:1/")
            .body(())
            .unwrap();
        let (resp, _body) = send
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(req, true)
            .unwrap();
        let status = within(resp).await.unwrap().status();
        assert_eq!(status, http::StatusCode::METHOD_NOT_ALLOWED);
    }
    assert_handler_not_reached(&mut reports);
    // The same connection still carries a valid CONNECT.
    let mut s = connect_stream(
        &send,
        &ConnectRequest::new(SocketAddr::from(([127, 0, 0, 1], ECHO))),
    )
    .await
    .unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn connect_without_port_is_refused() {
    // A host name is covered by `tests::rejections_carry_status`; an address without a
    // port is the other way an authority fails to be `ip:port`.
    let ca = test_ca();
    let (addr, mut reports) = start_server(&ca).await;
    let send = client(&ca, addr).await;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("10.0.0.1")
        .body(())
        .unwrap();
    let (resp, _stream) = send
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    assert_eq!(
        within(resp).await.unwrap().status(),
        http::StatusCode::BAD_REQUEST
    );
    assert_handler_not_reached(&mut reports);
    assert_still_serves(&ca, addr).await;
}

// ---- client certificates the server's TLS verification must refuse ----
// (untrusted root and expired ones: `tls::tests`)

/// The server's handshake error for a client presenting `client_cert` (which trusts the
/// mesh root, so only the server's verification can fail).
async fn server_refusal(ca: &CertificateAuthority, mut client_cert: WorkloadCert) -> String {
    client_cert.roots = vec![ca.root_cert_der()];
    let client = tls::client_config(&client_cert, &[id("httpbin")]).unwrap();
    let server = tls::server_config(&cert(ca, "httpbin")).unwrap();
    // Only names the peer in errors: the handshake runs over an in-memory pipe.
    let dst = SocketAddr::from(([127, 0, 0, 1], 15008));
    let (c, s) = tokio::io::duplex(64 * 1024);
    let (_, accepted) = tokio::join!(tls::connect(client, dst, c), tls::accept(server, s));
    match accepted {
        Ok((_, peer)) => panic!("server accepted client {peer}"),
        Err(e) => e.to_string(),
    }
}

type WorkloadCert = crate::identity::WorkloadCertificate;

#[tokio::test]
async fn client_cert_of_another_trust_domain_is_refused() {
    let ca = test_ca();
    let foreign_ca = CertificateAuthority::new(CaOptions::new("evil.example")).unwrap();
    let foreign = foreign_ca
        .issue_workload_cert(
            &Identity::new("evil.example", "default", "sleep"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let err = server_refusal(&ca, foreign).await;
    assert!(
        err.contains("UnknownIssuer") || err.contains("BadSignature"),
        "{err}"
    );
}

#[tokio::test]
async fn client_cert_of_another_trust_domain_under_a_shared_root_is_refused() {
    // Two CAs of different trust domains over one root (its key in a shared directory).
    let dir = std::env::temp_dir().join(format!("ztunnel-shared-root-{}", rand::random::<u64>()));
    let ca_in = |td: &str| {
        let mut opts = CaOptions::new(td);
        opts.dir = Some(dir.clone());
        CertificateAuthority::new(opts).unwrap()
    };
    let (ours, theirs) = (ca_in("cluster.local"), ca_in("evil.example"));
    assert_eq!(ours.root_cert_der(), theirs.root_cert_der());
    let foreign = theirs
        .issue_workload_cert(
            &Identity::new("evil.example", "default", "sleep"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let err = server_refusal(&ours, foreign).await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.contains("NotValidForName"), "{err}");
}

#[tokio::test]
async fn client_cert_not_yet_valid_is_refused() {
    let ca = test_ca();
    let now = time::OffsetDateTime::now_utc();
    let early = ca.issue_with_validity(
        &id("sleep"),
        now + Duration::from_secs(3600),
        now + Duration::from_secs(7200),
    );
    let err = server_refusal(&ca, early).await;
    assert!(err.contains("not valid yet"), "{err}");
}

// ---- fuzz corpus replay ----

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// What `fuzz/fuzz_targets/hbone_server.rs` does with one input: the bytes as the client
/// side of a connection, then close; the server must finish on its own.
async fn serve_bytes(data: &[u8]) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = Identity::new("cluster.local", "default", "fuzz");
    let serve = serve_connection(server, peer, |req: InboundRequest| async move { drop(req) });
    let session = async { tokio::join!(send_then_close(client, data), serve) };
    // The server's own result is an error for most garbage; finishing is what counts.
    let (_, _served) = tokio::time::timeout(Duration::from_secs(5), session)
        .await
        .expect("HBONE server did not finish after the client closed");
}

async fn send_then_close(client: DuplexStream, data: &[u8]) {
    let (mut rd, mut wr) = tokio::io::split(client);
    let write = async {
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
    };
    let mut sink = tokio::io::sink();
    let drain = tokio::io::copy(&mut rd, &mut sink);
    let _ = tokio::join!(write, drain);
}

#[tokio::test]
async fn fuzz_corpus_replays() {
    for (path, data) in corpus("hbone_server") {
        eprintln!("{}", path.display());
        serve_bytes(&data).await;
    }
    // As `fuzz/fuzz_targets/hbone_authority.rs`.
    for (_, data) in corpus("hbone_authority") {
        if let Ok(Ok(addr)) = std::str::from_utf8(&data).map(parse_authority) {
            assert_eq!(parse_authority(&authority(addr)).unwrap(), addr);
        }
        if let Ok(value) = HeaderValue::from_bytes(&data) {
            let mut headers = HeaderMap::new();
            headers.insert(HEADER_FORWARDED, value.clone());
            headers.insert(HEADER_SOURCE_PORT, value);
            let _ = forwarded_for(&headers);
            let _ = source_port(&headers);
        }
    }
}

// ---- seed generation ----

/// Records what a real HBONE client sends in a few sessions with a real server, as seeds
/// for `hbone_server`. Run: `cargo test -p ztunnel --lib write_hbone_seeds -- --ignored`.
#[tokio::test]
#[ignore = "rewrites fuzz/corpus/hbone_server"]
async fn write_hbone_seeds() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/hbone_server");
    std::fs::create_dir_all(&dir).unwrap();
    let target = SocketAddr::from(([10, 0, 0, 1], 8080));
    let full = {
        let mut r = ConnectRequest::new(target);
        r.source = Some("10.0.0.9:40123".parse().unwrap());
        r.baggage = Some("k8s.namespace.name=default,k8s.pod.name=sleep".into());
        r.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        r
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "connect-echo",
            record(vec![Session::Connect(full.clone())]).await,
        ),
        (
            "connect-three-streams",
            record(vec![
                Session::Connect(full.clone()),
                Session::Connect(ConnectRequest::new("[fd00::7]:443".parse().unwrap())),
                Session::Connect(ConnectRequest::new(target)),
            ])
            .await,
        ),
        (
            "get-method",
            record(vec![Session::Other("GET", "http://10.0.0.1:8080/")]).await,
        ),
        (
            "connect-hostname",
            record(vec![Session::Other("CONNECT", "example.com:80")]).await,
        ),
        ("preface-only", [PREFACE, EMPTY_SETTINGS].concat()),
        (
            "preface-garbage",
            [
                PREFACE,
                EMPTY_SETTINGS,
                &[0, 0, 3, 1, 4, 0, 0, 0, 0, 0xff, 0xff, 0xff],
            ]
            .concat(),
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

enum Session {
    /// A CONNECT that the server accepts and echoes: sends "hello", reads it back.
    Connect(ConnectRequest),
    /// Any other request (method, uri), which the server refuses.
    Other(&'static str, &'static str),
}

/// Runs the sessions over one connection to a real server (which echoes accepted streams)
/// and returns every byte the client sent.
async fn record(sessions: Vec<Session>) -> Vec<u8> {
    let (client_io, tap_client) = tokio::io::duplex(1 << 20);
    let (tap_server, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(serve_connection(
        server_io,
        id("fuzz"),
        |req: InboundRequest| async move {
            let (mut r, mut w) = tokio::io::split(req.accept().unwrap());
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        },
    ));
    // The tap: client → server bytes are copied and kept; server → client just copied.
    let (mut from_client, mut to_client) = tokio::io::split(tap_client);
    let (mut from_server, mut to_server) = tokio::io::split(tap_server);
    let upstream = tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from_client.read(&mut buf).await.unwrap();
            if n == 0 {
                let _ = to_server.shutdown().await;
                return sent;
            }
            sent.extend_from_slice(&buf[..n]);
            to_server.write_all(&buf[..n]).await.unwrap();
        }
    });
    tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
    let (send, driver) = handshake(client_io).await.unwrap();
    for session in sessions {
        match session {
            Session::Connect(req) => {
                let mut s = connect_stream(&send, &req).await.unwrap();
                s.write_all(b"hello").await.unwrap();
                s.shutdown().await.unwrap();
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
            }
            Session::Other(method, uri) => {
                let req = http::Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(())
                    .unwrap();
                let (resp, _) = send
                    .clone()
                    .ready()
                    .await
                    .unwrap()
                    .send_request(req, true)
                    .unwrap();
                let _ = resp.await;
            }
        }
    }
    drop(send);
    let _ = driver.await;
    let sent = upstream.await.unwrap();
    let _ = server.await;
    sent
}
