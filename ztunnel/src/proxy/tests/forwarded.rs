//! The `forwarded` spoof, tried as an attacker would: a client with a valid mesh
//! certificate (the neighbour's) dials the server's node directly and names another pod's
//! address (or none, or the node's) as its source. Each attempt is refused with 403,
//! counted with its reason, and the server never sees a connection.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Request, StatusCode};

use super::*;
use crate::identity::Identity;

/// An echo server on `ip` that counts the connections it accepts.
async fn watched_echo(ip: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted: Arc<AtomicUsize> = Arc::default();
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, accepted)
}

/// An HBONE connection to node-b presenting `sa`'s certificate, as any holder of a mesh
/// identity can open one.
async fn attacker(m: &Mesh, sa: &str) -> h2::client::SendRequest<Bytes> {
    let me = Identity::new("cluster.local", "default", sa);
    let cert = m.certs.fetch(&me).await.unwrap();
    let server = Identity::new("cluster.local", "default", "server");
    let config = crate::tls::client_config(&cert, &[server]).unwrap();
    let tcp = TcpStream::connect(m.hbone_b).await.unwrap();
    let dialed: SocketAddr = format!("{SERVER}:15008").parse().unwrap();
    let tls = crate::tls::connect(config, dialed, tcp).await.unwrap();
    crate::hbone::handshake(tls).await.unwrap().0
}

/// CONNECT to `target` with `headers` and some early data; the answer's status, and for
/// a 200 what the echo sent back.
async fn connect(
    send: &h2::client::SendRequest<Bytes>,
    target: SocketAddr,
    headers: &[(&str, &str)],
) -> (StatusCode, Option<Vec<u8>>) {
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut send = send.clone().ready().await.unwrap();
    let (response, mut stream) = send.send_request(req.body(()).unwrap(), false).unwrap();
    stream
        .send_data(Bytes::from_static(b"secret"), false)
        .unwrap();
    let response = tokio::time::timeout(T, response).await.unwrap().unwrap();
    let status = response.status();
    if status != StatusCode::OK {
        return (status, None);
    }
    let mut body = response.into_body();
    let mut got = Vec::new();
    while got.len() < 6 {
        let chunk = tokio::time::timeout(T, body.data()).await.unwrap();
        let chunk = chunk.unwrap().unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    (status, Some(got))
}

const ONLY_FROM_CLIENT: &str = "policies:\n- name: only-client-ip\n  namespace: default\n  \
    scope: Namespace\n  action: Allow\n  rules:\n  - - - sourceIps: [\"127.0.0.2/32\"]\n";

#[tokio::test]
async fn a_spoofed_source_is_refused_where_a_source_ip_policy_would_have_allowed_it() {
    let m = mesh(ONLY_FROM_CLIENT).await;
    let (dst, accepted) = watched_echo(SERVER).await;
    // The honest path: the client's own node names the client's address, and it is believed.
    assert_eq!(
        m.round_trip(CLIENT, dst, b"honest").await.unwrap(),
        b"honest"
    );
    eventually("the honest connection delivered", || {
        m.b.attempts("inbound", "ok", "-") == 1
    })
    .await;
    let honest = accepted.load(Ordering::SeqCst);
    assert_eq!(honest, 1);

    // The neighbour, with its own valid certificate, claims the client's address.
    let send = attacker(&m, "neighbour").await;
    let (status, body) = connect(&send, dst, &[("forwarded", "for=127.0.0.2")]).await;
    assert_eq!((status, body), (StatusCode::FORBIDDEN, None));
    eventually("the spoof refused and counted", || {
        m.b.attempts("inbound", "denied", "forwarded_not_the_peer") == 1
    })
    .await;
    assert_eq!(m.b.closed_with_flag("DENY"), 1);
    // With its real address the policy refuses it, as it should.
    let (status, _) = connect(&send, dst, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    eventually("the real source denied by policy", || {
        m.b.attempts("inbound", "denied", "policy_denied") == 1
    })
    .await;
    // The server never saw either attempt.
    assert_eq!(accepted.load(Ordering::SeqCst), honest);
}

#[tokio::test]
async fn a_source_the_client_may_not_name_is_refused_without_any_policy() {
    let m = mesh("").await;
    let (dst, accepted) = watched_echo(SERVER).await;
    let send = attacker(&m, "neighbour").await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        // Another pod's address: the pod would see the connection coming from it.
        (&[("forwarded", "for=127.0.0.2")], "forwarded_not_the_peer"),
        (
            &[
                ("forwarded", "for=127.0.0.2"),
                ("ztunnel-source-port", "4000"),
            ],
            "forwarded_not_the_peer",
        ),
        // An address no workload has.
        (&[("forwarded", "for=10.9.9.9")], "forwarded_not_the_peer"),
        // No address at all (the connection would come from the node).
        (
            &[("forwarded", "for=0.0.0.0")],
            "forwarded_reserved_address",
        ),
        (
            &[("forwarded", "for=\"[::]\"")],
            "forwarded_reserved_address",
        ),
        // The node's own address.
        (&[("forwarded", "for=127.0.0.1")], "forwarded_node_address"),
        // A port without an address.
        (
            &[("ztunnel-source-port", "4000")],
            "forwarded_port_without_address",
        ),
    ];
    for (headers, reason) in cases {
        let before = m.b.attempts("inbound", "denied", reason);
        let (status, body) = connect(&send, dst, headers).await;
        assert_eq!((status, body), (StatusCode::FORBIDDEN, None), "{headers:?}");
        eventually(&format!("{headers:?} counted as {reason}"), || {
            m.b.attempts("inbound", "denied", reason) == before + 1
        })
        .await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the server saw a refused stream"
    );
    // Its own address (or none) it may use: the tunnel's real peer is the source.
    for headers in [&[][..], &[("forwarded", "for=127.0.0.4")][..]] {
        let (status, body) = connect(&send, dst, headers).await;
        assert_eq!(status, StatusCode::OK, "{headers:?}");
        assert_eq!(body.as_deref(), Some(&b"secret"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
