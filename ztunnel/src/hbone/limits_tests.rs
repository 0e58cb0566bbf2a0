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

#[tokio::test]
async fn the_stream_limit_is_announced() {
    let (c, s) = tokio::io::duplex(1 << 16);
    let opts = ServerOptions {
        max_streams: 7,
        keepalive: None,
    };
    tokio::spawn(serve_connection_with(
        s,
        id("client"),
        |req: InboundRequest| async move { req.reject(StatusCode::FORBIDDEN) },
        std::future::pending(),
        opts,
    ));
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
    let (c, s) = tokio::io::duplex(1 << 16);
    let opts = ServerOptions {
        max_streams: 10,
        keepalive: Some(Keepalive {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(50),
        }),
    };
    let server = tokio::spawn(serve_connection_with(
        s,
        id("client"),
        |req: InboundRequest| async move { req.reject(StatusCode::FORBIDDEN) },
        std::future::pending(),
        opts,
    ));
    // Handshake, then hold the connection without ever polling it again.
    let (_send, _frozen) = h2::client::handshake(c).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("the server gives up on a silent peer")
        .unwrap();
    let err = ended.unwrap_err().to_string();
    assert!(err.contains("PING"), "{err}");
}
