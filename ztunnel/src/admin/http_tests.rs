//! The admin/metrics/readiness server against hostile requests and failing accepts, over
//! real sockets on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// Serves, on a free loopback port, a handler that answers with the path and the length of
/// the body it was given.
async fn start() -> SocketAddr {
    start_with(HttpLimits::default()).await
}

async fn start_with(limits: HttpLimits) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(|req: Req| async move {
        text(
            StatusCode::OK,
            format!("{} {} bytes\n", req.path, req.body.len()),
        )
    });
    tokio::spawn(serve(listener, handler, limits));
    addr
}

/// Sends `request` on a new connection and returns what the server answered before
/// closing it. Writes while reading (the server may answer before reading everything) and
/// ignores writes the closed connection refuses.
async fn exchange(addr: SocketAddr, request: Vec<u8>) -> String {
    let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    // The write half is handed back, not dropped: dropping it would half-close.
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&request).await;
        w
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the server neither answered nor closed");
    drop(writer.await);
    String::from_utf8_lossy(&answer).into_owned()
}

fn post(path: &str, body_len: usize) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {body_len}\r\n\r\n"
    )
    .into_bytes();
    req.resize(req.len() + body_len, b'x');
    req
}

async fn assert_still_serves(addr: SocketAddr) {
    let answer = exchange(
        addr,
        b"GET /after HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("/after 0 bytes\n"), "{answer}");
}

#[tokio::test]
async fn a_body_up_to_the_limit_is_read() {
    let addr = start().await;
    let answer = exchange(addr, post("/ok", MAX_BODY)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("/ok {MAX_BODY} bytes\n")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_declared_too_large_body_is_refused_unread() {
    let addr = start().await;
    // Only the head: the refusal must not wait for a body it will not read.
    let head = format!(
        "POST /big HTTP/1.1\r\nhost: test\r\ncontent-length: {}\r\n\r\n",
        100 * MAX_BODY
    );
    let answer = exchange(addr, head.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(!answer.contains("/big"), "the handler ran: {answer}");
    // One byte over, with the whole body sent.
    let answer = exchange(addr, post("/big", MAX_BODY + 1)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn a_chunked_body_is_refused_once_past_the_limit() {
    let addr = start().await;
    // No length announced: the limit applies as the chunks arrive.
    let mut req =
        b"POST /chunked HTTP/1.1\r\nhost: test\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    let chunk = vec![b'x'; 8192];
    for _ in 0..(MAX_BODY / chunk.len() + 2) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = exchange(addr, req).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("/chunked"), "the handler ran: {answer}");
    assert_still_serves(addr).await;
}

#[tokio::test]
async fn failed_accepts_back_off() {
    // EMFILE three times, then a connection: one pause per failure, no spinning.
    let mut calls = 0u32;
    let started = Instant::now();
    let got = accept_with_backoff("test", || {
        calls += 1;
        let n = calls;
        async move {
            match n {
                1..=3 => Err(std::io::Error::from_raw_os_error(libc::EMFILE)),
                _ => Ok(n),
            }
        }
    })
    .await;
    assert_eq!(got, 4);
    assert!(started.elapsed() >= ACCEPT_BACKOFF * 3);
}

/// Reads until the server closes the connection; what it sent first.
async fn until_closed(conn: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server never closed the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

fn quick(max_connections: usize) -> HttpLimits {
    HttpLimits {
        http_max_connections: max_connections,
        http_header_timeout: Duration::from_millis(200),
        ..HttpLimits::default()
    }
}

/// The slow-header attack: a request line and then nothing. The server closes it.
#[tokio::test]
async fn a_client_dripping_headers_is_closed() {
    let addr = start_with(quick(16)).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /ready HTTP/1.1\r\nhost: t")
        .await
        .unwrap();
    let answer = until_closed(&mut c).await;
    assert!(!answer.contains("200 OK"), "{answer}");
}

/// A kept-alive connection left idle is closed; a connection that never sends is too.
#[tokio::test]
async fn idle_connections_are_closed() {
    let addr = start_with(quick(16)).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert_eq!(until_closed(&mut silent).await, "");
}

/// A body sent slower than the timeout is answered 408 and the connection closed.
#[tokio::test]
async fn a_dripped_body_is_refused() {
    let addr = start_with(quick(16)).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /a HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nxx")
        .await
        .unwrap();
    let answer = until_closed(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// Past the connection cap a new connection is closed before anything is read, and
/// counted; once one closes, new ones are served again.
#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let limits = HttpLimits {
        http_max_connections: 2,
        ..HttpLimits::default()
    };
    let addr = start_with(limits).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // A request served proves the server accepted it (and holds its permit).
        c.write_all(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    let before = crate::limits::hits("http_connections");
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(until_closed(&mut third).await, "", "refused unread");
    assert!(crate::limits::hits("http_connections") > before);
    drop(held.pop());
    // The permit comes back when the server sees the close: retry until it has.
    loop {
        let answer = exchange(
            addr,
            b"GET /b HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".to_vec(),
        )
        .await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request head larger than the buffer is refused, not buffered.
#[tokio::test]
async fn a_huge_request_head_is_refused() {
    let addr = start_with(HttpLimits::default()).await;
    let mut req = b"GET /a HTTP/1.1\r\nhost: t\r\nx-big: ".to_vec();
    req.resize(req.len() + 64 * 1024, b'a');
    req.extend_from_slice(b"\r\n\r\n");
    let answer = exchange(addr, req).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}
