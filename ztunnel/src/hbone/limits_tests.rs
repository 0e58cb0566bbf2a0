//! The server side's per-connection limits, over an in-memory connection: the stream limit
//! it announces, and the PING that closes a connection whose peer stopped answering.

use std::time::Duration;

use http::{Method, Request, StatusCode};

use super::*;
use crate::tls::tests::id;

fn connect_req() -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri("10.0.0.1:80")
        .body(())
        .unwrap()
}

/// A server within `opts` on one end of an in-memory connection (`buffer` bytes each
/// way) that refuses every CONNECT; the other end, and the server's task.
fn serve(
    buffer: usize,
    opts: ServerOptions,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), HboneError>>,
) {
    let (c, s) = tokio::io::duplex(buffer);
    let server = tokio::spawn(serve_connection_with(
        s,
        id("client"),
        |req: InboundRequest| async move { req.reject(StatusCode::FORBIDDEN) },
        std::future::pending(),
        opts,
    ));
    (c, server)
}

#[tokio::test]
async fn the_stream_limit_is_announced() {
    let (c, _server) = serve(
        1 << 16,
        ServerOptions {
            max_streams: 7,
            ..ServerOptions::default()
        },
    );
    let (send, conn) = h2::client::handshake(c).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let (resp, _body) = send.send_request(connect_req(), false).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(send.current_max_send_streams(), 7);
}

/// A client that completes the HTTP/2 handshake and then never reads again (a dead or hung
/// node): its PING goes unanswered and the server ends the connection.
#[tokio::test]
async fn an_unanswered_ping_closes_the_connection() {
    let (c, server) = serve(
        1 << 16,
        ServerOptions {
            max_streams: 10,
            keepalive: Some(Keepalive {
                interval: Duration::from_millis(20),
                timeout: Duration::from_millis(50),
            }),
            ..ServerOptions::default()
        },
    );
    // Handshake, then hold the connection without ever polling it again.
    let (_send, _frozen) = h2::client::handshake(c).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server gives up on a silent peer")
        .unwrap();
    let err = ended.unwrap_err().to_string();
    assert!(err.contains("PING"), "{err}");
}

/// Rapid reset: a client that opens streams and resets each at once, faster than the
/// server accepts them, is cut off with GOAWAY once past the configured count, and the
/// limit hit is counted.
#[tokio::test]
async fn a_rapid_reset_client_is_cut_off_and_counted() {
    let before = crate::limits::hits("hbone_resets");
    let (c, server) = serve(
        1 << 20,
        ServerOptions {
            max_pending_resets: 3,
            ..ServerOptions::default()
        },
    );
    let (mut send, conn) = h2::client::handshake(c).await.unwrap();
    let client = tokio::spawn(conn);
    // Each stream's HEADERS and RST_STREAM go out back to back: the server reads them in
    // one batch, before its accept loop can take the stream.
    for _ in 0..200 {
        let Ok(ready) = send.clone().ready().await else {
            break;
        };
        send = ready;
        let Ok((_resp, mut body)) = send.send_request(connect_req(), false) else {
            break;
        };
        body.send_reset(h2::Reason::CANCEL);
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server closes the connection")
        .unwrap();
    assert!(ended.is_err(), "the connection ends in an error");
    assert!(
        crate::limits::hits("hbone_resets") > before,
        "and is counted"
    );
    client.abort();
}
